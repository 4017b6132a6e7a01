//! The Helm CLI built by `e2e/helm/build.sh`, and the manifests it renders, applied to a real API server.
//!
//! Tests run `helm` as a process (`lint`, `template`) and apply what `helm template` prints with server-side apply
//! through a [`kube::Client`]; no test needs `helm install` or a kubeconfig for Helm.
//!
//! ```no_run
//! # async fn example(client: kube::Client) -> Result<(), tally_e2e::HelmError> {
//! let helm = tally_e2e::Helm::locate()?;
//! let manifests = helm.template(&tally_e2e::chart_dir(), "tally", "tally-system", &[])?;
//! for object in manifests.objects() {
//!     tally_e2e::apply(&client, object, tally_e2e::Apply::DryRun).await?;
//! }
//! # Ok(())
//! # }
//! ```

use std::{
    env,
    ffi::OsStr,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use k8s_openapi::serde::Deserialize;
use kube::{
    Api, Client, ResourceExt,
    api::{DynamicObject, GroupVersionKind, Patch, PatchParams},
    discovery::{self, Scope},
};

/// The field manager of every object [`apply`] writes.
pub const FIELD_MANAGER: &str = "tally-e2e";

/// Why Helm could not be found or run, or its output not applied.
#[derive(Debug, thiserror::Error)]
pub enum HelmError {
    #[error("helm {version} is missing at {}: run `make helm` (e2e/helm/build.sh) first", path.display())]
    Missing { version: String, path: PathBuf },

    #[error("e2e/helm/go.mod requires no helm.sh/helm/v3 release; it must name one, like v3.22.0")]
    NoVersion,

    #[error("running {}: {source}", path.display())]
    Spawn {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("`helm {args}` failed ({status}):\n{stderr}")]
    Failed {
        args: String,
        status: std::process::ExitStatus,
        stderr: String,
    },

    #[error("`helm {args}` printed a document that is not a Kubernetes object: {source}")]
    NotAnObject {
        args: String,
        source: serde_yaml::Error,
    },

    #[error("a rendered {kind} has no apiVersion, kind or name")]
    Incomplete { kind: String },

    #[error("the API server does not serve {kind} (is its CRD installed?): {source}")]
    UnknownKind {
        /// `group/version Kind`.
        kind: String,
        source: Box<kube::Error>,
    },

    #[error("{what} {name}: {source}")]
    Api {
        what: &'static str,
        name: String,
        source: Box<kube::Error>,
    },
}

/// The Helm release pinned in `e2e/helm/go.mod`, e.g. `v3.22.0`.
pub fn helm_version() -> Result<&'static str, HelmError> {
    include_str!("../helm/go.mod")
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let first = words.next()?;
            let module = if first == "require" {
                words.next()?
            } else {
                first
            };
            (module == "helm.sh/helm/v3")
                .then(|| words.next())
                .flatten()
        })
        .find(|version| version.starts_with("v3."))
        .ok_or(HelmError::NoVersion)
}

/// `charts/tally` in this checkout.
pub fn chart_dir() -> PathBuf {
    tally_tests::workspace_root().join("charts").join("tally")
}

/// The Helm binary: `TALLY_HELM_BIN` when set, else `${XDG_CACHE_HOME:-$HOME/.cache}/tally/helm/<version>/bin/helm`,
/// where `e2e/helm/build.sh` puts it.
#[derive(Debug, Clone)]
pub struct Helm {
    path: PathBuf,
}

impl Helm {
    /// Finds the binary, failing with what to run when it is not there (tests never skip).
    pub fn locate() -> Result<Self, HelmError> {
        let version = helm_version()?;
        let path = match env::var_os("TALLY_HELM_BIN").filter(|v| !v.is_empty()) {
            Some(path) => PathBuf::from(path),
            None => cache_dir()
                .join("tally")
                .join("helm")
                .join(version)
                .join("bin")
                .join("helm"),
        };
        if !path.is_file() {
            return Err(HelmError::Missing {
                version: version.to_string(),
                path,
            });
        }
        Ok(Helm { path })
    }

    /// The binary's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `helm args...` with a private Helm home (no user repositories or plugins), returning its output whatever
    /// its exit status.
    pub fn output<I, S>(&self, args: I) -> Result<Output, HelmError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let home = env::temp_dir().join("tally-e2e-helm-home");
        Command::new(&self.path)
            .args(args)
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_DATA_HOME", home.join("data"))
            // Nothing here talks to a cluster; make sure an ambient kubeconfig is never used.
            .env("KUBECONFIG", "/dev/null")
            .output()
            .map_err(|source| HelmError::Spawn {
                path: self.path.clone(),
                source,
            })
    }

    /// Runs `helm args...`, returning its stdout, or an error with its stderr when it fails.
    pub fn run<I, S>(&self, args: I) -> Result<String, HelmError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let output = self.output(&args)?;
        if !output.status.success() {
            return Err(HelmError::Failed {
                args: display_args(&args),
                status: output.status,
                stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// `helm install <release> <chart> --namespace <namespace> --create-namespace --kubeconfig <kubeconfig>`, the
    /// chart's defaults into a real cluster; returns Helm's output.
    pub fn install(
        &self,
        chart: &Path,
        release: &str,
        namespace: &str,
        kubeconfig: &Path,
    ) -> Result<String, HelmError> {
        self.run([
            "install".as_ref(),
            release.as_ref(),
            chart.as_os_str(),
            "--namespace".as_ref(),
            namespace.as_ref(),
            "--create-namespace".as_ref(),
            "--kubeconfig".as_ref(),
            kubeconfig.as_os_str(),
        ])
    }

    /// `helm template <release> <chart> --namespace <namespace> [-f values]...`, parsed into objects.
    pub fn template(
        &self,
        chart: &Path,
        release: &str,
        namespace: &str,
        values_files: &[&Path],
    ) -> Result<Manifests, HelmError> {
        let mut args = vec![
            "template".into(),
            release.into(),
            chart.as_os_str().to_owned(),
            "--namespace".into(),
            namespace.into(),
        ];
        for file in values_files {
            args.push("--values".into());
            args.push(file.as_os_str().to_owned());
        }
        let yaml = self.run(&args)?;
        Manifests::parse(&yaml).map_err(|source| HelmError::NotAnObject {
            args: display_args(&args),
            source,
        })
    }
}

/// The objects of a rendered chart, in the order Helm printed them (Helm's install order: CRDs, RBAC, Services,
/// workloads).
#[derive(Debug, Clone)]
pub struct Manifests {
    objects: Vec<DynamicObject>,
}

impl Manifests {
    /// Parses a multi-document YAML stream, skipping empty documents.
    pub fn parse(yaml: &str) -> Result<Self, serde_yaml::Error> {
        let mut objects = Vec::new();
        for document in serde_yaml::Deserializer::from_str(yaml) {
            let value = serde_yaml::Value::deserialize(document)?;
            if value.is_null() {
                continue;
            }
            objects.push(serde_yaml::from_value(value)?);
        }
        Ok(Manifests { objects })
    }

    /// Every object.
    pub fn objects(&self) -> &[DynamicObject] {
        &self.objects
    }

    /// The objects of one kind.
    pub fn of_kind<'a>(&'a self, kind: &str) -> impl Iterator<Item = &'a DynamicObject> + use<'a> {
        let kind = kind.to_string();
        self.objects
            .iter()
            .filter(move |o| o.types.as_ref().is_some_and(|t| t.kind == kind))
    }

    /// The one object of `kind` named `name`, if rendered.
    pub fn get(&self, kind: &str, name: &str) -> Option<&DynamicObject> {
        self.of_kind(kind).find(|o| o.name_any() == name)
    }

    /// Every `tally_*` metric queried by the rendered PrometheusRules' expressions and by the Grafana dashboards
    /// (ConfigMaps labelled `grafana_dashboard`), sorted.
    pub fn queried_metrics(&self) -> Vec<String> {
        let mut exprs = Vec::new();
        for rule in self.of_kind("PrometheusRule") {
            collect_exprs(&rule.data["spec"], &mut exprs);
        }
        for config_map in self.of_kind("ConfigMap") {
            if !config_map.labels().contains_key("grafana_dashboard") {
                continue;
            }
            for dashboard in config_map.data["data"]
                .as_object()
                .into_iter()
                .flat_map(|d| d.values())
            {
                if let Ok(dashboard) =
                    serde_json::from_str::<serde_json::Value>(dashboard.as_str().unwrap_or(""))
                {
                    collect_exprs(&dashboard, &mut exprs);
                }
            }
        }
        let names: std::collections::BTreeSet<String> =
            exprs.iter().flat_map(|expr| metric_names(expr)).collect();
        names.into_iter().collect()
    }
}

/// The metrics of `wanted` that have no sample line in a Prometheus text `exposition`.
pub fn missing_metrics<'a>(wanted: &'a [String], exposition: &str) -> Vec<&'a String> {
    wanted
        .iter()
        .filter(|name| {
            !exposition.lines().any(|line| {
                line.strip_prefix(name.as_str())
                    .is_some_and(|rest| rest.starts_with(['{', ' ']))
            })
        })
        .collect()
}

/// Every string under an `expr` key, at any depth.
fn collect_exprs(value: &serde_json::Value, exprs: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr", serde_json::Value::String(expr)) => exprs.push(expr.clone()),
                    _ => collect_exprs(value, exprs),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, exprs)),
        _ => {}
    }
}

/// The `tally_*` identifiers in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("tally_") {
        let preceded = rest[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !preceded {
            names.push(name.clone());
        }
        rest = &rest[at + name.len()..];
    }
    names
}

/// Whether [`apply`] persists the object or only asks the API server to validate and admit it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Apply {
    /// `dryRun=All`: every validation and admission step runs, nothing is stored.
    DryRun,
    /// A real server-side apply.
    Persist,
}

/// The group, version and kind of a rendered object.
pub fn gvk_of(object: &DynamicObject) -> Result<GroupVersionKind, HelmError> {
    let types = object.types.as_ref().ok_or_else(|| HelmError::Incomplete {
        kind: "object".into(),
    })?;
    let (group, version) = match types.api_version.split_once('/') {
        Some((group, version)) => (group, version),
        None => ("", types.api_version.as_str()),
    };
    Ok(GroupVersionKind::gvk(group, version, &types.kind))
}

/// Whether the API server serves the kind of `object` (a kind from a CRD is served once the CRD is established).
pub async fn is_served(client: &Client, object: &DynamicObject) -> Result<bool, HelmError> {
    let gvk = gvk_of(object)?;
    Ok(discovery::pinned_kind(client, &gvk).await.is_ok())
}

/// Server-side applies `object` (forced, field manager [`FIELD_MANAGER`]), into its own `metadata.namespace` when
/// the kind is namespaced, and returns what the API server answered.
pub async fn apply(
    client: &Client,
    object: &DynamicObject,
    mode: Apply,
) -> Result<DynamicObject, HelmError> {
    let (api, name, kind) = api_for(client, object).await?;
    let mut params = PatchParams::apply(FIELD_MANAGER).force();
    if mode == Apply::DryRun {
        params = params.dry_run();
    }
    api.patch(&name, &params, &Patch::Apply(object))
        .await
        .map_err(|source| HelmError::Api {
            what: match mode {
                Apply::DryRun => "dry-run server-side apply of",
                Apply::Persist => "server-side apply of",
            },
            name: format!("{kind} {name}"),
            source: Box::new(source),
        })
}

/// Reads the stored version of `object` (same kind, namespace and name) back from the API server.
pub async fn get(client: &Client, object: &DynamicObject) -> Result<DynamicObject, HelmError> {
    let (api, name, kind) = api_for(client, object).await?;
    api.get(&name).await.map_err(|source| HelmError::Api {
        what: "reading",
        name: format!("{kind} {name}"),
        source: Box::new(source),
    })
}

/// The API of `object`'s kind (found by discovery) in its namespace, its name and its kind.
async fn api_for(
    client: &Client,
    object: &DynamicObject,
) -> Result<(Api<DynamicObject>, String, String), HelmError> {
    let gvk = gvk_of(object)?;
    let name = object.metadata.name.clone().ok_or(HelmError::Incomplete {
        kind: gvk.kind.clone(),
    })?;
    let (resource, capabilities) =
        discovery::pinned_kind(client, &gvk)
            .await
            .map_err(|source| HelmError::UnknownKind {
                kind: format!("{}/{} {}", gvk.group, gvk.version, gvk.kind),
                source: Box::new(source),
            })?;
    let api = match (capabilities.scope, object.metadata.namespace.as_deref()) {
        (Scope::Namespaced, Some(namespace)) => {
            Api::namespaced_with(client.clone(), namespace, &resource)
        }
        (Scope::Namespaced, None) => Api::default_namespaced_with(client.clone(), &resource),
        (Scope::Cluster, _) => Api::all_with(client.clone(), &resource),
    };
    Ok((api, name, gvk.kind))
}

fn cache_dir() -> PathBuf {
    env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"))
}

fn display_args(args: &[std::ffi::OsString]) -> String {
    args.iter()
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

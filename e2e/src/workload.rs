//! Workloads on the real node, shared by its tests and `make demo`: namespaces labelled for injection, the usage
//! app (`tally-usage-app`, a binary of this crate) as a Deployment, and waiting for its pods.

use std::collections::BTreeMap;

use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{Namespace, Pod},
};
use kube::{
    Api, Client,
    api::{ListParams, LogParams, Patch, PatchParams},
};
use serde_json::{Value, json};

use crate::Error;

/// The reference the usage app's image is imported as ([`crate::RealNode::import_binary`]).
pub const USAGE_APP_IMAGE: &str = "localhost/tally-e2e/usage-app:test";
/// The field manager of what this module applies.
const FIELD_MANAGER: &str = "tally-e2e-workload";

/// Creates (or updates) `name`, labelled `metering.tally.dev/inject=enabled` and enforcing the `restricted` Pod
/// Security Standard, so whatever runs there, the injected sidecar included, must be locked down.
pub async fn create_metered_namespace(client: &Client, name: &str) -> Result<(), Error> {
    let labels = BTreeMap::from([
        ("metering.tally.dev/inject", "enabled"),
        ("pod-security.kubernetes.io/enforce", "restricted"),
    ]);
    Api::<Namespace>::all(client.clone())
        .patch(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(json!({
                "apiVersion": "v1", "kind": "Namespace",
                "metadata": { "name": name, "labels": labels }
            })),
        )
        .await
        .map_err(|source| Error::Api {
            context: format!("creating the namespace {name}"),
            source,
        })?;
    Ok(())
}

/// One replica of the usage app (see `src/bin/tally-usage-app.rs` for `env`), as locked down as `restricted`
/// demands; `POD_NAME` comes from the downward API.
pub async fn deploy_usage_app(
    client: &Client,
    namespace: &str,
    name: &str,
    env: &[(&str, String)],
) -> Result<(), Error> {
    let mut variables: Vec<Value> = env
        .iter()
        .map(|(name, value)| json!({ "name": name, "value": value }))
        .collect();
    variables.push(json!({
        "name": "POD_NAME",
        "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } }
    }));
    Api::<Deployment>::namespaced(client.clone(), namespace)
        .patch(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(json!({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": { "name": name },
                "spec": {
                    "replicas": 1,
                    "selector": { "matchLabels": { "app": name } },
                    "template": {
                        "metadata": { "labels": { "app": name } },
                        "spec": {
                            "securityContext": {
                                "runAsNonRoot": true,
                                "seccompProfile": { "type": "RuntimeDefault" }
                            },
                            "containers": [{
                                "name": "app",
                                "image": USAGE_APP_IMAGE,
                                "imagePullPolicy": "Never",
                                "env": variables,
                                "securityContext": {
                                    "allowPrivilegeEscalation": false,
                                    "readOnlyRootFilesystem": true,
                                    "capabilities": { "drop": ["ALL"] }
                                }
                            }]
                        }
                    }
                }
            })),
        )
        .await
        .map_err(|source| Error::Api {
            context: format!("deploying {namespace}/{name}"),
            source,
        })?;
    Ok(())
}

/// The namespace's first pod, once it runs and every container (a native sidecar included) is ready.
pub async fn running_pod(client: &Client, namespace: &str) -> Option<Pod> {
    let pods = Api::<Pod>::namespaced(client.clone(), namespace)
        .list(&ListParams::default())
        .await
        .ok()?;
    let pod = pods.items.into_iter().next()?;
    let status = pod.status.as_ref()?;
    let all_ready = status
        .container_statuses
        .iter()
        .flatten()
        .chain(status.init_container_statuses.iter().flatten())
        .all(|c| c.ready);
    (status.phase.as_deref() == Some("Running") && all_ready).then_some(pod)
}

/// A container's log, through the API server and the kubelet.
pub async fn pod_logs(
    client: &Client,
    namespace: &str,
    pod: &str,
    container: &str,
) -> Option<String> {
    Api::<Pod>::namespaced(client.clone(), namespace)
        .logs(
            pod,
            &LogParams {
                container: Some(container.into()),
                ..LogParams::default()
            },
        )
        .await
        .ok()
}

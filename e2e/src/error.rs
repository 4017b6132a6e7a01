use std::{io, path::PathBuf, process::ExitStatus, time::Duration};

/// Why the control plane could not be started or used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "{binary} for Kubernetes {version} is missing at {}: run e2e/k8s/build.sh first",
        path.display()
    )]
    MissingKubernetesBinary {
        binary: &'static str,
        version: &'static str,
        path: PathBuf,
    },

    #[error(
        "{what} of kwok {version} is missing at {}: run e2e/kwok/build.sh first",
        path.display()
    )]
    MissingKwok {
        what: &'static str,
        version: &'static str,
        path: PathBuf,
    },

    #[error(
        "the etcd binary of the etcd-bin-vendored crate is missing at {}: run `cargo fetch` to restore the \
         crate's sources",
        path.display()
    )]
    MissingEtcdBinary { path: PathBuf },

    #[error("etcd-bin-vendored has no etcd binary for this platform: {0}")]
    EtcdUnsupported(String),

    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },

    #[error("generating the control plane's certificates: {0}")]
    Certificate(#[from] rcgen::Error),

    #[error("writing a kubeconfig: {0}")]
    KubeconfigWrite(#[from] serde_yaml::Error),

    #[error("loading the admin kubeconfig: {0}")]
    KubeconfigLoad(#[from] kube::config::KubeconfigError),

    #[error("building an HTTP client for health checks: {0}")]
    HealthClient(#[from] reqwest::Error),

    #[error("{component} exited during start-up ({status}); its log is {}", log.display())]
    Exited {
        component: &'static str,
        status: ExitStatus,
        log: PathBuf,
    },

    #[error(
        "{component} was not ready within {timeout:?}; last check: {last_check}; its log is {}",
        log.display()
    )]
    NotReady {
        component: &'static str,
        timeout: Duration,
        last_check: String,
        log: PathBuf,
    },

    #[error("this machine cannot run a real node: {0}")]
    NodeUnavailable(String),

    #[error("the real node: {0}")]
    Node(String),

    #[error(
        "coredns {version} is missing at {}: run e2e/coredns/build.sh first",
        path.display()
    )]
    MissingCoreDns {
        version: &'static str,
        path: PathBuf,
    },

    #[error("the API server returned {0} without a name")]
    UnnamedObject(&'static str),

    #[error("{context}: {source}")]
    Api {
        context: String,
        source: kube::Error,
    },
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

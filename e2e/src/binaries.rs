//! Where the programs of the control plane are: etcd from the `etcd-bin-vendored` crate, the Kubernetes
//! components in the cache that `e2e/k8s/build.sh` fills.

use std::{
    env,
    path::{Path, PathBuf},
};

use crate::Error;

/// The Kubernetes release the binaries are built from, as pinned in `e2e/k8s/VERSION`.
pub const KUBERNETES_VERSION: &str = include_str!("../k8s/VERSION").trim_ascii();

/// `${XDG_CACHE_HOME:-$HOME/.cache}/tally/k8s/<version>/bin`, where `e2e/k8s/build.sh` puts the binaries.
pub fn kubernetes_bin_dir() -> PathBuf {
    let cache = env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache
        .join("tally")
        .join("k8s")
        .join(KUBERNETES_VERSION)
        .join("bin")
}

/// Paths of the three programs, each checked to exist.
#[derive(Debug, Clone)]
pub(crate) struct Binaries {
    pub etcd: PathBuf,
    pub kube_apiserver: PathBuf,
    pub kube_controller_manager: PathBuf,
}

impl Binaries {
    pub fn locate() -> Result<Self, Error> {
        let bin_dir = kubernetes_bin_dir();
        Ok(Binaries {
            etcd: etcd()?,
            kube_apiserver: kubernetes_binary(&bin_dir, "kube-apiserver")?,
            kube_controller_manager: kubernetes_binary(&bin_dir, "kube-controller-manager")?,
        })
    }
}

/// The crate ships the release binary in its own sources and returns its path there.
fn etcd() -> Result<PathBuf, Error> {
    let path =
        etcd_bin_vendored::etcd_bin_path().map_err(|e| Error::EtcdUnsupported(e.to_string()))?;
    if !path.is_file() {
        return Err(Error::MissingEtcdBinary {
            path: path.to_path_buf(),
        });
    }
    Ok(path.to_path_buf())
}

fn kubernetes_binary(bin_dir: &Path, binary: &'static str) -> Result<PathBuf, Error> {
    let path = bin_dir.join(binary);
    if !path.is_file() {
        return Err(Error::MissingKubernetesBinary {
            binary,
            version: KUBERNETES_VERSION,
            path,
        });
    }
    Ok(path)
}

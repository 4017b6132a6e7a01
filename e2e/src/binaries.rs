//! Where the programs of the control plane are: etcd from the `etcd-bin-vendored` crate, the Kubernetes
//! components in the cache that `e2e/k8s/build.sh` fills.

use std::{
    env,
    path::{Path, PathBuf},
};

use crate::Error;

/// The Kubernetes release the binaries are built from, as pinned in `e2e/k8s/VERSION`.
pub const KUBERNETES_VERSION: &str = include_str!("../k8s/VERSION").trim_ascii();

/// The kwok release built for fake nodes, as pinned in `e2e/kwok/VERSION`.
pub const KWOK_VERSION: &str = include_str!("../kwok/VERSION").trim_ascii();

/// The CoreDNS release `e2e/coredns/build.sh` builds, as required in `e2e/coredns/go.mod`.
pub fn coredns_version() -> &'static str {
    include_str!("../coredns/go.mod")
        .lines()
        .find_map(|line| line.strip_prefix("require github.com/coredns/coredns "))
        .map(str::trim)
        .unwrap_or("unknown")
}

/// `${XDG_CACHE_HOME:-$HOME/.cache}/tally`.
fn cache_dir() -> PathBuf {
    env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"))
        .join("tally")
}

/// `${XDG_CACHE_HOME:-$HOME/.cache}/tally/k8s/<version>/bin`, where `e2e/k8s/build.sh` puts the binaries.
pub fn kubernetes_bin_dir() -> PathBuf {
    cache_dir().join("k8s").join(KUBERNETES_VERSION).join("bin")
}

/// `${XDG_CACHE_HOME:-$HOME/.cache}/tally/kwok/<version>`, where `e2e/kwok/build.sh` puts `bin/kwok` and the
/// `stages.yaml` it runs with.
pub fn kwok_dir() -> PathBuf {
    cache_dir().join("kwok").join(KWOK_VERSION)
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

/// What fake nodes need on top of the control plane and its scheduler: kwok with its stages.
#[derive(Debug, Clone)]
pub(crate) struct FakeNodeBinaries {
    pub kwok: PathBuf,
    pub kwok_stages: PathBuf,
}

impl FakeNodeBinaries {
    pub fn locate() -> Result<Self, Error> {
        let kwok_dir = kwok_dir();
        let kwok_file = |what: &'static str, path: PathBuf| {
            if path.is_file() {
                Ok(path)
            } else {
                Err(Error::MissingKwok {
                    what,
                    version: KWOK_VERSION,
                    path,
                })
            }
        };
        Ok(FakeNodeBinaries {
            kwok: kwok_file("kwok", kwok_dir.join("bin").join("kwok"))?,
            kwok_stages: kwok_file("stages.yaml", kwok_dir.join("stages.yaml"))?,
        })
    }
}

pub(crate) fn kubernetes_binary(bin_dir: &Path, binary: &'static str) -> Result<PathBuf, Error> {
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

/// What a real node runs besides Debian's containerd and runc: the kubelet and kube-proxy and the pause program
/// (`e2e/k8s/build.sh`), and CoreDNS (`e2e/coredns/build.sh`).
#[derive(Debug, Clone)]
pub(crate) struct RealNodeBinaries {
    pub kubelet: PathBuf,
    pub kube_proxy: PathBuf,
    pub pause: PathBuf,
    pub coredns: PathBuf,
    /// Joins the node's network namespace; found on PATH (util-linux).
    pub nsenter: PathBuf,
}

impl RealNodeBinaries {
    pub fn locate() -> Result<Self, Error> {
        let bin_dir = kubernetes_bin_dir();
        let version = coredns_version();
        let coredns = cache_dir()
            .join("coredns")
            .join(version)
            .join("bin")
            .join("coredns");
        if !coredns.is_file() {
            return Err(Error::MissingCoreDns {
                version,
                path: coredns,
            });
        }
        Ok(RealNodeBinaries {
            kubelet: kubernetes_binary(&bin_dir, "kubelet")?,
            kube_proxy: kubernetes_binary(&bin_dir, "kube-proxy")?,
            pause: kubernetes_binary(&bin_dir, "pause")?,
            coredns,
            nsenter: PathBuf::from("nsenter"),
        })
    }
}

/// `images/oci_image.py` in this checkout, which builds an OCI image archive of one binary.
pub(crate) fn images_script() -> PathBuf {
    tally_tests::workspace_root()
        .join("images")
        .join("oci_image.py")
}

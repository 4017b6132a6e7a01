//! A real, local Kubernetes control plane for Tally's tests: etcd, `kube-apiserver` and `kube-controller-manager`
//! as processes on 127.0.0.1, with no Docker and no kubelet.
//!
//! ```no_run
//! # async fn example() -> Result<(), tally_e2e::Error> {
//! let control_plane = tally_e2e::ControlPlane::start().await?;
//! let namespace = control_plane.new_namespace("my-test").await?;
//! let client = control_plane.client();
//! // ... create objects in `namespace` with `client`; the real controllers act on them.
//! control_plane.stop();
//! # Ok(())
//! # }
//! ```
//!
//! The Kubernetes binaries are built by `e2e/k8s/build.sh` (see `e2e/README.md`); etcd comes from the
//! `etcd-bin-vendored` crate.

mod binaries;
mod control_plane;
mod error;
mod helm;
mod kubeconfig;
mod node;
mod pki;
mod process;
pub mod workload;

pub use binaries::{
    KUBERNETES_VERSION, KWOK_VERSION, coredns_version, kubernetes_bin_dir, kwok_dir,
};
pub use control_plane::{ControlPlane, ControlPlaneBuilder, FAKE_NODE_ANNOTATION, NAMESPACE_LABEL};
pub use error::Error;
pub use helm::{
    Apply, FIELD_MANAGER, Helm, HelmError, Manifests, apply, chart_dir, get, gvk_of, helm_version,
    is_served, missing_metrics,
};
pub use node::{CLUSTER_DOMAIN, HOST_IP, NODE_IP, NODE_NAME, PAUSE_IMAGE, POD_CIDR, RealNode};
pub use process::set_parent_death_signal;

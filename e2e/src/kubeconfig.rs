use std::{fs, path::Path};

use kube::config::{
    AuthInfo, Cluster, Context, Kubeconfig, NamedAuthInfo, NamedCluster, NamedContext,
};

use crate::{Error, pki::CertFiles};

const NAME: &str = "tally-e2e";

/// Writes a kubeconfig for `server` that trusts `ca_cert` and authenticates with the client certificate `user`.
/// The files are referenced by path, so the kubeconfig is valid as long as the control plane's directory exists.
pub(crate) fn write(
    path: &Path,
    server: &str,
    ca_cert: &Path,
    user: &CertFiles,
) -> Result<(), Error> {
    let kubeconfig = Kubeconfig {
        api_version: Some("v1".into()),
        kind: Some("Config".into()),
        clusters: vec![NamedCluster {
            name: NAME.into(),
            cluster: Some(Cluster {
                server: Some(server.into()),
                certificate_authority: Some(ca_cert.display().to_string()),
                ..Cluster::default()
            }),
            ..NamedCluster::default()
        }],
        auth_infos: vec![NamedAuthInfo {
            name: NAME.into(),
            auth_info: Some(AuthInfo {
                client_certificate: Some(user.cert.display().to_string()),
                client_key: Some(user.key.display().to_string()),
                ..AuthInfo::default()
            }),
            ..NamedAuthInfo::default()
        }],
        contexts: vec![NamedContext {
            name: NAME.into(),
            context: Some(Context {
                cluster: NAME.into(),
                user: Some(NAME.into()),
                ..Context::default()
            }),
            ..NamedContext::default()
        }],
        current_context: Some(NAME.into()),
        ..Kubeconfig::default()
    };
    let yaml = serde_yaml::to_string(&kubeconfig)?;
    fs::write(path, yaml).map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

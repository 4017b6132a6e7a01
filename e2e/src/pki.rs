//! The certificates of one control plane, generated fresh for every start and written as PEM files.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::Error;

/// A certificate and its private key, as PEM files.
#[derive(Debug, Clone)]
pub(crate) struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Every key and certificate the control plane needs, all ECDSA P-256.
#[derive(Debug, Clone)]
pub(crate) struct Pki {
    /// The CA that signs every certificate below; the API server trusts client certificates it signed.
    pub ca_cert: PathBuf,
    /// Serves HTTPS on 127.0.0.1 / localhost (kube-apiserver and kube-controller-manager).
    pub serving: CertFiles,
    /// The admin user, in group `system:masters`.
    pub admin: CertFiles,
    /// kube-controller-manager's client identity, also in `system:masters` so its controllers need no RBAC setup.
    pub controller_manager: CertFiles,
    /// The real node's kubelet, `system:node:<name>` in `system:nodes` (the Node authorizer's convention).
    pub kubelet: CertFiles,
    /// The real node's kube-proxy, `system:kube-proxy` (bound to `system:node-proxier` by the default policy).
    pub kube_proxy: CertFiles,
    /// Service-account token signing key (private) and verification key (public).
    pub service_account_key: PathBuf,
    pub service_account_pub: PathBuf,
}

impl Pki {
    /// `serving_ips` are the addresses the serving certificate is valid for besides 127.0.0.1; it is also valid for
    /// the in-cluster names of the `kubernetes` Service, for pods that reach the API server through it.
    pub fn generate(dir: &Path, serving_ips: &[IpAddr], node_name: &str) -> Result<Self, Error> {
        fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;

        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::default();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "tally-e2e-ca");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let ca = Issuer::new(ca_params, ca_key);
        let ca_cert_path = write(dir, "ca.crt", &ca_cert.pem())?;

        let mut serving = leaf("kube-apiserver", None, ExtendedKeyUsagePurpose::ServerAuth);
        serving.subject_alt_names = vec![
            SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            SanType::DnsName("localhost".try_into()?),
        ];
        serving
            .subject_alt_names
            .extend(serving_ips.iter().map(|ip| SanType::IpAddress(*ip)));
        for name in [
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ] {
            serving
                .subject_alt_names
                .push(SanType::DnsName(name.try_into()?));
        }
        let serving = issue(dir, "serving", serving, &ca)?;

        let admin = leaf(
            "tally-e2e-admin",
            Some("system:masters"),
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        let admin = issue(dir, "admin", admin, &ca)?;

        let controller_manager = leaf(
            "system:kube-controller-manager",
            Some("system:masters"),
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        let controller_manager = issue(dir, "kube-controller-manager", controller_manager, &ca)?;

        let kubelet = leaf(
            &format!("system:node:{node_name}"),
            Some("system:nodes"),
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        let kubelet = issue(dir, "kubelet", kubelet, &ca)?;
        let kube_proxy = leaf(
            "system:kube-proxy",
            None,
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        let kube_proxy = issue(dir, "kube-proxy", kube_proxy, &ca)?;

        let service_account = KeyPair::generate()?;
        let service_account_key =
            write(dir, "service-account.key", &service_account.serialize_pem())?;
        let service_account_pub = write(
            dir,
            "service-account.pub",
            &service_account.public_key_pem(),
        )?;

        Ok(Pki {
            ca_cert: ca_cert_path,
            serving,
            admin,
            controller_manager,
            kubelet,
            kube_proxy,
            service_account_key,
            service_account_pub,
        })
    }
}

/// Kubernetes reads the user name from the common name and the groups from the organizations.
fn leaf(
    common_name: &str,
    organization: Option<&str>,
    usage: ExtendedKeyUsagePurpose,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    if let Some(organization) = organization {
        params
            .distinguished_name
            .push(DnType::OrganizationName, organization);
    }
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![usage];
    params.use_authority_key_identifier_extension = true;
    params
}

fn issue(
    dir: &Path,
    name: &str,
    params: CertificateParams,
    ca: &Issuer<'_, KeyPair>,
) -> Result<CertFiles, Error> {
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, ca)?;
    Ok(CertFiles {
        cert: write(dir, &format!("{name}.crt"), &cert.pem())?,
        key: write(dir, &format!("{name}.key"), &key.serialize_pem())?,
    })
}

fn write(dir: &Path, name: &str, pem: &str) -> Result<PathBuf, Error> {
    let path = dir.join(name);
    fs::write(&path, pem).map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
    Ok(path)
}

//! TLS for the `postgres` output, with libpq's `sslmode` meanings: `disable`; `prefer` and
//! `require` encrypt without checking the certificate unless `caFile` is given (then it must chain
//! to a trusted CA, as libpq does with a root certificate file); `verify-ca` checks the chain;
//! `verify-full` also checks that it names the host. Trusted CAs: the Mozilla roots of
//! webpki-roots plus `caFile`.

use std::path::Path;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::output::read_ca_file;

/// How the server's certificate is checked, following libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verify {
    /// `prefer` or `require` without `caFile`: encrypted, the certificate is not checked
    /// (as libpq does; managed and in-cluster servers mostly have private CAs).
    Default,
    /// `verify-ca`, or `caFile` given: the certificate must chain to a trusted root.
    Chain,
    /// `verify-full`: it must also name the host.
    Full,
}

/// tokio-postgres knows `disable`, `prefer` and `require`; libpq's `verify-ca` and `verify-full`
/// become `require` plus a certificate check.
pub(super) fn take_verify_mode(url: &str) -> (String, Verify) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_string(), Verify::Default);
    };
    let mut verify = Verify::Default;
    let params: Vec<String> = query
        .split('&')
        .map(|param| match param {
            "sslmode=verify-ca" => {
                verify = Verify::Chain;
                "sslmode=require".to_string()
            }
            "sslmode=verify-full" => {
                verify = Verify::Full;
                "sslmode=require".to_string()
            }
            other => other.to_string(),
        })
        .collect();
    (format!("{base}?{}", params.join("&")), verify)
}

/// The TLS connector for `verify`, trusting the webpki roots plus the certificates in `ca_file`.
pub(super) fn tls_connector(
    verify: Verify,
    ca_file: Option<&Path>,
    index: usize,
) -> anyhow::Result<MakeRustlsConnect> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let pem = read_ca_file(path, index)?;
        let mut added = 0;
        for certificate in CertificateDer::pem_slice_iter(&pem) {
            let certificate = certificate.map_err(|e| {
                anyhow::anyhow!(
                    "outputs.targets[{index}].caFile: {} is not a PEM bundle of CA certificates: {e}",
                    path.display()
                )
            })?;
            roots.add(certificate).map_err(|e| {
                anyhow::anyhow!(
                    "outputs.targets[{index}].caFile: a certificate in {} is not usable: {e}",
                    path.display()
                )
            })?;
            added += 1;
        }
        if added == 0 {
            anyhow::bail!(
                "outputs.targets[{index}].caFile: {} holds no certificate; give a PEM file with \
                 one or more `BEGIN CERTIFICATE` blocks",
                path.display()
            );
        }
    }
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| anyhow::anyhow!("outputs.targets[{index}]: cannot set up TLS: {e}"))?;
    let verifier: Arc<dyn ServerCertVerifier> = match verify {
        Verify::Default => Arc::new(NoCertificateCheck(provider.clone())),
        Verify::Chain => Arc::new(ChainOnly(webpki)),
        Verify::Full => webpki,
    };
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| anyhow::anyhow!("outputs.targets[{index}]: cannot set up TLS: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// `sslmode=prefer|require` without `caFile`: any certificate, but the handshake signatures
/// are still checked.
#[derive(Debug)]
struct NoCertificateCheck(Arc<CryptoProvider>);

impl ServerCertVerifier for NoCertificateCheck {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to a trusted root; the name in the certificate may differ
/// from the host (as with libpq, for servers reached through a Service or an IP address).
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// What to do about a failed TLS handshake, judged from rustls' message.
pub(super) fn tls_fix(message: &str) -> Option<&'static str> {
    if message.contains("not valid for name") {
        Some(
            "connect with a host name the certificate names, or use sslmode=verify-ca to check \
             only that it chains to a trusted CA",
        )
    } else if message.contains("certificate") {
        Some(
            "trust the server's CA with caFile, or use sslmode=require without caFile to skip \
             certificate checks",
        )
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_failures_say_what_to_fix() {
        let name = tls_fix(
            "error performing TLS handshake: invalid peer certificate: certificate not valid for name \"10.0.0.5\"",
        )
        .unwrap_or_default();
        assert!(name.contains("verify-ca"), "{name}");
        let issuer =
            tls_fix("error performing TLS handshake: invalid peer certificate: UnknownIssuer")
                .unwrap_or_default();
        assert!(issuer.contains("caFile"), "{issuer}");
        assert_eq!(
            tls_fix("error connecting to server: Connection refused"),
            None
        );
    }

    #[test]
    fn verify_modes_follow_libpq() {
        assert_eq!(
            take_verify_mode("postgres://u@h/db"),
            ("postgres://u@h/db".to_string(), Verify::Default)
        );
        assert_eq!(
            take_verify_mode("postgres://u@h/db?sslmode=require&application_name=x"),
            (
                "postgres://u@h/db?sslmode=require&application_name=x".to_string(),
                Verify::Default
            )
        );
        assert_eq!(
            take_verify_mode("postgres://u@h/db?connect_timeout=3&sslmode=verify-full"),
            (
                "postgres://u@h/db?connect_timeout=3&sslmode=require".to_string(),
                Verify::Full
            )
        );
        assert_eq!(
            take_verify_mode("postgres://u@h/db?sslmode=verify-ca").1,
            Verify::Chain
        );
    }
}

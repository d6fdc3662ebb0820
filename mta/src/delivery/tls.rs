//! Client TLS for outbound STARTTLS (RFC 3207).
//!
//! Opportunistic TLS (RFC 7435) encrypts whatever the receiver offers and
//! does not stop delivery on a certificate it cannot verify: most MX hosts
//! present certificates that fail web PKI checks, and refusing them would
//! only push mail to plaintext. The handshake therefore accepts any
//! certificate, and afterwards we verify the presented chain ourselves
//! against the web PKI roots (and configured extra anchors) so the
//! transaction log says whether it verified, and why not.

use std::path::Path;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_rustls::TlsConnector;

/// What the handshake negotiated and what verification said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsOutcome {
    pub version: String,
    pub cipher: String,
    /// The certificate chains to a trusted root and names the MX host.
    pub verified: bool,
    /// Why it did not verify.
    pub verify_error: Option<String>,
}

/// The connector and the verifier used to judge certificates afterwards.
#[derive(Clone)]
pub struct ClientTls {
    pub connector: TlsConnector,
    verifier: Arc<WebPkiServerVerifier>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientTls")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientTlsError {
    #[error("cannot read [delivery] tls_trust_anchors {path}: {reason}")]
    Anchors { path: String, reason: String },
}

impl ClientTls {
    /// TLS 1.2 and 1.3 with the process's aws-lc-rs provider; `anchors`
    /// adds CA certificates (PEM) to the web PKI roots for verification.
    pub fn new(anchors: Option<&Path>) -> Result<ClientTls, ClientTlsError> {
        let mut roots = RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        if let Some(path) = anchors {
            let fail = |reason: String| ClientTlsError::Anchors {
                path: path.display().to_string(),
                reason,
            };
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .map_err(|e| fail(e.to_string()))?
                .collect::<Result<_, _>>()
                .map_err(|e| fail(e.to_string()))?;
            if certs.is_empty() {
                return Err(fail("no PEM certificate in the file".into()));
            }
            for c in certs {
                roots.add(c).map_err(|e| fail(e.to_string()))?;
            }
        }
        let verifier = WebPkiServerVerifier::builder(Arc::new(roots))
            .build()
            .expect("a root store with the web PKI roots is never empty");
        let config = ClientConfig::builder_with_protocol_versions(&[
            &rustls::version::TLS13,
            &rustls::version::TLS12,
        ])
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(verifier.clone())))
        .with_no_client_auth();
        Ok(ClientTls {
            connector: TlsConnector::from(Arc::new(config)),
            verifier,
        })
    }

    /// Judges the chain the server presented on `conn` for `host`.
    pub fn outcome(&self, conn: &ClientConnection, host: &str) -> TlsOutcome {
        let info = crate::tls::info(conn);
        let result = match (conn.peer_certificates(), ServerName::try_from(host)) {
            (Some([end, intermediates @ ..]), Ok(name)) => self
                .verifier
                .verify_server_cert(end, intermediates, &name, &[], UnixTime::now())
                .map(|_| ())
                .map_err(|e| e.to_string()),
            (Some([_, ..]), Err(_)) => {
                Err(format!("'{host}' is not a name a certificate can carry"))
            }
            (Some([]) | None, _) => Err("no certificate presented".into()),
        };
        TlsOutcome {
            version: info.version,
            cipher: info.cipher,
            verified: result.is_ok(),
            verify_error: result.err(),
        }
    }
}

/// Accepts every certificate (see the module doc), while still checking
/// that the server holds the key of the certificate it presented.
#[derive(Debug)]
struct AcceptAny(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AcceptAny {
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

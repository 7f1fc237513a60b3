//! The agent-side client configuration: a server is trusted only if its chain verifies against
//! the trust bundle AND its key matches the primary or the backup SPKI pin. Tests, the load
//! generator and tooling use it; its rules are the gateway's.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use viworks_core::auth::{AuthError, PinMatch, PinSet, SpkiPin};

use super::{ALPN_HTTP_1_1, TlsError, provider};

/// Which pin the most recent full handshake through a pinned configuration matched, shared
/// between the configuration and its owner. A [`PinMatch::Backup`] means the host is serving
/// its next (or previous) key: a rotation is under way and operators should be told. Resumed
/// sessions do not verify the certificate again and leave the report unchanged.
#[derive(Clone, Default)]
pub struct PinReport(Arc<AtomicU8>);

// 0, the default, means no certificate verified yet.
const PRIMARY: u8 = 1;
const BACKUP: u8 = 2;

impl PinReport {
    /// The pin matched by the latest verified server certificate, if any was verified yet.
    pub fn last_match(&self) -> Option<PinMatch> {
        match self.0.load(Ordering::Relaxed) {
            PRIMARY => Some(PinMatch::Primary),
            BACKUP => Some(PinMatch::Backup),
            _ => None,
        }
    }

    fn record(&self, matched: PinMatch) {
        let value = match matched {
            PinMatch::Primary => PRIMARY,
            PinMatch::Backup => BACKUP,
        };
        self.0.store(value, Ordering::Relaxed);
    }
}

impl fmt::Debug for PinReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("PinReport").field(&self.last_match()).finish()
    }
}

/// A client configuration for the agent endpoint: TLS 1.3, ALPN `http/1.1`, the client
/// certificate chain and key from PEM, and a server verifier that requires both a chain to
/// `ca_pem` valid for the server name (webpki) and a key matching `pins`. A backup match is
/// logged as a warning and recorded in the returned [`PinReport`].
///
/// A refused server fails the handshake with `rustls::Error::InvalidCertificate`; on a pin
/// mismatch its `CertificateError::Other` holds [`TlsError::PinMismatch`] with the pin the
/// server presented. Fails if any PEM input is empty or malformed, or the key does not suit
/// the certificate.
pub fn pinned_client_config(
    ca_pem: &[u8],
    client_cert_pem: &[u8],
    client_key_pem: &[u8],
    pins: PinSet,
) -> Result<(Arc<ClientConfig>, PinReport), TlsError> {
    let mut roots = RootCertStore::empty();
    for anchor in certificates("CA certificate", ca_pem)? {
        roots.add(anchor).map_err(|e| TlsError::BadPem { what: "CA certificate", reason: e.to_string() })?;
    }
    let chain = certificates("client certificate", client_cert_pem)?;
    let key = PrivateKeyDer::from_pem_slice(client_key_pem)
        .map_err(|e| TlsError::BadPem { what: "client private key", reason: e.to_string() })?;

    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|source| TlsError::Verifier { what: "pinned server", source })?;
    let report = PinReport::default();
    let verifier = PinnedServerVerifier { webpki, pins, report: report.clone() };

    let config_error = |source| TlsError::Config { what: "pinned client", source };
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(config_error)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(chain, key)
        .map_err(config_error)?;
    config.alpn_protocols = vec![ALPN_HTTP_1_1.to_vec()];
    Ok((Arc::new(config), report))
}

fn certificates(what: &'static str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadPem { what, reason: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::BadPem { what, reason: "no CERTIFICATE block found".into() });
    }
    Ok(certs)
}

/// webpki's verdict first, then the pin.
#[derive(Debug)]
struct PinnedServerVerifier {
    webpki: Arc<WebPkiServerVerifier>,
    pins: PinSet,
    report: PinReport,
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        // The chain is valid from here; the pin decides whether it is our host.
        match self.pins.check_certificate_der(end_entity.as_ref()) {
            Ok(PinMatch::Primary) => {
                self.report.record(PinMatch::Primary);
                Ok(verified)
            }
            Ok(PinMatch::Backup) => {
                tracing::warn!(
                    server = ?server_name,
                    pin = %self.pins.backup.map(|p| p.to_base64()).unwrap_or_default(),
                    "server matched the BACKUP SPKI pin: a key rotation is in progress; \
                     make the new key the primary pin once the rotation completes"
                );
                self.report.record(PinMatch::Backup);
                Ok(verified)
            }
            Err(AuthError::PinMismatch { got }) => Err(pin_mismatch(got)),
            Err(_) => Err(rustls::Error::InvalidCertificate(CertificateError::BadEncoding)),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

fn pin_mismatch(got: SpkiPin) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(TlsError::PinMismatch { got }))))
}

#[cfg(test)]
mod tests {
    use std::io;

    use viworks_core::wire::AgentId;

    use super::*;
    use crate::tls::test_support::{self, fixture};
    use crate::tls::{HandshakeFailure, IssuedAgent, Pki, Validity, agent_server_config};

    fn issued(pki: &Pki) -> IssuedAgent {
        pki.issue_agent(&AgentId::new("gw-pin").expect("id"), Validity::agent_default()).expect("issue")
    }

    fn config(pki: &Pki, agent: &IssuedAgent, pins: PinSet) -> (Arc<ClientConfig>, PinReport) {
        pinned_client_config(pki.ca_pem().as_bytes(), agent.cert_pem.as_bytes(), agent.key_pem.as_bytes(), pins)
            .expect("client config")
    }

    /// The pin mismatch carried inside a failed connect, if that is why it failed.
    fn mismatched_pin(err: &io::Error) -> Option<SpkiPin> {
        match err.get_ref()?.downcast_ref::<rustls::Error>()? {
            rustls::Error::InvalidCertificate(CertificateError::Other(other)) => match other.0.downcast_ref() {
                Some(TlsError::PinMismatch { got }) => Some(*got),
                _ => None,
            },
            _ => None,
        }
    }

    #[tokio::test]
    async fn a_valid_chain_with_the_wrong_pin_is_refused() {
        let (_dir, pki) = fixture();
        let agent = issued(&pki);
        let wrong = PinSet { primary: SpkiPin::of_spki_der(b"someone else"), backup: None };
        let (client, report) = config(&pki, &agent, wrong);
        let (_, client) = test_support::handshake(agent_server_config(&pki).expect("server"), client).await;
        let err = client.expect_err("refused");
        assert_eq!(mismatched_pin(&err), Some(pki.host_pin()), "{err}");
        assert!(TlsError::PinMismatch { got: pki.host_pin() }.to_string().contains(&pki.host_pin().to_base64()));
        assert_eq!(report.last_match(), None);
    }

    #[tokio::test]
    async fn the_primary_pin_is_reported_as_primary() {
        let (_dir, pki) = fixture();
        let agent = issued(&pki);
        let (client, report) = config(&pki, &agent, PinSet { primary: pki.host_pin(), backup: None });
        let (server, client) = test_support::handshake(agent_server_config(&pki).expect("server"), client).await;
        assert!(server.is_ok() && client.is_ok());
        assert_eq!(report.last_match(), Some(PinMatch::Primary));
    }

    #[tokio::test]
    async fn the_backup_pin_is_accepted_and_reported() {
        let (_dir, pki) = fixture();
        let agent = issued(&pki);
        let pins = PinSet { primary: SpkiPin::of_spki_der(b"the next key"), backup: Some(pki.host_pin()) };
        let (client, report) = config(&pki, &agent, pins);
        let (server, client) = test_support::handshake(agent_server_config(&pki).expect("server"), client).await;
        assert!(server.is_ok());
        assert!(client.is_ok());
        assert_eq!(report.last_match(), Some(PinMatch::Backup));
    }

    #[tokio::test]
    async fn the_right_pin_on_an_untrusted_chain_is_refused() {
        let (_dir, pki) = fixture();
        let (_other_dir, other) = fixture();
        let agent = issued(&pki);
        // Trust our CA, pin the other host's key: the other host's chain does not verify.
        let (client, report) = config(&pki, &agent, PinSet { primary: other.host_pin(), backup: None });
        let (_, client) = test_support::handshake(agent_server_config(&other).expect("server"), client).await;
        let err = client.expect_err("refused");
        assert_eq!(HandshakeFailure::classify(&err), HandshakeFailure::UnknownIssuer, "{err}");
        assert_eq!(report.last_match(), None);
    }

    #[tokio::test]
    async fn a_name_outside_the_host_certificate_is_refused() {
        let (_dir, pki) = fixture();
        let agent = issued(&pki);
        let (client, _) = config(&pki, &agent, PinSet { primary: pki.host_pin(), backup: None });
        let name = ServerName::try_from("elsewhere.example").expect("name");
        let (_, client) =
            test_support::handshake_as(agent_server_config(&pki).expect("server"), client, name.to_owned()).await;
        assert!(client.is_err());
    }

    #[test]
    fn malformed_inputs_name_what_is_wrong() {
        let (_dir, pki) = fixture();
        let agent = issued(&pki);
        let pins = PinSet { primary: pki.host_pin(), backup: None };
        let err =
            pinned_client_config(b"", agent.cert_pem.as_bytes(), agent.key_pem.as_bytes(), pins).expect_err("no CA");
        assert!(err.to_string().contains("CA certificate"), "{err}");
        let err = pinned_client_config(pki.ca_pem().as_bytes(), agent.cert_pem.as_bytes(), b"junk", pins)
            .expect_err("no key");
        assert!(err.to_string().contains("client private key"), "{err}");
    }
}

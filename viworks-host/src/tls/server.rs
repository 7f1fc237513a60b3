//! The host's two rustls server configurations, and what a failed handshake means for the
//! operator.
//!
//! The agent endpoint speaks TLS 1.3 only: the channel binding (RFC 9266 exporter) that ties
//! the agent's HELLO to its connection is only safe on TLS 1.3 (or 1.2 with extended master
//! secret, which rustls does not let a caller verify), and every agent is ours. The API
//! endpoint also accepts TLS 1.2 for older HTTP clients.

use std::io;
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::{CertificateError, RootCertStore, ServerConfig, SupportedProtocolVersion};

use super::{ALPN_HTTP_1_1, Pki, TlsError, provider};

/// The configuration of the agent endpoint: TLS 1.3 only, ALPN `http/1.1`, the host
/// certificate, and a client certificate required and verified against every certificate of
/// `ca.crt` (chain, validity period, clientAuth usage). Who the agent is comes from
/// [`agent_identity`](super::agent_identity) after the handshake.
///
/// Sessions resume with stateless tickets (ring `Ticketer`, keys rotated every 6 hours), so a
/// reconnecting fleet costs no per-agent server memory and skips the signature operations; a
/// resumed session carries the client certificate verified at its full handshake, so a
/// certificate that expires is still accepted on resumption until its ticket ages out.
///
/// Fails if the CA or host certificate cannot be used by rustls.
pub fn agent_server_config(pki: &Pki) -> Result<Arc<ServerConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    for anchor in pki.trust_anchors() {
        roots.add(anchor.clone()).map_err(|e| TlsError::UnsupportedCa {
            path: pki.paths().ca_cert.clone(),
            reason: format!("rustls cannot use it as a trust anchor: {e}"),
        })?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|source| TlsError::Verifier { what: "agent client certificate", source })?;
    build("agent endpoint", &[&rustls::version::TLS13], verifier, pki)
}

/// The configuration of the optional HTTPS API endpoint: TLS 1.3 or 1.2, ALPN `http/1.1`, the
/// host certificate, no client certificate (API clients authenticate with bearer tokens).
pub fn api_server_config(pki: &Pki) -> Result<Arc<ServerConfig>, TlsError> {
    let versions: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];
    build("API endpoint", versions, WebPkiClientVerifier::no_client_auth(), pki)
}

fn build(
    what: &'static str,
    versions: &[&'static SupportedProtocolVersion],
    verifier: Arc<dyn ClientCertVerifier>,
    pki: &Pki,
) -> Result<Arc<ServerConfig>, TlsError> {
    let config_error = |source| TlsError::Config { what, source };
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .map_err(config_error)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(pki.host_cert_chain().to_vec(), pki.host_key())
        .map_err(config_error)?;
    config.alpn_protocols = vec![ALPN_HTTP_1_1.to_vec()];
    config.ticketer = rustls::crypto::ring::Ticketer::new().map_err(config_error)?;
    Ok(Arc::new(config))
}

/// Why a TLS handshake on a host endpoint failed, in the terms an operator or an audit record
/// needs. tokio-rustls reports a refused handshake as an [`io::Error`] of kind `InvalidData`
/// wrapping a [`rustls::Error`]; [`HandshakeFailure::classify`] unwraps it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum HandshakeFailure {
    /// The client sent no certificate (`rustls::Error::NoCertificatesPresented`).
    NoClientCertificate,
    /// The client certificate does not chain to `ca.crt`: another CA, or self-signed.
    UnknownIssuer,
    /// The client certificate has expired.
    CertificateExpired,
    /// The client certificate is not valid yet (or one of the clocks is wrong).
    CertificateNotYetValid,
    /// The client certificate is otherwise unacceptable: bad signature, wrong key usage (a
    /// server certificate used as a client one), malformed, revoked.
    BadCertificate,
    /// The peer refused the handshake with an alert, typically because it does not trust the
    /// host certificate (wrong CA or SPKI pin on the agent).
    RefusedByPeer,
    /// Any other TLS failure: no common protocol version, cipher suite or ALPN protocol, or a
    /// malformed message.
    Protocol,
    /// The transport failed (reset, closed mid-handshake, timed out) before TLS decided.
    Io,
}

impl HandshakeFailure {
    /// Classifies the error of a failed `TlsAcceptor::accept` (or `TlsConnector::connect`).
    pub fn classify(err: &io::Error) -> Self {
        match err.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
            Some(tls) => HandshakeFailure::of_rustls(tls),
            None => HandshakeFailure::Io,
        }
    }

    /// Classifies a rustls error.
    pub fn of_rustls(err: &rustls::Error) -> Self {
        match err {
            rustls::Error::NoCertificatesPresented => HandshakeFailure::NoClientCertificate,
            rustls::Error::InvalidCertificate(cert) => match cert {
                CertificateError::UnknownIssuer => HandshakeFailure::UnknownIssuer,
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    HandshakeFailure::CertificateExpired
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    HandshakeFailure::CertificateNotYetValid
                }
                _ => HandshakeFailure::BadCertificate,
            },
            rustls::Error::AlertReceived(_) => HandshakeFailure::RefusedByPeer,
            _ => HandshakeFailure::Protocol,
        }
    }

    /// A stable `snake_case` name for logs, metrics labels and audit records.
    pub fn code(&self) -> &'static str {
        match self {
            HandshakeFailure::NoClientCertificate => "no_client_certificate",
            HandshakeFailure::UnknownIssuer => "unknown_issuer",
            HandshakeFailure::CertificateExpired => "certificate_expired",
            HandshakeFailure::CertificateNotYetValid => "certificate_not_yet_valid",
            HandshakeFailure::BadCertificate => "bad_certificate",
            HandshakeFailure::RefusedByPeer => "refused_by_peer",
            HandshakeFailure::Protocol => "protocol",
            HandshakeFailure::Io => "io",
        }
    }

    /// Whether the failure is about the client's credentials, which is worth an audit record
    /// (as opposed to network noise and scanners that speak no TLS).
    pub fn is_credential_failure(&self) -> bool {
        matches!(
            self,
            HandshakeFailure::NoClientCertificate
                | HandshakeFailure::UnknownIssuer
                | HandshakeFailure::CertificateExpired
                | HandshakeFailure::CertificateNotYetValid
                | HandshakeFailure::BadCertificate
        )
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use viworks_core::auth::PinSet;
    use viworks_core::wire::AgentId;

    use super::*;
    use crate::tls::test_support::{self, fixture};
    use crate::tls::{IssuedAgent, Validity, pinned_client_config};

    fn agent(id: &str) -> AgentId {
        AgentId::new(id).expect("valid id")
    }

    fn refusal(outcome: test_support::Outcome) -> HandshakeFailure {
        let err = outcome.server.expect_err("the server must refuse");
        HandshakeFailure::classify(&err)
    }

    #[tokio::test]
    async fn a_client_certificate_from_another_ca_is_refused() {
        let (_dir, pki) = fixture();
        let (_other_dir, other) = fixture();
        let foreign = other.issue_agent(&agent("gw-1"), Validity::agent_default()).expect("issue");
        let failure = refusal(test_support::connect_agent(&pki, &foreign).await);
        assert_eq!(failure, HandshakeFailure::UnknownIssuer);
        assert!(failure.is_credential_failure());
    }

    #[tokio::test]
    async fn a_client_without_a_certificate_is_refused() {
        let (_dir, pki) = fixture();
        let mut roots = RootCertStore::empty();
        roots.add(pki.trust_anchors()[0].clone()).expect("root");
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let server = agent_server_config(&pki).expect("server config");
        let (server, _client) = test_support::handshake(server, Arc::new(client)).await;
        let err = server.expect_err("refused");
        assert_eq!(HandshakeFailure::classify(&err), HandshakeFailure::NoClientCertificate, "{err}");
    }

    #[tokio::test]
    async fn an_expired_agent_certificate_is_refused() {
        let (_dir, pki) = fixture();
        let now = SystemTime::now();
        let day = Duration::from_secs(86_400);
        let expired = Validity { not_before: now - 30 * day, not_after: now - day };
        let issued = pki.issue_agent(&agent("gw-old"), expired).expect("issue");
        assert_eq!(refusal(test_support::connect_agent(&pki, &issued).await), HandshakeFailure::CertificateExpired);

        let future = Validity { not_before: now + day, not_after: now + 30 * day };
        let issued = pki.issue_agent(&agent("gw-early"), future).expect("issue");
        assert_eq!(refusal(test_support::connect_agent(&pki, &issued).await), HandshakeFailure::CertificateNotYetValid);
    }

    #[tokio::test]
    async fn the_host_certificate_cannot_log_in_as_an_agent() {
        let (dir, pki) = fixture();
        let paths = crate::tls::DataDirPaths::new(dir.path());
        let host_as_client = IssuedAgent {
            cert_pem: std::fs::read_to_string(&paths.host_cert).expect("read"),
            key_pem: std::fs::read_to_string(&paths.host_key).expect("read"),
        };
        let failure = refusal(test_support::connect_agent(&pki, &host_as_client).await);
        assert_eq!(
            failure,
            HandshakeFailure::BadCertificate,
            "serverAuth-only certificates are not client certificates"
        );
    }

    #[tokio::test]
    async fn the_api_endpoint_needs_no_client_certificate_and_offers_http_1_1() {
        let (_dir, pki) = fixture();
        let mut roots = RootCertStore::empty();
        roots.add(pki.trust_anchors()[0].clone()).expect("root");
        let mut client = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS12])
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = vec![ALPN_HTTP_1_1.to_vec()];
        let (server, client) =
            test_support::handshake(api_server_config(&pki).expect("config"), Arc::new(client)).await;
        let server = server.expect("accepted");
        assert_eq!(server.get_ref().1.alpn_protocol(), Some(ALPN_HTTP_1_1));
        assert!(client.is_ok());
    }

    #[tokio::test]
    async fn the_agent_endpoint_refuses_tls_1_2() {
        let (_dir, pki) = fixture();
        let issued = pki.issue_agent(&agent("gw-1"), Validity::agent_default()).expect("issue");
        let mut roots = RootCertStore::empty();
        roots.add(pki.trust_anchors()[0].clone()).expect("root");
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS12])
            .expect("versions")
            .with_root_certificates(roots)
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).expect("cert")],
                PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).expect("key"),
            )
            .expect("client config");
        let (server, _) = test_support::handshake(agent_server_config(&pki).expect("config"), Arc::new(client)).await;
        assert_eq!(HandshakeFailure::classify(&server.expect_err("refused")), HandshakeFailure::Protocol);
    }

    #[tokio::test]
    async fn the_server_learns_when_an_agent_refuses_its_certificate() {
        let (_dir, pki) = fixture();
        let issued = pki.issue_agent(&agent("gw-1"), Validity::agent_default()).expect("issue");
        let wrong = PinSet { primary: viworks_core::auth::SpkiPin::of_spki_der(b"not the host"), backup: None };
        let (client, _) =
            pinned_client_config(pki.ca_pem().as_bytes(), issued.cert_pem.as_bytes(), issued.key_pem.as_bytes(), wrong)
                .expect("client config");
        let (server, client) = test_support::handshake(agent_server_config(&pki).expect("config"), client).await;
        assert!(client.is_err());
        assert_eq!(HandshakeFailure::classify(&server.expect_err("refused")), HandshakeFailure::RefusedByPeer);
    }

    #[test]
    fn transport_errors_are_io() {
        let err = io::Error::new(io::ErrorKind::ConnectionReset, "reset");
        assert_eq!(HandshakeFailure::classify(&err), HandshakeFailure::Io);
        assert!(!HandshakeFailure::Io.is_credential_failure());
        assert_eq!(HandshakeFailure::CertificateExpired.code(), "certificate_expired");
    }
}

//! The agent's TLS: a host is trusted only if its chain verifies against the trust bundle AND
//! its key matches the primary or the backup SPKI pin; and the RFC 9266 channel binding that
//! ties the protocol's handshake keys to one TLS connection.
//!
//! All cryptography is rustls' `ring` provider, passed explicitly; no process-wide default
//! provider is installed or relied on. The host, its tests and the load generator use these
//! same functions, so every client of the agent endpoint follows the agent's rules.

use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, LazyLock};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, ConnectionCommon, DigitallySignedStruct, OtherError, ProtocolVersion,
    RootCertStore, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use thiserror::Error;
use viworks_core::auth::{AuthError, ChannelBinding, PinMatch, PinSet, SpkiPin};

/// The one ALPN protocol of the agent endpoint: WebSocket starts as HTTP/1.1.
pub const ALPN_HTTP_1_1: &[u8] = b"http/1.1";

/// The exporter label of RFC 9266.
const CHANNEL_BINDING_LABEL: &[u8] = b"EXPORTER-Channel-Binding";

/// Why a client TLS configuration could not be built, or a server was refused.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A PEM input is empty or malformed.
    #[error("the {what} is not valid PEM: {reason}")]
    BadPem {
        /// Which input.
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// rustls refused the configuration (a key that does not suit the certificate).
    #[error("building the {what} TLS configuration failed: {source}")]
    Config {
        /// Which configuration.
        what: &'static str,
        /// rustls' reason.
        #[source]
        source: rustls::Error,
    },
    /// The trust bundle cannot make a verifier.
    #[error("building the {what} certificate verifier failed: {source}")]
    Verifier {
        /// Which verifier.
        what: &'static str,
        /// rustls' reason.
        #[source]
        source: rustls::client::VerifierBuilderError,
    },
    /// The server's chain verified but its key matches neither pin.
    #[error(
        "the server's public key {got} matches neither the primary nor the backup SPKI pin; \
         check VIW_AGENT_BACKEND_SPKI_PIN against `viworks-host pin host.crt`"
    )]
    PinMismatch {
        /// The pin of the key the server presented.
        got: SpkiPin,
    },
    /// No channel binding can be derived from this connection.
    #[error("no channel binding available: {reason}")]
    ChannelBinding {
        /// Why.
        reason: String,
    },
}

/// The `ring` provider every configuration here is built with.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: LazyLock<Arc<CryptoProvider>> =
        LazyLock::new(|| Arc::new(rustls::crypto::ring::default_provider()));
    Arc::clone(&PROVIDER)
}

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

/// The pin mismatch behind a failed handshake, if that is why it failed.
pub fn mismatched_pin(error: &rustls::Error) -> Option<SpkiPin> {
    match error {
        rustls::Error::InvalidCertificate(CertificateError::Other(other)) => match other.0.downcast_ref() {
            Some(TlsError::PinMismatch { got }) => Some(*got),
            _ => None,
        },
        _ => None,
    }
}

/// The RFC 9266 channel binding (`tls-exporter`) of an established TLS 1.3 connection; both
/// ends of one connection derive the same value and any other connection a different one.
/// Fails before the handshake completes, and on anything but TLS 1.3.
pub fn channel_binding<Data>(conn: &ConnectionCommon<Data>) -> Result<ChannelBinding, TlsError> {
    if conn.is_handshaking() {
        return Err(TlsError::ChannelBinding { reason: "the TLS handshake has not completed".into() });
    }
    // RFC 9266 forbids the exporter on TLS 1.2 without extended master secret, which rustls
    // does not let us check; our agents and host only speak 1.3, so insist on it.
    if conn.protocol_version() != Some(ProtocolVersion::TLSv1_3) {
        return Err(TlsError::ChannelBinding {
            reason: format!("TLS 1.3 is required, the connection uses {:?}", conn.protocol_version()),
        });
    }
    let bytes = conn
        .export_keying_material([0u8; 32], CHANNEL_BINDING_LABEL, None)
        .map_err(|e| TlsError::ChannelBinding { reason: e.to_string() })?;
    Ok(ChannelBinding(bytes))
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

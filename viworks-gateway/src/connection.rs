//! Dialling the host: TCP, then TLS with the client certificate and the pinned server check,
//! then the WebSocket upgrade at the configured path. Outbound only.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::{AlertDescription, CertificateError, ClientConfig};
use thiserror::Error;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use viworks_core::auth::{ChannelBinding, PinMatch};
use viworks_core::wire::DEFAULT_MAX_MESSAGE_LEN;

use crate::config::Config;
use crate::tls::{self, PinReport, TlsError};

/// An established connection to the agent endpoint.
pub type Socket = WebSocketStream<TlsStream<TcpStream>>;

/// How long one connection attempt may take, TCP, TLS and upgrade together.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// A connection that is up: the socket, the binding that ties the protocol's handshake to
/// it, and which pin the host's key matched.
#[derive(Debug)]
pub struct Connected {
    /// The WebSocket.
    pub socket: Socket,
    /// The RFC 9266 channel binding of the TLS connection.
    pub binding: ChannelBinding,
    /// The pin the host's key matched.
    pub pin: Option<PinMatch>,
}

/// Why the client TLS configuration could not be built from the configured files.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum SetupError {
    /// A file could not be read.
    #[error("cannot read {what} {path}: {source}")]
    Read {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The PEM material does not make a TLS configuration.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The backend host is not a valid TLS server name.
    #[error("the backend host {0:?} is not a valid TLS server name")]
    ServerName(String),
}

/// Why one connection attempt failed. [`ConnectError`]'s display is the log line an operator
/// reads, so each case says what to check.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The host name did not resolve.
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        /// The name.
        host: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// No TCP connection to any resolved address.
    #[error("cannot connect to {target}: {source}")]
    Tcp {
        /// `host:port`.
        target: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The host's key matches neither pin: this is not our host, or its key was rotated
    /// without the agent being told.
    #[error("refusing the host: {0}")]
    PinMismatch(TlsError),
    /// The host's certificate does not verify against the trust bundle.
    #[error("refusing the host: its certificate does not verify against VIW_AGENT_TRUST_BUNDLE: {0}")]
    UntrustedHost(String),
    /// The host refused this agent's certificate (expired, revoked or from another CA).
    #[error("the host refused this agent's certificate ({0}); check VIW_AGENT_CERT_PATH and its expiry")]
    CertificateRefused(String),
    /// Another TLS failure.
    #[error("TLS handshake failed: {0}")]
    Tls(io::Error),
    /// The TLS connection has no usable channel binding.
    #[error(transparent)]
    Binding(TlsError),
    /// The WebSocket upgrade failed (wrong path, a proxy in the way, an HTTP error).
    #[error("WebSocket upgrade failed: {0}")]
    Upgrade(#[source] Box<tokio_tungstenite::tungstenite::Error>),
    /// The attempt took longer than [`CONNECT_TIMEOUT`].
    #[error("no connection within {0:?}")]
    Timeout(Duration),
}

/// Dials the host the configuration names. Built once; every attempt reuses the TLS setup.
#[derive(Clone, Debug)]
pub struct Connector {
    tls: Arc<ClientConfig>,
    report: PinReport,
    host: String,
    port: u16,
    url: String,
    server_name: ServerName<'static>,
}

impl Connector {
    /// Reads the certificate, key and trust bundle and builds the pinned TLS configuration.
    pub fn new(config: &Config) -> Result<Connector, SetupError> {
        let read = |what: &'static str, path: &std::path::Path| {
            std::fs::read(path).map_err(|source| SetupError::Read { what, path: path.display().to_string(), source })
        };
        let ca = read("trust bundle", &config.trust_bundle)?;
        let cert = read("client certificate", &config.cert_path)?;
        let key = read("client key", &config.key_path)?;
        let (tls, report) = tls::pinned_client_config(&ca, &cert, &key, config.pins)?;
        let server_name = ServerName::try_from(config.backend_host.clone())
            .map_err(|_| SetupError::ServerName(config.backend_host.clone()))?;
        Ok(Connector {
            tls,
            report,
            host: config.backend_host.clone(),
            port: config.backend_port,
            url: config.backend_url.clone(),
            server_name,
        })
    }

    /// The URL dialled.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// One connection attempt, bounded by [`CONNECT_TIMEOUT`].
    pub async fn connect(&self) -> Result<Connected, ConnectError> {
        match tokio::time::timeout(CONNECT_TIMEOUT, self.attempt()).await {
            Ok(result) => result,
            Err(_) => Err(ConnectError::Timeout(CONNECT_TIMEOUT)),
        }
    }

    async fn attempt(&self) -> Result<Connected, ConnectError> {
        let target = format!("{}:{}", self.host, self.port);
        let addrs: Vec<_> = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .map_err(|source| ConnectError::Resolve { host: self.host.clone(), source })?
            .collect();
        let mut last = io::Error::new(io::ErrorKind::NotFound, "the name resolved to no address");
        let mut tcp = None;
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(stream) => {
                    tcp = Some(stream);
                    break;
                }
                Err(e) => last = e,
            }
        }
        let tcp = tcp.ok_or(ConnectError::Tcp { target, source: last })?;
        let _ = tcp.set_nodelay(true);
        let tls =
            TlsConnector::from(Arc::clone(&self.tls)).connect(self.server_name.clone(), tcp).await.map_err(classify)?;
        let binding = tls::channel_binding(tls.get_ref().1).map_err(ConnectError::Binding)?;
        // In TLS 1.3 the client's handshake completes before the host has checked the client
        // certificate, so the host's refusal arrives as an alert during the upgrade.
        let (socket, _) = tokio_tungstenite::client_async_with_config(self.url.as_str(), tls, Some(ws_config()))
            .await
            .map_err(|error| match error {
                WsError::Io(io) => refusal(&io).unwrap_or_else(|| ConnectError::Upgrade(Box::new(WsError::Io(io)))),
                other => ConnectError::Upgrade(Box::new(other)),
            })?;
        Ok(Connected { socket, binding, pin: self.report.last_match() })
    }
}

/// WebSocket limits that match the protocol's: no message or frame above the largest
/// protocol message, and small buffers (an agent holds one connection, but the load
/// generator holds tens of thousands built from this same configuration). The read buffer is
/// the host's 4 KiB: tungstenite zero-fills that much before every read, and the messages an
/// agent receives (commands, acknowledgements) are far smaller; a larger one still arrives,
/// over several reads.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(DEFAULT_MAX_MESSAGE_LEN))
        .max_frame_size(Some(DEFAULT_MAX_MESSAGE_LEN))
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
}

/// Sorts a failed TLS handshake into what an operator should check.
fn classify(error: io::Error) -> ConnectError {
    refusal(&error).unwrap_or(ConnectError::Tls(error))
}

/// The refusal behind an I/O error, when TLS refused something an operator can fix.
fn refusal(error: &io::Error) -> Option<ConnectError> {
    let tls_error = error.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>())?;
    if let Some(got) = tls::mismatched_pin(tls_error) {
        return Some(ConnectError::PinMismatch(TlsError::PinMismatch { got }));
    }
    let refused = match tls_error {
        rustls::Error::InvalidCertificate(reason) => ConnectError::UntrustedHost(match reason {
            CertificateError::UnknownIssuer => "it was issued by another CA".to_owned(),
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "it has expired".to_owned(),
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                "it does not name the host in VIW_AGENT_BACKEND_URL".to_owned()
            }
            other => format!("{other:?}"),
        }),
        rustls::Error::AlertReceived(
            alert @ (AlertDescription::BadCertificate
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateRevoked
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnknownCA
            | AlertDescription::AccessDenied
            | AlertDescription::CertificateRequired
            | AlertDescription::DecryptError),
        ) => ConnectError::CertificateRefused(format!("{alert:?}")),
        _ => return None,
    };
    Some(refused)
}

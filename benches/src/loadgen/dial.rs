//! Dialling the agent endpoint the way a gateway does, from a chosen loopback source address:
//! TCP bound to the source, TLS 1.3 with the agent's client certificate and the pinned
//! verifier, the RFC 9266 channel binding, then the WebSocket upgrade with the gateway's
//! WebSocket limits. The TLS configuration, the binding and the limits are the gateway
//! crate's own functions; only the socket is made here, to choose its source address.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use thiserror::Error;
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use viworks_core::auth::ChannelBinding;

/// A client connection to the agent endpoint (or to the echo server).
pub type Socket = WebSocketStream<TlsStream<TcpStream>>;

/// The name the host's certificate is verified against (`viworks-host init` names
/// `localhost`, `127.0.0.1` and `::1`).
pub const SERVER_NAME: &str = "localhost";

/// Why one connection attempt failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum DialError {
    /// The socket could not be bound to its source address or could not connect.
    #[error("TCP from {source_addr} to {target}: {error}")]
    Tcp {
        /// The source address.
        source_addr: IpAddr,
        /// The target.
        target: SocketAddr,
        /// Why.
        error: std::io::Error,
    },
    /// The TLS handshake failed.
    #[error("TLS handshake: {0}")]
    Tls(std::io::Error),
    /// No channel binding could be derived.
    #[error(transparent)]
    Binding(viworks_gateway::tls::TlsError),
    /// The WebSocket upgrade failed.
    #[error("WebSocket upgrade: {0}")]
    Upgrade(Box<tokio_tungstenite::tungstenite::Error>),
}

/// Connects from `source` to `target` and upgrades to a WebSocket at `url`; returns the
/// socket and the TLS connection's channel binding.
pub async fn dial(
    source: IpAddr,
    target: SocketAddr,
    tls: Arc<ClientConfig>,
    url: &str,
) -> Result<(Socket, ChannelBinding), DialError> {
    let tcp_error = |error| DialError::Tcp { source_addr: source, target, error };
    let socket = TcpSocket::new_v4().map_err(tcp_error)?;
    socket.bind(SocketAddr::new(source, 0)).map_err(tcp_error)?;
    let tcp = socket.connect(target).await.map_err(tcp_error)?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from(SERVER_NAME).map_err(|e| DialError::Tls(std::io::Error::other(e)))?;
    let tls = TlsConnector::from(tls).connect(name, tcp).await.map_err(DialError::Tls)?;
    let binding = viworks_gateway::tls::channel_binding(tls.get_ref().1).map_err(DialError::Binding)?;
    let config = viworks_gateway::connection::ws_config();
    let (socket, _) = tokio_tungstenite::client_async_with_config(url, tls, Some(config))
        .await
        .map_err(|e| DialError::Upgrade(Box::new(e)))?;
    Ok((socket, binding))
}

//! The agent endpoint: `wss://…/ws/agent` with client certificates. Each connection proves
//! an agent identity with its certificate, carries one WebSocket, and drives one
//! [`HostSession`](viworks_core::session::HostSession) through the shared [`Control`].

mod connection;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::control::Control;
use crate::store::Store;

/// Limits of the agent endpoint.
#[derive(Clone, Copy, Debug)]
pub struct EndpointConfig {
    /// Time allowed for the TLS handshake, the WebSocket upgrade and the HELLO together.
    pub handshake_timeout: Duration,
    /// Connections being set up at once; beyond it new connections wait in the kernel backlog.
    pub max_pending_handshakes: usize,
}

impl Default for EndpointConfig {
    fn default() -> Self {
        EndpointConfig { handshake_timeout: Duration::from_secs(10), max_pending_handshakes: 1024 }
    }
}

/// Accepts agent connections on `listener` until `shutdown` turns true, then asks every live
/// session to close with `going_away` and returns once they have.
pub async fn serve<S: Store + Clone>(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    control: Control<S>,
    config: EndpointConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let acceptor = TlsAcceptor::from(tls);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(config.max_pending_handshakes.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    control.metrics().connections.inc();
                    let connection = connection::Connection {
                        control: control.clone(),
                        acceptor: acceptor.clone(),
                        peer,
                        config,
                        handshakes: Arc::clone(&handshakes),
                        shutdown: shutdown.clone(),
                    };
                    tasks.spawn(connection.run(stream));
                }
                Err(error) => {
                    // Out of descriptors or similar: back off instead of spinning.
                    tracing::warn!(%error, "accepting an agent connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            _ = shutdown.changed() => break,
        }
    }
    while tasks.join_next().await.is_some() {}
}

/// The address an endpoint is listening on, for logs.
pub fn describe(addr: SocketAddr) -> String {
    format!("wss://{addr}/ws/agent")
}

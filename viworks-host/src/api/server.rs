//! The API listener: accepts connections (TLS when configured) up to a cap, serves each on its
//! own task with HTTP/1.1, and shuts down gracefully: it stops accepting, lets requests in
//! flight finish for a bounded time, then closes what is left.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;

use super::{ApiState, pipeline};
use crate::store::Store;

/// Connections served at once; further ones wait in the kernel's accept backlog.
pub const MAX_CONNECTIONS: usize = 4096;

/// Event streams open at once; more are refused with 503 so that streams cannot take every
/// connection slot.
pub const MAX_STREAMS: usize = 1024;

/// A client must send a request's whole header within this time, and an idle keep-alive
/// connection is closed after it.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The TLS handshake must finish within this time.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long requests in flight may run on after shutdown begins.
const DRAIN: Duration = Duration::from_secs(10);

/// The request head (line and headers) must fit in this buffer; larger heads get 431.
const MAX_HEAD: usize = 64 * 1024;

/// What every connection of one listener shares.
pub(super) struct Shared<S> {
    pub state: Arc<ApiState<S>>,
    pub streams: Arc<Semaphore>,
}

/// Serves the API on `listener`, over TLS when `tls` is given, until `shutdown` turns true
/// (or its sender is dropped). Then it stops accepting, asks every connection to close after
/// its current request, waits up to 10 s for them, and returns.
///
/// At most 4,096 connections are served at once; request heads are limited to 64 KiB and
/// bodies to 1 MiB ([`super::MAX_BODY`]).
pub async fn serve<S: Store + Clone>(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    state: Arc<ApiState<S>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let acceptor = tls.map(TlsAcceptor::from);
    let shared = Arc::new(Shared { state, streams: Arc::new(Semaphore::new(MAX_STREAMS)) });
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&slots).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = stopped(&mut shutdown) => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Typically out of file descriptors: back off instead of spinning.
                    tracing::warn!(%error, "accepting an API connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stopped(&mut shutdown) => break,
        };
        let _ = stream.set_nodelay(true);
        let shared = Arc::clone(&shared);
        let acceptor = acceptor.clone();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let _permit = permit;
            match acceptor {
                None => connection(TokioIo::new(stream), peer, shared, shutdown).await,
                Some(acceptor) => match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => connection(TokioIo::new(tls), peer, shared, shutdown).await,
                    Ok(Err(error)) => tracing::debug!(%peer, %error, "API TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "API TLS handshake timed out"),
                },
            }
        });
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    let open = connections.len();
    let drain = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(DRAIN + Duration::from_secs(1), drain).await.is_err() {
        tracing::warn!(open, "API connections still open after the drain period; closing them");
        connections.abort_all();
    }
}

/// Resolves once shutdown was requested or can no longer be (the sender is gone).
pub(super) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Serves one connection until the client closes it or shutdown asks it to close.
async fn connection<S, I>(io: I, peer: SocketAddr, shared: Arc<Shared<S>>, mut shutdown: watch::Receiver<bool>)
where
    S: Store + Clone,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = service_fn(move |request| {
        let shared = Arc::clone(&shared);
        async move { Ok::<_, Infallible>(pipeline::handle(&shared, peer.ip(), request).await) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEAD)
        .serve_connection(io, service);
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(error) = result {
                tracing::debug!(%peer, %error, "API connection ended with an error");
            }
        }
        () = stopped(&mut shutdown) => {
            connection.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(DRAIN, connection).await;
        }
    }
}

//! The local liveness endpoint: `GET /health` on a loopback address answers `200` with the
//! agent's figures as JSON while the agent runs. Off unless `VIW_AGENT_HEALTH_ADDR` is set.
//!
//! It answers 200 whether or not the host is reachable: a monitor restarting the agent
//! because the host is down would only add to the reconnect storm. `connected` in the body
//! tells the two apart for alerting.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::agent::Status;

/// Connections served at once; more wait for a free slot.
const MAX_CONNECTIONS: usize = 16;

/// Binds the endpoint. Fails if the address is taken.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves `GET /health` on `listener` forever.
pub async fn serve(listener: TcpListener, status: Arc<Status>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = Arc::clone(&slots).acquire_owned().await else { return };
        let Ok((stream, _)) = listener.accept().await else { continue };
        let status = Arc::clone(&status);
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let status = Arc::clone(&status);
                async move { Ok::<_, Infallible>(answer(&request, &status)) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(Duration::from_secs(30), connection).await;
            drop(permit);
        });
    }
}

fn answer<B>(request: &Request<B>, status: &Status) -> Response<Full<Bytes>> {
    let (code, body) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/health") => {
            let report = status.report();
            let body = serde_json::json!({ "status": "ok", "agent": report });
            (StatusCode::OK, body.to_string())
        }
        (_, "/health") => (StatusCode::METHOD_NOT_ALLOWED, r#"{"error":"method_not_allowed"}"#.to_owned()),
        _ => (StatusCode::NOT_FOUND, r#"{"error":"not_found"}"#.to_owned()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = code;
    response
        .headers_mut()
        .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
    response
}

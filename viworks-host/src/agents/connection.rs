//! One agent connection, from TCP accept to the end of its session.

use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message as WsMessage, http};
use viworks_core::session::{HostEvent, HostSession, Refusal, Violation};
use viworks_core::wire::{AgentId, CloseCode, CommandResult, RejectCode, Telemetry};

use super::EndpointConfig;
use crate::control::{AttachError, Control, Stop};
use crate::metrics::Metrics;
use crate::store::{Store, TelemetryRow};
use crate::tls;

type Socket = WebSocketStream<TlsStream<TcpStream>>;

pub(super) struct Connection<S> {
    pub(super) control: Control<S>,
    pub(super) acceptor: TlsAcceptor,
    pub(super) peer: SocketAddr,
    pub(super) config: EndpointConfig,
    pub(super) handshakes: Arc<Semaphore>,
    pub(super) shutdown: watch::Receiver<bool>,
}

/// The WebSocket settings for agent connections: buffers sized for tens of thousands of
/// idle connections, and the protocol's message limit enforced before a frame is buffered.
fn websocket_config(max_message: usize) -> WebSocketConfig {
    let mut config = WebSocketConfig::default();
    config.read_buffer_size = 4 * 1024;
    config.write_buffer_size = 0;
    config.max_write_buffer_size = 4 * max_message;
    config.max_message_size = Some(max_message);
    config.max_frame_size = Some(max_message);
    config
}

impl<S: Store + Clone> Connection<S> {
    pub(super) async fn run(self, stream: TcpStream) {
        let Ok(permit) = Arc::clone(&self.handshakes).acquire_owned().await else { return };
        let admitted = tokio::time::timeout(self.config.handshake_timeout, self.admit(stream)).await;
        drop(permit);
        let (socket, session) = match admitted {
            Ok(Some(admitted)) => admitted,
            Ok(None) => return,
            Err(_) => {
                tracing::debug!(peer = %self.peer, "agent handshake timed out");
                return;
            }
        };
        self.drive(socket, session).await;
    }

    /// TLS with a client certificate, the WebSocket upgrade on `/ws/agent`, and the HELLO.
    async fn admit(&self, stream: TcpStream) -> Option<(Socket, HostSession)> {
        // A connection closed before its first byte is a TCP probe (a load balancer's health
        // check, a port scan), not a failed handshake: counted, but neither warned about nor
        // audited, so that probes every few seconds do not bury real refusals.
        if let Ok(0) = stream.peek(&mut [0u8; 1]).await {
            tracing::debug!(peer = %self.peer, "connection closed before any byte (a TCP probe)");
            Metrics::count(&self.control.metrics().refused, "probe");
            return None;
        }
        let tls = match self.acceptor.accept(stream).await {
            Ok(tls) => tls,
            Err(error) => {
                tracing::warn!(peer = %self.peer, %error, "agent TLS handshake refused");
                Metrics::count(&self.control.metrics().refused, "tls");
                self.control
                    .audit_security(
                        &self.peer.to_string(),
                        "security.tls_refused",
                        vec![],
                        "tls",
                        serde_json::json!({ "error": error.to_string() }),
                    )
                    .await;
                return None;
            }
        };
        let (_, connection) = tls.get_ref();
        let identity = match tls::agent_identity(connection) {
            Ok(identity) => identity,
            Err(error) => {
                tracing::warn!(peer = %self.peer, %error, "agent certificate names no valid agent id");
                return None;
            }
        };
        let binding = match tls::channel_binding_server(connection) {
            Ok(binding) => binding,
            Err(error) => {
                tracing::warn!(peer = %self.peer, %error, "no channel binding on the agent connection");
                return None;
            }
        };
        let limits = self.control.config().host.limits;
        // The callback's signature is tungstenite's; its error type is what it is.
        #[allow(clippy::result_large_err)]
        let path_check = |request: &Request, response: Response| -> Result<Response, ErrorResponse> {
            if request.uri().path() == "/ws/agent" {
                Ok(response)
            } else {
                let mut refusal = ErrorResponse::new(Some("not found".into()));
                *refusal.status_mut() = http::StatusCode::NOT_FOUND;
                Err(refusal)
            }
        };
        let config = websocket_config(limits.max_message_len);
        let mut socket = match tokio_tungstenite::accept_hdr_async_with_config(tls, path_check, Some(config)).await {
            Ok(socket) => socket,
            Err(error) => {
                tracing::debug!(peer = %self.peer, %error, "WebSocket upgrade failed");
                return None;
            }
        };
        let hello = loop {
            match socket.next().await {
                Some(Ok(WsMessage::Binary(bytes))) => break bytes,
                Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => continue,
                _ => return None,
            }
        };
        // An agent enrolled since this host started (by `viworks-host agent enroll`, another
        // process) is not in the key table yet. Its certificate is our CA's word that it was
        // enrolled, so one store read is justified: look it up rather than refuse it.
        if !self.control.keys().knows(&identity) {
            match self.control.store().agent(&identity).await {
                Ok(Some(record)) => self.control.keys().set(identity.clone(), record.revoked),
                Ok(None) => {}
                Err(error) => tracing::warn!(agent = %identity, %error, "looking up an unknown agent failed"),
            }
        }
        match self.control.accept(&hello, &identity, &binding) {
            Ok(session) => Some((socket, session)),
            Err(refusal) => {
                self.refused(&identity, &refusal).await;
                let _ = socket.send(WsMessage::Binary(refusal.reply.into())).await;
                let _ = socket.close(None).await;
                None
            }
        }
    }

    async fn refused(&self, identity: &AgentId, refusal: &Refusal) {
        let code = serde_json::to_value(refusal.code).ok().and_then(|v| v.as_str().map(str::to_owned));
        let code = code.unwrap_or_else(|| "unknown".to_owned());
        Metrics::count(&self.control.metrics().refused, &code);
        if matches!(refusal.code, RejectCode::Replay) {
            self.control.metrics().replays_rejected.inc();
        }
        tracing::warn!(peer = %self.peer, agent = %identity, code, "agent HELLO refused");
        let claimed = refusal.claimed_agent.as_ref().map(ToString::to_string);
        self.control.audit_security(
            identity.as_str(),
            &format!("security.hello_refused.{code}"),
            vec![identity.to_string()],
            &code,
            serde_json::json!({ "peer": self.peer.to_string(), "claimed": claimed, "authenticated": refusal.authenticated }),
        ).await;
    }

    /// Refuses a session that could not be attached: a REJECT instead of its WELCOME.
    async fn not_attached(&self, socket: &mut Socket, session: HostSession, error: AttachError) {
        let control = &self.control;
        let agent = session.agent_id().clone();
        let (code, retry_after) = match &error {
            AttachError::ElsewhereLive { retry_after, .. } => (RejectCode::DuplicateAgent, *retry_after),
            _ => (RejectCode::Overloaded, std::time::Duration::from_secs(5)),
        };
        let refusal = session.refuse(control.now(), code, Some(retry_after));
        tracing::warn!(%agent, peer = %self.peer, %error, "agent session not attached");
        if let AttachError::ElsewhereLive { instance, .. } = &error {
            Metrics::count(&control.metrics().refused, "duplicate_agent");
            control
                .audit_security(
                    agent.as_str(),
                    "security.hello_refused.duplicate_agent",
                    vec![agent.to_string()],
                    "duplicate_agent",
                    serde_json::json!({ "peer": self.peer.to_string(), "held_by": instance, "authenticated": true }),
                )
                .await;
        }
        if let Err(error) = control.store().agent_disconnected(&agent, control.now()).await {
            tracing::debug!(%agent, %error, "recording the refused session's end failed");
        }
        let _ = socket.send(WsMessage::Binary(refusal.reply.into())).await;
        let _ = socket.close(None).await;
    }

    /// Runs an admitted session until it ends.
    async fn drive(self, mut socket: Socket, mut session: HostSession) {
        let control = self.control.clone();
        let agent = session.agent_id().clone();
        let now = control.now();
        if let Err(error) = control.store().agent_connected(session.hello(), now).await {
            tracing::error!(%agent, %error, "recording the agent's connection failed");
        }
        let attachment = match control.attach(&mut session).await {
            Ok(attachment) => attachment,
            Err(error) => {
                self.not_attached(&mut socket, session, error).await;
                return;
            }
        };
        tracing::info!(%agent, peer = %self.peer, session = session.id(), "agent session established");
        control
            .audit_event(
                agent.as_str(),
                "session.established",
                vec![agent.to_string()],
                "ok",
                serde_json::json!({ "peer": self.peer.to_string(), "session": session.id() }),
            )
            .await;
        let mut shutdown = self.shutdown.clone();
        loop {
            match attachment.stop() {
                Stop::Revoked => session.close(control.now(), CloseCode::Revoked, "agent revoked"),
                Stop::Superseded => {
                    session.close(control.now(), CloseCode::LivenessTimeout, "superseded by a newer session")
                }
                Stop::No => {}
            }
            if *shutdown.borrow() {
                session.close(control.now(), CloseCode::GoingAway, "host shutting down");
            }
            self.process(&mut session).await;
            let mut failed = false;
            while let Some(bytes) = session.poll_transmit() {
                if socket.feed(WsMessage::Binary(bytes.into())).await.is_err() {
                    failed = true;
                    break;
                }
            }
            if failed || socket.flush().await.is_err() {
                session.connection_lost();
                self.process(&mut session).await;
            }
            if session.is_closed() {
                let _ = socket.close(None).await;
                break;
            }
            let deadline = session.poll_timeout().map(|at| control.clock().instant_of(at));
            let timer = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                message = socket.next() => match message {
                    Some(Ok(WsMessage::Binary(bytes))) => session.handle_message(control.now(), &bytes),
                    Some(Ok(WsMessage::Text(text))) => session.handle_message(control.now(), text.as_bytes()),
                    Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_))) => {}
                    Some(Err(tokio_tungstenite::tungstenite::Error::Capacity(error))) => {
                        // Refused by the WebSocket layer before it was buffered whole.
                        self.violation(&agent, Violation::Undecodable("too_large")).await;
                        tracing::warn!(%agent, %error, "agent sent an oversized message; closing");
                        session.connection_lost();
                    }
                    Some(Ok(WsMessage::Close(_))) | Some(Err(_)) | None => session.connection_lost(),
                },
                _ = timer => session.handle_timeout(control.now()),
                _ = attachment.wake.notified() => {}
                _ = shutdown.changed() => {}
            }
        }
        let end = session.end();
        tracing::info!(%agent, session = session.id(), ?end, "agent session ended");
        if let Err(error) = control.store().agent_disconnected(&agent, control.now()).await {
            tracing::error!(%agent, %error, "recording the agent's disconnection failed");
        }
    }

    /// Handles what the session reported, stores results and telemetry before acknowledging
    /// them, and sends the agent whatever it now has credit for.
    async fn process(&self, session: &mut HostSession) {
        let control = &self.control;
        let agent = session.agent_id().clone();
        let mut results: Vec<CommandResult> = Vec::new();
        let mut telemetry: Vec<Telemetry> = Vec::new();
        let mut closed = None;
        while let Some(event) = session.poll_event() {
            match event {
                HostEvent::Acked(id) => control.acked(&id),
                HostEvent::Result(result) => results.push(result),
                HostEvent::Telemetry(batch) => telemetry.push(batch),
                HostEvent::Violation(violation) => self.violation(&agent, violation).await,
                HostEvent::Closed { end, in_flight } => closed = Some((end, in_flight)),
                _ => {}
            }
        }
        if !results.is_empty() {
            match control.results(&agent, results).await {
                Ok(stored) => {
                    let _ = session.ack_results(control.now(), &stored);
                }
                Err(error) => tracing::error!(%agent, %error, "storing results failed; the agent will resend them"),
            }
        }
        for batch in telemetry {
            let rows: Vec<TelemetryRow> = batch
                .samples
                .into_iter()
                .map(|s| TelemetryRow { agent_id: agent.clone(), ts: s.ts, metric_key: s.key, value: s.value })
                .collect();
            match control.store().save_telemetry(&rows).await {
                Ok(count) => {
                    control.metrics().telemetry_samples.inc_by(count as u64);
                    let _ = session.ack_telemetry(control.now(), batch.batch_id);
                }
                Err(error) => tracing::error!(%agent, %error, "storing telemetry failed; the agent will resend it"),
            }
            if batch.dropped > 0 {
                tracing::warn!(%agent, dropped = batch.dropped, "agent dropped telemetry while disconnected");
            }
        }
        if let Some((end, in_flight)) = closed {
            control.detach(&agent, session.id(), &in_flight).await;
            control
                .audit_event(
                    agent.as_str(),
                    "session.closed",
                    vec![agent.to_string()],
                    &format!("{:?}", end.code).to_lowercase(),
                    serde_json::json!({ "by_peer": end.by_peer, "in_flight": in_flight.len() }),
                )
                .await;
            return;
        }
        if !session.is_closed() {
            let commands = control.next_commands(&agent, session.id(), session.credits());
            for command in commands {
                let id = command.command_id.clone();
                if let Err(error) = session.send_command(control.now(), command) {
                    tracing::error!(%agent, %error, "sending a command within credit failed; re-queued");
                    control.unsent(session.id(), &id);
                }
            }
        }
    }

    async fn violation(&self, agent: &AgentId, violation: Violation) {
        let metrics = self.control.metrics();
        Metrics::count(&metrics.violations, violation.code());
        if matches!(violation, Violation::OutOfSequence { .. }) {
            metrics.replays_rejected.inc();
        }
        tracing::warn!(%agent, peer = %self.peer, violation = violation.code(), "agent message refused");
        self.control
            .audit_security(
                agent.as_str(),
                &format!("security.{}", violation.code()),
                vec![agent.to_string()],
                violation.code(),
                serde_json::json!({ "peer": self.peer.to_string(), "detail": format!("{violation:?}") }),
            )
            .await;
    }
}

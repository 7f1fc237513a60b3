//! The load generator's synthetic agent: the real protocol, driven through
//! [`AgentSession`] and an [`ExecutionGuard`] over an in-memory ledger, on a real TLS
//! WebSocket, with an executor that answers every command at once with a succeeded result.
//!
//! One task per agent. It acknowledges and answers commands as they come, sends telemetry
//! batches while the run's [`Orders`] ask it to (one batch in flight), keeps its heartbeats
//! going, and closes with `going_away` when told to stop. What it sees goes to the shared
//! [`Probe`].

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use thiserror::Error;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use viworks_core::session::{AgentConfig, AgentEvent, AgentSession, ExecutionGuard, MemoryLedger, SessionError};
use viworks_core::wire::{
    Capability, CloseCode, CommandId, CommandResult, MetricKey, RejectCode, ResultStatus, Sample, Telemetry, Text,
};
use viworks_core::{Entropy, Timestamp};
use viworks_gateway::clock::Clock;

use super::dial::{self, DialError, Socket};
use super::fleet::{Identity, SITE};
use super::probe::Probe;

/// Ledger entries each agent keeps; acknowledged ones are pruned beyond it.
pub const LEDGER_CAPACITY: usize = 256;

/// The verb the synthetic agent advertises (and the load generator submits).
pub const VERB: &str = "get_system_health";

/// How long dialling, the HELLO and the WELCOME may take together.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long one write to the host may take before the connection is given up.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// What the run asks of every agent; changed through a `watch` channel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Orders {
    /// Send telemetry while this is set.
    pub telemetry: Option<TelemetryOrder>,
    /// Close the session and end.
    pub stop: bool,
}

/// Which agents send telemetry, and how much per batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TelemetryOrder {
    /// Agents with an index below this send.
    pub agents: usize,
    /// Samples per batch.
    pub samples: usize,
}

/// What every agent shares: where to connect, the clock, the probe and the orders.
#[derive(Clone, Debug)]
pub struct Context {
    /// The agent endpoint's address.
    pub target: SocketAddr,
    /// The URL of the upgrade request.
    pub url: String,
    /// The wall clock handed to the sessions.
    pub clock: Clock,
    /// Where observations go.
    pub probe: Arc<Probe>,
    /// The run's orders.
    pub orders: watch::Receiver<Orders>,
    /// The concurrency each agent advertises.
    pub concurrency: u32,
    /// Metric keys for telemetry batches, as many as the largest batch.
    pub metric_keys: Arc<[MetricKey]>,
}

/// Why an agent did not get an established session.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The connection could not be made.
    #[error(transparent)]
    Dial(#[from] DialError),
    /// The HELLO could not be built.
    #[error("building the HELLO: {0}")]
    Hello(#[source] SessionError),
    /// The host refused the HELLO.
    #[error("the host refused the HELLO: {code:?} {message}")]
    Rejected {
        /// The refusal's code.
        code: RejectCode,
        /// Its text.
        message: String,
    },
    /// The connection ended before the WELCOME.
    #[error("the connection ended before the WELCOME ({0})")]
    Closed(String),
    /// No WELCOME within [`HANDSHAKE_TIMEOUT`].
    #[error("no WELCOME within {0:?}")]
    Timeout(Duration),
}

impl ConnectError {
    /// Whether trying again may succeed (the host was busy, not refusing this agent).
    pub fn is_transient(&self) -> bool {
        match self {
            ConnectError::Rejected { code, .. } => matches!(code, RejectCode::Overloaded),
            ConnectError::Hello(_) => false,
            _ => true,
        }
    }
}

/// An agent with an established session.
pub struct SyntheticAgent {
    index: usize,
    socket: Socket,
    session: AgentSession,
    guard: ExecutionGuard<MemoryLedger>,
    context: Context,
    telemetry_in_flight: Option<(u64, usize)>,
    next_batch: u64,
    last_sample_ts: Timestamp,
}

impl std::fmt::Debug for SyntheticAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyntheticAgent").field("index", &self.index).finish_non_exhaustive()
    }
}

impl SyntheticAgent {
    /// Dials from `source`, sends the HELLO bound to the connection, and waits for the
    /// WELCOME, all within [`HANDSHAKE_TIMEOUT`].
    pub async fn connect(
        index: usize,
        identity: &Identity,
        source: IpAddr,
        context: &Context,
        entropy: &mut Entropy,
    ) -> Result<SyntheticAgent, ConnectError> {
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, Self::handshake(index, identity, source, context, entropy)).await
        {
            Ok(result) => result,
            Err(_) => Err(ConnectError::Timeout(HANDSHAKE_TIMEOUT)),
        }
    }

    async fn handshake(
        index: usize,
        identity: &Identity,
        source: IpAddr,
        context: &Context,
        entropy: &mut Entropy,
    ) -> Result<SyntheticAgent, ConnectError> {
        let (mut socket, binding) = dial::dial(source, context.target, Arc::clone(&identity.tls), &context.url).await?;
        let capabilities = Capability::new(VERB).map(|c| vec![c]).unwrap_or_default();
        let config = AgentConfig {
            site: Text::lossy(SITE),
            hostname: Text::lossy(&format!("loadgen-{index}")),
            capabilities,
            max_concurrency: context.concurrency,
            ..AgentConfig::new(identity.agent_id.clone(), identity.agent_key.clone())
        };
        let mut session =
            AgentSession::new(&config, context.clock.now(), entropy, &binding).map_err(ConnectError::Hello)?;
        while let Some(bytes) = session.poll_transmit() {
            socket.send(WsMessage::Binary(bytes.into())).await.map_err(|e| ConnectError::Closed(e.to_string()))?;
        }
        loop {
            while let Some(event) = session.poll_event() {
                match event {
                    AgentEvent::Established { .. } => {
                        let now = context.clock.now();
                        let mut guard =
                            ExecutionGuard::recover(MemoryLedger::new(LEDGER_CAPACITY), now, config.max_concurrency)
                                .map_err(|e| ConnectError::Closed(e.to_string()))?;
                        // A fresh ledger has no outbox; this only starts the guard's session.
                        let _ = guard.on_established(now, &mut session);
                        context.probe.established.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        return Ok(SyntheticAgent {
                            index,
                            socket,
                            session,
                            guard,
                            context: context.clone(),
                            telemetry_in_flight: None,
                            next_batch: 1,
                            last_sample_ts: Timestamp::ZERO,
                        });
                    }
                    AgentEvent::Rejected { code, message, .. } => return Err(ConnectError::Rejected { code, message }),
                    AgentEvent::Closed(end) => return Err(ConnectError::Closed(format!("{:?}", end.code))),
                    _ => {}
                }
            }
            match socket.next().await {
                Some(Ok(WsMessage::Binary(bytes))) => session.handle_message(context.clock.now(), &bytes),
                Some(Ok(WsMessage::Close(_))) | None => return Err(ConnectError::Closed("closed by the host".into())),
                Some(Ok(_)) => {}
                Some(Err(error)) => return Err(ConnectError::Closed(error.to_string())),
            }
        }
    }

    /// Runs the session until the orders say stop or the connection ends.
    pub async fn run(mut self) {
        let mut orders = self.context.orders.clone();
        loop {
            self.handle_events();
            self.send_telemetry(*orders.borrow());
            if !self.flush().await {
                self.session.connection_lost();
                self.handle_events();
            }
            if self.session.is_closed() {
                let _ = tokio::time::timeout(Duration::from_secs(2), self.socket.close(None)).await;
                break;
            }
            let clock = self.context.clock;
            let timer = self.session.poll_timeout().map(|at| clock.instant_of(at));
            let sleep = async {
                match timer {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                changed = orders.changed() => {
                    let stop = changed.is_err() || orders.borrow_and_update().stop;
                    if stop {
                        self.session.close(clock.now(), CloseCode::GoingAway, "the load generator is done");
                    }
                }
                frame = self.socket.next() => match frame {
                    Some(Ok(WsMessage::Binary(bytes))) => self.session.handle_message(clock.now(), &bytes),
                    Some(Ok(WsMessage::Close(_))) | None => self.session.connection_lost(),
                    Some(Ok(_)) => {}
                    Some(Err(error)) => {
                        tracing::debug!(agent = self.index, %error, "connection to the host failed");
                        self.session.connection_lost();
                    }
                },
                () = sleep => self.session.handle_timeout(clock.now()),
            }
        }
        self.context.probe.closed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Handles every event the session raised.
    fn handle_events(&mut self) {
        while let Some(event) = self.session.poll_event() {
            let now = self.context.clock.now();
            match event {
                AgentEvent::Command(command) => {
                    self.context.probe.arrived(&command.command_id, Instant::now());
                    match self.guard.on_command(now, &mut self.session, command) {
                        Ok(Some(command)) => {
                            // The synthetic executor: done as soon as it starts.
                            let result = succeeded(command.command_id);
                            if let Err(error) = self.guard.on_finished(now, Some(&mut self.session), result) {
                                tracing::warn!(agent = self.index, %error, "the ledger refused a result");
                            }
                        }
                        Ok(None) => {}
                        Err(error) => tracing::warn!(agent = self.index, %error, "the ledger refused a command"),
                    }
                }
                AgentEvent::ResultsAcked(ids) => {
                    self.context.probe.stored(&ids, Instant::now());
                    if let Err(error) = self.guard.on_results_acked(&ids) {
                        tracing::warn!(agent = self.index, %error, "the ledger refused an acknowledgement");
                    }
                }
                AgentEvent::TelemetryAcked(batch_id) => {
                    if let Some((in_flight, samples)) = self.telemetry_in_flight
                        && in_flight == batch_id
                    {
                        self.context.probe.telemetry_acked(samples);
                        self.telemetry_in_flight = None;
                    }
                }
                AgentEvent::Violation(violation) => {
                    self.context.probe.violations.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(agent = self.index, violation = violation.code(), "refused a message from the host");
                }
                AgentEvent::Closed(end) => {
                    tracing::debug!(agent = self.index, code = ?end.code, by_host = end.by_peer, "session ended");
                }
                _ => {}
            }
        }
    }

    /// Queues the next telemetry batch when this agent is asked to send and has none in
    /// flight. Every batch has its own timestamp, so every sample is a new row.
    fn send_telemetry(&mut self, orders: Orders) {
        let Some(order) = orders.telemetry else { return };
        if self.index >= order.agents || self.telemetry_in_flight.is_some() || self.session.room() == 0 {
            return;
        }
        let now = self.context.clock.now();
        let ts = now.max(self.last_sample_ts.saturating_add(Duration::from_millis(1)));
        self.last_sample_ts = ts;
        let count = order.samples.min(self.context.metric_keys.len());
        let samples = self.context.metric_keys[..count]
            .iter()
            .enumerate()
            .map(|(n, key)| Sample { ts, key: key.clone(), value: n as f64 * 0.5 })
            .collect();
        let batch_id = self.next_batch;
        match self.session.send_telemetry(now, Telemetry { batch_id, samples, dropped: 0 }) {
            Ok(()) => {
                self.next_batch += 1;
                self.telemetry_in_flight = Some((batch_id, count));
            }
            Err(error) => tracing::warn!(agent = self.index, %error, "cannot send telemetry"),
        }
    }

    /// Writes everything the session queued. Returns false when the connection failed.
    async fn flush(&mut self) -> bool {
        let mut wrote = false;
        while let Some(bytes) = self.session.poll_transmit() {
            wrote = true;
            let fed = tokio::time::timeout(SEND_TIMEOUT, self.socket.feed(WsMessage::Binary(bytes.into()))).await;
            if !matches!(fed, Ok(Ok(()))) {
                return false;
            }
        }
        if wrote {
            let flushed = tokio::time::timeout(SEND_TIMEOUT, self.socket.flush()).await;
            return matches!(flushed, Ok(Ok(())));
        }
        true
    }
}

/// The synthetic executor's answer: succeeded, with an output shaped like a small
/// `get_system_health` report.
pub fn succeeded(command_id: CommandId) -> CommandResult {
    CommandResult {
        command_id,
        status: ResultStatus::Succeeded,
        exit_code: Some(0),
        output: serde_json::json!({
            "cpu_percent": 12.5,
            "load": [0.42, 0.38, 0.31],
            "memory_used_bytes": 3_221_225_472_u64,
            "memory_total_bytes": 8_589_934_592_u64,
            "uptime_secs": 86_400,
        }),
        error: None,
        duration_ms: 0,
    }
}

/// `count` distinct metric keys for telemetry batches.
pub fn metric_keys(count: usize) -> Arc<[MetricKey]> {
    (0..count).filter_map(|n| MetricKey::new(format!("loadgen.metric_{n:05}")).ok()).collect()
}

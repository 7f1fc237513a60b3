//! The agent's main loop: one task that owns the session, the execution guard and the
//! telemetry buffer, and reacts to whatever happens next: a message from the host, a session
//! timer, a command finishing, a telemetry tick, the time to reconnect, or shutdown.
//!
//! Commands run in their own tasks and outlive the connection they arrived on: a result that
//! finishes while the host is away waits in the ledger's outbox and leaves on the next
//! session. Nothing here blocks on the executor.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use thiserror::Error;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use viworks_core::Entropy;
use viworks_core::auth::PinMatch;
use viworks_core::flow::{BackoffPolicy, ReconnectBackoff};
use viworks_core::session::{AgentConfig, AgentEvent, AgentSession, ExecutionGuard};
use viworks_core::wire::{CloseCode, CommandResult, Sample, Text};

use crate::clock::Clock;
use crate::config::{Config, ContainerEngine};
use crate::connection::{Connected, Connector, SetupError, Socket};
use crate::executor::{Executor, ExecutorConfig, SystemProbe};
use crate::ledger::{LedgerError, Retention, SqliteLedger};
use crate::telemetry::{self, TelemetryBuffer};

/// The Docker engine's socket when the engine is `docker`.
pub const DOCKER_SOCKET: &str = "/var/run/docker.sock";

/// Telemetry samples held while the host is away; the oldest go first beyond this.
pub const TELEMETRY_BUFFER: usize = 50_000;

/// Samples per telemetry batch.
pub const TELEMETRY_BATCH: usize = 2_000;

/// A session must last this long for the reconnect schedule to start over.
pub const HEALTHY_SESSION: Duration = Duration::from_secs(60);

/// How long shutdown waits for running commands to finish before leaving them to be
/// reported `interrupted` at the next start.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// How long one write to the host may take before the connection is given up.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// Bytes of output kept per stream of a process or log.
const OUTPUT_CAP: usize = 64 * 1024;

/// How often the ledger is pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Why the agent could not start.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The TLS material does not make a client configuration.
    #[error(transparent)]
    Setup(#[from] SetupError),
    /// The liveness endpoint cannot listen.
    #[error("cannot listen for the liveness endpoint on {addr}: {source}")]
    Health {
        /// The configured address.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The operating system's random number generator failed.
    #[error("the operating system's random number generator failed: {0}")]
    Random(String),
    /// The state directory or the ledger in it cannot be used.
    #[error("the execution ledger in {}: {source}", path.display())]
    Ledger {
        /// The ledger's path.
        path: PathBuf,
        /// Why.
        #[source]
        source: LedgerError,
    },
}

/// What the agent is doing, for the liveness endpoint and for tests. Updated by the main loop.
#[derive(Debug, Default)]
pub struct Status {
    connected: AtomicBool,
    sessions: AtomicU64,
    running: AtomicU64,
    executed: AtomicU64,
    telemetry_buffered: AtomicU64,
    telemetry_dropped: AtomicU64,
    backup_pin: AtomicBool,
}

/// A copy of [`Status`] at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct StatusReport {
    /// Whether a session with the host is established.
    pub connected: bool,
    /// Sessions established since start.
    pub sessions: u64,
    /// Commands running now.
    pub running: u64,
    /// Commands run to a result since start.
    pub executed: u64,
    /// Telemetry samples waiting to be sent.
    pub telemetry_buffered: u64,
    /// Telemetry samples dropped since start because the buffer was full.
    pub telemetry_dropped: u64,
    /// Whether the host's key matched the backup pin at the last connection.
    pub backup_pin: bool,
}

impl Status {
    /// The current figures.
    pub fn report(&self) -> StatusReport {
        StatusReport {
            connected: self.connected.load(Ordering::Relaxed),
            sessions: self.sessions.load(Ordering::Relaxed),
            running: self.running.load(Ordering::Relaxed),
            executed: self.executed.load(Ordering::Relaxed),
            telemetry_buffered: self.telemetry_buffered.load(Ordering::Relaxed),
            telemetry_dropped: self.telemetry_dropped.load(Ordering::Relaxed),
            backup_pin: self.backup_pin.load(Ordering::Relaxed),
        }
    }
}

/// A connection and the protocol session on it.
struct Live {
    socket: Socket,
    session: AgentSession,
}

/// The agent: everything the main loop owns.
pub struct Agent {
    config: Config,
    connector: Connector,
    executor: Executor,
    guard: ExecutionGuard<SqliteLedger>,
    telemetry: TelemetryBuffer,
    backoff: ReconnectBackoff,
    entropy: Entropy,
    clock: Clock,
    status: Arc<Status>,
    /// What the host asked for in its last REJECT.
    retry_after: Option<Duration>,
    /// Results the ledger could not record yet (a full or failing disk); retried.
    unrecorded: Vec<CommandResult>,
    hostname: Text<255>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent").field("agent_id", &self.config.agent_id).finish_non_exhaustive()
    }
}

impl Agent {
    /// Opens the ledger (reporting commands a crash interrupted) and prepares the connection.
    pub fn new(config: Config) -> Result<Agent, AgentError> {
        let clock = Clock::start();
        let connector = Connector::new(&config)?;
        let path = config.state_dir.join("ledger.db");
        let ledger_error = |source| AgentError::Ledger { path: path.clone(), source };
        let ledger = SqliteLedger::open(&path, Retention::default()).map_err(ledger_error)?;
        let guard = ExecutionGuard::recover(ledger, clock.now(), config.max_concurrency).map_err(ledger_error)?;
        let executor = Executor::new(ExecutorConfig {
            scripts_root: config.scripts_root.clone(),
            exec_allow: config.exec_allow.clone(),
            max_timeout: config.cmd_timeout,
            output_cap: OUTPUT_CAP,
            docker_socket: match config.container_engine {
                ContainerEngine::Docker => Some(PathBuf::from(DOCKER_SOCKET)),
                ContainerEngine::None => None,
            },
        });
        let mut seed = [0u8; 32];
        // Without the system's randomness the HELLO nonces would repeat; refuse to run.
        getrandom::fill(&mut seed).map_err(|e| AgentError::Random(e.to_string()))?;
        let hostname = nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default();
        Ok(Agent {
            telemetry: TelemetryBuffer::new(TELEMETRY_BUFFER, clock.now().as_millis()),
            backoff: ReconnectBackoff::new(BackoffPolicy::RECONNECT, HEALTHY_SESSION),
            entropy: Entropy::from_seed(seed),
            hostname: Text::lossy(&hostname),
            config,
            connector,
            executor,
            guard,
            clock,
            status: Arc::new(Status::default()),
            retry_after: None,
            unrecorded: Vec::new(),
        })
    }

    /// The figures the liveness endpoint serves.
    pub fn status(&self) -> Arc<Status> {
        Arc::clone(&self.status)
    }

    /// Runs until `shutdown` completes: connects, reconnects with backoff, runs commands and
    /// sends telemetry. On shutdown the session is closed with `going_away` and running
    /// commands get [`SHUTDOWN_GRACE`] to finish.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        let max_concurrency = self.config.max_concurrency.max(1) as usize;
        let (done_tx, mut done_rx) = mpsc::channel::<CommandResult>(max_concurrency);
        let (samples_tx, mut samples_rx) = mpsc::channel::<Vec<Sample>>(2);
        let probe = Arc::new(std::sync::Mutex::new(SystemProbe::new()));
        let mut telemetry_tick = tokio::time::interval(self.config.telemetry_interval);
        telemetry_tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
        let mut upkeep = tokio::time::interval(PRUNE_EVERY);
        upkeep.set_missed_tick_behavior(MissedTickBehavior::Skip);
        let mut live: Option<Live> = None;
        let mut reconnect_at = Instant::now();
        tracing::info!(
            agent_id = %self.config.agent_id,
            backend = %self.connector.url(),
            max_concurrency,
            "agent starting"
        );
        tokio::pin!(shutdown);

        loop {
            let session_timer = live
                .as_ref()
                .and_then(|l| l.session.poll_timeout())
                .map(|at| self.clock.instant_of(at))
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                Some(result) = done_rx.recv() => {
                    self.status.running.fetch_sub(1, Ordering::Relaxed);
                    self.status.executed.fetch_add(1, Ordering::Relaxed);
                    self.finished(live.as_mut(), result);
                }
                frame = next_frame(&mut live) => self.on_frame(&mut live, frame),
                () = tokio::time::sleep_until(session_timer), if live.is_some() => {
                    if let Some(l) = live.as_mut() {
                        l.session.handle_timeout(self.clock.now());
                    }
                }
                Some(samples) = samples_rx.recv() => self.telemetry.push(samples),
                _ = telemetry_tick.tick() => self.sample(&probe, &samples_tx),
                _ = upkeep.tick() => self.upkeep(live.as_mut()),
                () = tokio::time::sleep_until(reconnect_at), if live.is_none() => {
                    match self.connect().await {
                        Ok(connected) => live = Some(connected),
                        Err(retry_at) => reconnect_at = retry_at,
                    }
                }
            }
            if let Some(mut l) = live.take() {
                if self.pump(&mut l, &done_tx).await {
                    live = Some(l);
                } else {
                    reconnect_at = self.disconnected(l).await;
                }
            }
            self.publish();
        }

        self.shut_down(live, &mut done_rx).await;
    }

    /// One connection attempt and the HELLO on it; on failure, when to try again.
    async fn connect(&mut self) -> Result<Live, Instant> {
        let Connected { socket, binding, pin } = match self.connector.connect().await {
            Ok(connected) => connected,
            Err(error) => {
                let delay = self.next_delay();
                tracing::warn!(error = %error, retry_in_ms = delay.as_millis() as u64, "cannot connect to the host");
                return Err(Instant::now() + delay);
            }
        };
        self.status.backup_pin.store(pin == Some(PinMatch::Backup), Ordering::Relaxed);
        let config = AgentConfig {
            site: Text::lossy(&self.config.site),
            hostname: self.hostname.clone(),
            capabilities: self.executor.capabilities().await,
            max_concurrency: self.config.max_concurrency,
            ..AgentConfig::new(self.config.agent_id.clone(), self.config.agent_key.clone())
        };
        match AgentSession::new(&config, self.clock.now(), &mut self.entropy, &binding) {
            Ok(session) => Ok(Live { socket, session }),
            Err(error) => {
                tracing::error!(error = %error, "cannot build the HELLO");
                Err(Instant::now() + self.next_delay())
            }
        }
    }

    /// Handles what the socket produced.
    fn on_frame(&mut self, live: &mut Option<Live>, frame: Option<Result<WsMessage, WsError>>) {
        let Some(l) = live.as_mut() else { return };
        match frame {
            Some(Ok(WsMessage::Binary(bytes))) => l.session.handle_message(self.clock.now(), &bytes),
            Some(Ok(WsMessage::Close(_))) | None => l.session.connection_lost(),
            Some(Ok(_)) => {}
            Some(Err(error)) => {
                tracing::warn!(error = %error, "connection to the host failed");
                l.session.connection_lost();
            }
        }
    }

    /// Handles the session's events, then sends what it queued. Returns whether the session
    /// is still open.
    async fn pump(&mut self, live: &mut Live, done_tx: &mpsc::Sender<CommandResult>) -> bool {
        while let Some(event) = live.session.poll_event() {
            self.on_event(&mut live.session, event, done_tx);
        }
        let now = self.clock.now();
        if live.session.is_established() {
            self.retry_unrecorded(Some(&mut live.session));
            if let Err(error) = self.guard.flush_outbox(now, &mut live.session) {
                tracing::error!(error = %error, "cannot read the outbox");
            }
            if live.session.room() > 0
                && let Some(batch) = self.telemetry.next_batch(TELEMETRY_BATCH)
            {
                let id = batch.batch_id;
                if let Err(error) = live.session.send_telemetry(now, batch) {
                    tracing::warn!(error = %error, batch_id = id, "cannot send telemetry; it will be sent again");
                    self.telemetry.on_disconnected();
                }
            }
        }
        while let Some(bytes) = live.session.poll_transmit() {
            let sent = tokio::time::timeout(SEND_TIMEOUT, live.socket.send(WsMessage::Binary(bytes.into()))).await;
            if !matches!(sent, Ok(Ok(()))) {
                tracing::warn!("cannot write to the host; the connection is given up");
                live.session.connection_lost();
                break;
            }
        }
        // Events raised while sending (a lost connection) are handled at the next pass.
        while let Some(event) = live.session.poll_event() {
            self.on_event(&mut live.session, event, done_tx);
        }
        !live.session.is_closed()
    }

    fn on_event(&mut self, session: &mut AgentSession, event: AgentEvent, done_tx: &mpsc::Sender<CommandResult>) {
        let now = self.clock.now();
        match event {
            AgentEvent::Established { timers } => {
                self.backoff.on_session_established(now);
                self.retry_after = None;
                self.status.connected.store(true, Ordering::Relaxed);
                self.status.sessions.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    heartbeat_ms = timers.heartbeat_interval.as_millis() as u64,
                    backup_pin = self.status.backup_pin.load(Ordering::Relaxed),
                    "session established"
                );
                match self.guard.on_established(now, session) {
                    Ok(queued) if queued > 0 => tracing::info!(results = queued, "re-sending results from the outbox"),
                    Ok(_) => {}
                    Err(error) => tracing::error!(error = %error, "cannot read the outbox"),
                }
            }
            AgentEvent::Rejected { code, message, retry_after, authenticated } => {
                tracing::error!(
                    code = ?code,
                    reason = %message,
                    authenticated,
                    "the host refused this agent's HELLO"
                );
                self.retry_after = retry_after;
            }
            AgentEvent::Command(command) => {
                let (id, verb) = (command.command_id.clone(), command.verb.clone());
                match self.guard.on_command(now, session, command) {
                    Ok(Some(command)) => {
                        tracing::info!(command_id = %id, verb = %verb, attempt = command.attempt, "running command");
                        self.status.running.fetch_add(1, Ordering::Relaxed);
                        let executor = self.executor.clone();
                        let done = done_tx.clone();
                        tokio::spawn(async move {
                            let result = executor.execute(&command).await;
                            // The receiver lives as long as the agent; a send fails only
                            // during shutdown, and the ledger then reports it interrupted.
                            let _ = done.send(result).await;
                        });
                    }
                    Ok(None) => tracing::info!(command_id = %id, "re-delivered command answered from the ledger"),
                    // Not acknowledged: the host delivers it again once the ledger works.
                    Err(error) => tracing::error!(command_id = %id, error = %error, "cannot record the command"),
                }
            }
            AgentEvent::ResultsAcked(ids) => {
                if let Err(error) = self.guard.on_results_acked(&ids) {
                    tracing::error!(error = %error, "cannot record acknowledged results");
                }
            }
            AgentEvent::TelemetryAcked(batch_id) => self.telemetry.on_acked(batch_id),
            AgentEvent::Violation(violation) => {
                tracing::warn!(violation = violation.code(), "refused a message from the host");
            }
            AgentEvent::Closed(end) => {
                tracing::info!(code = ?end.code, by_host = end.by_peer, "session ended");
            }
            _ => {}
        }
    }

    /// A command finished: record it, and send it if a session is up.
    fn finished(&mut self, live: Option<&mut Live>, result: CommandResult) {
        tracing::info!(
            command_id = %result.command_id,
            status = ?result.status,
            duration_ms = result.duration_ms,
            "command finished"
        );
        let now = self.clock.now();
        let session = live.map(|l| &mut l.session);
        if let Err(error) = self.guard.on_finished(now, session, result.clone()) {
            tracing::error!(error = %error, command_id = %result.command_id, "cannot record a result; retrying");
            self.unrecorded.push(result);
        }
    }

    fn retry_unrecorded(&mut self, mut session: Option<&mut AgentSession>) {
        let now = self.clock.now();
        let pending = std::mem::take(&mut self.unrecorded);
        for result in pending {
            if self.guard.on_finished(now, session.as_deref_mut(), result.clone()).is_err() {
                self.unrecorded.push(result);
            }
        }
    }

    /// Samples the machine off the main loop; the samples come back through `tx`.
    fn sample(&self, probe: &Arc<std::sync::Mutex<SystemProbe>>, tx: &mpsc::Sender<Vec<Sample>>) {
        let probe = Arc::clone(probe);
        let tx = tx.clone();
        let docker = self.executor.docker();
        let clock = self.clock;
        tokio::spawn(async move {
            let snapshot =
                tokio::task::spawn_blocking(move || probe.lock().map(|mut p| p.snapshot()).ok()).await.ok().flatten();
            let Some(snapshot) = snapshot else { return };
            let containers = docker.container_counts().await;
            // A full channel means the loop is behind; this tick's samples are skipped.
            let _ = tx.try_send(telemetry::samples(clock.now(), &snapshot, containers));
        });
    }

    fn upkeep(&mut self, session: Option<&mut Live>) {
        self.retry_unrecorded(session.map(|l| &mut l.session));
        match self.guard.ledger_mut().prune(self.clock.now()) {
            Ok(0) => {}
            Ok(pruned) => tracing::debug!(pruned, "pruned the execution ledger"),
            Err(error) => tracing::warn!(error = %error, "cannot prune the execution ledger"),
        }
    }

    /// The session ended: close the socket and schedule the next attempt.
    async fn disconnected(&mut self, mut live: Live) -> Instant {
        let _ = tokio::time::timeout(Duration::from_secs(2), live.socket.close(None)).await;
        self.status.connected.store(false, Ordering::Relaxed);
        self.backoff.on_session_ended(self.clock.now());
        self.telemetry.on_disconnected();
        let delay = self.next_delay();
        tracing::info!(retry_in_ms = delay.as_millis() as u64, "disconnected from the host");
        Instant::now() + delay
    }

    fn next_delay(&mut self) -> Duration {
        let drawn = self.backoff.next_delay(&mut self.entropy);
        drawn.max(self.retry_after.take().unwrap_or_default())
    }

    fn publish(&self) {
        self.status.telemetry_buffered.store(self.telemetry.len() as u64, Ordering::Relaxed);
        self.status.telemetry_dropped.store(self.telemetry.dropped_total(), Ordering::Relaxed);
    }

    /// Closes the session with `going_away` and gives running commands a grace period.
    async fn shut_down(mut self, live: Option<Live>, done_rx: &mut mpsc::Receiver<CommandResult>) {
        tracing::info!(running = self.guard.running(), "shutting down");
        let mut live = live;
        if let Some(l) = live.as_mut() {
            l.session.close(self.clock.now(), CloseCode::GoingAway, "the agent is shutting down");
            while let Some(bytes) = l.session.poll_transmit() {
                if tokio::time::timeout(SEND_TIMEOUT, l.socket.send(WsMessage::Binary(bytes.into()))).await.is_err() {
                    break;
                }
            }
            let _ = tokio::time::timeout(Duration::from_secs(2), l.socket.close(None)).await;
        }
        let deadline = Instant::now() + SHUTDOWN_GRACE;
        while self.guard.running() > 0 {
            match tokio::time::timeout_at(deadline, done_rx.recv()).await {
                Ok(Some(result)) => self.finished(None, result),
                _ => break,
            }
        }
        if self.guard.running() > 0 {
            tracing::warn!(
                running = self.guard.running(),
                "commands still running at shutdown will be reported interrupted"
            );
        }
    }
}

type WsError = tokio_tungstenite::tungstenite::Error;

/// The next frame from the host, or never when there is no connection.
async fn next_frame(live: &mut Option<Live>) -> Option<Result<WsMessage, WsError>> {
    match live {
        Some(l) => l.socket.next().await,
        None => std::future::pending().await,
    }
}

//! The baseline: a bare TLS WebSocket echo server and its clients, with everything the agent
//! path has below the protocol and nothing above it. The server is a child process (so its
//! memory is measured as the host's is) using the host's own agent-endpoint TLS
//! configuration (TLS 1.3, client certificates verified against the host CA) and the host's
//! WebSocket buffer sizes; the clients dial exactly as the synthetic agents do, with the same
//! certificates from the same source addresses. The server echoes every binary message.
//!
//! A command's round trip holds two durable writes that no echo makes (the command before
//! the API accepts it, the result before the agent is told it is stored), so the baseline
//! also measures a *journaled* echo: the server writes the message to a SQLite journal set
//! up as the host's store is (WAL, `synchronous=FULL`, one writer committing what has
//! queued) before echoing it, and the client sends the first echo straight back for a
//! second journaled leg. One leg is the least any durable result acknowledgement costs on
//! this disk; two in series, the least a durable command round trip costs.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex as AsyncMutex, Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::Bytes;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use viworks_core::wire::DEFAULT_MAX_MESSAGE_LEN;
use viworks_host::tls::Pki;

use super::dial::{self, Socket};
use super::fleet::Identity;
use super::options::EchoServerArgs;
use super::pace;
use super::stats::Summary;
use super::system;
use super::{Deadline, LoadgenError};

/// What an echo message asks of the server and the client, in its ninth byte. Bytes 0..8
/// carry when it was due to be sent and, in a second leg, bytes 16..24 when that leg began
/// (nanoseconds since the client's base instant, little-endian).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Leg {
    /// Echoed as it is.
    Bare = 0,
    /// Journaled, then echoed; the round trip ends with its echo.
    Journaled = 1,
    /// Journaled, then echoed; the client sends it back as [`Leg::Journaled`].
    JournaledTwice = 2,
}

impl Leg {
    fn of(payload: &[u8]) -> Option<Leg> {
        match payload.get(8) {
            Some(0) => Some(Leg::Bare),
            Some(1) => Some(Leg::Journaled),
            Some(2) => Some(Leg::JournaledTwice),
            _ => None,
        }
    }
}

/// The shortest echo message: the due instant, the leg, the second leg's start.
const MIN_MESSAGE: usize = 24;

/// Messages waiting for the journal's writer, at most; connections wait for room beyond it.
const JOURNAL_QUEUE: usize = 4096;

/// Most messages the journal's writer commits in one transaction.
const JOURNAL_BATCH: usize = 1024;

/// A message for the journal, and where to say whether it was written.
type JournalEntry = (Bytes, oneshot::Sender<bool>);

/// The echo server's journal: one thread that writes whatever messages have queued in one
/// transaction, as the host's store writer does.
#[derive(Clone, Debug)]
struct Journal {
    queue: mpsc::Sender<JournalEntry>,
}

impl Journal {
    /// Opens (creating if missing) the journal at `path`, set up as the host's store is, and
    /// starts its writer thread.
    fn open(path: &Path) -> Result<Journal, LoadgenError> {
        let failed = |reason: String| LoadgenError::Journal { path: path.to_owned(), reason };
        let failed_sql = |error: rusqlite::Error| failed(error.to_string());
        let conn = rusqlite::Connection::open(path).map_err(failed_sql)?;
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0)).map_err(failed_sql)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(failed(format!("cannot switch it to WAL mode (it is in {mode} mode)")));
        }
        conn.pragma_update(None, "synchronous", "FULL").map_err(failed_sql)?;
        conn.execute_batch("CREATE TABLE IF NOT EXISTS journal (seq INTEGER PRIMARY KEY, body BLOB NOT NULL)")
            .map_err(failed_sql)?;
        let (queue, entries) = mpsc::channel(JOURNAL_QUEUE);
        std::thread::Builder::new()
            .name("echo-journal".into())
            .spawn(move || write_journal(conn, entries))
            .map_err(LoadgenError::io("start the writer thread of", path))?;
        Ok(Journal { queue })
    }

    /// Writes `body` durably; false when the journal could not.
    async fn write(&self, body: Bytes) -> bool {
        let (done, written) = oneshot::channel();
        self.queue.send((body, done)).await.is_ok() && written.await.unwrap_or(false)
    }
}

fn write_journal(mut conn: rusqlite::Connection, mut entries: mpsc::Receiver<JournalEntry>) {
    let mut batch = Vec::with_capacity(JOURNAL_BATCH);
    while entries.blocking_recv_many(&mut batch, JOURNAL_BATCH) > 0 {
        let written = commit(&mut conn, &batch);
        if let Err(error) = &written {
            tracing::error!(%error, messages = batch.len(), "journal write failed");
        }
        for (_, done) in batch.drain(..) {
            let _ = done.send(written.is_ok());
        }
    }
}

fn commit(conn: &mut rusqlite::Connection, batch: &[JournalEntry]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut insert = tx.prepare_cached("INSERT INTO journal (body) VALUES (?1)")?;
        for (body, _) in batch {
            insert.execute([&body[..]])?;
        }
    }
    tx.commit()
}

/// The WebSocket settings the host applies to agent connections (`agents/connection.rs`):
/// a 4 KiB read buffer, no write buffering, the protocol's message limit.
pub fn host_websocket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
        .max_write_buffer_size(4 * DEFAULT_MAX_MESSAGE_LEN)
        .max_message_size(Some(DEFAULT_MAX_MESSAGE_LEN))
        .max_frame_size(Some(DEFAULT_MAX_MESSAGE_LEN))
}

/// Runs the echo server until the process is killed; the `echo-server` subcommand. Uses a
/// multi-threaded runtime with one worker per core, as the host does.
pub fn serve(args: &EchoServerArgs) -> Result<(), LoadgenError> {
    let pki = Pki::load(&args.data_dir)?;
    let tls = viworks_host::tls::agent_server_config(&pki)?;
    let journal = Journal::open(&args.journal)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(LoadgenError::io("start the runtime for", "the echo server"))?;
    runtime.block_on(async move {
        let listener =
            TcpListener::bind(args.addr).await.map_err(LoadgenError::io("listen on", args.addr.to_string()))?;
        let acceptor = TlsAcceptor::from(tls);
        tracing::info!(addr = %args.addr, "echo server listening");
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(echo_connection(acceptor.clone(), stream, journal.clone()));
                }
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    })
}

async fn echo_connection(acceptor: TlsAcceptor, stream: TcpStream, journal: Journal) {
    let _ = stream.set_nodelay(true);
    let Ok(tls) = acceptor.accept(stream).await else { return };
    let Ok(mut socket) = tokio_tungstenite::accept_async_with_config(tls, Some(host_websocket_config())).await else {
        return;
    };
    while let Some(Ok(message)) = socket.next().await {
        let echoed = match message {
            WsMessage::Binary(bytes) => {
                let journaled = matches!(Leg::of(&bytes), Some(Leg::Journaled | Leg::JournaledTwice));
                if journaled && !journal.write(bytes.clone()).await {
                    // Not written, so not echoed: the client counts it as lost.
                    break;
                }
                socket.send(WsMessage::Binary(bytes)).await
            }
            WsMessage::Close(_) => break,
            _ => Ok(()),
        };
        if echoed.is_err() {
            break;
        }
    }
}

/// What the baseline measured.
#[derive(Clone, Debug, Default)]
pub struct EchoFigures {
    /// Connections made.
    pub connected: usize,
    /// From the first dial to the last upgrade completed.
    pub connect_wall: Duration,
    /// Per connection: TCP connect to WebSocket upgrade done.
    pub setup: Summary,
    /// The echo server's memory with no connection.
    pub idle_rss: u64,
    /// With every connection open and idle.
    pub connected_rss: u64,
    /// The difference per connection, bytes.
    pub per_connection: f64,
    /// Echo round trips: from when the message was due to be sent to its echo read back.
    pub round_trip: Summary,
    /// Messages sent in the round-trip phase.
    pub sent: usize,
    /// Journaled round trips, one leg: the second leg of each, from the client receiving the
    /// first echo (and sending it back) to the second echo, the server having written it
    /// durably first. Like COMMAND→RESULT_ACK, it starts at a message received, so no
    /// pacing lateness is in it.
    pub journaled_once: Summary,
    /// Journaled round trips, two legs in series: the first echo sent straight back and
    /// journaled again, timed from when the first was due to the second echo.
    pub journaled_twice: Summary,
    /// Messages sent in the journaled phase (each makes both legs).
    pub journaled_sent: usize,
    /// From when a message of either phase was due to when its client began sending it: the
    /// pacing lateness inside `round_trip` and `journaled_twice`, to set beside the round-trip
    /// phase's own.
    pub late: Summary,
    /// Rate of the round-trip phase, messages per second.
    pub rate: u32,
    /// CPU time of the echo server and the load generator while connecting and during the
    /// round trips.
    pub cpu: Vec<system::PhaseCpu>,
}

/// Settings of the baseline.
#[derive(Clone, Debug)]
pub struct EchoPlan {
    /// The echo server's address.
    pub addr: SocketAddr,
    /// Connections to open (one per identity used).
    pub connections: usize,
    /// Connections set up at once.
    pub concurrency: usize,
    /// Connections per source address.
    pub per_source: usize,
    /// Round trips per second.
    pub rate: u32,
    /// For how long.
    pub duration: Duration,
    /// Bytes per message.
    pub bytes: usize,
    /// Time to let the server settle before reading its memory.
    pub settle: Duration,
}

/// The echo client side: connects, measures the server's memory, runs round trips at the
/// plan's rate, and closes. `server_pid` is the echo server child.
pub async fn measure(
    plan: &EchoPlan,
    identities: &Arc<Vec<Identity>>,
    server_pid: u32,
    deadline: Deadline,
) -> Result<EchoFigures, LoadgenError> {
    tokio::time::sleep(plan.settle).await;
    let idle_rss = system::memory_of(server_pid)?.rss;
    let mut meter = system::CpuMeter::start(server_pid, None);
    let url = format!("wss://{}:{}/ws/agent", dial::SERVER_NAME, plan.addr.port());
    let rtts = Arc::new(AsyncMutex::new(RoundTrips::default()));
    let base = Instant::now();

    let semaphore = Arc::new(Semaphore::new(plan.concurrency));
    let (report, mut reports) = mpsc::unbounded_channel::<Result<(usize, Duration), String>>();
    let mut clients = JoinSet::new();
    let (senders_tx, mut senders_rx) = mpsc::unbounded_channel::<(usize, mpsc::Sender<(Instant, Leg)>)>();
    let started = Instant::now();
    let count = plan.connections.min(identities.len());
    for index in 0..count {
        let Ok(permit) = Arc::clone(&semaphore).acquire_owned().await else { break };
        let (identities, url, report, rtts, senders_tx) =
            (Arc::clone(identities), url.clone(), report.clone(), Arc::clone(&rtts), senders_tx.clone());
        let (addr, per_source, bytes) = (plan.addr, plan.per_source, plan.bytes);
        clients.spawn(async move {
            let t0 = Instant::now();
            let source = system::source_addr(index, per_source);
            let tls = Arc::clone(&identities[index].tls);
            let dialled = tokio::time::timeout(Duration::from_secs(30), dial::dial(source, addr, tls, &url)).await;
            drop(permit);
            let socket = match dialled {
                Ok(Ok((socket, _))) => socket,
                failed => {
                    let reason = match failed {
                        Ok(Err(error)) => error.to_string(),
                        _ => "no connection within 30 s".to_owned(),
                    };
                    let _ = report.send(Err(reason));
                    return;
                }
            };
            let (tx, rx) = mpsc::channel(64);
            let _ = senders_tx.send((index, tx));
            drop(senders_tx);
            let _ = report.send(Ok((index, t0.elapsed())));
            echo_client(socket, rx, rtts, base, bytes).await;
        });
    }
    drop(report);
    let mut setups = Vec::with_capacity(count);
    let mut first_failure = None;
    let mut failures = 0;
    let mut last = started;
    while setups.len() + failures < count {
        match tokio::time::timeout_at(deadline.instant(), reports.recv()).await {
            Ok(Some(Ok((_, setup)))) => {
                setups.push(setup);
                last = Instant::now();
            }
            Ok(Some(Err(error))) => {
                failures += 1;
                first_failure.get_or_insert(error);
            }
            Ok(None) => break,
            Err(_) => return Err(deadline.expired("echo connections", format!("{} of {count} up", setups.len()))),
        }
    }
    if setups.len() < count {
        return Err(LoadgenError::Connect {
            connected: setups.len(),
            wanted: count,
            first_failure: first_failure.unwrap_or_else(|| "unknown".into()),
        });
    }
    let connect_wall = last - started;
    let mut cpu = vec![meter.lap("echo: connect")];
    // Every client queued its sender before reporting itself connected.
    let mut senders = Vec::with_capacity(count);
    while let Ok((index, tx)) = senders_rx.try_recv() {
        senders.push((index, tx));
    }
    if senders.is_empty() {
        return Err(LoadgenError::Connect { connected: 0, wanted: count, first_failure: "no echo client".into() });
    }
    senders.sort_by_key(|(index, _)| *index);
    let senders: Vec<_> = senders.into_iter().map(|(_, tx)| tx).collect();
    tokio::time::sleep(plan.settle).await;
    let connected_rss = system::memory_of(server_pid)?.rss;
    meter.lap("echo: settle");

    let sent = round_trips(plan, &senders, Leg::Bare, &rtts, deadline).await?;
    cpu.push(meter.lap("echo: round trips"));
    let journaled_sent = round_trips(plan, &senders, Leg::JournaledTwice, &rtts, deadline).await?;
    cpu.push(meter.lap("echo: journaled"));
    drop(senders);
    let closing = async { while clients.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(30), closing).await.is_err() {
        tracing::warn!("echo clients did not close within 30 s");
    }
    let rtts = std::mem::take(&mut *rtts.lock().await);
    let per_connection = connected_rss.saturating_sub(idle_rss) as f64 / count.max(1) as f64;
    Ok(EchoFigures {
        connected: count,
        connect_wall,
        setup: Summary::of(setups),
        idle_rss,
        connected_rss,
        per_connection,
        round_trip: Summary::of(rtts.bare),
        sent,
        journaled_once: Summary::of(rtts.journaled_once),
        journaled_twice: Summary::of(rtts.journaled_twice),
        journaled_sent,
        late: Summary::of(rtts.late),
        rate: plan.rate,
        cpu,
    })
}

/// Round trips the echo clients timed, by kind.
#[derive(Debug, Default)]
struct RoundTrips {
    bare: Vec<Duration>,
    journaled_once: Vec<Duration>,
    journaled_twice: Vec<Duration>,
    late: Vec<Duration>,
}

impl RoundTrips {
    /// Round trips of `leg` that have ended.
    fn ended(&self, leg: Leg) -> usize {
        match leg {
            Leg::Bare => self.bare.len(),
            Leg::Journaled | Leg::JournaledTwice => self.journaled_twice.len(),
        }
    }
}

/// Sends messages of `leg` at the plan's rate, open loop, spread over the clients, and waits
/// (up to 30 s) for their round trips to end; returns how many were sent.
async fn round_trips(
    plan: &EchoPlan,
    senders: &[mpsc::Sender<(Instant, Leg)>],
    leg: Leg,
    rtts: &AsyncMutex<RoundTrips>,
    deadline: Deadline,
) -> Result<usize, LoadgenError> {
    let interval = Duration::from_secs_f64(1.0 / f64::from(plan.rate.max(1)));
    let total = (f64::from(plan.rate) * plan.duration.as_secs_f64()).round() as usize;
    let ended_before = rtts.lock().await.ended(leg);
    let mut sent = 0;
    let mut ticks = pace::ticks(Instant::now() + Duration::from_millis(10), interval, total);
    while let Some((k, due)) = ticks.recv().await {
        if tokio::time::Instant::from_std(due) > deadline.instant() {
            return Err(deadline.expired("echo round trips", format!("{k} of {total} sent")));
        }
        if senders[k % senders.len()].try_send((due, leg)).is_ok() {
            sent += 1;
        }
    }
    let wait_until = deadline.within(Duration::from_secs(30));
    while rtts.lock().await.ended(leg) - ended_before < sent && tokio::time::Instant::now() < wait_until {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(sent)
}

/// One echo client: sends a message when told (carrying when it was due and its leg),
/// records the round trip when the echo comes back (sending a [`Leg::JournaledTwice`] echo
/// straight back for its second leg), closes when the sender side is dropped.
async fn echo_client(
    mut socket: Socket,
    mut due: mpsc::Receiver<(Instant, Leg)>,
    rtts: Arc<AsyncMutex<RoundTrips>>,
    base: Instant,
    bytes: usize,
) {
    loop {
        tokio::select! {
            next = due.recv() => match next {
                Some((at, leg)) => {
                    let late = at.elapsed();
                    let mut payload = vec![b'x'; bytes.max(MIN_MESSAGE)];
                    let offset = at.saturating_duration_since(base).as_nanos() as u64;
                    payload[..8].copy_from_slice(&offset.to_le_bytes());
                    payload[8] = leg as u8;
                    if socket.send(WsMessage::Binary(payload.into())).await.is_err() {
                        break;
                    }
                    rtts.lock().await.late.push(late);
                }
                None => {
                    let _ = tokio::time::timeout(Duration::from_secs(2), socket.close(None)).await;
                    break;
                }
            },
            frame = socket.next() => match frame {
                Some(Ok(WsMessage::Binary(payload))) if payload.len() >= MIN_MESSAGE => {
                    let since = |at: usize| {
                        let mut offset = [0u8; 8];
                        offset.copy_from_slice(&payload[at..at + 8]);
                        (base + Duration::from_nanos(u64::from_le_bytes(offset))).elapsed()
                    };
                    match Leg::of(&payload) {
                        Some(Leg::Bare) => rtts.lock().await.bare.push(since(0)),
                        Some(Leg::Journaled) => {
                            let (whole, second) = (since(0), since(16));
                            let mut rtts = rtts.lock().await;
                            rtts.journaled_twice.push(whole);
                            rtts.journaled_once.push(second);
                        }
                        Some(Leg::JournaledTwice) => {
                            let mut again = payload.to_vec();
                            again[8] = Leg::Journaled as u8;
                            let now = base.elapsed().as_nanos() as u64;
                            again[16..24].copy_from_slice(&now.to_le_bytes());
                            if socket.send(WsMessage::Binary(again.into())).await.is_err() {
                                break;
                            }
                        }
                        None => {}
                    }
                }
                Some(Ok(_)) => {}
                _ => break,
            },
        }
    }
}

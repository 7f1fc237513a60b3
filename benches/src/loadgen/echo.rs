//! The baseline: a bare TLS WebSocket echo server and its clients, with everything the agent
//! path has below the protocol and nothing above it. The server is a child process (so its
//! memory is measured as the host's is) using the host's own agent-endpoint TLS
//! configuration (TLS 1.3, client certificates verified against the host CA) and the host's
//! WebSocket buffer sizes; the clients dial exactly as the synthetic agents do, with the same
//! certificates from the same source addresses. The server echoes every binary message.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex as AsyncMutex, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
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
                    tokio::spawn(echo_connection(acceptor.clone(), stream));
                }
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    })
}

async fn echo_connection(acceptor: TlsAcceptor, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let Ok(tls) = acceptor.accept(stream).await else { return };
    let Ok(mut socket) = tokio_tungstenite::accept_async_with_config(tls, Some(host_websocket_config())).await else {
        return;
    };
    while let Some(Ok(message)) = socket.next().await {
        let echoed = match message {
            WsMessage::Binary(bytes) => socket.send(WsMessage::Binary(bytes)).await,
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
    let rtts = Arc::new(AsyncMutex::new(Vec::<Duration>::new()));
    let base = Instant::now();

    let semaphore = Arc::new(Semaphore::new(plan.concurrency));
    let (report, mut reports) = mpsc::unbounded_channel::<Result<(usize, Duration), String>>();
    let mut clients = JoinSet::new();
    let (senders_tx, mut senders_rx) = mpsc::unbounded_channel::<(usize, mpsc::Sender<Instant>)>();
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
    tokio::time::sleep(plan.settle).await;
    let connected_rss = system::memory_of(server_pid)?.rss;
    meter.lap("echo: settle");

    // Round trips at the plan's rate, open loop, each timed from when it was due.
    let interval = Duration::from_secs_f64(1.0 / f64::from(plan.rate.max(1)));
    let total = (f64::from(plan.rate) * plan.duration.as_secs_f64()).round() as usize;
    let mut sent = 0;
    let mut ticks = pace::ticks(std::time::Instant::now() + Duration::from_millis(10), interval, total);
    while let Some((k, due)) = ticks.recv().await {
        if tokio::time::Instant::from_std(due) > deadline.instant() {
            return Err(deadline.expired("echo round trips", format!("{k} of {total} sent")));
        }
        if senders[k % senders.len()].1.try_send(due).is_ok() {
            sent += 1;
        }
    }
    let wait_until = deadline.within(Duration::from_secs(30));
    while rtts.lock().await.len() < sent && tokio::time::Instant::now() < wait_until {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    cpu.push(meter.lap("echo: round trips"));
    drop(senders);
    let closing = async { while clients.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(30), closing).await.is_err() {
        tracing::warn!("echo clients did not close within 30 s");
    }
    let round_trip = Summary::of(std::mem::take(&mut *rtts.lock().await));
    let per_connection = connected_rss.saturating_sub(idle_rss) as f64 / count.max(1) as f64;
    Ok(EchoFigures {
        connected: count,
        connect_wall,
        setup: Summary::of(setups),
        idle_rss,
        connected_rss,
        per_connection,
        round_trip,
        sent,
        rate: plan.rate,
        cpu,
    })
}

/// One echo client: sends a message when told (carrying when it was due), records the round
/// trip when the echo comes back, closes when the sender side is dropped.
async fn echo_client(
    mut socket: Socket,
    mut due: mpsc::Receiver<Instant>,
    rtts: Arc<AsyncMutex<Vec<Duration>>>,
    base: Instant,
    bytes: usize,
) {
    loop {
        tokio::select! {
            next = due.recv() => match next {
                Some(at) => {
                    let mut payload = vec![b'x'; bytes.max(16)];
                    let offset = at.saturating_duration_since(base).as_nanos() as u64;
                    payload[..8].copy_from_slice(&offset.to_le_bytes());
                    if socket.send(WsMessage::Binary(payload.into())).await.is_err() {
                        break;
                    }
                }
                None => {
                    let _ = tokio::time::timeout(Duration::from_secs(2), socket.close(None)).await;
                    break;
                }
            },
            frame = socket.next() => match frame {
                Some(Ok(WsMessage::Binary(payload))) if payload.len() >= 8 => {
                    let mut offset = [0u8; 8];
                    offset.copy_from_slice(&payload[..8]);
                    let at = base + Duration::from_nanos(u64::from_le_bytes(offset));
                    rtts.lock().await.push(at.elapsed());
                }
                Some(Ok(_)) => {}
                _ => break,
            },
        }
    }
}

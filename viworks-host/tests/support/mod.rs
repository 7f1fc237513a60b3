//! Fixtures for the host's integration tests: a data directory with a PKI and enrolled
//! agents, a host running in-process, and a test agent that speaks the real protocol over
//! real TLS and WebSocket.

#![allow(dead_code, unused_imports)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use viworks_core::auth::{AgentKey, PinSet};
use viworks_core::session::{AgentConfig, AgentEvent, AgentSession};
use viworks_core::wire::{AgentId, Capability};
use viworks_core::{Entropy, Timestamp};
use viworks_host::config::{Config, FileConfig, Overrides};
use viworks_host::store::{AgentRecord, Store};
use viworks_host::tls::{self, InitOptions, Pki, Validity};

mod http;
pub mod process;
pub use http::{Response, eventually, http};

/// A data directory with a PKI, a database and the bundles of enrolled agents.
pub struct Fleet {
    pub dir: tempfile::TempDir,
    pub config: Config,
    pub admin_token: String,
}

impl Fleet {
    /// A fresh data directory; listeners on ephemeral loopback ports.
    pub async fn new() -> Fleet {
        Fleet::on(None).await
    }

    /// A fresh data directory whose store is `store` (a URL), or SQLite in it.
    pub async fn on(store: Option<String>) -> Fleet {
        let dir = tempfile::tempdir().expect("temp dir");
        let overrides = Overrides {
            data_dir: Some(dir.path().join("data")),
            api_addr: Some("127.0.0.1:0".into()),
            agent_addr: Some("127.0.0.1:0".into()),
            store,
        };
        let mut file = FileConfig::parse(
            "[session]\nheartbeat_secs = 1\nliveness_secs = 3\n[cluster]\nlease_secs = 3\nsweep_secs = 1\n",
        )
        .expect("valid");
        file.agents.public_url = Some("wss://localhost:1/ws/agent".into());
        let config = file.resolve(&overrides).expect("valid config");
        let initialized =
            viworks_host::init(&config.data_dir, &config.store, &InitOptions::default()).await.expect("init");
        Fleet { dir, config, admin_token: initialized.admin_token }
    }

    pub fn pki(&self) -> Pki {
        Pki::load(&self.config.data_dir).expect("pki")
    }

    /// Enrolls `agent` in the store and writes its bundle; returns the bundle directory.
    pub async fn enroll(&self, agent: &str) -> PathBuf {
        self.enroll_with(agent, Validity::agent_default()).await
    }

    pub async fn enroll_with(&self, agent: &str, validity: Validity) -> PathBuf {
        let id = AgentId::new(agent).expect("valid id");
        let out = self.dir.path().join("bundles").join(agent);
        tls::write_bundle_with_validity(&self.pki(), &id, "test", "wss://localhost:1/ws/agent", &out, validity)
            .expect("bundle");
        let store = viworks_host::open_store(&self.config.store, self.config.postgres).await.expect("store");
        store.enroll_agent(&AgentRecord::enrolled(id, "test", Timestamp::from_millis(1))).await.expect("enroll");
        store.close().await;
        out
    }
}

pub type Socket = WebSocketStream<TlsStream<TcpStream>>;

/// A test agent: a real TLS client with its bundle's certificate and pin, a WebSocket, and an
/// `AgentSession`.
pub struct TestAgent {
    pub id: AgentId,
    pub socket: Socket,
    pub session: AgentSession,
    pub events: Vec<AgentEvent>,
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Opens TLS + WebSocket to `addr` with the certificate in `bundle`.
pub async fn dial(
    addr: std::net::SocketAddr,
    bundle: &Path,
) -> Result<(Socket, viworks_core::auth::ChannelBinding), String> {
    let pin = std::fs::read_to_string(bundle.join("host.pin")).expect("pin").trim().parse().expect("valid pin");
    let (client, _report) = tls::pinned_client_config(
        &read(&bundle.join("ca.crt")),
        &read(&bundle.join("client.crt")),
        &read(&bundle.join("client.key")),
        PinSet { primary: pin, backup: None },
    )
    .map_err(|e| e.to_string())?;
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let tls = TlsConnector::from(client).connect(name, tcp).await.map_err(|e| e.to_string())?;
    let binding = tls::channel_binding_client(tls.get_ref().1).map_err(|e| e.to_string())?;
    let url = format!("wss://localhost:{}/ws/agent", addr.port());
    let (socket, _) = tokio_tungstenite::client_async(url, tls).await.map_err(|e| e.to_string())?;
    Ok((socket, binding))
}

impl TestAgent {
    /// Connects as the agent whose bundle is `bundle`, claiming `claimed` in its HELLO.
    pub async fn connect_as(addr: std::net::SocketAddr, bundle: &Path, claimed: &str) -> Result<TestAgent, String> {
        let (socket, binding) = dial(addr, bundle).await?;
        let key =
            AgentKey::from_hex(&std::fs::read_to_string(bundle.join("agent.key")).expect("key")).expect("valid key");
        let id = AgentId::new(claimed).expect("valid id");
        let config = AgentConfig {
            max_concurrency: 2,
            capabilities: vec![Capability::new("scripts").expect("valid")],
            ..AgentConfig::new(id.clone(), key)
        };
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).expect("randomness");
        let session =
            AgentSession::new(&config, now(), &mut Entropy::from_seed(seed), &binding).map_err(|e| e.to_string())?;
        let mut agent = TestAgent { id, socket, session, events: Vec::new() };
        agent.flush().await;
        Ok(agent)
    }

    pub async fn connect(addr: std::net::SocketAddr, bundle: &Path) -> Result<TestAgent, String> {
        let id = bundle.file_name().and_then(|n| n.to_str()).expect("bundle named after its agent").to_owned();
        TestAgent::connect_as(addr, bundle, &id).await
    }

    /// Sends everything the session queued.
    pub async fn flush(&mut self) {
        while let Some(bytes) = self.session.poll_transmit() {
            if self.socket.send(WsMessage::Binary(bytes.into())).await.is_err() {
                self.session.connection_lost();
                break;
            }
        }
    }

    /// Reads and handles messages until `done` holds for an event or `within` passes; returns
    /// whether it held.
    pub async fn until(&mut self, within: Duration, mut done: impl FnMut(&AgentEvent) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            while let Some(event) = self.session.poll_event() {
                let hit = done(&event);
                self.events.push(event);
                if hit {
                    return true;
                }
            }
            self.flush().await;
            if self.session.is_closed() {
                return false;
            }
            let next = tokio::time::timeout_at(deadline, self.socket.next()).await;
            match next {
                Err(_) => return false,
                Ok(Some(Ok(WsMessage::Binary(bytes)))) => self.session.handle_message(now(), &bytes),
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(_)) | None) => self.session.connection_lost(),
            }
            self.session.handle_timeout(now());
        }
    }

    pub async fn established(&mut self) -> bool {
        self.until(Duration::from_secs(5), |e| matches!(e, AgentEvent::Established { .. })).await
    }

    /// Sends raw bytes as one WebSocket message, bypassing the session.
    pub async fn send_raw(&mut self, bytes: Vec<u8>) {
        let _ = self.socket.send(WsMessage::Binary(bytes.into())).await;
    }
}

/// Wall-clock time as the host reads it.
pub fn now() -> Timestamp {
    let millis =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    Timestamp::from_millis(millis)
}

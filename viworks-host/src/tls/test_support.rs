//! Shared fixtures for the TLS tests: a throwaway PKI, and real rustls handshakes between two
//! in-process ends over an in-memory duplex pipe.

use std::io;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ServerConfig};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};
use viworks_core::auth::{ChannelBinding, PinSet};
use viworks_core::wire::AgentId;

use super::{
    InitOptions, IssuedAgent, PinReport, Pki, agent_identity, agent_server_config, channel_binding_client,
    channel_binding_server, pinned_client_config,
};

/// A fresh PKI in a temporary directory (kept alive by the returned guard).
pub(crate) fn fixture() -> (TempDir, Pki) {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::init(dir.path(), &InitOptions::default()).expect("init");
    (dir, pki)
}

/// A pinned client configuration for `agent`, trusting `pki`'s CA and host pin.
pub(crate) fn client_config(pki: &Pki, agent: &IssuedAgent) -> (Arc<ClientConfig>, PinReport) {
    pinned_client_config(
        pki.ca_pem().as_bytes(),
        agent.cert_pem.as_bytes(),
        agent.key_pem.as_bytes(),
        PinSet { primary: pki.host_pin(), backup: None },
    )
    .expect("client config")
}

/// Runs one handshake to `localhost` and returns each end's result.
pub(crate) async fn handshake(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
) -> (io::Result<server::TlsStream<DuplexStream>>, io::Result<client::TlsStream<DuplexStream>>) {
    let name = ServerName::try_from("localhost").expect("name");
    handshake_as(server, client, name).await
}

/// Runs one handshake, the client asking for `name`.
pub(crate) async fn handshake_as(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    name: ServerName<'static>,
) -> (io::Result<server::TlsStream<DuplexStream>>, io::Result<client::TlsStream<DuplexStream>>) {
    let (server_io, client_io) = tokio::io::duplex(64 * 1024);
    tokio::join!(TlsAcceptor::from(server).accept(server_io), TlsConnector::from(client).connect(name, client_io))
}

/// Sends one byte each way, so that post-handshake messages (session tickets) are read.
pub(crate) async fn exchange(
    server: &mut server::TlsStream<DuplexStream>,
    client: &mut client::TlsStream<DuplexStream>,
) {
    let mut byte = [0u8; 1];
    server.write_all(b"s").await.expect("server writes");
    server.flush().await.expect("server flushes");
    client.read_exact(&mut byte).await.expect("client reads");
    client.write_all(b"c").await.expect("client writes");
    client.flush().await.expect("client flushes");
    server.read_exact(&mut byte).await.expect("server reads");
}

/// What the host learnt from an accepted agent connection.
#[derive(Debug)]
pub(crate) struct Accepted {
    pub identity: AgentId,
    pub binding: ChannelBinding,
}

/// What the agent learnt from its side.
#[derive(Debug)]
pub(crate) struct Connected {
    pub binding: ChannelBinding,
}

/// Both ends of one agent connection attempt.
pub(crate) struct Outcome {
    pub server: io::Result<Accepted>,
    pub client: io::Result<Connected>,
}

/// Connects `agent` to `pki`'s agent endpoint with a pinned client, as a gateway would.
pub(crate) async fn connect_agent(pki: &Pki, agent: &IssuedAgent) -> Outcome {
    let server = agent_server_config(pki).expect("server config");
    let (client, _) = client_config(pki, agent);
    let (server, client) = handshake(server, client).await;
    Outcome {
        server: server.map(|stream| {
            let conn = stream.get_ref().1;
            Accepted {
                identity: agent_identity(conn).expect("identity"),
                binding: channel_binding_server(conn).expect("binding"),
            }
        }),
        client: client
            .map(|stream| Connected { binding: channel_binding_client(stream.get_ref().1).expect("binding") }),
    }
}

//! The synthetic fleet's identities: one client certificate per agent issued by the host's
//! CA, its message key, and its pinned client TLS configuration (the gateway's own builder);
//! and their enrollment in the host's store, done before the host starts.

use std::path::Path;
use std::sync::Arc;

use rustls::ClientConfig;
use viworks_core::auth::{AgentKey, PinSet};
use viworks_core::wire::AgentId;
use viworks_host::config::StoreUrl;
use viworks_host::store::postgres::PostgresOptions;
use viworks_host::store::{AgentRecord, Store};
use viworks_host::tls::{Pki, Validity};

use super::LoadgenError;

/// The site every synthetic agent is enrolled in; a selector on it reaches them all.
pub const SITE: &str = "loadgen";

/// Enrollments written to the store at once (they share its group commits).
const ENROLL_CHUNK: usize = 1024;

/// One synthetic agent's credentials.
pub struct Identity {
    /// Its id, also its certificate's common name.
    pub agent_id: AgentId,
    /// Its message key, derived from the host's master key as enrollment does.
    pub agent_key: AgentKey,
    /// TLS 1.3 with its client certificate, trusting the host's CA and pinning the host key.
    pub tls: Arc<ClientConfig>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").field("agent_id", &self.agent_id).finish_non_exhaustive()
    }
}

/// The id of agent `index`: `lg-00000`, `lg-00001`, …
pub fn agent_id(index: usize) -> Result<AgentId, LoadgenError> {
    let value = format!("lg-{index:05}");
    AgentId::new(value.clone()).map_err(|e| LoadgenError::Identifier { value, reason: e.to_string() })
}

/// Issues `count` agent certificates from the PKI in `data_dir` and builds each agent's
/// client configuration, spread over the machine's cores. Costs one ECDSA key generation and
/// one signature per agent.
pub fn issue(data_dir: &Path, count: usize) -> Result<Vec<Identity>, LoadgenError> {
    let pki = Pki::load(data_dir)?;
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(count.max(1));
    let per_thread = count.div_ceil(threads);
    let pki = &pki;
    let results: Vec<Result<Vec<Identity>, LoadgenError>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let range = (t * per_thread)..((t + 1) * per_thread).min(count);
                scope.spawn(move || range.map(|index| identity(pki, index)).collect::<Result<Vec<_>, _>>())
            })
            .collect();
        workers
            .into_iter()
            .map(|worker| {
                worker.join().unwrap_or_else(|_| {
                    Err(LoadgenError::Internal { what: "issuing certificates", reason: "a thread panicked".into() })
                })
            })
            .collect()
    });
    let mut identities = Vec::with_capacity(count);
    for chunk in results {
        identities.extend(chunk?);
    }
    Ok(identities)
}

fn identity(pki: &Pki, index: usize) -> Result<Identity, LoadgenError> {
    let agent_id = agent_id(index)?;
    let issued = pki.issue_agent(&agent_id, Validity::agent_default())?;
    let pins = PinSet { primary: pki.host_pin(), backup: None };
    let (tls, _report) = viworks_gateway::tls::pinned_client_config(
        pki.ca_pem().as_bytes(),
        issued.cert_pem.as_bytes(),
        issued.key_pem.as_bytes(),
        pins,
    )?;
    let agent_key = AgentKey::derive(pki.master_key(), &agent_id);
    Ok(Identity { agent_id, agent_key, tls })
}

/// Enrolls every identity in the store at `url` (`sqlite://PATH` or `postgres://…`, opened
/// as the host opens it), as `viworks-host agent enroll` does, in chunks written
/// concurrently (they share SQLite's group commits and Postgres's pool). Run it before the
/// host starts: the host loads enrolled agents at start.
pub async fn enroll(url: &str, identities: &[Identity]) -> Result<(), LoadgenError> {
    let url = StoreUrl::parse(url).map_err(|_| LoadgenError::StoreUrl)?;
    let store = viworks_host::open_store(&url, PostgresOptions::default()).await?;
    let now = viworks_gateway::clock::Clock::start().now();
    let mut outcome = Ok(());
    for chunk in identities.chunks(ENROLL_CHUNK) {
        let records: Vec<AgentRecord> =
            chunk.iter().map(|identity| AgentRecord::enrolled(identity.agent_id.clone(), SITE, now)).collect();
        let writes = records.iter().map(|record| store.enroll_agent(record));
        if let Some(error) = futures_util::future::join_all(writes).await.into_iter().find_map(Result::err) {
            outcome = Err(error.into());
            break;
        }
    }
    store.close().await;
    outcome
}

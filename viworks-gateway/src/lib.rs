//! The ViWorkS gateway agent: dials out to the control plane and runs the commands it sends.
//!
//! - [`config`]: `VIW_AGENT_*` settings from a TOML file, an enrollment bundle's `agent.env`
//!   and the environment, validated fail-closed with every problem reported at once.
//! - [`connection`] and [`tls`]: outbound WSS with the client certificate; the host is trusted
//!   only if its chain verifies against the trust bundle and its key matches a pin.
//! - [`agent`]: the main loop around `viworks-core`'s [`AgentSession`] and [`ExecutionGuard`],
//!   with reconnect backoff, the outbox and telemetry.
//! - [`executor`]: the one code path every command runs through.
//! - [`ledger`]: the execution ledger in SQLite that makes execution at-most-once.
//! - [`telemetry`]: samples and their bounded buffer.
//! - [`health`]: the optional local liveness endpoint.
//!
//! [`AgentSession`]: viworks_core::session::AgentSession
//! [`ExecutionGuard`]: viworks_core::session::ExecutionGuard

pub mod agent;
pub mod clock;
pub mod config;
pub mod connection;
pub mod executor;
pub mod health;
pub mod ledger;
pub mod telemetry;
pub mod tls;

use std::future::Future;
use std::path::PathBuf;
use std::time::SystemTime;

pub use agent::{Agent, AgentError};
pub use config::{Config, ConfigError, Settings, Validated};

/// Where the configuration comes from.
#[derive(Clone, Debug, Default)]
pub struct Sources {
    /// An optional TOML file.
    pub toml: Option<PathBuf>,
    /// An optional env file (an enrollment bundle's `agent.env`).
    pub env_file: Option<PathBuf>,
}

/// Reads every source (TOML, then env file, then the process environment, each overriding
/// the one before) and validates the result, reporting every problem at once.
pub fn load(sources: &Sources, env: impl IntoIterator<Item = (String, String)>) -> Result<Validated, Vec<ConfigError>> {
    let mut settings = Settings::default();
    let mut errors = Vec::new();
    if let Some(path) = &sources.toml
        && let Err(more) = settings.merge_toml(path)
    {
        errors.extend(more);
    }
    if let Some(path) = &sources.env_file
        && let Err(more) = settings.merge_env_file(path)
    {
        errors.extend(more);
    }
    if let Err(more) = settings.merge_env(env) {
        errors.extend(more);
    }
    match config::validate(&settings, SystemTime::now()) {
        Ok(validated) if errors.is_empty() => Ok(validated),
        Ok(_) => Err(errors),
        Err(more) => {
            errors.extend(more);
            Err(errors)
        }
    }
}

/// Runs the agent with `config` until `shutdown` completes, with the liveness endpoint when
/// one is configured. Fails only if it cannot start: the TLS material, the ledger in the
/// state directory or the endpoint's address is unusable. Once running, it never gives up
/// on the host.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    let health_addr = config.health_addr;
    let agent = Agent::new(config)?;
    if let Some(addr) = health_addr {
        let listener = health::bind(addr).await.map_err(|source| AgentError::Health { addr, source })?;
        tracing::info!(%addr, "liveness endpoint listening");
        tokio::spawn(health::serve(listener, agent.status()));
    }
    agent.run(shutdown).await;
    Ok(())
}

/// Completes on SIGTERM (systemd's stop) or SIGINT. The handlers are installed when this is
/// called, not when the future is first polled, so a signal that arrives while the caller is
/// still starting up is not lost. Call it inside a Tokio runtime.
pub fn shutdown_signal() -> impl Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let handlers = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()));
    async move {
        let (Ok(mut term), Ok(mut int)) = handlers else {
            // Without handlers the default disposition still stops the process.
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
}

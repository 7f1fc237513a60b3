//! The ViWorkS gateway agent: dials out to the control plane and runs the commands it sends.
//!
//! This build holds the agent's configuration: `VIW_AGENT_*` settings from a TOML file, an
//! enrollment bundle's `agent.env` and the environment, validated fail-closed. The connection,
//! executor, telemetry and outbox are not in this build yet.

pub mod config;

use std::path::PathBuf;
use std::time::SystemTime;

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

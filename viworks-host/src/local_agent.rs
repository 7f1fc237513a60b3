//! The gateway agent `viworks-host up` runs beside the host, so that one command gives a
//! working fleet of one: enrolled like any other agent (its bundle under
//! `DATA_DIR/local-agent/`), dialling the host over the same mutually authenticated WSS, and
//! answering the first `get_system_health` round trip.
//!
//! Its user and VPN-user scripts refuse to act: a machine running the control plane is not
//! a gateway whose accounts the fleet manages. Install real scripts on real gateways.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use viworks_core::wire::{AgentId, CommandId, Verb};

use crate::HostError;
use crate::clock::Clock;
use crate::config::Config;
use crate::control::{Control, SubmitRequest, Targets};
use crate::store::{AgentRecord, Store};
use crate::tls::{self, Pki, TlsError};

/// The local agent's id.
pub const LOCAL_AGENT_ID: &str = "local-agent";

/// How long `up` waits for the local agent to come online and answer.
pub const ROUND_TRIP_DEADLINE: Duration = Duration::from_secs(30);

const REFUSING_SCRIPT: &str = "#!/bin/sh
echo \"refused: the agent started by 'viworks-host up' does not manage accounts on the host machine;\" >&2
echo \"install real scripts under VIW_AGENT_SCRIPTS_ROOT on a gateway\" >&2
exit 3
";

/// Where the local agent's files live.
#[derive(Clone, Debug)]
pub struct LocalAgentPaths {
    /// `DATA_DIR/local-agent`.
    pub dir: PathBuf,
    /// Its enrollment bundle.
    pub bundle: PathBuf,
    /// Its scripts.
    pub scripts: PathBuf,
    /// Its ledger and outbox.
    pub state: PathBuf,
}

impl LocalAgentPaths {
    /// The paths under `data_dir`, made absolute (the agent requires an absolute state
    /// directory).
    pub fn new(data_dir: &Path) -> Result<LocalAgentPaths, HostError> {
        let data_dir = std::fs::canonicalize(data_dir).map_err(|source| {
            HostError::Tls(TlsError::Io { action: "resolve", path: data_dir.to_path_buf(), source })
        })?;
        let dir = data_dir.join("local-agent");
        Ok(LocalAgentPaths { bundle: dir.join("bundle"), scripts: dir.join("scripts"), state: dir.join("state"), dir })
    }
}

/// Enrolls the local agent and writes its bundle and scripts, unless that was done already.
/// Call it before the host starts, so the running host knows the agent's key.
pub async fn ensure_enrolled<S: Store>(config: &Config, store: &S) -> Result<LocalAgentPaths, HostError> {
    let paths = LocalAgentPaths::new(&config.data_dir)?;
    let id = local_id();
    if store.agent(&id).await?.is_none() {
        let pki = Pki::load(&config.data_dir)?;
        if !paths.bundle.join("agent.env").exists() {
            tls::write_bundle(&pki, &id, "local", &config.public_url, &paths.bundle)?;
        }
        let record = AgentRecord::enrolled(id.clone(), "local", Clock::start().now());
        store.enroll_agent(&record).await?;
    }
    write_scripts(&paths.scripts)?;
    Ok(paths)
}

fn write_scripts(dir: &Path) -> Result<(), HostError> {
    let io = |action, path: &Path| {
        let path = path.to_path_buf();
        move |source| HostError::Tls(TlsError::Io { action, path, source })
    };
    std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    for name in viworks_gateway::config::REQUIRED_SCRIPTS {
        let path = dir.join(name);
        if !path.exists() {
            std::fs::write(&path, REFUSING_SCRIPT).map_err(io("write", &path))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).map_err(io("chmod", &path))?;
        }
    }
    Ok(())
}

fn local_id() -> AgentId {
    AgentId::new(LOCAL_AGENT_ID).expect("the local agent id is a valid identifier")
}

/// The local agent, running in this process.
#[derive(Debug)]
pub struct LocalAgent {
    /// Its id.
    pub agent_id: AgentId,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl LocalAgent {
    /// Starts the agent from its bundle, dialling the host's agent endpoint on `agent_port`.
    pub fn start(paths: &LocalAgentPaths, agent_port: u16) -> Result<LocalAgent, HostError> {
        let engine = if Path::new(viworks_gateway::agent::DOCKER_SOCKET).exists() { "docker" } else { "none" };
        let env = [
            ("VIW_AGENT_BACKEND_URL", format!("wss://localhost:{agent_port}/ws/agent")),
            ("VIW_AGENT_SCRIPTS_ROOT", paths.scripts.display().to_string()),
            ("VIW_AGENT_STATE_DIR", paths.state.display().to_string()),
            ("VIW_AGENT_CONTAINER_ENGINE", engine.to_owned()),
        ];
        let sources = viworks_gateway::Sources { toml: None, env_file: Some(paths.bundle.join("agent.env")) };
        let validated = viworks_gateway::load(&sources, env.map(|(k, v)| (k.to_owned(), v)))
            .map_err(|errors| local_config_error(&errors))?;
        for warning in &validated.warnings {
            tracing::warn!(agent = LOCAL_AGENT_ID, "{warning}");
        }
        let (stop, stopped) = oneshot::channel();
        let config = validated.config;
        let task = tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            if let Err(error) = viworks_gateway::run(config, shutdown).await {
                tracing::error!(agent = LOCAL_AGENT_ID, error = %error, "the local agent cannot start");
            }
        });
        Ok(LocalAgent { agent_id: local_id(), stop, task })
    }

    /// Stops the agent: it closes its session and lets running commands finish.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(viworks_gateway::agent::SHUTDOWN_GRACE + Duration::from_secs(5), self.task).await;
    }
}

fn local_config_error(errors: &[viworks_gateway::ConfigError]) -> HostError {
    let problems = errors
        .iter()
        .map(|e| crate::config::ConfigError { key: format!("local-agent {}", e.key), problem: e.problem.clone() })
        .collect();
    HostError::Config(problems)
}

/// What the first round trip returned.
#[derive(Clone, Debug)]
pub struct RoundTrip {
    /// The command.
    pub command_id: CommandId,
    /// The result's status, as the API names it.
    pub status: String,
    /// From submission to stored result.
    pub elapsed: Duration,
    /// The agent's output.
    pub output: serde_json::Value,
}

/// Submits `get_system_health` to `agent` once it is online and waits for the stored result.
pub async fn first_round_trip<S: Store + Clone>(control: &Control<S>, agent: &AgentId) -> Result<RoundTrip, String> {
    let deadline = tokio::time::Instant::now() + ROUND_TRIP_DEADLINE;
    while !control.is_online(agent) {
        if tokio::time::Instant::now() > deadline {
            return Err(format!("{agent} did not come online within {ROUND_TRIP_DEADLINE:?}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let verb = Verb::new("get_system_health").map_err(|e| e.to_string())?;
    let submitted = control
        .submit(SubmitRequest {
            verb,
            args: serde_json::json!({}),
            targets: Targets::Agents(vec![agent.clone()]),
            timeout: Duration::from_secs(10),
            actor: "viworks-host up".to_owned(),
            req_id: control.random_id(),
            idempotency: None,
        })
        .await
        .map_err(|e| e.to_string())?;
    let Some((command_id, _)) = submitted.commands.first().cloned() else {
        return Err("the submission named no command".to_owned());
    };
    let submitted_at = Instant::now();
    loop {
        if let Some(stored) = control.store().command(&command_id).await.map_err(|e| e.to_string())?
            && let Some(result) = stored.result
        {
            return Ok(RoundTrip {
                command_id,
                status: serde_json::to_value(result.result.status)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
                elapsed: submitted_at.elapsed(),
                output: result.result.output,
            });
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("no result for {command_id} within {ROUND_TRIP_DEADLINE:?}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

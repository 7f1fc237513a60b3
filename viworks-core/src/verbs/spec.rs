//! The verb registry: for every verb an agent can run, its risk, its default and maximum
//! timeouts, a one-line summary and a documented example, together with the function that
//! parses its arguments. Adding a verb means adding one entry here and one variant to
//! [`Args`].

use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value};

use super::{Args, ArgsError, docker, exec, scripts, system};

/// How much a verb can change on the agent's machine; the host maps API roles onto it
/// (a viewer may run `Read` verbs only, for instance).
///
/// Ordered from least to most dangerous, so `risk <= Risk::Change` reads as "at most
/// changes containers or services". Deliberately exhaustive: a new level is a decision every
/// role mapping must make, and the compiler should point at each one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Risk {
    /// Observes only: nothing on the machine changes.
    Read,
    /// Changes containers or services.
    Change,
    /// Creates or deletes user accounts, or runs programs.
    Privileged,
}

impl Risk {
    /// The risk as a stable lowercase word: `read`, `change` or `privileged`.
    pub fn as_str(self) -> &'static str {
        match self {
            Risk::Read => "read",
            Risk::Change => "change",
            Risk::Privileged => "privileged",
        }
    }
}

/// One verb's definition.
///
/// Only the entries of [`REGISTRY`] exist; the type cannot be built outside this module, so a
/// `&VerbSpec` always names a real verb.
#[derive(Clone, Copy, Debug)]
pub struct VerbSpec {
    /// The verb's name on the wire, such as `docker.ps`.
    pub name: &'static str,
    /// How much the verb can change on the agent's machine.
    pub risk: Risk,
    /// The timeout used when the command does not ask for one.
    pub default_timeout: Duration,
    /// The longest timeout a command may ask for.
    pub max_timeout: Duration,
    /// What the verb does, in one line, for API documentation and the CLI.
    pub summary: &'static str,
    /// A realistic example of the verb's arguments, as JSON text; it always parses.
    pub example: &'static str,
    /// Parses arguments already known to be a JSON object.
    parser: fn(&Value) -> Result<Args, ArgsError>,
}

impl VerbSpec {
    /// Parses and checks a command's JSON arguments for this verb, as [`super::parse`] does.
    ///
    /// `args` must be a JSON object, or `null` (read as `{}`).
    pub fn parse(&self, args: &Value) -> Result<Args, ArgsError> {
        match args {
            Value::Object(_) => (self.parser)(args),
            Value::Null => (self.parser)(&Value::Object(Map::new())),
            _ => Err(ArgsError::NotAnObject),
        }
    }
}

const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

pub(super) const GET_SYSTEM_HEALTH: VerbSpec = VerbSpec {
    name: "get_system_health",
    risk: Risk::Read,
    default_timeout: secs(10),
    max_timeout: secs(60),
    summary: "Report CPU, memory, disk and uptime of the agent's machine.",
    example: "{}",
    parser: system::parse_get_system_health,
};

pub(super) const DOCKER_PS: VerbSpec = VerbSpec {
    name: "docker.ps",
    risk: Risk::Read,
    default_timeout: secs(15),
    max_timeout: secs(60),
    summary: "List containers; `all` includes stopped ones.",
    example: r#"{"all": true}"#,
    parser: docker::parse_ps,
};

pub(super) const DOCKER_INSPECT: VerbSpec = VerbSpec {
    name: "docker.inspect",
    risk: Risk::Read,
    default_timeout: secs(15),
    max_timeout: secs(60),
    summary: "Show one container's configuration and state.",
    example: r#"{"container": "web"}"#,
    parser: docker::parse_inspect,
};

pub(super) const DOCKER_LOGS: VerbSpec = VerbSpec {
    name: "docker.logs",
    risk: Risk::Read,
    default_timeout: secs(30),
    max_timeout: secs(120),
    summary: "Return the last `tail` lines (default 200) of one container's output.",
    example: r#"{"container": "web", "tail": 500, "timestamps": true}"#,
    parser: docker::parse_logs,
};

pub(super) const DOCKER_STATS: VerbSpec = VerbSpec {
    name: "docker.stats",
    risk: Risk::Read,
    default_timeout: secs(15),
    max_timeout: secs(60),
    summary: "Take one sample of one container's CPU, memory, network and block I/O.",
    example: r#"{"container": "3f4e8a9b2c1d"}"#,
    parser: docker::parse_stats,
};

pub(super) const DOCKER_START: VerbSpec = VerbSpec {
    name: "docker.start",
    risk: Risk::Change,
    default_timeout: secs(30),
    max_timeout: secs(120),
    summary: "Start a stopped container.",
    example: r#"{"container": "web"}"#,
    parser: docker::parse_start,
};

pub(super) const DOCKER_STOP: VerbSpec = VerbSpec {
    name: "docker.stop",
    risk: Risk::Change,
    default_timeout: secs(60),
    max_timeout: secs(600),
    summary: "Stop a container: SIGTERM, then SIGKILL after `timeout_secs` (default 10).",
    example: r#"{"container": "web", "timeout_secs": 30}"#,
    parser: docker::parse_stop,
};

pub(super) const DOCKER_RESTART: VerbSpec = VerbSpec {
    name: "docker.restart",
    risk: Risk::Change,
    default_timeout: secs(60),
    max_timeout: secs(600),
    summary: "Stop a container as `docker.stop` does, then start it again.",
    example: r#"{"container": "web", "timeout_secs": 30}"#,
    parser: docker::parse_restart,
};

pub(super) const DOCKER_RM: VerbSpec = VerbSpec {
    name: "docker.rm",
    risk: Risk::Change,
    default_timeout: secs(30),
    max_timeout: secs(120),
    summary: "Remove a container; `force` removes it even while it runs.",
    example: r#"{"container": "old-web", "force": false}"#,
    parser: docker::parse_rm,
};

pub(super) const DOCKER_PULL: VerbSpec = VerbSpec {
    name: "docker.pull",
    risk: Risk::Change,
    default_timeout: secs(300),
    max_timeout: secs(1800),
    summary: "Pull an image from its registry.",
    example: r#"{"image": "docker.io/library/nginx:1.27"}"#,
    parser: docker::parse_pull,
};

pub(super) const DOCKER_RUN: VerbSpec = VerbSpec {
    name: "docker.run",
    risk: Risk::Change,
    default_timeout: secs(120),
    max_timeout: secs(900),
    summary: "Create and start a container from an image, with environment, ports, limits and restart policy.",
    example: r#"{
        "image": "docker.io/library/nginx:1.27",
        "name": "web",
        "env": {"NGINX_HOST": "example.com", "NGINX_PORT": "80"},
        "ports": [
            {"host": 8080, "container": 80},
            {"host": 8443, "container": 443, "protocol": "tcp", "host_ip": "127.0.0.1"}
        ],
        "memory_mb": 512,
        "cpus": 1.5,
        "restart": "unless-stopped",
        "command": ["nginx", "-g", "daemon off;"]
    }"#,
    parser: docker::parse_run,
};

pub(super) const ADD_USER: VerbSpec = VerbSpec {
    name: "add_user",
    risk: Risk::Privileged,
    default_timeout: secs(30),
    max_timeout: secs(120),
    summary: "Create a local user account, optionally with a full name and an SSH public key.",
    example: r#"{
        "username": "alice",
        "full_name": "Alice Liddell",
        "ssh_public_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIK8JcrDKeAkx6KdzqThsGnO0QovPlA//Vj6M0JzqTXDd alice"
    }"#,
    parser: scripts::parse_add_user,
};

pub(super) const DELETE_USER: VerbSpec = VerbSpec {
    name: "delete_user",
    risk: Risk::Privileged,
    default_timeout: secs(60),
    max_timeout: secs(300),
    summary: "Delete a local user account; `remove_home` deletes its home directory too.",
    example: r#"{"username": "alice", "remove_home": true}"#,
    parser: scripts::parse_delete_user,
};

pub(super) const ADD_VPN_USER: VerbSpec = VerbSpec {
    name: "add_vpn_user",
    risk: Risk::Privileged,
    default_timeout: secs(30),
    max_timeout: secs(120),
    summary: "Create a VPN user, optionally with a named profile.",
    example: r#"{"username": "alice", "profile": "staff"}"#,
    parser: scripts::parse_add_vpn_user,
};

pub(super) const DELETE_VPN_USER: VerbSpec = VerbSpec {
    name: "delete_vpn_user",
    risk: Risk::Privileged,
    default_timeout: secs(30),
    max_timeout: secs(120),
    summary: "Delete a VPN user.",
    example: r#"{"username": "alice"}"#,
    parser: scripts::parse_delete_vpn_user,
};

pub(super) const EXEC: VerbSpec = VerbSpec {
    name: "exec",
    risk: Risk::Privileged,
    default_timeout: secs(60),
    max_timeout: secs(3600),
    summary: "Run a program by absolute path with an argv, if the agent's allow-list contains the path.",
    example: r#"{"path": "/usr/bin/systemctl", "args": ["restart", "nginx.service"]}"#,
    parser: exec::parse_exec,
};

/// Every verb an agent can be asked to run.
pub static REGISTRY: &[VerbSpec] = &[
    GET_SYSTEM_HEALTH,
    DOCKER_PS,
    DOCKER_INSPECT,
    DOCKER_LOGS,
    DOCKER_STATS,
    DOCKER_START,
    DOCKER_STOP,
    DOCKER_RESTART,
    DOCKER_RM,
    DOCKER_PULL,
    DOCKER_RUN,
    ADD_USER,
    DELETE_USER,
    ADD_VPN_USER,
    DELETE_VPN_USER,
    EXEC,
];

/// The registered verb called `name`, or `None`. Cost: a scan of the sixteen entries.
pub fn spec(name: &str) -> Option<&'static VerbSpec> {
    REGISTRY.iter().find(|spec| spec.name == name)
}

/// The timeout a command for `spec` runs with: the verb's default when none is requested,
/// otherwise the requested one.
///
/// Fails with [`ArgsError::TimeoutZero`] for a zero timeout and [`ArgsError::TimeoutTooLong`]
/// above the verb's maximum; nothing is silently clamped, so the caller learns the limit.
/// [`Args::timeout`] adds the checks that depend on the arguments.
pub fn effective_timeout(spec: &VerbSpec, requested: Option<Duration>) -> Result<Duration, ArgsError> {
    match requested {
        None => Ok(spec.default_timeout),
        Some(Duration::ZERO) => Err(ArgsError::TimeoutZero),
        Some(requested) if requested > spec.max_timeout => {
            Err(ArgsError::TimeoutTooLong { requested, max: spec.max_timeout })
        }
        Some(requested) => Ok(requested),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn risks_are_ordered_and_named() {
        assert!(Risk::Read < Risk::Change && Risk::Change < Risk::Privileged);
        assert_eq!(serde_json::to_value(Risk::Privileged).ok(), Some(Value::from("privileged")));
        for risk in [Risk::Read, Risk::Change, Risk::Privileged] {
            assert_eq!(serde_json::to_value(risk).ok(), Some(Value::from(risk.as_str())));
        }
    }

    #[test]
    fn privileged_verbs_are_exactly_the_user_scripts_and_exec() {
        let privileged: Vec<_> = REGISTRY.iter().filter(|s| s.risk == Risk::Privileged).map(|s| s.name).collect();
        assert_eq!(privileged, ["add_user", "delete_user", "add_vpn_user", "delete_vpn_user", "exec"]);
        let read: Vec<_> = REGISTRY.iter().filter(|s| s.risk == Risk::Read).map(|s| s.name).collect();
        assert_eq!(read, ["get_system_health", "docker.ps", "docker.inspect", "docker.logs", "docker.stats"]);
    }

    #[test]
    fn stop_timeouts_cover_the_longest_grace_period() {
        for spec in [DOCKER_STOP, DOCKER_RESTART] {
            assert!(spec.max_timeout >= docker::max_stop_timeout(), "{}", spec.name);
            assert!(spec.default_timeout >= docker::default_stop_timeout(), "{}", spec.name);
        }
    }
}

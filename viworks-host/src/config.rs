//! The host's configuration: a TOML file, overridden by `VIW_HOST_*` environment variables,
//! overridden by command-line flags, then validated fail-closed with every problem reported
//! at once.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;
use viworks_core::auth::SkewWindow;
use viworks_core::flow::RetryPolicy;
use viworks_core::session::{DispatchConfig, HostConfig, Timers};

use crate::control::{ClusterConfig, ControlConfig};
use crate::store::postgres::PostgresOptions;

/// One problem with the configuration, naming the key and how to fix it.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[error("{key}: {problem}")]
pub struct ConfigError {
    /// The offending key, as written in the file (`api.addr`) or the environment.
    pub key: String,
    /// What is wrong and how to fix it.
    pub problem: String,
}

fn problem(key: &str, text: impl Into<String>) -> ConfigError {
    ConfigError { key: key.to_owned(), problem: text.into() }
}

/// Where the store lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreUrl {
    /// An SQLite database file.
    Sqlite(PathBuf),
    /// A Postgres connection string.
    Postgres(String),
}

impl StoreUrl {
    /// Parses `sqlite://PATH` or `postgres://…`.
    pub fn parse(url: &str) -> Result<StoreUrl, String> {
        if let Some(path) = url.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err("sqlite:// needs a file path, as in sqlite:///var/lib/viworks/viworks.db".into());
            }
            Ok(StoreUrl::Sqlite(PathBuf::from(path)))
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(StoreUrl::Postgres(url.to_owned()))
        } else {
            Err(format!("{url:?} is neither sqlite://PATH nor postgres://…"))
        }
    }
}

/// The configuration file's shape; every field optional, defaults applied in [`FileConfig::resolve`].
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Directory holding the PKI, the master key and the default SQLite database.
    pub data_dir: Option<PathBuf>,
    /// The REST API listener.
    #[serde(default)]
    pub api: ApiSection,
    /// The agent listener.
    #[serde(default)]
    pub agents: AgentsSection,
    /// The store.
    #[serde(default)]
    pub store: StoreSection,
    /// Session timers and admission limits.
    #[serde(default)]
    pub session: SessionSection,
    /// Command queues and retries.
    #[serde(default)]
    pub dispatch: DispatchSection,
    /// Instances sharing the store.
    #[serde(default)]
    pub cluster: ClusterSection,
    /// API rate limits.
    #[serde(default)]
    pub rate_limits: RateLimitSection,
    /// Logging.
    #[serde(default)]
    pub log: LogSection,
}

/// `[api]`
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSection {
    /// Listen address, default `127.0.0.1:8080`.
    pub addr: Option<String>,
    /// Serve HTTPS with the host certificate instead of HTTP.
    pub tls: Option<bool>,
}

/// `[agents]`
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentsSection {
    /// Listen address, default `0.0.0.0:8443`.
    pub addr: Option<String>,
    /// The URL agents dial, written into enrollment bundles; default derived from `addr`.
    pub public_url: Option<String>,
}

/// `[store]`
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    /// `sqlite://PATH` (default `sqlite://<data_dir>/viworks.db`) or `postgres://…`.
    pub url: Option<String>,
    /// Postgres: connections in the pool (1–1000, default 16).
    pub pool_size: Option<usize>,
    /// Postgres: seconds to open one connection (1–300, default 5).
    pub connect_timeout_secs: Option<u64>,
    /// Postgres: seconds a statement may run before the server cancels it (1–3600, default 30).
    pub statement_timeout_secs: Option<u64>,
}

/// `[cluster]`: how instances sharing a Postgres store keep track of each other.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// Seconds an instance's hold on its agents outlives its last heartbeat (3–600, default
    /// 15): after a crash its agents are admitted elsewhere that long after it stopped.
    pub lease_secs: Option<u64>,
    /// Seconds between sweeps of the store (1–600, default 5, at most the lease).
    pub sweep_secs: Option<u64>,
    /// The name this instance reports (default: the machine's host name and agent address).
    pub name: Option<String>,
}

/// `[session]`
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionSection {
    /// Heartbeat interval, seconds (1–300, default 15).
    pub heartbeat_secs: Option<u64>,
    /// Liveness timeout, seconds (at least twice the heartbeat, default 45).
    pub liveness_secs: Option<u64>,
    /// Clock-skew window for HELLOs, seconds (5–3600, default 60).
    pub skew_secs: Option<u64>,
    /// Live sessions admitted at once (default 65,536).
    pub max_sessions: Option<usize>,
    /// The largest concurrency an agent may advertise (1–4096, default 256).
    pub max_concurrency: Option<u32>,
}

/// `[dispatch]`
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DispatchSection {
    /// Unfinished commands held at once (default 1,000,000).
    pub max_commands: Option<usize>,
    /// Commands waiting for one agent (default 10,000).
    pub per_agent_queue: Option<usize>,
    /// How long a command waits for its agent, seconds (default 86,400).
    pub queue_ttl_secs: Option<u64>,
    /// How long past its timeout an acknowledged command waits for a result, seconds
    /// (default 3,600).
    pub result_grace_secs: Option<u64>,
    /// First retry delay ceiling, milliseconds (default 1,000).
    pub retry_base_ms: Option<u64>,
    /// Largest retry delay, seconds (default 60).
    pub retry_cap_secs: Option<u64>,
    /// Sends before a never-acknowledged command is dead-lettered (1–100, default 8).
    pub retry_max_attempts: Option<u32>,
}

/// `[rate_limits]`
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSection {
    /// Reads per minute per token (default 1,200).
    pub reads_per_minute: Option<u32>,
    /// Writes per minute per token (default 120).
    pub writes_per_minute: Option<u32>,
    /// Requests per minute per client IP (default 2,400).
    pub per_ip_per_minute: Option<u32>,
}

/// `[log]`
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    /// `text` (default) or `json`.
    pub format: Option<String>,
    /// A tracing filter such as `info` or `viworks_host=debug` (default `info`).
    pub level: Option<String>,
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// API rate limits, per minute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimits {
    /// Reads per token.
    pub reads_per_minute: u32,
    /// Writes per token.
    pub writes_per_minute: u32,
    /// Requests per client IP.
    pub per_ip_per_minute: u32,
}

/// A validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// PKI, master key, default database.
    pub data_dir: PathBuf,
    /// REST API listener.
    pub api_addr: SocketAddr,
    /// Serve the API over HTTPS.
    pub api_tls: bool,
    /// Agent listener.
    pub agent_addr: SocketAddr,
    /// The URL written into enrollment bundles.
    pub public_url: String,
    /// The store.
    pub store: StoreUrl,
    /// The Postgres connection pool (unused on SQLite).
    pub postgres: PostgresOptions,
    /// The name this instance reports to the others.
    pub instance_name: String,
    /// Sessions, dispatch and the cluster timers.
    pub control: ControlConfig,
    /// API rate limits.
    pub rate_limits: RateLimits,
    /// Log format.
    pub log_format: LogFormat,
    /// Log filter.
    pub log_level: String,
}

/// Command-line overrides, applied last.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `--data-dir`
    pub data_dir: Option<PathBuf>,
    /// `--api-addr`
    pub api_addr: Option<String>,
    /// `--agent-addr`
    pub agent_addr: Option<String>,
    /// `--store`
    pub store: Option<String>,
}

impl FileConfig {
    /// Reads a TOML file. A missing or unparseable file is a configuration error.
    pub fn load(path: &Path) -> Result<FileConfig, Vec<ConfigError>> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| vec![problem("config", format!("cannot read {}: {e}", path.display()))])?;
        FileConfig::parse(&text).map_err(|e| vec![problem("config", format!("{}: {e}", path.display()))])
    }

    /// Parses TOML text.
    pub fn parse(text: &str) -> Result<FileConfig, toml::de::Error> {
        toml::from_str(text)
    }

    /// Applies `VIW_HOST_*` variables from `env` (name, value) over the file's values.
    pub fn apply_env(&mut self, env: impl IntoIterator<Item = (String, String)>) -> Vec<ConfigError> {
        let mut errors = Vec::new();
        for (name, value) in env {
            let Some(key) = name.strip_prefix("VIW_HOST_") else { continue };
            let number = |errors: &mut Vec<ConfigError>| match value.parse::<u64>() {
                Ok(n) => Some(n),
                Err(_) => {
                    errors.push(problem(&name, format!("{value:?} is not a whole number")));
                    None
                }
            };
            match key {
                "DATA_DIR" => self.data_dir = Some(PathBuf::from(&value)),
                "API_ADDR" => self.api.addr = Some(value.clone()),
                "API_TLS" => self.api.tls = Some(matches!(value.as_str(), "1" | "true" | "yes")),
                "AGENT_ADDR" => self.agents.addr = Some(value.clone()),
                "PUBLIC_URL" => self.agents.public_url = Some(value.clone()),
                "STORE_URL" => self.store.url = Some(value.clone()),
                "LOG_FORMAT" => self.log.format = Some(value.clone()),
                "LOG_LEVEL" => self.log.level = Some(value.clone()),
                "HEARTBEAT_SECS" => self.session.heartbeat_secs = number(&mut errors),
                "LIVENESS_SECS" => self.session.liveness_secs = number(&mut errors),
                "MAX_SESSIONS" => self.session.max_sessions = number(&mut errors).map(|n| n as usize),
                "STORE_POOL_SIZE" => self.store.pool_size = number(&mut errors).map(|n| n as usize),
                "LEASE_SECS" => self.cluster.lease_secs = number(&mut errors),
                "INSTANCE_NAME" => self.cluster.name = Some(value.clone()),
                _ => errors.push(problem(&name, "unknown VIW_HOST_ variable")),
            }
        }
        errors
    }

    /// Applies defaults and overrides and validates everything, reporting every problem.
    pub fn resolve(self, overrides: &Overrides) -> Result<Config, Vec<ConfigError>> {
        let mut errors = Vec::new();
        let data_dir = overrides.data_dir.clone().or(self.data_dir).unwrap_or_else(|| PathBuf::from("viworks-data"));
        let addr = |key: &str, value: Option<&String>, default: &str, errors: &mut Vec<ConfigError>| {
            let text = value.map(String::as_str).unwrap_or(default);
            text.parse::<SocketAddr>().unwrap_or_else(|_| {
                errors
                    .push(problem(key, format!("{text:?} is not HOST:PORT with a numeric host, as in 127.0.0.1:8080")));
                SocketAddr::from(([127, 0, 0, 1], 0))
            })
        };
        let api_addr =
            addr("api.addr", overrides.api_addr.as_ref().or(self.api.addr.as_ref()), "127.0.0.1:8080", &mut errors);
        let agent_addr = addr(
            "agents.addr",
            overrides.agent_addr.as_ref().or(self.agents.addr.as_ref()),
            "0.0.0.0:8443",
            &mut errors,
        );
        let public_url = self.agents.public_url.unwrap_or_else(|| {
            let host =
                if agent_addr.ip().is_unspecified() { "localhost".to_owned() } else { agent_addr.ip().to_string() };
            format!("wss://{host}:{}/ws/agent", agent_addr.port())
        });
        if !public_url.starts_with("wss://") {
            errors.push(problem("agents.public_url", "must start with wss:// (agents only dial TLS)"));
        }
        let store_text = overrides.store.clone().or(self.store.url);
        let store = match store_text {
            None => StoreUrl::Sqlite(data_dir.join("viworks.db")),
            Some(url) => StoreUrl::parse(&url).unwrap_or_else(|e| {
                errors.push(problem("store.url", e));
                StoreUrl::Sqlite(data_dir.join("viworks.db"))
            }),
        };
        let s = &self.session;
        let heartbeat = s.heartbeat_secs.unwrap_or(15);
        let liveness = s.liveness_secs.unwrap_or(heartbeat.saturating_mul(3));
        let skew = s.skew_secs.unwrap_or(60);
        let max_concurrency = s.max_concurrency.unwrap_or(256);
        let max_sessions = s.max_sessions.unwrap_or(65_536);
        range(&mut errors, "session.heartbeat_secs", heartbeat, 1, 300);
        if liveness < heartbeat.saturating_mul(2) {
            errors.push(problem(
                "session.liveness_secs",
                format!("must be at least twice the heartbeat ({})", heartbeat.saturating_mul(2)),
            ));
        }
        range(&mut errors, "session.skew_secs", skew, 5, 3600);
        range(&mut errors, "session.max_concurrency", u64::from(max_concurrency), 1, 4096);
        range(&mut errors, "session.max_sessions", max_sessions as u64, 1, 1_000_000);
        let pool_size = self.store.pool_size.unwrap_or(16);
        let connect_timeout = self.store.connect_timeout_secs.unwrap_or(5);
        let statement_timeout = self.store.statement_timeout_secs.unwrap_or(30);
        range(&mut errors, "store.pool_size", pool_size as u64, 1, 1000);
        range(&mut errors, "store.connect_timeout_secs", connect_timeout, 1, 300);
        range(&mut errors, "store.statement_timeout_secs", statement_timeout, 1, 3600);
        let postgres = PostgresOptions {
            pool_size,
            connect_timeout: Duration::from_secs(connect_timeout.min(300)),
            statement_timeout: Some(Duration::from_secs(statement_timeout.min(3600))),
        };
        let lease = self.cluster.lease_secs.unwrap_or(15);
        let sweep = self.cluster.sweep_secs.unwrap_or(5.min(lease));
        range(&mut errors, "cluster.lease_secs", lease, 3, 600);
        range(&mut errors, "cluster.sweep_secs", sweep, 1, lease.clamp(1, 600));
        let cluster = ClusterConfig {
            lease: Duration::from_secs(lease.min(600)),
            sweep: Duration::from_secs(sweep.clamp(1, 600)),
        };
        let instance_name = self.cluster.name.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            let host = host.trim();
            format!("{host} {agent_addr}")
        });
        let d = &self.dispatch;
        let max_commands = d.max_commands.unwrap_or(1_000_000);
        let per_agent_queue = d.per_agent_queue.unwrap_or(10_000);
        let max_attempts = d.retry_max_attempts.unwrap_or(8);
        range(&mut errors, "dispatch.max_commands", max_commands as u64, 1, 100_000_000);
        range(&mut errors, "dispatch.per_agent_queue", per_agent_queue as u64, 1, max_commands as u64);
        range(&mut errors, "dispatch.retry_max_attempts", u64::from(max_attempts), 1, 100);
        let r = &self.rate_limits;
        let rate_limits = RateLimits {
            reads_per_minute: r.reads_per_minute.unwrap_or(1_200),
            writes_per_minute: r.writes_per_minute.unwrap_or(120),
            per_ip_per_minute: r.per_ip_per_minute.unwrap_or(2_400),
        };
        for (key, value) in [
            ("rate_limits.reads_per_minute", rate_limits.reads_per_minute),
            ("rate_limits.writes_per_minute", rate_limits.writes_per_minute),
            ("rate_limits.per_ip_per_minute", rate_limits.per_ip_per_minute),
        ] {
            range(&mut errors, key, u64::from(value), 1, 1_000_000);
        }
        let log_format = match self.log.format.as_deref().unwrap_or("text") {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                errors.push(problem("log.format", format!("{other:?} is neither \"text\" nor \"json\"")));
                LogFormat::Text
            }
        };
        let log_level = self.log.level.unwrap_or_else(|| "info".to_owned());
        if tracing_subscriber::EnvFilter::try_new(&log_level).is_err() {
            errors.push(problem("log.level", format!("{log_level:?} is not a tracing filter such as \"info\"")));
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let host = HostConfig {
            timers: Timers {
                heartbeat_interval: Duration::from_secs(heartbeat),
                liveness_timeout: Duration::from_secs(liveness),
            },
            skew_window: SkewWindow::new(Duration::from_secs(skew)),
            max_sessions,
            max_concurrency,
            nonce_capacity: max_sessions.saturating_mul(2).clamp(1024, 1 << 22),
            ..HostConfig::default()
        };
        let dispatch = DispatchConfig {
            retry: RetryPolicy {
                base: Duration::from_millis(d.retry_base_ms.unwrap_or(1_000)),
                cap: Duration::from_secs(d.retry_cap_secs.unwrap_or(60)),
                max_attempts,
            },
            max_commands,
            per_agent_queue,
            queue_ttl: Duration::from_secs(d.queue_ttl_secs.unwrap_or(86_400)),
            result_grace: Duration::from_secs(d.result_grace_secs.unwrap_or(3_600)),
        };
        Ok(Config {
            data_dir,
            api_addr,
            api_tls: self.api.tls.unwrap_or(false),
            agent_addr,
            public_url,
            store,
            postgres,
            instance_name,
            control: ControlConfig { host, dispatch, cluster },
            rate_limits,
            log_format,
            log_level,
        })
    }
}

fn range(errors: &mut Vec<ConfigError>, key: &str, value: u64, min: u64, max: u64) {
    if !(min..=max).contains(&value) {
        errors.push(problem(key, format!("{value} is outside {min}..={max}")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let config = FileConfig::default().resolve(&Overrides::default()).expect("valid");
        assert_eq!(config.api_addr, "127.0.0.1:8080".parse().expect("addr"));
        assert_eq!(config.store, StoreUrl::Sqlite(PathBuf::from("viworks-data/viworks.db")));
        assert_eq!(config.public_url, "wss://localhost:8443/ws/agent");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let file = FileConfig::parse(
            r#"
            [api]
            addr = "localhost"
            [store]
            url = "mysql://x"
            [session]
            heartbeat_secs = 0
            liveness_secs = 1
            [log]
            format = "xml"
            "#,
        )
        .expect("parses");
        let errors = file.resolve(&Overrides::default()).expect_err("invalid");
        let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, vec!["api.addr", "store.url", "session.heartbeat_secs", "log.format"]);
    }

    /// Found by the `host_config` fuzz target: the default liveness (three heartbeats)
    /// overflowed on a huge heartbeat instead of reporting it out of range.
    #[test]
    fn a_huge_heartbeat_is_out_of_range_not_an_overflow() {
        let file = FileConfig::parse("[session]\nheartbeat_secs = 9223372036854775807\n").expect("parses");
        let errors = file.resolve(&Overrides::default()).expect_err("invalid");
        assert!(errors.iter().any(|e| e.key == "session.heartbeat_secs"), "{errors:?}");
        let file = FileConfig::parse("[session]\nmax_sessions = 18446744073709551615\n");
        if let Ok(file) = file {
            assert!(file.resolve(&Overrides::default()).is_err());
        }
    }

    #[test]
    fn unknown_keys_and_variables_are_refused() {
        assert!(FileConfig::parse("[api]\nport = 1\n").is_err());
        let mut file = FileConfig::default();
        let errors =
            file.apply_env([("VIW_HOST_NOPE".to_owned(), "1".to_owned()), ("PATH".to_owned(), "/".to_owned())]);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].key, "VIW_HOST_NOPE");
    }

    #[test]
    fn flags_override_environment_which_overrides_the_file() {
        let mut file = FileConfig::parse("[api]\naddr = \"127.0.0.1:1\"\n").expect("parses");
        file.apply_env([("VIW_HOST_API_ADDR".to_owned(), "127.0.0.1:2".to_owned())]);
        let config = file.clone().resolve(&Overrides::default()).expect("valid");
        assert_eq!(config.api_addr.port(), 2);
        let flags = Overrides { api_addr: Some("127.0.0.1:3".into()), ..Overrides::default() };
        assert_eq!(file.resolve(&flags).expect("valid").api_addr.port(), 3);
    }
}

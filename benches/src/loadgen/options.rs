//! The load generator's command line. The defaults are the quick profile (200 agents, about
//! two seconds per phase), a smoke test that finishes in well under a minute; the full
//! measurement passes `--agents 10000` and longer phases (see `docs/performance.md`).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use viworks_host::config::StoreUrl;

use super::store::StoreKind;

/// `viworks-loadgen`: opens real agent connections to a `viworks-host` child process and
/// measures connections, memory, broadcast, round trips, throughput and telemetry, beside a
/// bare TLS WebSocket echo baseline.
#[derive(Debug, Parser)]
#[command(name = "viworks-loadgen", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// Internal subcommands (the echo server child).
    #[command(subcommand)]
    pub command: Option<Internal>,
    /// The run.
    #[command(flatten)]
    pub options: Options,
}

/// Subcommands the load generator runs itself as a child process.
#[derive(Debug, Subcommand)]
pub enum Internal {
    /// The baseline's bare TLS WebSocket echo server (a child of the load generator).
    #[command(hide = true)]
    EchoServer(EchoServerArgs),
}

/// Arguments of the echo server child.
#[derive(Clone, Debug, Args)]
pub struct EchoServerArgs {
    /// The host data directory whose certificates the server uses.
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Where to listen.
    #[arg(long, value_name = "HOST:PORT")]
    pub addr: std::net::SocketAddr,
    /// The SQLite database (created if missing) that journaled messages are written to
    /// before they are echoed.
    #[arg(long, value_name = "FILE")]
    pub journal: PathBuf,
}

/// What to measure and how hard.
#[derive(Clone, Debug, Args)]
pub struct Options {
    /// Agent connections to open and hold.
    #[arg(long, default_value_t = 200)]
    pub agents: usize,
    /// The `viworks-host` binary; default: the one next to this executable.
    #[arg(long, value_name = "FILE")]
    pub host_bin: Option<PathBuf>,
    /// The binary that serves the echo baseline (`<bin> echo-server …`); default: this
    /// executable.
    #[arg(long, value_name = "FILE")]
    pub echo_bin: Option<PathBuf>,
    /// The host's data directory (must not exist yet); default: a temporary directory
    /// removed at the end.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Deadline for the whole run, seconds; every phase stops at it.
    #[arg(long, default_value_t = 300)]
    pub max_seconds: u64,
    /// Connections being set up at once.
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,
    /// Connections per loopback source address (127.0.0.2, 127.0.0.3, …).
    #[arg(long, default_value_t = 1000)]
    pub conns_per_source: usize,
    /// Commands each synthetic agent advertises it runs at once.
    #[arg(long, default_value_t = 32)]
    pub agent_concurrency: u32,
    /// Seconds to let the host settle before reading its memory.
    #[arg(long, default_value_t = 2.0)]
    pub settle_seconds: f64,
    /// Commands per second in the round-trip phase (one POST per command, open loop).
    #[arg(long, default_value_t = 1000)]
    pub rate: u32,
    /// Seconds the round-trip phase sends for.
    #[arg(long, default_value_t = 2.0)]
    pub rate_seconds: f64,
    /// HTTP requests to the API in flight at once.
    #[arg(long, default_value_t = 128)]
    pub http_connections: usize,
    /// Seconds the sustained-throughput phase runs for.
    #[arg(long, default_value_t = 2.0)]
    pub sustained_seconds: f64,
    /// Agents named per POST in the sustained-throughput phase.
    #[arg(long, default_value_t = 100)]
    pub sustained_batch: usize,
    /// Commands submitted and not yet stored, at most, in the sustained-throughput phase.
    #[arg(long, default_value_t = 4000)]
    pub sustained_outstanding: usize,
    /// Concurrent submitters in the sustained-throughput phase.
    #[arg(long, default_value_t = 16)]
    pub sustained_submitters: usize,
    /// Seconds the telemetry phase runs for.
    #[arg(long, default_value_t = 2.0)]
    pub telemetry_seconds: f64,
    /// Agents sending telemetry in the telemetry phase (each one batch in flight).
    #[arg(long, default_value_t = 256)]
    pub telemetry_agents: usize,
    /// Samples per telemetry batch.
    #[arg(long, default_value_t = 1000)]
    pub telemetry_batch: usize,
    /// Bytes of each echo message in the baseline (about a COMMAND's size).
    #[arg(long, default_value_t = 300)]
    pub echo_bytes: usize,
    /// Skip the echo baseline.
    #[arg(long)]
    pub skip_echo: bool,
    /// The host's log filter (its `[log] level`).
    #[arg(long, default_value = "info")]
    pub host_log_level: String,
    /// Also write the report as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// The stores to measure the host on, in order, each with a fresh host: `sqlite`,
    /// `postgres` (comma-separated). The targets are judged on the first.
    #[arg(long, value_name = "LIST", value_delimiter = ',', default_value = "sqlite")]
    pub stores: Vec<String>,
    /// An existing, empty Postgres database for the `postgres` store (`postgres://…`); default:
    /// a durable throwaway cluster from this machine's `initdb`/`pg_ctl`, removed at the end.
    #[arg(long, value_name = "URL")]
    pub postgres_url: Option<String>,
}

/// The most agents one run may ask for; beyond it the loopback and the fd tables are the
/// limit, not the host.
pub const MAX_AGENTS: usize = 200_000;

impl Options {
    /// Every problem with the options at once; each names the option.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        let mut count = |name: &str, value: usize, min: usize, max: usize| {
            if !(min..=max).contains(&value) {
                problems.push(format!("--{name} is {value}, it must be within {min}..={max}"));
            }
        };
        count("agents", self.agents, 1, MAX_AGENTS);
        count("connect-concurrency", self.connect_concurrency, 1, 100_000);
        count("conns-per-source", self.conns_per_source, 1, 20_000);
        count("agent-concurrency", self.agent_concurrency as usize, 1, 4096);
        count("rate", self.rate as usize, 1, 1_000_000);
        count("http-connections", self.http_connections, 1, 10_000);
        count("sustained-batch", self.sustained_batch, 1, 10_000);
        count("sustained-outstanding", self.sustained_outstanding, 1, 1_000_000);
        count("sustained-submitters", self.sustained_submitters, 1, 1024);
        count("telemetry-agents", self.telemetry_agents, 1, MAX_AGENTS);
        count("telemetry-batch", self.telemetry_batch, 1, 10_000);
        count("echo-bytes", self.echo_bytes, 16, 65_536);
        count("max-seconds", self.max_seconds as usize, 1, 86_400);
        for (name, value) in [
            ("settle-seconds", self.settle_seconds),
            ("rate-seconds", self.rate_seconds),
            ("sustained-seconds", self.sustained_seconds),
            ("telemetry-seconds", self.telemetry_seconds),
        ] {
            if !(value.is_finite() && (0.0..=3600.0).contains(&value)) {
                problems.push(format!("--{name} is {value}, it must be within 0..=3600 seconds"));
            }
        }
        if self.host_log_level.trim().is_empty() {
            problems.push("--host-log-level is empty".to_owned());
        }
        if self.stores.is_empty() {
            problems.push("--stores is empty; name sqlite, postgres or both".to_owned());
        }
        for (at, name) in self.stores.iter().enumerate() {
            match StoreKind::parse(name) {
                None => problems.push(format!("--stores names {name:?}; the stores are sqlite and postgres")),
                Some(kind) if self.stores[..at].iter().any(|n| StoreKind::parse(n) == Some(kind)) => {
                    problems.push(format!("--stores names {name} twice"));
                }
                Some(_) => {}
            }
        }
        if let Some(url) = &self.postgres_url {
            if !matches!(StoreUrl::parse(url), Ok(StoreUrl::Postgres(_))) {
                problems.push("--postgres-url is not a postgres:// or postgresql:// URL".to_owned());
            }
            if !self.store_kinds().contains(&StoreKind::Postgres) {
                problems.push("--postgres-url is given but --stores does not name postgres".to_owned());
            }
        }
        if problems.is_empty() { Ok(()) } else { Err(problems) }
    }

    /// The stores of `--stores` that are valid, in order, each once.
    pub fn store_kinds(&self) -> Vec<StoreKind> {
        let mut kinds = Vec::new();
        for kind in self.stores.iter().filter_map(|name| StoreKind::parse(name)) {
            if !kinds.contains(&kind) {
                kinds.push(kind);
            }
        }
        kinds
    }

    /// The overall deadline as a duration.
    pub fn max_duration(&self) -> Duration {
        Duration::from_secs(self.max_seconds)
    }
}

/// `seconds` as a duration; callers validated it is finite and in range.
pub(crate) fn seconds(seconds: f64) -> Duration {
    Duration::from_secs_f64(seconds.clamp(0.0, 86_400.0))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn options(args: &[&str]) -> Options {
        Cli::try_parse_from(std::iter::once("viworks-loadgen").chain(args.iter().copied())).expect("parses").options
    }

    #[test]
    fn the_default_is_sqlite_alone() {
        let options = options(&[]);
        assert_eq!(options.validate(), Ok(()));
        assert_eq!(options.store_kinds(), [StoreKind::Sqlite]);
    }

    #[test]
    fn both_stores_are_measured_in_the_order_given() {
        let options = options(&["--stores", "postgres, SQLite", "--postgres-url", "postgres://u:secret@db/x"]);
        assert_eq!(options.validate(), Ok(()));
        assert_eq!(options.store_kinds(), [StoreKind::Postgres, StoreKind::Sqlite]);
    }

    #[test]
    fn every_store_problem_is_reported_at_once_without_the_url() {
        let problems = options(&["--stores", "sqlite,mysql,sqlite", "--postgres-url", "mysql://u:secret@db/x"])
            .validate()
            .expect_err("invalid");
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(problems.iter().any(|p| p.contains("mysql") && p.contains("--stores")));
        assert!(problems.iter().any(|p| p.contains("twice")));
        assert!(problems.iter().any(|p| p.contains("not a postgres://")));
        assert!(problems.iter().any(|p| p.contains("does not name postgres")));
        assert!(problems.iter().all(|p| !p.contains("secret")), "no password in the messages: {problems:?}");
    }
}

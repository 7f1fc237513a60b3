//! `viworks-loadgen`, the end-to-end load generator: a real `viworks-host` child process (one
//! after the other per store, SQLite and Postgres), a fleet of synthetic agents speaking the
//! real protocol over real TLS WebSockets, and a bare TLS WebSocket echo baseline measured in
//! the same run. `docs/performance.md` describes the
//! method and records the figures.
//!
//! - [`options`]: the command line; [`cli`]: the binary's entry point.
//! - [`process`]: the host and echo server children; [`system`]: fd limits, `/proc`.
//! - [`fleet`]: certificates and enrollment; [`dial`] and [`agent`]: the synthetic agents.
//! - [`api`]: the REST client; [`phases`]: what is measured; [`echo`]: the baseline.
//! - [`store`]: the stores, and the throwaway Postgres cluster.
//! - [`probe`], [`stats`] and [`report`]: observations, percentiles, and the report.

pub mod agent;
pub mod api;
pub mod cli;
pub mod dial;
pub mod echo;
mod error;
pub mod fleet;
pub mod options;
pub mod pace;
pub mod phases;
pub mod probe;
pub mod process;
pub mod report;
pub mod stats;
pub mod store;
pub mod system;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;

pub use error::LoadgenError;
pub use options::Options;
pub use report::Report;
use report::{HostOutcome, HostRun, StoreRun};
use store::StoreKind;

use agent::{Context, Orders};
use api::Api;
use echo::EchoPlan;
use probe::Probe;
use process::HostAddrs;
use system::FD_MARGIN;

/// The whole run's deadline (`--max-seconds`), which every wait respects.
#[derive(Clone, Copy, Debug)]
pub struct Deadline {
    at: tokio::time::Instant,
    limit: Duration,
}

impl Deadline {
    /// `limit` from now.
    pub fn after(limit: Duration) -> Deadline {
        Deadline { at: tokio::time::Instant::now() + limit, limit }
    }

    /// When it passes.
    pub fn instant(&self) -> tokio::time::Instant {
        self.at
    }

    /// `span` from now, or the deadline if that is sooner.
    pub fn within(&self, span: Duration) -> tokio::time::Instant {
        (tokio::time::Instant::now() + span).min(self.at)
    }

    /// The error of `phase` running out of time, saying what was missing.
    pub fn expired(&self, phase: &'static str, detail: String) -> LoadgenError {
        LoadgenError::Deadline { phase, limit: self.limit, detail }
    }

    /// Runs `work` until it finishes or the deadline passes.
    pub async fn run<T>(
        &self,
        phase: &'static str,
        work: impl Future<Output = Result<T, LoadgenError>>,
    ) -> Result<T, LoadgenError> {
        match tokio::time::timeout_at(self.at, work).await {
            Ok(result) => result,
            Err(_) => Err(self.expired(phase, "the overall deadline (--max-seconds) passed".into())),
        }
    }
}

/// The host configuration the run uses: the API's rate limits out of the way (the load
/// generator is one client issuing thousands of requests a second), the chosen log level, and
/// on Postgres the pool written out ([`store::POSTGRES_POOL`], the host's default); everything
/// else is the host's default (on Postgres: one instance, its lease and sweep at their
/// defaults of 15 s and 5 s).
fn host_config(log_level: &str, store: StoreKind) -> String {
    let mut config = format!(
        "[rate_limits]\nreads_per_minute = 1000000\nwrites_per_minute = 1000000\nper_ip_per_minute = 1000000\n\n\
         [log]\nlevel = {}\n",
        toml_string(log_level)
    );
    if store == StoreKind::Postgres {
        config.push_str(&format!("\n[store]\npool_size = {}\n", store::POSTGRES_POOL));
    }
    config
}

fn toml_string(text: &str) -> String {
    let escaped: String = text
        .chars()
        .flat_map(|c| match c {
            '"' => vec!['\\', '"'],
            '\\' => vec!['\\', '\\'],
            c if c.is_control() => Vec::new(),
            c => vec![c],
        })
        .collect();
    format!("\"{escaped}\"")
}

/// Measures a fresh host on each store of `--stores` in turn, the same fleet on each, then the
/// echo baseline once, and returns the figures. Fails when the options are invalid, the PKI or
/// the fleet's certificates cannot be made, or Postgres is required (`CI=true`) and cannot be
/// started; a host that cannot be set up, or a phase that fails, is reported in the
/// [`Report`] and the run goes on.
pub async fn run(options: &Options) -> Result<Report, LoadgenError> {
    options.validate().map_err(LoadgenError::InvalidOptions)?;
    let deadline = Deadline::after(options.max_duration());
    let load_at_start = system::load_average();
    let needed = options.agents as u64 + options.http_connections as u64 + FD_MARGIN;
    let loadgen_files = system::raise_file_limit(needed)?;
    let host_bin = match &options.host_bin {
        Some(path) => path.clone(),
        None => process::default_host_bin()?,
    };
    let echo_bin = match &options.echo_bin {
        Some(path) => path.clone(),
        None => std::env::current_exe().map_err(LoadgenError::io("locate", "the current executable"))?,
    };
    let (data_dir, temp) = match &options.data_dir {
        Some(dir) => (dir.clone(), None),
        None => {
            let temp = tempfile::Builder::new()
                .prefix("viworks-loadgen-")
                .tempdir()
                .map_err(LoadgenError::io("create", std::env::temp_dir()))?;
            (temp.path().join("data"), Some(temp))
        }
    };
    // Postgres first: under CI=true a missing one ends the run before anything is measured.
    let postgres = if options.store_kinds().contains(&StoreKind::Postgres) {
        tracing::info!("preparing Postgres");
        let preparing = store::Postgres::prepare(options.postgres_url.as_deref());
        Some(deadline.run("starting Postgres", preparing).await?)
    } else {
        None
    };
    let setup = Setup { options, host_bin: &host_bin, data_dir: &data_dir, deadline };
    let measured = measure(&setup, &echo_bin, postgres.as_ref()).await;
    if let Some(postgres) = postgres {
        postgres.stop().await;
    }
    if let Some(temp) = temp {
        let _ = temp.close();
    }
    let (stores, echo) = measured?;
    Ok(Report {
        agents: options.agents,
        cores: std::thread::available_parallelism().map(|c| c.get()).unwrap_or(1),
        loadgen_files,
        stores,
        echo,
        load: (load_at_start, system::load_average()),
    })
}

/// What every host of a run shares.
#[derive(Clone, Copy)]
struct Setup<'a> {
    options: &'a Options,
    host_bin: &'a Path,
    /// The one PKI every host serves with, and the SQLite database.
    data_dir: &'a Path,
    deadline: Deadline,
}

/// Creates the data directory and the fleet's identities, measures a host on each store, then
/// the echo baseline.
async fn measure(
    setup: &Setup<'_>,
    echo_bin: &Path,
    postgres: Option<&store::Postgres>,
) -> Result<(Vec<StoreRun>, report::Outcome<echo::EchoFigures>), LoadgenError> {
    let Setup { options, host_bin, data_dir, deadline } = *setup;
    let sqlite = store::sqlite_url(data_dir);
    let mut targets = Vec::new();
    for kind in options.store_kinds() {
        let (settings, url) = match (kind, postgres) {
            (StoreKind::Sqlite, _) => (store::SQLITE_SETTINGS.to_owned(), Ok(sqlite.clone())),
            (StoreKind::Postgres, Some(postgres)) => {
                (postgres.settings().await, postgres.url().map(str::to_owned).map_err(str::to_owned))
            }
            (StoreKind::Postgres, None) => (String::new(), Err("Postgres was not prepared".to_owned())),
        };
        targets.push((kind, settings, url));
    }
    // `init` makes the PKI every host serves with, and the first store the host runs on with
    // its admin token; every later store gets its token from `token create`.
    let first = targets.iter().find_map(|(_, _, url)| url.as_ref().ok()).unwrap_or(&sqlite);
    tracing::info!(data_dir = %data_dir.display(), host = %host_bin.display(), "initialising the host");
    let token = deadline.run("viworks-host init", process::init_host(host_bin, data_dir, first)).await?;
    let mut token = Some(token);
    let n = options.agents;
    tracing::info!(agents = n, "issuing agent certificates");
    let issuing = {
        let dir = data_dir.to_path_buf();
        tokio::task::spawn_blocking(move || fleet::issue(&dir, n))
    };
    let identities = deadline
        .run("issuing certificates", async {
            issuing.await.map_err(|e| LoadgenError::Internal { what: "issuing certificates", reason: e.to_string() })?
        })
        .await?;
    let identities = Arc::new(identities);

    let mut stores = Vec::with_capacity(targets.len());
    for (kind, settings, url) in targets {
        let host = match url {
            Err(reason) => {
                tracing::warn!(store = %kind, %reason, "skipped");
                HostOutcome::Skipped(reason)
            }
            Ok(url) => {
                let store_pid = postgres.filter(|_| kind == StoreKind::Postgres).and_then(store::Postgres::server_pid);
                match measure_host(setup, &identities, (kind, &url, store_pid), token.take()).await {
                    Ok(host) => HostOutcome::Ran(Box::new(host)),
                    Err(error) => {
                        tracing::warn!(store = %kind, %error, "the host could not be measured");
                        HostOutcome::Failed(error.to_string())
                    }
                }
            }
        };
        stores.push(StoreRun { store: kind, settings, host });
    }

    let echo = if options.skip_echo {
        Err(report::SKIPPED.to_owned())
    } else {
        tracing::info!("echo baseline");
        let measured = deadline.run("the echo baseline", baseline(options, echo_bin, data_dir, &identities, deadline));
        measured.await.map_err(|e| e.to_string())
    };
    Ok((stores, echo))
}

/// Longest wait for the host to finish what a phase left behind.
const SETTLE_LIMIT: Duration = Duration::from_secs(10);

/// Waits until the host is idle after `phase` (at most [`SETTLE_LIMIT`], and not past the
/// deadline), so that the next phase is not measured against its predecessor's background
/// writes; the host's CPU meanwhile goes to `meter`'s "settle" lap, counted in no phase.
async fn settle_down(
    phase: &str,
    host: &process::Process,
    store_pid: Option<u32>,
    deadline: Deadline,
    meter: &mut system::CpuMeter,
) {
    let limit = SETTLE_LIMIT.min(deadline.instant().saturating_duration_since(tokio::time::Instant::now()));
    match system::quiet(host.pid(), store_pid, limit).await {
        Some(waited) => tracing::info!(phase, seconds = waited.as_secs_f64(), "the host settled"),
        None => tracing::warn!(phase, seconds = limit.as_secs_f64(), "the host was still busy; going on"),
    }
    meter.lap("settle");
}

/// One host on the store `kind` at `url` (whose server, when it runs here, is `store_pid`):
/// gets an admin token (unless `init` gave one), enrolls the fleet, starts the host, connects
/// the fleet, runs every phase, and stops the host. Fails when the host cannot be set up or
/// the fleet cannot connect; a later phase that fails is reported in the [`HostRun`].
async fn measure_host(
    setup: &Setup<'_>,
    identities: &Arc<Vec<fleet::Identity>>,
    (kind, url, store_pid): (StoreKind, &str, Option<u32>),
    token: Option<String>,
) -> Result<HostRun, LoadgenError> {
    let Setup { options, host_bin, data_dir, deadline } = *setup;
    let n = identities.len();
    let token = match token {
        Some(token) => token,
        None => deadline.run("viworks-host token create", process::create_token(host_bin, data_dir, url)).await?,
    };
    tracing::info!(store = %kind, agents = n, "enrolling agents");
    deadline.run("enrolling agents", fleet::enroll(url, identities)).await?;
    // The SQLite host's files keep the names they had before there were several stores.
    let suffix = match kind {
        StoreKind::Sqlite => String::new(),
        other => format!("-{other}"),
    };
    let config_path = data_dir.join(format!("loadgen-host{suffix}.toml"));
    std::fs::write(&config_path, host_config(&options.host_log_level, kind))
        .map_err(LoadgenError::io("write", &config_path))?;

    let [api, agents] = system::free_ports::<2>()?;
    let addrs = HostAddrs {
        api: (std::net::Ipv4Addr::LOCALHOST, api).into(),
        agents: (std::net::Ipv4Addr::LOCALHOST, agents).into(),
    };
    tracing::info!(store = %kind, api = %addrs.api, agents = %addrs.agents, "starting the host");
    let log = data_dir.join(format!("host{suffix}.log"));
    let mut host = deadline
        .run("starting the host", process::serve_host(host_bin, data_dir, &config_path, url, addrs, log))
        .await?;
    let host_files = host.file_limit()?;
    let host_needed = n as u64 + FD_MARGIN;
    if host_files.soft < host_needed {
        return Err(LoadgenError::FileLimit { whose: "the host's", needed: host_needed, limit: host_files.soft });
    }
    let settle = options::seconds(options.settle_seconds);
    tokio::time::sleep(settle).await;
    let idle = host.memory()?;
    let mut meter = system::CpuMeter::start(host.pid(), store_pid);
    let mut cpu = Vec::new();

    let probe = Arc::new(Probe::default());
    let (orders, orders_rx) = watch::channel(Orders::default());
    let context = Context {
        target: addrs.agents,
        url: format!("wss://{}:{}/ws/agent", dial::SERVER_NAME, addrs.agents.port()),
        clock: viworks_gateway::clock::Clock::start(),
        probe: Arc::clone(&probe),
        orders: orders_rx,
        concurrency: options.agent_concurrency,
        metric_keys: agent::metric_keys(options.telemetry_batch),
    };
    tracing::info!(agents = n, "connecting the fleet");
    let (mut fleet, connect) =
        phases::connect(identities, &context, options.connect_concurrency, options.conns_per_source, deadline).await?;
    tracing::info!(seconds = connect.wall.as_secs_f64(), "fleet connected");
    cpu.push(meter.lap("connect"));
    tokio::time::sleep(settle).await;
    host.check_alive()?;
    let connected = host.memory()?;
    let loadgen_rss = system::memory_of(std::process::id()).map(|m| m.rss).unwrap_or(0);

    let api = Arc::new(Api::new(addrs.api, token));
    let agents = Arc::new(std::mem::take(&mut fleet.agents));
    tracing::info!("broadcast");
    meter.lap("settle");
    let broadcast = phases::broadcast(&api, &probe, deadline).await.map_err(|e| e.to_string());
    cpu.push(meter.lap("broadcast"));
    settle_down("broadcast", &host, store_pid, deadline, &mut meter).await;
    tracing::info!(rate = options.rate, "round trips");
    let round_trip = phases::round_trip(
        &api,
        &probe,
        &agents,
        options.rate,
        options::seconds(options.rate_seconds),
        options.http_connections,
        deadline,
    )
    .await
    .map_err(|e| e.to_string());
    cpu.push(meter.lap("round trips"));
    settle_down("round trips", &host, store_pid, deadline, &mut meter).await;
    tracing::info!("sustained throughput");
    let sustained = phases::sustained(
        &api,
        &probe,
        &agents,
        options::seconds(options.sustained_seconds),
        options.sustained_batch,
        options.sustained_outstanding,
        options.sustained_submitters,
        deadline,
    )
    .await
    .map_err(|e| e.to_string());
    cpu.push(meter.lap("sustained"));
    settle_down("sustained", &host, store_pid, deadline, &mut meter).await;
    tracing::info!("telemetry");
    let telemetry = phases::telemetry(
        &orders,
        &probe,
        options.telemetry_agents.min(n),
        options.telemetry_batch,
        options::seconds(options.telemetry_seconds),
        deadline,
    )
    .await
    .map_err(|e| e.to_string());
    cpu.push(meter.lap("telemetry"));

    let peak = host.memory().map(|m| m.peak).unwrap_or(0);
    let lost = Probe::read(&probe.closed);
    tracing::info!("closing the fleet and stopping the host");
    orders.send_modify(|o| o.stop = true);
    let closing = async { while fleet.tasks.join_next().await.is_some() {} };
    if tokio::time::timeout_at(deadline.within(Duration::from_secs(30)), closing).await.is_err() {
        tracing::warn!("agents did not all close in time; aborting them");
        fleet.tasks.abort_all();
    }
    // Let the host see every session end before it is asked to stop.
    let drained = deadline.within(Duration::from_secs(15));
    while api.online().await.is_ok_and(|online| online > 0) && tokio::time::Instant::now() < drained {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = host.log().to_path_buf();
    let host_stopped_cleanly = host.stop().await;
    let host_log = process::count_log(&log);
    Ok(HostRun {
        host_files,
        connect,
        host_memory: report::HostMemory { idle, connected, peak },
        broadcast,
        round_trip,
        sustained,
        telemetry,
        host_log,
        host_stopped_cleanly,
        loadgen_rss,
        violations: probe.violations.load(Ordering::Relaxed),
        lost,
        cpu,
    })
}

/// The echo server child and the echo clients, on the same certificates and loopback.
async fn baseline(
    options: &Options,
    echo_bin: &Path,
    data_dir: &Path,
    identities: &Arc<Vec<fleet::Identity>>,
    deadline: Deadline,
) -> Result<echo::EchoFigures, LoadgenError> {
    let [port] = system::free_ports::<1>()?;
    let addr = (std::net::Ipv4Addr::LOCALHOST, port).into();
    let server = deadline.run("starting the echo server", process::serve_echo(echo_bin, data_dir, addr)).await?;
    let plan = EchoPlan {
        addr,
        connections: identities.len(),
        concurrency: options.connect_concurrency,
        per_source: options.conns_per_source,
        rate: options.rate,
        duration: options::seconds(options.rate_seconds),
        bytes: options.echo_bytes,
        settle: options::seconds(options.settle_seconds),
    };
    let figures = echo::measure(&plan, identities, server.pid(), deadline).await;
    server.stop().await;
    figures
}

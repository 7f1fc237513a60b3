//! The operator command line: `init`, `up`, `serve`, `agent enroll`, `token create`, `pin`,
//! `audit verify`, `check-config`.
//!
//! Exit codes: 0 success; 1 the operation failed (store or certificate error, audit chain
//! broken); 2 invalid configuration or usage.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use viworks_core::wire::AgentId;
use viworks_gateway::shutdown_signal;

use crate::config::{Config, ConfigError, FileConfig, LogFormat, Overrides, StoreUrl};
use crate::local_agent::{self, LocalAgent};
use crate::store::{AgentRecord, ChainVerdict, Role, Store};
use crate::tls::{self, InitOptions, Pki};
use crate::{HostError, clock};

/// `viworks-host`: the ViWorkS control plane.
#[derive(Debug, Parser)]
#[command(name = "viworks-host", version, about = "The ViWorkS fleet control plane")]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Where the configuration comes from; flags override `VIW_HOST_*`, which override the file.
#[derive(Debug, Clone, Default, Args)]
pub struct ConfigArgs {
    /// A TOML configuration file.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The data directory (PKI, master key, default database).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// The store: sqlite://PATH or postgres://….
    #[arg(long, value_name = "URL")]
    pub store: Option<String>,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a data directory: CA, host certificate, master key, database, first admin token.
    Init {
        /// Where the configuration comes from.
        #[command(flatten)]
        config: ConfigArgs,
        /// Names agents reach the host by (DNS names or IPs); default localhost, 127.0.0.1, ::1.
        #[arg(long = "host-name", value_name = "NAME")]
        host_names: Vec<String>,
    },
    /// Run the host.
    Serve {
        /// Where the configuration comes from.
        #[command(flatten)]
        config: ConfigArgs,
        /// API listen address, HOST:PORT.
        #[arg(long, value_name = "HOST:PORT")]
        api_addr: Option<String>,
        /// Agent listen address, HOST:PORT.
        #[arg(long, value_name = "HOST:PORT")]
        agent_addr: Option<String>,
    },
    /// Initialise the data directory if needed, then run the host: the one-command start.
    Up {
        /// Where the configuration comes from.
        #[command(flatten)]
        config: ConfigArgs,
        /// API listen address, HOST:PORT.
        #[arg(long, value_name = "HOST:PORT")]
        api_addr: Option<String>,
        /// Agent listen address, HOST:PORT.
        #[arg(long, value_name = "HOST:PORT")]
        agent_addr: Option<String>,
    },
    /// Manage agents.
    Agent {
        /// What to do with agents.
        #[command(subcommand)]
        action: AgentAction,
    },
    /// Manage API tokens.
    Token {
        /// What to do with tokens.
        #[command(subcommand)]
        action: TokenAction,
    },
    /// Print the SPKI pin of a PEM certificate.
    Pin {
        /// The certificate file.
        cert: PathBuf,
    },
    /// Audit trail operations.
    Audit {
        /// What to do with the audit trail.
        #[command(subcommand)]
        action: AuditAction,
    },
    /// Validate the configuration and exit.
    CheckConfig {
        /// Where the configuration comes from.
        #[command(flatten)]
        config: ConfigArgs,
    },
}

/// `agent …`
#[derive(Debug, Subcommand)]
pub enum AgentAction {
    /// Enroll an agent and write its bundle (client certificate and key, CA, host pin, agent
    /// key, agent.env).
    Enroll {
        /// The agent id; also its certificate's common name.
        id: String,
        /// The agent's site.
        #[arg(long)]
        site: String,
        /// The bundle directory to write.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// The URL the agent dials; default from the configuration.
        #[arg(long, value_name = "URL")]
        backend_url: Option<String>,
        /// Where the configuration comes from.
        #[command(flatten)]
        config: ConfigArgs,
    },
}

/// `token …`
#[derive(Debug, Subcommand)]
pub enum TokenAction {
    /// Create an API token and print it once.
    Create {
        /// admin, operator or viewer.
        #[arg(long)]
        role: String,
        /// A name shown in audit records.
        #[arg(long, default_value = "cli")]
        name: String,
        /// Where the configuration comes from.
        #[command(flatten)]
        config: ConfigArgs,
    },
}

/// `audit …`
#[derive(Debug, Subcommand)]
pub enum AuditAction {
    /// Walk the hash chain; exit 0 only when it is intact.
    Verify {
        /// Where the configuration comes from.
        #[command(flatten)]
        config: ConfigArgs,
    },
}

/// Parses the command line and runs the chosen subcommand.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("viworks-host: cannot start the runtime: {error}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(execute(cli.command)) {
        Ok(code) => code,
        Err(HostError::Config(errors)) => {
            eprintln!("viworks-host: invalid configuration:");
            for error in errors {
                eprintln!("  - {error}");
            }
            ExitCode::from(2)
        }
        Err(error) => {
            eprintln!("viworks-host: {error}");
            ExitCode::from(1)
        }
    }
}

/// Loads, overrides and validates the configuration.
pub fn load_config(
    args: &ConfigArgs,
    api_addr: Option<String>,
    agent_addr: Option<String>,
) -> Result<Config, HostError> {
    let mut errors = Vec::new();
    let mut file = match &args.config {
        Some(path) => FileConfig::load(path).unwrap_or_else(|e| {
            errors.extend(e);
            FileConfig::default()
        }),
        None => FileConfig::default(),
    };
    errors.extend(file.apply_env(std::env::vars()));
    let overrides = Overrides { data_dir: args.data_dir.clone(), api_addr, agent_addr, store: args.store.clone() };
    match file.resolve(&overrides) {
        Ok(config) if errors.is_empty() => Ok(config),
        Ok(_) => Err(HostError::Config(errors)),
        Err(more) => {
            errors.extend(more);
            Err(HostError::Config(errors))
        }
    }
}

/// Logs to stderr from a thread of its own: an event (every audit record is one) costs the
/// thread that emits it a copy into a bounded queue rather than a write to stderr, and the
/// logging thread writes whatever has queued up in one go. A full queue makes emitters wait
/// instead of dropping lines. The returned guard writes out what is queued when dropped:
/// hold it until the process ends.
fn init_logging(config: &Config) -> WorkerGuard {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("viworks-log")
        .finish(std::io::BufWriter::new(std::io::stderr()));
    // Colours only for a person at a terminal: a journal, a file or a SIEM gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer).with_ansi(ansi);
    let _ = match config.log_format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
    guard
}

async fn execute(command: Command) -> Result<ExitCode, HostError> {
    match command {
        Command::Init { config, host_names } => {
            let config = load_config(&config, None, None)?;
            let options = init_options(host_names);
            let initialized = crate::init(&config.data_dir, &config.store, &options).await?;
            println!("data_dir={}", config.data_dir.display());
            println!("host_pin={}", initialized.pki.host_pin());
            println!("admin_token={}", initialized.admin_token);
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve { config, api_addr, agent_addr } => {
            let config = load_config(&config, api_addr, agent_addr)?;
            let _log = init_logging(&config);
            crate::run(config, shutdown_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Up { config, api_addr, agent_addr } => {
            let config = load_config(&config, api_addr, agent_addr)?;
            let _log = init_logging(&config);
            let shutdown = shutdown_signal();
            let token_file = config.data_dir.join("admin.token");
            let admin_token = if config.data_dir.join("ca.crt").exists() {
                std::fs::read_to_string(&token_file).map(|t| t.trim().to_owned()).unwrap_or_default()
            } else {
                let initialized = crate::init(&config.data_dir, &config.store, &init_options(Vec::new())).await?;
                write_private(&token_file, &initialized.admin_token)?;
                initialized.admin_token
            };
            let store = crate::open_store(&config.store, config.postgres).await?;
            let enrolled = local_agent::ensure_enrolled(&config, &store).await;
            store.close().await;
            let local = enrolled?;
            let host = crate::start(&config).await?;
            let scheme = if config.api_tls { "https" } else { "http" };
            println!("api={scheme}://{}", host.api_addr);
            println!("agents={}", crate::agents::describe(host.agent_addr));
            if admin_token.is_empty() {
                println!("admin_token=(see `viworks-host token create --role admin`)");
            } else {
                println!("admin_token={admin_token}");
            }
            let agent = LocalAgent::start(&local, host.agent_addr.port())?;
            match local_agent::first_round_trip(host.control(), &agent.agent_id).await {
                Ok(trip) => {
                    println!("local_agent={}", agent.agent_id);
                    println!(
                        "first_round_trip=get_system_health command={} status={} ms={}",
                        trip.command_id,
                        trip.status,
                        trip.elapsed.as_millis()
                    );
                    println!("{}", summary(&trip.output));
                }
                Err(reason) => {
                    tracing::error!(reason = %reason, "the first round trip with the local agent failed");
                    println!("first_round_trip=failed reason={reason:?}");
                }
            }
            shutdown.await;
            agent.stop().await;
            host.shutdown().await;
            Ok(ExitCode::SUCCESS)
        }
        Command::Agent { action: AgentAction::Enroll { id, site, out, backend_url, config } } => {
            let config = load_config(&config, None, None)?;
            let agent_id = AgentId::new(id).map_err(|e| config_error("agent id", e.to_string()))?;
            let pki = Pki::load(&config.data_dir)?;
            let store = crate::open_store(&config.store, config.postgres).await?;
            let now = clock::Clock::start().now();
            let record = AgentRecord::enrolled(agent_id.clone(), site.clone(), now);
            let backend_url = backend_url.unwrap_or_else(|| config.public_url.clone());
            if store.agent(&agent_id).await?.is_some() {
                store.close().await;
                return Err(config_error("agent id", format!("{agent_id} is enrolled already; nothing was written")));
            }
            // The bundle first: if it cannot be written, nothing is enrolled.
            let bundle = tls::write_bundle(&pki, &agent_id, &site, &backend_url, &out)?;
            store.enroll_agent(&record).await?;
            audit_cli(&store, "agent.enrolled", vec![agent_id.to_string()], serde_json::json!({ "site": site })).await;
            store.close().await;
            println!("agent_id={agent_id}");
            println!("bundle={}", bundle.dir.display());
            println!("env_file={}", bundle.env_file.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Token { action: TokenAction::Create { role, name, config } } => {
            let config = load_config(&config, None, None)?;
            let role = Role::parse(&role).ok_or_else(|| config_error("role", "must be admin, operator or viewer"))?;
            let store = crate::open_store(&config.store, config.postgres).await?;
            let token = crate::create_token(&store, role, &name).await?;
            audit_cli(&store, "token.created", vec![name.clone()], serde_json::json!({ "role": role.as_str() })).await;
            store.close().await;
            println!("token={token}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Pin { cert } => {
            println!("{}", tls::pin_of_pem_file(&cert)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit { action: AuditAction::Verify { config } } => {
            let config = load_config(&config, None, None)?;
            // Opening a SQLite path creates the file: a mistyped path would verify an empty
            // chain and pass.
            if let StoreUrl::Sqlite(path) = &config.store
                && !path.exists()
            {
                return Err(HostError::NoDatabase(path.clone()));
            }
            let store = crate::open_store(&config.store, config.postgres).await?;
            let verdict = store.verify_audit().await?;
            store.close().await;
            match verdict {
                ChainVerdict::Intact { entries } => {
                    println!("audit chain intact: {entries} records");
                    Ok(ExitCode::SUCCESS)
                }
                ChainVerdict::Broken { seq, reason } => {
                    println!("audit chain broken at record {seq}: {reason}");
                    Ok(ExitCode::from(1))
                }
            }
        }
        Command::CheckConfig { config } => {
            let config = load_config(&config, None, None)?;
            println!(
                "configuration is valid: api {} agents {} store {:?}",
                config.api_addr, config.agent_addr, config.store
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// One line about the machine from a `get_system_health` output.
fn summary(output: &serde_json::Value) -> String {
    let number = |pointer: &str| output.pointer(pointer).and_then(serde_json::Value::as_f64);
    let gib =
        |bytes: Option<f64>| bytes.map(|b| format!("{:.1}", b / (1u64 << 30) as f64)).unwrap_or_else(|| "?".into());
    format!(
        "health cpus={} cpu_pct={} mem_used_gib={} mem_total_gib={} load1={}",
        number("/cpu_count").map(|n| n.to_string()).unwrap_or_else(|| "?".into()),
        number("/cpu_percent").map(|n| format!("{n:.1}")).unwrap_or_else(|| "?".into()),
        gib(number("/memory_used_bytes")),
        gib(number("/memory_total_bytes")),
        number("/load/0").map(|n| format!("{n:.2}")).unwrap_or_else(|| "?".into()),
    )
}

/// Records an operator action taken through the command line in the audit chain.
async fn audit_cli<S: Store>(store: &S, action: &str, targets: Vec<String>, detail: serde_json::Value) {
    let entry = crate::store::NewAudit {
        ts: clock::Clock::start().now(),
        req_id: String::new(),
        actor: format!("cli:{}", std::env::var("USER").unwrap_or_else(|_| "unknown".to_owned())),
        action: action.to_owned(),
        args_hash: crate::audit::chain::args_hash(&detail),
        targets,
        rc: "ok".to_owned(),
        duration_ms: 0,
        detail,
    };
    crate::audit::record(store, entry).await;
}

fn init_options(host_names: Vec<String>) -> InitOptions {
    if host_names.is_empty() { InitOptions::default() } else { InitOptions { host_names, ..InitOptions::default() } }
}

fn config_error(key: &str, problem: impl Into<String>) -> HostError {
    HostError::Config(vec![ConfigError { key: key.to_owned(), problem: problem.into() }])
}

fn write_private(path: &Path, text: &str) -> Result<(), HostError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| config_error("data_dir", format!("cannot write {}: {e}", path.display())))?;
    writeln!(file, "{text}").map_err(|e| config_error("data_dir", format!("cannot write {}: {e}", path.display())))?;
    Ok(())
}

//! `viworks-gateway`: parses the command line and hands over to the library.
//!
//! Exit codes:
//! - 0: stopped by SIGTERM or SIGINT after a clean shutdown, or `--check-config` found the
//!   configuration valid;
//! - 1: the agent could not start (unreadable TLS material, unusable state directory, the
//!   liveness address taken);
//! - 2: invalid configuration or usage; every problem is listed on standard error.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use viworks_gateway::config::LogFormat;

/// The ViWorkS gateway agent.
#[derive(Debug, Parser)]
#[command(name = "viworks-gateway", version, about = "The ViWorkS gateway agent")]
struct Cli {
    /// An env file of VIW_AGENT_* settings (the agent.env of an enrollment bundle); variables
    /// in the environment override it.
    #[arg(long, value_name = "FILE")]
    env_file: Option<PathBuf>,
    /// A TOML file of settings, overridden by the env file and the environment.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Validate the configuration and exit.
    #[arg(long)]
    check_config: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let sources = viworks_gateway::Sources { toml: cli.config, env_file: cli.env_file };
    let validated = match viworks_gateway::load(&sources, std::env::vars()) {
        Ok(validated) => validated,
        Err(errors) => {
            eprintln!("viworks-gateway: invalid configuration ({} problems):", errors.len());
            for error in errors {
                eprintln!("  - {error}");
            }
            return ExitCode::from(2);
        }
    };
    for warning in &validated.warnings {
        eprintln!("viworks-gateway: warning: {warning}");
    }
    let config = validated.config;
    if cli.check_config {
        println!("configuration is valid: agent {} dials {}", config.agent_id, config.backend_url);
        return ExitCode::SUCCESS;
    }
    init_logging(config.log_format);
    // One thread runs everything: the agent is idle nearly all the time and its work is I/O
    // (the socket, processes, the Docker API). Each further thread would cost a stack and a
    // malloc arena, and a multi-threaded runtime starts one worker per core, so the agent's
    // memory would grow with the machine it runs on. Blocking calls (sysinfo, DNS) go to
    // `spawn_blocking`, whose threads exist only while there is such work. The ledger's
    // commits (an fsync each) hold the thread for a moment, as they held the main loop
    // before; running commands wait on processes and sockets, so they hardly notice.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("viworks-gateway: cannot start the async runtime: {error}");
            return ExitCode::from(1);
        }
    };
    let run = async {
        let shutdown = viworks_gateway::shutdown_signal();
        viworks_gateway::run(config, shutdown).await
    };
    match runtime.block_on(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = %error, "the agent cannot start");
            eprintln!("viworks-gateway: {error}");
            ExitCode::from(1)
        }
    }
}

/// Logs to standard error at the levels `RUST_LOG` gives: a comma-separated list of `level`
/// and `target=level` directives, such as `info,viworks_gateway=debug`; `info` when it is
/// unset or not such a list.
///
/// A plain target filter rather than `EnvFilter`: its span and field directives need a regex
/// engine, whose code would be most of the agent's logging cost in memory.
fn init_logging(format: LogFormat) {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    let default = || Targets::new().with_default(LevelFilter::INFO);
    let filter = match std::env::var("RUST_LOG") {
        Err(_) => default(),
        Ok(text) => text.parse::<Targets>().unwrap_or_else(|error| {
            eprintln!("viworks-gateway: warning: RUST_LOG ignored ({error}); logging at info");
            default()
        }),
    };
    // Colours only for a person at a terminal: a journal or a file gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Json => builder.json().finish().with(filter).init(),
        LogFormat::Text => builder.finish().with(filter).init(),
    }
}

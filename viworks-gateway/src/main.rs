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
    let runtime = match tokio::runtime::Runtime::new() {
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

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

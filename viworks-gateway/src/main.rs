//! `viworks-gateway`: parses the command line and hands over to the library.
//!
//! Exit codes: 0 the configuration is valid; 2 invalid configuration or usage (every problem is
//! listed on standard error).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// The ViWorkS gateway agent.
#[derive(Debug, Parser)]
#[command(name = "viworks-gateway", version, about = "The ViWorkS gateway agent")]
struct Cli {
    /// An env file of VIW_AGENT_* settings (the agent.env of an enrollment bundle).
    #[arg(long, value_name = "FILE")]
    env_file: Option<PathBuf>,
    /// A TOML file of settings.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Validate the configuration and exit.
    #[arg(long)]
    check_config: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let sources = viworks_gateway::Sources { toml: cli.config, env_file: cli.env_file };
    match viworks_gateway::load(&sources, std::env::vars()) {
        Ok(validated) => {
            for warning in &validated.warnings {
                eprintln!("viworks-gateway: warning: {warning}");
            }
            if cli.check_config {
                println!(
                    "configuration is valid: agent {} dials {}",
                    validated.config.agent_id, validated.config.backend_url
                );
                ExitCode::SUCCESS
            } else {
                eprintln!("viworks-gateway: connecting to the host is not part of this build; use --check-config");
                ExitCode::from(2)
            }
        }
        Err(errors) => {
            eprintln!("viworks-gateway: invalid configuration:");
            for error in errors {
                eprintln!("  - {error}");
            }
            ExitCode::from(2)
        }
    }
}

//! The `viworks-loadgen` binary's entry point: parses the command line, sets up logging,
//! raises nothing itself (the run does), runs, prints the report and exits.
//!
//! Exit codes: 0 every phase ran; 1 the run could not be set up or a phase failed; 2 invalid
//! options.

use std::process::ExitCode;

use clap::Parser;

use super::options::{Cli, Internal};
use super::{LoadgenError, echo};

/// Parses the command line and runs the load generator (or, as a child, the echo server).
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
    if let Some(Internal::EchoServer(args)) = cli.command {
        return match echo::serve(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("viworks-loadgen echo-server: {error}");
                ExitCode::from(1)
            }
        };
    }
    let options = cli.options;
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("viworks-loadgen: cannot start the runtime: {error}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(super::run(&options));
    // Agent tasks still running (after a failure) are dropped with the runtime, not awaited.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(report) => {
            println!("{report}");
            if let Some(path) = &options.json {
                let text = serde_json::to_string_pretty(&report.to_json()).unwrap_or_default();
                if let Err(error) = std::fs::write(path, text) {
                    eprintln!("viworks-loadgen: cannot write {}: {error}", path.display());
                    return ExitCode::from(1);
                }
            }
            if report.failed() { ExitCode::from(1) } else { ExitCode::SUCCESS }
        }
        Err(error @ LoadgenError::InvalidOptions(_)) => {
            eprintln!("viworks-loadgen: {error}");
            ExitCode::from(2)
        }
        Err(error) => {
            eprintln!("viworks-loadgen: {error}");
            ExitCode::from(1)
        }
    }
}

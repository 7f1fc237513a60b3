//! Why a load-generator run could not go on. Each variant names what to fix; the text is what
//! the operator reads on stderr.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

/// Why the load generator stopped, or why one of its phases failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum LoadgenError {
    /// One or more options are out of range; every problem is listed.
    #[error("invalid options:\n{}", .0.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    InvalidOptions(Vec<String>),
    /// The `viworks-host` binary is not where it was looked for.
    #[error(
        "no viworks-host binary at {}: build it with `cargo build --release -p viworks-host` \
         (it must sit next to viworks-loadgen) or pass --host-bin",
        path.display()
    )]
    HostBinaryMissing {
        /// Where it was looked for.
        path: PathBuf,
    },
    /// A child process could not be started.
    #[error("cannot start {what}: {source}")]
    Spawn {
        /// Which process.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A `viworks-host` subcommand failed or printed something unexpected.
    #[error("`viworks-host {command}` failed: {detail}")]
    HostCommand {
        /// The subcommand.
        command: &'static str,
        /// Its exit status and output.
        detail: String,
    },
    /// A child process ended while it was needed.
    #[error("{what} exited early ({status}); see {}", log.display())]
    ChildExited {
        /// Which process.
        what: &'static str,
        /// Its exit status.
        status: String,
        /// Its log.
        log: PathBuf,
    },
    /// A child process did not start listening in time.
    #[error("{what} did not answer on {addr} within {waited:?}; see {}", log.display())]
    NotReady {
        /// Which process.
        what: &'static str,
        /// Where it should listen.
        addr: String,
        /// How long we waited.
        waited: Duration,
        /// Its log.
        log: PathBuf,
    },
    /// The open-file limit cannot be raised to what the run needs.
    #[error(
        "{whose} open-file limit is too low: {needed} descriptors needed for this many \
         connections, but the limit is {limit}; raise the hard limit (`ulimit -Hn`, limits.conf, \
         or run as root) or pass fewer --agents"
    )]
    FileLimit {
        /// `the load generator's` or `the host's`.
        whose: &'static str,
        /// Descriptors needed.
        needed: u64,
        /// The limit found.
        limit: u64,
    },
    /// A file or `/proc` entry could not be read or written.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A system call failed.
    #[error("{call} failed: {source}")]
    Sys {
        /// Which call.
        call: &'static str,
        /// The error number.
        #[source]
        source: nix::Error,
    },
    /// `/proc` held something unexpected.
    #[error("cannot read {what} from {}", path.display())]
    Proc {
        /// The field.
        what: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// The echo server's journal could not be opened or set up.
    #[error("the echo journal {}: {reason}", path.display())]
    Journal {
        /// The database file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The host's PKI could not be loaded or could not issue a certificate.
    #[error(transparent)]
    Pki(#[from] viworks_host::tls::TlsError),
    /// An agent's client TLS configuration could not be built.
    #[error("an agent's client TLS configuration: {0}")]
    ClientTls(#[from] viworks_gateway::tls::TlsError),
    /// Enrolling agents in the store failed.
    #[error("enrolling agents: {0}")]
    Store(#[from] viworks_host::store::StoreError),
    /// The store could not be opened to enroll agents in.
    #[error("opening the store to enroll agents: {0}")]
    OpenStore(#[from] viworks_host::HostError),
    /// A store URL is neither `sqlite://PATH` nor `postgres://…` (the URL is not repeated:
    /// it may hold a password).
    #[error("a store URL is neither sqlite://PATH nor postgres://…")]
    StoreUrl,
    /// Postgres is required (under `CI=true`) and could not be started, or the throwaway
    /// cluster refused a database.
    #[error("Postgres for the postgres store: {reason} (`apt-get install -y postgresql`, or pass --postgres-url)")]
    Postgres {
        /// Why.
        reason: String,
    },
    /// An identifier the load generator builds is invalid (a bug in its naming).
    #[error("generated identifier {value:?} is invalid: {reason}")]
    Identifier {
        /// The identifier.
        value: String,
        /// Why.
        reason: String,
    },
    /// Something inside the load generator failed: a worker thread panicked, or the
    /// operating system's random number generator failed.
    #[error("{what} failed: {reason}")]
    Internal {
        /// What failed.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// An HTTP exchange with the API failed below HTTP.
    #[error("HTTP {what}: {source}")]
    Http {
        /// The request.
        what: String,
        /// Why.
        #[source]
        source: hyper::Error,
    },
    /// The API could not be reached.
    #[error("cannot connect to the API at {addr}: {source}")]
    ApiConnect {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The API answered with an unexpected status or body.
    #[error("the API answered {status} to {what}: {body}")]
    Api {
        /// The request.
        what: String,
        /// The HTTP status.
        status: u16,
        /// The body, shortened.
        body: String,
    },
    /// Too few agents connected.
    #[error("only {connected} of {wanted} agents connected; first failure: {first_failure}")]
    Connect {
        /// Agents connected.
        connected: usize,
        /// Agents wanted.
        wanted: usize,
        /// The first failure seen.
        first_failure: String,
    },
    /// A phase did not finish before its deadline (its own or `--max-seconds`).
    #[error("{phase} did not finish within {limit:?}: {detail}")]
    Deadline {
        /// The phase.
        phase: &'static str,
        /// The time it had.
        limit: Duration,
        /// What was still missing.
        detail: String,
    },
}

impl LoadgenError {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> LoadgenError {
        let path = path.into();
        move |source| LoadgenError::Io { action, path, source }
    }
}

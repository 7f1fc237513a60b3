//! TLS and the host PKI: the certificate authority that issues agent certificates, the rustls
//! configurations of the agent (mTLS) and API endpoints, the identity and channel binding of an
//! accepted agent connection, and the pinned client configuration agents and tools use.
//!
//! All cryptography is rustls' `ring` provider, passed explicitly; no process-wide default
//! provider is installed or relied on.

#[cfg(test)]
mod client;
pub mod enroll;
mod files;
mod identity;
mod pki;
mod server;

#[cfg(test)]
mod test_support;

use std::path::{Path, PathBuf};

use thiserror::Error;
use viworks_core::auth::SpkiPin;
use viworks_core::wire::IdError;

pub use enroll::{BundlePaths, write_bundle, write_bundle_with_validity};
pub use identity::{agent_identity, channel_binding_client, channel_binding_server};
pub use pki::{
    AGENT_CERT_LIFETIME, CA_LIFETIME, DataDirPaths, HOST_CERT_LIFETIME, InitOptions, IssuedAgent, Pki, Validity,
};
pub use server::{HandshakeFailure, agent_server_config, api_server_config};
pub use viworks_gateway::tls::{ALPN_HTTP_1_1, PinReport, mismatched_pin, pinned_client_config, provider};

/// Why a TLS or PKI operation failed. Variants that involve a file name it, and each says
/// what the operator can do about it.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TlsError {
    /// Reading, writing or creating a file or directory failed.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was attempted ("read", "create", ...).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A file that would be written already exists. Nothing was written.
    #[error(
        "refusing to overwrite {}: it already exists and nothing was written; move it away or choose another directory",
        path.display()
    )]
    AlreadyExists {
        /// The existing file.
        path: PathBuf,
    },
    /// A file of the PKI is missing: the data directory has not been initialised.
    #[error("{} does not exist; run `viworks-host init` to create the PKI in this data directory", path.display())]
    NotInitialized {
        /// The missing file.
        path: PathBuf,
    },
    /// A file does not hold the PEM data expected.
    #[error("{} does not hold {expected}: {reason}", path.display())]
    BadPemFile {
        /// The file.
        path: PathBuf,
        /// What it should hold ("a certificate", "a PKCS#8 private key", ...).
        expected: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// PEM given in memory (not from a file) does not hold what is expected.
    #[error("the {what} is not valid PEM: {reason}")]
    BadPem {
        /// Which input ("CA certificate", "client private key", ...).
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A private key does not belong to the certificate it is paired with.
    #[error(
        "the private key in {} does not belong to the certificate in {}; restore the matching pair",
        key.display(),
        cert.display()
    )]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// The master key file is not 64 hexadecimal digits.
    #[error("{} does not hold a master key: expected 64 lowercase hexadecimal digits and a newline", path.display())]
    BadMasterKey {
        /// The file.
        path: PathBuf,
    },
    /// The CA certificate cannot be used to issue certificates.
    #[error("{} cannot be used to issue certificates: {reason}", path.display())]
    UnsupportedCa {
        /// The CA certificate file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// An option or argument is out of range or malformed.
    #[error("invalid {option}: {reason}")]
    InvalidOption {
        /// The option or argument.
        option: &'static str,
        /// What is wrong and what is accepted.
        reason: String,
    },
    /// rcgen failed to build or sign a certificate.
    #[error("generating a certificate failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// The operating system's random number generator failed.
    #[error("the operating system's random number generator failed: {0}")]
    Random(getrandom::Error),
    /// rustls refused a configuration (bad key, no usable protocol version, ...).
    #[error("building the {what} TLS configuration failed: {source}")]
    Config {
        /// Which configuration.
        what: &'static str,
        /// rustls' reason.
        #[source]
        source: rustls::Error,
    },
    /// A certificate verifier could not be built (typically: the trust store is empty).
    #[error("building the {what} certificate verifier failed: {source}")]
    Verifier {
        /// Which verifier.
        what: &'static str,
        /// rustls' reason.
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    /// The peer presented no certificate (only possible where client auth is optional).
    #[error("the peer presented no certificate")]
    NoPeerCertificate,
    /// The peer's certificate could not be read (rustls verified it, x509-parser cannot parse it).
    #[error("the peer's certificate cannot be read: {reason}")]
    BadPeerCertificate {
        /// What is wrong with it.
        reason: String,
    },
    /// The peer certificate's subject common name is not a valid agent id.
    #[error("the client certificate's common name {common_name:?} is not a valid agent id: {source}")]
    BadAgentId {
        /// The common name as presented (lossily decoded).
        common_name: String,
        /// Why it is not an agent id.
        #[source]
        source: IdError,
    },
    /// No channel binding can be derived from this connection.
    #[error("no channel binding available: {reason}")]
    ChannelBinding {
        /// Why (handshake not finished, not TLS 1.3, exporter failure).
        reason: String,
    },
    /// A value destined for the agent's environment file is unsafe or malformed.
    #[error("invalid {key}: {reason}")]
    BadBundleValue {
        /// The environment variable.
        key: &'static str,
        /// What is wrong and what is accepted.
        reason: String,
    },
}

impl TlsError {
    fn io(action: &'static str, path: &Path, source: std::io::Error) -> Self {
        TlsError::Io { action, path: path.to_path_buf(), source }
    }
}

/// The SPKI pin of the first certificate in the PEM file at `path`, as `viworks-host pin CERT`
/// prints it. Fails if the file cannot be read or its first PEM block is not a certificate.
pub fn pin_of_pem_file(path: &Path) -> Result<SpkiPin, TlsError> {
    let pem = std::fs::read(path).map_err(|e| TlsError::io("read", path, e))?;
    SpkiPin::of_certificate_pem(&pem).map_err(|e| TlsError::BadPemFile {
        path: path.to_path_buf(),
        expected: "a PEM certificate",
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_of_pem_file_matches_the_host_pin_and_names_bad_files() {
        let (dir, pki) = test_support::fixture();
        let paths = DataDirPaths::new(dir.path());
        assert_eq!(pin_of_pem_file(&paths.host_cert).expect("pin"), pki.host_pin());

        let err = pin_of_pem_file(&paths.host_key).expect_err("a key is not a certificate");
        assert!(matches!(err, TlsError::BadPemFile { .. }), "{err}");
        assert!(err.to_string().contains("host.key"), "{err}");

        let missing = dir.path().join("nope.crt");
        let err = pin_of_pem_file(&missing).expect_err("missing");
        assert!(err.to_string().contains("nope.crt"), "{err}");
    }
}

//! Agent enrollment: everything one gateway agent needs, written to one bundle directory.
//!
//! ```text
//! <out_dir>/ (0700 when created here)
//!   client.crt  the agent's client certificate (CN = agent id), PEM
//!   client.key  its private key, PEM PKCS#8, 0600
//!   ca.crt      the trust bundle the host certificate chains to, PEM
//!   host.pin    the host's SPKI pin, base64 and a newline
//!   agent.key   the agent's message key (derived from the master key), 64 hex digits, 0600
//!   agent.env   VIW_AGENT_* settings naming the files above by absolute path
//! ```
//! The bundle is written whole or not at all, and never over existing files.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use viworks_core::auth::AgentKey;
use viworks_core::wire::AgentId;

use super::files::{self, NewFile, PRIVATE, PUBLIC};
use super::{Pki, TlsError, Validity};

/// Where [`write_bundle`] put each file (absolute paths).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BundlePaths {
    /// The bundle directory.
    pub dir: PathBuf,
    /// `client.crt`.
    pub client_cert: PathBuf,
    /// `client.key` (0600).
    pub client_key: PathBuf,
    /// `ca.crt`.
    pub ca_cert: PathBuf,
    /// `host.pin`.
    pub host_pin: PathBuf,
    /// `agent.key` (0600).
    pub agent_key: PathBuf,
    /// `agent.env`.
    pub env_file: PathBuf,
}

impl BundlePaths {
    fn new(dir: &Path) -> Self {
        BundlePaths {
            dir: dir.to_path_buf(),
            client_cert: dir.join("client.crt"),
            client_key: dir.join("client.key"),
            ca_cert: dir.join("ca.crt"),
            host_pin: dir.join("host.pin"),
            agent_key: dir.join("agent.key"),
            env_file: dir.join("agent.env"),
        }
    }
}

/// Enrolls `agent_id`: issues its client certificate for [`Validity::agent_default`] and
/// writes the bundle to `out_dir` (created if missing). See [`write_bundle_with_validity`].
pub fn write_bundle(
    pki: &Pki,
    agent_id: &AgentId,
    site: &str,
    backend_url: &str,
    out_dir: &Path,
) -> Result<BundlePaths, TlsError> {
    write_bundle_with_validity(pki, agent_id, site, backend_url, out_dir, Validity::agent_default())
}

/// Enrolls `agent_id` with a client certificate valid for `validity`, writing the bundle to
/// `out_dir` (created with mode 0700 if missing).
///
/// Fails, writing nothing, if any bundle file already exists ([`TlsError::AlreadyExists`]);
/// if `backend_url` is not a `wss://` URL whose host the host certificate names (the agent
/// would refuse the host) or `site` is empty or unsafe in an environment file
/// ([`TlsError::BadBundleValue`]). The paths in `agent.env` are where the bundle is written;
/// if it is copied elsewhere (e.g. `/opt/viworks/agent/certs`), edit them.
pub fn write_bundle_with_validity(
    pki: &Pki,
    agent_id: &AgentId,
    site: &str,
    backend_url: &str,
    out_dir: &Path,
    validity: Validity,
) -> Result<BundlePaths, TlsError> {
    env_value("VIW_AGENT_SITE", site)?;
    check_backend_url(pki, backend_url)?;

    let existing = BundlePaths::new(out_dir);
    for path in [
        &existing.client_cert,
        &existing.client_key,
        &existing.ca_cert,
        &existing.host_pin,
        &existing.agent_key,
        &existing.env_file,
    ] {
        if std::fs::symlink_metadata(path).is_ok() {
            return Err(TlsError::AlreadyExists { path: path.clone() });
        }
    }
    files::create_dir(out_dir)?;
    let dir = std::fs::canonicalize(out_dir).map_err(|e| TlsError::io("resolve", out_dir, e))?;
    let paths = BundlePaths::new(&dir);
    let text = |key: &'static str, path: &Path| -> Result<String, TlsError> {
        let text = path.to_str().ok_or_else(|| TlsError::BadBundleValue {
            key,
            reason: format!("{} is not valid UTF-8", path.display()),
        })?;
        env_value(key, text)?;
        Ok(text.to_owned())
    };
    let cert_path = text("VIW_AGENT_CERT_PATH", &paths.client_cert)?;
    let key_path = text("VIW_AGENT_KEY_PATH", &paths.client_key)?;
    let ca_path = text("VIW_AGENT_TRUST_BUNDLE", &paths.ca_cert)?;
    let agent_key_path = text("VIW_AGENT_AGENT_KEY_FILE", &paths.agent_key)?;

    let issued = pki.issue_agent(agent_id, validity)?;
    let agent_key = format!("{}\n", AgentKey::derive(pki.master_key(), agent_id).to_hex());
    let pin = pki.host_pin().to_base64();
    let env = format!(
        "# ViWorkS gateway agent {agent_id}, enrolled by viworks-host.\n\
         VIW_AGENT_BACKEND_URL={backend_url}\n\
         VIW_AGENT_ID={agent_id}\n\
         VIW_AGENT_SITE={site}\n\
         VIW_AGENT_CERT_PATH={cert_path}\n\
         VIW_AGENT_KEY_PATH={key_path}\n\
         VIW_AGENT_TRUST_BUNDLE={ca_path}\n\
         VIW_AGENT_BACKEND_SPKI_PIN={pin}\n\
         VIW_AGENT_AGENT_KEY_FILE={agent_key_path}\n"
    );
    let pin_line = format!("{pin}\n");
    files::write_all_new(&[
        NewFile { path: paths.client_cert.clone(), contents: issued.cert_pem.as_bytes(), mode: PUBLIC },
        NewFile { path: paths.client_key.clone(), contents: issued.key_pem.as_bytes(), mode: PRIVATE },
        NewFile { path: paths.ca_cert.clone(), contents: pki.ca_pem().as_bytes(), mode: PUBLIC },
        NewFile { path: paths.host_pin.clone(), contents: pin_line.as_bytes(), mode: PUBLIC },
        NewFile { path: paths.agent_key.clone(), contents: agent_key.as_bytes(), mode: PRIVATE },
        NewFile { path: paths.env_file.clone(), contents: env.as_bytes(), mode: PUBLIC },
    ])?;
    tracing::info!(agent_id = %agent_id, dir = %dir.display(), "wrote agent enrollment bundle");
    Ok(paths)
}

/// Refuses values an environment file (systemd `EnvironmentFile`, `docker --env-file`) would
/// misread or that could smuggle in another line: control characters, quotes, backslashes,
/// `$`, backticks, surrounding spaces, and empty or oversized values.
fn env_value(key: &'static str, value: &str) -> Result<(), TlsError> {
    let bad = |reason: &str| Err(TlsError::BadBundleValue { key, reason: reason.into() });
    if value.is_empty() {
        return bad("must not be empty");
    }
    if value.len() > 1024 {
        return bad("must be at most 1024 bytes");
    }
    if value.trim() != value {
        return bad("must not start or end with whitespace");
    }
    if value.chars().any(|c| c.is_control() || matches!(c, '"' | '\'' | '\\' | '$' | '`')) {
        return bad("must not contain control characters, quotes, backslashes, '$' or '`'");
    }
    Ok(())
}

/// `backend_url` must be `wss://HOST[:PORT][/PATH]` with HOST among the host certificate's
/// names, or the agent will refuse the host during the handshake.
fn check_backend_url(pki: &Pki, backend_url: &str) -> Result<(), TlsError> {
    const KEY: &str = "VIW_AGENT_BACKEND_URL";
    env_value(KEY, backend_url)?;
    let bad = |reason: String| Err(TlsError::BadBundleValue { key: KEY, reason });
    let Some(rest) = backend_url.strip_prefix("wss://") else {
        return bad(format!("{backend_url:?} must start with wss:// (agents connect over TLS only)"));
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.contains('@') || authority.chars().any(char::is_whitespace) {
        return bad(format!("{backend_url:?} must not hold user information or spaces"));
    }
    let (host, port) = match authority.strip_prefix('[') {
        Some(bracketed) => match bracketed.split_once(']') {
            Some((host, "")) => (host, None),
            Some((host, after)) => (host, Some(after.strip_prefix(':').unwrap_or("not a port"))),
            None => return bad(format!("{backend_url:?} has an unterminated IPv6 address")),
        },
        None => match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        },
    };
    if port.is_some_and(|port| port.parse::<u16>().is_err()) {
        return bad(format!("{backend_url:?} has an invalid port"));
    }
    if host.is_empty() {
        return bad(format!("{backend_url:?} has no host"));
    }
    if !pki.host_names().iter().any(|name| names_match(name, host)) {
        return bad(format!(
            "the host certificate is not valid for {host:?} (it names {}); use one of those names or \
             renew the host certificate with this name",
            pki.host_names().join(", ")
        ));
    }
    Ok(())
}

/// Whether certificate name `pattern` (a DNS name, `*.` wildcard or IP address) covers `host`.
fn names_match(pattern: &str, host: &str) -> bool {
    match (pattern.parse::<IpAddr>(), host.parse::<IpAddr>()) {
        (Ok(a), Ok(b)) => return a == b,
        (Err(_), Err(_)) => {}
        _ => return false,
    }
    let host = host.trim_end_matches('.');
    if let Some(suffix) = pattern.strip_prefix("*.") {
        return match host.split_once('.') {
            Some((label, rest)) => !label.is_empty() && rest.eq_ignore_ascii_case(suffix),
            None => false,
        };
    }
    pattern.eq_ignore_ascii_case(host)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use viworks_core::auth::{PinSet, SpkiPin};

    use super::*;
    use crate::tls::test_support::{self, fixture};
    use crate::tls::{IssuedAgent, pin_of_pem_file};

    const URL: &str = "wss://localhost:8443/ws/agent";

    fn agent(id: &str) -> AgentId {
        AgentId::new(id).expect("id")
    }

    #[test]
    fn the_bundle_holds_every_file_with_the_right_mode_and_environment() {
        let (_dir, pki) = fixture();
        let out = tempfile::tempdir().expect("tempdir");
        let target = out.path().join("gw-1");
        let paths = write_bundle(&pki, &agent("gw-1"), "production", URL, &target).expect("bundle");
        let dir = std::fs::canonicalize(&target).expect("canonical");
        assert_eq!(paths.dir, dir);
        let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        for (path, expected) in [
            (&paths.client_cert, 0o644),
            (&paths.client_key, 0o600),
            (&paths.ca_cert, 0o644),
            (&paths.host_pin, 0o644),
            (&paths.agent_key, 0o600),
            (&paths.env_file, 0o644),
        ] {
            assert_eq!(mode(path), expected, "{}", path.display());
        }

        let d = dir.display();
        let pin = pki.host_pin().to_base64();
        let env = std::fs::read_to_string(&paths.env_file).expect("env");
        let settings: Vec<&str> = env.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            settings,
            [
                format!("VIW_AGENT_BACKEND_URL={URL}"),
                "VIW_AGENT_ID=gw-1".to_string(),
                "VIW_AGENT_SITE=production".to_string(),
                format!("VIW_AGENT_CERT_PATH={d}/client.crt"),
                format!("VIW_AGENT_KEY_PATH={d}/client.key"),
                format!("VIW_AGENT_TRUST_BUNDLE={d}/ca.crt"),
                format!("VIW_AGENT_BACKEND_SPKI_PIN={pin}"),
                format!("VIW_AGENT_AGENT_KEY_FILE={d}/agent.key"),
            ]
        );
        assert_eq!(std::fs::read_to_string(&paths.host_pin).expect("pin"), format!("{pin}\n"));
        assert_eq!(pin_of_pem_file(&paths.client_cert).ok().map(|p| p == pki.host_pin()), Some(false));
        let key = std::fs::read_to_string(&paths.agent_key).expect("agent key");
        assert_eq!(
            viworks_core::auth::AgentKey::from_hex(&key).expect("hex"),
            AgentKey::derive(pki.master_key(), &agent("gw-1"))
        );
        assert_ne!(key.trim(), pki.master_key().to_hex());
    }

    #[tokio::test]
    async fn a_bundle_connects_to_the_host_as_its_agent() {
        let (_dir, pki) = fixture();
        let out = tempfile::tempdir().expect("tempdir");
        let paths = write_bundle(&pki, &agent("gw-bundle"), "lab", URL, out.path()).expect("bundle");
        let read = |p: &Path| std::fs::read_to_string(p).expect("read");
        let pin: SpkiPin = read(&paths.host_pin).parse().expect("pin");
        let issued = IssuedAgent { cert_pem: read(&paths.client_cert), key_pem: read(&paths.client_key) };
        let (client, _) = crate::tls::pinned_client_config(
            read(&paths.ca_cert).as_bytes(),
            issued.cert_pem.as_bytes(),
            issued.key_pem.as_bytes(),
            PinSet { primary: pin, backup: None },
        )
        .expect("client config");
        let (server, client) =
            test_support::handshake(crate::tls::agent_server_config(&pki).expect("server"), client).await;
        let server = server.expect("accepted");
        assert!(client.is_ok());
        assert_eq!(crate::tls::agent_identity(server.get_ref().1).expect("identity"), agent("gw-bundle"));
    }

    #[test]
    fn an_existing_bundle_is_never_overwritten() {
        let (_dir, pki) = fixture();
        let out = tempfile::tempdir().expect("tempdir");
        write_bundle(&pki, &agent("gw-1"), "lab", URL, out.path()).expect("first");
        let before = std::fs::read(out.path().join("client.crt")).expect("read");
        let err = write_bundle(&pki, &agent("gw-1"), "lab", URL, out.path()).expect_err("second");
        assert!(matches!(err, TlsError::AlreadyExists { .. }), "{err}");
        assert_eq!(std::fs::read(out.path().join("client.crt")).expect("read"), before);

        let partial = tempfile::tempdir().expect("tempdir");
        std::fs::write(partial.path().join("agent.env"), "mine").expect("write");
        let err = write_bundle(&pki, &agent("gw-2"), "lab", URL, partial.path()).expect_err("refused");
        assert!(err.to_string().contains("agent.env"), "{err}");
        assert!(!partial.path().join("client.key").exists(), "nothing is written");
    }

    #[test]
    fn unsafe_or_unreachable_values_are_refused() {
        let (_dir, pki) = fixture();
        let out = tempfile::tempdir().expect("tempdir");
        let id = agent("gw-1");
        for (site, url) in [
            ("lab\nVIW_AGENT_SCRIPTS_ROOT=/tmp", URL),
            ("", URL),
            ("$HOME", URL),
            ("lab", "ws://localhost/ws/agent"),
            ("lab", "https://localhost/ws/agent"),
            ("lab", "wss://evil.example/ws/agent"),
            ("lab", "wss://user@localhost/ws/agent"),
            ("lab", "wss://localhost:99999/ws/agent"),
            ("lab", "wss://[::1/ws/agent"),
        ] {
            let err = write_bundle(&pki, &id, site, url, out.path()).expect_err(url);
            assert!(matches!(err, TlsError::BadBundleValue { .. }), "{site:?} {url:?}: {err}");
        }
        assert_eq!(std::fs::read_dir(out.path()).expect("dir").count(), 0, "nothing is written");
        for (i, url) in
            ["wss://127.0.0.1:8443/ws/agent", "wss://[::1]:8443/ws/agent", "wss://LOCALHOST"].iter().enumerate()
        {
            write_bundle(&pki, &id, "lab", url, &out.path().join(i.to_string())).expect(url);
        }
    }

    #[test]
    fn certificate_names_match_like_webpki() {
        assert!(names_match("*.fleet.example", "host-1.fleet.example"));
        assert!(!names_match("*.fleet.example", "fleet.example"));
        assert!(!names_match("*.fleet.example", "a.b.fleet.example"));
        assert!(names_match("::1", "0:0::1"));
        assert!(!names_match("127.0.0.1", "localhost"));
        assert!(names_match("Host.Example", "host.example."));
    }
}

//! The agent's configuration: `VIW_AGENT_*` variables from an optional TOML file, then an
//! `--env-file` (the `agent.env` of an enrollment bundle), then the environment, each
//! overriding the one before; validated fail-closed with every problem reported at once.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use thiserror::Error;
use viworks_core::auth::{AgentKey, PinSet, SpkiPin};
use viworks_core::wire::AgentId;

/// The variable prefix.
pub const PREFIX: &str = "VIW_AGENT_";

/// The scripts every agent must have under `SCRIPTS_ROOT`, executable.
pub const REQUIRED_SCRIPTS: [&str; 4] = ["add_user", "delete_user", "add_vpn_user", "delete_vpn_user"];

/// A certificate expiring sooner than this is reported as a warning.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 24 * 60 * 60);

const KNOWN: &[&str] = &[
    "BACKEND_URL",
    "ID",
    "CERT_PATH",
    "KEY_PATH",
    "TRUST_BUNDLE",
    "BACKEND_SPKI_PIN",
    "BACKEND_SPKI_PIN_BACKUP",
    "SITE",
    "CONTAINER_ENGINE",
    "SCRIPTS_ROOT",
    "MAX_CONCURRENCY",
    "CMD_TIMEOUT_SECS",
    "TELEMETRY_INTERVAL_SECS",
    "STATE_DIR",
    "AGENT_KEY",
    "AGENT_KEY_FILE",
    "EXEC_ALLOW",
    "HEALTH_ADDR",
    "LOG_FORMAT",
];

/// One problem with the configuration: the variable and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[error("{key}: {problem}")]
pub struct ConfigError {
    /// The variable, as `VIW_AGENT_NAME`, or the file that could not be read.
    pub key: String,
    /// What is wrong and how to fix it.
    pub problem: String,
}

fn problem(key: &str, text: impl Into<String>) -> ConfigError {
    let key = if key.starts_with(PREFIX) || key.contains('/') { key.to_owned() } else { format!("{PREFIX}{key}") };
    ConfigError { key, problem: text.into() }
}

/// Which container engine the agent talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContainerEngine {
    /// Docker through its Engine API on the local socket.
    Docker,
    /// None: the Docker verbs answer `unavailable`.
    None,
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// A validated agent configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// The host's agent endpoint, `wss://HOST[:PORT]/PATH`.
    pub backend_url: String,
    /// Its host name, checked against the host certificate.
    pub backend_host: String,
    /// Its port (443 when the URL names none).
    pub backend_port: u16,
    /// This agent's identity.
    pub agent_id: AgentId,
    /// Its site.
    pub site: String,
    /// The client certificate (PEM).
    pub cert_path: PathBuf,
    /// Its private key (PEM).
    pub key_path: PathBuf,
    /// The CA that issued the host's certificate (PEM).
    pub trust_bundle: PathBuf,
    /// The host's SPKI pins.
    pub pins: PinSet,
    /// The container engine.
    pub container_engine: ContainerEngine,
    /// Where the user and VPN-user scripts live.
    pub scripts_root: PathBuf,
    /// Commands run at once (1–64).
    pub max_concurrency: u32,
    /// The longest any command may run on this machine, whatever the host asks (1–3600 s,
    /// default 3600: the host's per-verb limits apply). Lower it to bound commands locally.
    pub cmd_timeout: Duration,
    /// Telemetry interval (5–3600 s).
    pub telemetry_interval: Duration,
    /// The agent's state: execution ledger and outbox.
    pub state_dir: PathBuf,
    /// The message key from the enrollment bundle.
    pub agent_key: AgentKey,
    /// Absolute paths `exec` may run; empty means `exec` is off.
    pub exec_allow: Vec<PathBuf>,
    /// The local liveness endpoint, loopback only; off by default.
    pub health_addr: Option<SocketAddr>,
    /// Log format.
    pub log_format: LogFormat,
}

/// The configuration and what is worth knowing about it but does not stop the agent.
#[derive(Clone, Debug)]
pub struct Validated {
    /// The configuration.
    pub config: Config,
    /// Warnings, such as a certificate expiring within 30 days.
    pub warnings: Vec<String>,
}

/// Raw `NAME → value` settings (names without the prefix), gathered from every source.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Settings(pub BTreeMap<String, String>);

impl Settings {
    /// Reads a TOML file of `lower_case_name = value` pairs (strings, integers or arrays of
    /// strings for `exec_allow`).
    pub fn merge_toml(&mut self, path: &Path) -> Result<(), Vec<ConfigError>> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| vec![problem(&path.display().to_string(), format!("cannot read: {e}"))])?;
        let table: toml::Table = toml::from_str(&text)
            .map_err(|e| vec![problem(&path.display().to_string(), format!("not valid TOML: {e}"))])?;
        let mut errors = Vec::new();
        for (key, value) in table {
            let name = key.to_uppercase();
            let text = match value {
                toml::Value::String(s) => s,
                toml::Value::Integer(n) => n.to_string(),
                toml::Value::Array(items) => items.iter().filter_map(|v| v.as_str()).collect::<Vec<_>>().join(","),
                _ => {
                    errors.push(problem(&name, "must be a string, an integer or a list of strings"));
                    continue;
                }
            };
            self.set(&name, text, &mut errors);
        }
        if errors.is_empty() { Ok(()) } else { Err(errors) }
    }

    /// Reads an env file: `VIW_AGENT_NAME=value` lines; blank lines and `#` comments allowed.
    pub fn merge_env_file(&mut self, path: &Path) -> Result<(), Vec<ConfigError>> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| vec![problem(&path.display().to_string(), format!("cannot read: {e}"))])?;
        let mut errors = Vec::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match line.split_once('=').and_then(|(k, v)| k.trim().strip_prefix(PREFIX).map(|k| (k, v))) {
                Some((name, value)) => self.set(name, value.trim().to_owned(), &mut errors),
                None => errors.push(problem(
                    &path.display().to_string(),
                    format!("line {} is not VIW_AGENT_NAME=value", number + 1),
                )),
            }
        }
        if errors.is_empty() { Ok(()) } else { Err(errors) }
    }

    /// Takes every `VIW_AGENT_*` variable from `env`.
    pub fn merge_env(&mut self, env: impl IntoIterator<Item = (String, String)>) -> Result<(), Vec<ConfigError>> {
        let mut errors = Vec::new();
        for (key, value) in env {
            if let Some(name) = key.strip_prefix(PREFIX) {
                self.set(name, value, &mut errors);
            }
        }
        if errors.is_empty() { Ok(()) } else { Err(errors) }
    }

    fn set(&mut self, name: &str, value: String, errors: &mut Vec<ConfigError>) {
        if KNOWN.contains(&name) {
            self.0.insert(name.to_owned(), value);
        } else {
            errors.push(problem(name, "unknown setting"));
        }
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str).filter(|v| !v.is_empty())
    }
}

/// Validates `settings` at wall-clock time `now`, reporting every problem at once.
pub fn validate(settings: &Settings, now: SystemTime) -> Result<Validated, Vec<ConfigError>> {
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    let required = |name: &str, errors: &mut Vec<ConfigError>| -> String {
        settings.get(name).map(str::to_owned).unwrap_or_else(|| {
            errors.push(problem(name, "is required"));
            String::new()
        })
    };
    let backend_url = required("BACKEND_URL", &mut errors);
    let (backend_host, backend_port) = match parse_wss(&backend_url) {
        Ok(parts) => parts,
        Err(text) => {
            if !backend_url.is_empty() {
                errors.push(problem("BACKEND_URL", text));
            }
            (String::new(), 0)
        }
    };
    let id = required("ID", &mut errors);
    let agent_id = AgentId::new(id.clone()).map_err(|e| {
        if !id.is_empty() {
            errors.push(problem("ID", e.to_string()));
        }
    });
    let site = required("SITE", &mut errors);
    if site.chars().any(char::is_control) || site.len() > 255 {
        errors.push(problem("SITE", "must be at most 255 printable characters"));
    }
    let cert_path = PathBuf::from(required("CERT_PATH", &mut errors));
    let key_path = PathBuf::from(required("KEY_PATH", &mut errors));
    let trust_bundle = PathBuf::from(required("TRUST_BUNDLE", &mut errors));
    if !cert_path.as_os_str().is_empty() {
        check_certificate("CERT_PATH", &cert_path, now, &mut errors, &mut warnings);
    }
    if !key_path.as_os_str().is_empty() {
        match std::fs::read_to_string(&key_path) {
            Ok(text) if text.contains("PRIVATE KEY-----") => {}
            Ok(_) => errors.push(problem("KEY_PATH", format!("{} holds no PEM private key", key_path.display()))),
            Err(e) => errors.push(problem("KEY_PATH", format!("cannot read {}: {e}", key_path.display()))),
        }
    }
    if !trust_bundle.as_os_str().is_empty() {
        check_certificate("TRUST_BUNDLE", &trust_bundle, now, &mut errors, &mut warnings);
    }
    let pin = |name: &str, errors: &mut Vec<ConfigError>| -> Option<SpkiPin> {
        settings.get(name).and_then(|text| {
            text.parse().map_err(|_| errors.push(problem(name, "is not base64 of 32 bytes (a SHA-256 SPKI pin)"))).ok()
        })
    };
    if settings.get("BACKEND_SPKI_PIN").is_none() {
        errors.push(problem("BACKEND_SPKI_PIN", "is required: the agent only trusts a pinned host key"));
    }
    let primary = pin("BACKEND_SPKI_PIN", &mut errors);
    let backup = pin("BACKEND_SPKI_PIN_BACKUP", &mut errors);
    let container_engine = match settings.get("CONTAINER_ENGINE").unwrap_or("docker") {
        "docker" => ContainerEngine::Docker,
        "none" => ContainerEngine::None,
        other => {
            errors.push(problem("CONTAINER_ENGINE", format!("{other:?} is neither docker nor none")));
            ContainerEngine::None
        }
    };
    let scripts_root = PathBuf::from(settings.get("SCRIPTS_ROOT").unwrap_or("/opt/viworks/agent/scripts"));
    for script in REQUIRED_SCRIPTS {
        let path = scripts_root.join(script);
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_file() && is_executable(&meta) => {}
            Ok(_) => errors.push(problem("SCRIPTS_ROOT", format!("{} is not an executable file", path.display()))),
            Err(_) => errors.push(problem("SCRIPTS_ROOT", format!("{} is missing", path.display()))),
        }
    }
    let number = |name: &str, default: u64, min: u64, max: u64, errors: &mut Vec<ConfigError>| -> u64 {
        match settings.get(name) {
            None => default,
            Some(text) => match text.parse::<u64>() {
                Ok(n) if (min..=max).contains(&n) => n,
                _ => {
                    errors.push(problem(name, format!("{text:?} is not a whole number in {min}..={max}")));
                    default
                }
            },
        }
    };
    let max_concurrency = number("MAX_CONCURRENCY", 4, 1, 64, &mut errors) as u32;
    let cmd_timeout = Duration::from_secs(number("CMD_TIMEOUT_SECS", 3600, 1, 3600, &mut errors));
    let telemetry_interval = Duration::from_secs(number("TELEMETRY_INTERVAL_SECS", 30, 5, 3600, &mut errors));
    let state_dir = PathBuf::from(settings.get("STATE_DIR").unwrap_or("/var/lib/viworks-agent"));
    if state_dir.is_relative() {
        errors.push(problem("STATE_DIR", "must be an absolute path"));
    }
    let agent_key = match (settings.get("AGENT_KEY"), settings.get("AGENT_KEY_FILE")) {
        (Some(_), Some(_)) => Err(problem("AGENT_KEY", "give AGENT_KEY or AGENT_KEY_FILE, not both")),
        (Some(text), None) => AgentKey::from_hex(text).map_err(|_| problem("AGENT_KEY", "is not 64 hex digits")),
        (None, Some(path)) => match std::fs::read_to_string(path) {
            Ok(text) => AgentKey::from_hex(&text)
                .map_err(|_| problem("AGENT_KEY_FILE", format!("{path} does not hold 64 hex digits"))),
            Err(e) => Err(problem("AGENT_KEY_FILE", format!("cannot read {path}: {e}"))),
        },
        (None, None) => {
            Err(problem("AGENT_KEY_FILE", "is required (or AGENT_KEY): the key from the enrollment bundle"))
        }
    };
    let agent_key = agent_key.map_err(|e| errors.push(e)).ok();
    let exec_allow: Vec<PathBuf> = settings
        .get("EXEC_ALLOW")
        .map(|list| list.split(',').map(str::trim).filter(|p| !p.is_empty()).map(PathBuf::from).collect())
        .unwrap_or_default();
    for path in &exec_allow {
        if path.is_relative() || path.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
            errors.push(problem("EXEC_ALLOW", format!("{} is not an absolute path without `..`", path.display())));
        }
    }
    let health_addr = settings.get("HEALTH_ADDR").and_then(|text| match text.parse::<SocketAddr>() {
        Ok(addr) if addr.ip().is_loopback() => Some(addr),
        _ => {
            errors.push(problem("HEALTH_ADDR", format!("{text:?} is not a loopback HOST:PORT such as 127.0.0.1:9101")));
            None
        }
    });
    let log_format = match settings.get("LOG_FORMAT").unwrap_or("text") {
        "text" => LogFormat::Text,
        "json" => LogFormat::Json,
        other => {
            errors.push(problem("LOG_FORMAT", format!("{other:?} is neither text nor json")));
            LogFormat::Text
        }
    };
    match (errors.is_empty(), agent_id, primary, agent_key) {
        (true, Ok(agent_id), Some(primary), Some(agent_key)) => Ok(Validated {
            config: Config {
                backend_url,
                backend_host,
                backend_port,
                agent_id,
                site,
                cert_path,
                key_path,
                trust_bundle,
                pins: PinSet { primary, backup },
                container_engine,
                scripts_root,
                max_concurrency,
                cmd_timeout,
                telemetry_interval,
                state_dir,
                agent_key,
                exec_allow,
                health_addr,
                log_format,
            },
            warnings,
        }),
        _ => Err(errors),
    }
}

/// Splits `wss://HOST[:PORT]/PATH` into host and port.
fn parse_wss(url: &str) -> Result<(String, u16), String> {
    let rest = url.strip_prefix("wss://").ok_or("must start with wss:// (the agent only dials TLS)")?;
    let (authority, path) = rest.split_once('/').ok_or("must name a path, as in wss://host:8443/ws/agent")?;
    if path.is_empty() || authority.is_empty() {
        return Err("must be wss://HOST[:PORT]/PATH".into());
    }
    let bracketed = authority.starts_with('[') && authority.ends_with(']');
    let (host, port) = match authority.rsplit_once(':').filter(|_| !bracketed) {
        Some((host, port)) if !host.ends_with(']') || authority.starts_with('[') => {
            (host, port.parse::<u16>().map_err(|_| format!("port {port:?} is not a number"))?)
        }
        _ => (authority, 443),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c == '@') {
        return Err(format!("host {host:?} is not a host name or address"));
    }
    Ok((host.to_owned(), port))
}

fn is_executable(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & 0o111 != 0
}

fn check_certificate(
    name: &str,
    path: &Path,
    now: SystemTime,
    errors: &mut Vec<ConfigError>,
    warnings: &mut Vec<String>,
) {
    let text = match std::fs::read(path) {
        Ok(text) => text,
        Err(e) => return errors.push(problem(name, format!("cannot read {}: {e}", path.display()))),
    };
    let Ok((_, pem)) = x509_parser::pem::parse_x509_pem(&text) else {
        return errors.push(problem(name, format!("{} holds no PEM certificate", path.display())));
    };
    let Ok((_, certificate)) = x509_parser::parse_x509_certificate(&pem.contents) else {
        return errors.push(problem(name, format!("{} is not a valid X.509 certificate", path.display())));
    };
    let now_secs = now.duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let validity = certificate.validity();
    let (not_before, not_after) = (validity.not_before.timestamp(), validity.not_after.timestamp());
    if now_secs < not_before {
        errors.push(problem(name, format!("{} is not valid yet", path.display())));
    } else if now_secs > not_after {
        errors.push(problem(name, format!("{} expired; enroll the agent again", path.display())));
    } else if not_after - now_secs < EXPIRY_WARNING.as_secs() as i64 {
        let days = (not_after - now_secs) / 86_400;
        warnings.push(format!("{PREFIX}{name}: {} expires in {days} days", path.display()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Bundle {
        dir: tempfile::TempDir,
    }

    impl Bundle {
        fn new(valid_for: Duration) -> Bundle {
            let dir = tempfile::tempdir().expect("dir");
            let mut params = rcgen::CertificateParams::new(vec!["gw-1".into()]).expect("params");
            let now = SystemTime::now();
            params.not_before = (now - Duration::from_secs(3600)).into();
            params.not_after = (now + valid_for).into();
            let key = rcgen::KeyPair::generate().expect("key");
            let cert = params.self_signed(&key).expect("cert");
            std::fs::write(dir.path().join("client.crt"), cert.pem()).expect("write");
            std::fs::write(dir.path().join("ca.crt"), cert.pem()).expect("write");
            std::fs::write(dir.path().join("client.key"), key.serialize_pem()).expect("write");
            std::fs::write(dir.path().join("agent.key"), format!("{}\n", "ab".repeat(32))).expect("write");
            let scripts = dir.path().join("scripts");
            std::fs::create_dir(&scripts).expect("dir");
            for script in REQUIRED_SCRIPTS {
                let path = scripts.join(script);
                std::fs::write(&path, "#!/bin/sh\n").expect("write");
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
            }
            Bundle { dir }
        }

        fn env_file(&self) -> PathBuf {
            let d = self.dir.path().display();
            let text = format!(
                "# enrolled\nVIW_AGENT_BACKEND_URL=wss://localhost:8443/ws/agent\nVIW_AGENT_ID=gw-1\nVIW_AGENT_SITE=fra\n\
                 VIW_AGENT_CERT_PATH={d}/client.crt\nVIW_AGENT_KEY_PATH={d}/client.key\nVIW_AGENT_TRUST_BUNDLE={d}/ca.crt\n\
                 VIW_AGENT_BACKEND_SPKI_PIN={}\nVIW_AGENT_AGENT_KEY_FILE={d}/agent.key\nVIW_AGENT_SCRIPTS_ROOT={d}/scripts\n\
                 VIW_AGENT_STATE_DIR={d}/state\n",
                SpkiPin::of_spki_der(b"host key")
            );
            let path = self.dir.path().join("agent.env");
            std::fs::write(&path, text).expect("write");
            path
        }
    }

    fn settings(bundle: &Bundle, env: &[(&str, &str)]) -> Settings {
        let mut settings = Settings::default();
        settings.merge_env_file(&bundle.env_file()).expect("env file");
        settings.merge_env(env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))).expect("env");
        settings
    }

    #[test]
    fn an_enrollment_bundle_is_a_valid_configuration() {
        let bundle = Bundle::new(Duration::from_secs(365 * 86_400));
        let validated = validate(&settings(&bundle, &[]), SystemTime::now()).expect("valid");
        let config = validated.config;
        assert_eq!((config.backend_host.as_str(), config.backend_port), ("localhost", 8443));
        assert_eq!(config.agent_id.as_str(), "gw-1");
        assert_eq!(config.max_concurrency, 4);
        assert_eq!(config.telemetry_interval, Duration::from_secs(30));
        assert!(config.exec_allow.is_empty(), "exec is off unless allowed");
        assert!(validated.warnings.is_empty());
    }

    #[test]
    fn the_environment_overrides_the_env_file() {
        let bundle = Bundle::new(Duration::from_secs(365 * 86_400));
        let settings = settings(&bundle, &[("VIW_AGENT_MAX_CONCURRENCY", "8"), ("PATH", "/bin")]);
        assert_eq!(validate(&settings, SystemTime::now()).expect("valid").config.max_concurrency, 8);
    }

    #[test]
    fn every_problem_is_listed_at_once() {
        let bundle = Bundle::new(Duration::from_secs(365 * 86_400));
        std::fs::remove_file(bundle.dir.path().join("scripts/delete_vpn_user")).expect("remove");
        let settings = settings(
            &bundle,
            &[
                ("VIW_AGENT_BACKEND_URL", "https://host/ws/agent"),
                ("VIW_AGENT_BACKEND_SPKI_PIN", "not-a-pin"),
                ("VIW_AGENT_MAX_CONCURRENCY", "0"),
                ("VIW_AGENT_CMD_TIMEOUT_SECS", "99999"),
                ("VIW_AGENT_EXEC_ALLOW", "relative/tool"),
                ("VIW_AGENT_HEALTH_ADDR", "0.0.0.0:9101"),
            ],
        );
        let errors = validate(&settings, SystemTime::now()).expect_err("invalid");
        let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
        for key in [
            "VIW_AGENT_BACKEND_URL",
            "VIW_AGENT_BACKEND_SPKI_PIN",
            "VIW_AGENT_SCRIPTS_ROOT",
            "VIW_AGENT_MAX_CONCURRENCY",
            "VIW_AGENT_CMD_TIMEOUT_SECS",
            "VIW_AGENT_EXEC_ALLOW",
            "VIW_AGENT_HEALTH_ADDR",
        ] {
            assert!(keys.contains(&key), "{key} missing from {errors:?}");
        }
    }

    #[test]
    fn missing_required_settings_are_each_named() {
        let errors = validate(&Settings::default(), SystemTime::now()).expect_err("invalid");
        let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
        for key in
            ["BACKEND_URL", "ID", "SITE", "CERT_PATH", "KEY_PATH", "TRUST_BUNDLE", "BACKEND_SPKI_PIN", "AGENT_KEY_FILE"]
        {
            assert!(keys.contains(&format!("{PREFIX}{key}").as_str()), "{key} missing from {keys:?}");
        }
    }

    #[test]
    fn an_expired_certificate_is_an_error_and_one_near_expiry_a_warning() {
        let soon = Bundle::new(Duration::from_secs(10 * 86_400));
        let validated = validate(&settings(&soon, &[]), SystemTime::now()).expect("still valid");
        assert_eq!(validated.warnings.len(), 2, "client and CA certificates: {:?}", validated.warnings);
        let later = SystemTime::now() + Duration::from_secs(20 * 86_400);
        let errors = validate(&settings(&soon, &[]), later).expect_err("expired");
        assert!(errors.iter().any(|e| e.key == "VIW_AGENT_CERT_PATH" && e.problem.contains("expired")));
    }

    #[test]
    fn unknown_settings_and_malformed_lines_are_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("agent.env");
        std::fs::write(&path, "VIW_AGENT_NOPE=1\nnot a setting\n").expect("write");
        let errors = Settings::default().merge_env_file(&path).expect_err("refused");
        assert_eq!(errors.len(), 2);
        let toml = dir.path().join("agent.toml");
        std::fs::write(&toml, "max_concurrency = 2\nexec_allow = [\"/usr/bin/uptime\"]\n").expect("write");
        let mut settings = Settings::default();
        settings.merge_toml(&toml).expect("valid toml");
        assert_eq!(settings.get("EXEC_ALLOW"), Some("/usr/bin/uptime"));
    }

    #[test]
    fn backend_urls_must_be_wss_with_a_path() {
        assert_eq!(parse_wss("wss://h.example/ws/agent"), Ok(("h.example".into(), 443)));
        assert_eq!(parse_wss("wss://[::1]:8443/ws/agent"), Ok(("::1".into(), 8443)));
        assert_eq!(parse_wss("wss://[::1]/ws/agent"), Ok(("::1".into(), 443)));
        assert!(parse_wss("ws://h/ws").is_err());
        assert!(parse_wss("wss://h").is_err());
        assert!(parse_wss("wss://h:x/ws").is_err());
    }
}

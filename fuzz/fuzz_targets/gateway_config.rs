//! Any settings file, TOML or env-file, merges and validates to a configuration or to a list
//! of problems that each name a `VIW_AGENT_` setting (or the file) — never a panic.
//!
//! The first byte chooses the format; the first chunk is the file's text. Settings that name
//! files (certificates, keys, the scripts root) are pointed into a scratch directory whose
//! files hold the next chunks, so that validation reads fuzzed certificates and keys and
//! never the machine's own files.

#![no_main]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use viworks_fuzz::Script;
use viworks_gateway::config::{self, PREFIX, Settings};

/// The settings that name a file or directory, and the scratch file each is pointed at.
const FILES: &[(&str, &str)] = &[
    ("CERT_PATH", "cert.pem"),
    ("KEY_PATH", "key.pem"),
    ("TRUST_BUNDLE", "ca.pem"),
    ("AGENT_KEY_FILE", "agent.key"),
    ("SCRIPTS_ROOT", "scripts"),
];

/// A scratch directory for this process.
fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("viworks-fuzz-gateway-config-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("scripts")).expect("the scratch directory can be created");
        for name in config::REQUIRED_SCRIPTS {
            let path = dir.join("scripts").join(name);
            std::fs::write(&path, "#!/bin/sh\n").expect("a scratch script can be written");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("it can be made executable");
        }
        dir
    })
}

fuzz_target!(|data: &[u8]| {
    let mut script = Script::new(data);
    let toml = script.byte().unwrap_or(0).is_multiple_of(2);
    let text = script.chunk();
    let dir = scratch();
    let settings_file = dir.join(if toml { "agent.toml" } else { "agent.env" });
    std::fs::write(&settings_file, text).expect("the scratch file can be written");

    let mut settings = Settings::default();
    let merged = if toml { settings.merge_toml(&settings_file) } else { settings.merge_env_file(&settings_file) };
    if let Err(errors) = &merged {
        assert!(!errors.is_empty(), "a failed merge says why");
    }
    for &(name, file) in FILES {
        if settings.0.contains_key(name) {
            let path = dir.join(file);
            if file != "scripts" {
                std::fs::write(&path, script.chunk()).expect("the scratch file can be written");
            }
            settings.0.insert(name.to_owned(), path.display().to_string());
        }
    }

    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600);
    match config::validate(&settings, now) {
        Ok(validated) => {
            let config = validated.config;
            assert!((1..=64).contains(&config.max_concurrency));
            assert!(config.state_dir.is_absolute());
        }
        Err(errors) => {
            assert!(!errors.is_empty(), "a refused configuration says why");
            for error in &errors {
                assert!(error.key.starts_with(PREFIX) || error.key.contains('/'), "{:?} names no setting", error.key);
            }
        }
    }
});

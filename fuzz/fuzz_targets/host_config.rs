//! Any TOML text parses to a host configuration file or a TOML error, and any file that
//! parses resolves to a configuration within the documented bounds or to a list of problems
//! that each name a key — never a panic.
//!
//! The whole input is the file's text.

#![no_main]

use libfuzzer_sys::fuzz_target;
use viworks_host::config::{FileConfig, Overrides};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(file) = FileConfig::parse(text) else { return };
    match file.resolve(&Overrides::default()) {
        Ok(config) => {
            let timers = config.control.host.timers;
            assert!(timers.liveness_timeout >= timers.heartbeat_interval * 2);
            assert!(config.public_url.starts_with("wss://"));
            assert!(config.control.host.max_sessions >= 1);
        }
        Err(errors) => {
            assert!(!errors.is_empty(), "a refused configuration says why");
            for error in &errors {
                assert!(!error.key.is_empty(), "every problem names its key");
            }
        }
    }
});

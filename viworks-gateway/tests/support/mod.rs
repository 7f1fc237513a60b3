//! End-to-end fixtures: `viworks-host` and `viworks-gateway` started as real processes from
//! their binaries, on loopback, with a data directory made by `viworks-host init` and agents
//! enrolled by `viworks-host agent enroll`.

#![allow(dead_code, unused_imports)]

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

#[path = "../../../viworks-host/tests/support/http.rs"]
mod http;
pub use http::{Response, eventually, http};

/// The gateway binary under test.
pub fn gateway_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_viworks-gateway"))
}

/// The host binary: built beside the gateway by `cargo test --workspace`, or built here.
pub fn host_bin() -> PathBuf {
    let path = gateway_bin().with_file_name("viworks-host");
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let status = Command::new(cargo)
            .args(["build", "-p", "viworks-host", "--bin", "viworks-host"])
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building viworks-host");
    }
    path
}

/// A free loopback port, for a process that is told its address up front.
pub fn free_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binds");
    listener.local_addr().expect("addr")
}

/// Runs the host CLI to completion, returning `key=value` lines of its output.
pub fn host_cli(args: &[&str]) -> Vec<(String, String)> {
    let output = Command::new(host_bin()).args(args).output().expect("the host binary runs");
    assert!(output.status.success(), "viworks-host {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// The value of `key` in [`host_cli`] output.
pub fn value(lines: &[(String, String)], key: &str) -> String {
    lines.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone()).unwrap_or_else(|| panic!("no {key} in {lines:?}"))
}

/// A process whose standard error goes to a file the test can read.
pub struct Process {
    pub child: Child,
    pub log: PathBuf,
}

impl Process {
    /// Everything it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until its log contains `needle`.
    pub async fn logged(&self, needle: &str, within: Duration) -> bool {
        eventually(within, async || self.log().contains(needle)).await
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        for _ in 0..300 {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill();
        None
    }

    /// The peak resident memory of the process, from `/proc`, in bytes.
    pub fn peak_rss(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A host data directory, the host process and the agents enrolled on it.
pub struct Fleet {
    pub dir: tempfile::TempDir,
    pub data_dir: PathBuf,
    pub admin_token: String,
    pub host_pin: String,
    pub api: SocketAddr,
    pub agents: SocketAddr,
    pub host: Option<Process>,
    host_starts: u32,
}

impl Fleet {
    /// `viworks-host init` in a fresh directory; the host is not started yet.
    pub fn new() -> Fleet {
        let dir = tempfile::tempdir().expect("tempdir");
        let data_dir = dir.path().join("host");
        let lines = host_cli(&["init", "--data-dir", data_dir.to_str().expect("utf-8")]);
        Fleet {
            admin_token: value(&lines, "admin_token"),
            host_pin: value(&lines, "host_pin"),
            data_dir,
            api: free_addr(),
            agents: free_addr(),
            host: None,
            host_starts: 0,
            dir,
        }
    }

    /// The URL agents dial.
    pub fn backend_url(&self) -> String {
        format!("wss://localhost:{}/ws/agent", self.agents.port())
    }

    /// `viworks-host agent enroll ID`; returns the bundle directory.
    pub fn enroll(&self, id: &str) -> PathBuf {
        let out = self.dir.path().join("bundles").join(id);
        let url = self.backend_url();
        host_cli(&[
            "agent",
            "enroll",
            id,
            "--site",
            "lab",
            "--out",
            out.to_str().expect("utf-8"),
            "--backend-url",
            &url,
            "--data-dir",
            self.data_dir.to_str().expect("utf-8"),
        ]);
        out
    }

    /// Starts `viworks-host serve` and waits until it answers `/health`.
    pub async fn start_host(&mut self) {
        self.host_starts += 1;
        let log = self.dir.path().join(format!("host-{}.log", self.host_starts));
        let child = Command::new(host_bin())
            .args(["serve", "--data-dir"])
            .arg(&self.data_dir)
            .args(["--api-addr", &self.api.to_string(), "--agent-addr", &self.agents.to_string()])
            .env("VIW_HOST_HEARTBEAT_SECS", "1")
            .env("VIW_HOST_LIVENESS_SECS", "3")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("the host binary starts");
        self.host = Some(Process { child, log });
        let api = self.api;
        let up = eventually(Duration::from_secs(15), async || {
            http(api, "GET", "/health", None, &[], None).await.status == 200
        })
        .await;
        assert!(up, "the host answered /health");
    }

    /// SIGKILLs the host.
    pub fn kill_host(&mut self) {
        if let Some(mut host) = self.host.take() {
            host.kill();
        }
    }

    /// The host's log so far.
    pub fn host_log(&self) -> String {
        self.host.as_ref().map(Process::log).unwrap_or_default()
    }

    /// Submits `verb` with `args` to `agent` through the REST API; returns the command id.
    pub async fn submit(&self, agent: &str, verb: &str, args: serde_json::Value, timeout_secs: u64) -> String {
        let body = serde_json::json!({"verb": verb, "args": args, "targets": [agent], "timeout_secs": timeout_secs});
        let response = http(self.api, "POST", "/api/v1/commands", Some(&self.admin_token), &[], Some(&body)).await;
        assert_eq!(response.status, 202, "submit {verb}: {}", response.body);
        response.json()["commands"][0]["command_id"].as_str().expect("a command id").to_owned()
    }

    /// The command as the REST API shows it.
    pub async fn command(&self, id: &str) -> serde_json::Value {
        http(self.api, "GET", &format!("/api/v1/commands/{id}"), Some(&self.admin_token), &[], None).await.json()
    }

    /// Waits until the command has a stored result; returns the command.
    pub async fn result(&self, id: &str, within: Duration) -> serde_json::Value {
        let mut last = serde_json::Value::Null;
        let done = eventually(within, async || {
            last = self.command(id).await;
            !last["result"].is_null() && last["terminal"] == true
        })
        .await;
        assert!(done, "no result for {id} within {within:?}: {last}");
        last
    }

    /// Whether the host reports `agent` online.
    pub async fn online(&self, agent: &str) -> bool {
        let response =
            http(self.api, "GET", &format!("/api/v1/agents/{agent}"), Some(&self.admin_token), &[], None).await;
        response.json()["status"] == "online"
    }

    /// Waits until `agent` is online.
    pub async fn wait_online(&self, agent: &str, within: Duration) -> bool {
        eventually(within, async || self.online(agent).await).await
    }
}

/// A gateway agent's directory: its scripts and state, and the process when running.
pub struct Gateway {
    pub bundle: PathBuf,
    pub scripts: PathBuf,
    pub state: PathBuf,
    pub env: Vec<(String, String)>,
    pub process: Option<Process>,
    starts: u32,
}

/// A script that records each run (its argv, NUL-separated, in `runs/<name>.<pid>`) and then
/// does what `behaviour` says (shell code, run after the record is written).
pub fn recording_script(dir: &Path, name: &str, behaviour: &str) {
    let runs = dir.join("runs");
    std::fs::create_dir_all(&runs).expect("runs dir");
    let script = format!("#!/bin/sh\nprintf '%s\\0' \"$@\" > '{runs}/{name}.'$$\n{behaviour}\n", runs = runs.display());
    let path = dir.join(name);
    std::fs::write(&path, script).expect("script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

impl Gateway {
    /// A gateway for `bundle` with the four scripts recording their runs and succeeding.
    pub fn new(fleet: &Fleet, bundle: PathBuf) -> Gateway {
        let name = bundle.file_name().and_then(|n| n.to_str()).expect("named").to_owned();
        let root = fleet.dir.path().join("gateways").join(&name);
        let scripts = root.join("scripts");
        std::fs::create_dir_all(&scripts).expect("scripts dir");
        for script in ["add_user", "delete_user", "add_vpn_user", "delete_vpn_user"] {
            recording_script(&scripts, script, "echo done");
        }
        let state = root.join("state");
        Gateway { bundle, scripts, state, env: Vec::new(), process: None, starts: 0 }
    }

    /// Runs of `script` recorded so far, each as its argv.
    pub fn runs(&self, script: &str) -> Vec<Vec<String>> {
        let mut runs = Vec::new();
        let Ok(entries) = std::fs::read_dir(self.scripts.join("runs")) else { return runs };
        for entry in entries.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            if file.rsplit_once('.').map(|(name, _)| name) == Some(script) {
                let bytes = std::fs::read(entry.path()).unwrap_or_default();
                let argv = bytes
                    .split(|b| *b == 0)
                    .filter(|s| !s.is_empty())
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .collect();
                runs.push(argv);
            }
        }
        runs
    }

    /// Sets an extra `VIW_AGENT_*` variable for the next start.
    pub fn set(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_owned(), value.to_owned()));
    }

    /// Starts `viworks-gateway --env-file BUNDLE/agent.env`.
    pub fn start(&mut self) {
        self.starts += 1;
        let log = self.state.with_file_name(format!("gateway-{}.log", self.starts));
        let mut command = Command::new(gateway_bin());
        command
            .arg("--env-file")
            .arg(self.bundle.join("agent.env"))
            .env("VIW_AGENT_SCRIPTS_ROOT", &self.scripts)
            .env("VIW_AGENT_STATE_DIR", &self.state)
            .env("VIW_AGENT_CONTAINER_ENGINE", "none")
            .env("VIW_AGENT_TELEMETRY_INTERVAL_SECS", "5")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"));
        for (key, value) in &self.env {
            command.env(key, value);
        }
        let child = command.spawn().expect("the gateway binary starts");
        self.process = Some(Process { child, log });
    }

    /// SIGKILLs the gateway.
    pub fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill();
        }
    }

    /// The running gateway's log.
    pub fn log(&self) -> String {
        self.process.as_ref().map(Process::log).unwrap_or_default()
    }

    /// Waits until the running gateway's log contains `needle`.
    pub async fn logged(&self, needle: &str, within: Duration) -> bool {
        match &self.process {
            Some(process) => process.logged(needle, within).await,
            None => false,
        }
    }
}

//! The Docker verbs against the real engine at `/var/run/docker.sock`, with a busybox image
//! built on the spot (the engine needs no registry). On a machine without an engine socket
//! each test prints why and passes. With a socket, an engine that does not answer or a
//! missing `/bin/busybox` is also a printed skip, except under `CI=true`, where it fails.

#[path = "support/docker_image.rs"]
mod docker_image;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use viworks_core::verbs::{Args, spec};
use viworks_gateway::executor::{Docker, DockerError};

use docker_image::{Containers, TEST_IMAGE, engine};

/// The output cap the verbs run with, unless a test is about the cap.
const CAP: usize = 64 * 1024;
/// A container that prints a line and then idles; `sh` as PID 1 ignores SIGTERM, so a stop
/// waits the whole grace period, which the tests keep at one second.
const SLEEPER: [&str; 4] = ["/bin/busybox", "sh", "-c", "echo hello; sleep 300"];

fn args(verb: &str, args: Value) -> Args {
    spec(verb).expect("a known verb").parse(&args).expect("valid arguments")
}

async fn call(docker: &Docker, verb: &str, arguments: Value) -> Result<Value, DockerError> {
    docker.run(&args(verb, arguments), CAP).await
}

async fn ok(docker: &Docker, verb: &str, arguments: Value) -> Value {
    match call(docker, verb, arguments.clone()).await {
        Ok(value) => value,
        Err(err) => panic!("{verb} {arguments} failed: {} ({err})", err.code()),
    }
}

async fn code(docker: &Docker, verb: &str, arguments: Value) -> &'static str {
    match call(docker, verb, arguments.clone()).await {
        Ok(value) => panic!("{verb} {arguments} should have failed, returned {value}"),
        Err(err) => err.code(),
    }
}

/// Starts [`SLEEPER`] named `name`.
async fn run_sleeper(docker: &Docker, name: &str) -> Value {
    ok(docker, "docker.run", json!({"image": TEST_IMAGE, "name": name, "command": SLEEPER})).await
}

/// The entry of `docker.ps` for `name`, if listed.
async fn listed(docker: &Docker, name: &str, all: bool) -> Option<Value> {
    let ps = ok(docker, "docker.ps", json!({"all": all})).await;
    let containers = ps["containers"].as_array().expect("a list of containers").clone();
    containers.into_iter().find(|c| c["names"].as_array().is_some_and(|names| names.contains(&json!(name))))
}

/// The logs of `name` once they contain `needle` (the container may not have written yet).
async fn logs_containing(docker: &Docker, name: &str, needle: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let logs = ok(docker, "docker.logs", json!({"container": name})).await;
        if logs["text"].as_str().is_some_and(|text| text.contains(needle)) || Instant::now() > deadline {
            return logs;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_container_runs_is_inspected_and_goes_through_its_lifecycle() {
    let Some(docker) = engine().await else { return };
    let mut containers = Containers::default();
    let name = containers.name();
    let target = json!({"container": name});
    assert_eq!(listed(&docker, &name, true).await, None, "not listed before it exists");

    let run = ok(
        &docker,
        "docker.run",
        json!({
            "image": TEST_IMAGE,
            "name": name,
            "env": {"GREETING": "hi", "SECRET_TOKEN": "hunter2-do-not-leak"},
            "memory_mb": 64,
            "cpus": 0.5,
            "restart": "no",
            "command": SLEEPER,
        }),
    )
    .await;
    assert_eq!(run["name"], json!(name));
    let id = run["id"].as_str().expect("an id").to_owned();
    assert_eq!(id.len(), 64, "{run}");

    let entry = listed(&docker, &name, false).await.expect("listed while it runs");
    assert_eq!((entry["id"].as_str(), entry["state"].as_str()), (Some(id.as_str()), Some("running")));
    assert_eq!(entry["image"], json!(TEST_IMAGE));
    assert!(entry["created"].as_i64().is_some_and(|t| t > 1_600_000_000), "{entry}");

    let inspect = ok(&docker, "docker.inspect", target.clone()).await;
    assert_eq!((inspect["id"].as_str(), inspect["name"].as_str()), (Some(id.as_str()), Some(name.as_str())));
    assert_eq!(inspect["state"]["running"], json!(true));
    assert_eq!(inspect["config"]["cmd"], json!(SLEEPER));
    let env_names = inspect["config"]["env_names"].as_array().expect("env names");
    assert!(env_names.contains(&json!("SECRET_TOKEN")) && env_names.contains(&json!("GREETING")), "{inspect}");
    assert!(!inspect.to_string().contains("hunter2"), "an env value leaked: {inspect}");
    assert_eq!(inspect["host_config"]["memory_bytes"], json!(64 * 1024 * 1024));
    assert_eq!(inspect["host_config"]["nano_cpus"], json!(500_000_000));
    assert_eq!(inspect["host_config"]["restart_policy"], json!("no"));
    assert_eq!(inspect["truncated"], json!(false));

    let logs = logs_containing(&docker, &name, "hello").await;
    assert_eq!((logs["text"].as_str(), logs["truncated"].as_bool()), (Some("hello\n"), Some(false)), "{logs}");
    let capped = docker.run(&args("docker.logs", target.clone()), 3).await.expect("capped logs");
    assert_eq!((capped["text"].as_str(), capped["truncated"].as_bool()), (Some("lo\n"), Some(true)), "keeps the end");
    let stamped = ok(&docker, "docker.logs", json!({"container": name, "tail": 1, "timestamps": true})).await;
    let stamped = stamped["text"].as_str().expect("text");
    assert!(stamped.starts_with("20") && stamped.ends_with(" hello\n"), "{stamped:?}");

    let stats = ok(&docker, "docker.stats", target.clone()).await;
    assert_eq!(stats["memory"]["limit_bytes"], json!(64 * 1024 * 1024), "{stats}");
    assert!(stats["memory"]["usage_bytes"].as_u64().is_some_and(|u| u > 0), "{stats}");
    assert!(stats["cpu_percent"].as_f64().is_some_and(|p| (0.0..=100.0 * 1024.0).contains(&p)), "{stats}");
    assert!(stats["network"]["rx_bytes"].is_u64() && stats["block_io"]["read_bytes"].is_u64(), "{stats}");

    let stop = json!({"container": name, "timeout_secs": 1});
    assert_eq!(ok(&docker, "docker.stop", stop.clone()).await, json!({"changed": true}));
    assert_eq!(listed(&docker, &name, false).await, None, "a stopped container is not running");
    let entry = listed(&docker, &name, true).await.expect("listed with all");
    assert_eq!(entry["state"], json!("exited"));
    assert_eq!(ok(&docker, "docker.stop", stop.clone()).await, json!({"changed": false}), "already stopped");

    assert_eq!(ok(&docker, "docker.start", target.clone()).await, json!({"changed": true}));
    assert_eq!(ok(&docker, "docker.start", target.clone()).await, json!({"changed": false}), "already started");
    let started_at = ok(&docker, "docker.inspect", target.clone()).await["state"]["started_at"].clone();

    assert_eq!(ok(&docker, "docker.restart", stop.clone()).await, json!({"changed": true}));
    let restarted = ok(&docker, "docker.inspect", target.clone()).await;
    assert_eq!(restarted["state"]["running"], json!(true));
    assert_ne!(restarted["state"]["started_at"], started_at, "restart started it anew");

    assert_eq!(code(&docker, "docker.rm", target.clone()).await, "conflict", "a running container needs force");
    assert_eq!(ok(&docker, "docker.rm", json!({"container": name, "force": true})).await, json!({"changed": true}));
    assert_eq!(code(&docker, "docker.inspect", target).await, "not_found");
    assert_eq!(listed(&docker, &name, true).await, None);
}

#[tokio::test]
async fn a_duplicate_name_is_a_conflict() {
    let Some(docker) = engine().await else { return };
    let mut containers = Containers::default();
    let name = containers.name();
    run_sleeper(&docker, &name).await;
    let again = json!({"image": TEST_IMAGE, "name": name, "command": SLEEPER});
    assert_eq!(code(&docker, "docker.run", again).await, "conflict");
}

#[tokio::test]
async fn an_unknown_container_or_image_is_not_found() {
    let Some(docker) = engine().await else { return };
    let ghost = format!("viworks-test-{}-ghost", std::process::id());
    let target = json!({"container": ghost});
    for verb in ["docker.inspect", "docker.logs", "docker.stats", "docker.start", "docker.stop", "docker.restart"] {
        assert_eq!(code(&docker, verb, target.clone()).await, "not_found", "{verb}");
    }
    assert_eq!(code(&docker, "docker.rm", json!({"container": ghost, "force": true})).await, "not_found");
    let missing_image = json!({"image": "viworks-test/no-such-image:1", "command": SLEEPER});
    assert_eq!(code(&docker, "docker.run", missing_image).await, "not_found", "run never pulls implicitly");
}

#[tokio::test]
async fn a_run_without_a_name_reports_the_engines_choice() {
    let Some(docker) = engine().await else { return };
    let mut containers = Containers::default();
    let run = ok(&docker, "docker.run", json!({"image": TEST_IMAGE, "command": SLEEPER})).await;
    let id = run["id"].as_str().expect("an id").to_owned();
    containers.adopt(id.clone());
    let name = run["name"].as_str().expect("a name");
    assert!(!name.is_empty() && !name.starts_with('/'), "{run}");
    let inspect = ok(&docker, "docker.inspect", json!({"container": name})).await;
    assert_eq!(inspect["id"], json!(id));
}

#[tokio::test]
async fn published_ports_are_bound_on_the_host() {
    let Some(docker) = engine().await else { return };
    let mut containers = Containers::default();
    let name = containers.name();
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
    let run = json!({
        "image": TEST_IMAGE,
        "name": name,
        "ports": [{"host": port, "container": 8080, "host_ip": "127.0.0.1"}],
        "command": SLEEPER,
    });
    ok(&docker, "docker.run", run).await;
    let inspect = ok(&docker, "docker.inspect", json!({"container": name})).await;
    let bound = &inspect["ports"]["8080/tcp"][0];
    assert_eq!((bound["HostIp"].as_str(), bound["HostPort"].as_str()), (Some("127.0.0.1"), Some(&*port.to_string())));
    let asked = &inspect["host_config"]["port_bindings"]["8080/tcp"][0];
    assert_eq!(asked["HostPort"], json!(port.to_string()), "{inspect}");
}

#[tokio::test]
async fn a_run_that_cannot_start_leaves_nothing_behind() {
    let Some(docker) = engine().await else { return };
    let mut containers = Containers::default();
    let name = containers.name();
    let run = json!({"image": TEST_IMAGE, "name": name, "command": ["/no/such/program"]});
    let err = call(&docker, "docker.run", run).await.expect_err("the command does not exist");
    assert_eq!(err.code(), "engine_error", "{err}");
    assert_eq!(listed(&docker, &name, true).await, None, "the created container was removed again");
}

#[tokio::test]
async fn pulling_a_missing_image_fails_typed_and_promptly() {
    let Some(docker) = engine().await else { return };
    // A registry that refuses connections, and one the engine cannot reach or that does not
    // hold the image: either way a typed error, not a hang.
    for image in ["127.0.0.1:1/viworks-test/nonexistent:1", "viworks-test/nonexistent-image:1"] {
        let pull = call(&docker, "docker.pull", json!({"image": image}));
        let result = tokio::time::timeout(Duration::from_secs(20), pull).await.expect("the pull ends within 20 s");
        let err = result.expect_err("the image does not exist");
        assert!(matches!(err.code(), "engine_error" | "not_found"), "{image}: {} ({err})", err.code());
    }
}

#[tokio::test]
async fn container_counts_see_running_and_stopped_containers() {
    let Some(docker) = engine().await else { return };
    let mut containers = Containers::default();
    let name = containers.name();
    run_sleeper(&docker, &name).await;
    let counts = docker.container_counts().await.expect("counts while the engine answers");
    assert!(counts.running >= 1, "{counts:?}");
    ok(&docker, "docker.stop", json!({"container": name, "timeout_secs": 1})).await;
    let counts = docker.container_counts().await.expect("counts while the engine answers");
    assert!(counts.stopped >= 1, "{counts:?}");
    let capped = docker.run(&args("docker.ps", json!({"all": true})), 1).await.expect("ps");
    assert_eq!(capped["containers"], json!([]), "no entry fits in 4 bytes: {capped}");
    assert!(capped["total"].as_u64().is_some_and(|n| n >= 1) && capped["truncated"] == json!(true), "{capped}");
}

#[tokio::test]
async fn a_missing_socket_is_unavailable_and_named() {
    // No engine needed: this is what an agent without Docker sees.
    let docker = Docker::new(Some(PathBuf::from("/nonexistent.sock")));
    assert!(!docker.available().await);
    assert_eq!(docker.container_counts().await, None);
    let err = call(&docker, "docker.ps", json!({})).await.expect_err("no engine there");
    assert_eq!(err.code(), "unavailable");
    assert!(err.to_string().contains("/nonexistent.sock"), "{err}");
    let unconfigured = Docker::new(None);
    assert_eq!(code(&unconfigured, "docker.inspect", json!({"container": "web"})).await, "unavailable");
}

//! The host process killed with SIGKILL while commands are queued and in flight, then
//! restarted on the same data directory: no accepted command is lost and none completes twice.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::{Fleet, TestAgent, eventually, http, now};
use viworks_core::session::{AgentEvent, ExecutionGuard, MemoryLedger};
use viworks_core::wire::{CommandId, CommandResult, ResultStatus};

fn free_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binds");
    listener.local_addr().expect("addr")
}

struct HostProcess {
    child: Child,
    api: SocketAddr,
    agents: SocketAddr,
}

impl HostProcess {
    async fn spawn(fleet: &Fleet, api: SocketAddr, agents: SocketAddr) -> HostProcess {
        let child = Command::new(env!("CARGO_BIN_EXE_viworks-host"))
            .args(["serve", "--data-dir"])
            .arg(&fleet.config.data_dir)
            .args(["--api-addr", &api.to_string(), "--agent-addr", &agents.to_string()])
            .env("VIW_HOST_HEARTBEAT_SECS", "1")
            .env("VIW_HOST_LIVENESS_SECS", "3")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the host binary starts");
        let up = eventually(Duration::from_secs(10), async || {
            http(api, "GET", "/health", None, &[], None).await.status == 200
        })
        .await;
        assert!(up, "the host answered /health");
        HostProcess { child, api, agents }
    }

    fn kill(mut self) {
        // SIGKILL: no shutdown path runs.
        self.child.kill().expect("killed");
        let _ = self.child.wait();
    }
}

/// An agent that runs every command it is given through its ledger, counting executions.
struct Worker {
    guard: ExecutionGuard<MemoryLedger>,
    executions: BTreeMap<CommandId, u32>,
    /// Commands the worker takes but never finishes before the crash.
    hold: usize,
    held: Vec<viworks_core::wire::Command>,
}

impl Worker {
    async fn serve(&mut self, agent: &mut TestAgent, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while tokio::time::Instant::now() < deadline && !agent.session.is_closed() {
            agent.until(Duration::from_millis(100), |_| true).await;
            let events: Vec<AgentEvent> = std::mem::take(&mut agent.events);
            for event in events {
                match event {
                    AgentEvent::Established { .. } => {
                        self.guard.on_established(now(), &mut agent.session).expect("ledger");
                    }
                    AgentEvent::Command(command) => {
                        if let Some(command) =
                            self.guard.on_command(now(), &mut agent.session, command).expect("ledger")
                        {
                            *self.executions.entry(command.command_id.clone()).or_default() += 1;
                            if self.held.len() < self.hold {
                                self.held.push(command);
                                continue;
                            }
                            let result = CommandResult {
                                command_id: command.command_id,
                                status: ResultStatus::Succeeded,
                                exit_code: Some(0),
                                output: serde_json::json!({"ok": true}),
                                error: None,
                                duration_ms: 1,
                            };
                            self.guard.on_finished(now(), Some(&mut agent.session), result).expect("ledger");
                        }
                    }
                    AgentEvent::ResultsAcked(ids) => self.guard.on_results_acked(&ids).expect("ledger"),
                    _ => {}
                }
            }
            self.guard.flush_outbox(now(), &mut agent.session).expect("ledger");
            agent.flush().await;
        }
    }
}

#[tokio::test]
async fn a_host_killed_mid_flight_loses_no_command_and_completes_none_twice() {
    let fleet = Fleet::new().await;
    let bundle = fleet.enroll("gw-1").await;
    let (api, agents) = (free_port(), free_port());
    let host = HostProcess::spawn(&fleet, api, agents).await;

    let mut accepted = Vec::new();
    for n in 0..12 {
        let body =
            serde_json::json!({"verb": "get_system_health", "args": {}, "targets": ["gw-1"], "timeout_secs": 30});
        let key = format!("restart-{n}");
        let response = http(
            host.api,
            "POST",
            "/api/v1/commands",
            Some(&fleet.admin_token),
            &[("Idempotency-Key", &key)],
            Some(&body),
        )
        .await;
        assert_eq!(response.status, 202, "{}", response.body);
        for command in response.json()["commands"].as_array().expect("commands") {
            accepted.push(command["command_id"].as_str().expect("id").to_owned());
        }
    }
    assert_eq!(accepted.len(), 12);

    // The agent takes two commands and holds them (acknowledged, running), finishes none.
    let mut worker = Worker {
        guard: ExecutionGuard::recover(MemoryLedger::new(1024), now(), 2).expect("ledger"),
        executions: BTreeMap::new(),
        hold: 2,
        held: Vec::new(),
    };
    let mut agent = TestAgent::connect(host.agents, &bundle).await.expect("connects");
    worker.serve(&mut agent, Duration::from_secs(2)).await;
    assert_eq!(worker.held.len(), 2, "two commands in flight at the crash");
    host.kill();

    // The held commands finish while the host is down; their results wait in the outbox.
    worker.hold = 0;
    for command in std::mem::take(&mut worker.held) {
        let result = CommandResult {
            command_id: command.command_id,
            status: ResultStatus::Succeeded,
            exit_code: Some(0),
            output: serde_json::json!({"finished_while_host_down": true}),
            error: None,
            duration_ms: 1,
        };
        worker.guard.on_finished(now(), None, result).expect("ledger");
    }
    drop(agent);

    let host = HostProcess::spawn(&fleet, api, agents).await;
    let mut agent = loop {
        if let Ok(mut agent) = TestAgent::connect(host.agents, &bundle).await
            && agent.established().await
        {
            agent.events.push(AgentEvent::Established { timers: viworks_core::session::Timers::DEFAULT });
            break agent;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let token = fleet.admin_token.clone();
    let all_done = eventually(Duration::from_secs(30), async || {
        worker.serve(&mut agent, Duration::from_millis(300)).await;
        let mut done = 0;
        for id in &accepted {
            let response = http(host.api, "GET", &format!("/api/v1/commands/{id}"), Some(&token), &[], None).await;
            if response.json()["state"] == "succeeded" {
                done += 1;
            }
        }
        done == accepted.len()
    })
    .await;
    if !all_done {
        let mut states = Vec::new();
        for id in &accepted {
            let response = http(host.api, "GET", &format!("/api/v1/commands/{id}"), Some(&token), &[], None).await;
            states.push(format!("{id}: {} {}", response.status, response.json()["state"]));
        }
        panic!(
            "not every accepted command succeeded after the restart: {states:#?}; executions {:?}",
            worker.executions
        );
    }
    for id in &accepted {
        let id = CommandId::new(id.as_str()).expect("id");
        assert_eq!(worker.executions.get(&id), Some(&1), "{id} ran exactly once");
    }
    host.kill();
}

//! The host process killed with SIGKILL while commands are queued and in flight, then
//! restarted on the same data directory: no accepted command is lost and none completes twice.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use support::process::{HostProcess, Worker, free_port};
use support::{Fleet, TestAgent, eventually, http, now};
use viworks_core::session::{AgentEvent, ExecutionGuard, MemoryLedger};
use viworks_core::wire::{CommandId, CommandResult, ResultStatus};

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

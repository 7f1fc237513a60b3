//! Two host instances on one Postgres: an agent connected to instance A receives commands
//! submitted through instance B, results are visible from both, the same agent id is refused
//! on the second instance while the first holds it, and after A is killed with SIGKILL the
//! agent is admitted by B once A's lease lapses, with every accepted command reaching exactly
//! one terminal state and none running twice.

mod support;

#[allow(dead_code, unreachable_pub)]
#[path = "../src/store/pg_cluster.rs"]
mod pg_cluster;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::json;
use support::process::{HostProcess, Worker, free_port};
use support::{Fleet, TestAgent, eventually, http, now};
use viworks_core::session::{AgentEvent, ExecutionGuard, MemoryLedger};
use viworks_core::wire::RejectCode;
use viworks_host::store::Store;

async fn postgres_url() -> Option<String> {
    let (pg, _name) = pg_cluster::fresh_database().await?;
    let (Some(tokio_postgres::config::Host::Tcp(host)), Some(port), Some(user), Some(db)) =
        (pg.get_hosts().first(), pg.get_ports().first(), pg.get_user(), pg.get_dbname())
    else {
        panic!("the test cluster is reached over TCP");
    };
    Some(format!("postgres://{user}@{host}:{port}/{db}"))
}

async fn submit(api: std::net::SocketAddr, token: &str, agent: &str) -> String {
    let body = json!({ "verb": "get_system_health", "args": {}, "targets": [agent] });
    let reply = http(api, "POST", "/api/v1/commands", Some(token), &[], Some(&body)).await;
    assert_eq!(reply.status, 202, "accepted: {}", reply.body);
    let reply: serde_json::Value = serde_json::from_str(&reply.body).expect("json");
    reply["commands"][0]["command_id"].as_str().expect("command id").to_owned()
}

async fn state_of(api: std::net::SocketAddr, token: &str, command: &str) -> String {
    let reply = http(api, "GET", &format!("/api/v1/commands/{command}"), Some(token), &[], None).await;
    let reply: serde_json::Value = serde_json::from_str(&reply.body).unwrap_or_default();
    reply["state"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_agents_commands_and_failover() {
    let Some(url) = postgres_url().await else { return };
    let fleet = Fleet::on(Some(url.clone())).await;
    let bundle = fleet.enroll("gw-1").await;
    let token = fleet.admin_token.clone();

    // Instance A is a process of its own; instance B runs here.
    let a = HostProcess::spawn_with(&fleet, free_port(), free_port(), &["--store", &url]).await;
    let b = viworks_host::start(&fleet.config).await.expect("instance B starts");
    let b_api = b.api_addr;

    let mut worker = Worker {
        guard: ExecutionGuard::recover(MemoryLedger::new(1024), now(), 2).expect("ledger"),
        executions: BTreeMap::new(),
        hold: 0,
        held: Vec::new(),
    };
    let mut agent = TestAgent::connect(a.agents, &bundle).await.expect("connects to A");
    assert!(agent.established().await, "admitted by A");
    worker.serve(&mut agent, Duration::from_millis(300)).await;

    // Submitted through B, run by the agent on A, visible from both.
    let first = submit(b_api, &token, "gw-1").await;
    let mut done = false;
    for _ in 0..50 {
        worker.serve(&mut agent, Duration::from_millis(100)).await;
        if state_of(b_api, &token, &first).await == "succeeded" {
            done = true;
            break;
        }
    }
    assert!(done, "a command submitted through B reached the agent on A and finished");
    assert_eq!(state_of(a.api, &token, &first).await, "succeeded", "A sees the same result");

    // The same agent id on B while A holds it: refused as a duplicate.
    let mut twin = TestAgent::connect(b.agent_addr, &bundle).await.expect("dials B");
    let refused = twin
        .until(Duration::from_secs(5), |e| {
            matches!(e, AgentEvent::Rejected { code: RejectCode::DuplicateAgent, authenticated: true, .. })
        })
        .await;
    assert!(refused, "B refuses an agent A holds: {:?}", twin.events);
    drop(twin);

    // Commands accepted while A is alive, then A dies without a word.
    let mut accepted = vec![first];
    accepted.push(submit(b_api, &token, "gw-1").await);
    worker.serve(&mut agent, Duration::from_millis(200)).await;
    a.kill();
    for _ in 0..3 {
        accepted.push(submit(b_api, &token, "gw-1").await);
    }
    drop(agent);

    // The agent reconnects to B; admitted once A's lease lapses (3 s here).
    let started = tokio::time::Instant::now();
    let mut agent = loop {
        assert!(started.elapsed() < Duration::from_secs(20), "B admitted the agent after A's lease lapsed");
        let mut attempt = TestAgent::connect(b.agent_addr, &bundle).await.expect("dials B");
        if attempt.established().await {
            break attempt;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let all_done = eventually(Duration::from_secs(30), async || {
        worker.serve(&mut agent, Duration::from_millis(100)).await;
        let mut finished = 0;
        for id in &accepted {
            if state_of(b_api, &token, id).await == "succeeded" {
                finished += 1;
            }
        }
        finished == accepted.len()
    })
    .await;
    assert!(all_done, "every accepted command finished after the failover");
    for id in &accepted {
        assert_eq!(
            worker.executions.get(&id.parse().expect("id")).copied().unwrap_or(0),
            1,
            "{id} ran exactly once on the agent"
        );
    }
    let instances = b.control().store().instances().await.expect("instances");
    assert_eq!(instances.len(), 1, "A was reaped once its lease ended: {instances:?}");
    b.shutdown().await;
}

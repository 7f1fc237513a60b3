//! A host running as its own process (so that a test can SIGKILL it) and an agent worker that
//! runs commands through its execution ledger, counting executions.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use viworks_core::session::{AgentEvent, ExecutionGuard, MemoryLedger};
use viworks_core::wire::{CommandId, CommandResult, ResultStatus};

use super::{Fleet, TestAgent, eventually, http, now};

pub fn free_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binds");
    listener.local_addr().expect("addr")
}

pub struct HostProcess {
    pub child: Child,
    pub api: SocketAddr,
    pub agents: SocketAddr,
}

impl HostProcess {
    pub async fn spawn(fleet: &Fleet, api: SocketAddr, agents: SocketAddr) -> HostProcess {
        HostProcess::spawn_with(fleet, api, agents, &[]).await
    }

    /// Like [`HostProcess::spawn`], with extra `serve` arguments.
    pub async fn spawn_with(fleet: &Fleet, api: SocketAddr, agents: SocketAddr, extra: &[&str]) -> HostProcess {
        let child = Command::new(env!("CARGO_BIN_EXE_viworks-host"))
            .args(["serve", "--data-dir"])
            .arg(&fleet.config.data_dir)
            .args(["--api-addr", &api.to_string(), "--agent-addr", &agents.to_string()])
            .args(extra)
            .env("VIW_HOST_HEARTBEAT_SECS", "1")
            .env("VIW_HOST_LIVENESS_SECS", "3")
            .env("VIW_HOST_LEASE_SECS", "3")
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

    pub fn kill(mut self) {
        // SIGKILL: no shutdown path runs.
        self.child.kill().expect("killed");
        let _ = self.child.wait();
    }
}

/// An agent that runs every command it is given through its ledger, counting executions.
pub struct Worker {
    pub guard: ExecutionGuard<MemoryLedger>,
    pub executions: BTreeMap<CommandId, u32>,
    /// Commands the worker takes but never finishes before the crash.
    pub hold: usize,
    pub held: Vec<viworks_core::wire::Command>,
}

impl Worker {
    pub async fn serve(&mut self, agent: &mut TestAgent, within: Duration) {
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

//! Deterministic simulation of one host and many agents over a faulty network.
//!
//! Everything (delays, resets, host and agent crashes, a replaying attacker, command
//! durations and outcomes) is drawn from one seed. A crash keeps only what is durable: the
//! host's command records and results, the agent's execution ledger. Invariants are checked
//! on every step and at quiescence:
//!
//! - every submitted command reaches exactly one terminal state;
//! - no command executes twice on its agent;
//! - no replayed message is accepted (each one the attacker injects is refused);
//! - every queue stays within its bound and no agent runs more than its concurrency;
//! - after faults stop, every agent is back in session.
//!
//! `VIWORKS_SIM_SEEDS` sets the number of seeds (default 1000); `VIWORKS_SIM_SEED` replays one.
//! A failure prints its seed.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use viworks_core::auth::{AgentKey, ChannelBinding, MasterKey, SkewWindow};
use viworks_core::flow::{BackoffPolicy, ReconnectBackoff, RetryPolicy};
use viworks_core::session::*;
use viworks_core::wire::{AgentId, Command, CommandId, CommandResult, ResultStatus, Verb};
use viworks_core::{Entropy, Timestamp};

const MASTER: [u8; 32] = [42; 32];
const FAULT_PHASE_MS: u64 = 30_000;
const QUIESCE_LIMIT_MS: u64 = 400_000;
const MAX_STEPS: usize = 400_000;
const MAX_COMMANDS: usize = 64;
const PER_AGENT_QUEUE: usize = 24;

type Outcome = Result<Stats, String>;

#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    commands: usize,
    executions: usize,
    resets: usize,
    host_crashes: usize,
    agent_crashes: usize,
    replays_refused: usize,
    interrupted: usize,
    dead_lettered: usize,
}

/// One message in flight on a connection.
struct Packet {
    deliver_at: u64,
    bytes: Vec<u8>,
    injected: bool,
}

struct Conn {
    agent: usize,
    /// What TLS would export for this connection: unique to it.
    binding: ChannelBinding,
    host_session: Option<HostSession>,
    /// Set when the host refused the HELLO: the connection ends once the REJECT is delivered.
    refused: bool,
    to_host: VecDeque<Packet>,
    to_agent: VecDeque<Packet>,
    /// Opened by the attacker, not by the agent.
    rogue: bool,
}

struct SimAgent {
    config: AgentConfig,
    /// Durable: survives crashes.
    ledger: MemoryLedger,
    guard: Option<ExecutionGuard<MemoryLedger>>,
    session: Option<(AgentSession, usize)>,
    backoff: ReconnectBackoff,
    next_connect: Option<u64>,
    restart_at: Option<u64>,
    running: Vec<(u64, Command)>,
}

struct SimHost {
    host: Host,
    dispatcher: Dispatcher,
}

struct World {
    seed: u64,
    rng: Entropy,
    now: u64,
    faults: bool,
    host: Option<SimHost>,
    host_restart_at: Option<u64>,
    /// Durable: the command table as the store would hold it.
    records: BTreeMap<CommandId, CommandRecord>,
    /// Durable: one stored result per command id.
    results: BTreeMap<CommandId, CommandResult>,
    terminals: BTreeMap<CommandId, usize>,
    submitted: Vec<CommandId>,
    executions: BTreeMap<CommandId, usize>,
    agents: Vec<SimAgent>,
    conns: BTreeMap<usize, Conn>,
    next_conn: usize,
    captured: Vec<(usize, bool, Vec<u8>)>,
    stats: Stats,
}

fn t(ms: u64) -> Timestamp {
    Timestamp::from_millis(1_700_000_000_000 + ms)
}

fn host_config() -> HostConfig {
    HostConfig {
        timers: Timers {
            heartbeat_interval: Duration::from_millis(500),
            liveness_timeout: Duration::from_millis(1_500),
        },
        skew_window: SkewWindow::new(Duration::from_secs(5)),
        nonce_capacity: 4096,
        nonce_quota_per_agent: 64,
        max_sessions: 64,
        max_concurrency: 8,
        max_violations: 3,
        ..HostConfig::default()
    }
}

fn dispatch_config() -> DispatchConfig {
    DispatchConfig {
        retry: RetryPolicy { base: Duration::from_millis(200), cap: Duration::from_secs(2), max_attempts: 30 },
        max_commands: MAX_COMMANDS,
        per_agent_queue: PER_AGENT_QUEUE,
        queue_ttl: Duration::from_secs(600),
        result_grace: Duration::from_secs(600),
    }
}

impl World {
    fn new(seed: u64) -> World {
        let mut rng = Entropy::from_u64(seed);
        let agent_count = 2 + rng.below_or_equal(4) as usize;
        let master = MasterKey::from_bytes(MASTER);
        let agents = (0..agent_count)
            .map(|n| {
                let agent_id = AgentId::new(format!("gw-{n}")).expect("valid id");
                let key = AgentKey::derive(&master, &agent_id);
                let concurrency = 1 + rng.below_or_equal(3) as u32;
                let config = AgentConfig { max_concurrency: concurrency, ..AgentConfig::new(agent_id, key) };
                SimAgent {
                    config,
                    ledger: MemoryLedger::new(4096),
                    guard: None,
                    session: None,
                    backoff: ReconnectBackoff::new(
                        BackoffPolicy { base: Duration::from_millis(100), cap: Duration::from_secs(2) },
                        Duration::from_secs(1),
                    ),
                    next_connect: Some(rng.below_or_equal(300)),
                    restart_at: None,
                    running: Vec::new(),
                }
            })
            .collect();
        let mut world = World {
            seed,
            rng,
            now: 0,
            faults: true,
            host: None,
            host_restart_at: None,
            records: BTreeMap::new(),
            results: BTreeMap::new(),
            terminals: BTreeMap::new(),
            submitted: Vec::new(),
            executions: BTreeMap::new(),
            agents,
            conns: BTreeMap::new(),
            next_conn: 0,
            captured: Vec::new(),
            stats: Stats::default(),
        };
        world.start_host();
        for n in 0..world.agents.len() {
            world.start_agent(n);
        }
        world
    }

    fn chance(&mut self, per_mille: u64) -> bool {
        self.rng.below_or_equal(999) < per_mille
    }

    fn start_host(&mut self) {
        let keys = Box::new(MasterKey::from_bytes(MASTER));
        let host = Host::new(host_config(), keys, self.rng.fork(), t(self.now)).expect("valid config");
        let records: Vec<CommandRecord> = self.records.values().cloned().collect();
        let dispatcher = Dispatcher::recover(dispatch_config(), self.rng.fork(), t(self.now), records);
        self.host = Some(SimHost { host, dispatcher });
        self.host_restart_at = None;
    }

    fn start_agent(&mut self, n: usize) {
        let agent = &mut self.agents[n];
        let max = agent.config.max_concurrency;
        agent.guard = Some(ExecutionGuard::recover(agent.ledger.clone(), t(self.now), max).expect("memory ledger"));
        agent.restart_at = None;
    }

    // ---- faults -------------------------------------------------------------------------

    fn crash_host(&mut self) {
        self.stats.host_crashes += 1;
        self.host = None;
        // Sessions die with the process; agents see their connections reset.
        let conns: Vec<usize> = self.conns.keys().copied().collect();
        for id in conns {
            self.reset_conn(id, false);
        }
        self.host_restart_at = Some(self.now + 200 + self.rng.below_or_equal(2_000));
    }

    fn crash_agent(&mut self, n: usize) {
        self.stats.agent_crashes += 1;
        if let Some((_, conn)) = self.agents[n].session.take() {
            self.reset_conn(conn, true);
        }
        let agent = &mut self.agents[n];
        // Only the ledger survives; what was running never finishes.
        if let Some(guard) = agent.guard.take() {
            agent.ledger = guard.ledger().clone();
        }
        agent.running.clear();
        agent.restart_at = Some(self.now + 100 + self.rng.below_or_equal(1_500));
        agent.next_connect = None;
    }

    /// Drops a connection at once; both ends learn it (the host end only if it is up).
    fn reset_conn(&mut self, id: usize, notify_agent: bool) {
        let Some(mut conn) = self.conns.remove(&id) else { return };
        if let Some(mut session) = conn.host_session.take() {
            session.connection_lost();
            self.drain_host_session(&mut session);
        }
        let agent = conn.agent;
        if !conn.rogue && self.agents[agent].session.as_ref().is_some_and(|(_, c)| *c == id) {
            if let Some((mut session, _)) = self.agents[agent].session.take() {
                session.connection_lost();
                if notify_agent || self.agents[agent].guard.is_some() {
                    self.drain_agent_events(agent, &mut session);
                }
            }
            self.schedule_reconnect(agent);
        }
    }

    fn inject_replay(&mut self) {
        if self.captured.is_empty() {
            return;
        }
        let pick = self.rng.below_or_equal(self.captured.len() as u64 - 1) as usize;
        let (agent, to_host, bytes) = self.captured[pick].clone();
        let live: Vec<usize> = self.conns.iter().filter(|(_, c)| !c.rogue).map(|(id, _)| *id).collect();
        if live.is_empty() || self.chance(300) {
            // A captured message opens a connection of its own, as a HELLO would.
            let id = self.open_conn(agent, true);
            let deliver_at = self.now + 1;
            let conn = self.conns.get_mut(&id).expect("just opened");
            conn.to_host.push_back(Packet { deliver_at, bytes, injected: true });
            return;
        }
        let id = live[self.rng.below_or_equal(live.len() as u64 - 1) as usize];
        let deliver_at = self.now + 1 + self.rng.below_or_equal(20);
        let conn = self.conns.get_mut(&id).expect("live");
        let queue = if to_host { &mut conn.to_host } else { &mut conn.to_agent };
        let deliver_at = queue.back().map_or(deliver_at, |p| p.deliver_at.max(deliver_at));
        queue.push_back(Packet { deliver_at, bytes, injected: true });
    }

    fn maybe_fault(&mut self) {
        if !self.faults {
            return;
        }
        if self.chance(4) && !self.conns.is_empty() {
            let ids: Vec<usize> = self.conns.keys().copied().collect();
            let id = ids[self.rng.below_or_equal(ids.len() as u64 - 1) as usize];
            self.stats.resets += 1;
            self.reset_conn(id, true);
        }
        if self.chance(1) && self.host.is_some() {
            self.crash_host();
        }
        if self.chance(2) {
            let n = self.rng.below_or_equal(self.agents.len() as u64 - 1) as usize;
            if self.agents[n].guard.is_some() {
                self.crash_agent(n);
            }
        }
        if self.chance(6) {
            self.inject_replay();
        }
        if self.chance(25) {
            self.submit();
        }
    }

    fn submit(&mut self) {
        let Some(host) = &mut self.host else { return };
        let n = self.submitted.len();
        let agent = self.rng.below_or_equal(self.agents.len() as u64 - 1) as usize;
        let command = NewCommand {
            command_id: CommandId::new(format!("cmd-{n}")).expect("valid id"),
            agent_id: self.agents[agent].config.agent_id.clone(),
            verb: Verb::new("get_system_health").expect("verb"),
            args: serde_json::json!({ "n": n }),
            timeout: Duration::from_secs(5),
        };
        // Accepted means durable before the reply: the record is persisted with the event below.
        if host.dispatcher.submit(t(self.now), command.clone()).is_ok() {
            self.submitted.push(command.command_id);
            self.drain_dispatcher();
        }
    }

    // ---- connections --------------------------------------------------------------------

    fn open_conn(&mut self, agent: usize, rogue: bool) -> usize {
        let id = self.next_conn;
        self.next_conn += 1;
        let binding = ChannelBinding(self.rng.bytes32());
        let conn = Conn {
            agent,
            binding,
            host_session: None,
            refused: false,
            to_host: VecDeque::new(),
            to_agent: VecDeque::new(),
            rogue,
        };
        self.conns.insert(id, conn);
        id
    }

    fn delay(&mut self) -> u64 {
        1 + self.rng.below_or_equal(40)
    }

    fn send(&mut self, id: usize, to_host: bool, bytes: Vec<u8>) {
        let deliver_at = self.now + self.delay();
        let Some(conn) = self.conns.get_mut(&id) else { return };
        let queue = if to_host { &mut conn.to_host } else { &mut conn.to_agent };
        // In order: a stream transport never reorders.
        let deliver_at = queue.back().map_or(deliver_at, |p| p.deliver_at.max(deliver_at));
        queue.push_back(Packet { deliver_at, bytes, injected: false });
    }

    fn schedule_reconnect(&mut self, n: usize) {
        let now = t(self.now);
        let agent = &mut self.agents[n];
        agent.backoff.on_session_ended(now);
        let delay = agent.backoff.next_delay(&mut self.rng);
        agent.next_connect = Some(self.now + 1 + delay.as_millis() as u64);
    }

    fn connect(&mut self, n: usize) {
        self.agents[n].next_connect = None;
        let id = self.open_conn(n, false);
        let mut entropy = self.rng.fork();
        let binding = self.conns[&id].binding;
        let session = AgentSession::new(&self.agents[n].config, t(self.now), &mut entropy, &binding).expect("hello");
        self.agents[n].session = Some((session, id));
        self.flush_agent(n);
    }

    // ---- the host's driver ----------------------------------------------------------------

    fn deliver_to_host(&mut self, id: usize, packet: Packet) -> Result<(), String> {
        let now = t(self.now);
        let Some(host) = &mut self.host else { return Ok(()) };
        let conn = self.conns.get_mut(&id).expect("delivering on a live connection");
        let agent_id = self.agents[conn.agent].config.agent_id.clone();
        match &mut conn.host_session {
            None if conn.refused => {}
            None => {
                // A rogue connection proves no identity; the agent's own proves its certificate's.
                let proven = (!conn.rogue).then_some(&agent_id);
                match host.host.accept(now, &packet.bytes, proven, &conn.binding) {
                    Ok(mut session) => {
                        if packet.injected {
                            return Err(format!("a replayed HELLO was admitted for {agent_id}"));
                        }
                        session.resume(now, host.dispatcher.awaiting_results(&agent_id));
                        conn.host_session = Some(session);
                    }
                    Err(refusal) => {
                        if packet.injected {
                            self.stats.replays_refused += 1;
                        }
                        conn.refused = true;
                        self.send(id, false, refusal.reply);
                    }
                }
            }
            Some(session) => {
                let closed_before = session.is_closed();
                session.handle_message(now, &packet.bytes);
                if packet.injected && !closed_before {
                    let mut refused = false;
                    let mut events = Vec::new();
                    while let Some(event) = session.poll_event() {
                        refused |= matches!(event, HostEvent::Violation(_));
                        events.push(event);
                    }
                    if !refused {
                        return Err(format!("a replayed message was accepted by the host: {events:?}"));
                    }
                    self.stats.replays_refused += 1;
                    let mut session = conn.host_session.take().expect("present");
                    for event in events {
                        self.handle_host_event(&mut session, event);
                    }
                    self.conns.get_mut(&id).expect("live").host_session = Some(session);
                }
            }
        }
        self.flush_host(id);
        Ok(())
    }

    fn handle_host_event(&mut self, session: &mut HostSession, event: HostEvent) {
        let now = t(self.now);
        let Some(host) = &mut self.host else { return };
        match event {
            HostEvent::Acked(id) => host.dispatcher.on_acked(now, &id),
            HostEvent::Result(result) => {
                // Durable first (upsert by correlation id), then acknowledged.
                let id = result.command_id.clone();
                self.results.entry(id.clone()).or_insert_with(|| result.clone());
                host.dispatcher.on_result(now, &result);
                let _ = session.ack_results(now, &[id]);
            }
            HostEvent::Telemetry(batch) => {
                let _ = session.ack_telemetry(now, batch.batch_id);
            }
            HostEvent::Closed { in_flight, .. } => host.dispatcher.on_session_closed(now, session.id(), &in_flight),
            _ => {}
        }
        self.drain_dispatcher();
    }

    fn drain_host_session(&mut self, session: &mut HostSession) {
        while let Some(event) = session.poll_event() {
            self.handle_host_event(session, event);
        }
    }

    fn drain_dispatcher(&mut self) {
        let Some(host) = &mut self.host else { return };
        while let Some(event) = host.dispatcher.poll_event() {
            if let DispatchEvent::Changed(record) = event {
                if let CommandState::Done(terminal) = &record.state {
                    *self.terminals.entry(record.command.command_id.clone()).or_default() += 1;
                    match terminal {
                        Terminal::Interrupted => self.stats.interrupted += 1,
                        Terminal::DeadLettered(_) => self.stats.dead_lettered += 1,
                        _ => {}
                    }
                }
                self.records.insert(record.command.command_id.clone(), record);
            }
        }
    }

    /// Drains a host session's events and transmit, feeds it commands, and ends the
    /// connection once the session closed and said so.
    fn flush_host(&mut self, id: usize) {
        let Some(mut session) = self.conns.get_mut(&id).and_then(|c| c.host_session.take()) else {
            self.end_refused(id);
            return;
        };
        self.drain_host_session(&mut session);
        if let Some(host) = &mut self.host {
            let credits = session.credits();
            if credits > 0 {
                let commands =
                    host.dispatcher.next_for(t(self.now), &session.agent_id().clone(), session.id(), credits);
                for command in commands {
                    let _ = session.send_command(t(self.now), command);
                }
                self.drain_dispatcher();
            }
        }
        while let Some(bytes) = session.poll_transmit() {
            self.send(id, false, bytes);
        }
        if let Some(conn) = self.conns.get_mut(&id) {
            conn.host_session = Some(session);
        }
    }

    fn end_refused(&mut self, id: usize) {
        let done = self.conns.get(&id).is_some_and(|c| c.refused && c.to_agent.is_empty());
        if done {
            self.reset_conn(id, true);
        }
    }

    // ---- the agents' driver ---------------------------------------------------------------

    fn deliver_to_agent(&mut self, id: usize, packet: Packet) -> Result<(), String> {
        let n = self.conns[&id].agent;
        if self.conns[&id].rogue {
            return Ok(());
        }
        let Some((session, conn)) = &mut self.agents[n].session else { return Ok(()) };
        if *conn != id {
            return Ok(());
        }
        let was_closed = session.is_closed();
        session.handle_message(t(self.now), &packet.bytes);
        let mut events = Vec::new();
        while let Some(event) = session.poll_event() {
            events.push(event);
        }
        if packet.injected && !was_closed {
            let refused = events.iter().any(|e| matches!(e, AgentEvent::Violation(_)))
                || events.iter().any(|e| matches!(e, AgentEvent::Rejected { authenticated: false, .. }));
            if !refused {
                return Err(format!("a replayed message was accepted by agent {n}: {events:?}"));
            }
            self.stats.replays_refused += 1;
        }
        self.handle_agent_events(n, events);
        self.flush_agent(n);
        Ok(())
    }

    fn drain_agent_events(&mut self, n: usize, session: &mut AgentSession) {
        let mut events = Vec::new();
        while let Some(event) = session.poll_event() {
            events.push(event);
        }
        // The session is already detached; only ledger-side effects apply.
        for event in events {
            if let AgentEvent::ResultsAcked(ids) = event
                && let Some(guard) = &mut self.agents[n].guard
            {
                guard.on_results_acked(&ids).expect("memory ledger");
            }
        }
    }

    fn handle_agent_events(&mut self, n: usize, events: Vec<AgentEvent>) {
        let now = t(self.now);
        for event in events {
            let agent = &mut self.agents[n];
            let (Some(guard), Some((session, _))) = (&mut agent.guard, &mut agent.session) else { return };
            match event {
                AgentEvent::Established { .. } => {
                    agent.backoff.on_session_established(now);
                    guard.on_established(now, session).expect("memory ledger");
                }
                AgentEvent::Command(command) => {
                    if let Some(command) = guard.on_command(now, session, command).expect("memory ledger") {
                        let runs = self.executions.entry(command.command_id.clone()).or_default();
                        *runs += 1;
                        self.stats.executions += 1;
                        let finish = self.now + 5 + self.rng.below_or_equal(1_500);
                        self.agents[n].running.push((finish, command));
                    }
                }
                AgentEvent::ResultsAcked(ids) => guard.on_results_acked(&ids).expect("memory ledger"),
                AgentEvent::Rejected { .. } | AgentEvent::Closed(_) => {}
                _ => {}
            }
        }
    }

    fn flush_agent(&mut self, n: usize) {
        let agent = &mut self.agents[n];
        let Some((session, id)) = &mut agent.session else { return };
        let id = *id;
        let mut out = Vec::new();
        while let Some(bytes) = session.poll_transmit() {
            out.push(bytes);
        }
        if session.is_established()
            && let Some(guard) = &mut agent.guard
        {
            guard.flush_outbox(t(self.now), session).expect("memory ledger");
            while let Some(bytes) = session.poll_transmit() {
                out.push(bytes);
            }
        }
        let closed = session.is_closed();
        for bytes in out {
            self.send(id, true, bytes);
        }
        if closed {
            self.agents[n].session = None;
            // The transport ends once the CLOSE is on its way.
            if let Some(conn) = self.conns.get_mut(&id) {
                conn.rogue = true;
            }
            self.schedule_reconnect(n);
        }
    }

    fn finish_executions(&mut self) {
        for n in 0..self.agents.len() {
            let due: Vec<Command> = {
                let agent = &mut self.agents[n];
                let (due, rest): (Vec<_>, Vec<_>) = agent.running.drain(..).partition(|(at, _)| *at <= self.now);
                agent.running = rest;
                due.into_iter().map(|(_, c)| c).collect()
            };
            for command in due {
                let status =
                    if self.rng.below_or_equal(9) == 0 { ResultStatus::Failed } else { ResultStatus::Succeeded };
                let result = CommandResult {
                    command_id: command.command_id.clone(),
                    status,
                    exit_code: Some(0),
                    output: serde_json::json!({ "ran": command.command_id.as_str() }),
                    error: None,
                    duration_ms: 5,
                };
                let agent = &mut self.agents[n];
                let session = agent.session.as_mut().map(|(s, _)| s).filter(|s| s.is_established());
                agent
                    .guard
                    .as_mut()
                    .expect("running implies up")
                    .on_finished(t(self.now), session, result)
                    .expect("ledger");
                self.flush_agent(n);
            }
        }
    }

    // ---- the loop ---------------------------------------------------------------------------

    fn next_event_time(&self) -> u64 {
        let mut next = self.now + 50;
        let mut consider = |at: u64| next = next.min(at.max(self.now));
        for conn in self.conns.values() {
            for queue in [&conn.to_host, &conn.to_agent] {
                if let Some(packet) = queue.front() {
                    consider(packet.deliver_at);
                }
            }
            if let Some(timeout) = conn.host_session.as_ref().and_then(HostSession::poll_timeout) {
                consider(ms(timeout));
            }
        }
        for agent in &self.agents {
            if let Some((session, _)) = &agent.session
                && let Some(timeout) = session.poll_timeout()
            {
                consider(ms(timeout));
            }
            agent.next_connect.into_iter().chain(agent.restart_at).for_each(&mut consider);
            agent.running.iter().for_each(|(at, _)| consider(*at));
        }
        if let Some(host) = &self.host
            && let Some(timeout) = host.dispatcher.poll_timeout()
        {
            consider(ms(timeout));
        }
        self.host_restart_at.into_iter().for_each(consider);
        next
    }

    fn step(&mut self) -> Result<(), String> {
        let now = t(self.now);
        if self.host_restart_at.is_some_and(|at| at <= self.now) {
            self.start_host();
        }
        for n in 0..self.agents.len() {
            if self.agents[n].restart_at.is_some_and(|at| at <= self.now) {
                self.start_agent(n);
                self.schedule_reconnect(n);
            }
            if self.agents[n].next_connect.is_some_and(|at| at <= self.now) && self.agents[n].guard.is_some() {
                self.connect(n);
            }
        }
        // Deliver everything due, in order per direction.
        let ids: Vec<usize> = self.conns.keys().copied().collect();
        for id in ids {
            loop {
                let due = self.conns.get_mut(&id).and_then(|c| {
                    if c.to_host.front().is_some_and(|p| p.deliver_at <= self.now) {
                        c.to_host.pop_front().map(|p| (true, p))
                    } else if c.to_agent.front().is_some_and(|p| p.deliver_at <= self.now) {
                        c.to_agent.pop_front().map(|p| (false, p))
                    } else {
                        None
                    }
                });
                let Some((to_host, packet)) = due else { break };
                if !packet.injected && self.captured.len() < 256 {
                    let agent = self.conns[&id].agent;
                    self.captured.push((agent, to_host, packet.bytes.clone()));
                }
                if to_host {
                    self.deliver_to_host(id, packet)?;
                } else {
                    self.deliver_to_agent(id, packet)?;
                }
            }
            self.end_refused(id);
            let rogue_drained =
                self.conns.get(&id).is_some_and(|c| c.rogue && c.to_host.is_empty() && c.to_agent.is_empty());
            if rogue_drained {
                self.reset_conn(id, false);
            }
        }
        // Timers.
        let ids: Vec<usize> = self.conns.keys().copied().collect();
        for id in ids {
            let closed = match self.conns.get_mut(&id).and_then(|c| c.host_session.as_mut()) {
                Some(session) => {
                    session.handle_timeout(now);
                    session.is_closed()
                }
                None => false,
            };
            self.flush_host(id);
            if closed {
                self.conns.get_mut(&id).expect("live").rogue = true;
            }
        }
        for n in 0..self.agents.len() {
            if let Some((session, _)) = &mut self.agents[n].session {
                session.handle_timeout(now);
                let mut events = Vec::new();
                while let Some(event) = session.poll_event() {
                    events.push(event);
                }
                self.handle_agent_events(n, events);
                self.flush_agent(n);
            }
        }
        if let Some(host) = &mut self.host {
            host.dispatcher.handle_timeout(now);
        }
        self.drain_dispatcher();
        self.finish_executions();
        self.maybe_fault();
        self.check_invariants()
    }

    fn check_invariants(&self) -> Result<(), String> {
        if let Some((id, runs)) = self.executions.iter().find(|(_, runs)| **runs > 1) {
            return Err(format!("{id} executed {runs} times"));
        }
        if let Some((id, count)) = self.terminals.iter().find(|(_, count)| **count > 1) {
            return Err(format!("{id} reached {count} terminal states"));
        }
        if let Some(host) = &self.host {
            if host.dispatcher.len() > MAX_COMMANDS {
                return Err(format!("dispatcher holds {} commands", host.dispatcher.len()));
            }
            for agent in &self.agents {
                if host.dispatcher.unfinished_for(&agent.config.agent_id) > PER_AGENT_QUEUE {
                    return Err(format!("queue of {} exceeds its bound", agent.config.agent_id));
                }
            }
            let nonces = host.host.nonce_cache();
            if nonces.len() > nonces.config().capacity {
                return Err("nonce cache exceeds its capacity".into());
            }
        }
        for (n, agent) in self.agents.iter().enumerate() {
            if agent.running.len() > agent.config.max_concurrency as usize {
                return Err(format!("agent {n} runs {} commands, above its concurrency", agent.running.len()));
            }
        }
        Ok(())
    }

    fn quiescent(&self) -> bool {
        let all_terminal = self.submitted.iter().all(|id| self.terminals.contains_key(id));
        let all_in_session = self.host.as_ref().is_some_and(|host| {
            self.agents.iter().all(|a| {
                host.host.is_live(&a.config.agent_id, t(self.now))
                    && a.session.as_ref().is_some_and(|(s, _)| s.is_established())
            })
        });
        all_terminal && all_in_session
    }

    fn run(mut self) -> Outcome {
        for _ in 0..MAX_STEPS {
            self.step()?;
            if self.faults && self.now >= FAULT_PHASE_MS {
                self.faults = false;
                if self.host.is_none() {
                    self.host_restart_at = Some(self.now);
                }
            }
            if !self.faults && self.quiescent() {
                let submitted = self.submitted.len();
                self.stats.commands = submitted;
                return Ok(self.stats);
            }
            if self.now > FAULT_PHASE_MS + QUIESCE_LIMIT_MS {
                break;
            }
            self.now = self.next_event_time().max(self.now + 1);
        }
        let unfinished: Vec<_> = self.submitted.iter().filter(|id| !self.terminals.contains_key(*id)).collect();
        let away: Vec<_> = self
            .agents
            .iter()
            .filter(|a| !a.session.as_ref().is_some_and(|(s, _)| s.is_established()))
            .map(|a| a.config.agent_id.to_string())
            .collect();
        Err(format!(
            "no quiescence by {} ms (seed {}): unfinished {unfinished:?}, agents not in session {away:?}",
            self.now, self.seed
        ))
    }
}

fn ms(at: Timestamp) -> u64 {
    at.as_millis() - t(0).as_millis()
}

fn seeds() -> Vec<u64> {
    if let Some(seed) = std::env::var("VIWORKS_SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        return vec![seed];
    }
    let count = std::env::var("VIWORKS_SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(1000);
    (0..count).collect()
}

#[test]
fn delivery_invariants_hold_on_every_seed() {
    let mut total = Stats::default();
    let seeds = seeds();
    for &seed in &seeds {
        match World::new(seed).run() {
            Ok(stats) => {
                total.commands += stats.commands;
                total.executions += stats.executions;
                total.resets += stats.resets;
                total.host_crashes += stats.host_crashes;
                total.agent_crashes += stats.agent_crashes;
                total.replays_refused += stats.replays_refused;
                total.interrupted += stats.interrupted;
                total.dead_lettered += stats.dead_lettered;
            }
            Err(broken) => panic!(
                "simulation seed {seed} broke an invariant: {broken}\nreplay it with VIWORKS_SIM_SEED={seed} cargo test -p viworks-core --test sim"
            ),
        }
    }
    println!("{} seeds: {total:?}", seeds.len());
    assert!(total.commands > 0 && total.executions > 0, "the simulation ran commands: {total:?}");
    assert!(seeds.len() < 50 || (total.host_crashes > 0 && total.agent_crashes > 0 && total.replays_refused > 0));
}

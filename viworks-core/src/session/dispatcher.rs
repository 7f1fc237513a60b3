//! The host's command lifecycle across sessions: bounded queues, dispatch within credits,
//! retries with backoff, dead letters, and exactly one terminal state per command.
//!
//! ```text
//!             submit            next_for              on_acked
//!   (202) ──────────▶ Queued ────────────▶ Sent ────────────▶ Acked
//!                      ▲  │                 │                   │
//!     session closed,  │  │ cancel          │ on_result         │ on_result
//!     retry allowed    └──┼─────────────────┘                   │
//!                         ▼                 ▼                   ▼
//!                      Cancelled     Done(status of the result) ◀┘
//!     queue_ttl passed, attempts exhausted, no result by the deadline: DeadLettered
//! ```
//! Every transition is reported as a [`DispatchEvent::Changed`] carrying the whole record, so
//! a store that writes each one can rebuild the dispatcher after a crash with
//! [`Dispatcher::recover`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use thiserror::Error;

use crate::flow::{Delivery, RetryDecision, RetryPolicy};
use crate::wire::{AgentId, Command, CommandId, CommandResult, ResultStatus, Verb};
use crate::{Entropy, Timestamp};

/// Bounds and timings of a [`Dispatcher`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DispatchConfig {
    /// When and how often a command never acknowledged is sent again.
    pub retry: RetryPolicy,
    /// Commands not yet in a terminal state, across all agents.
    pub max_commands: usize,
    /// Unfinished commands (waiting, sent or acknowledged) for one agent. Counting those in
    /// flight too means a retry never pushes an agent past its bound.
    pub per_agent_queue: usize,
    /// How long a command may wait for its agent before it is dead-lettered.
    pub queue_ttl: Duration,
    /// How long past its timeout an acknowledged command may go without a result before it is
    /// dead-lettered. Generous, because the agent reports even interrupted commands once it
    /// is back.
    pub result_grace: Duration,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        DispatchConfig {
            retry: RetryPolicy::DEFAULT,
            max_commands: 1_000_000,
            per_agent_queue: 10_000,
            queue_ttl: Duration::from_secs(24 * 3600),
            result_grace: Duration::from_secs(3600),
        }
    }
}

/// A command accepted for one agent.
#[derive(Clone, Debug, PartialEq)]
pub struct NewCommand {
    /// Its identity, unique across the fleet.
    pub command_id: CommandId,
    /// The agent that runs it.
    pub agent_id: AgentId,
    /// What to run.
    pub verb: Verb,
    /// Arguments, validated against the verb's schema before submission.
    pub args: serde_json::Value,
    /// How long the agent lets it run.
    pub timeout: Duration,
}

/// How a command ended. Each command reaches exactly one.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Terminal {
    /// The agent reported success.
    Succeeded,
    /// The agent reported failure.
    Failed,
    /// The agent stopped it at its timeout.
    TimedOut,
    /// The agent stopped while running it and did not run it again.
    Interrupted,
    /// The agent refused it (unknown verb, bad arguments, not allowed).
    Rejected,
    /// An operator cancelled it before it was sent.
    Cancelled,
    /// The host gave up on it; the reason says why.
    DeadLettered(DeadLetter),
}

impl Terminal {
    /// A stable `snake_case` name, as stored and shown by the API.
    pub fn as_str(&self) -> &'static str {
        match self {
            Terminal::Succeeded => "succeeded",
            Terminal::Failed => "failed",
            Terminal::TimedOut => "timed_out",
            Terminal::Interrupted => "interrupted",
            Terminal::Rejected => "rejected",
            Terminal::Cancelled => "cancelled",
            Terminal::DeadLettered(_) => "dead_lettered",
        }
    }

    fn of(status: ResultStatus) -> Terminal {
        match status {
            ResultStatus::Succeeded => Terminal::Succeeded,
            ResultStatus::TimedOut => Terminal::TimedOut,
            ResultStatus::Interrupted => Terminal::Interrupted,
            ResultStatus::Rejected => Terminal::Rejected,
            _ => Terminal::Failed,
        }
    }
}

/// Why a command was dead-lettered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeadLetter {
    /// Sent this many times and never acknowledged.
    AttemptsExhausted(u32),
    /// Its agent did not take it within the queue TTL.
    QueueExpired,
    /// Acknowledged, but no result came within its timeout plus the result grace.
    NoResult,
}

impl DeadLetter {
    /// A stable `snake_case` reason, as stored in the dead-letter table.
    pub fn as_str(&self) -> &'static str {
        match self {
            DeadLetter::AttemptsExhausted(_) => "attempts_exhausted",
            DeadLetter::QueueExpired => "queue_expired",
            DeadLetter::NoResult => "no_result",
        }
    }
}

/// Where a command is in its lifecycle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommandState {
    /// Waiting to be sent, not before the given instant.
    Queued {
        /// The earliest instant it may be sent (retry backoff).
        not_before: Timestamp,
    },
    /// Sent in a session, not yet acknowledged.
    Sent {
        /// The session it went out on.
        session: u64,
    },
    /// Acknowledged by the agent; its result is due.
    Acked {
        /// When it is dead-lettered if no result came.
        deadline: Timestamp,
    },
    /// Finished.
    Done(Terminal),
}

/// Everything the host keeps of one command: what a store persists.
#[derive(Clone, Debug, PartialEq)]
pub struct CommandRecord {
    /// The command.
    pub command: NewCommand,
    /// Where it is.
    pub state: CommandState,
    /// Times it was sent.
    pub attempts: u32,
    /// When it was accepted.
    pub submitted_at: Timestamp,
    /// Its position in submission order, which dispatch follows per agent.
    pub order: u64,
}

/// Something the driver persists or acts on.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum DispatchEvent {
    /// A command changed state; persist the record.
    Changed(CommandRecord),
    /// Commands for this agent became sendable (a retry delay passed).
    Ready(AgentId),
}

/// Why the dispatcher refused a request.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DispatchError {
    /// The host holds its maximum of unfinished commands; retry later (HTTP 429).
    #[error("the host holds {0} unfinished commands, its limit")]
    Full(usize),
    /// This agent's queue is full; retry later (HTTP 429).
    #[error("the queue of agent {0} is full")]
    AgentQueueFull(AgentId),
    /// A command with this id exists already.
    #[error("command {0} exists already")]
    Duplicate(CommandId),
    /// No unfinished command has this id.
    #[error("no unfinished command {0}")]
    Unknown(CommandId),
    /// A record handed to [`Dispatcher::admit`] is not in the queued state.
    #[error("command {0} is not queued")]
    NotQueued(CommandId),
    /// The command was sent already and can no longer be cancelled.
    #[error("command {0} was already sent")]
    NotCancellable(CommandId),
}

/// The host's command lifecycle. Sans-IO: the driver feeds it submissions, session events and
/// time, asks it what to send, and persists what it reports.
///
/// Memory holds unfinished commands only, at most `max_commands`; finished ones are reported
/// and forgotten.
#[derive(Debug)]
pub struct Dispatcher {
    config: DispatchConfig,
    records: BTreeMap<CommandId, CommandRecord>,
    queues: BTreeMap<AgentId, BTreeMap<u64, CommandId>>,
    unfinished_per_agent: BTreeMap<AgentId, usize>,
    acked: BTreeMap<AgentId, BTreeSet<CommandId>>,
    timers: BTreeSet<(Timestamp, CommandId)>,
    timer_index: BTreeMap<CommandId, Timestamp>,
    events: VecDeque<DispatchEvent>,
    entropy: Entropy,
    next_order: u64,
}

impl Dispatcher {
    /// An empty dispatcher; `entropy` draws retry jitter.
    pub fn new(config: DispatchConfig, entropy: Entropy) -> Self {
        Dispatcher {
            config,
            records: BTreeMap::new(),
            queues: BTreeMap::new(),
            unfinished_per_agent: BTreeMap::new(),
            acked: BTreeMap::new(),
            timers: BTreeSet::new(),
            timer_index: BTreeMap::new(),
            events: VecDeque::new(),
            entropy,
            next_order: 0,
        }
    }

    /// A dispatcher rebuilt from persisted records after a restart. Commands that were sent
    /// in a session of the previous process count as sent and never acknowledged: they are
    /// retried (the agent's ledger answers any it did take). Terminal records are skipped.
    pub fn recover(
        config: DispatchConfig,
        entropy: Entropy,
        now: Timestamp,
        records: impl IntoIterator<Item = CommandRecord>,
    ) -> Self {
        let mut dispatcher = Dispatcher::new(config, entropy);
        for record in records {
            dispatcher.next_order = dispatcher.next_order.max(record.order + 1);
            let id = record.command.command_id.clone();
            let sent = matches!(record.state, CommandState::Sent { .. });
            match record.state {
                CommandState::Done(_) => continue,
                CommandState::Queued { .. } | CommandState::Sent { .. } | CommandState::Acked { .. } => {
                    dispatcher.insert(record);
                }
            }
            if sent {
                dispatcher.retry_or_dead_letter(now, &id);
            }
        }
        dispatcher
    }

    /// Unfinished commands held.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether no command is unfinished.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Commands waiting to be sent to `agent`.
    pub fn queued(&self, agent: &AgentId) -> usize {
        self.queues.get(agent).map_or(0, BTreeMap::len)
    }

    /// Unfinished commands for `agent`, the figure its bound applies to.
    pub fn unfinished_for(&self, agent: &AgentId) -> usize {
        self.unfinished_per_agent.get(agent).copied().unwrap_or(0)
    }

    /// Commands waiting to be sent, across all agents.
    pub fn queued_total(&self) -> usize {
        self.queues.values().map(BTreeMap::len).sum()
    }

    /// The record of an unfinished command.
    pub fn record(&self, id: &CommandId) -> Option<&CommandRecord> {
        self.records.get(id)
    }

    /// Commands `agent` acknowledged and has not answered; pass them to
    /// [`HostSession::resume`](super::HostSession::resume) when it reconnects.
    pub fn awaiting_results(&self, agent: &AgentId) -> Vec<CommandId> {
        self.acked.get(agent).map(|ids| ids.iter().cloned().collect()).unwrap_or_default()
    }

    /// Accepts a command. Refuses, changing nothing, when a bound is reached or the id exists.
    pub fn submit(&mut self, now: Timestamp, command: NewCommand) -> Result<(), DispatchError> {
        if self.records.contains_key(&command.command_id) {
            return Err(DispatchError::Duplicate(command.command_id));
        }
        if self.records.len() >= self.config.max_commands {
            return Err(DispatchError::Full(self.config.max_commands));
        }
        if self.unfinished_for(&command.agent_id) >= self.config.per_agent_queue {
            return Err(DispatchError::AgentQueueFull(command.agent_id));
        }
        let order = self.next_order;
        self.next_order += 1;
        let id = command.command_id.clone();
        self.insert(CommandRecord {
            command,
            state: CommandState::Queued { not_before: now },
            attempts: 0,
            submitted_at: now,
            order,
        });
        self.changed(&id);
        Ok(())
    }

    /// Reserves `count` consecutive positions in submission order and returns the first, for a
    /// driver that persists commands before handing them over with [`Dispatcher::admit`].
    pub fn take_orders(&mut self, count: u64) -> u64 {
        let first = self.next_order;
        self.next_order = self.next_order.saturating_add(count);
        first
    }

    /// Accepts a queued command whose record (with an order from
    /// [`Dispatcher::take_orders`]) the driver already persisted. Same bounds as
    /// [`Dispatcher::submit`]; reports no change, since the record is stored as it is.
    pub fn admit(&mut self, record: CommandRecord) -> Result<(), DispatchError> {
        let command = &record.command;
        if self.records.contains_key(&command.command_id) {
            return Err(DispatchError::Duplicate(command.command_id.clone()));
        }
        if self.records.len() >= self.config.max_commands {
            return Err(DispatchError::Full(self.config.max_commands));
        }
        if self.unfinished_for(&command.agent_id) >= self.config.per_agent_queue {
            return Err(DispatchError::AgentQueueFull(command.agent_id.clone()));
        }
        if !matches!(record.state, CommandState::Queued { .. }) {
            return Err(DispatchError::NotQueued(command.command_id.clone()));
        }
        self.next_order = self.next_order.max(record.order.saturating_add(1));
        let agent = command.agent_id.clone();
        self.insert(record);
        self.events.push_back(DispatchEvent::Ready(agent));
        Ok(())
    }

    /// Takes over commands another process (or an earlier session of this one) persisted: a
    /// host instance that starts serving an agent adopts that agent's unfinished commands
    /// from the shared store. The same rules as [`Dispatcher::recover`] apply: a command
    /// recorded as sent counts as sent and never acknowledged, so it is retried (the agent's
    /// ledger answers any it did take); acknowledged ones keep waiting for their results.
    /// Adoption ignores the queue bounds, which were enforced when the commands were accepted,
    /// and skips ids already held. Reports the agents that now have commands to send.
    pub fn adopt(&mut self, now: Timestamp, records: impl IntoIterator<Item = CommandRecord>) {
        let mut ready = BTreeSet::new();
        for record in records {
            let id = record.command.command_id.clone();
            if self.records.contains_key(&id) || matches!(record.state, CommandState::Done(_)) {
                continue;
            }
            self.next_order = self.next_order.max(record.order.saturating_add(1));
            let sent = matches!(record.state, CommandState::Sent { .. });
            let agent = record.command.agent_id.clone();
            self.insert(record);
            if sent {
                self.retry_or_dead_letter(now, &id);
            }
            if self
                .records
                .get(&id)
                .is_some_and(|r| matches!(r.state, CommandState::Queued { not_before } if not_before <= now))
            {
                ready.insert(agent);
            }
        }
        self.events.extend(ready.into_iter().map(DispatchEvent::Ready));
    }

    /// Gives up every unfinished command of `agent` and returns their current records, for a
    /// host instance that stops serving the agent and hands its commands back to the shared
    /// store. Call [`Dispatcher::on_session_closed`] first so that commands sent and never
    /// acknowledged are back in their queue. Reports no change: the driver persists the
    /// returned records.
    pub fn release_agent(&mut self, agent: &AgentId) -> Vec<CommandRecord> {
        let ids: Vec<CommandId> = self
            .records
            .iter()
            .filter(|(_, record)| record.command.agent_id == *agent)
            .map(|(id, _)| id.clone())
            .collect();
        let mut released = Vec::with_capacity(ids.len());
        for id in ids {
            self.set_timer(&id, None);
            if let Some(record) = self.records.remove(&id) {
                released.push(record);
            }
        }
        self.queues.remove(agent);
        self.acked.remove(agent);
        self.unfinished_per_agent.remove(agent);
        released.sort_by_key(|record| record.order);
        released
    }

    /// Cancels a command that is waiting in its queue. A command waiting for a retry was sent
    /// before and may have run: its agent never acknowledged it, so cancelling it ends its
    /// delivery, not necessarily its effect.
    pub fn cancel(&mut self, _now: Timestamp, id: &CommandId) -> Result<(), DispatchError> {
        match self.records.get(id).map(|r| &r.state) {
            None => Err(DispatchError::Unknown(id.clone())),
            Some(CommandState::Queued { .. }) => {
                self.finish(id, Terminal::Cancelled);
                Ok(())
            }
            Some(_) => Err(DispatchError::NotCancellable(id.clone())),
        }
    }

    /// Takes up to `max` commands for `agent` that may be sent now, in submission order, and
    /// marks them sent on `session`.
    pub fn next_for(&mut self, now: Timestamp, agent: &AgentId, session: u64, max: usize) -> Vec<Command> {
        let Some(queue) = self.queues.get(agent) else {
            return Vec::new();
        };
        let ready: Vec<(u64, CommandId)> = queue
            .iter()
            .filter(|(_, id)| {
                matches!(self.records.get(*id).map(|r| &r.state),
                    Some(CommandState::Queued { not_before }) if *not_before <= now)
            })
            .take(max)
            .map(|(order, id)| (*order, id.clone()))
            .collect();
        let mut commands = Vec::with_capacity(ready.len());
        for (order, id) in ready {
            self.dequeue(agent, order);
            self.set_timer(&id, None);
            let Some(record) = self.records.get_mut(&id) else { continue };
            record.attempts = record.attempts.saturating_add(1);
            record.state = CommandState::Sent { session };
            commands.push(Command {
                command_id: id.clone(),
                verb: record.command.verb.clone(),
                args: record.command.args.clone(),
                timeout_ms: crate::time::millis_of(record.command.timeout),
                attempt: record.attempts,
            });
            self.changed(&id);
        }
        commands
    }

    /// The agent acknowledged `id`: it will never be sent again and its result is due.
    pub fn on_acked(&mut self, now: Timestamp, id: &CommandId) {
        let grace = self.config.result_grace;
        let Some(record) = self.records.get_mut(id) else { return };
        if matches!(record.state, CommandState::Done(_) | CommandState::Acked { .. }) {
            return;
        }
        let deadline = now.saturating_add(record.command.timeout).saturating_add(grace);
        if let CommandState::Queued { .. } = record.state {
            let (agent, order) = (record.command.agent_id.clone(), record.order);
            self.dequeue(&agent, order);
        }
        let Some(record) = self.records.get_mut(id) else { return };
        record.state = CommandState::Acked { deadline };
        self.acked.entry(record.command.agent_id.clone()).or_default().insert(id.clone());
        self.set_timer(id, Some(deadline));
        self.changed(id);
    }

    /// A result arrived. Returns true when it finished the command; false when the command
    /// is unknown or already finished (a redelivered or late result: store nothing new).
    pub fn on_result(&mut self, _now: Timestamp, result: &CommandResult) -> bool {
        if !self.records.contains_key(&result.command_id) {
            return false;
        }
        self.finish(&result.command_id, Terminal::of(result.status));
        true
    }

    /// A session ended with `in_flight` commands. Those never acknowledged are retried after
    /// a backoff, or dead-lettered once their attempts are spent; acknowledged ones keep
    /// waiting for their results.
    pub fn on_session_closed(&mut self, now: Timestamp, session: u64, in_flight: &[(CommandId, Delivery)]) {
        for (id, _) in in_flight {
            let sent_here = matches!(
                self.records.get(id).map(|r| &r.state),
                Some(CommandState::Sent { session: s }) if *s == session
            );
            if sent_here {
                self.retry_or_dead_letter(now, id);
            }
        }
    }

    /// Expires queued commands and result deadlines, and reports agents whose retries are due.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        while let Some((at, id)) = self.timers.first().cloned() {
            if at > now {
                break;
            }
            self.set_timer(&id, None);
            let Some(record) = self.records.get(&id) else { continue };
            match &record.state {
                CommandState::Queued { not_before } => {
                    let expires = record.submitted_at.saturating_add(self.config.queue_ttl);
                    if now >= expires {
                        self.finish(&id, Terminal::DeadLettered(DeadLetter::QueueExpired));
                    } else {
                        if *not_before <= now {
                            self.events.push_back(DispatchEvent::Ready(record.command.agent_id.clone()));
                        }
                        let next = if *not_before > now { (*not_before).min(expires) } else { expires };
                        self.set_timer(&id, Some(next));
                    }
                }
                CommandState::Acked { deadline } if *deadline <= now => {
                    self.finish(&id, Terminal::DeadLettered(DeadLetter::NoResult));
                }
                _ => {}
            }
        }
    }

    /// When to call [`Dispatcher::handle_timeout`] next.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        self.timers.first().map(|(at, _)| *at)
    }

    /// The next transition to persist, or agent to feed.
    pub fn poll_event(&mut self) -> Option<DispatchEvent> {
        self.events.pop_front()
    }

    fn insert(&mut self, record: CommandRecord) {
        let id = record.command.command_id.clone();
        let agent = record.command.agent_id.clone();
        *self.unfinished_per_agent.entry(agent.clone()).or_default() += 1;
        let timer = match &record.state {
            CommandState::Queued { not_before } => {
                self.queues.entry(agent).or_default().insert(record.order, id.clone());
                let expires = record.submitted_at.saturating_add(self.config.queue_ttl);
                Some((*not_before).min(expires))
            }
            CommandState::Acked { deadline } => {
                self.acked.entry(agent).or_default().insert(id.clone());
                Some(*deadline)
            }
            _ => None,
        };
        self.records.insert(id.clone(), record);
        self.set_timer(&id, timer);
    }

    fn retry_or_dead_letter(&mut self, now: Timestamp, id: &CommandId) {
        let Some(record) = self.records.get_mut(id) else { return };
        match self.config.retry.decide(record.attempts, now, &mut self.entropy) {
            RetryDecision::RetryAt(at) => {
                record.state = CommandState::Queued { not_before: at };
                let (agent, order) = (record.command.agent_id.clone(), record.order);
                let expires = record.submitted_at.saturating_add(self.config.queue_ttl);
                self.queues.entry(agent).or_default().insert(order, id.clone());
                self.set_timer(id, Some(at.min(expires)));
                self.changed(id);
            }
            _ => {
                let attempts = record.attempts;
                self.finish(id, Terminal::DeadLettered(DeadLetter::AttemptsExhausted(attempts)));
            }
        }
    }

    fn finish(&mut self, id: &CommandId, terminal: Terminal) {
        let Some(mut record) = self.records.remove(id) else { return };
        let agent = record.command.agent_id.clone();
        self.dequeue(&agent, record.order);
        if let Some(count) = self.unfinished_per_agent.get_mut(&agent) {
            *count -= 1;
            if *count == 0 {
                self.unfinished_per_agent.remove(&agent);
            }
        }
        if let Some(acked) = self.acked.get_mut(&agent) {
            acked.remove(id);
            if acked.is_empty() {
                self.acked.remove(&agent);
            }
        }
        self.set_timer(id, None);
        record.state = CommandState::Done(terminal);
        self.events.push_back(DispatchEvent::Changed(record));
    }

    fn dequeue(&mut self, agent: &AgentId, order: u64) {
        if let Some(queue) = self.queues.get_mut(agent) {
            queue.remove(&order);
            if queue.is_empty() {
                self.queues.remove(agent);
            }
        }
    }

    fn set_timer(&mut self, id: &CommandId, at: Option<Timestamp>) {
        if let Some(old) = self.timer_index.remove(id) {
            self.timers.remove(&(old, id.clone()));
        }
        if let Some(at) = at {
            self.timers.insert((at, id.clone()));
            self.timer_index.insert(id.clone(), at);
        }
    }

    fn changed(&mut self, id: &CommandId) {
        if let Some(record) = self.records.get(id) {
            self.events.push_back(DispatchEvent::Changed(record.clone()));
        }
    }
}

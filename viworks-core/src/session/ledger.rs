//! At-most-once execution on the agent: a durable ledger of commands started and finished,
//! and the guard that consults it before anything runs.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use thiserror::Error;

use super::agent::AgentSession;
use crate::Timestamp;
use crate::wire::{Command, CommandId, CommandResult, ResultError, ResultStatus, Text};

/// What the ledger knows of one command.
#[derive(Clone, Debug, PartialEq)]
pub enum LedgerEntry {
    /// Recorded as started and not finished: running now, or interrupted by a crash.
    Started,
    /// Finished with this result; `acked` once the host stored it.
    Finished {
        /// The result, kept to answer re-deliveries.
        result: CommandResult,
        /// Whether the host acknowledged it (it has left the outbox).
        acked: bool,
    },
}

/// The agent's durable record of execution. Every method must be durable when it returns:
/// the guard relies on `record_started` having reached stable storage before the command runs.
///
/// The ledger doubles as the outbox: finished results not yet acknowledged by the host.
pub trait ExecutionLedger {
    /// The storage's error.
    type Error: std::error::Error + Send + Sync + 'static;

    /// What is known of `id`.
    fn entry(&mut self, id: &CommandId) -> Result<Option<LedgerEntry>, Self::Error>;

    /// Records that `command` is about to run.
    fn record_started(&mut self, command: &Command, now: Timestamp) -> Result<(), Self::Error>;

    /// Records `result` and puts it in the outbox.
    fn record_finished(&mut self, result: &CommandResult, now: Timestamp) -> Result<(), Self::Error>;

    /// Takes acknowledged results out of the outbox (their entries stay, to answer
    /// re-deliveries, until pruned).
    fn record_acked(&mut self, ids: &[CommandId]) -> Result<(), Self::Error>;

    /// Up to `limit` results in the outbox, oldest first.
    fn outbox(&mut self, limit: usize) -> Result<Vec<CommandResult>, Self::Error>;

    /// Commands started and never finished.
    fn unfinished(&mut self) -> Result<Vec<CommandId>, Self::Error>;
}

/// The error of [`MemoryLedger`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum MemoryLedgerError {
    /// Every entry is unfinished or unacknowledged, so none can be pruned to make room.
    #[error("the ledger is full of unacknowledged entries")]
    Full,
}

/// An [`ExecutionLedger`] in memory, for tests and simulations (where "durable" means
/// "kept across a simulated crash"). Holds at most `capacity` entries and prunes the oldest
/// acknowledged ones to make room.
#[derive(Clone, Debug)]
pub struct MemoryLedger {
    entries: BTreeMap<CommandId, LedgerEntry>,
    order: VecDeque<CommandId>,
    capacity: usize,
}

impl MemoryLedger {
    /// An empty ledger of `capacity` entries (at least one).
    pub fn new(capacity: usize) -> Self {
        MemoryLedger { entries: BTreeMap::new(), order: VecDeque::new(), capacity: capacity.max(1) }
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the ledger is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn make_room(&mut self) -> Result<(), MemoryLedgerError> {
        if self.entries.len() < self.capacity {
            return Ok(());
        }
        let prunable = self
            .order
            .iter()
            .position(|id| matches!(self.entries.get(id), Some(LedgerEntry::Finished { acked: true, .. }) | None));
        match prunable.and_then(|at| self.order.remove(at)) {
            Some(id) => {
                self.entries.remove(&id);
                Ok(())
            }
            None => Err(MemoryLedgerError::Full),
        }
    }
}

impl ExecutionLedger for MemoryLedger {
    type Error = MemoryLedgerError;

    fn entry(&mut self, id: &CommandId) -> Result<Option<LedgerEntry>, Self::Error> {
        Ok(self.entries.get(id).cloned())
    }

    fn record_started(&mut self, command: &Command, _now: Timestamp) -> Result<(), Self::Error> {
        if !self.entries.contains_key(&command.command_id) {
            self.make_room()?;
            self.order.push_back(command.command_id.clone());
        }
        self.entries.insert(command.command_id.clone(), LedgerEntry::Started);
        Ok(())
    }

    fn record_finished(&mut self, result: &CommandResult, _now: Timestamp) -> Result<(), Self::Error> {
        if !self.entries.contains_key(&result.command_id) {
            self.make_room()?;
            self.order.push_back(result.command_id.clone());
        }
        self.entries.insert(result.command_id.clone(), LedgerEntry::Finished { result: result.clone(), acked: false });
        Ok(())
    }

    fn record_acked(&mut self, ids: &[CommandId]) -> Result<(), Self::Error> {
        for id in ids {
            if let Some(LedgerEntry::Finished { acked, .. }) = self.entries.get_mut(id) {
                *acked = true;
            }
        }
        Ok(())
    }

    fn outbox(&mut self, limit: usize) -> Result<Vec<CommandResult>, Self::Error> {
        Ok(self
            .order
            .iter()
            .filter_map(|id| match self.entries.get(id) {
                Some(LedgerEntry::Finished { result, acked: false }) => Some(result.clone()),
                _ => None,
            })
            .take(limit)
            .collect())
    }

    fn unfinished(&mut self) -> Result<Vec<CommandId>, Self::Error> {
        Ok(self.entries.iter().filter(|(_, e)| **e == LedgerEntry::Started).map(|(id, _)| id.clone()).collect())
    }
}

/// Makes execution at-most-once per command on an agent, across re-deliveries, reconnects
/// and crashes.
///
/// Every command from the host goes through [`ExecutionGuard::on_command`], which answers a
/// known command from the ledger and lets an unknown one run only after recording it as
/// started. A command found started but unfinished at start-up was interrupted by a crash: it
/// is reported `interrupted` and never run again.
#[derive(Debug)]
pub struct ExecutionGuard<L> {
    ledger: L,
    running: BTreeSet<CommandId>,
    max_concurrency: usize,
    /// Outbox results already sent on the current session.
    sent: BTreeSet<CommandId>,
}

impl<L: ExecutionLedger> ExecutionGuard<L> {
    /// A guard over `ledger` after a (re)start: every command started and never finished is
    /// recorded as `interrupted` and joins the outbox.
    pub fn recover(mut ledger: L, now: Timestamp, max_concurrency: u32) -> Result<Self, L::Error> {
        for id in ledger.unfinished()? {
            ledger.record_finished(&interrupted(id), now)?;
        }
        Ok(ExecutionGuard {
            ledger,
            running: BTreeSet::new(),
            max_concurrency: max_concurrency.max(1) as usize,
            sent: BTreeSet::new(),
        })
    }

    /// The ledger.
    pub fn ledger(&self) -> &L {
        &self.ledger
    }

    /// The ledger, for upkeep such as pruning acknowledged entries. Changing what it says of
    /// unfinished or unacknowledged commands breaks the guard's promise.
    pub fn ledger_mut(&mut self) -> &mut L {
        &mut self.ledger
    }

    /// Commands running now.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Handles a command from the host. Returns the command when it must run now (it is
    /// recorded as started and acknowledged); returns `None` when it was answered from the
    /// ledger or is already running.
    ///
    /// Acknowledgements and results that cannot be queued on `session` are not lost: the
    /// host re-delivers unacknowledged commands, and results stay in the outbox.
    pub fn on_command(
        &mut self,
        now: Timestamp,
        session: &mut AgentSession,
        command: Command,
    ) -> Result<Option<Command>, L::Error> {
        let id = command.command_id.clone();
        match self.ledger.entry(&id)? {
            Some(LedgerEntry::Finished { result, .. }) => {
                let _ = session.send_ack(now, id);
                let _ = session.send_result(now, result);
                Ok(None)
            }
            Some(LedgerEntry::Started) => {
                // Running in this process (a crash would have turned it into a result).
                let _ = session.send_ack(now, id);
                Ok(None)
            }
            None if self.running.len() >= self.max_concurrency => {
                // The host never exceeds the credits it was given; refuse rather than queue.
                self.ledger.record_started(&command, now)?;
                let refused =
                    rejected(id.clone(), "over_concurrency", "the agent runs as many commands as it advertised");
                self.ledger.record_finished(&refused, now)?;
                let _ = session.send_ack(now, id);
                let _ = session.send_result(now, refused);
                Ok(None)
            }
            None => {
                self.ledger.record_started(&command, now)?;
                // Recorded durably above; from here on a crash reports it interrupted.
                self.running.insert(id.clone());
                let _ = session.send_ack(now, id);
                Ok(Some(command))
            }
        }
    }

    /// Records a finished command's result and sends it when a session is up; otherwise it
    /// waits in the outbox for the next one.
    pub fn on_finished(
        &mut self,
        now: Timestamp,
        session: Option<&mut AgentSession>,
        result: CommandResult,
    ) -> Result<(), L::Error> {
        self.running.remove(&result.command_id);
        self.ledger.record_finished(&result, now)?;
        if let Some(session) = session {
            let id = result.command_id.clone();
            if session.send_result(now, result).is_ok() {
                self.sent.insert(id);
            }
        }
        Ok(())
    }

    /// Starts sending the outbox on a newly established session, as much as it has room for;
    /// [`ExecutionGuard::flush_outbox`] sends the rest as room frees up.
    pub fn on_established(&mut self, now: Timestamp, session: &mut AgentSession) -> Result<usize, L::Error> {
        self.sent.clear();
        self.flush_outbox(now, session)
    }

    /// Sends outbox results not yet sent on this session, as many as it has room for. Call
    /// it after draining the session's transmit queue; returns how many were queued.
    pub fn flush_outbox(&mut self, now: Timestamp, session: &mut AgentSession) -> Result<usize, L::Error> {
        let room = session.room();
        if room == 0 {
            return Ok(0);
        }
        // The outbox is small in practice (bounded by the ledger); skip what was sent already.
        let mut pending = self.ledger.outbox(self.sent.len().saturating_add(room))?;
        pending.retain(|r| !self.sent.contains(&r.command_id));
        let mut queued = 0;
        for result in pending.into_iter().take(room) {
            let id = result.command_id.clone();
            if session.send_result(now, result).is_err() {
                break;
            }
            self.sent.insert(id);
            queued += 1;
        }
        Ok(queued)
    }

    /// Takes results the host stored out of the outbox.
    pub fn on_results_acked(&mut self, ids: &[CommandId]) -> Result<(), L::Error> {
        for id in ids {
            self.sent.remove(id);
        }
        self.ledger.record_acked(ids)
    }
}

fn interrupted(command_id: CommandId) -> CommandResult {
    CommandResult {
        command_id,
        status: ResultStatus::Interrupted,
        exit_code: None,
        output: serde_json::Value::Null,
        error: Some(ResultError {
            code: Text::lossy("interrupted"),
            message: Text::lossy("the agent stopped while the command ran; it was not run again"),
        }),
        duration_ms: 0,
    }
}

fn rejected(command_id: CommandId, code: &str, message: &str) -> CommandResult {
    CommandResult {
        command_id,
        status: ResultStatus::Rejected,
        exit_code: None,
        output: serde_json::Value::Null,
        error: Some(ResultError { code: Text::lossy(code), message: Text::lossy(message) }),
        duration_ms: 0,
    }
}

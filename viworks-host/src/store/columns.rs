//! Column conversions both stores share: how numbers, times, ids and JSON are written to a
//! column and read back, and how a value that cannot be read back becomes
//! [`StoreError::Corrupt`] rather than a panic. Both databases store `u64`s as signed 64-bit
//! integers, so both use the same saturating mapping and read each other's rules back.

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde::de::DeserializeOwned;
use viworks_core::Timestamp;
use viworks_core::session::{CommandRecord, CommandState, DeadLetter, Terminal};
use viworks_core::wire::{AgentId, IdError};

use super::{QueueBounds, StoreError};

pub(super) fn corrupt(table: &'static str, detail: impl Into<String>) -> StoreError {
    StoreError::Corrupt { table, detail: detail.into() }
}

pub(super) fn now() -> Timestamp {
    let millis = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0));
    Timestamp::from_millis(millis)
}

/// A `u64` as an SQLite INTEGER. Values past `i64::MAX` saturate there, and `i64::MAX` reads
/// back as `u64::MAX`: order is kept, and the far-future times saturating arithmetic produces
/// (`u64::MAX`) round-trip exactly. Only values in `i64::MAX..u64::MAX` (ages past 292
/// million years) are not kept exactly.
pub(super) fn u64_sql(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

pub(super) fn u64_from(value: i64, table: &'static str, column: &str) -> Result<u64, StoreError> {
    if value == i64::MAX {
        return Ok(u64::MAX);
    }
    u64::try_from(value).map_err(|_| corrupt(table, format!("{column} is negative ({value})")))
}

pub(super) fn ts_sql(ts: Timestamp) -> i64 {
    u64_sql(ts.as_millis())
}

pub(super) fn ts_from(value: i64, table: &'static str, column: &str) -> Result<Timestamp, StoreError> {
    u64_from(value, table, column).map(Timestamp::from_millis)
}

pub(super) fn u32_from(value: i64, table: &'static str, column: &str) -> Result<u32, StoreError> {
    u32::try_from(value).map_err(|_| corrupt(table, format!("{column} is out of range ({value})")))
}

/// A session number is an opaque identity, not a quantity: its bits are stored as they are.
pub(super) fn session_sql(session: u64) -> i64 {
    i64::from_ne_bytes(session.to_ne_bytes())
}

pub(super) fn session_from(value: i64) -> u64 {
    u64::from_ne_bytes(value.to_ne_bytes())
}

pub(super) fn millis_of(span: Duration) -> u64 {
    u64::try_from(span.as_millis()).unwrap_or(u64::MAX)
}

pub(super) fn json_text(value: &impl Serialize) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Database(format!("cannot encode JSON: {e}")))
}

pub(super) fn json_from<T: DeserializeOwned>(text: &str, table: &'static str, column: &str) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|e| corrupt(table, format!("{column} is not valid JSON of its type: {e}")))
}

pub(super) fn id_from<T: FromStr<Err = IdError>>(
    text: &str,
    table: &'static str,
    column: &str,
) -> Result<T, StoreError> {
    text.parse().map_err(|e| corrupt(table, format!("{column} {text:?}: {e}")))
}

/// A list limit: 0 means 100, anything above `cap` means `cap`.
pub(super) fn limit_sql(limit: usize, cap: usize) -> i64 {
    let limit = if limit == 0 { 100 } else { limit.min(cap) };
    i64::try_from(limit).unwrap_or(i64::MAX)
}

/// A command's state as columns: name, not_before, session, deadline, dead-letter reason and
/// dead-letter attempt count.
pub(super) struct StateColumns {
    pub(super) name: &'static str,
    pub(super) not_before: Option<i64>,
    pub(super) session: Option<i64>,
    pub(super) deadline: Option<i64>,
    pub(super) reason: Option<&'static str>,
    pub(super) reason_attempts: Option<i64>,
}

impl StateColumns {
    pub(super) fn of(state: &CommandState) -> Self {
        let mut columns = StateColumns {
            name: "",
            not_before: None,
            session: None,
            deadline: None,
            reason: None,
            reason_attempts: None,
        };
        match state {
            CommandState::Queued { not_before } => {
                columns.name = "queued";
                columns.not_before = Some(ts_sql(*not_before));
            }
            CommandState::Sent { session } => {
                columns.name = "sent";
                columns.session = Some(session_sql(*session));
            }
            CommandState::Acked { deadline } => {
                columns.name = "acked";
                columns.deadline = Some(ts_sql(*deadline));
            }
            CommandState::Done(terminal) => {
                columns.name = terminal.as_str();
                if let Terminal::DeadLettered(why) = terminal {
                    columns.reason = Some(why.as_str());
                    if let DeadLetter::AttemptsExhausted(n) = why {
                        columns.reason_attempts = Some(i64::from(*n));
                    }
                }
            }
        }
        columns
    }
}

/// The dead-letter record of an unowned command whose timer ran out at `now`, if it did:
/// queued (or sent by an instance that died) past `queue_ttl` since submission, or
/// acknowledged past its result deadline. The rule the dispatcher applies to the commands it
/// holds, applied to the rows no dispatcher holds.
pub(super) fn expired(record: &CommandRecord, now: Timestamp, queue_ttl: Duration) -> Option<CommandRecord> {
    let reason = match record.state {
        CommandState::Queued { .. } | CommandState::Sent { .. }
            if record.submitted_at.saturating_add(queue_ttl) <= now =>
        {
            DeadLetter::QueueExpired
        }
        CommandState::Acked { deadline } if deadline <= now => DeadLetter::NoResult,
        _ => return None,
    };
    let mut finished = record.clone();
    finished.state = CommandState::Done(Terminal::DeadLettered(reason));
    Some(finished)
}

/// Checks a job's commands against `bounds`, given the unfinished commands stored now
/// (`stored_total`) and per target agent (`stored_per_agent`, agents absent have none).
pub(super) fn check_bounds(
    commands: &[CommandRecord],
    stored_total: u64,
    stored_per_agent: &BTreeMap<String, u64>,
    bounds: QueueBounds,
) -> Result<(), StoreError> {
    let total = usize::try_from(stored_total).unwrap_or(usize::MAX);
    let global = total.saturating_add(commands.len()) > bounds.max_commands;
    let mut new_per_agent: BTreeMap<&AgentId, usize> = BTreeMap::new();
    for record in commands {
        *new_per_agent.entry(&record.command.agent_id).or_default() += 1;
    }
    let agents: Vec<AgentId> = new_per_agent
        .into_iter()
        .filter(|(agent, new)| {
            let stored = stored_per_agent.get(agent.as_str()).copied().unwrap_or(0);
            usize::try_from(stored).unwrap_or(usize::MAX).saturating_add(*new) > bounds.per_agent
        })
        .map(|(agent, _)| agent.clone())
        .collect();
    if global || !agents.is_empty() { Err(StoreError::QueueFull { global, agents }) } else { Ok(()) }
}

/// The distinct target agents of a job's commands.
pub(super) fn targets(commands: &[CommandRecord]) -> Vec<String> {
    let unique: BTreeSet<&str> = commands.iter().map(|r| r.command.agent_id.as_str()).collect();
    unique.into_iter().map(str::to_owned).collect()
}

/// A job's targets above which the Postgres store counts every agent's unfinished commands in
/// one grouped scan instead of one indexed count per target.
pub(super) const PER_TARGET_COUNTS: usize = 64;

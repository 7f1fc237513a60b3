//! JSON renderings of stored records, as the API returns them. Times are integer milliseconds
//! since the Unix epoch, everywhere.

use serde_json::{Value, json};
use viworks_core::session::{CommandState, Terminal};

use crate::store::{AgentRecord, AuditEntry, DeadLetterRow, JobRecord, StoredCommand, TelemetryRow};

/// Every command state name, as `state` shows it and the `status` filter takes it.
pub const STATES: &[&str] = &[
    "queued",
    "sent",
    "acked",
    "succeeded",
    "failed",
    "timed_out",
    "interrupted",
    "rejected",
    "cancelled",
    "dead_lettered",
];

/// The name of a lifecycle state: `queued`, `sent`, `acked` or a terminal name.
pub fn state_name(state: &CommandState) -> &'static str {
    match state {
        CommandState::Queued { .. } => "queued",
        CommandState::Sent { .. } => "sent",
        CommandState::Acked { .. } => "acked",
        CommandState::Done(terminal) => terminal.as_str(),
    }
}

/// Whether a command reached its one terminal state.
pub fn is_terminal(stored: &StoredCommand) -> bool {
    matches!(stored.record.state, CommandState::Done(_))
}

/// A command with its result.
pub fn command(stored: &StoredCommand) -> Value {
    let record = &stored.record;
    let reason = match &record.state {
        CommandState::Done(Terminal::DeadLettered(reason)) => Some(reason.as_str()),
        _ => None,
    };
    let result = stored.result.as_ref().map(|r| {
        json!({
            "status": r.result.status,
            "exit_code": r.result.exit_code,
            "output": r.result.output,
            "error": r.result.error,
            "duration_ms": r.result.duration_ms,
            "received_at": r.received_at.as_millis(),
        })
    });
    json!({
        "command_id": record.command.command_id,
        "job_id": stored.job_id,
        "agent_id": record.command.agent_id,
        "verb": record.command.verb,
        "args": record.command.args,
        "timeout_secs": record.command.timeout.as_secs(),
        "state": state_name(&record.state),
        "terminal": is_terminal(stored),
        "dead_letter_reason": reason,
        "attempts": record.attempts,
        "cursor": record.order.to_string(),
        "submitted_at": record.submitted_at.as_millis(),
        "updated_at": stored.updated_at.as_millis(),
        "result": result,
    })
}

/// A job with all its commands.
pub fn job(job: &JobRecord, commands: &[StoredCommand]) -> Value {
    let items: Vec<Value> = commands.iter().map(command).collect();
    json!({
        "job_id": job.job_id,
        "req_id": job.req_id,
        "actor": job.actor,
        "verb": job.verb,
        "args": job.args,
        "created_at": job.created_at.as_millis(),
        "complete": commands.iter().all(is_terminal),
        "commands": items,
    })
}

/// An agent, with whether it has a live session on this host.
pub fn agent(agent: &AgentRecord, online: bool) -> Value {
    json!({
        "agent_id": agent.agent_id,
        "site": agent.site,
        "hostname": agent.hostname,
        "version": agent.version,
        "capabilities": agent.capabilities,
        "max_concurrency": agent.max_concurrency,
        "status": if agent.revoked { "revoked" } else if online { "online" } else { "offline" },
        "maintenance": agent.maintenance,
        "enrolled_at": agent.enrolled_at.as_millis(),
        "last_seen": agent.last_seen.map(|t| t.as_millis()),
    })
}

/// A telemetry sample.
pub fn sample(row: &TelemetryRow) -> Value {
    json!({ "ts": row.ts.as_millis(), "metric": row.metric_key, "value": row.value })
}

/// An audit record, with its place in the hash chain.
pub fn audit(entry: &AuditEntry) -> Value {
    json!({
        "seq": entry.seq,
        "ts": entry.content.ts.as_millis(),
        "req_id": entry.content.req_id,
        "actor": entry.content.actor,
        "action": entry.content.action,
        "args_hash": entry.content.args_hash,
        "targets": entry.content.targets,
        "rc": entry.content.rc,
        "duration_ms": entry.content.duration_ms,
        "detail": entry.content.detail,
        "prev_hash": entry.prev_hash,
        "hash": entry.hash,
    })
}

/// A dead letter.
pub fn dead_letter(row: &DeadLetterRow) -> Value {
    json!({
        "command_id": row.command_id,
        "agent_id": row.agent_id,
        "reason": row.reason,
        "attempts": row.attempts,
        "at": row.at.as_millis(),
    })
}

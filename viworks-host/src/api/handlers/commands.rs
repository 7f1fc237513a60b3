//! Commands and jobs: submit, list, read, cancel, and follow a job's events.

use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};
use viworks_core::idempotency::{IdempotencyKey, JobId, RequestDigest};
use viworks_core::wire::{AgentId, CommandId, Verb};

use super::Reply;
use crate::api::views::{self, STATES};
use crate::api::{ApiError, ApiState, Call, sse};
use crate::audit::chain::args_hash;
use crate::control::{ControlError, SubmitRequest, Targets};
use crate::store::{CommandFilter, Store};

/// The most agent ids one submission may list; a selector reaches any number.
pub const MAX_TARGETS: usize = 10_000;

/// At most this many targets are named in an audit record; the count is always there.
const AUDITED_TARGETS: usize = 100;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubmitBody {
    verb: String,
    #[serde(default)]
    args: Value,
    #[serde(default)]
    targets: Option<Vec<String>>,
    #[serde(default)]
    selector: Option<SelectorBody>,
    #[serde(default)]
    priority: Option<i32>,
    #[serde(default)]
    timeout_secs: Option<u64>,
}

#[derive(Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct SelectorBody {
    #[serde(default)]
    site: Option<String>,
    #[serde(default)]
    capability: Option<String>,
    #[serde(default)]
    status: Option<String>,
}

/// `POST /api/v1/commands`: validates the verb and its arguments, resolves the targets and
/// stores one command per target durably before answering 202. With an `Idempotency-Key`, the
/// same caller repeating the same request gets the same job (200); anything else with the key
/// is 409.
pub(super) async fn submit<S: Store + Clone>(state: &ApiState<S>, call: &mut Call<'_>) -> Result<Reply, ApiError> {
    call.query.only(&[])?;
    let request: SubmitBody = call.json()?;
    let detail = &mut call.note.detail;
    detail.insert("verb".into(), json!(request.verb));
    detail.insert("priority".into(), json!(request.priority.unwrap_or(0)));
    detail.insert("timeout_secs".into(), json!(request.timeout_secs));
    if let Some(selector) = &request.selector {
        detail.insert("selector".into(), json!(selector));
    }

    let verb = Verb::new(request.verb.as_str()).map_err(|e| ApiError::invalid("verb", format!("verb: {e}")))?;
    // The verb's schema decides before anything is queued; what is stored (and hashed) is the
    // canonical form the agent will parse.
    let args = viworks_core::verbs::parse(&verb, &request.args)?;
    let timeout = args.timeout(request.timeout_secs.map(Duration::from_secs))?;
    let args_value = args.to_value();
    call.note.args_hash = Some(args_hash(&args_value));
    call.note.detail.insert("risk".into(), json!(args.risk().as_str()));
    let targets = targets(request.targets, request.selector)?;
    let idempotency = match call.headers.get("Idempotency-Key") {
        None => None,
        Some(value) => {
            let key = value.to_str().ok().and_then(|k| IdempotencyKey::new(k).ok()).ok_or_else(|| {
                ApiError::BadRequest("Idempotency-Key must be 1 to 128 printable ASCII characters".into())
            })?;
            call.note.detail.insert("idempotency_key".into(), json!(key));
            // The digest covers the caller's token, the method, the path and the canonical body,
            // so no token can ever replay (or learn of) another token's job.
            let body: Value = serde_json::from_slice(&call.body).unwrap_or(Value::Null);
            let scope = json!({ "actor": call.caller.token_hash, "method": "POST", "path": call.path, "body": body });
            Some((key, RequestDigest::of_json(&scope)))
        }
    };
    let submitted = state
        .control
        .submit(SubmitRequest {
            verb,
            args: args_value,
            targets,
            timeout,
            actor: call.caller.name.clone(),
            req_id: call.req_id.to_owned(),
            idempotency,
        })
        .await?;
    call.note.targets = submitted.commands.iter().take(AUDITED_TARGETS).map(|(_, agent)| agent.to_string()).collect();
    call.note.detail.insert("job_id".into(), json!(submitted.job_id));
    call.note.detail.insert("commands".into(), json!(submitted.commands.len()));
    call.note.detail.insert("replayed".into(), json!(submitted.replayed));
    let commands: Vec<Value> =
        submitted.commands.iter().map(|(command, agent)| json!({ "command_id": command, "agent_id": agent })).collect();
    let status = if submitted.replayed { 200 } else { 202 };
    Ok(Reply::Json(status, json!({ "job_id": submitted.job_id, "req_id": call.req_id, "commands": commands })))
}

fn targets(ids: Option<Vec<String>>, selector: Option<SelectorBody>) -> Result<Targets, ApiError> {
    match (ids, selector) {
        (Some(ids), None) => {
            if ids.is_empty() || ids.len() > MAX_TARGETS {
                return Err(ApiError::invalid("targets", format!("give 1 to {MAX_TARGETS} agent ids")));
            }
            let ids = ids
                .iter()
                .enumerate()
                .map(|(n, id)| {
                    AgentId::new(id.as_str()).map_err(|e| ApiError::invalid(format!("targets[{n}]"), e.to_string()))
                })
                .collect::<Result<_, _>>()?;
            Ok(Targets::Agents(ids))
        }
        (None, Some(selector)) => {
            let online = match selector.status.as_deref() {
                None => None,
                Some("online") => Some(true),
                Some("offline") => Some(false),
                Some(other) => {
                    return Err(ApiError::invalid("selector.status", format!("{other:?} is not online or offline")));
                }
            };
            Ok(Targets::Selector { site: selector.site, capability: selector.capability, online })
        }
        (Some(_), Some(_)) => Err(ApiError::invalid("targets", "give targets or a selector, not both")),
        (None, None) => Err(ApiError::invalid("targets", "give a list of agent ids (targets) or a selector")),
    }
}

/// `GET /api/v1/commands`: newest first, filtered by status, agent and verb; `cursor` is the
/// `next_cursor` of the previous page.
pub(super) async fn list<S: Store + Clone>(state: &ApiState<S>, call: &mut Call<'_>) -> Result<Reply, ApiError> {
    call.query.only(&["status", "agent", "verb", "limit", "cursor"])?;
    let status = call.query.get("status").map(str::to_owned);
    if let Some(status) = &status
        && !STATES.contains(&status.as_str())
    {
        return Err(ApiError::BadRequest(format!("status {status:?} is not one of {}", STATES.join(", "))));
    }
    let filter = CommandFilter {
        status,
        agent: call.query.parsed::<AgentId>("agent")?,
        verb: call.query.parsed::<Verb>("verb")?,
        before: call.query.parsed::<u64>("cursor")?,
        limit: call.query.limit(100, 1000)?,
    };
    let commands = state.control.store().commands(&filter).await?;
    let next = match commands.last() {
        Some(last) if commands.len() == filter.limit => Some(last.record.order.to_string()),
        _ => None,
    };
    let items: Vec<Value> = commands.iter().map(views::command).collect();
    Ok(Reply::Json(200, json!({ "commands": items, "next_cursor": next })))
}

/// `GET /api/v1/commands/{id}`.
pub(super) async fn get<S: Store + Clone>(state: &ApiState<S>, call: &mut Call<'_>) -> Result<Reply, ApiError> {
    call.query.only(&[])?;
    let id: CommandId = call.param("command")?;
    match state.control.store().command(&id).await? {
        Some(stored) => Ok(Reply::Json(200, views::command(&stored))),
        None => Err(ApiError::NotFound(format!("no command {id}"))),
    }
}

/// `POST /api/v1/commands/{id}/cancel`: cancels a command not yet sent; 409 once it was sent
/// or has finished.
pub(super) async fn cancel<S: Store + Clone>(state: &ApiState<S>, call: &mut Call<'_>) -> Result<Reply, ApiError> {
    call.query.only(&[])?;
    let id: CommandId = call.param("command")?;
    match state.control.cancel(&id).await {
        Ok(()) => Ok(Reply::Json(200, json!({ "command_id": id, "state": "cancelled" }))),
        Err(ControlError::NotFound(_)) => match state.control.store().command(&id).await? {
            // Known, but no longer unfinished.
            Some(stored) => {
                Err(ApiError::Conflict(format!("command {id} is {} already", views::state_name(&stored.record.state))))
            }
            None => Err(ApiError::NotFound(format!("no command {id}"))),
        },
        Err(error) => Err(error.into()),
    }
}

/// `GET /api/v1/jobs/{id}`: the job with every command, state and result.
pub(super) async fn job<S: Store + Clone>(state: &ApiState<S>, call: &mut Call<'_>) -> Result<Reply, ApiError> {
    call.query.only(&[])?;
    let id: JobId = call.param("job")?;
    match state.control.store().job(&id).await? {
        Some((job, commands)) => Ok(Reply::Json(200, views::job(&job, &commands))),
        None => Err(ApiError::NotFound(format!("no job {id}"))),
    }
}

/// `GET /api/v1/jobs/{id}/events`: server-sent events until the job is complete.
pub(super) async fn job_events<S: Store + Clone>(state: &ApiState<S>, call: &mut Call<'_>) -> Result<Reply, ApiError> {
    call.query.only(&[])?;
    let id: JobId = call.param("job")?;
    Ok(Reply::Raw(sse::job_events(state, id, call.streams).await?))
}

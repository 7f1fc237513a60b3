//! Commands and jobs: submit, list, read, cancel, and follow a job's events.

use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value, json};
use viworks_core::idempotency::{IdempotencyKey, JobId, RequestDigest};
use viworks_core::verbs::Args;
use viworks_core::wire::{AgentId, CommandId, Verb};

use super::Reply;
use crate::api::request::{Query, json_body};
use crate::api::views::{self, STATES};
use crate::api::{ApiError, ApiState, Call, sse};
use crate::audit::chain::args_hash;
use crate::control::{ControlError, SubmitRequest, Targets};
use crate::store::{CommandFilter, Store};

/// The most agent ids one submission may list; a selector reaches any number.
pub const MAX_TARGETS: usize = 10_000;

/// At most this many targets are named in an audit record; the count is always there.
const AUDITED_TARGETS: usize = 100;

/// The body of `POST /api/v1/commands` as received: `{verb, args, targets | selector,
/// priority, timeout_secs}`, JSON with no other fields, not yet checked against the verb
/// registry or the target rules.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitBody {
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

#[derive(Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct SelectorBody {
    #[serde(default)]
    site: Option<String>,
    #[serde(default)]
    capability: Option<String>,
    #[serde(default)]
    status: Option<String>,
}

/// A submission's verb with arguments checked against the verb's schema, and the deadline each
/// of its commands gets.
#[derive(Debug)]
pub struct CheckedCommand {
    /// The verb, registered.
    pub verb: Verb,
    /// Its arguments, parsed against its schema; [`Args::to_value`] is what is stored.
    pub args: Args,
    /// The per-command deadline: the requested one within the verb's bounds, or its default.
    pub timeout: Duration,
}

impl SubmitBody {
    /// Parses a request body; 400 when it is empty, not JSON, or not of this shape (a wrong
    /// type, an unknown field). Costs one JSON parse of at most [`crate::api::MAX_BODY`] bytes.
    pub fn parse(body: &[u8]) -> Result<Self, ApiError> {
        json_body(body)
    }

    /// Notes what the audit record keeps of the request whatever its outcome: the verb, the
    /// priority, the requested timeout and the selector; never argument values.
    fn note(&self, detail: &mut Map<String, Value>) {
        detail.insert("verb".into(), json!(self.verb));
        detail.insert("priority".into(), json!(self.priority.unwrap_or(0)));
        detail.insert("timeout_secs".into(), json!(self.timeout_secs));
        if let Some(selector) = &self.selector {
            detail.insert("selector".into(), json!(selector));
        }
    }

    /// Checks the verb, its arguments and the timeout; 422 naming the field to blame (`verb`,
    /// `args.<field>`, `timeout_secs`).
    pub fn command(&self) -> Result<CheckedCommand, ApiError> {
        let verb = Verb::new(self.verb.as_str()).map_err(|e| ApiError::invalid("verb", format!("verb: {e}")))?;
        // The verb's schema decides before anything is queued; what is stored (and hashed) is
        // the canonical form the agent will parse.
        let args = viworks_core::verbs::parse(&verb, &self.args)?;
        let timeout = args.timeout(self.timeout_secs.map(Duration::from_secs))?;
        Ok(CheckedCommand { verb, args, timeout })
    }

    /// The targets: 1 to [`MAX_TARGETS`] valid agent ids, or a selector whose status is
    /// `online` or `offline`; 422 naming the field to blame otherwise.
    pub fn into_targets(self) -> Result<Targets, ApiError> {
        targets(self.targets, self.selector)
    }
}

/// `POST /api/v1/commands`: validates the verb and its arguments, resolves the targets and
/// stores one command per target durably before answering 202. With an `Idempotency-Key`, the
/// same caller repeating the same request gets the same job (200); anything else with the key
/// is 409.
pub(super) async fn submit<S: Store + Clone>(state: &ApiState<S>, call: &mut Call<'_>) -> Result<Reply, ApiError> {
    call.query.only(&[])?;
    let request = SubmitBody::parse(&call.body)?;
    request.note(&mut call.note.detail);
    let CheckedCommand { verb, args, timeout } = request.command()?;
    let args_value = args.to_value();
    call.note.args_hash = Some(args_hash(&args_value));
    call.note.detail.insert("risk".into(), json!(args.risk().as_str()));
    let targets = request.into_targets()?;
    let idempotency = match call.headers.get("Idempotency-Key") {
        None => None,
        Some(value) => {
            let key = value.to_str().ok().and_then(|k| IdempotencyKey::new(k).ok()).ok_or_else(|| {
                ApiError::BadRequest("Idempotency-Key must be 1 to 128 printable ASCII characters".into())
            })?;
            call.note.detail.insert("idempotency_key".into(), json!(key));
            let scope = idempotency_scope(&call.caller.token_hash, call.path, &call.body);
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

/// What an idempotency key's digest covers: the caller's token, the method, the path and the
/// canonical body (`null` when it is not JSON), so that no token can ever replay (or learn of)
/// another token's job.
pub fn idempotency_scope(token_hash: &str, path: &str, body: &[u8]) -> Value {
    let body: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    json!({ "actor": token_hash, "method": "POST", "path": path, "body": body })
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

/// The filter of `GET /api/v1/commands?status&agent&verb&limit&cursor`: `status` one of
/// [`STATES`], `agent` and `verb` valid names, `cursor` an integer, `limit` 1 to 1000 (100
/// when absent); 400 for anything else, an unknown or a repeated parameter included.
pub fn command_filter(query: &Query) -> Result<CommandFilter, ApiError> {
    query.only(&["status", "agent", "verb", "limit", "cursor"])?;
    let status = query.get("status").map(str::to_owned);
    if let Some(status) = &status
        && !STATES.contains(&status.as_str())
    {
        return Err(ApiError::BadRequest(format!("status {status:?} is not one of {}", STATES.join(", "))));
    }
    Ok(CommandFilter {
        status,
        agent: query.parsed::<AgentId>("agent")?,
        verb: query.parsed::<Verb>("verb")?,
        before: query.parsed::<u64>("cursor")?,
        limit: query.limit(100, 1000)?,
    })
}

/// `GET /api/v1/commands`: newest first, filtered by status, agent and verb; `cursor` is the
/// `next_cursor` of the previous page.
pub(super) async fn list<S: Store + Clone>(state: &ApiState<S>, call: &mut Call<'_>) -> Result<Reply, ApiError> {
    let filter = command_filter(&call.query)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn field(error: &ApiError) -> Option<&str> {
        match error {
            ApiError::Unprocessable { field, .. } => field.as_deref(),
            _ => None,
        }
    }

    #[test]
    fn a_malformed_body_is_400_and_a_well_formed_invalid_one_is_422_naming_the_field() {
        for body in [&b""[..], b"{", br#"{"verb": 1}"#, br#"{"verb": "x", "tragets": []}"#, b"[]"] {
            let error = SubmitBody::parse(body).expect_err("malformed");
            assert_eq!(error.status(), 400, "{}", String::from_utf8_lossy(body));
        }
        let unknown = SubmitBody::parse(br#"{"verb": "rm_rf", "targets": ["gw-1"]}"#).expect("well-formed");
        assert_eq!(unknown.command().map_err(|e| field(&e).map(str::to_owned)).err(), Some(Some("verb".into())));
        let both = SubmitBody::parse(br#"{"verb": "get_system_health", "targets": ["gw-1"], "selector": {}}"#)
            .expect("well-formed");
        assert!(both.command().is_ok());
        assert_eq!(field(&both.into_targets().expect_err("both")), Some("targets"));
        let bad_id = SubmitBody::parse(br#"{"verb": "get_system_health", "targets": ["gw-1", "-x"]}"#).expect("parses");
        assert_eq!(field(&bad_id.into_targets().expect_err("bad id")), Some("targets[1]"));
    }

    #[test]
    fn an_accepted_submission_has_canonical_arguments_and_a_deadline_within_the_verb_bounds() {
        let body = br#"{"verb": "docker.stop", "args": {"container": "web"}, "selector": {"status": "online"}}"#;
        let request = SubmitBody::parse(body).expect("parses");
        let command = request.command().expect("valid");
        assert_eq!(command.verb.as_str(), "docker.stop");
        assert!(!command.timeout.is_zero() && command.timeout <= command.args.spec().max_timeout);
        assert_eq!(
            request.into_targets().expect("valid"),
            Targets::Selector { site: None, capability: None, online: Some(true) }
        );
    }

    #[test]
    fn the_command_list_filter_takes_known_states_and_bounded_limits_only() {
        let filter = command_filter(&Query::parse("status=queued&agent=gw-1&limit=5&cursor=9")).expect("valid");
        assert_eq!(
            (filter.status.as_deref(), filter.agent.map(|a| a.to_string()), filter.limit, filter.before),
            (Some("queued"), Some("gw-1".to_owned()), 5, Some(9))
        );
        assert_eq!(command_filter(&Query::parse("")).map(|f| f.limit).ok(), Some(100));
        for bad in ["status=done", "limit=0", "cursor=x", "agent=-x", "stauts=queued", "limit=1&limit=2"] {
            assert_eq!(command_filter(&Query::parse(bad)).map_err(|e| e.status()).err(), Some(400), "{bad}");
        }
    }
}

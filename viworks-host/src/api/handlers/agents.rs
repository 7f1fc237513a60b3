//! Agents: list, read, enroll (with the enrollment bundle), revoke, maintenance mode.

use serde::Deserialize;
use serde_json::{Value, json};
use viworks_core::wire::AgentId;

use super::Reply;
use crate::api::request::{Query, json_body};
use crate::api::{ApiError, ApiState, Call, views};
use crate::store::{AgentFilter, AgentRecord, Store, StoreError};
use crate::tls::Validity;

/// Where the `agent.env` of an API enrollment bundle expects the bundle's files: the layout of
/// the deployment plan.
pub const INSTALL_DIR: &str = "/opt/viworks/agent/certs";

/// Store pages one list request may read while filtering by live status.
const MAX_PAGES: usize = 10;

/// The `status` filter of `GET /api/v1/agents`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgentStatus {
    /// Unrevoked agents with a live session on this host.
    Online,
    /// Unrevoked agents without one.
    Offline,
    /// Revoked agents, which are otherwise left out.
    Revoked,
}

/// What `GET /api/v1/agents?site&status&capability&limit&cursor` asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentListing {
    /// Only this site.
    pub site: Option<String>,
    /// Only agents advertising this capability.
    pub capability: Option<String>,
    /// Only agents in this status.
    pub status: Option<AgentStatus>,
    /// At most this many, 1 to 1000.
    pub limit: usize,
    /// Agents with ids after this one (the `next_cursor` of the previous page).
    pub after: Option<AgentId>,
}

/// Reads the query of `GET /api/v1/agents`: `status` online, offline or revoked, `cursor` a
/// valid agent id, `limit` 1 to 1000 (100 when absent); 400 for anything else, an unknown or a
/// repeated parameter included.
pub fn agent_listing(query: &Query) -> Result<AgentListing, ApiError> {
    query.only(&["site", "status", "capability", "limit", "cursor"])?;
    let status = match query.get("status") {
        None => None,
        Some("online") => Some(AgentStatus::Online),
        Some("offline") => Some(AgentStatus::Offline),
        Some("revoked") => Some(AgentStatus::Revoked),
        Some(other) => {
            return Err(ApiError::BadRequest(format!("status {other:?} is not online, offline or revoked")));
        }
    };
    Ok(AgentListing {
        site: query.get("site").map(str::to_owned),
        capability: query.get("capability").map(str::to_owned),
        status,
        limit: query.limit(100, 1000)?,
        after: query.parsed::<AgentId>("cursor")?,
    })
}

/// `GET /api/v1/agents`: in id order, filtered by site, capability and status (`online` and
/// `offline` from the live registry; `revoked` lists revoked agents, which are otherwise left
/// out).
pub(super) async fn list<S: Store + Clone>(state: &ApiState<S>, call: &mut Call<'_>) -> Result<Reply, ApiError> {
    let AgentListing { site, capability, status, limit, mut after } = agent_listing(&call.query)?;
    let mut items: Vec<Value> = Vec::new();
    let mut next = None;
    // The live registry is not in the store, so a status filter reads pages until it has
    // `limit` matches, the agents run out, or MAX_PAGES were read (then `next_cursor` resumes).
    'pages: for page_number in 1..=MAX_PAGES {
        let filter = AgentFilter {
            site: site.clone(),
            capability: capability.clone(),
            connected: None,
            include_revoked: status == Some(AgentStatus::Revoked),
            after: after.clone(),
            limit,
        };
        let page = state.control.store().agents(&filter).await?;
        let exhausted = page.len() < limit;
        for agent in page {
            after = Some(agent.agent_id.clone());
            let online = state.control.is_online(&agent.agent_id);
            let wanted = match status {
                None => true,
                Some(AgentStatus::Revoked) => agent.revoked,
                Some(live) => !agent.revoked && online == (live == AgentStatus::Online),
            };
            if wanted {
                items.push(views::agent(&agent, online));
                if items.len() == limit {
                    next = Some(agent.agent_id.to_string());
                    break 'pages;
                }
            }
        }
        if exhausted {
            break;
        }
        if page_number == MAX_PAGES {
            next = after.as_ref().map(ToString::to_string);
        }
    }
    Ok(Reply::Json(200, json!({ "agents": items, "next_cursor": next })))
}

/// `GET /api/v1/agents/{id}`.
pub(super) async fn get<S: Store + Clone>(state: &ApiState<S>, call: &mut Call<'_>) -> Result<Reply, ApiError> {
    call.query.only(&[])?;
    let id: AgentId = call.param("agent")?;
    match state.control.store().agent(&id).await? {
        Some(agent) => Ok(Reply::Json(200, views::agent(&agent, state.control.is_online(&id)))),
        None => Err(ApiError::NotFound(format!("no agent {id}"))),
    }
}

/// The body of `POST /api/v1/agents` as received: `{agent_id, site}`, no other fields, not
/// yet checked.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollBody {
    agent_id: String,
    site: String,
}

/// A checked enrollment request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Enrollment {
    /// The new agent's id.
    pub agent_id: AgentId,
    /// Its site, safe to write into an environment file.
    pub site: String,
}

impl EnrollBody {
    /// Parses a request body; 400 when it is empty, not JSON, or not of this shape.
    pub fn parse(body: &[u8]) -> Result<Self, ApiError> {
        json_body(body)
    }

    /// Checks the agent id and the site (which goes into the bundle's `agent.env`); 422 naming
    /// `agent_id` or `site`.
    pub fn check(&self) -> Result<Enrollment, ApiError> {
        let agent_id =
            AgentId::new(self.agent_id.as_str()).map_err(|e| ApiError::invalid("agent_id", e.to_string()))?;
        check_env_value(&self.site).map_err(|reason| ApiError::invalid("site", format!("site {reason}")))?;
        Ok(Enrollment { agent_id, site: self.site.clone() })
    }
}

/// `POST /api/v1/agents`: enrolls an agent and returns its bundle: a fresh client certificate
/// and private key, the CA, the host's SPKI pin, the agent's message key, the URL to dial and
/// an `agent.env` for the gateway. The private key exists only in this response.
pub(super) async fn enroll<S: Store + Clone>(state: &ApiState<S>, call: &mut Call<'_>) -> Result<Reply, ApiError> {
    call.query.only(&[])?;
    let request = EnrollBody::parse(&call.body)?;
    call.note.targets = vec![request.agent_id.clone()];
    call.note.detail.insert("site".into(), json!(request.site));
    let Enrollment { agent_id, site } = request.check()?;
    let store = state.control.store();
    if store.agent(&agent_id).await?.is_some() {
        // Checked first so that a repeated enrollment costs no certificate.
        return Err(ApiError::Conflict(format!("agent {agent_id} is enrolled already")));
    }
    // The certificate before the row: if it cannot be issued, nothing is enrolled.
    let issued = state.pki.issue_agent(&agent_id, Validity::agent_default()).map_err(|error| {
        tracing::error!(%error, agent = %agent_id, "issuing an agent certificate failed");
        ApiError::Internal
    })?;
    let record = AgentRecord::enrolled(agent_id.clone(), site.clone(), state.control.now());
    match store.enroll_agent(&record).await {
        Ok(()) => {}
        Err(StoreError::Exists(_)) => return Err(ApiError::Conflict(format!("agent {agent_id} is enrolled already"))),
        Err(error) => return Err(error.into()),
    }
    state.control.keys().set(agent_id.clone(), false);
    let pin = state.pki.host_pin().to_base64();
    let agent_key = state.control.keys().derive(&agent_id).to_hex();
    let env = agent_env(&agent_id, &site, &state.public_url, &pin);
    Ok(Reply::Json(
        201,
        json!({
            "agent": views::agent(&record, false),
            "bundle": {
                "client_cert": issued.cert_pem,
                "client_key": issued.key_pem,
                "ca_cert": state.pki.ca_pem(),
                "host_pin": pin,
                "agent_key": agent_key,
                "backend_url": state.public_url,
                "install_dir": INSTALL_DIR,
                "agent_env": env,
            },
        }),
    ))
}

/// The `agent.env` of an API bundle: the gateway's `VIW_AGENT_*` settings, naming the bundle's
/// files under [`INSTALL_DIR`] with the names `viworks-host agent enroll` gives them.
fn agent_env(agent_id: &AgentId, site: &str, backend_url: &str, pin: &str) -> String {
    format!(
        "# ViWorkS gateway agent {agent_id}, enrolled through the host API.\n\
         # Install client.crt, client.key (0600), ca.crt and agent.key (0600) in {INSTALL_DIR}.\n\
         VIW_AGENT_BACKEND_URL={backend_url}\n\
         VIW_AGENT_ID={agent_id}\n\
         VIW_AGENT_SITE={site}\n\
         VIW_AGENT_CERT_PATH={INSTALL_DIR}/client.crt\n\
         VIW_AGENT_KEY_PATH={INSTALL_DIR}/client.key\n\
         VIW_AGENT_TRUST_BUNDLE={INSTALL_DIR}/ca.crt\n\
         VIW_AGENT_BACKEND_SPKI_PIN={pin}\n\
         VIW_AGENT_AGENT_KEY_FILE={INSTALL_DIR}/agent.key\n"
    )
}

/// A site goes into an environment file: refuse what such a file would misread or what could
/// start another line (the rule `viworks-host agent enroll` applies).
fn check_env_value(value: &str) -> Result<(), &'static str> {
    if value.is_empty() || value.len() > 255 {
        return Err("must be 1 to 255 bytes");
    }
    if value.trim() != value {
        return Err("must not start or end with whitespace");
    }
    if value.chars().any(|c| c.is_control() || matches!(c, '"' | '\'' | '\\' | '$' | '`')) {
        return Err("must not contain control characters, quotes, backslashes, '$' or '`'");
    }
    Ok(())
}

/// `DELETE /api/v1/agents/{id}`: revokes the agent; its next HELLO is refused and a live
/// session is closed. Revoking twice is not an error.
pub(super) async fn revoke<S: Store + Clone>(state: &ApiState<S>, call: &mut Call<'_>) -> Result<Reply, ApiError> {
    call.query.only(&[])?;
    let id: AgentId = call.param("agent")?;
    if !state.control.set_revoked(&id, true).await? {
        return Err(ApiError::NotFound(format!("no agent {id}")));
    }
    Ok(Reply::Json(200, json!({ "agent_id": id, "status": "revoked" })))
}

/// The body of `PATCH /api/v1/agents/{id}`: `{maintenance}`, no other fields.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UpdateBody {
    /// Whether the agent is in maintenance from now on.
    pub maintenance: bool,
}

impl UpdateBody {
    /// Parses a request body; 400 when it is empty, not JSON, or not of this shape.
    pub fn parse(body: &[u8]) -> Result<Self, ApiError> {
        json_body(body)
    }
}

/// `PATCH /api/v1/agents/{id}` `{maintenance}`: an agent in maintenance gets no new commands
/// (submissions naming it are refused with 409, selectors skip it); queued ones still run.
pub(super) async fn update<S: Store + Clone>(state: &ApiState<S>, call: &mut Call<'_>) -> Result<Reply, ApiError> {
    call.query.only(&[])?;
    let id: AgentId = call.param("agent")?;
    let request = UpdateBody::parse(&call.body)?;
    call.note.detail.insert("maintenance".into(), json!(request.maintenance));
    let store = state.control.store();
    if !store.set_maintenance(&id, request.maintenance).await? {
        return Err(ApiError::NotFound(format!("no agent {id}")));
    }
    match store.agent(&id).await? {
        Some(agent) => Ok(Reply::Json(200, views::agent(&agent, state.control.is_online(&id)))),
        None => Err(ApiError::NotFound(format!("no agent {id}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sites_that_could_break_an_environment_file_are_refused() {
        assert!(check_env_value("eu-west-1").is_ok());
        assert!(check_env_value("Site 7").is_ok());
        for bad in ["", " lead", "trail ", "a\nVIW_AGENT_ID=x", "$(id)", "a`b`", "q\"", "back\\slash", &"x".repeat(256)]
        {
            assert!(check_env_value(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn enrollment_bodies_are_400_when_malformed_and_422_naming_the_field_when_invalid() {
        assert_eq!(EnrollBody::parse(br#"{"agent_id": "gw-1"}"#).map_err(|e| e.status()).err(), Some(400));
        let check = |body: &[u8]| EnrollBody::parse(body).expect("well-formed").check();
        let enrolled = check(br#"{"agent_id": "gw-1", "site": "lab"}"#).expect("valid");
        assert_eq!((enrolled.agent_id.as_str(), enrolled.site.as_str()), ("gw-1", "lab"));
        for (body, blamed) in [
            (&br#"{"agent_id": "../x", "site": "lab"}"#[..], "agent_id"),
            (br#"{"agent_id": "gw-1", "site": "a\nVIW_AGENT_ID=evil"}"#, "site"),
        ] {
            match check(body) {
                Err(ApiError::Unprocessable { field: Some(field), .. }) => assert_eq!(field, blamed),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(UpdateBody::parse(br#"{"maintenance": true}"#).ok(), Some(UpdateBody { maintenance: true }));
        assert!(UpdateBody::parse(br#"{"maintenance": "yes"}"#).is_err());
    }

    #[test]
    fn the_agent_list_query_takes_the_three_statuses_and_a_valid_cursor() {
        let listing = agent_listing(&Query::parse("status=revoked&site=lab&cursor=gw-1&limit=7")).expect("valid");
        assert_eq!(listing.status, Some(AgentStatus::Revoked));
        assert_eq!((listing.site.as_deref(), listing.limit), (Some("lab"), 7));
        assert_eq!(listing.after.map(|a| a.to_string()).as_deref(), Some("gw-1"));
        for bad in ["status=asleep", "cursor=-x", "limit=1001", "sort=id"] {
            assert_eq!(agent_listing(&Query::parse(bad)).map_err(|e| e.status()).err(), Some(400), "{bad}");
        }
    }

    #[test]
    fn the_agent_env_names_every_setting_the_gateway_reads() {
        let id = AgentId::new("gw-1").expect("valid");
        let env = agent_env(&id, "lab", "wss://host:8443/ws/agent", "PIN=");
        for key in [
            "VIW_AGENT_BACKEND_URL=wss://host:8443/ws/agent\n",
            "VIW_AGENT_ID=gw-1\n",
            "VIW_AGENT_SITE=lab\n",
            "VIW_AGENT_CERT_PATH=/opt/viworks/agent/certs/client.crt\n",
            "VIW_AGENT_KEY_PATH=/opt/viworks/agent/certs/client.key\n",
            "VIW_AGENT_TRUST_BUNDLE=/opt/viworks/agent/certs/ca.crt\n",
            "VIW_AGENT_BACKEND_SPKI_PIN=PIN=\n",
            "VIW_AGENT_AGENT_KEY_FILE=/opt/viworks/agent/certs/agent.key\n",
        ] {
            assert!(env.contains(key), "{key} missing from\n{env}");
        }
    }
}

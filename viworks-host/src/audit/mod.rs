//! The audit trail: every API mutation, command lifecycle event and security event becomes a
//! structured record, appended to the hash chain in the store and emitted as JSON on the
//! `audit` tracing target for a SIEM.

pub mod chain;

use crate::store::{NewAudit, Store};

/// Appends `entry` to the chain and emits it on the `audit` target. A store failure is logged,
/// never propagated: auditing must not take the request path down, and the failure itself is
/// visible in the logs and in `audit verify`.
pub async fn record<S: Store>(store: &S, entry: NewAudit) {
    let json = serde_json::to_string(&entry).unwrap_or_default();
    match store.append_audit(&entry).await {
        Ok(stored) => tracing::info!(target: "audit", seq = stored.seq, hash = %stored.hash, record = %json),
        Err(error) => tracing::error!(target: "audit", %error, record = %json, "audit record not stored"),
    }
}

//! Instances, presence and command ownership on SQLite. One process serves a SQLite database,
//! so the instance that registers takes over from every earlier one (which can only be a
//! previous run of the same host); the rest follows the same rules as on Postgres, with the
//! single writer providing the serialisation row locks provide there.

use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};
use viworks_core::Timestamp;
use viworks_core::session::CommandRecord;
use viworks_core::wire::{AgentId, CommandId};

use super::{
    COMMAND_COLUMNS, CommandRow, PreparedCommand, SqlResult, SqliteStore, UNFINISHED, add_unfinished, collect,
    write_state,
};
use crate::store::columns::{expired, session_sql, ts_from, ts_sql};
use crate::store::{CancelOutcome, ClaimScope, InstanceRecord, PresenceClaim, StoreError};

/// Rows one sweep dead-letters at most; the next sweep takes the rest.
const EXPIRY_BATCH: i64 = 1000;

impl SqliteStore {
    pub(super) async fn take_over(&self, instance: &InstanceRecord) -> Result<(), StoreError> {
        let instance = instance.clone();
        self.write(move |conn| {
            let earlier: Vec<String> = collect(conn, "SELECT instance_id FROM instances", [], |row| row.get(0), Ok)?;
            for id in earlier {
                release_instance(conn, &id)?;
            }
            // Presence rows and holds left by a run that never registered (or a bug) go too:
            // nothing else can be serving this file.
            conn.execute("DELETE FROM presence", []).db()?;
            conn.execute("UPDATE commands SET owner = NULL WHERE owner IS NOT NULL", []).db()?;
            conn.prepare_cached(
                "INSERT INTO instances (instance_id, name, started_at, lease_until) VALUES (?1, ?2, ?3, ?4)",
            )
            .db()?
            .execute(params![
                instance.instance_id,
                instance.name,
                ts_sql(instance.started_at),
                ts_sql(instance.lease_until)
            ])
            .db()?;
            Ok(())
        })
        .await
    }

    pub(super) async fn renew(&self, instance_id: &str, lease_until: Timestamp) -> Result<bool, StoreError> {
        let id = instance_id.to_owned();
        self.write(move |conn| {
            let changed = conn
                .prepare_cached("UPDATE instances SET lease_until = ?2 WHERE instance_id = ?1")
                .db()?
                .execute(params![id, ts_sql(lease_until)])
                .db()?;
            Ok(changed > 0)
        })
        .await
    }

    pub(super) async fn deregister(&self, instance_id: &str) -> Result<(), StoreError> {
        let id = instance_id.to_owned();
        self.write(move |conn| release_instance(conn, &id)).await
    }

    pub(super) async fn reap(&self, now: Timestamp) -> Result<Vec<String>, StoreError> {
        self.write(move |conn| {
            let dead: Vec<String> = collect(
                conn,
                "SELECT instance_id FROM instances WHERE lease_until < ?1 ORDER BY instance_id",
                [ts_sql(now)],
                |row| row.get(0),
                Ok,
            )?;
            for id in &dead {
                release_instance(conn, id)?;
            }
            Ok(dead)
        })
        .await
    }

    pub(super) async fn list_instances(&self) -> Result<Vec<InstanceRecord>, StoreError> {
        self.read(|conn| {
            collect(
                conn,
                "SELECT instance_id, name, started_at, lease_until FROM instances ORDER BY instance_id",
                [],
                |row| Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?, row.get(2)?, row.get(3)?)),
                |(instance_id, name, started_at, lease_until)| {
                    Ok(InstanceRecord {
                        instance_id,
                        name,
                        started_at: ts_from(started_at, "instances", "started_at")?,
                        lease_until: ts_from(lease_until, "instances", "lease_until")?,
                    })
                },
            )
        })
        .await
    }

    pub(super) async fn presence_claim(
        &self,
        agent: &AgentId,
        instance_id: &str,
        session: u64,
        now: Timestamp,
    ) -> Result<PresenceClaim, StoreError> {
        let (agent, id) = (agent.as_str().to_owned(), instance_id.to_owned());
        self.write(move |conn| {
            let now = ts_sql(now);
            let registered = conn
                .prepare_cached("SELECT 1 FROM instances WHERE instance_id = ?1 AND lease_until >= ?2")
                .db()?
                .query_row(params![id, now], |_| Ok(()))
                .optional()
                .db()?;
            if registered.is_none() {
                return Err(StoreError::NotRegistered(id));
            }
            // Taken when free, when this instance held it (a newer session of its own), or
            // when the holder's lease ran out.
            let changed = conn
                .prepare_cached(
                    "INSERT INTO presence (agent_id, instance_id, session, since) VALUES (?1, ?2, ?3, ?4) \
                     ON CONFLICT (agent_id) DO UPDATE SET instance_id = excluded.instance_id, \
                     session = excluded.session, since = excluded.since \
                     WHERE presence.instance_id = excluded.instance_id OR NOT EXISTS \
                     (SELECT 1 FROM instances i WHERE i.instance_id = presence.instance_id AND i.lease_until >= ?4)",
                )
                .db()?
                .execute(params![agent, id, session_sql(session), now])
                .db()?;
            if changed > 0 {
                return Ok(PresenceClaim::Claimed);
            }
            let holder = conn
                .prepare_cached(
                    "SELECT p.instance_id, i.lease_until FROM presence p \
                     JOIN instances i ON i.instance_id = p.instance_id WHERE p.agent_id = ?1",
                )
                .db()?
                .query_row([&agent], |row| Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?)))
                .optional()
                .db()?;
            match holder {
                Some((instance_id, lease_until)) => Ok(PresenceClaim::HeldBy {
                    instance_id,
                    lease_until: ts_from(lease_until, "instances", "lease_until")?,
                }),
                None => Err(StoreError::Database(format!("presence of {agent} is neither free nor held"))),
            }
        })
        .await
    }

    pub(super) async fn presence_release(
        &self,
        agent: &AgentId,
        instance_id: &str,
        session: u64,
    ) -> Result<(), StoreError> {
        let (agent, id) = (agent.as_str().to_owned(), instance_id.to_owned());
        self.write(move |conn| {
            conn.prepare_cached("DELETE FROM presence WHERE agent_id = ?1 AND instance_id = ?2 AND session = ?3")
                .db()?
                .execute(params![agent, id, session_sql(session)])
                .db()?;
            Ok(())
        })
        .await
    }

    pub(super) async fn commands_claim(
        &self,
        instance_id: &str,
        scope: &ClaimScope,
    ) -> Result<Vec<CommandRecord>, StoreError> {
        let id = instance_id.to_owned();
        let (filter, value) = match scope {
            ClaimScope::Agent(agent) => ("AND c.agent_id = ?2", agent.as_str().to_owned()),
            ClaimScope::Job(job) => ("AND c.job_id = ?2", job.as_str().to_owned()),
            ClaimScope::All => ("AND ?2 = ?2", String::new()),
        };
        let sql = format!(
            "SELECT {COMMAND_COLUMNS} FROM commands c JOIN presence p ON p.agent_id = c.agent_id \
             WHERE p.instance_id = ?1 AND c.state IN {UNFINISHED} AND (c.owner IS NULL OR c.owner <> ?1) {filter} \
             ORDER BY c.order_seq"
        );
        self.write(move |conn| {
            let records =
                collect(conn, &sql, params![id, value], CommandRow::read, |row| row.decode().map(|(r, _, _)| r))?;
            let mut take = conn.prepare_cached("UPDATE commands SET owner = ?2 WHERE command_id = ?1").db()?;
            for record in &records {
                take.execute(params![record.command.command_id.as_str(), id]).db()?;
            }
            Ok(records)
        })
        .await
    }

    pub(super) async fn commands_release(
        &self,
        instance_id: &str,
        records: &[CommandRecord],
    ) -> Result<(), StoreError> {
        let id = instance_id.to_owned();
        let commands = records.iter().map(PreparedCommand::of).collect::<Result<Vec<_>, _>>()?;
        let at = ts_sql(crate::store::columns::now());
        self.write(move |conn| {
            for command in &commands {
                write_state(conn, command, at, Some(&id))?;
            }
            Ok(())
        })
        .await
    }

    pub(super) async fn unowned_expire(
        &self,
        now: Timestamp,
        queue_ttl: Duration,
    ) -> Result<Vec<CommandRecord>, StoreError> {
        self.write(move |conn| {
            let submitted_before = ts_sql(now.saturating_sub(queue_ttl));
            let sql = format!(
                "SELECT {COMMAND_COLUMNS} FROM commands c WHERE c.owner IS NULL AND \
                 ((c.state IN ('queued', 'sent') AND c.submitted_at <= ?1) OR (c.state = 'acked' AND c.deadline <= ?2)) \
                 ORDER BY c.order_seq LIMIT {EXPIRY_BATCH}"
            );
            let due = collect(conn, &sql, params![submitted_before, ts_sql(now)], CommandRow::read, |row| {
                row.decode().map(|(r, _, _)| r)
            })?;
            let finished: Vec<CommandRecord> = due.iter().filter_map(|r| expired(r, now, queue_ttl)).collect();
            // Selected above in this same write: no instance took them in between.
            for record in &finished {
                write_state(conn, &PreparedCommand::of(record)?, ts_sql(now), None)?;
            }
            Ok(finished)
        })
        .await
    }

    pub(super) async fn unowned_cancel(&self, id: &CommandId, now: Timestamp) -> Result<CancelOutcome, StoreError> {
        let id = id.as_str().to_owned();
        self.write(move |conn| {
            let changed = conn
                .prepare_cached(
                    "UPDATE commands SET state = 'cancelled', not_before = NULL, session = NULL, deadline = NULL, \
                     updated_at = ?2 WHERE command_id = ?1 AND state = 'queued' AND owner IS NULL",
                )
                .db()?
                .execute(params![id, ts_sql(now)])
                .db()?;
            if changed > 0 {
                add_unfinished(conn, -1)?;
                return Ok(CancelOutcome::Cancelled);
            }
            let row = conn
                .prepare_cached("SELECT state, owner FROM commands WHERE command_id = ?1")
                .db()?
                .query_row([&id], |row| Ok((row.get::<_, String>(0)?, row.get::<_, Option<String>>(1)?)))
                .optional()
                .db()?;
            Ok(match row {
                None => CancelOutcome::NotFound,
                Some((state, Some(owner))) if state == "queued" => CancelOutcome::Owned(owner),
                Some((state, _)) => CancelOutcome::NotCancellable(state),
            })
        })
        .await
    }
}

/// Lets go of everything `instance` held and removes it.
fn release_instance(conn: &Connection, instance: &str) -> Result<(), StoreError> {
    conn.prepare_cached("DELETE FROM presence WHERE instance_id = ?1").db()?.execute([instance]).db()?;
    conn.prepare_cached("UPDATE commands SET owner = NULL WHERE owner = ?1").db()?.execute([instance]).db()?;
    conn.prepare_cached("DELETE FROM instances WHERE instance_id = ?1").db()?.execute([instance]).db()?;
    Ok(())
}

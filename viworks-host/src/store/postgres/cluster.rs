//! Instances, presence and command ownership on Postgres: how several host instances share
//! one database without dispatching a command twice.
//!
//! ```text
//!   instance ──heartbeat──▶ instances.lease_until           (one row per process start)
//!   admit    ──upsert────▶ presence (agent → instance)      refused while another lease runs
//!   claim    ──SKIP LOCKED▶ commands.owner = instance       only for agents present here
//!   release  ──────────────▶ commands.owner = NULL          when the agent leaves this instance
//!   sweep    ──────────────▶ dead instances reaped, unowned timers run, missed claims made
//!   NOTIFY viworks_dispatch 'job:<id>' | 'cancel:<id>'       wakes the instances (LISTEN)
//! ```

use std::time::Duration;

use deadpool_postgres::GenericClient;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls};
use viworks_core::Timestamp;
use viworks_core::session::CommandRecord;
use viworks_core::wire::{AgentId, CommandId};

use super::{
    CHANNEL, COMMAND_COLUMNS, PgResult, PostgresStore, PreparedCommand, UNFINISHED, decode_command, get, write_state,
};
use crate::store::columns::{expired, now, session_sql, ts_from, ts_sql};
use crate::store::{CancelOutcome, ClaimScope, InstanceRecord, PresenceClaim, StoreError, Wakeup};

/// Rows one sweep dead-letters at most; the next sweep takes the rest.
const EXPIRY_BATCH: i64 = 1000;
/// Wake-ups buffered for the instance; when it falls behind, later ones are dropped and the
/// periodic sweep does their work.
const WAKEUP_BUFFER: usize = 1024;

impl PostgresStore {
    pub(super) async fn register(&self, instance: &InstanceRecord) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO instances (instance_id, name, started_at, lease_until) VALUES ($1, $2, $3, $4)",
                &[&instance.instance_id, &instance.name, &ts_sql(instance.started_at), &ts_sql(instance.lease_until)],
            )
            .await
            .db()?;
        Ok(())
    }

    pub(super) async fn renew(&self, instance_id: &str, lease_until: Timestamp) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let changed = client
            .execute(
                "UPDATE instances SET lease_until = $2 WHERE instance_id = $1",
                &[&instance_id, &ts_sql(lease_until)],
            )
            .await
            .db()?;
        Ok(changed > 0)
    }

    pub(super) async fn deregister(&self, instance_id: &str) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.db()?;
        release_instance(&tx, instance_id).await?;
        tx.commit().await.db()
    }

    pub(super) async fn reap(&self, now: Timestamp) -> Result<Vec<String>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.db()?;
        // Another instance reaping at the same moment skips the rows locked here.
        let rows = tx
            .query(
                "SELECT instance_id FROM instances WHERE lease_until < $1 ORDER BY instance_id FOR UPDATE SKIP LOCKED",
                &[&ts_sql(now)],
            )
            .await
            .db()?;
        let mut dead = Vec::with_capacity(rows.len());
        for row in rows {
            let id: String = get(&row, 0, "instances")?;
            release_instance(&tx, &id).await?;
            dead.push(id);
        }
        tx.commit().await.db()?;
        Ok(dead)
    }

    pub(super) async fn list_instances(&self) -> Result<Vec<InstanceRecord>, StoreError> {
        const T: &str = "instances";
        let client = self.client().await?;
        let rows = client
            .query("SELECT instance_id, name, started_at, lease_until FROM instances ORDER BY instance_id", &[])
            .await
            .db()?;
        rows.iter()
            .map(|row| {
                Ok(InstanceRecord {
                    instance_id: get(row, 0, T)?,
                    name: get(row, 1, T)?,
                    started_at: ts_from(get(row, 2, T)?, T, "started_at")?,
                    lease_until: ts_from(get(row, 3, T)?, T, "lease_until")?,
                })
            })
            .collect()
    }

    pub(super) async fn presence_claim(
        &self,
        agent: &AgentId,
        instance_id: &str,
        session: u64,
        now: Timestamp,
    ) -> Result<PresenceClaim, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.db()?;
        let now = ts_sql(now);
        // Holding this instance's row for the transaction keeps it from being reaped meanwhile.
        let registered = tx
            .query_opt(
                "SELECT 1 FROM instances WHERE instance_id = $1 AND lease_until >= $2 FOR SHARE",
                &[&instance_id, &now],
            )
            .await
            .db()?;
        if registered.is_none() {
            return Err(StoreError::NotRegistered(instance_id.to_owned()));
        }
        // Taken when free, when this instance held it (a newer session of its own), or when
        // the holder's lease ran out. Concurrent claims of one agent serialise on its row.
        let changed = tx
            .execute(
                "INSERT INTO presence (agent_id, instance_id, session, since) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (agent_id) DO UPDATE SET instance_id = excluded.instance_id, \
                 session = excluded.session, since = excluded.since \
                 WHERE presence.instance_id = excluded.instance_id OR NOT EXISTS \
                 (SELECT 1 FROM instances i WHERE i.instance_id = presence.instance_id AND i.lease_until >= $4)",
                &[&agent.as_str(), &instance_id, &session_sql(session), &now],
            )
            .await
            .db()?;
        let claim = if changed > 0 {
            PresenceClaim::Claimed
        } else {
            let holder = tx
                .query_opt(
                    "SELECT p.instance_id, i.lease_until FROM presence p \
                     JOIN instances i ON i.instance_id = p.instance_id WHERE p.agent_id = $1",
                    &[&agent.as_str()],
                )
                .await
                .db()?
                .ok_or_else(|| StoreError::Database(format!("presence of {agent} is neither free nor held")))?;
            PresenceClaim::HeldBy {
                instance_id: get(&holder, 0, "presence")?,
                lease_until: ts_from(get(&holder, 1, "instances")?, "instances", "lease_until")?,
            }
        };
        tx.commit().await.db()?;
        Ok(claim)
    }

    pub(super) async fn presence_release(
        &self,
        agent: &AgentId,
        instance_id: &str,
        session: u64,
    ) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "DELETE FROM presence WHERE agent_id = $1 AND instance_id = $2 AND session = $3",
                &[&agent.as_str(), &instance_id, &session_sql(session)],
            )
            .await
            .db()?;
        Ok(())
    }

    pub(super) async fn commands_claim(
        &self,
        instance_id: &str,
        scope: &ClaimScope,
    ) -> Result<Vec<CommandRecord>, StoreError> {
        let (filter, value) = match scope {
            ClaimScope::Agent(agent) => ("AND c.agent_id = $2", agent.as_str().to_owned()),
            ClaimScope::Job(job) => ("AND c.job_id = $2", job.as_str().to_owned()),
            ClaimScope::All => ("AND $2 = $2", String::new()),
        };
        // Rows another transaction holds (a job still being stored, another claim) are
        // skipped, never waited for: the next wake-up or sweep finds them.
        let sql = format!(
            "WITH claimable AS (SELECT c.command_id FROM commands c JOIN presence p ON p.agent_id = c.agent_id \
             WHERE p.instance_id = $1 AND c.state IN {UNFINISHED} AND c.owner IS DISTINCT FROM $1 {filter} \
             FOR UPDATE OF c SKIP LOCKED) \
             UPDATE commands c SET owner = $1 FROM claimable WHERE c.command_id = claimable.command_id \
             RETURNING {COMMAND_COLUMNS}"
        );
        let client = self.client().await?;
        let rows = client.query(&sql, &[&instance_id, &value]).await.db()?;
        let mut records =
            rows.iter().map(|row| decode_command(row).map(|(record, _, _)| record)).collect::<Result<Vec<_>, _>>()?;
        records.sort_by_key(|record| record.order);
        Ok(records)
    }

    pub(super) async fn commands_release(
        &self,
        instance_id: &str,
        records: &[CommandRecord],
    ) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let commands = records.iter().map(PreparedCommand::of).collect::<Result<Vec<_>, _>>()?;
        let at = ts_sql(now());
        let mut client = self.client().await?;
        let tx = client.transaction().await.db()?;
        for command in &commands {
            write_state(&tx, command, at, Some(instance_id)).await?;
        }
        tx.commit().await.db()
    }

    pub(super) async fn unowned_expire(
        &self,
        now: Timestamp,
        queue_ttl: Duration,
    ) -> Result<Vec<CommandRecord>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.db()?;
        let sql = format!(
            "SELECT {COMMAND_COLUMNS} FROM commands c WHERE c.owner IS NULL AND \
             ((c.state IN ('queued', 'sent') AND c.submitted_at <= $1) OR (c.state = 'acked' AND c.deadline <= $2)) \
             ORDER BY c.order_seq LIMIT {EXPIRY_BATCH} FOR UPDATE SKIP LOCKED"
        );
        let rows = tx.query(&sql, &[&ts_sql(now.saturating_sub(queue_ttl)), &ts_sql(now)]).await.db()?;
        let mut finished = Vec::new();
        for row in &rows {
            let (record, _, _) = decode_command(row)?;
            if let Some(done) = expired(&record, now, queue_ttl) {
                finished.push(done);
            }
        }
        let at = ts_sql(now);
        // The rows are locked by this transaction: no instance takes them in between.
        for record in &finished {
            write_state(&tx, &PreparedCommand::of(record)?, at, None).await?;
        }
        tx.commit().await.db()?;
        Ok(finished)
    }

    pub(super) async fn unowned_cancel(&self, id: &CommandId, now: Timestamp) -> Result<CancelOutcome, StoreError> {
        let client = self.client().await?;
        let changed = client
            .execute(
                "UPDATE commands SET state = 'cancelled', not_before = NULL, session = NULL, deadline = NULL, \
                 updated_at = $2 WHERE command_id = $1 AND state = 'queued' AND owner IS NULL",
                &[&id.as_str(), &ts_sql(now)],
            )
            .await
            .db()?;
        if changed > 0 {
            return Ok(CancelOutcome::Cancelled);
        }
        let row =
            client.query_opt("SELECT state, owner FROM commands WHERE command_id = $1", &[&id.as_str()]).await.db()?;
        Ok(match row {
            None => CancelOutcome::NotFound,
            Some(row) => {
                let state: String = get(&row, 0, "commands")?;
                match get::<Option<String>>(&row, 1, "commands")? {
                    Some(owner) if state == "queued" => CancelOutcome::Owned(owner),
                    _ => CancelOutcome::NotCancellable(state),
                }
            }
        })
    }

    /// Starts listening on the wake-up channel on a connection of its own, reconnecting after
    /// failures, until the receiver is dropped.
    pub(super) fn listen(&self) -> mpsc::Receiver<Wakeup> {
        let (sender, receiver) = mpsc::channel(WAKEUP_BUFFER);
        let config = std::sync::Arc::clone(&self.config);
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(100);
            while !sender.is_closed() {
                match listen_once(&config, &sender).await {
                    Ok(()) => delay = Duration::from_millis(100),
                    Err(error) => {
                        tracing::warn!(%error, "listening for other instances failed; the sweep covers the gap");
                    }
                }
                if sender.is_closed() {
                    break;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        });
        receiver
    }
}

/// One listening connection's life: until it fails or the receiver is dropped.
async fn listen_once(config: &tokio_postgres::Config, sender: &mpsc::Sender<Wakeup>) -> Result<(), StoreError> {
    let (client, mut connection) = config.connect(NoTls).await.db()?;
    let (messages_tx, mut messages) = mpsc::unbounded_channel();
    // The connection delivers notifications only while it is polled; a task polls it.
    let driver = tokio::spawn(async move {
        let mut stream = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = stream.next().await {
            match message {
                Ok(AsyncMessage::Notification(note)) => {
                    if messages_tx.send(note.payload().to_owned()).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(error = %error, "the listening connection failed");
                    break;
                }
            }
        }
    });
    client.batch_execute(&format!("LISTEN {CHANNEL}")).await.db()?;
    loop {
        tokio::select! {
            payload = messages.recv() => {
                let Some(payload) = payload else { break };
                if let Some(wakeup) = parse_wakeup(&payload) {
                    // Full: this instance is behind, and its sweep will do the work anyway.
                    let _ = sender.try_send(wakeup);
                }
            }
            _ = sender.closed() => break,
        }
    }
    driver.abort();
    Ok(())
}

fn parse_wakeup(payload: &str) -> Option<Wakeup> {
    if let Some(job) = payload.strip_prefix("job:") {
        return job.parse().ok().map(Wakeup::Job);
    }
    if let Some(command) = payload.strip_prefix("cancel:") {
        return command.parse().ok().map(Wakeup::Cancel);
    }
    tracing::debug!(payload, "ignoring an unknown notification");
    None
}

/// Lets go of everything `instance` held and removes it.
async fn release_instance<C: GenericClient>(client: &C, instance: &str) -> Result<(), StoreError> {
    client.execute("DELETE FROM presence WHERE instance_id = $1", &[&instance]).await.db()?;
    client.execute("UPDATE commands SET owner = NULL WHERE owner = $1", &[&instance]).await.db()?;
    client.execute("DELETE FROM instances WHERE instance_id = $1", &[&instance]).await.db()?;
    Ok(())
}

//! The audit trail: every API mutation, command lifecycle event and security event becomes a
//! structured record, appended to the hash chain in the store and emitted as JSON on the
//! `audit` tracing target for a SIEM.
//!
//! A running host appends through its [`Auditor`]: one task that takes records from a bounded
//! queue and appends whatever has gathered in one store write, so that a busy host links
//! hundreds of records per transaction instead of committing each alone. Producers wait for
//! room when the queue is full (the store is the bottleneck then, and the wait slows the work
//! that produces records rather than letting memory grow), and [`Auditor::flush`] at shutdown
//! makes every record accepted so far durable before the store closes.

pub mod chain;

use tokio::sync::{mpsc, oneshot};

use crate::store::{AuditEntry, NewAudit, Store};

/// Records waiting to be appended, at most; beyond it producers wait for room.
pub const QUEUE: usize = 16_384;

/// Most records appended in one store write.
const BATCH: usize = 1024;

/// How long the appender gathers records after the first before writing them.
const LINGER: std::time::Duration = std::time::Duration::from_millis(5);

/// Appends `entry` to the chain now and emits it on the `audit` target, for one-off records
/// outside a running host (`init`, the command line). A store failure is logged with the
/// record, never propagated: auditing must not take the request path down, and the failure
/// itself is visible in the logs and in `audit verify`.
pub async fn record<S: Store>(store: &S, entry: NewAudit) {
    append(store, vec![entry]).await.iter().for_each(emit);
}

/// The host's audit appender. Cheap to clone; clones feed the same queue.
#[derive(Clone, Debug)]
pub struct Auditor {
    queue: mpsc::Sender<Message>,
}

#[derive(Debug)]
enum Message {
    Record(NewAudit),
    Flush(oneshot::Sender<()>),
}

impl Auditor {
    /// Starts the appending task on the current tokio runtime. It ends when every clone of
    /// the returned handle is dropped, after appending what was queued.
    pub fn start<S: Store>(store: S) -> Auditor {
        let (queue, messages) = mpsc::channel(QUEUE);
        tokio::spawn(run(store, messages));
        Auditor { queue }
    }

    /// Queues `entry` for the chain, waiting for room if the queue is full.
    pub async fn record(&self, entry: NewAudit) {
        if let Err(mpsc::error::SendError(Message::Record(entry))) = self.queue.send(Message::Record(entry)).await {
            // Only when the runtime is shutting down under us: keep the record in the log.
            not_stored(&entry, &"the auditor has stopped");
        }
    }

    /// Queues `entries` in their order, waiting for room for as many as the queue holds at
    /// once rather than for each: one wait, not one per record, for a job's thousands.
    pub async fn record_all(&self, entries: Vec<NewAudit>) {
        let mut entries = entries.into_iter().peekable();
        while entries.peek().is_some() {
            let chunk: Vec<NewAudit> = entries.by_ref().take(QUEUE).collect();
            match self.queue.reserve_many(chunk.len()).await {
                Ok(permits) => permits.zip(chunk).for_each(|(permit, entry)| permit.send(Message::Record(entry))),
                Err(mpsc::error::SendError(())) => {
                    chunk.iter().for_each(|entry| not_stored(entry, &"the auditor has stopped"))
                }
            }
        }
    }

    /// Returns once every record queued before the call is appended (or reported as not
    /// stored).
    pub async fn flush(&self) {
        let (done, flushed) = oneshot::channel();
        if self.queue.send(Message::Flush(done)).await.is_ok() {
            let _ = flushed.await;
        }
    }
}

/// Appended batches waiting to be emitted, at most; beyond it the appender waits.
const EMIT_QUEUE: usize = 2;

async fn run<S: Store>(store: S, mut queue: mpsc::Receiver<Message>) {
    // Emitting a batch overlaps appending the next: the chain's order is the log's order,
    // since one task emits the batches in the order they were appended.
    let (emit_queue, mut appended) = mpsc::channel::<(Vec<AuditEntry>, Vec<oneshot::Sender<()>>)>(EMIT_QUEUE);
    let emitter = tokio::spawn(async move {
        while let Some((stored, flushes)) = appended.recv().await {
            stored.iter().for_each(emit);
            for done in flushes {
                let _ = done.send(());
            }
        }
    });
    let mut messages = Vec::with_capacity(BATCH);
    while queue.recv_many(&mut messages, BATCH).await > 0 {
        // Nothing waits for a record to be stored but a flush: gather what else arrives for
        // a moment, so that a quiet host commits a few audit writes a second, not one per
        // record.
        if !matches!(messages.last(), Some(Message::Flush(_))) && messages.len() < BATCH {
            tokio::time::sleep(LINGER).await;
            while messages.len() < BATCH {
                match queue.try_recv() {
                    Ok(message) => messages.push(message),
                    Err(_) => break,
                }
            }
        }
        let mut entries = Vec::with_capacity(messages.len());
        let mut flushes = Vec::new();
        for message in messages.drain(..) {
            match message {
                Message::Record(entry) => entries.push(entry),
                Message::Flush(done) => flushes.push(done),
            }
        }
        // Records queued after a flush request in the same batch are appended before it is
        // answered too, which only makes the answer later, never wrong.
        let stored = append(&store, entries).await;
        if emit_queue.send((stored, flushes)).await.is_err() {
            break;
        }
    }
    drop(emit_queue);
    let _ = emitter.await;
}

/// Appends `entries` in one write and returns them as stored; if that write fails, appends
/// them one at a time so that one bad record does not cost the others, and logs any record
/// that could not be stored.
async fn append<S: Store>(store: &S, entries: Vec<NewAudit>) -> Vec<AuditEntry> {
    if entries.is_empty() {
        return Vec::new();
    }
    match store.append_audits(&entries).await {
        Ok(stored) => stored,
        Err(error) if entries.len() == 1 => {
            entries.iter().for_each(|entry| not_stored(entry, &error));
            Vec::new()
        }
        Err(error) => {
            tracing::warn!(%error, records = entries.len(), "appending audit records together failed; retrying each");
            let mut all = Vec::with_capacity(entries.len());
            for entry in &entries {
                match store.append_audits(std::slice::from_ref(entry)).await {
                    Ok(stored) => all.extend(stored),
                    Err(error) => not_stored(entry, &error),
                }
            }
            all
        }
    }
}

fn emit(stored: &AuditEntry) {
    let json = serde_json::to_string(&stored.content).unwrap_or_default();
    tracing::info!(target: "audit", seq = stored.seq, hash = %stored.hash, record = %json);
}

fn not_stored(entry: &NewAudit, error: &dyn std::fmt::Display) {
    let json = serde_json::to_string(entry).unwrap_or_default();
    tracing::error!(target: "audit", %error, record = %json, "audit record not stored");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ChainVerdict;
    use crate::store::sqlite::tests::fresh;

    fn entry(n: u64) -> NewAudit {
        NewAudit {
            ts: viworks_core::Timestamp::from_millis(n),
            req_id: format!("req-{n}"),
            actor: "host".into(),
            action: "command.finished".into(),
            args_hash: chain::args_hash(&serde_json::json!({ "n": n })),
            targets: vec![format!("cmd-{n}")],
            rc: "succeeded".into(),
            duration_ms: n,
            detail: serde_json::json!({ "n": n }),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_from_many_tasks_share_writes_and_a_flush_makes_them_durable() {
        let (store, _dir) = fresh().await;
        let before = store.writer_stats();
        let auditor = Auditor::start(store.clone());
        let producers: Vec<_> = (0..20u64)
            .map(|task| {
                let auditor = auditor.clone();
                tokio::spawn(async move {
                    for n in 0..100 {
                        auditor.record(entry(task * 100 + n)).await;
                    }
                })
            })
            .collect();
        for producer in producers {
            producer.await.expect("producer");
        }
        auditor.flush().await;
        assert_eq!(store.verify_audit().await.expect("verify"), ChainVerdict::Intact { entries: 2000 });
        let writes = store.writer_stats().transactions - before.transactions;
        assert!(writes < 200, "2,000 records took {writes} transactions");
        // Each producer's records keep their order in the chain.
        let stored = store.audit(&crate::store::AuditFilter { limit: 1000, ..Default::default() }).await.expect("read");
        let mut last_of = std::collections::BTreeMap::new();
        for record in stored.iter().rev() {
            let n = record.content.duration_ms;
            if let Some(previous) = last_of.insert(n / 100, n) {
                assert!(previous < n, "task {} appended {n} after {previous}", n / 100);
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn more_records_at_once_than_the_queue_holds_are_all_appended_in_order() {
        let (store, _dir) = fresh().await;
        let auditor = Auditor::start(store.clone());
        let count = QUEUE as u64 + 10;
        auditor.record_all((1..=count).map(entry).collect()).await;
        auditor.flush().await;
        assert_eq!(store.verify_audit().await.expect("verify"), ChainVerdict::Intact { entries: count });
        let newest = store.audit(&crate::store::AuditFilter { limit: 20, ..Default::default() }).await.expect("read");
        let order: Vec<u64> = newest.iter().map(|record| record.content.duration_ms).collect();
        assert_eq!(order, (count - 19..=count).rev().collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_flush_with_nothing_queued_returns() {
        let (store, _dir) = fresh().await;
        let auditor = Auditor::start(store.clone());
        auditor.flush().await;
        auditor.record(entry(1)).await;
        auditor.flush().await;
        assert_eq!(store.verify_audit().await.expect("verify"), ChainVerdict::Intact { entries: 1 });
    }
}

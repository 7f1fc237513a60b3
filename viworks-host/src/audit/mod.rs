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

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use self::chain::{Link, Prepared};
use crate::store::{self, NewAudit, Store};

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
    let records: Arc<[Prepared]> = Arc::from([Prepared::new(entry)]);
    let links = append(store, Arc::clone(&records)).await;
    emit(&records, &links);
}

/// The host's audit appender. Cheap to clone; clones feed the same queue.
#[derive(Clone, Debug)]
pub struct Auditor {
    queue: mpsc::Sender<Message>,
}

#[derive(Debug)]
enum Message {
    Record(Prepared),
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

    /// Queues `entry` for the chain, waiting for room if the queue is full. The record is
    /// prepared here, in the producer's task, not in the appender's.
    pub async fn record(&self, entry: NewAudit) {
        if let Err(mpsc::error::SendError(Message::Record(record))) =
            self.queue.send(Message::Record(Prepared::new(entry))).await
        {
            // Only when the runtime is shutting down under us: keep the record in the log.
            not_stored(&record, &"the auditor has stopped");
        }
    }

    /// Queues `records` in their order, waiting for room for as many as the queue holds at
    /// once rather than for each: one wait, not one per record, for a job's thousands.
    pub async fn record_all(&self, records: Vec<Prepared>) {
        let mut records = records.into_iter().peekable();
        while records.peek().is_some() {
            let chunk: Vec<Prepared> = records.by_ref().take(QUEUE).collect();
            match self.queue.reserve_many(chunk.len()).await {
                Ok(permits) => permits.zip(chunk).for_each(|(permit, record)| permit.send(Message::Record(record))),
                Err(mpsc::error::SendError(())) => {
                    chunk.iter().for_each(|record| not_stored(record, &"the auditor has stopped"))
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

/// A batch the appender handed to the emitter: the records, where each was linked (`None`
/// for one that could not be stored, already reported), and the flushes it answers.
type Appended = (Arc<[Prepared]>, Vec<Option<Link>>, Vec<oneshot::Sender<()>>);

async fn run<S: Store>(store: S, mut queue: mpsc::Receiver<Message>) {
    // Emitting a batch overlaps appending the next: the chain's order is the log's order,
    // since one task emits the batches in the order they were appended.
    let (emit_queue, mut appended) = mpsc::channel::<Appended>(EMIT_QUEUE);
    let emitter = tokio::spawn(async move {
        while let Some((records, links, flushes)) = appended.recv().await {
            emit(&records, &links);
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
        let mut records = Vec::with_capacity(messages.len());
        let mut flushes = Vec::new();
        for message in messages.drain(..) {
            match message {
                Message::Record(record) => records.push(record),
                Message::Flush(done) => flushes.push(done),
            }
        }
        // Records queued after a flush request in the same batch are appended before it is
        // answered too, which only makes the answer later, never wrong.
        let records: Arc<[Prepared]> = records.into();
        let links = append(&store, Arc::clone(&records)).await;
        if emit_queue.send((records, links, flushes)).await.is_err() {
            break;
        }
    }
    drop(emit_queue);
    let _ = emitter.await;
}

/// Appends `records` in one write and returns where each was linked; if that write fails,
/// appends them one at a time so that one bad record does not cost the others, and logs any
/// record that could not be stored (its link is `None`).
async fn append<S: Store>(store: &S, records: Arc<[Prepared]>) -> Vec<Option<Link>> {
    if records.is_empty() {
        return Vec::new();
    }
    match store.append_audits(Arc::clone(&records)).await {
        Ok(links) if links.len() == records.len() => links.into_iter().map(Some).collect(),
        Ok(links) => {
            let error = format!("the store linked {} audit records for {}", links.len(), records.len());
            records.iter().for_each(|record| not_stored(record, &error));
            vec![None; records.len()]
        }
        Err(error) if records.len() == 1 => {
            records.iter().for_each(|record| not_stored(record, &error));
            vec![None]
        }
        Err(error) => {
            tracing::warn!(%error, records = records.len(), "appending audit records together failed; retrying each");
            let mut links = Vec::with_capacity(records.len());
            for record in records.iter() {
                match store::append_one(store, record).await {
                    Ok(link) => links.push(Some(link)),
                    Err(error) => {
                        not_stored(record, &error);
                        links.push(None);
                    }
                }
            }
            links
        }
    }
}

/// Emits each stored record on the `audit` target: its position, its hash, and as `record`
/// the canonical JSON the hash covers, so that a SIEM can check every line's link itself.
fn emit(records: &[Prepared], links: &[Option<Link>]) {
    for (record, link) in records.iter().zip(links) {
        if let Some(link) = link {
            tracing::info!(target: "audit", seq = link.seq, hash = %chain::hex(&link.hash), record = %record.canonical());
        }
    }
}

fn not_stored(record: &Prepared, error: &dyn std::fmt::Display) {
    tracing::error!(target: "audit", %error, record = %record.canonical(), "audit record not stored");
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
        auditor.record_all((1..=count).map(|n| Prepared::new(entry(n))).collect()).await;
        auditor.flush().await;
        assert_eq!(store.verify_audit().await.expect("verify"), ChainVerdict::Intact { entries: count });
        let newest = store.audit(&crate::store::AuditFilter { limit: 20, ..Default::default() }).await.expect("read");
        let order: Vec<u64> = newest.iter().map(|record| record.content.duration_ms).collect();
        assert_eq!(order, (count - 19..=count).rev().collect::<Vec<_>>());
    }

    /// A log destination the test reads back.
    #[derive(Clone, Default)]
    struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().map_err(|_| std::io::Error::other("poisoned"))?.extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn each_audit_log_line_carries_the_text_its_hash_covers() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt().json().with_writer(move || writer.clone()).finish();
        // The runtime of this test has one thread, so the appender and its emitter log here.
        // `tracing` caches each callsite's interest for the whole process, computed by the
        // first thread to reach it; while one dispatcher is registered it asks that thread's
        // own, and a test running beside this one has none, so it could cache the audit
        // line's callsite as never enabled. A second dispatcher alive for the test makes the
        // interest the union of both.
        let _anchor = tracing::Dispatch::new(tracing_subscriber::registry());
        let _subscriber = tracing::subscriber::set_default(subscriber);
        tracing::callsite::rebuild_interest_cache();
        let (store, _dir) = fresh().await;
        let auditor = Auditor::start(store.clone());
        auditor.record_all((1..=5).map(|n| Prepared::new(entry(n))).collect()).await;
        auditor.flush().await;

        let log = String::from_utf8(captured.0.lock().expect("lock").clone()).expect("UTF-8");
        let mut prev = chain::GENESIS;
        let mut seqs = Vec::new();
        for line in log.lines() {
            let line: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
            if line["target"] != "audit" {
                continue;
            }
            let fields = &line["fields"];
            let record = fields["record"].as_str().expect("the record as a string");
            let mut hasher = blake3::Hasher::new();
            hasher.update(&prev);
            hasher.update(record.as_bytes());
            prev = *hasher.finalize().as_bytes();
            assert_eq!(fields["hash"], chain::to_hex(&prev), "the hash of the previous line's hash and this record");
            let content: NewAudit = serde_json::from_str(record).expect("the record's content");
            assert_eq!(content, entry(content.duration_ms));
            seqs.push(fields["seq"].as_u64().expect("seq"));
        }
        assert_eq!(seqs, [1, 2, 3, 4, 5]);
        let newest = store.audit(&crate::store::AuditFilter { limit: 1, ..Default::default() }).await.expect("read");
        assert_eq!(newest[0].hash, chain::to_hex(&prev), "the log's chain is the store's");
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

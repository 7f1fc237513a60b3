//! API request idempotency: the `Idempotency-Key` header, the digest of the request it came
//! with, the rule that decides between starting a job and naming an earlier one, and a
//! bounded in-memory table that applies the rule.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use super::IdempotencyError;
use crate::Timestamp;
use crate::wire::{CommandResult, IdError, ResultError};

/// How long a request's idempotency key is remembered by default: 24 hours, long enough for
/// any client's retry schedule.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 60 * 60);

crate::wire::ids::identifier!(
    /// The value of a request's `Idempotency-Key` header: 1 to 128 bytes of printable ASCII
    /// without spaces (`!` to `~`), so a UUID, a ULID or any client-chosen token fits.
    IdempotencyKey, "idempotency key", 128, |b| b.is_ascii_graphic(), |b| b.is_ascii_graphic()
);

crate::wire::ids::identifier!(
    /// The identity of the job an accepted API request started (one command, or a broadcast
    /// of many): 1 to 64 bytes of `A-Z a-z 0-9 . _ -` starting with a letter or digit, like a
    /// command id.
    JobId, "job id", 64, |b| b.is_ascii_alphanumeric(), |b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
);

/// The BLAKE3 digest of a request's canonical JSON ([`canonical_json`]): two requests have the
/// same digest exactly when they carry the same JSON value, whatever their field order or
/// whitespace. Written as 64 lowercase hexadecimal digits in text and in serde formats.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestDigest(pub [u8; 32]);

impl RequestDigest {
    /// The digest of `value`: plain BLAKE3 (no key, no context) of [`canonical_json`]`(value)`,
    /// so any implementation can reproduce it with `b3sum`.
    ///
    /// The host should digest everything that makes two requests the same request, not only
    /// the body: `{"actor": …, "method": …, "path": …, "body": …}`. A key then reused on
    /// another route or by another API token is a [`Conflict`], and never hands one caller
    /// the job of another.
    ///
    /// Costs one pass over the value plus a sort of each object's keys; it allocates nothing
    /// in proportion to the encoded size (the encoding is hashed as it is produced) and never
    /// recurses, so no nesting depth can exhaust the stack.
    ///
    /// [`Conflict`]: IdempotencyError::Conflict
    pub fn of_json(value: &Value) -> Self {
        RequestDigest(digest_json(value))
    }

    /// The digest as lowercase hexadecimal, as a durable store keeps it.
    pub fn to_hex(&self) -> String {
        crate::hex::encode32(&self.0)
    }

    /// Parses exactly 64 lowercase hexadecimal digits.
    pub fn from_hex(s: &str) -> Result<Self, IdError> {
        crate::hex::decode32(s).map(RequestDigest).ok_or(IdError::BadHex { what: "request digest", len: 64 })
    }
}

impl fmt::Display for RequestDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for RequestDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RequestDigest({})", self.to_hex())
    }
}

impl Serialize for RequestDigest {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for RequestDigest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        RequestDigest::from_hex(&raw).map_err(serde::de::Error::custom)
    }
}

/// `value` as canonical JSON: object keys sorted by their UTF-8 bytes, no whitespace between
/// tokens, strings escaped and numbers written exactly as `serde_json` writes them. Equal
/// values give equal text; the text parses back to `value`.
///
/// Keys are sorted here rather than trusted to `serde_json::Map`, which keeps them sorted
/// only while no crate in the build enables serde_json's `preserve_order` feature (Cargo
/// unifies features across a build, so that is not this crate's to promise).
///
/// Numbers keep their JSON type: `1`, `1.0` and `1e0` parse to different values and give
/// different text. Floats are written by serde_json's shortest round-trip formatter, so a
/// digest stored before a serde_json upgrade that changes float formatting may differ from
/// one computed after it for a request carrying a float.
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

/// Appends [`canonical_json`]`(value)` to `out`, for callers that assemble a canonical object
/// whose members they know without building a [`Value`] of it.
pub fn push_canonical_json(value: &Value, out: &mut String) {
    write_canonical(value, out);
}

/// Appends `text` as a JSON string, escaped exactly as [`canonical_json`] escapes strings.
pub fn push_json_string(text: &str, out: &mut String) {
    write_string(text, out);
}

/// BLAKE3 of the canonical JSON of `value`, computed without materialising the text.
pub(super) fn digest_json(value: &Value) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    write_canonical(value, &mut hasher);
    *hasher.finalize().as_bytes()
}

/// BLAKE3 of the canonical JSON of `result` as serde encodes it (absent options left out),
/// computed member by member in sorted key order without building a JSON value of it.
pub(super) fn digest_result(result: &CommandResult) -> [u8; 32] {
    let CommandResult { command_id, status, exit_code, output, error, duration_ms } = result;
    let mut hasher = blake3::Hasher::new();
    hasher.put("{\"command_id\":");
    write_string(command_id.as_str(), &mut hasher);
    put_number(&mut hasher, ",\"duration_ms\":", *duration_ms);
    if let Some(ResultError { code, message }) = error {
        hasher.put(",\"error\":{\"code\":");
        write_string(code.as_str(), &mut hasher);
        hasher.put(",\"message\":");
        write_string(message.as_str(), &mut hasher);
        hasher.put("}");
    }
    if let Some(code) = exit_code {
        put_number(&mut hasher, ",\"exit_code\":", *code);
    }
    hasher.put(",\"output\":");
    write_canonical(output, &mut hasher);
    hasher.put(",\"status\":");
    write_string(status.as_str(), &mut hasher);
    hasher.put("}");
    *hasher.finalize().as_bytes()
}

/// `key` then `number` in decimal, without allocating.
fn put_number(sink: &mut impl Sink, key: &str, number: impl fmt::Display) {
    struct Put<'a, S>(&'a mut S);
    impl<S: Sink> fmt::Write for Put<'_, S> {
        fn write_str(&mut self, text: &str) -> fmt::Result {
            self.0.put(text);
            Ok(())
        }
    }
    sink.put(key);
    // Writing into a sink cannot fail.
    let _ = fmt::Write::write_fmt(&mut Put(sink), format_args!("{number}"));
}

/// Where canonical JSON goes: a string, or straight into a hash.
trait Sink {
    fn put(&mut self, text: &str);
}

impl Sink for String {
    fn put(&mut self, text: &str) {
        self.push_str(text);
    }
}

impl Sink for blake3::Hasher {
    fn put(&mut self, text: &str) {
        self.update(text.as_bytes());
    }
}

/// One pending piece of output in the iterative encoder.
enum Step<'a> {
    Value(&'a Value),
    Key(&'a str),
    Punct(&'static str),
}

fn write_canonical(value: &Value, sink: &mut impl Sink) {
    // An explicit stack instead of recursion: a value built in memory can be nested deeper
    // than any thread's stack, and the encoder must not be the thing that overflows.
    let mut stack = vec![Step::Value(value)];
    while let Some(step) = stack.pop() {
        match step {
            Step::Punct(text) => sink.put(text),
            Step::Key(key) => {
                write_string(key, sink);
                sink.put(":");
            }
            Step::Value(Value::Null) => sink.put("null"),
            Step::Value(Value::Bool(true)) => sink.put("true"),
            Step::Value(Value::Bool(false)) => sink.put("false"),
            Step::Value(Value::Number(number)) => sink.put(&number.to_string()),
            Step::Value(Value::String(text)) => write_string(text, sink),
            Step::Value(Value::Array(items)) => {
                sink.put("[");
                stack.push(Step::Punct("]"));
                // Pushed last to first so that they pop first to last.
                for (i, item) in items.iter().enumerate().rev() {
                    stack.push(Step::Value(item));
                    if i > 0 {
                        stack.push(Step::Punct(","));
                    }
                }
            }
            Step::Value(Value::Object(map)) => {
                let mut entries: Vec<(&String, &Value)> = map.iter().collect();
                // Keys in a map are distinct, so an unstable sort is deterministic.
                entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
                sink.put("{");
                stack.push(Step::Punct("}"));
                for (i, (key, item)) in entries.into_iter().enumerate().rev() {
                    stack.push(Step::Value(item));
                    stack.push(Step::Key(key));
                    if i > 0 {
                        stack.push(Step::Punct(","));
                    }
                }
            }
        }
    }
}

/// JSON escapes for the bytes below 0x20, as serde_json writes them.
const CONTROL_ESCAPES: [&str; 32] = [
    "\\u0000", "\\u0001", "\\u0002", "\\u0003", "\\u0004", "\\u0005", "\\u0006", "\\u0007", "\\b", "\\t", "\\n",
    "\\u000b", "\\f", "\\r", "\\u000e", "\\u000f", "\\u0010", "\\u0011", "\\u0012", "\\u0013", "\\u0014", "\\u0015",
    "\\u0016", "\\u0017", "\\u0018", "\\u0019", "\\u001a", "\\u001b", "\\u001c", "\\u001d", "\\u001e", "\\u001f",
];

fn write_string(text: &str, sink: &mut impl Sink) {
    sink.put("\"");
    let mut start = 0;
    for (i, byte) in text.bytes().enumerate() {
        let escape = match byte {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            0x00..=0x1f => CONTROL_ESCAPES[usize::from(byte)],
            _ => continue,
        };
        // Every escaped byte is ASCII, so `start` and `i` both sit on character boundaries.
        sink.put(&text[start..i]);
        sink.put(escape);
        start = i + 1;
    }
    sink.put(&text[start..]);
    sink.put("\"");
}

/// What is remembered about one accepted request: its key, its digest, the job it started
/// and when. The host's durable store keeps the same four fields.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdempotencyRecord {
    /// The request's idempotency key.
    pub key: IdempotencyKey,
    /// The digest of the request that first used the key.
    pub digest: RequestDigest,
    /// The job that request started.
    pub job_id: JobId,
    /// When that request was accepted.
    pub created_at: Timestamp,
}

impl IdempotencyRecord {
    /// The first instant at which the record no longer counts, under `ttl`.
    pub fn expires_at(&self, ttl: Duration) -> Timestamp {
        self.created_at.saturating_add(ttl)
    }

    /// Whether the record no longer counts at `now`: `now >= created_at + ttl`.
    pub fn is_expired(&self, now: Timestamp, ttl: Duration) -> bool {
        now >= self.expires_at(ttl)
    }
}

/// The decision on a request that carries an idempotency key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// No live request used the key: start a job and store a record for it (replacing an
    /// expired one, if the store still holds it).
    New,
    /// The same request was accepted before: answer with this job, start nothing.
    Existing(JobId),
}

/// The idempotency rule, in one place for the in-memory [`IdempotencyTable`] and the host's
/// durable store: `existing` is the record stored under `key`, if any, `digest` the digest of
/// the request now arriving, `ttl` how long records count.
///
/// - no record, or an expired one → [`Resolution::New`];
/// - a live record with the same digest → [`Resolution::Existing`] with its job;
/// - a live record with another digest → [`IdempotencyError::Conflict`].
///
/// A live record stored under another key is treated as a conflict too: that is a caller's
/// bug, and refusing is the answer that neither starts a second job nor hands out another
/// key's job. A record created "after" `now` (clock skew between host instances) is live.
///
/// Between [`Resolution::New`] and the store's insert another request may race in; the
/// store's unique constraint on the key settles it, and the loser reads the winner's record
/// and resolves again.
pub fn resolve(
    existing: Option<&IdempotencyRecord>,
    key: &IdempotencyKey,
    digest: RequestDigest,
    now: Timestamp,
    ttl: Duration,
) -> Result<Resolution, IdempotencyError> {
    match existing {
        Some(record) if !record.is_expired(now, ttl) => {
            if record.key == *key && record.digest == digest {
                Ok(Resolution::Existing(record.job_id.clone()))
            } else {
                Err(IdempotencyError::Conflict { key: key.clone() })
            }
        }
        _ => Ok(Resolution::New),
    }
}

/// What [`IdempotencyTable::begin`] did with a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Begun {
    /// The key was new: this job was started (its id came from the caller's generator) and is
    /// now remembered under the key.
    Started(JobId),
    /// The same request was accepted before: this is the job it started, and nothing new was
    /// started.
    Replayed(JobId),
}

impl Begun {
    /// The job the request maps to, new or earlier.
    pub fn job_id(&self) -> &JobId {
        match self {
            Begun::Started(job_id) | Begun::Replayed(job_id) => job_id,
        }
    }
}

#[derive(Debug)]
struct Slot {
    record: IdempotencyRecord,
    /// Position in arrival order; the key of the record's entry in `by_age`.
    seq: u64,
}

/// Idempotency records held in memory: at most `capacity`, each for `ttl`.
///
/// Applies [`resolve`]. Records leave oldest first once expired, and only then: a table full
/// of live records refuses new keys with [`IdempotencyError::Full`] (and the time until the
/// oldest expires) rather than forget a key a client may still retry with. Requests for keys
/// already held are answered even when the table is full.
///
/// Memory is bounded by `capacity` records of at most a few hundred bytes each. `begin` costs
/// `O(log capacity)` plus the eviction of the records that expired since the last call (each
/// record is evicted once). Ordered maps rather than hash maps: no hash seed to inject, and
/// no key a client chooses can degrade a lookup.
#[derive(Debug)]
pub struct IdempotencyTable {
    capacity: usize,
    ttl: Duration,
    records: BTreeMap<IdempotencyKey, Slot>,
    /// The same records by arrival. Times are clamped to never run backwards, so arrival order
    /// is also `created_at` order and the expired records are always a prefix.
    by_age: BTreeMap<u64, IdempotencyKey>,
    next_seq: u64,
    latest: Timestamp,
}

impl IdempotencyTable {
    /// An empty table for at most `capacity` live records, each kept for `ttl`. Fails when
    /// either is zero.
    pub fn new(capacity: usize, ttl: Duration) -> Result<Self, IdempotencyError> {
        if capacity == 0 {
            return Err(IdempotencyError::InvalidConfig("capacity must be at least 1"));
        }
        if ttl.is_zero() {
            return Err(IdempotencyError::InvalidConfig("time to live must be longer than zero"));
        }
        Ok(IdempotencyTable {
            capacity,
            ttl,
            records: BTreeMap::new(),
            by_age: BTreeMap::new(),
            next_seq: 0,
            latest: Timestamp::ZERO,
        })
    }

    /// Decides on a request carrying `key` whose content digests to `digest`, at `now`.
    ///
    /// Returns [`Begun::Replayed`] with the earlier job when the same request was accepted
    /// within the time to live, or calls `new_job_id` (only then) and returns
    /// [`Begun::Started`] with its result, remembering it under `key`. Fails with
    /// [`IdempotencyError::Conflict`] when the key is live for a different request, and with
    /// [`IdempotencyError::Full`] when a new key finds the table full of live records; in
    /// both cases nothing is stored and `new_job_id` is not called.
    ///
    /// If starting the job then fails, call [`forget`](Self::forget) so that the client's
    /// retry can start it again.
    pub fn begin(
        &mut self,
        key: &IdempotencyKey,
        digest: RequestDigest,
        now: Timestamp,
        new_job_id: impl FnOnce() -> JobId,
    ) -> Result<Begun, IdempotencyError> {
        self.evict_expired(now);
        let now = self.latest;
        let existing = self.records.get(key).map(|slot| &slot.record);
        if let Resolution::Existing(job_id) = resolve(existing, key, digest, now, self.ttl)? {
            return Ok(Begun::Replayed(job_id));
        }
        // Every expired record was evicted above, so `key` is absent and a new record needs
        // a free place.
        if self.records.len() >= self.capacity {
            return Err(IdempotencyError::Full {
                capacity: self.capacity,
                retry_after: self.oldest().map(|r| r.expires_at(self.ttl).saturating_since(now)),
            });
        }
        let job_id = new_job_id();
        let seq = self.next_seq;
        self.next_seq += 1;
        let record = IdempotencyRecord { key: key.clone(), digest, job_id: job_id.clone(), created_at: now };
        if let Some(stale) = self.records.insert(key.clone(), Slot { record, seq }) {
            self.by_age.remove(&stale.seq);
        }
        self.by_age.insert(seq, key.clone());
        Ok(Begun::Started(job_id))
    }

    /// The live record under `key` at `now`, if any.
    pub fn get(&self, key: &IdempotencyKey, now: Timestamp) -> Option<&IdempotencyRecord> {
        let now = now.max(self.latest);
        self.records.get(key).map(|slot| &slot.record).filter(|record| !record.is_expired(now, self.ttl))
    }

    /// Removes the record under `key`, returning it. For a job that failed to start: the
    /// client's retry with the same key then starts it anew.
    pub fn forget(&mut self, key: &IdempotencyKey) -> Option<IdempotencyRecord> {
        let slot = self.records.remove(key)?;
        self.by_age.remove(&slot.seq);
        Some(slot.record)
    }

    /// Removes every record expired at `now`, oldest first. [`begin`](Self::begin) does this
    /// itself; call it when idle to release memory sooner.
    ///
    /// Time never runs backwards inside the table: a `now` earlier than one seen before is
    /// treated as that earlier-seen time, so a clock step back neither revives nor shortens a
    /// record.
    pub fn evict_expired(&mut self, now: Timestamp) {
        self.latest = now.max(self.latest);
        while let Some((_, key)) = self.by_age.first_key_value() {
            let expired = self.records.get(key).is_none_or(|slot| slot.record.is_expired(self.latest, self.ttl));
            if !expired {
                break;
            }
            if let Some((_, key)) = self.by_age.pop_first() {
                self.records.remove(&key);
            }
        }
    }

    /// Records held now, expired ones not yet evicted included.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether no record is held.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The most records held at once.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// How long a record counts.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn oldest(&self) -> Option<&IdempotencyRecord> {
        let (_, key) = self.by_age.first_key_value()?;
        self.records.get(key).map(|slot| &slot.record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn key(s: &str) -> IdempotencyKey {
        IdempotencyKey::new(s).expect("valid key")
    }

    fn job(n: u64) -> JobId {
        JobId::new(format!("job-{n}")).expect("valid job id")
    }

    fn digest(n: u64) -> RequestDigest {
        RequestDigest::of_json(&json!({ "n": n }))
    }

    fn at(secs: u64) -> Timestamp {
        Timestamp::from_millis(secs * 1000)
    }

    fn record(k: &str, d: u64, j: u64, created: u64) -> IdempotencyRecord {
        IdempotencyRecord { key: key(k), digest: digest(d), job_id: job(j), created_at: at(created) }
    }

    const TTL: Duration = Duration::from_secs(100);

    #[test]
    fn keys_are_one_to_128_printable_ascii_bytes_without_spaces() {
        assert!(IdempotencyKey::new("5f0c1e4e-8f3a-4c1b-9d2e-7a6b5c4d3e2f").is_ok());
        assert!(IdempotencyKey::new("!~{}\"'#").is_ok());
        assert!(IdempotencyKey::new("k".repeat(128)).is_ok());
        assert!(matches!(IdempotencyKey::new("k".repeat(129)), Err(IdError::TooLong { len: 129, .. })));
        assert!(matches!(IdempotencyKey::new(""), Err(IdError::Empty { .. })));
        for bad in ["a b", "a\tb", "a\u{7f}", "clé"] {
            assert!(matches!(IdempotencyKey::new(bad), Err(IdError::BadChar { .. })), "{bad:?} is refused");
        }
        assert!(serde_json::from_str::<IdempotencyKey>("\"a b\"").is_err(), "deserialization validates too");
        assert!(JobId::new("job-01.a_b").is_ok());
        assert!(JobId::new("job/1").is_err());
    }

    #[test]
    fn canonical_form_sorts_keys_drops_whitespace_and_is_what_gets_hashed() {
        let text = "{ \"zeta\" : [ 1 , 2.5, -3 ,true,null ],\n\t\"alpha\": {\"b\": \"x\\ny\", \"a\": {}} }";
        let value: Value = serde_json::from_str(text).expect("valid JSON");
        let canonical = r#"{"alpha":{"a":{},"b":"x\ny"},"zeta":[1,2.5,-3,true,null]}"#;
        assert_eq!(canonical_json(&value), canonical);
        assert_eq!(
            RequestDigest::of_json(&value).0,
            *blake3::hash(canonical.as_bytes()).as_bytes(),
            "the digest is plain BLAKE3 of the canonical text"
        );
        assert_eq!(canonical_json(&json!("\u{1}\u{1f}\"\\/é")), r#""\u0001\u001f\"\\/é""#);
        assert_ne!(
            RequestDigest::of_json(&json!({ "n": 1 })),
            RequestDigest::of_json(&json!({ "n": 1.0 })),
            "numbers keep their JSON type"
        );
    }

    #[test]
    fn deeply_nested_json_neither_overflows_the_stack_nor_panics() {
        let depth = 200_000;
        let mut value = Value::Null;
        for _ in 0..depth {
            value = Value::Array(vec![value]);
        }
        let digest = RequestDigest::of_json(&value);
        assert_eq!(
            digest.0,
            *blake3::hash(format!("{}null{}", "[".repeat(depth), "]".repeat(depth)).as_bytes()).as_bytes()
        );
        // Taken apart by hand: the default drop recurses and would overflow the test's stack.
        while let Value::Array(mut items) = value {
            value = items.pop().unwrap_or(Value::Null);
        }
    }

    #[test]
    fn digests_and_records_round_trip_through_their_stored_forms() {
        let d = digest(7);
        assert_eq!(RequestDigest::from_hex(&d.to_hex()), Ok(d));
        assert!(RequestDigest::from_hex(&d.to_hex().to_uppercase()).is_err());
        let r = record("k-1", 7, 3, 42);
        let stored = serde_json::to_string(&r).expect("encodes");
        assert_eq!(serde_json::from_str::<IdempotencyRecord>(&stored).expect("decodes"), r);
    }

    #[test]
    fn resolve_starts_answers_refuses_and_forgets_after_the_ttl() {
        let k = key("k");
        let r = record("k", 1, 9, 1_000);
        let now = at(1_050);
        assert_eq!(resolve(None, &k, digest(1), now, TTL), Ok(Resolution::New));
        assert_eq!(resolve(Some(&r), &k, digest(1), now, TTL), Ok(Resolution::Existing(job(9))));
        assert_eq!(resolve(Some(&r), &k, digest(2), now, TTL), Err(IdempotencyError::Conflict { key: k.clone() }));
        assert_eq!(
            resolve(Some(&r), &k, digest(1), at(1_099), TTL),
            Ok(Resolution::Existing(job(9))),
            "live until the last millisecond before created_at + ttl"
        );
        assert_eq!(
            resolve(Some(&r), &k, digest(2), at(1_100), TTL),
            Ok(Resolution::New),
            "an expired record counts as absent, whatever its digest"
        );
        assert_eq!(
            resolve(Some(&r), &k, digest(1), at(900), TTL),
            Ok(Resolution::Existing(job(9))),
            "a record from the future is live"
        );
        assert!(
            matches!(resolve(Some(&r), &key("other"), digest(1), now, TTL), Err(IdempotencyError::Conflict { .. })),
            "another key's record never hands out its job"
        );
    }

    #[test]
    fn a_full_table_refuses_new_keys_until_the_oldest_expires_but_answers_known_ones() {
        let mut table = IdempotencyTable::new(2, TTL).expect("valid config");
        let mut next = 0;
        let mut fresh = || {
            next += 1;
            job(next)
        };
        assert_eq!(table.begin(&key("a"), digest(1), at(10), &mut fresh), Ok(Begun::Started(job(1))));
        assert_eq!(table.begin(&key("b"), digest(2), at(30), &mut fresh), Ok(Begun::Started(job(2))));
        assert_eq!(
            table.begin(&key("c"), digest(3), at(50), &mut fresh),
            Err(IdempotencyError::Full { capacity: 2, retry_after: Some(Duration::from_secs(60)) })
        );
        assert_eq!(table.begin(&key("b"), digest(2), at(50), &mut fresh), Ok(Begun::Replayed(job(2))));
        assert_eq!(
            table.begin(&key("c"), digest(3), at(110), &mut fresh),
            Ok(Begun::Started(job(3))),
            "the oldest record expired and was evicted"
        );
        assert_eq!(table.len(), 2);
        assert!(table.get(&key("a"), at(110)).is_none());
        assert_eq!(
            table.begin(&key("a"), digest(9), at(110), &mut fresh),
            Err(IdempotencyError::Full { capacity: 2, retry_after: Some(Duration::from_secs(20)) })
        );
    }

    #[test]
    fn a_forgotten_key_starts_a_new_job_and_time_never_runs_backwards() {
        let mut table = IdempotencyTable::new(4, TTL).expect("valid config");
        let k = key("k");
        assert_eq!(table.begin(&k, digest(1), at(10), || job(1)), Ok(Begun::Started(job(1))));
        assert_eq!(table.forget(&k).map(|r| r.job_id), Some(job(1)));
        assert!(table.is_empty());
        assert_eq!(table.begin(&k, digest(1), at(20), || job(2)), Ok(Begun::Started(job(2))));
        table.evict_expired(at(120));
        assert!(table.is_empty(), "expired at 20 + 100");
        assert_eq!(
            table.begin(&k, digest(1), at(50), || job(3)),
            Ok(Begun::Started(job(3))),
            "a clock step back does not revive the record"
        );
        assert_eq!(table.get(&k, at(50)).map(|r| r.created_at), Some(at(120)), "stamped with the latest time seen");
    }

    #[test]
    fn zero_capacity_or_ttl_is_refused() {
        assert!(matches!(IdempotencyTable::new(0, TTL), Err(IdempotencyError::InvalidConfig(_))));
        assert!(matches!(IdempotencyTable::new(1, Duration::ZERO), Err(IdempotencyError::InvalidConfig(_))));
    }

    /// Any JSON value, floats included, nested a few levels.
    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter_map("JSON numbers are finite", |f| { serde_json::Number::from_f64(f).map(Value::Number) }),
            any::<String>().prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 64, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::vec((any::<String>(), inner), 0..6)
                    .prop_map(|entries| Value::Object(entries.into_iter().collect())),
            ]
        })
    }

    /// `value` as JSON text with object entries in a scrambled order and whitespace between
    /// tokens, both driven by `noise`.
    fn scrambled(value: &Value, noise: &mut u64, out: &mut String) {
        fn next(noise: &mut u64) -> u64 {
            *noise = noise.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            *noise >> 33
        }
        fn space(noise: &mut u64, out: &mut String) {
            out.push_str([" ", "", "\n", "\t ", "\r\n  "][(next(noise) % 5) as usize]);
        }
        space(noise, out);
        match value {
            Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    scrambled(item, noise, out);
                }
                space(noise, out);
                out.push(']');
            }
            Value::Object(map) => {
                let mut entries: Vec<_> = map.iter().collect();
                for i in (1..entries.len()).rev() {
                    let j = (next(noise) % (i as u64 + 1)) as usize;
                    entries.swap(i, j);
                }
                out.push('{');
                for (i, (k, v)) in entries.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    space(noise, out);
                    out.push_str(&serde_json::to_string(k).expect("a string encodes"));
                    space(noise, out);
                    out.push(':');
                    scrambled(v, noise, out);
                }
                space(noise, out);
                out.push('}');
            }
            leaf => out.push_str(&serde_json::to_string(leaf).expect("a leaf encodes")),
        }
        space(noise, out);
    }

    /// `value` with every object rebuilt by inserting its keys in sorted order, so that
    /// serde_json writes them sorted whatever its `preserve_order` feature says.
    fn sorted(value: &Value) -> Value {
        match value {
            Value::Array(items) => Value::Array(items.iter().map(sorted).collect()),
            Value::Object(map) => {
                let mut entries: Vec<_> = map.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                Value::Object(entries.into_iter().map(|(k, v)| (k.clone(), sorted(v))).collect())
            }
            leaf => leaf.clone(),
        }
    }

    proptest! {
        #[test]
        fn field_order_and_whitespace_do_not_change_the_digest(
            value in json_value(),
            noise_a in any::<u64>(),
            noise_b in any::<u64>(),
        ) {
            let (mut text_a, mut text_b) = (String::new(), String::new());
            scrambled(&value, &mut { noise_a }, &mut text_a);
            scrambled(&value, &mut { noise_b }, &mut text_b);
            let a: Value = serde_json::from_str(&text_a).expect("scrambled JSON parses");
            let b: Value = serde_json::from_str(&text_b).expect("scrambled JSON parses");
            prop_assert_eq!(RequestDigest::of_json(&a), RequestDigest::of_json(&b));
            prop_assert_eq!(RequestDigest::of_json(&a), RequestDigest::of_json(&value));
        }

        #[test]
        fn canonical_form_is_serde_json_compact_output_with_sorted_keys(value in json_value()) {
            let canonical = canonical_json(&value);
            prop_assert_eq!(&canonical, &serde_json::to_string(&sorted(&value)).expect("encodes"));
            let reparsed: Value = serde_json::from_str(&canonical).expect("canonical JSON parses");
            prop_assert_eq!(&reparsed, &value);
            prop_assert_eq!(RequestDigest::of_json(&value).0, *blake3::hash(canonical.as_bytes()).as_bytes());
        }

        #[test]
        fn different_requests_get_different_digests(a in json_value(), b in json_value()) {
            prop_assume!(a != b);
            prop_assert_ne!(RequestDigest::of_json(&a), RequestDigest::of_json(&b));
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Begin { key: u8, digest: u8, advance_secs: u64 },
        Forget { key: u8 },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0u8..8, 0u8..2, 0u64..40).prop_map(|(key, digest, advance_secs)| {
                Op::Begin { key, digest, advance_secs }
            }),
            1 => (0u8..8).prop_map(|key| Op::Forget { key }),
        ]
    }

    proptest! {
        #[test]
        fn table_never_exceeds_capacity_and_follows_the_rule(
            capacity in 1usize..6,
            ops in proptest::collection::vec(op(), 0..200),
        ) {
            let mut table = IdempotencyTable::new(capacity, TTL).expect("valid config");
            // The model: live records by key, with the rule applied by hand.
            let mut model: BTreeMap<u8, (u8, JobId, Timestamp)> = BTreeMap::new();
            let mut now = at(1_000);
            let mut jobs = 0u64;
            for op in ops {
                match op {
                    Op::Begin { key: k, digest: d, advance_secs } => {
                        now = now.saturating_add(Duration::from_secs(advance_secs));
                        model.retain(|_, (_, _, created)| now < created.saturating_add(TTL));
                        let expected = match model.get(&k) {
                            Some((stored, job_id, _)) if *stored == d => Ok(Begun::Replayed(job_id.clone())),
                            Some(_) => Err(IdempotencyError::Conflict { key: key(&format!("key-{k}")) }),
                            None if model.len() >= capacity => {
                                let oldest = model.values().map(|(_, _, c)| *c).min().unwrap_or(now);
                                Err(IdempotencyError::Full {
                                    capacity,
                                    retry_after: Some(oldest.saturating_add(TTL).saturating_since(now)),
                                })
                            }
                            None => {
                                model.insert(k, (d, job(jobs), now));
                                Ok(Begun::Started(job(jobs)))
                            }
                        };
                        let got = table.begin(
                            &key(&format!("key-{k}")),
                            digest(u64::from(d)),
                            now,
                            || job(jobs),
                        );
                        if matches!(got, Ok(Begun::Started(_))) {
                            jobs += 1;
                        }
                        prop_assert_eq!(got, expected);
                    }
                    Op::Forget { key: k } => {
                        let expected = model.remove(&k).map(|(_, job_id, _)| job_id);
                        let got = table.forget(&key(&format!("key-{k}"))).map(|r| r.job_id);
                        // The table may still hold a record the model already dropped as
                        // expired; only a live one must agree.
                        if expected.is_some() {
                            prop_assert_eq!(got, expected);
                        }
                    }
                }
                prop_assert!(table.len() <= capacity);
            }
        }

        #[test]
        fn same_key_same_request_gives_the_same_job(
            offsets in proptest::collection::vec(0u64..99_999, 1..20),
            others in proptest::collection::vec(0u8..50, 0..20),
        ) {
            let mut table = IdempotencyTable::new(64, TTL).expect("valid config");
            let k = key("retry-me");
            let request = RequestDigest::of_json(&json!({ "verb": "docker.ps", "targets": ["gw-1"] }));
            let first = table.begin(&k, request, at(0), || job(0)).expect("room");
            prop_assert_eq!(&first, &Begun::Started(job(0)));
            let mut counter = 1;
            let mut offsets = offsets;
            offsets.sort_unstable();
            for (offset, other) in offsets.into_iter().zip(others.into_iter().chain(std::iter::repeat(0))) {
                let now = Timestamp::from_millis(offset);
                // Unrelated traffic in between must not disturb the key.
                let _ = table.begin(&key(&format!("other-{other}")), digest(u64::from(other)), now, || {
                    counter += 1;
                    job(counter)
                });
                let again = table.begin(&k, request, now, || job(u64::MAX));
                prop_assert_eq!(again, Ok(Begun::Replayed(job(0))));
            }
        }

        #[test]
        fn same_key_different_request_is_a_conflict(
            a in json_value(),
            b in json_value(),
            offset in 0u64..99_999,
        ) {
            prop_assume!(a != b);
            let mut table = IdempotencyTable::new(4, TTL).expect("valid config");
            let k = key("reused");
            table.begin(&k, RequestDigest::of_json(&a), at(0), || job(1)).expect("room");
            let mut called = false;
            let got = table.begin(&k, RequestDigest::of_json(&b), Timestamp::from_millis(offset), || {
                called = true;
                job(2)
            });
            prop_assert_eq!(got, Err(IdempotencyError::Conflict { key: k.clone() }));
            prop_assert!(!called, "no job is started for a conflicting request");
            prop_assert_eq!(table.get(&k, at(0)).map(|r| r.job_id.clone()), Some(job(1)));
        }
    }
}

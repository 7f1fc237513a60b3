//! The host's result ledger: at most one stored result per correlation id (the command id),
//! so a result an agent redelivers is acknowledged again instead of stored twice, and a second,
//! different answer for the same command is kept out and reported.

use std::collections::BTreeMap;
use std::fmt;

use super::IdempotencyError;
use super::request::digest_result;
use crate::wire::{CommandId, CommandResult, IdError};

/// The BLAKE3 digest of a result's canonical JSON ([`super::canonical_json`] of the result as
/// the wire encodes it): equal exactly when two results say the same thing, whatever the key
/// order inside their `output`. Written as 64 lowercase hexadecimal digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ResultDigest(pub [u8; 32]);

impl ResultDigest {
    /// The digest of `result`. Costs one pass over it, hashing its canonical JSON as it is
    /// written; nothing is allocated but what a deeply nested `output` needs.
    pub fn of(result: &CommandResult) -> Self {
        ResultDigest(digest_result(result))
    }

    /// The digest as lowercase hexadecimal, as a durable store keeps it.
    pub fn to_hex(&self) -> String {
        crate::hex::encode32(&self.0)
    }

    /// Parses exactly 64 lowercase hexadecimal digits.
    pub fn from_hex(s: &str) -> Result<Self, IdError> {
        crate::hex::decode32(s).map(ResultDigest).ok_or(IdError::BadHex { what: "result digest", len: 64 })
    }
}

impl fmt::Display for ResultDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ResultDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ResultDigest({})", self.to_hex())
    }
}

/// What arriving result meant for the ledger.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recorded {
    /// The first result for its command: store it, then acknowledge it.
    New,
    /// The same result again (a redelivery): store nothing, acknowledge it again.
    Duplicate,
    /// A different result for a command already answered. The first stays; this one is
    /// dropped, acknowledged so the agent stops resending it, and audited as a protocol
    /// violation.
    Conflicting {
        /// The digest of the result kept.
        stored: ResultDigest,
        /// The digest of the result refused.
        received: ResultDigest,
    },
}

/// The result rule, in one place for the in-memory [`ResultLedger`] and the host's durable
/// store: `stored` is the digest of the result already held for the command, if any,
/// `received` that of the result arriving.
pub fn classify_result(stored: Option<ResultDigest>, received: ResultDigest) -> Recorded {
    match stored {
        None => Recorded::New,
        Some(stored) if stored == received => Recorded::Duplicate,
        Some(stored) => Recorded::Conflicting { stored, received },
    }
}

#[derive(Debug)]
struct Entry {
    digest: ResultDigest,
    /// Position in arrival order; the key of the entry in `acknowledged` once it is there.
    seq: u64,
    acknowledged: bool,
}

/// The results the host holds, by command id: at most `capacity`.
///
/// Applies [`classify_result`]. An entry is evictable once [`acknowledge`]d, meaning the
/// result is durable in the store and its RESULT_ACK went out; until then a redelivery must
/// find it here. When a new result finds the ledger full, the oldest acknowledged entry
/// leaves; when none is acknowledged the result is refused with [`IdempotencyError::Full`]
/// (the host then withholds the ack and the agent redelivers later). After eviction, a late
/// redelivery is classified [`Recorded::New`] here and deduplicated by the store's unique
/// correlation id.
///
/// Memory is bounded by `capacity` entries of a command id and a digest each. Each call costs
/// `O(log capacity)`, plus the digest of the result for [`record`].
///
/// [`acknowledge`]: ResultLedger::acknowledge
/// [`record`]: ResultLedger::record
#[derive(Debug)]
pub struct ResultLedger {
    capacity: usize,
    entries: BTreeMap<CommandId, Entry>,
    /// Acknowledged entries by arrival: the eviction order.
    acknowledged: BTreeMap<u64, CommandId>,
    next_seq: u64,
}

impl ResultLedger {
    /// An empty ledger for at most `capacity` results. Fails when `capacity` is zero.
    pub fn new(capacity: usize) -> Result<Self, IdempotencyError> {
        if capacity == 0 {
            return Err(IdempotencyError::InvalidConfig("capacity must be at least 1"));
        }
        Ok(ResultLedger { capacity, entries: BTreeMap::new(), acknowledged: BTreeMap::new(), next_seq: 0 })
    }

    /// Classifies `result` against the one held for its command id, and holds it when it is
    /// the first. Fails with [`IdempotencyError::Full`] only for a new command id when every
    /// entry held is still unacknowledged; nothing is stored then. Duplicates and conflicts
    /// never fail and never change what is held.
    pub fn record(&mut self, result: &CommandResult) -> Result<Recorded, IdempotencyError> {
        let received = ResultDigest::of(result);
        let stored = self.entries.get(&result.command_id).map(|e| e.digest);
        let outcome = classify_result(stored, received);
        if outcome != Recorded::New {
            return Ok(outcome);
        }
        if self.entries.len() >= self.capacity {
            let Some((_, oldest)) = self.acknowledged.pop_first() else {
                return Err(IdempotencyError::Full { capacity: self.capacity, retry_after: None });
            };
            self.entries.remove(&oldest);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.entries.insert(result.command_id.clone(), Entry { digest: received, seq, acknowledged: false });
        Ok(Recorded::New)
    }

    /// Marks the result for `command_id` as durably stored and acknowledged to the agent, so
    /// that it may be evicted. Returns whether such a result is held; acknowledging twice is
    /// harmless.
    pub fn acknowledge(&mut self, command_id: &CommandId) -> bool {
        let Some(entry) = self.entries.get_mut(command_id) else {
            return false;
        };
        if !entry.acknowledged {
            entry.acknowledged = true;
            self.acknowledged.insert(entry.seq, command_id.clone());
        }
        true
    }

    /// Whether a result for `command_id` is held.
    pub fn contains(&self, command_id: &CommandId) -> bool {
        self.entries.contains_key(command_id)
    }

    /// The digest of the result held for `command_id`, if any.
    pub fn digest(&self, command_id: &CommandId) -> Option<ResultDigest> {
        self.entries.get(command_id).map(|e| e.digest)
    }

    /// Results held now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no result is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The most results held at once.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::ResultStatus;
    use proptest::prelude::*;
    use serde_json::{Value, json};

    fn id(n: u8) -> CommandId {
        CommandId::new(format!("cmd-{n}")).expect("valid id")
    }

    fn result(n: u8, output: Value) -> CommandResult {
        CommandResult {
            command_id: id(n),
            status: ResultStatus::Succeeded,
            exit_code: Some(0),
            output,
            error: None,
            duration_ms: 12,
        }
    }

    #[test]
    fn a_redelivery_is_a_duplicate_and_a_different_answer_is_a_conflict() {
        let mut ledger = ResultLedger::new(8).expect("valid capacity");
        let first = result(1, json!({ "containers": 3 }));
        assert_eq!(ledger.record(&first), Ok(Recorded::New));
        assert_eq!(ledger.record(&first.clone()), Ok(Recorded::Duplicate));
        let other = CommandResult { status: ResultStatus::Failed, ..first.clone() };
        assert_eq!(
            ledger.record(&other),
            Ok(Recorded::Conflicting { stored: ResultDigest::of(&first), received: ResultDigest::of(&other) })
        );
        assert_eq!(ledger.digest(&id(1)), Some(ResultDigest::of(&first)), "the first is kept");
        assert_eq!(ledger.len(), 1);
    }

    #[test]
    fn the_result_digest_ignores_key_order_but_not_content() {
        let a: Value = serde_json::from_str(r#"{"a":1,"b":{"x":[1,2],"y":null}}"#).expect("JSON");
        let b: Value = serde_json::from_str("{ \"b\": {\"y\": null, \"x\": [1, 2]}, \"a\": 1 }").expect("JSON");
        assert_eq!(ResultDigest::of(&result(1, a.clone())), ResultDigest::of(&result(1, b)));
        let base = result(1, a);
        for changed in [
            CommandResult { duration_ms: 13, ..base.clone() },
            CommandResult { exit_code: None, ..base.clone() },
            CommandResult { command_id: id(2), ..base.clone() },
            CommandResult { output: json!({ "a": 1 }), ..base.clone() },
        ] {
            assert_ne!(ResultDigest::of(&changed), ResultDigest::of(&base));
        }
        let digest = ResultDigest::of(&base);
        assert_eq!(ResultDigest::from_hex(&digest.to_hex()), Ok(digest));
    }

    #[test]
    fn a_full_ledger_evicts_the_oldest_acknowledged_result_and_never_an_unacknowledged_one() {
        let mut ledger = ResultLedger::new(3).expect("valid capacity");
        for n in 0..3 {
            assert_eq!(ledger.record(&result(n, json!(n))), Ok(Recorded::New));
        }
        assert_eq!(ledger.record(&result(3, json!(3))), Err(IdempotencyError::Full { capacity: 3, retry_after: None }));
        assert!(!ledger.contains(&id(3)));
        assert_eq!(ledger.record(&result(1, json!(1))), Ok(Recorded::Duplicate), "known ids are answered when full");
        assert!(ledger.acknowledge(&id(2)));
        assert!(ledger.acknowledge(&id(1)));
        assert!(!ledger.acknowledge(&id(9)));
        assert_eq!(ledger.record(&result(3, json!(3))), Ok(Recorded::New));
        assert!(!ledger.contains(&id(1)), "oldest acknowledged by arrival");
        assert!(ledger.contains(&id(0)) && ledger.contains(&id(2)));
        assert_eq!(ledger.record(&result(4, json!(4))), Ok(Recorded::New));
        assert!(!ledger.contains(&id(2)));
        assert!(ledger.record(&result(5, json!(5))).is_err());
        assert_eq!(ledger.len(), 3);
    }

    #[test]
    fn zero_capacity_is_refused() {
        assert!(matches!(ResultLedger::new(0), Err(IdempotencyError::InvalidConfig(_))));
    }

    fn any_output() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f).map(Value::Number)),
            ".{0,8}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map(".{0,6}", inner, 0..4)
                    .prop_map(|map| Value::Object(map.into_iter().collect())),
            ]
        })
    }

    prop_compose! {
        fn any_result()(
            n in any::<u8>(),
            status in prop_oneof![
                Just(ResultStatus::Succeeded),
                Just(ResultStatus::Failed),
                Just(ResultStatus::TimedOut),
                Just(ResultStatus::Interrupted),
                Just(ResultStatus::Rejected),
            ],
            exit_code in proptest::option::of(any::<i32>()),
            output in any_output(),
            error in proptest::option::of(("[a-z_]{0,12}", ".{0,24}")),
            duration_ms in any::<u64>(),
        ) -> CommandResult {
            let error = error.map(|(code, message)| crate::wire::ResultError {
                code: crate::wire::Text::lossy(&code),
                message: crate::wire::Text::lossy(&message),
            });
            CommandResult { command_id: id(n), status, exit_code, output, error, duration_ms }
        }
    }

    proptest! {
        #[test]
        fn the_digest_is_blake3_of_the_canonical_json_of_the_result(result in any_result()) {
            let value = serde_json::to_value(&result).expect("a result is JSON");
            let canonical = crate::idempotency::canonical_json(&value);
            prop_assert_eq!(ResultDigest::of(&result).0, *blake3::hash(canonical.as_bytes()).as_bytes());
        }

        #[test]
        fn a_result_delivered_twice_is_recorded_once(
            deliveries in proptest::collection::vec((0u8..6, 0u8..2), 0..100),
        ) {
            let mut ledger = ResultLedger::new(64).expect("valid capacity");
            let mut first: BTreeMap<u8, u8> = BTreeMap::new();
            for (n, content) in deliveries {
                let got = ledger.record(&result(n, json!({ "content": content })));
                let expected = match first.get(&n) {
                    None => {
                        first.insert(n, content);
                        Recorded::New
                    }
                    Some(kept) if *kept == content => Recorded::Duplicate,
                    Some(kept) => Recorded::Conflicting {
                        stored: ResultDigest::of(&result(n, json!({ "content": kept }))),
                        received: ResultDigest::of(&result(n, json!({ "content": content }))),
                    },
                };
                prop_assert_eq!(got, Ok(expected));
                prop_assert_eq!(ledger.len(), first.len());
            }
        }

        #[test]
        fn ledger_never_exceeds_capacity_and_never_evicts_an_unacknowledged_result(
            capacity in 1usize..6,
            ops in proptest::collection::vec((any::<bool>(), 0u8..10), 0..200),
        ) {
            let mut ledger = ResultLedger::new(capacity).expect("valid capacity");
            // The model: held ids in arrival order, with their acknowledged flag.
            let mut model: Vec<(u8, bool)> = Vec::new();
            for (is_ack, n) in ops {
                if is_ack {
                    let held = model.iter_mut().find(|(m, _)| *m == n);
                    prop_assert_eq!(ledger.acknowledge(&id(n)), held.is_some());
                    if let Some((_, acked)) = held {
                        *acked = true;
                    }
                    continue;
                }
                let got = ledger.record(&result(n, json!(null)));
                if model.iter().any(|(m, _)| *m == n) {
                    prop_assert_eq!(got, Ok(Recorded::Duplicate));
                } else if model.len() < capacity {
                    prop_assert_eq!(got, Ok(Recorded::New));
                    model.push((n, false));
                } else if let Some(oldest) = model.iter().position(|(_, acked)| *acked) {
                    prop_assert_eq!(got, Ok(Recorded::New));
                    model.remove(oldest);
                    model.push((n, false));
                } else {
                    prop_assert!(
                        matches!(got, Err(IdempotencyError::Full { .. })),
                        "full of unacknowledged results, got {:?}",
                        got
                    );
                }
                prop_assert!(ledger.len() <= capacity);
                prop_assert_eq!(ledger.len(), model.len());
                for (m, _) in &model {
                    prop_assert!(ledger.contains(&id(*m)));
                }
            }
        }
    }
}

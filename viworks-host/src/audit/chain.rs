//! The audit hash chain: each record's hash covers its predecessor's hash and its own content,
//! so editing, inserting or removing a record anywhere but at the end breaks every later link.
//!
//! Shared by every store: a record is [`Prepared`] where it is made, linked by [`Tip::link`] when
//! a store appends it, and checked by [`verify`] when the chain is walked.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::ops::Range;

use serde_json::Value;
use viworks_core::Timestamp;
use viworks_core::idempotency::{RequestDigest, push_canonical_json, push_json_string};

use crate::store::{AuditEntry, ChainVerdict, NewAudit};

/// The `prev_hash` of the first record: 32 zero bytes (64 zero digits in hex).
pub const GENESIS: [u8; 32] = [0; 32];

/// The hash of a record with `content` following a record whose hash is `prev`:
/// `blake3(prev || canonical JSON of content)`.
///
/// The canonical JSON (keys sorted, no whitespace, see
/// [`canonical_json`](viworks_core::idempotency::canonical_json)) makes the hash independent
/// of how a store orders JSON keys, so any store, or `b3sum` over an export, reproduces it.
/// Costs one pass writing the canonical text and one of BLAKE3 over it.
pub fn link_hash(prev: &[u8; 32], content: &NewAudit) -> [u8; 32] {
    hash_after(prev, &canonical_content(content))
}

/// `blake3(prev || canonical)`: the one definition of a link, for records read back
/// ([`link_hash`]) and records appended ([`Tip::link`]) alike.
fn hash_after(prev: &[u8; 32], canonical: &str) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(prev);
    hasher.update(canonical.as_bytes());
    *hasher.finalize().as_bytes()
}

/// The members of a record other than `detail`, borrowed: what [`Prepared::build`] writes.
#[derive(Clone, Copy, Debug)]
pub struct Fields<'a, T: AsRef<str>> {
    /// When it happened.
    pub ts: Timestamp,
    /// The API request, or the session, it belongs to.
    pub req_id: &'a str,
    /// Who did it.
    pub actor: &'a str,
    /// What happened.
    pub action: &'a str,
    /// BLAKE3 of the canonical JSON of the arguments, hex.
    pub args_hash: &'a str,
    /// What it concerned.
    pub targets: &'a [T],
    /// The outcome.
    pub rc: &'a str,
    /// How long it took.
    pub duration_ms: u64,
}

/// Where each member of a record lies in its canonical text: a string member with its quotes,
/// `detail` and `targets` as their JSON.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Members {
    action: Range<usize>,
    actor: Range<usize>,
    args_hash: Range<usize>,
    detail: Range<usize>,
    rc: Range<usize>,
    req_id: Range<usize>,
    targets: Range<usize>,
}

/// `canonical_json(&serde_json::to_value(record))`, written member by member in the sorted
/// order of `NewAudit`'s serialised names, without building a JSON value of the record (a
/// test holds the two equal for any content); `write_detail` writes the `detail` member.
/// Also returns where each member lies in the text.
fn write_canonical<T: AsRef<str>>(fields: &Fields<'_, T>, write_detail: impl FnOnce(&mut String)) -> (String, Members) {
    let Fields { ts, req_id, actor, action, args_hash, targets, rc, duration_ms } = *fields;
    let mut out = String::with_capacity(192 + targets.iter().map(|t| t.as_ref().len()).sum::<usize>());
    out.push_str("{\"action\":");
    let action = span(&mut out, |out| push_json_string(action, out));
    out.push_str(",\"actor\":");
    let actor = span(&mut out, |out| push_json_string(actor, out));
    out.push_str(",\"args_hash\":");
    let args_hash = span(&mut out, |out| push_json_string(args_hash, out));
    out.push_str(",\"detail\":");
    let detail = span(&mut out, write_detail);
    // Writing to a String cannot fail.
    let _ = write!(out, ",\"duration_ms\":{duration_ms},\"rc\":");
    let rc = span(&mut out, |out| push_json_string(rc, out));
    out.push_str(",\"req_id\":");
    let req_id = span(&mut out, |out| push_json_string(req_id, out));
    out.push_str(",\"targets\":");
    let targets = span(&mut out, |out| {
        out.push('[');
        for (i, target) in targets.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            push_json_string(target.as_ref(), out);
        }
        out.push(']');
    });
    let _ = write!(out, ",\"ts\":{}}}", ts.as_millis());
    (out, Members { action, actor, args_hash, detail, rc, req_id, targets })
}

/// Where in `out` what `write` appends lies.
fn span(out: &mut String, write: impl FnOnce(&mut String)) -> Range<usize> {
    let start = out.len();
    write(out);
    start..out.len()
}

/// The canonical JSON of `content` (see [`write_canonical`]).
fn canonical_content(content: &NewAudit) -> String {
    write_canonical(&fields_of(content), |out| push_canonical_json(&content.detail, out)).0
}

fn fields_of(content: &NewAudit) -> Fields<'_, String> {
    let NewAudit { ts, req_id, actor, action, args_hash, targets, rc, duration_ms, detail: _ } = content;
    Fields { ts: *ts, req_id, actor, action, args_hash, targets, rc, duration_ms: *duration_ms }
}

/// A 32-byte hash as 64 lowercase hexadecimal digits, as stored in `prev_hash` and `hash`.
pub fn to_hex(hash: &[u8; 32]) -> String {
    hex(hash).to_string()
}

/// [`to_hex`] without allocating, for binding to a statement.
pub fn hex(hash: &[u8; 32]) -> impl std::ops::Deref<Target = str> + std::fmt::Display {
    blake3::Hash::from_bytes(*hash).to_hex()
}

/// An audit record ready to be linked: the canonical JSON of its content, which is what the
/// chain hashes, what the stores keep (each column a member of it) and the `record` of the
/// record's `audit` log line.
///
/// Writing that text is most of the cost of linking a record. Preparing does it once, where the
/// record is made, so that the store's writer, which links records one after the other, only
/// hashes, and the log line needs no second serialisation. The text is the record's only
/// allocation: the members are read from it, so the appender, which frees records on another
/// thread than the one that made them, frees one block per record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prepared {
    canonical: String,
    ts: Timestamp,
    duration_ms: u64,
    members: Members,
}

impl Prepared {
    /// Prepares `content`. Its times and durations are first saturated as the stores keep
    /// them (both store 64-bit signed integers; a value past `i64::MAX` reads back as
    /// `u64::MAX`), so that the hash taken now is the hash of what verification reads later.
    pub fn new(content: NewAudit) -> Prepared {
        Prepared::build(fields_of(&content), |out| push_canonical_json(&content.detail, out))
    }

    /// Prepares the record of `fields` whose `detail` `write_detail` writes, without a
    /// [`NewAudit`] or a JSON value of the detail: for records made by the thousand.
    /// `write_detail` must write canonical JSON (keys sorted, no whitespace, as
    /// [`push_canonical_json`] does), or the record will not verify once stored; debug builds
    /// check that it does.
    pub fn build<T: AsRef<str>>(mut fields: Fields<'_, T>, write_detail: impl FnOnce(&mut String)) -> Prepared {
        fields.ts = Timestamp::from_millis(as_stored(fields.ts.as_millis()));
        fields.duration_ms = as_stored(fields.duration_ms);
        let (canonical, members) = write_canonical(&fields, write_detail);
        let record = Prepared { canonical, ts: fields.ts, duration_ms: fields.duration_ms, members };
        debug_assert_eq!(
            serde_json::from_str::<Value>(record.detail_json())
                .map(|detail| viworks_core::idempotency::canonical_json(&detail))
                .ok()
                .as_deref(),
            Some(record.detail_json()),
            "a record's detail must be written as canonical JSON"
        );
        record
    }

    /// The content, as it will read back from the store.
    pub fn content(&self) -> NewAudit {
        NewAudit {
            ts: self.ts,
            req_id: self.req_id().into_owned(),
            actor: self.actor().into_owned(),
            action: self.action().into_owned(),
            args_hash: self.args_hash().into_owned(),
            // The record's own text, written as JSON above: it always parses.
            targets: serde_json::from_str(self.targets_json()).unwrap_or_default(),
            rc: self.rc().into_owned(),
            duration_ms: self.duration_ms,
            detail: serde_json::from_str(self.detail_json()).unwrap_or(Value::Null),
        }
    }

    /// The canonical JSON of the content: keys sorted, no whitespace.
    pub fn canonical(&self) -> &str {
        &self.canonical
    }

    /// When it happened, as stored.
    pub fn ts(&self) -> Timestamp {
        self.ts
    }

    /// How long it took, as stored.
    pub fn duration_ms(&self) -> u64 {
        self.duration_ms
    }

    /// The API request, or the session, it belongs to.
    pub fn req_id(&self) -> Cow<'_, str> {
        self.string(&self.members.req_id)
    }

    /// Who did it.
    pub fn actor(&self) -> Cow<'_, str> {
        self.string(&self.members.actor)
    }

    /// What happened.
    pub fn action(&self) -> Cow<'_, str> {
        self.string(&self.members.action)
    }

    /// BLAKE3 of the canonical JSON of the arguments, hex.
    pub fn args_hash(&self) -> Cow<'_, str> {
        self.string(&self.members.args_hash)
    }

    /// The outcome.
    pub fn rc(&self) -> Cow<'_, str> {
        self.string(&self.members.rc)
    }

    /// The canonical JSON of the content's `targets`, as the stores keep that column.
    pub fn targets_json(&self) -> &str {
        self.canonical.get(self.members.targets.clone()).unwrap_or("[]")
    }

    /// The canonical JSON of the content's `detail`, as the stores keep that column.
    pub fn detail_json(&self) -> &str {
        self.canonical.get(self.members.detail.clone()).unwrap_or("null")
    }

    /// The string member at `at` (a JSON string, quotes included), unescaped: borrowed from the
    /// text unless it holds an escape.
    fn string(&self, at: &Range<usize>) -> Cow<'_, str> {
        let quoted = self.canonical.get(at.clone()).unwrap_or("\"\"");
        let inner = quoted.get(1..quoted.len().saturating_sub(1)).unwrap_or("");
        if !inner.contains('\\') {
            return Cow::Borrowed(inner);
        }
        // Written by `push_json_string`, so it parses.
        serde_json::from_str::<String>(quoted).map_or(Cow::Borrowed(inner), Cow::Owned)
    }

    /// The stored record this becomes at `link`.
    pub fn into_entry(self, link: Link) -> AuditEntry {
        AuditEntry { seq: link.seq, content: self.content(), prev_hash: to_hex(&link.prev), hash: to_hex(&link.hash) }
    }
}

/// A `u64` as it reads back from a store's signed 64-bit column.
fn as_stored(value: u64) -> u64 {
    if value >= i64::MAX.unsigned_abs() { u64::MAX } else { value }
}

/// Where a record joined the chain: its position, its predecessor's hash and its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Link {
    /// Position in the chain, from 1.
    pub seq: u64,
    /// The predecessor's hash ([`GENESIS`] for the first record).
    pub prev: [u8; 32],
    /// `blake3(prev || canonical JSON of the content)`.
    pub hash: [u8; 32],
}

/// The end of a stored chain: the record the next one links to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tip {
    seq: u64,
    hash: [u8; 32],
}

impl Tip {
    /// The tip of an empty chain: the first record gets `seq` 1 and the [`GENESIS`] hash.
    pub const EMPTY: Tip = Tip { seq: 0, hash: GENESIS };

    /// The tip whose last record is stored with `seq` and hex `hash`; the reason when those
    /// columns cannot be a record's.
    pub fn from_stored(seq: i64, hash: &str) -> Result<Tip, String> {
        let hash = blake3::Hash::from_hex(hash).map_err(|e| format!("hash of seq {seq}: {e}"))?;
        let seq = u64::try_from(seq).map_err(|_| format!("seq {seq} is negative"))?;
        Ok(Tip { seq, hash: hash.into() })
    }

    /// Links `record` after this tip, which it then becomes. Stores call this when appending,
    /// so the hash a store writes is by construction the one [`verify`] expects. Costs one
    /// BLAKE3 pass over the prepared text.
    pub fn link(&mut self, record: &Prepared) -> Link {
        let link =
            Link { seq: self.seq.saturating_add(1), prev: self.hash, hash: hash_after(&self.hash, &record.canonical) };
        *self = Tip { seq: link.seq, hash: link.hash };
        link
    }
}

/// Walks `entries`, which must be the whole chain in `seq` order, and reports the first record
/// whose link does not hold:
/// - its `seq` is not one more than its predecessor's (the first must be 1): a record was
///   removed, inserted or renumbered;
/// - its `prev_hash` is not its predecessor's hash (the [`GENESIS`] hash for the first);
/// - its `hash` does not follow from `prev_hash` and its content: the record was edited.
///
/// Removing records from the end leaves a shorter chain that is intact; anchor the latest
/// hash elsewhere (a SIEM receives every record) to detect that. Costs one [`link_hash`] per
/// record and constant memory, so a store can stream its rows through it.
pub fn verify<I: IntoIterator<Item = AuditEntry>>(entries: I) -> ChainVerdict {
    let mut prev = GENESIS;
    let mut expected: u64 = 1;
    let mut checked: u64 = 0;
    for entry in entries {
        if entry.seq != expected {
            let reason = format!("expected sequence number {expected}, found {}", entry.seq);
            return ChainVerdict::Broken { seq: entry.seq, reason };
        }
        let prev_hex = to_hex(&prev);
        if entry.prev_hash != prev_hex {
            let reason = format!("prev_hash {} is not the previous record's hash {prev_hex}", entry.prev_hash);
            return ChainVerdict::Broken { seq: entry.seq, reason };
        }
        let hash = link_hash(&prev, &entry.content);
        let hash_hex = to_hex(&hash);
        if entry.hash != hash_hex {
            let reason = format!("hash {} does not match the record's content (expected {hash_hex})", entry.hash);
            return ChainVerdict::Broken { seq: entry.seq, reason };
        }
        prev = hash;
        expected = expected.saturating_add(1);
        checked += 1;
    }
    ChainVerdict::Intact { entries: checked }
}

/// BLAKE3 of the canonical JSON of `args`, as 64 lowercase hexadecimal digits: the
/// `args_hash` of an audit record. Equal arguments give equal hashes whatever their key order.
/// Costs one pass over `args`; the JSON text is hashed as it is produced, never materialised.
pub fn args_hash(args: &Value) -> String {
    // `RequestDigest::of_json` is exactly plain BLAKE3 of `canonical_json(args)` (a test below
    // holds it to that), without building the text.
    RequestDigest::of_json(args).to_hex()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;
    use viworks_core::idempotency::canonical_json;

    fn content(n: u64) -> NewAudit {
        NewAudit {
            ts: Timestamp::from_millis(1_700_000_000_000 + n),
            req_id: format!("req-{n}"),
            actor: "admin".into(),
            action: "command.created".into(),
            args_hash: args_hash(&json!({ "n": n })),
            targets: vec![format!("gw-{n}"), "cmd-1".into()],
            rc: "202".into(),
            duration_ms: n,
            detail: json!({ "verb": "docker.ps", "n": n, "ratio": 0.5 }),
        }
    }

    fn chain(len: u64) -> Vec<AuditEntry> {
        let mut tip = Tip::EMPTY;
        (1..=len)
            .map(|seq| {
                let record = Prepared::new(content(seq));
                let link = tip.link(&record);
                record.into_entry(link)
            })
            .collect()
    }

    #[test]
    fn a_tip_links_in_sequence_and_reads_back_from_its_columns() {
        let mut tip = Tip::EMPTY;
        let links: Vec<Link> = (1..=3).map(|seq| tip.link(&Prepared::new(content(seq)))).collect();
        assert_eq!(links.iter().map(|l| l.seq).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(links[0].prev, GENESIS);
        assert_eq!(links[1].prev, links[0].hash);
        assert_eq!(links[2].hash, link_hash(&links[1].hash, &content(3)));
        let stored = Tip::from_stored(3, &to_hex(&links[2].hash)).expect("a valid tip");
        assert_eq!(stored, tip);
        assert!(Tip::from_stored(-1, &to_hex(&links[2].hash)).is_err());
        assert!(Tip::from_stored(3, "not hex").is_err());
    }

    #[test]
    fn a_prepared_record_reads_back_as_stored_and_its_text_is_its_canonical_json() {
        let mut far = content(1);
        far.ts = Timestamp::from_millis(u64::MAX - 1);
        far.duration_ms = i64::MAX.unsigned_abs();
        let record = Prepared::new(far);
        assert_eq!(record.content().ts, Timestamp::from_millis(u64::MAX));
        assert_eq!(record.content().duration_ms, u64::MAX);
        let value = serde_json::to_value(record.content()).expect("json");
        assert_eq!(record.canonical(), canonical_json(&value));
        assert_eq!(Prepared::new(content(2)).content(), content(2), "ordinary values are kept");
    }

    #[test]
    fn a_chain_built_by_link_verifies_intact() {
        assert_eq!(verify(chain(5)), ChainVerdict::Intact { entries: 5 });
        assert_eq!(verify(Vec::new()), ChainVerdict::Intact { entries: 0 });
        let first = &chain(1)[0];
        assert_eq!(first.prev_hash, "0".repeat(64));
    }

    #[test]
    fn the_hash_is_blake3_of_prev_and_canonical_json() {
        let c = content(1);
        let prev = [7u8; 32];
        let canonical = canonical_json(&serde_json::to_value(&c).expect("json"));
        let mut bytes = prev.to_vec();
        bytes.extend_from_slice(canonical.as_bytes());
        assert_eq!(link_hash(&prev, &c), *blake3::hash(&bytes).as_bytes());
        assert_ne!(link_hash(&GENESIS, &c), link_hash(&prev, &c), "the predecessor is covered");
    }

    #[test]
    fn an_edited_record_breaks_at_that_record() {
        let mut entries = chain(4);
        entries[1].content.actor = "mallory".into();
        assert!(matches!(verify(entries), ChainVerdict::Broken { seq: 2, .. }));
    }

    #[test]
    fn a_recomputed_hash_breaks_at_the_next_record() {
        let mut entries = chain(4);
        entries[1].content.rc = "500".into();
        let mut tip = Tip::from_stored(1, &entries[0].hash).expect("tip");
        let record = Prepared::new(entries[1].content.clone());
        entries[1] = record.clone().into_entry(tip.link(&record));
        assert!(matches!(verify(entries), ChainVerdict::Broken { seq: 3, .. }));
    }

    #[test]
    fn a_gap_a_wrong_start_or_a_wrong_prev_hash_is_reported() {
        let mut gap = chain(4);
        gap.remove(2);
        assert!(matches!(verify(gap), ChainVerdict::Broken { seq: 4, .. }));

        let headless: Vec<_> = chain(3).into_iter().skip(1).collect();
        assert!(matches!(verify(headless), ChainVerdict::Broken { seq: 2, .. }));

        let mut relinked = chain(3);
        relinked[2].prev_hash = relinked[0].hash.clone();
        let verdict = verify(relinked);
        assert!(
            matches!(&verdict, ChainVerdict::Broken { seq: 3, reason } if reason.contains("prev_hash")),
            "{verdict:?}"
        );
    }

    #[test]
    fn args_hash_ignores_key_order_and_is_blake3_of_canonical_json() {
        let a: Value = serde_json::from_str(r#"{"b":[1,{"y":2,"x":1}],"a":"z"}"#).expect("json");
        let b: Value = serde_json::from_str(r#"{ "a": "z", "b": [1, {"x": 1, "y": 2}] }"#).expect("json");
        assert_eq!(args_hash(&a), args_hash(&b));
        assert_eq!(args_hash(&a), blake3::hash(canonical_json(&a).as_bytes()).to_hex().to_string());
        assert_ne!(args_hash(&a), args_hash(&json!({ "a": "z" })));
        assert_eq!(args_hash(&a).len(), 64);
    }

    fn any_text() -> impl Strategy<Value = String> {
        prop_oneof![".*", "[a-z._-]{0,12}", "[\"\\\\\u{0}-\u{1f}é€😀]{0,6}"]
    }

    fn any_detail() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
            any_text().prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map(any_text(), inner, 0..4)
                    .prop_map(|map| Value::Object(map.into_iter().collect())),
            ]
        })
    }

    prop_compose! {
        fn any_content()(
            ts in any::<u64>(),
            req_id in any_text(),
            actor in any_text(),
            action in any_text(),
            args_hash in any_text(),
            targets in proptest::collection::vec(any_text(), 0..4),
            rc in any_text(),
            duration_ms in any::<u64>(),
            detail in any_detail(),
        ) -> NewAudit {
            NewAudit { ts: Timestamp::from_millis(ts), req_id, actor, action, args_hash, targets, rc, duration_ms, detail }
        }
    }

    proptest! {
        #[test]
        fn the_canonical_content_is_the_canonical_json_of_the_record(content in any_content()) {
            let value = serde_json::to_value(&content).expect("a record is JSON");
            let record = Prepared::new(content.clone());
            prop_assert_eq!(canonical_content(&content), canonical_json(&value));
            prop_assert_eq!(record.detail_json(), canonical_json(&value["detail"]));
            prop_assert_eq!(record.targets_json(), canonical_json(&value["targets"]));
            let mut stored = content;
            stored.ts = Timestamp::from_millis(as_stored(stored.ts.as_millis()));
            stored.duration_ms = as_stored(stored.duration_ms);
            prop_assert_eq!(record.content(), stored, "every member reads back from the text");
        }

        #[test]
        fn any_edited_field_breaks_the_chain_at_that_record(len in 1u64..8, at in 0u64..8, field in 0u8..6) {
            let at = at % len;
            let mut entries = chain(len);
            let target = &mut entries[usize::try_from(at).expect("small")].content;
            match field {
                0 => target.actor.push('x'),
                1 => target.ts = Timestamp::from_millis(target.ts.as_millis() + 1),
                2 => target.targets.push("extra".into()),
                3 => target.duration_ms += 1,
                4 => target.detail = json!({ "verb": "docker.ps" }),
                _ => target.action = "token.created".into(),
            }
            let broken_there = matches!(verify(entries), ChainVerdict::Broken { seq, .. } if seq == at + 1);
            prop_assert!(broken_there);
        }
    }
}

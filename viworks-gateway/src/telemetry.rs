//! Telemetry: samples of the machine's state every interval, buffered while disconnected.
//!
//! [`samples`] turns one [`Snapshot`] into keyed samples; [`TelemetryBuffer`] holds them,
//! bounded, until the host acknowledges the batch that carried them.

use std::collections::{BTreeSet, VecDeque};

use viworks_core::Timestamp;
use viworks_core::wire::{MetricKey, Sample, Telemetry};

use crate::executor::{ContainerCounts, Snapshot};

/// Disks, and separately network interfaces, reported per snapshot at most; a machine with
/// thousands of mounts (containers, snaps) must not flood the buffer.
pub const MAX_DISKS: usize = 64;

/// See [`MAX_DISKS`].
pub const MAX_NETWORKS: usize = 64;

/// The most samples one `telemetry` message may carry (the host refuses more).
pub const MAX_BATCH_SAMPLES: usize = 10_000;

/// The samples of one snapshot: CPU, memory, disk, load and container counts, keyed as
/// documented in `docs/protocol.md`.
///
/// Keys: `cpu.usage_pct`, `load.1m`, `load.5m`, `load.15m`, `mem.used_bytes`,
/// `mem.total_bytes`, `mem.used_pct`, `swap.used_bytes`, `uptime.secs`,
/// `disk:<mount>.used_bytes`, `disk:<mount>.used_pct`, `net:<iface>.rx_bytes`,
/// `net:<iface>.tx_bytes`, and with `containers` `containers.running`, `containers.paused`,
/// `containers.stopped`. Never fails: a value that is not finite (a percentage of zero) is
/// left out, and so is a disk or interface whose name is empty, cannot form a valid
/// [`MetricKey`] or repeats one already seen. At most [`MAX_DISKS`] disks and
/// [`MAX_NETWORKS`] interfaces are reported, the first ones listed.
pub fn samples(now: Timestamp, snapshot: &Snapshot, containers: Option<ContainerCounts>) -> Vec<Sample> {
    let mut out = Samples { ts: now, samples: Vec::new() };
    out.push("cpu.usage_pct", snapshot.cpu_percent);
    for (key, load) in ["load.1m", "load.5m", "load.15m"].into_iter().zip(snapshot.load) {
        out.push(key, load);
    }
    out.push("mem.used_bytes", value_of(snapshot.memory_used_bytes));
    out.push("mem.total_bytes", value_of(snapshot.memory_total_bytes));
    out.push("mem.used_pct", percent(snapshot.memory_used_bytes, snapshot.memory_total_bytes));
    out.push("swap.used_bytes", value_of(snapshot.swap_used_bytes));
    out.push("uptime.secs", value_of(snapshot.uptime_secs));

    let mut seen = BTreeSet::new();
    let disks = snapshot.disks.iter().filter(|disk| !disk.mount.is_empty()).filter_map(|disk| {
        let used_bytes = MetricKey::new(format!("disk:{}.used_bytes", disk.mount)).ok()?;
        let used_pct = MetricKey::new(format!("disk:{}.used_pct", disk.mount)).ok()?;
        seen.insert(disk.mount.as_str()).then_some((disk, used_bytes, used_pct))
    });
    for (disk, used_bytes, used_pct) in disks.take(MAX_DISKS) {
        let used = disk.total_bytes.saturating_sub(disk.available_bytes);
        out.push_key(used_bytes, value_of(used));
        out.push_key(used_pct, percent(used, disk.total_bytes));
    }

    let mut seen = BTreeSet::new();
    let networks = snapshot.networks.iter().filter(|net| !net.interface.is_empty()).filter_map(|net| {
        let rx = MetricKey::new(format!("net:{}.rx_bytes", net.interface)).ok()?;
        let tx = MetricKey::new(format!("net:{}.tx_bytes", net.interface)).ok()?;
        seen.insert(net.interface.as_str()).then_some((net, rx, tx))
    });
    for (net, rx, tx) in networks.take(MAX_NETWORKS) {
        out.push_key(rx, value_of(net.rx_bytes));
        out.push_key(tx, value_of(net.tx_bytes));
    }

    if let Some(counts) = containers {
        out.push("containers.running", value_of(counts.running));
        out.push("containers.paused", value_of(counts.paused));
        out.push("containers.stopped", value_of(counts.stopped));
    }
    out.samples
}

/// Samples of one timestamp being collected.
struct Samples {
    ts: Timestamp,
    samples: Vec<Sample>,
}

impl Samples {
    /// Adds a sample under a fixed key (valid by construction; a test checks every one).
    fn push(&mut self, key: &str, value: f64) {
        if let Ok(key) = MetricKey::new(key) {
            self.push_key(key, value);
        }
    }

    /// Adds a sample unless its value is not finite (encoding refuses NaN and infinities).
    fn push_key(&mut self, key: MetricKey, value: f64) {
        if value.is_finite() {
            self.samples.push(Sample { ts: self.ts, key, value });
        }
    }
}

/// A count as a sample value; exact up to 2^53 (8 PiB of bytes), rounded beyond.
fn value_of(n: u64) -> f64 {
    n as f64
}

/// `part` as a percentage of `whole`; NaN (left out) when `whole` is zero.
fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 { f64::NAN } else { part as f64 / whole as f64 * 100.0 }
}

/// Samples waiting to be sent: bounded, oldest dropped first, every drop counted and
/// reported in the next batch; one batch in flight at a time.
///
/// At most `capacity` samples wait, plus the batch in flight (itself taken from them). The
/// lifecycle, driven by the agent's loop:
///
/// ```text
///   push ──▶ waiting ──next_batch──▶ in flight ──on_acked──▶ gone
///               ▲                        │
///               └──── on_disconnected ───┘ (back at the front; overflow drops the oldest)
/// ```
#[derive(Debug)]
pub struct TelemetryBuffer {
    /// Oldest first; never longer than `capacity`.
    waiting: VecDeque<Sample>,
    in_flight: Option<InFlight>,
    capacity: usize,
    next_batch_id: u64,
    dropped_total: u64,
    /// Drops not yet carried by a batch.
    unreported: u64,
}

/// A batch sent and not yet acknowledged.
#[derive(Debug)]
struct InFlight {
    batch_id: u64,
    samples: Vec<Sample>,
    /// The drops this batch reports; they count as unreported again if it is never acked.
    dropped: u64,
}

impl TelemetryBuffer {
    /// An empty buffer of at most `capacity` samples whose first batch is `first_batch_id`.
    /// A capacity of zero is raised to one.
    pub fn new(capacity: usize, first_batch_id: u64) -> TelemetryBuffer {
        TelemetryBuffer {
            waiting: VecDeque::new(),
            in_flight: None,
            capacity: capacity.max(1),
            next_batch_id: first_batch_id,
            dropped_total: 0,
            unreported: 0,
        }
    }

    /// Adds samples, dropping the oldest when full.
    pub fn push(&mut self, samples: Vec<Sample>) {
        // Samples that would be dropped at once are never copied in: of a push larger than
        // the capacity only the newest `capacity` can stay.
        let skip = samples.len().saturating_sub(self.capacity);
        self.count_dropped(skip);
        self.waiting.extend(samples.into_iter().skip(skip));
        self.trim();
    }

    /// The next batch of at most `max_samples` (raised to 1, capped at
    /// [`MAX_BATCH_SAMPLES`]), unless one is in flight or nothing waits. The batch stays in
    /// flight until [`on_acked`](Self::on_acked) or [`on_disconnected`](Self::on_disconnected);
    /// it reports the drops since the previous batch.
    pub fn next_batch(&mut self, max_samples: usize) -> Option<Telemetry> {
        if self.in_flight.is_some() || self.waiting.is_empty() {
            return None;
        }
        let take = max_samples.clamp(1, MAX_BATCH_SAMPLES).min(self.waiting.len());
        let samples: Vec<Sample> = self.waiting.drain(..take).collect();
        let batch_id = self.next_batch_id;
        self.next_batch_id = self.next_batch_id.wrapping_add(1);
        let dropped = std::mem::take(&mut self.unreported);
        self.in_flight = Some(InFlight { batch_id, samples: samples.clone(), dropped });
        Some(Telemetry { batch_id, samples, dropped })
    }

    /// The host stored batch `batch_id`. An id other than the batch in flight's (late, or
    /// from an earlier session) is ignored.
    pub fn on_acked(&mut self, batch_id: u64) {
        if self.in_flight.as_ref().is_some_and(|batch| batch.batch_id == batch_id) {
            self.in_flight = None;
        }
    }

    /// The session ended: a batch in flight goes back to the front, to be sent again.
    ///
    /// Its drop count is reported again with the next batch, which gets a new id. If the
    /// samples no longer fit, the oldest are dropped and counted.
    pub fn on_disconnected(&mut self) {
        let Some(batch) = self.in_flight.take() else { return };
        self.unreported = self.unreported.saturating_add(batch.dropped);
        // The batch was taken from the front, so its samples are older than any waiting.
        let room = self.capacity.saturating_sub(self.waiting.len());
        let skip = batch.samples.len().saturating_sub(room);
        self.count_dropped(skip);
        for sample in batch.samples.into_iter().skip(skip).rev() {
            self.waiting.push_front(sample);
        }
    }

    /// Samples waiting, the batch in flight included.
    pub fn len(&self) -> usize {
        self.waiting.len() + self.in_flight.as_ref().map_or(0, |batch| batch.samples.len())
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Samples dropped since start because the buffer was full.
    pub fn dropped_total(&self) -> u64 {
        self.dropped_total
    }

    /// The id of the batch waiting for its acknowledgement, if any.
    pub fn in_flight(&self) -> Option<u64> {
        self.in_flight.as_ref().map(|batch| batch.batch_id)
    }

    /// The most samples that wait outside a batch in flight.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Drops the oldest waiting samples beyond the capacity.
    fn trim(&mut self) {
        let excess = self.waiting.len().saturating_sub(self.capacity);
        self.waiting.drain(..excess);
        self.count_dropped(excess);
    }

    fn count_dropped(&mut self, n: usize) {
        let n = u64::try_from(n).unwrap_or(u64::MAX);
        self.dropped_total = self.dropped_total.saturating_add(n);
        self.unreported = self.unreported.saturating_add(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::executor::system::{DiskUsage, NetworkUsage};

    fn at(ms: u64) -> Timestamp {
        Timestamp::from_millis(1_700_000_000_000 + ms)
    }

    /// `n` distinct samples numbered from `from`, their value their number.
    fn numbered(from: u64, n: u64) -> Vec<Sample> {
        (from..from + n)
            .map(|i| Sample { ts: at(i), key: MetricKey::new("cpu.usage_pct").expect("key"), value: i as f64 })
            .collect()
    }

    fn values(samples: &[Sample]) -> Vec<u64> {
        samples.iter().map(|s| s.value as u64).collect()
    }

    fn snapshot() -> Snapshot {
        Snapshot {
            cpu_percent: 12.5,
            cpu_count: 4,
            load: [0.5, 0.25, 0.125],
            memory_total_bytes: 8_000,
            memory_used_bytes: 2_000,
            swap_total_bytes: 1_000,
            swap_used_bytes: 10,
            uptime_secs: 86_400,
            disks: vec![
                DiskUsage { mount: "/".into(), total_bytes: 1_000, available_bytes: 250 },
                DiskUsage { mount: "/var/lib/docker".into(), total_bytes: 0, available_bytes: 0 },
            ],
            networks: vec![NetworkUsage { interface: "eth0".into(), rx_bytes: 5, tx_bytes: 7 }],
        }
    }

    fn value(samples: &[Sample], key: &str) -> Option<f64> {
        samples.iter().find(|s| s.key.as_str() == key).map(|s| s.value)
    }

    #[test]
    fn samples_cover_the_snapshot_under_the_documented_keys() {
        let counts = ContainerCounts { running: 3, paused: 1, stopped: 2 };
        let samples = samples(at(0), &snapshot(), Some(counts));
        let expected = [
            ("cpu.usage_pct", 12.5),
            ("load.1m", 0.5),
            ("load.5m", 0.25),
            ("load.15m", 0.125),
            ("mem.used_bytes", 2_000.0),
            ("mem.total_bytes", 8_000.0),
            ("mem.used_pct", 25.0),
            ("swap.used_bytes", 10.0),
            ("uptime.secs", 86_400.0),
            ("disk:/.used_bytes", 750.0),
            ("disk:/.used_pct", 75.0),
            ("disk:/var/lib/docker.used_bytes", 0.0),
            ("net:eth0.rx_bytes", 5.0),
            ("net:eth0.tx_bytes", 7.0),
            ("containers.running", 3.0),
            ("containers.paused", 1.0),
            ("containers.stopped", 2.0),
        ];
        for (key, want) in expected {
            assert_eq!(value(&samples, key), Some(want), "{key}");
        }
        assert_eq!(samples.len(), expected.len(), "a zero-sized disk has no percentage");
        assert!(samples.iter().all(|s| s.ts == at(0)));
        let telemetry = Telemetry { batch_id: 1, samples, dropped: 0 };
        serde_json::to_string(&telemetry).expect("every sample encodes");
    }

    #[test]
    fn samples_leave_out_container_counts_when_unknown() {
        let samples = samples(at(0), &snapshot(), None);
        assert!(samples.iter().all(|s| !s.key.as_str().starts_with("containers.")));
    }

    #[test]
    fn samples_skip_non_finite_values_and_unusable_names() {
        let mut snapshot = snapshot();
        snapshot.cpu_percent = f64::NAN;
        snapshot.load = [f64::INFINITY, f64::NEG_INFINITY, 1.0];
        snapshot.memory_total_bytes = 0;
        snapshot.disks = vec![
            DiskUsage { mount: "/mnt/My Drive".into(), total_bytes: 10, available_bytes: 5 },
            DiskUsage { mount: "/média".into(), total_bytes: 10, available_bytes: 5 },
            DiskUsage { mount: format!("/{}", "x".repeat(200)), total_bytes: 10, available_bytes: 5 },
            DiskUsage { mount: "/".into(), total_bytes: 10, available_bytes: 5 },
            DiskUsage { mount: "/".into(), total_bytes: 99, available_bytes: 0 },
        ];
        snapshot.networks = vec![
            NetworkUsage { interface: "".into(), rx_bytes: 1, tx_bytes: 1 },
            NetworkUsage { interface: "wg 0".into(), rx_bytes: 1, tx_bytes: 1 },
            NetworkUsage { interface: "veth1a2b@if3".into(), rx_bytes: 1, tx_bytes: 1 },
            NetworkUsage { interface: "br-1234".into(), rx_bytes: 1, tx_bytes: 1 },
        ];
        let samples = samples(at(0), &snapshot, None);
        assert!(samples.iter().all(|s| s.value.is_finite()));
        assert!(samples.iter().all(|s| MetricKey::new(s.key.as_str()).is_ok()));
        assert_eq!(value(&samples, "cpu.usage_pct"), None);
        assert_eq!(value(&samples, "load.15m"), Some(1.0));
        assert_eq!(value(&samples, "mem.used_pct"), None);
        let disks: Vec<&str> = samples.iter().map(|s| s.key.as_str()).filter(|k| k.starts_with("disk:")).collect();
        assert_eq!(disks, ["disk:/.used_bytes", "disk:/.used_pct"], "the first of a repeated mount wins");
        assert_eq!(value(&samples, "disk:/.used_pct"), Some(50.0));
        let nets: Vec<&str> = samples.iter().map(|s| s.key.as_str()).filter(|k| k.starts_with("net:")).collect();
        assert_eq!(nets, ["net:br-1234.rx_bytes", "net:br-1234.tx_bytes"]);
    }

    #[test]
    fn samples_cap_disks_and_interfaces() {
        let mut snapshot = snapshot();
        snapshot.disks =
            (0..500).map(|i| DiskUsage { mount: format!("/srv/{i}"), total_bytes: 10, available_bytes: 5 }).collect();
        snapshot.networks =
            (0..500).map(|i| NetworkUsage { interface: format!("veth{i}"), rx_bytes: 1, tx_bytes: 1 }).collect();
        let samples = samples(at(0), &snapshot, None);
        let disks = samples.iter().filter(|s| s.key.as_str().starts_with("disk:")).count();
        let nets = samples.iter().filter(|s| s.key.as_str().starts_with("net:")).count();
        assert_eq!((disks, nets), (2 * MAX_DISKS, 2 * MAX_NETWORKS));
    }

    #[test]
    fn overflow_drops_the_oldest_and_counts_them() {
        let mut buffer = TelemetryBuffer::new(4, 1);
        buffer.push(numbered(0, 3));
        buffer.push(numbered(3, 3));
        assert_eq!(buffer.len(), 4);
        assert_eq!(buffer.dropped_total(), 2);
        let batch = buffer.next_batch(100).expect("batch");
        assert_eq!(values(&batch.samples), [2, 3, 4, 5]);
        assert_eq!(batch.dropped, 2);

        // A single push larger than the whole buffer keeps its newest samples.
        let mut buffer = TelemetryBuffer::new(3, 1);
        buffer.push(numbered(0, 10));
        assert_eq!(buffer.dropped_total(), 7);
        assert_eq!(values(&buffer.next_batch(100).expect("batch").samples), [7, 8, 9]);
    }

    #[test]
    fn drops_are_reported_once() {
        let mut buffer = TelemetryBuffer::new(2, 1);
        buffer.push(numbered(0, 5));
        let first = buffer.next_batch(1).expect("batch");
        assert_eq!(first.dropped, 3);
        buffer.on_acked(first.batch_id);
        let second = buffer.next_batch(1).expect("batch");
        assert_eq!(second.dropped, 0, "already reported");
        assert_eq!(buffer.dropped_total(), 3, "the total stays");
    }

    #[test]
    fn one_batch_in_flight_until_acked_and_ids_increase() {
        let mut buffer = TelemetryBuffer::new(100, 41);
        assert!(buffer.next_batch(10).is_none(), "nothing waits");
        buffer.push(numbered(0, 25));
        let first = buffer.next_batch(10).expect("batch");
        assert_eq!((first.batch_id, first.samples.len()), (41, 10));
        assert!(buffer.next_batch(10).is_none(), "one in flight");
        assert_eq!(buffer.len(), 25, "the batch in flight still counts");
        buffer.on_acked(40);
        buffer.on_acked(42);
        assert!(buffer.next_batch(10).is_none(), "other ids are ignored");
        buffer.on_acked(41);
        assert_eq!(buffer.len(), 15);
        let second = buffer.next_batch(10).expect("batch");
        assert_eq!(second.batch_id, 42);
        assert_eq!(values(&second.samples), (10..20).collect::<Vec<_>>());
        buffer.on_acked(42);
        let third = buffer.next_batch(0).expect("a batch of at least one");
        assert_eq!((third.batch_id, third.samples.len()), (43, 1));
        buffer.on_acked(43);
        buffer.on_acked(43);
        assert_eq!(buffer.len(), 4);
    }

    #[test]
    fn a_disconnect_requeues_the_batch_in_flight_at_the_front_in_order() {
        let mut buffer = TelemetryBuffer::new(100, 1);
        buffer.push(numbered(0, 6));
        let first = buffer.next_batch(4).expect("batch");
        buffer.push(numbered(6, 2));
        buffer.on_disconnected();
        assert_eq!(buffer.len(), 8);
        buffer.on_acked(first.batch_id);
        assert_eq!(buffer.len(), 8, "a late ack of the old batch changes nothing");
        let again = buffer.next_batch(100).expect("batch");
        assert_eq!(values(&again.samples), (0..8).collect::<Vec<_>>());
        assert_eq!(again.batch_id, first.batch_id + 1, "ids are not reused");
        buffer.on_disconnected();
        buffer.on_disconnected();
        assert_eq!(buffer.len(), 8, "a second disconnect requeues nothing more");
    }

    #[test]
    fn a_requeued_batch_carries_its_drop_count_again_and_overflow_drops_its_oldest() {
        let mut buffer = TelemetryBuffer::new(4, 1);
        buffer.push(numbered(0, 6));
        let first = buffer.next_batch(3).expect("batch");
        assert_eq!((values(&first.samples), first.dropped), (vec![2, 3, 4], 2));
        buffer.push(numbered(6, 2));
        buffer.on_disconnected();
        // Waiting: 5, 6, 7; the batch's 2, 3, 4 go in front, and the oldest two no longer fit.
        assert_eq!(buffer.len(), 4);
        assert_eq!(buffer.dropped_total(), 4);
        let again = buffer.next_batch(100).expect("batch");
        assert_eq!(values(&again.samples), [4, 5, 6, 7]);
        assert_eq!(again.dropped, 4, "the two reported by the lost batch and the two just dropped");
    }

    #[test]
    fn the_buffer_stays_bounded_through_a_long_disconnect() {
        let mut buffer = TelemetryBuffer::new(1_000, 1);
        let mut pushed = 0;
        for round in 0..10_000u64 {
            buffer.push(numbered(round * 20, 20));
            pushed += 20;
            if round % 7 == 0 {
                let _ = buffer.next_batch(300);
            }
            if round % 11 == 0 {
                buffer.on_disconnected();
            }
            assert!(buffer.waiting.len() <= buffer.capacity());
            assert!(buffer.len() <= 2 * buffer.capacity());
        }
        buffer.on_disconnected();
        assert_eq!(buffer.len(), 1_000);
        assert_eq!(buffer.dropped_total(), pushed - 1_000, "every sample is either kept or counted");
        let batch = buffer.next_batch(MAX_BATCH_SAMPLES).expect("batch");
        assert_eq!(values(&batch.samples), (pushed - 1_000..pushed).collect::<Vec<_>>(), "the newest survive");
        assert!(buffer.next_batch(MAX_BATCH_SAMPLES).is_none());
    }

    #[test]
    fn a_zero_capacity_holds_one_sample() {
        let mut buffer = TelemetryBuffer::new(0, 1);
        buffer.push(numbered(0, 2));
        assert_eq!((buffer.len(), buffer.dropped_total()), (1, 1));
        assert!(!buffer.is_empty());
    }
}

//! The fingerprint index of the nonce cache: which fingerprints are live, and until when.
//!
//! One bucket is one 64-byte cache line holding five (fingerprint, expiry) slots, so a check
//! and the insert that follows it touch one line of memory in the common case. Expiry is
//! lazy: a slot whose expiry has passed is free, so forgetting a nonce never touches the
//! table. A bucket that was full when an entry had to go further remembers, in `overflow`,
//! the latest expiry of the entries that went past it; lookups continue to the next bucket
//! only while that is still in the future.
//!
//! Times are 32-bit offsets from an origin the owner chooses ([`NonceTable::rebuild`] moves
//! it); the owner keeps every offset it passes in below `u32::MAX`, and a saturated expiry
//! of `u32::MAX` means "not before the owner's next rebuild".

/// Slots per bucket: five fingerprints (40 bytes), five expiries (20 bytes) and the overflow
/// mark (4 bytes) fill one cache line.
const SLOTS: usize = 5;

#[derive(Clone, Copy, Debug, Default)]
#[repr(C, align(64))]
struct Bucket {
    fingerprints: [u64; SLOTS],
    expiries: [u32; SLOTS],
    /// Entries whose probe passed this bucket live until at most this time.
    overflow: u32,
}

/// Where a fingerprint that is not live can be stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Vacancy {
    bucket: usize,
    slot: usize,
}

/// What a lookup found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Lookup {
    /// The fingerprint is live.
    Live,
    /// The fingerprint is not live; the first free slot on its probe path, if the lookup saw
    /// one.
    Absent(Option<Vacancy>),
}

#[derive(Debug)]
pub(crate) struct NonceTable {
    buckets: Box<[Bucket]>,
    mask: usize,
}

impl NonceTable {
    /// A table with room for at least `2 * capacity` slots, in a power of two of buckets.
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        let buckets = capacity.saturating_mul(2).div_ceil(SLOTS).max(2).next_power_of_two();
        NonceTable { buckets: vec![Bucket::default(); buckets].into_boxed_slice(), mask: buckets - 1 }
    }

    /// Bytes held by the table; fixed at construction.
    pub(crate) fn allocated_bytes(&self) -> usize {
        std::mem::size_of_val(&*self.buckets)
    }

    fn home(&self, fingerprint: u64) -> usize {
        // Truncation is intended: fingerprints are uniform, so are their low bits.
        (fingerprint as usize) & self.mask
    }

    /// Whether `fingerprint` is live at `now` (its expiry not before `now`).
    ///
    /// `fingerprint` must not be 0, the mark of a slot never used.
    #[inline]
    pub(crate) fn lookup(&self, fingerprint: u64, now: u32) -> Lookup {
        debug_assert_ne!(fingerprint, 0);
        let mut vacancy = None;
        let mut b = self.home(fingerprint);
        for _ in 0..self.buckets.len() {
            let bucket = &self.buckets[b];
            // Bit masks over the slots, computed without branches.
            let (mut free, mut same) = (0u32, 0u32);
            for slot in 0..SLOTS {
                free |= u32::from(bucket.expiries[slot] < now) << slot;
                same |= u32::from(bucket.fingerprints[slot] == fingerprint) << slot;
            }
            if same & !free != 0 {
                return Lookup::Live;
            }
            if free != 0 && vacancy.is_none() {
                vacancy = Some(Vacancy { bucket: b, slot: free.trailing_zeros() as usize });
            }
            // Nothing that probed past this bucket is still live: the search ends here.
            if bucket.overflow < now {
                break;
            }
            b = (b + 1) & self.mask;
        }
        Lookup::Absent(vacancy)
    }

    /// Stores `fingerprint`, live until `expires`, in `vacancy` when given (from a
    /// [`lookup`](Self::lookup) at the same `now` with no change in between), otherwise in the
    /// first free slot on its probe path. Returns false, storing nothing, only when no slot is
    /// free at all, which the owner rules out by holding fewer live entries than slots.
    #[inline]
    pub(crate) fn insert(&mut self, fingerprint: u64, expires: u32, now: u32, vacancy: Option<Vacancy>) -> bool {
        let home = self.home(fingerprint);
        let Some(Vacancy { bucket, slot }) = vacancy.or_else(|| self.vacancy(home, now)) else {
            return false;
        };
        // Every bucket between home and the one used was passed: mark it, so that lookups go on.
        let mut b = home;
        while b != bucket {
            let overflow = &mut self.buckets[b].overflow;
            *overflow = (*overflow).max(expires);
            b = (b + 1) & self.mask;
        }
        let target = &mut self.buckets[bucket];
        target.fingerprints[slot] = fingerprint;
        target.expiries[slot] = expires;
        true
    }

    fn vacancy(&self, home: usize, now: u32) -> Option<Vacancy> {
        let mut b = home;
        for _ in 0..self.buckets.len() {
            if let Some(slot) = self.buckets[b].expiries.iter().position(|&expires| expires < now) {
                return Some(Vacancy { bucket: b, slot });
            }
            b = (b + 1) & self.mask;
        }
        None
    }

    /// Forgets everything, so that the owner can insert its live entries again under a new
    /// time origin.
    pub(crate) fn clear(&mut self) {
        self.buckets.fill(Bucket::default());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    #[test]
    fn a_bucket_is_one_cache_line() {
        assert_eq!(std::mem::size_of::<Bucket>(), 64);
        assert_eq!(std::mem::align_of::<Bucket>(), 64);
    }

    proptest! {
        #[test]
        fn agrees_with_a_map_of_expiries(
            capacity in 1usize..40,
            ops in proptest::collection::vec((1u64..60, 0u32..20, 0u32..3), 0..400),
        ) {
            let mut table = NonceTable::with_capacity(capacity);
            // Few distinct fingerprints, many sharing a home bucket, so probes overflow.
            let fingerprint = |k: u64| (k % 7) | (k << 20);
            let mut model: HashMap<u64, u32> = HashMap::new();
            let mut now = 1u32;
            for (k, lifetime, advance) in ops {
                now += advance;
                let fp = fingerprint(k);
                let live_in_model = model.get(&fp).is_some_and(|&until| until >= now);
                let found = table.lookup(fp, now);
                prop_assert_eq!(found == Lookup::Live, live_in_model);
                let live = model.values().filter(|&&until| until >= now).count();
                if let Lookup::Absent(vacancy) = found {
                    if live < capacity {
                        prop_assert!(table.insert(fp, now + lifetime, now, vacancy));
                        model.insert(fp, now + lifetime);
                    }
                }
            }
            for (&fp, &until) in &model {
                prop_assert_eq!(table.lookup(fp, now) == Lookup::Live, until >= now);
            }
        }
    }
}

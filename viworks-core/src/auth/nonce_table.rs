//! The fingerprint index of the nonce cache: where among the nonces the cache holds to look
//! for a given fingerprint.
//!
//! The table is split in two by how it is used. The hot part, read by every check, keeps a
//! 16-bit fragment of each fingerprint, 30 to a 64-byte bucket, with the bucket's counts; the
//! cold part keeps, for each slot, where the owner holds the nonce (its position in the
//! owner's ring). A check reads one hot bucket; it reads the cold part only when a held
//! fragment agrees with its own, about once in 2^16 slots, and then the owner compares the
//! whole fingerprint. An insert writes one cold slot without reading it, which the processor
//! completes in the background: only the hot part, 2.7 bytes per nonce, is read at random.
//!
//! A bucket's slots are filled in turn from a cursor, and the owner releases its nonces in
//! arrival order, so a bucket's held entries are always the `held` slots before its cursor,
//! oldest first, and releasing one is a decrement. An entry whose home bucket is full goes to
//! the next bucket with room, and counts itself in `passed` in every bucket it went past; a
//! lookup goes on to the next bucket only while the current one has been passed by a held
//! entry. With at most four nonces for five slots, most lookups read their home bucket alone
//! (four in five with the table 70 % full) and the rest mostly the next one, adjacent in
//! memory.

/// Fragments per bucket: thirty 2-byte fragments and the counts fill one cache line.
const SLOTS: usize = 30;
/// Where a bucket keeps `held` (low byte) and `cursor` (high byte).
const COUNTS: usize = SLOTS;
/// Where a bucket keeps `passed`.
const PASSED: usize = SLOTS + 1;

/// The bits of the slots in a mask over a bucket's words.
const SLOT_MASK: u32 = (1 << SLOTS) - 1;

/// Nonces per slot at full capacity, as a fraction: the table is at most four fifths full.
const LOAD_NUM: usize = 4;
const LOAD_DEN: usize = 5;

/// The largest capacity: positions in the owner's ring are kept as `u32`.
pub(crate) const MAX_CAPACITY: usize = u32::MAX as usize;

/// The hot part of a bucket: `SLOTS` fingerprint fragments, then the counts.
///
/// Word `COUNTS` holds `held`, the entries held in this bucket, in its low byte and
/// `cursor`, the slot the next entry goes to, in its high byte; the held entries are the
/// `held` slots before the cursor. Word `PASSED` counts the held entries whose probe went
/// past this bucket; it sticks at `u16::MAX` rather than wrap, which only makes lookups go on
/// further than they need.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C, align(64))]
struct Bucket {
    words: [u16; SLOTS + 2],
}

impl Bucket {
    fn held(&self) -> usize {
        usize::from(self.words[COUNTS] & 0xff)
    }

    fn cursor(&self) -> usize {
        usize::from(self.words[COUNTS] >> 8)
    }

    fn passed(&self) -> u16 {
        self.words[PASSED]
    }

    /// The slots holding entries, as a bit mask: the `held` slots before the cursor.
    fn held_slots(&self) -> u32 {
        let (held, cursor) = (self.held() as u32, self.cursor() as u32);
        let run = (1u32 << held) - 1;
        // The run ends just before the cursor, wrapping around the slots.
        let start = (cursor + SLOTS as u32 - held) % SLOTS as u32;
        ((run << start) | (run >> (SLOTS as u32 - start))) & SLOT_MASK
    }
}

/// Where a fingerprint that is not live can be stored: a bucket with room.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Vacancy {
    bucket: usize,
}

/// What a lookup found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Lookup {
    /// The owner confirmed a held entry with this fingerprint.
    Live,
    /// No held entry the owner confirmed; the first bucket with room on the probe path, if
    /// the lookup saw one.
    Absent(Option<Vacancy>),
}

/// The index of held nonces by fingerprint. Holds at most `SLOTS` × buckets entries; the
/// owner, which holds fewer, never finds it full.
#[derive(Debug)]
pub(crate) struct NonceTable {
    hot: Box<[Bucket]>,
    /// For each slot of each bucket, the owner's position of the nonce held there.
    cold: Box<[[u32; SLOTS]]>,
}

impl NonceTable {
    /// A table for an owner holding at most `capacity` (at most [`MAX_CAPACITY`]) nonces:
    /// five slots for four nonces, 7.7 bytes per nonce, 2.7 of them hot.
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        let capacity = capacity.clamp(1, MAX_CAPACITY);
        // One slot more than the capacity, so that a held entry always finds room.
        let buckets = (capacity + 1).saturating_mul(LOAD_DEN).div_ceil(SLOTS * LOAD_NUM);
        NonceTable {
            hot: vec![Bucket::default(); buckets].into_boxed_slice(),
            cold: vec![[0; SLOTS]; buckets].into_boxed_slice(),
        }
    }

    /// Bytes held by the table; fixed at construction.
    pub(crate) fn allocated_bytes(&self) -> usize {
        std::mem::size_of_val(&*self.hot) + std::mem::size_of_val(&*self.cold)
    }

    fn home(&self, fingerprint: u64) -> usize {
        // The high half of a product with the bucket count is below it, so it fits a usize.
        ((u128::from(fingerprint) * self.hot.len() as u128) >> 64) as usize
    }

    fn next(&self, bucket: usize) -> usize {
        if bucket + 1 == self.hot.len() { 0 } else { bucket + 1 }
    }

    /// The fragment of `fingerprint` the hot part keeps: its low 16 bits.
    fn fragment(fingerprint: u64) -> u16 {
        // Truncation is intended: the fragment is the low bits.
        fingerprint as u16
    }

    /// Whether a held entry has fingerprint `fingerprint` and is live: `confirm(position)`
    /// is asked about each held entry whose fragment agrees, and decides.
    #[inline]
    pub(crate) fn lookup(&self, fingerprint: u64, mut confirm: impl FnMut(u32) -> bool) -> Lookup {
        let fragment = Self::fragment(fingerprint);
        let mut vacancy = None;
        let mut b = self.home(fingerprint);
        for _ in 0..self.hot.len() {
            let bucket = &self.hot[b];
            // Whether any word agrees, in a few vector instructions; held slots agree about
            // once in 2^16, the other words cost only the closer look.
            let any = bucket.words.iter().fold(false, |any, &word| any | (word == fragment));
            if any && self.confirm_in(b, fragment, &mut confirm) {
                return Lookup::Live;
            }
            if vacancy.is_none() && bucket.held() < SLOTS {
                vacancy = Some(Vacancy { bucket: b });
            }
            // No held entry went past this bucket: the search ends here.
            if bucket.passed() == 0 {
                break;
            }
            b = self.next(b);
        }
        Lookup::Absent(vacancy)
    }

    /// Asks `confirm` about the held slots of bucket `b` whose fragment is `fragment`;
    /// whether it confirmed one.
    #[cold]
    fn confirm_in(&self, b: usize, fragment: u16, confirm: &mut impl FnMut(u32) -> bool) -> bool {
        let bucket = &self.hot[b];
        let held = bucket.held_slots();
        (0..SLOTS).any(|slot| held >> slot & 1 == 1 && bucket.words[slot] == fragment && confirm(self.cold[b][slot]))
    }

    /// Stores `fingerprint`, which the owner holds at `position`, in `vacancy` when given
    /// (from a [`lookup`](Self::lookup) with no change in between), otherwise in the first
    /// bucket with room on its probe path. Returns the bucket, which the owner passes back to
    /// [`release`](Self::release); `None`, storing nothing, only when every bucket is full,
    /// which cannot happen while the owner holds fewer nonces than its capacity.
    #[inline]
    pub(crate) fn insert(&mut self, fingerprint: u64, position: u32, vacancy: Option<Vacancy>) -> Option<u32> {
        let home = self.home(fingerprint);
        let Vacancy { bucket } = vacancy.or_else(|| self.vacancy(home))?;
        // Every bucket between home and the one used is passed: count it, so that lookups go on.
        let mut b = home;
        while b != bucket {
            let passed = &mut self.hot[b].words[PASSED];
            *passed = passed.saturating_add(1);
            b = self.next(b);
        }
        let target = &mut self.hot[bucket];
        let (held, cursor) = (target.held(), target.cursor());
        target.words[cursor] = Self::fragment(fingerprint);
        let next = if cursor + 1 == SLOTS { 0 } else { cursor + 1 };
        // Both counts are below SLOTS, so they fit their bytes.
        target.words[COUNTS] = (next << 8 | (held + 1)) as u16;
        self.cold[bucket][cursor] = position;
        u32::try_from(bucket).ok()
    }

    fn vacancy(&self, home: usize) -> Option<Vacancy> {
        let mut b = home;
        for _ in 0..self.hot.len() {
            if self.hot[b].held() < SLOTS {
                return Some(Vacancy { bucket: b });
            }
            b = self.next(b);
        }
        None
    }

    /// Forgets the oldest entry held in `bucket`, which [`insert`](Self::insert) returned for
    /// `fingerprint`. The owner releases entries in the order it inserted them.
    #[inline]
    pub(crate) fn release(&mut self, fingerprint: u64, bucket: u32) {
        let bucket = bucket as usize;
        debug_assert!(self.hot[bucket].held() > 0, "release of an entry the bucket does not hold");
        // `held` is the low byte and at least 1, as the entry is still held: no borrow.
        self.hot[bucket].words[COUNTS] -= 1;
        let mut b = self.home(fingerprint);
        while b != bucket {
            let passed = &mut self.hot[b].words[PASSED];
            if *passed != u16::MAX {
                *passed -= 1;
            }
            b = self.next(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    #[test]
    fn a_bucket_is_one_cache_line() {
        assert_eq!(std::mem::size_of::<Bucket>(), 64);
        assert_eq!(std::mem::align_of::<Bucket>(), 64);
    }

    #[test]
    fn a_million_nonces_take_under_three_mib_of_hot_table_and_eight_in_all() {
        let table = NonceTable::with_capacity(1 << 20);
        let hot = std::mem::size_of_val(&*table.hot);
        assert!(hot < 3 << 20, "{hot} bytes hot");
        assert!(table.allocated_bytes() < 8 << 20, "{} bytes", table.allocated_bytes());
    }

    #[test]
    fn the_held_slots_are_the_ones_before_the_cursor() {
        let mut bucket = Bucket::default();
        assert_eq!(bucket.held_slots(), 0);
        bucket.words[COUNTS] = 3 << 8 | 2;
        assert_eq!(bucket.held_slots(), 0b110);
        bucket.words[COUNTS] = 1 << 8 | 3;
        assert_eq!(bucket.held_slots(), 1 | 1 << (SLOTS - 1) | 1 << (SLOTS - 2));
        bucket.words[COUNTS] = 5 << 8 | SLOTS as u16;
        assert_eq!(bucket.held_slots(), SLOT_MASK);
    }

    proptest! {
        #[test]
        fn agrees_with_a_queue_of_held_fingerprints(
            capacity in 1usize..150,
            // Fewer releases than inserts on average, so that the table fills up.
            ops in proptest::collection::vec((1u64..200, prop_oneof![3 => Just(0usize), 1 => Just(1), 1 => Just(3)]), 0..3000),
        ) {
            let mut table = NonceTable::with_capacity(capacity);
            // Few distinct fingerprints, many sharing a home bucket and a fragment, so that
            // buckets fill and overflow and lookups must ask about slots that are not theirs.
            let fingerprint = |k: u64| ((k % 3) << 62) | ((k % 7) << 16) | (k % 5);
            // The owner's side: a ring of (fingerprint, live, bucket), released oldest first.
            let mut ring: Vec<(u64, bool, u32)> = vec![(0, false, 0); capacity];
            let mut held: VecDeque<u32> = VecDeque::new();
            let mut tail = 0u32;
            for (k, release) in ops {
                for _ in 0..release.min(held.len()) {
                    let position = held.pop_front().expect("held") as usize;
                    let (fp, _, bucket) = ring[position];
                    table.release(fp, bucket);
                }
                let fp = fingerprint(k);
                // Every third key is expired but not yet released: held, not live.
                let live_in_model = held.iter().any(|&p| ring[p as usize].0 == fp && ring[p as usize].1);
                let mut asked_elsewhere = false;
                let found = table.lookup(fp, |p| {
                    asked_elsewhere |= !held.contains(&p);
                    ring[p as usize].0 == fp && ring[p as usize].1
                });
                prop_assert!(!asked_elsewhere, "asked about a position not held");
                prop_assert_eq!(found == Lookup::Live, live_in_model);
                if let Lookup::Absent(vacancy) = found {
                    if held.len() < capacity {
                        let bucket = table.insert(fp, tail, vacancy);
                        prop_assert!(bucket.is_some());
                        ring[tail as usize] = (fp, k % 3 != 0, bucket.unwrap_or(0));
                        held.push_back(tail);
                        tail = (tail + 1) % capacity as u32;
                    }
                }
            }
            for k in 1..200 {
                let fp = fingerprint(k);
                let live_in_model = held.iter().any(|&p| ring[p as usize].0 == fp && ring[p as usize].1);
                let found = table.lookup(fp, |p| ring[p as usize].0 == fp && ring[p as usize].1);
                prop_assert_eq!(found == Lookup::Live, live_in_model);
            }
            // Once everything is released, nothing is held and no probe goes past a bucket.
            while let Some(position) = held.pop_front() {
                let (fp, _, bucket) = ring[position as usize];
                table.release(fp, bucket);
            }
            prop_assert!(table.hot.iter().all(|bucket| bucket.held() == 0 && bucket.passed() == 0));
        }
    }
}

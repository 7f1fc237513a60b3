//! How many nonces each agent holds in the nonce cache, for its per-agent quota.
//!
//! Each agent holding a nonce has a slot in a dense array (its hash and its count), which
//! stays put while the agent holds anything; the cache remembers that slot with each nonce,
//! so forgetting a nonce updates the dense array without any lookup. Agents are found by a
//! 64-bit keyed hash of their id through an open-addressing index of 4-byte slot numbers
//! (linear probing, at most half full, backward-shift deletion).
//!
//! All memory is allocated at construction: 12 bytes per agent of capacity and 8 to 16 bytes
//! of index. Only a power-of-two prefix of the index is in use, sized to the agents present
//! (between 1/8 and 1/2 full), so that lookups stay within a few cache-resident lines
//! however large the configured capacity; crossing a threshold rebuilds the prefix in time
//! linear in the agents present, which doubling and halving keep at amortised O(1).

/// An index slot holding no agent. Other values are a slot number plus one.
const EMPTY: u32 = 0;

/// The most agents tracked: slot numbers plus one must fit the index's `u32`.
pub(crate) const MAX_AGENTS: usize = u32::MAX as usize - 1;

/// The smallest prefix of the index in use.
const MIN_ACTIVE: usize = 64;

#[derive(Clone, Copy, Debug, Default)]
struct AgentSlot {
    /// The agent's hash while it holds nonces; the next free slot while the slot is free. In
    /// two halves, so that a slot takes 12 bytes.
    hash: [u32; 2],
    /// Nonces held; 0 for a free slot. At most the per-agent quota, which is at most the
    /// cache's capacity, below 2^32.
    held: u32,
}

impl AgentSlot {
    fn new(hash: u64, held: u32) -> Self {
        // Truncations are intended: the low half, then the high half.
        AgentSlot { hash: [hash as u32, (hash >> 32) as u32], held }
    }

    fn hash(&self) -> u64 {
        u64::from(self.hash[0]) | u64::from(self.hash[1]) << 32
    }
}

#[derive(Debug)]
pub(crate) struct AgentCounts {
    /// Allocated for the capacity; entries `..=mask` are in use.
    index: Box<[u32]>,
    mask: usize,
    slots: Box<[AgentSlot]>,
    /// First released slot, reused before unused ones; `usize::MAX` for none.
    free: usize,
    /// Slots `never_used..` have not been handed out yet.
    never_used: usize,
    len: usize,
}

impl AgentCounts {
    /// Room for `max_agents` (at most [`MAX_AGENTS`]) agents holding at least one nonce each.
    pub(crate) fn with_capacity(max_agents: usize) -> Self {
        let max_agents = max_agents.min(MAX_AGENTS);
        let index = max_agents.saturating_mul(2).max(MIN_ACTIVE).next_power_of_two();
        AgentCounts {
            index: vec![EMPTY; index].into_boxed_slice(),
            mask: MIN_ACTIVE - 1,
            slots: vec![AgentSlot::default(); max_agents].into_boxed_slice(),
            free: usize::MAX,
            never_used: 0,
            len: 0,
        }
    }

    /// Agents holding at least one nonce.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Whether no further agent can be added.
    pub(crate) fn is_full(&self) -> bool {
        self.len >= self.slots.len()
    }

    /// Bytes held; fixed at construction.
    pub(crate) fn allocated_bytes(&self) -> usize {
        std::mem::size_of_val(&*self.index) + std::mem::size_of_val(&*self.slots)
    }

    /// Entries of the index in use: a power of two.
    fn active(&self) -> usize {
        self.mask + 1
    }

    fn home(&self, hash: u64) -> usize {
        // Truncation is intended: the low bits of a keyed hash are uniform.
        (hash as usize) & self.mask
    }

    /// The slot of the agent hashed to `hash`, if it holds anything.
    #[inline]
    pub(crate) fn find(&self, hash: u64) -> Option<u32> {
        let mut i = self.home(hash);
        // The prefix in use is never more than half full, so an empty entry ends every probe.
        loop {
            let entry = self.index[i];
            if entry == EMPTY {
                return None;
            }
            let slot = entry - 1;
            if self.slots[slot as usize].hash() == hash {
                return Some(slot);
            }
            i = (i + 1) & self.mask;
        }
    }

    /// Nonces held by the agent in `slot`.
    pub(crate) fn held(&self, slot: u32) -> usize {
        self.slots[slot as usize].held as usize
    }

    /// Counts one more nonce for the agent hashed to `hash`, whose slot [`find`] returned,
    /// and returns its slot. `None` when the agent is new and the table is full.
    ///
    /// [`find`]: AgentCounts::find
    #[inline]
    pub(crate) fn acquire(&mut self, hash: u64, found: Option<u32>) -> Option<u32> {
        match found {
            Some(slot) => {
                self.slots[slot as usize].held += 1;
                Some(slot)
            }
            None => {
                let slot = if self.free != usize::MAX {
                    let slot = self.free;
                    // A free slot's hash field links to the next free slot.
                    self.free = usize::try_from(self.slots[slot].hash()).unwrap_or(usize::MAX);
                    slot
                } else if self.never_used < self.slots.len() {
                    self.never_used += 1;
                    self.never_used - 1
                } else {
                    return None;
                };
                self.slots[slot] = AgentSlot::new(hash, 1);
                self.len += 1;
                let active = self.active();
                if 2 * self.len > active && active < self.index.len() {
                    // Doubling re-indexes every agent, the new one included.
                    self.resize(2 * active);
                } else {
                    self.insert(hash, slot);
                }
                // Slot numbers are below MAX_AGENTS, so the conversion cannot fail.
                u32::try_from(slot).ok()
            }
        }
    }

    /// Counts one nonce less for the agent in `slot`, forgetting the agent when it holds
    /// nothing more.
    #[inline]
    pub(crate) fn release(&mut self, slot: u32) {
        let slot = slot as usize;
        let entry = &mut self.slots[slot];
        if entry.held == 0 {
            return;
        }
        entry.held -= 1;
        if entry.held == 0 {
            let hash = entry.hash();
            *entry = AgentSlot::new(self.free as u64, 0);
            self.free = slot;
            self.len -= 1;
            self.unindex(hash, slot);
            let active = self.active();
            if 8 * self.len < active && active > MIN_ACTIVE {
                self.resize(active / 2);
            }
        }
    }

    fn insert(&mut self, hash: u64, slot: usize) {
        let mut i = self.home(hash);
        while self.index[i] != EMPTY {
            i = (i + 1) & self.mask;
        }
        // Slot numbers are below MAX_AGENTS, so the conversion cannot fail.
        self.index[i] = u32::try_from(slot + 1).unwrap_or(EMPTY);
    }

    /// Uses the first `active` entries of the index (a power of two) and indexes every agent
    /// holding nonces in them again.
    fn resize(&mut self, active: usize) {
        let used = self.active();
        self.index[..used.max(active)].fill(EMPTY);
        self.mask = active - 1;
        for slot in 0..self.never_used {
            // Free slots hold nothing; every slot holding something is an agent.
            if self.slots[slot].held > 0 {
                self.insert(self.slots[slot].hash(), slot);
            }
        }
    }

    /// Removes `slot`, indexed under `hash`, from the index.
    fn unindex(&mut self, hash: u64, slot: usize) {
        let wanted = u32::try_from(slot + 1).unwrap_or(EMPTY);
        let mut hole = self.home(hash);
        while self.index[hole] != wanted {
            if self.index[hole] == EMPTY {
                return;
            }
            hole = (hole + 1) & self.mask;
        }
        // Shift later members of the probe run back so that no lookup stops early at the hole.
        let mut next = (hole + 1) & self.mask;
        while self.index[next] != EMPTY {
            let home = self.home(self.slots[(self.index[next] - 1) as usize].hash());
            let displacement = next.wrapping_sub(home) & self.mask;
            let gap = next.wrapping_sub(hole) & self.mask;
            if displacement >= gap {
                self.index[hole] = self.index[next];
                hole = next;
            }
            next = (next + 1) & self.mask;
        }
        self.index[hole] = EMPTY;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    #[test]
    fn slots_are_reused_and_the_bound_holds() {
        let mut counts = AgentCounts::with_capacity(2);
        let a = counts.acquire(11, None).expect("room");
        assert_eq!(counts.acquire(11, counts.find(11)), Some(a));
        assert_eq!(counts.held(a), 2);
        let b = counts.acquire(22, None).expect("room");
        assert!(counts.is_full());
        assert_eq!(counts.acquire(33, None), None, "no room for a third agent");
        counts.release(b);
        assert_eq!(counts.find(22), None);
        assert_eq!(counts.acquire(33, None), Some(b), "the released slot is reused");
        counts.release(a);
        assert_eq!(counts.find(11), Some(a), "still holds one");
        counts.release(a);
        assert_eq!((counts.find(11), counts.len()), (None, 1));
    }

    proptest! {
        #[test]
        fn behaves_like_a_bounded_map_of_counts_and_never_reallocates(
            capacity in prop_oneof![1usize..24, 100usize..400],
            distinct in prop_oneof![1u64..40, 1u64..500],
            ops in proptest::collection::vec((any::<prop::sample::Index>(), 0u8..3), 0..1500),
        ) {
            let mut counts = AgentCounts::with_capacity(capacity);
            let bytes = counts.allocated_bytes();
            // Few distinct hashes, many sharing low bits, so probe runs collide and wrap.
            let hash = |k: u64| k.wrapping_mul(16) | (k & 3);
            let mut model: HashMap<u64, usize> = HashMap::new();
            for (k, op) in ops {
                // More adds than releases, so that the agents grow past index resizes.
                let add = op > 0;
                let h = hash(k.index(distinct as usize) as u64 + 1);
                let found = counts.find(h);
                prop_assert_eq!(found.map(|slot| counts.held(slot)), model.get(&h).copied());
                if add {
                    let fits = found.is_some() || model.len() < capacity;
                    prop_assert_eq!(counts.acquire(h, found).is_some(), fits);
                    if fits {
                        *model.entry(h).or_default() += 1;
                    }
                } else if let Some(slot) = found {
                    counts.release(slot);
                    let held = model.get_mut(&h).expect("in the model");
                    *held -= 1;
                    if *held == 0 {
                        model.remove(&h);
                    }
                }
                prop_assert_eq!(counts.len(), model.len());
            }
            for (h, held) in &model {
                prop_assert_eq!(counts.find(*h).map(|slot| counts.held(slot)), Some(*held));
            }
            // Then every agent leaves, so that the index shrinks back past its resizes.
            let mut leaving: Vec<(u64, usize)> = model.into_iter().collect();
            while let Some((h, held)) = leaving.pop() {
                let slot = counts.find(h).expect("still there");
                for _ in 0..held {
                    counts.release(slot);
                }
                prop_assert_eq!(counts.find(h), None);
                prop_assert_eq!(counts.len(), leaving.len());
                if let Some(&(other, held)) = leaving.first() {
                    prop_assert_eq!(counts.find(other).map(|slot| counts.held(slot)), Some(held));
                }
            }
            prop_assert_eq!(counts.allocated_bytes(), bytes);
        }
    }
}

//! A hash table of fixed capacity keyed by non-zero 64-bit fingerprints.
//!
//! Open addressing with linear probing and backward-shift deletion (no tombstones), at most
//! half full, allocated once. Keys are expected to be outputs of a keyed hash, so their low
//! bits index the table directly. One slot holds key and value, so a lookup touches one cache
//! line in the common case.

/// The empty-slot marker; callers never insert it.
const EMPTY: u64 = 0;

#[derive(Debug)]
pub(crate) struct FixedTable<V: Copy + Default> {
    slots: Box<[(u64, V)]>,
    mask: usize,
    len: usize,
    capacity: usize,
}

impl<V: Copy + Default> FixedTable<V> {
    /// A table holding at most `capacity` entries, in `2 * capacity` slots rounded up to a
    /// power of two.
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        let slots = capacity.saturating_mul(2).max(8).next_power_of_two();
        FixedTable { slots: vec![(EMPTY, V::default()); slots].into_boxed_slice(), mask: slots - 1, len: 0, capacity }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_full(&self) -> bool {
        self.len >= self.capacity
    }

    /// Bytes held by the table; fixed at construction.
    pub(crate) fn allocated_bytes(&self) -> usize {
        std::mem::size_of_val(&*self.slots)
    }

    fn home(&self, key: u64) -> usize {
        // Truncation is intended: the low bits of a uniform key are uniform.
        (key as usize) & self.mask
    }

    fn find(&self, key: u64) -> Option<usize> {
        debug_assert_ne!(key, EMPTY);
        let mut i = self.home(key);
        // The table is never more than half full, so an empty slot ends every probe.
        loop {
            match self.slots[i].0 {
                EMPTY => return None,
                k if k == key => return Some(i),
                _ => i = (i + 1) & self.mask,
            }
        }
    }

    pub(crate) fn get(&self, key: u64) -> Option<V> {
        self.find(key).map(|i| self.slots[i].1)
    }

    pub(crate) fn get_mut(&mut self, key: u64) -> Option<&mut V> {
        self.find(key).map(|i| &mut self.slots[i].1)
    }

    /// Inserts `key` with `value`. Returns false, changing nothing, when the key is present or
    /// the table is full.
    pub(crate) fn insert(&mut self, key: u64, value: V) -> bool {
        debug_assert_ne!(key, EMPTY);
        if self.is_full() {
            return false;
        }
        let mut i = self.home(key);
        loop {
            match self.slots[i].0 {
                EMPTY => break,
                k if k == key => return false,
                _ => i = (i + 1) & self.mask,
            }
        }
        self.slots[i] = (key, value);
        self.len += 1;
        true
    }

    /// Removes `key`, returning its value.
    pub(crate) fn remove(&mut self, key: u64) -> Option<V> {
        let mut hole = self.find(key)?;
        let value = self.slots[hole].1;
        // Shift later members of the probe run back so that no lookup stops early at the hole.
        let mut next = (hole + 1) & self.mask;
        while self.slots[next].0 != EMPTY {
            let home = self.home(self.slots[next].0);
            let displacement = next.wrapping_sub(home) & self.mask;
            let gap = next.wrapping_sub(hole) & self.mask;
            if displacement >= gap {
                self.slots[hole] = self.slots[next];
                hole = next;
            }
            next = (next + 1) & self.mask;
        }
        self.slots[hole] = (EMPTY, V::default());
        self.len -= 1;
        Some(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64, u32),
        Remove(u64),
        Get(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        // Few distinct keys, many sharing low bits, so probe runs collide and wrap.
        let key = (1u64..40).prop_map(|k| k.wrapping_mul(16) | (k & 3));
        prop_oneof![
            (key.clone(), any::<u32>()).prop_map(|(k, v)| Op::Insert(k, v)),
            key.clone().prop_map(Op::Remove),
            key.prop_map(Op::Get),
        ]
    }

    proptest! {
        #[test]
        fn behaves_like_a_bounded_map_and_never_reallocates(
            capacity in 1usize..24,
            ops in proptest::collection::vec(op(), 0..300),
        ) {
            let mut table = FixedTable::<u32>::with_capacity(capacity);
            let bytes = table.allocated_bytes();
            let mut model = HashMap::new();
            for op in ops {
                match op {
                    Op::Insert(k, v) => {
                        let expect = !model.contains_key(&k) && model.len() < capacity;
                        prop_assert_eq!(table.insert(k, v), expect);
                        if expect {
                            model.insert(k, v);
                        }
                    }
                    Op::Remove(k) => prop_assert_eq!(table.remove(k), model.remove(&k)),
                    Op::Get(k) => prop_assert_eq!(table.get(k), model.get(&k).copied()),
                }
                prop_assert_eq!(table.len(), model.len());
                prop_assert!(table.len() <= capacity);
            }
            for (k, v) in &model {
                prop_assert_eq!(table.get(*k), Some(*v));
            }
            prop_assert_eq!(table.allocated_bytes(), bytes);
        }
    }
}

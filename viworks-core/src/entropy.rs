//! Injected randomness: a deterministic stream keyed by a seed the caller supplies.

use std::fmt;

/// A cryptographically strong random stream derived from a 32-byte seed.
///
/// The core never draws randomness of its own. Drivers seed an `Entropy` from the operating
/// system's generator; tests seed it with a constant and get the same run every time. The
/// stream is BLAKE3's extendable output keyed by the seed, which is indistinguishable from
/// random to anyone who does not know the seed.
pub struct Entropy {
    stream: blake3::OutputReader,
}

impl Entropy {
    /// A stream determined entirely by `seed`.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        let stream = blake3::Hasher::new_keyed(&seed).update(b"viworks v1 entropy").finalize_xof();
        Entropy { stream }
    }

    /// A stream for tests and simulations, determined by a small integer seed.
    pub fn from_u64(seed: u64) -> Self {
        let mut bytes = [0u8; 32];
        bytes[..8].copy_from_slice(&seed.to_le_bytes());
        Entropy::from_seed(bytes)
    }

    /// Fills `out` with the next bytes of the stream.
    pub fn fill(&mut self, out: &mut [u8]) {
        self.stream.fill(out);
    }

    /// The next 32 random bytes, as used for nonces and derived seeds.
    pub fn bytes32(&mut self) -> [u8; 32] {
        let mut out = [0u8; 32];
        self.fill(&mut out);
        out
    }

    /// The next uniformly distributed `u64`.
    pub fn next_u64(&mut self) -> u64 {
        let mut out = [0u8; 8];
        self.fill(&mut out);
        u64::from_le_bytes(out)
    }

    /// A uniformly distributed value in `0..=max`, without modulo bias.
    pub fn below_or_equal(&mut self, max: u64) -> u64 {
        if max == u64::MAX {
            return self.next_u64();
        }
        let span = max + 1;
        // Reject the top partial block of the u64 range so every residue is equally likely.
        let zone = u64::MAX - (u64::MAX % span);
        loop {
            let candidate = self.next_u64();
            if candidate < zone {
                return candidate % span;
            }
        }
    }

    /// An independent stream for a sub-component, so that its draws do not shift the parent's.
    pub fn fork(&mut self) -> Entropy {
        Entropy::from_seed(self.bytes32())
    }
}

impl fmt::Debug for Entropy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Entropy { .. }")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_stream() {
        let mut a = Entropy::from_u64(7);
        let mut b = Entropy::from_u64(7);
        assert_eq!(a.bytes32(), b.bytes32());
        assert_eq!(a.next_u64(), b.next_u64());
        assert_ne!(Entropy::from_u64(7).bytes32(), Entropy::from_u64(8).bytes32());
    }

    #[test]
    fn bounded_draws_stay_in_range_and_cover_it() {
        let mut entropy = Entropy::from_u64(1);
        let mut seen = [false; 5];
        for _ in 0..500 {
            let v = entropy.below_or_equal(4);
            assert!(v <= 4);
            seen[v as usize] = true;
        }
        assert!(seen.iter().all(|s| *s), "all of 0..=4 drawn: {seen:?}");
        assert_eq!(entropy.below_or_equal(0), 0);
    }
}

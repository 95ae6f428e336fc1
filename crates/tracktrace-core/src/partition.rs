//! Logical partitions: a fixed number of them per store, and the stable function placing every
//! stream in one.
//!
//! A stream's partition depends only on its tenant, its stream id and the partition count,
//! through [`stream_hash`]: FNV-1a (64 bit) over the tenant's bytes, one `0xFF` byte (never part
//! of UTF-8 text, so `("ab", "c")` and `("a", "bc")` hash differently) and the stream id's
//! bytes, finished with the SplitMix64 mixer so that neighbouring ids spread evenly; the
//! partition is then `(hash × count) >> 64` (a multiply-shift range reduction, integer
//! arithmetic only). None of it depends on the platform, the Rust version or a random seed
//! (unlike `std`'s `DefaultHasher`), so every process, every version and every language that
//! implements the three steps computes the same partition. The test vectors in this module's
//! tests pin it: changing the function is a breaking change of the stored data.
//!
//! Every event of a stream is in the stream's partition, so a consumer that handles each
//! partition in order keeps every stream's (every entity's) order while partitions run in
//! parallel.

use std::fmt;

use crate::error::{Error, Result};
use crate::id::{StreamId, TenantId};

/// Partitions of a store unless configured otherwise.
pub const DEFAULT_PARTITIONS: u16 = 64;

/// The most partitions a store may have.
pub const MAX_PARTITIONS: u16 = 4096;

/// One logical partition: `0 .. count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Partition(u16);

impl Partition {
    /// Partition number `n` (no range check: see [`Partitioning::partition`]).
    pub const fn new(n: u16) -> Self {
        Self(n)
    }

    /// Its number.
    pub const fn get(self) -> u16 {
        self.0
    }
}

impl fmt::Display for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// How many partitions a store has, and which stream is in which.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Partitioning {
    count: u16,
}

impl Default for Partitioning {
    /// [`DEFAULT_PARTITIONS`].
    fn default() -> Self {
        Self {
            count: DEFAULT_PARTITIONS,
        }
    }
}

impl Partitioning {
    /// `count` partitions, 1 ..= [`MAX_PARTITIONS`] (else [`Error::InvalidInput`]).
    pub fn new(count: u16) -> Result<Self> {
        if count == 0 || count > MAX_PARTITIONS {
            return Err(Error::invalid(
                "partitions",
                format!("{count}: must be 1 ..= {MAX_PARTITIONS}"),
            ));
        }
        Ok(Self { count })
    }

    /// How many partitions.
    pub const fn count(&self) -> u16 {
        self.count
    }

    /// The partition of `stream` of `tenant`.
    pub fn of(&self, tenant: &TenantId, stream: &StreamId) -> Partition {
        self.of_str(tenant.as_str(), stream.as_str())
    }

    /// The partition of the stream `stream` of tenant `tenant`, given as strings.
    pub fn of_str(&self, tenant: &str, stream: &str) -> Partition {
        Partition(reduce(stream_hash(tenant, stream), self.count))
    }

    /// Partition `n`, if it exists.
    pub fn partition(&self, n: u16) -> Option<Partition> {
        (n < self.count).then_some(Partition(n))
    }

    /// Every partition, in order.
    pub fn all(&self) -> impl Iterator<Item = Partition> + use<> {
        (0..self.count).map(Partition)
    }
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// The stable 64-bit hash of a stream: FNV-1a over `tenant`, `0xFF`, `stream`, then the
/// SplitMix64 finaliser (see the module documentation).
pub fn stream_hash(tenant: &str, stream: &str) -> u64 {
    let mut h = FNV_OFFSET;
    let mut eat = |b: u8| {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    };
    tenant.bytes().for_each(&mut eat);
    eat(0xFF);
    stream.bytes().for_each(&mut eat);
    mix(h)
}

/// SplitMix64's finaliser.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `hash` into `0 .. count` by multiply-shift.
fn reduce(hash: u64, count: u16) -> u16 {
    // The product of a u64 and a u16 shifted right by 64 is below `count`: fits in u16.
    ((u128::from(hash) * u128::from(count)) >> 64) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pinned: these values are part of the stored data's format.
    #[test]
    fn test_vectors() {
        // Computed by an independent implementation (Python, from the three steps above).
        assert_eq!(stream_hash("", ""), 0x4f2d_b50f_1240_40cd, "empty");
        let p = Partitioning::default();
        let cases = [
            ("acme", "Entity-Bag-0001", 52),
            ("acme", "Entity-Bag-0002", 22),
            ("acme", "Entity-ULD-AKE12345IB", 20),
            ("iberia", "Entity-Bag-0001", 53),
            ("ab", "c-1", 14),
            ("a", "bc-1", 37),
        ];
        let got: Vec<_> = cases
            .iter()
            .map(|(t, s, _)| (*t, *s, p.of_str(t, s).get()))
            .collect();
        let want: Vec<_> = cases.iter().map(|(t, s, n)| (*t, *s, *n)).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn the_separator_keeps_tenant_and_stream_apart() {
        assert_ne!(stream_hash("ab", "c-1"), stream_hash("a", "bc-1"));
        assert_ne!(stream_hash("acme", ""), stream_hash("", "acme"));
    }

    /// 10,000 sequential entity ids of one tenant over 64 partitions: every partition gets
    /// within 35 % of the mean (a uniform random placement's largest deviation is about 27 %
    /// here; deterministic: the hash has no seed).
    #[test]
    fn sequential_ids_spread_evenly() {
        let p = Partitioning::default();
        let mut counts = [0u32; DEFAULT_PARTITIONS as usize];
        for i in 0..10_000 {
            let n = p.of_str("acme", &format!("Entity-Bag-{i:010}"));
            counts[usize::from(n.get())] += 1;
        }
        let mean = 10_000.0 / f64::from(DEFAULT_PARTITIONS);
        for (i, c) in counts.iter().enumerate() {
            let off = (f64::from(*c) - mean).abs() / mean;
            assert!(off < 0.35, "partition {i}: {c} streams, mean {mean}");
        }
    }

    #[test]
    fn counts_are_bounded() {
        assert!(Partitioning::new(0).is_err());
        assert!(Partitioning::new(MAX_PARTITIONS + 1).is_err());
        let p = Partitioning::new(1).unwrap();
        assert_eq!(p.of_str("acme", "anything").get(), 0);
        let p = Partitioning::new(MAX_PARTITIONS).unwrap();
        assert_eq!(p.all().count(), usize::from(MAX_PARTITIONS));
        assert_eq!(p.partition(MAX_PARTITIONS), None);
        for i in 0..1000 {
            assert!(p.of_str("t", &i.to_string()).get() < MAX_PARTITIONS);
        }
    }
}

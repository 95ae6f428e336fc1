//! Identifier newtypes and concurrency preconditions.
//!
//! Every identifier that crosses the store boundary is validated once, at construction
//! (`TenantId::parse`, `StreamId::parse`, their `FromStr` / `TryFrom` conversions and serde
//! deserialisation), so backends can store them without re-checking. Constants are checked at
//! compile time:
//!
//! ```
//! use tracktrace_core::{StreamId, TenantId};
//!
//! const ACME: TenantId = TenantId::from_static("acme");
//! const ORDERS: StreamId = StreamId::from_static("Order-1");
//! let parsed: TenantId = "acme".parse()?;
//! assert_eq!(parsed, ACME);
//! assert_eq!(ORDERS.as_ref(), "Order-1");
//! // Serialised as plain strings; deserialisation validates.
//! assert_eq!(serde_json::to_string(&ACME)?, r#""acme""#);
//! assert!(serde_json::from_str::<TenantId>(r#""not a tenant""#).is_err());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ```compile_fail
//! // An invalid constant does not compile.
//! const BAD: tracktrace_core::TenantId = tracktrace_core::TenantId::from_static("a b");
//! ```

use std::borrow::{Borrow, Cow};
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

/// Why an identifier was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    /// The identifier was empty.
    #[error("{kind} must not be empty")]
    Empty {
        /// Which identifier.
        kind: &'static str,
    },
    /// The identifier was longer than allowed.
    #[error("{kind} is {len} bytes long; at most {max} are allowed")]
    TooLong {
        /// Which identifier.
        kind: &'static str,
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The identifier contained a character outside its alphabet.
    #[error("{kind} contains {found:?}, which is not allowed ({allowed})")]
    BadChar {
        /// Which identifier.
        kind: &'static str,
        /// The offending character.
        found: char,
        /// Human-readable description of the alphabet.
        allowed: &'static str,
    },
    /// The identifier was not a UUID.
    #[error("{kind} is not a valid UUID: {reason}")]
    NotUuid {
        /// Which identifier.
        kind: &'static str,
        /// Parser message.
        reason: String,
    },
}

/// Tenant identifier: 1–64 bytes of `[A-Za-z0-9_.-]`.
///
/// Tenants are the unit of isolation: every stream belongs to exactly one tenant and
/// tenant-scoped reads never return another tenant's events.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TenantId(Cow<'static, str>);

impl TenantId {
    /// Longest accepted tenant id, in bytes.
    pub const MAX_LEN: usize = 64;

    /// Validates and wraps a tenant id.
    pub fn parse(s: impl Into<String>) -> Result<Self, IdError> {
        let s = s.into();
        check_len("tenant id", &s, Self::MAX_LEN)?;
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
        {
            return Err(IdError::BadChar {
                kind: "tenant id",
                found: c,
                allowed: "ASCII letters, digits, '_', '-', '.'",
            });
        }
        Ok(Self(Cow::Owned(s)))
    }

    /// A tenant id from a constant, validated at compile time in a `const` context (an invalid
    /// one fails the build; at run time it panics). Cloning it allocates nothing.
    pub const fn from_static(s: &'static str) -> Self {
        let b = s.as_bytes();
        assert!(
            !b.is_empty() && b.len() <= Self::MAX_LEN,
            "a tenant id has 1 to 64 bytes"
        );
        let mut i = 0;
        while i < b.len() {
            let c = b[i];
            assert!(
                c.is_ascii_alphanumeric() || c == b'_' || c == b'-' || c == b'.',
                "a tenant id has only ASCII letters, digits, '_', '-', '.'"
            );
            i += 1;
        }
        Self(Cow::Borrowed(s))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Stream identifier: 1–256 bytes of printable characters (no control characters).
///
/// By convention a stream id starts with its category (`"Bag-ABC123"`,
/// `"saga.milestone-Bag-1"`), which lets `read_all` filter by prefix and keeps
/// sharding by entity type possible.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamId(Cow<'static, str>);

impl StreamId {
    /// Longest accepted stream id, in bytes.
    pub const MAX_LEN: usize = 256;

    /// Validates and wraps a stream id.
    pub fn parse(s: impl Into<String>) -> Result<Self, IdError> {
        let s = s.into();
        check_len("stream id", &s, Self::MAX_LEN)?;
        if let Some(c) = s.chars().find(|c| c.is_control()) {
            return Err(IdError::BadChar {
                kind: "stream id",
                found: c,
                allowed: "any character but control characters",
            });
        }
        Ok(Self(Cow::Owned(s)))
    }

    /// A stream id from a constant, validated at compile time in a `const` context (an invalid
    /// one fails the build; at run time it panics). Cloning it allocates nothing.
    pub const fn from_static(s: &'static str) -> Self {
        let b = s.as_bytes();
        assert!(
            !b.is_empty() && b.len() <= Self::MAX_LEN,
            "a stream id has 1 to 256 bytes"
        );
        let mut i = 0;
        while i < b.len() {
            let c = b[i];
            // Control characters: C0 (U+0000–U+001F), DEL, and C1 (U+0080–U+009F, encoded as
            // 0xC2 0x80–0x9F), exactly what `char::is_control` reports.
            let c1 = c == 0xC2 && i + 1 < b.len() && b[i + 1] >= 0x80 && b[i + 1] <= 0x9F;
            assert!(
                !(c < 0x20 || c == 0x7F || c1),
                "a stream id has no control characters"
            );
            i += 1;
        }
        Self(Cow::Borrowed(s))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// `FromStr`, `TryFrom<String>` / `TryFrom<&str>` (validating like `parse`), `AsRef<str>`,
/// `Borrow<str>` (hashes and compares like the string, so maps keyed by the id can be looked
/// up with a `&str`), comparison with `str`, `From<Id> for String`, and serde as a plain
/// string that is validated on deserialisation.
macro_rules! string_id_conversions {
    ($($t:ident),*) => {$(
        impl FromStr for $t {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::parse(s)
            }
        }
        impl TryFrom<String> for $t {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                Self::parse(s)
            }
        }
        impl TryFrom<&str> for $t {
            type Error = IdError;
            fn try_from(s: &str) -> Result<Self, IdError> {
                Self::parse(s)
            }
        }
        impl AsRef<str> for $t {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
        impl Borrow<str> for $t {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
        impl PartialEq<str> for $t {
            fn eq(&self, other: &str) -> bool {
                *self.0 == *other
            }
        }
        impl PartialEq<&str> for $t {
            fn eq(&self, other: &&str) -> bool {
                *self.0 == **other
            }
        }
        impl From<$t> for String {
            fn from(id: $t) -> String {
                id.0.into_owned()
            }
        }
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::parse(s).map_err(serde::de::Error::custom)
            }
        }
    )*};
}
string_id_conversions!(TenantId, StreamId);

impl FromStr for EventId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        Self::parse(s)
    }
}

impl TryFrom<Uuid> for EventId {
    type Error = IdError;
    fn try_from(u: Uuid) -> Result<Self, IdError> {
        Self::from_uuid(u)
    }
}

impl From<EventId> for Uuid {
    fn from(id: EventId) -> Uuid {
        id.0
    }
}

/// The hyphenated UUID; deserialisation rejects the nil UUID like [`EventId::from_uuid`].
impl Serialize for EventId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0.hyphenated())
    }
}

impl<'de> Deserialize<'de> for EventId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Versions and positions serialise as plain numbers.
macro_rules! number_id_serde {
    ($($t:ident),*) => {$(
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_u64(self.0)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                u64::deserialize(d).map(Self)
            }
        }
        impl From<u64> for $t {
            fn from(v: u64) -> Self {
                Self(v)
            }
        }
        impl From<$t> for u64 {
            fn from(v: $t) -> u64 {
                v.0
            }
        }
    )*};
}
number_id_serde!(Version, Position);

fn check_len(kind: &'static str, s: &str, max: usize) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if s.len() > max {
        return Err(IdError::TooLong {
            kind,
            len: s.len(),
            max,
        });
    }
    Ok(())
}

/// Event identifier: a UUID, UUIDv7 (time-ordered) when generated here.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventId(Uuid);

impl EventId {
    /// A fresh time-ordered UUIDv7.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    /// Wraps an existing UUID (e.g. one supplied by a client for idempotent retries).
    /// The nil UUID is rejected: it is what uninitialised client code sends.
    pub fn from_uuid(u: Uuid) -> Result<Self, IdError> {
        if u.is_nil() {
            return Err(IdError::NotUuid {
                kind: "event id",
                reason: "the nil UUID is not a valid event id".into(),
            });
        }
        Ok(Self(u))
    }

    /// Parses the hyphenated (or simple) textual form.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        let u = Uuid::parse_str(s).map_err(|e| IdError::NotUuid {
            kind: "event id",
            reason: e.to_string(),
        })?;
        Self::from_uuid(u)
    }

    /// The UUID.
    pub fn as_uuid(&self) -> Uuid {
        self.0
    }

    /// The 16 big-endian bytes of the UUID.
    pub fn to_bytes(&self) -> [u8; 16] {
        *self.0.as_bytes()
    }

    /// Rebuilds an id from 16 bytes as produced by [`EventId::to_bytes`].
    pub fn from_bytes(b: [u8; 16]) -> Result<Self, IdError> {
        Self::from_uuid(Uuid::from_bytes(b))
    }
}

impl Default for EventId {
    fn default() -> Self {
        Self::new()
    }
}

/// Version of a stream: the number of events in it. The first event has version 1;
/// `Version::ZERO` is the version of a stream that does not exist.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Version(u64);

impl Version {
    /// Version of an empty (non-existent) stream.
    pub const ZERO: Version = Version(0);

    /// Wraps a raw version number.
    pub const fn new(v: u64) -> Self {
        Self(v)
    }

    /// The raw number.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// The version after this one.
    pub const fn next(self) -> Self {
        Self(self.0 + 1)
    }
}

/// Position of an event in the store's global log (one total order per store).
/// The first event has a position ≥ 1; `Position::START` is "before everything".
///
/// Positions strictly increase with commit order as seen by readers, but need not be
/// contiguous (a backend may skip numbers, e.g. after an aborted transaction).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Position(u64);

impl Position {
    /// Before the first event: reading from here reads everything.
    pub const START: Position = Position(0);

    /// Wraps a raw position.
    pub const fn new(p: u64) -> Self {
        Self(p)
    }

    /// The raw number.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// The position after this one.
    pub const fn next(self) -> Self {
        Self(self.0.saturating_add(1))
    }
}

/// Optimistic-concurrency precondition of an append.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum ExpectedVersion {
    /// No check.
    Any,
    /// The stream must not exist yet (version 0).
    NoStream,
    /// The stream must have at least one event.
    StreamExists,
    /// The stream must be at exactly this version (`Exact(Version::ZERO)` ≡ `NoStream`).
    Exact(Version),
}

impl ExpectedVersion {
    /// Whether a stream currently at `actual` satisfies this precondition.
    pub fn accepts(self, actual: Version) -> bool {
        match self {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => actual == Version::ZERO,
            ExpectedVersion::StreamExists => actual > Version::ZERO,
            ExpectedVersion::Exact(v) => actual == v,
        }
    }
}

/// A point in time as microseconds since the Unix epoch (UTC), as recorded by the store clock.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(i64);

impl Timestamp {
    /// The current wall-clock time.
    pub fn now() -> Self {
        Self::from(SystemTime::now())
    }

    /// From microseconds since the epoch.
    pub const fn from_unix_micros(us: i64) -> Self {
        Self(us)
    }

    /// Microseconds since the epoch.
    pub const fn unix_micros(self) -> i64 {
        self.0
    }

    /// Milliseconds since the epoch (rounded toward negative infinity).
    pub const fn unix_millis(self) -> i64 {
        self.0.div_euclid(1000)
    }

    /// As a `SystemTime`.
    pub fn to_system_time(self) -> SystemTime {
        if self.0 >= 0 {
            UNIX_EPOCH + Duration::from_micros(self.0 as u64)
        } else {
            UNIX_EPOCH - Duration::from_micros(self.0.unsigned_abs())
        }
    }

    /// Time elapsed from `self` to `later` (zero if `later` is earlier).
    pub fn elapsed_until(self, later: Timestamp) -> Duration {
        Duration::from_micros(later.0.saturating_sub(self.0).max(0) as u64)
    }
}

impl From<SystemTime> for Timestamp {
    fn from(t: SystemTime) -> Self {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Self(i64::try_from(d.as_micros()).unwrap_or(i64::MAX)),
            Err(e) => Self(-i64::try_from(e.duration().as_micros()).unwrap_or(i64::MAX)),
        }
    }
}

macro_rules! display_debug {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($t), self.0)
            }
        }
    )*};
}
display_debug!(TenantId, StreamId, EventId, Version, Position, Timestamp);

impl fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExpectedVersion::Any => f.write_str("any"),
            ExpectedVersion::NoStream => f.write_str("no stream"),
            ExpectedVersion::StreamExists => f.write_str("stream exists"),
            ExpectedVersion::Exact(v) => write!(f, "exactly {v}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_ids_are_validated() {
        assert!(TenantId::parse("acme-air_1.eu").is_ok());
        assert_eq!(
            TenantId::parse(""),
            Err(IdError::Empty { kind: "tenant id" })
        );
        assert!(matches!(
            TenantId::parse("a b"),
            Err(IdError::BadChar { found: ' ', .. })
        ));
        assert!(matches!(
            TenantId::parse("x".repeat(65)),
            Err(IdError::TooLong { len: 65, .. })
        ));
    }

    #[test]
    fn stream_ids_reject_control_characters() {
        assert!(StreamId::parse("Bag-0001 ÄÖ").is_ok());
        assert!(matches!(
            StreamId::parse("a\nb"),
            Err(IdError::BadChar { found: '\n', .. })
        ));
        assert!(StreamId::parse("s".repeat(257)).is_err());
    }

    #[test]
    fn event_ids_roundtrip_and_reject_nil() {
        let id = EventId::new();
        assert_eq!(id.as_uuid().get_version_num(), 7);
        assert_eq!(EventId::from_bytes(id.to_bytes()).unwrap(), id);
        assert_eq!(EventId::parse(&id.to_string()).unwrap(), id);
        assert!(EventId::from_uuid(Uuid::nil()).is_err());
        assert!(EventId::parse("nope").is_err());
    }

    #[test]
    fn string_ids_convert_like_parse() {
        let t: TenantId = "acme".parse().unwrap();
        assert_eq!(t, TenantId::parse("acme").unwrap());
        assert_eq!(TenantId::try_from("acme".to_owned()).unwrap(), t);
        assert_eq!(TenantId::try_from("acme").unwrap(), t);
        assert!("a b".parse::<TenantId>().is_err());
        assert!(StreamId::try_from("a\nb").is_err());
        assert_eq!(t, "acme");
        assert_eq!(String::from(t.clone()), "acme");
        assert_eq!(t.as_ref(), "acme");
        // `Borrow<str>`: a map keyed by ids is looked up with a `&str`.
        let mut m = std::collections::HashMap::new();
        m.insert(StreamId::parse("Bag-1").unwrap(), 1);
        assert_eq!(m.get("Bag-1"), Some(&1));
        let set: std::collections::BTreeSet<TenantId> =
            ["b", "a"].iter().map(|s| s.parse().unwrap()).collect();
        assert!(set.contains("a"));
    }

    #[test]
    fn static_ids_are_checked_like_parse() {
        const ACME: TenantId = TenantId::from_static("acme-air_1.eu");
        assert_eq!(ACME, TenantId::parse("acme-air_1.eu").unwrap());
        assert_eq!(
            StreamId::from_static("Bag-0001 ÄÖ"),
            StreamId::parse("Bag-0001 ÄÖ").unwrap()
        );
        for bad in ["", "a b", "ä"] {
            assert!(std::panic::catch_unwind(|| TenantId::from_static(bad)).is_err());
        }
        // Every control character `parse` refuses, `from_static` refuses too (C0, DEL, C1),
        // and the neighbours it accepts are accepted.
        for c in (0u32..0x200).filter_map(char::from_u32) {
            let s: &'static str = Box::leak(format!("a{c}b").into_boxed_str());
            let parsed = StreamId::parse(s).is_ok();
            let constant = std::panic::catch_unwind(|| StreamId::from_static(s)).is_ok();
            assert_eq!(parsed, constant, "U+{:04X}", c as u32);
        }
    }

    #[test]
    fn ids_serialise_as_plain_values_and_validate() {
        let t = TenantId::parse("acme").unwrap();
        assert_eq!(serde_json::to_string(&t).unwrap(), r#""acme""#);
        assert_eq!(serde_json::from_str::<TenantId>(r#""acme""#).unwrap(), t);
        assert!(serde_json::from_str::<TenantId>(r#""a b""#).is_err());
        assert!(serde_json::from_str::<StreamId>(r#""""#).is_err());
        let id = EventId::new();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{id}\""));
        assert_eq!(serde_json::from_str::<EventId>(&json).unwrap(), id);
        assert!(
            serde_json::from_str::<EventId>(r#""00000000-0000-0000-0000-000000000000""#).is_err()
        );
        assert_eq!(serde_json::to_string(&Version::new(7)).unwrap(), "7");
        assert_eq!(
            serde_json::from_str::<Position>("42").unwrap(),
            Position::new(42)
        );
        assert_eq!(u64::from(Version::from(3)), 3);
        assert_eq!(Uuid::from(id), id.as_uuid());
        assert_eq!(EventId::try_from(id.as_uuid()).unwrap(), id);
    }

    #[test]
    fn expected_version_semantics() {
        let (zero, three) = (Version::ZERO, Version::new(3));
        assert!(ExpectedVersion::Any.accepts(zero) && ExpectedVersion::Any.accepts(three));
        assert!(
            ExpectedVersion::NoStream.accepts(zero) && !ExpectedVersion::NoStream.accepts(three)
        );
        assert!(!ExpectedVersion::StreamExists.accepts(zero));
        assert!(ExpectedVersion::StreamExists.accepts(three));
        assert!(ExpectedVersion::Exact(three).accepts(three));
        assert!(!ExpectedVersion::Exact(three).accepts(Version::new(2)));
        assert!(ExpectedVersion::Exact(zero).accepts(zero));
    }

    #[test]
    fn timestamps_convert() {
        let t = Timestamp::from_unix_micros(1_500_000);
        assert_eq!(t.unix_millis(), 1500);
        assert_eq!(Timestamp::from(t.to_system_time()), t);
        let neg = Timestamp::from_unix_micros(-1);
        assert_eq!(neg.unix_millis(), -1);
        assert_eq!(Timestamp::from(neg.to_system_time()), neg);
        assert_eq!(t.elapsed_until(neg), Duration::ZERO);
    }
}

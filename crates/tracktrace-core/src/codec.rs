//! Payload codecs ([`Codec`]: JSON, postcard, optionally bincode 2) and the compact binary
//! [`envelope`] format backends use to store whole recorded events.
//!
//! Decoders never panic on bad bytes: every length is checked against the input before use.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::event::{NewEvent, RecordedEvent};

/// Why a payload or envelope could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The value could not be serialised.
    #[error("cannot encode {content_type} payload: {reason}")]
    Encode {
        /// Codec content type.
        content_type: &'static str,
        /// Serializer message.
        reason: String,
    },
    /// The bytes are not a valid encoding.
    #[error("cannot decode {content_type} payload: {reason}")]
    Decode {
        /// Codec content type (or `"envelope"`).
        content_type: &'static str,
        /// Deserializer message.
        reason: String,
    },
    /// The event was written with another codec.
    #[error("event has content type {found:?}, expected {expected:?}")]
    ContentType {
        /// What the codec handles.
        expected: &'static str,
        /// What the event says.
        found: String,
    },
}

/// A payload serialisation format. Every payload also carries its schema version (in the
/// event envelope), so readers can upcast old payloads before decoding.
pub trait Codec: Send + Sync + 'static {
    /// MIME type recorded on events encoded with this codec.
    const CONTENT_TYPE: &'static str;

    /// Serialises `value`.
    fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError>;

    /// Deserialises bytes produced by [`Codec::encode`].
    fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError>;

    /// A new event with this codec's content type, a fresh id and the given schema version.
    fn new_event<T: Serialize + ?Sized>(
        event_type: &str,
        schema_version: u32,
        value: &T,
    ) -> Result<NewEvent, CodecError> {
        Ok(
            NewEvent::new(event_type, Self::CONTENT_TYPE, Self::encode(value)?)
                .with_schema_version(schema_version),
        )
    }

    /// Decodes a recorded event's payload, checking its content type first.
    fn decode_event<T: DeserializeOwned>(e: &RecordedEvent) -> Result<T, CodecError> {
        if e.content_type != Self::CONTENT_TYPE {
            return Err(CodecError::ContentType {
                expected: Self::CONTENT_TYPE,
                found: e.content_type.clone(),
            });
        }
        Self::decode(&e.payload)
    }
}

/// JSON via serde_json (`application/json`): readable, the HTTP server's choice.
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonCodec;

impl Codec for JsonCodec {
    const CONTENT_TYPE: &'static str = crate::event::CONTENT_TYPE_JSON;

    fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
        serde_json::to_vec(value).map_err(|e| CodecError::Encode {
            content_type: Self::CONTENT_TYPE,
            reason: e.to_string(),
        })
    }

    fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
        serde_json::from_slice(bytes).map_err(|e| CodecError::Decode {
            content_type: Self::CONTENT_TYPE,
            reason: e.to_string(),
        })
    }
}

/// postcard 1.x (`application/x-postcard`): compact binary with a documented, stable wire
/// format. The default binary codec.
#[derive(Debug, Clone, Copy, Default)]
pub struct PostcardCodec;

impl Codec for PostcardCodec {
    const CONTENT_TYPE: &'static str = "application/x-postcard";

    fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
        postcard::to_stdvec(value).map_err(|e| CodecError::Encode {
            content_type: Self::CONTENT_TYPE,
            reason: e.to_string(),
        })
    }

    fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
        postcard::from_bytes(bytes).map_err(|e| CodecError::Decode {
            content_type: Self::CONTENT_TYPE,
            reason: e.to_string(),
        })
    }
}

/// bincode 2.0.1 (`application/x-bincode`), standard config with a 16 MiB decode limit so a
/// corrupt length prefix cannot make it allocate unbounded memory. Feature `bincode`.
///
/// bincode is no longer maintained upstream (2.0.1 is its final release): this codec is kept
/// for stores that already hold bincode payloads; new stores should use [`PostcardCodec`].
#[cfg(feature = "bincode")]
#[cfg_attr(docsrs, doc(cfg(feature = "bincode")))]
#[derive(Debug, Clone, Copy, Default)]
pub struct BincodeCodec;

#[cfg(feature = "bincode")]
impl Codec for BincodeCodec {
    const CONTENT_TYPE: &'static str = "application/x-bincode";

    fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
        bincode::serde::encode_to_vec(value, bincode_config()).map_err(|e| CodecError::Encode {
            content_type: Self::CONTENT_TYPE,
            reason: e.to_string(),
        })
    }

    fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
        let (v, used) =
            bincode::serde::decode_from_slice(bytes, bincode_config()).map_err(|e| {
                CodecError::Decode {
                    content_type: Self::CONTENT_TYPE,
                    reason: e.to_string(),
                }
            })?;
        if used != bytes.len() {
            return Err(CodecError::Decode {
                content_type: Self::CONTENT_TYPE,
                reason: format!("{} trailing bytes", bytes.len() - used),
            });
        }
        Ok(v)
    }
}

#[cfg(feature = "bincode")]
fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ 16 * 1024 * 1024 }>()
}

pub mod envelope {
    //! Binary envelope of a whole [`RecordedEvent`], as backends store it.
    //!
    //! Layout (all integers LEB128 varints, strings length-prefixed UTF-8):
    //! `0x01` format tag, tenant, stream, version, position, recorded-at (zigzag),
    //! 16-byte event id, optional dedup key, event type, schema version, content type,
    //! optional correlation id, optional causation id, header count and pairs, payload.
    //! Optional fields are a `0`/`1` byte then the value. Trailing bytes are an error.

    use std::collections::BTreeMap;

    use bytes::Bytes;

    use super::CodecError;
    use crate::event::{Metadata, RecordedEvent};
    use crate::id::{EventId, Position, StreamId, TenantId, Timestamp, Version};

    const FORMAT_V1: u8 = 1;

    /// Encodes `e`.
    pub fn encode(e: &RecordedEvent) -> Vec<u8> {
        let m = &e.metadata;
        let mut out = Vec::with_capacity(
            64 + e.tenant.as_str().len()
                + e.stream.as_str().len()
                + e.event_type.len()
                + e.content_type.len()
                + e.payload.len(),
        );
        out.push(FORMAT_V1);
        put_str(&mut out, e.tenant.as_str());
        put_str(&mut out, e.stream.as_str());
        put_var(&mut out, e.version.get());
        put_var(&mut out, e.position.get());
        let t = e.recorded_at.unix_micros();
        put_var(&mut out, ((t << 1) ^ (t >> 63)) as u64);
        out.extend_from_slice(&e.event_id.to_bytes());
        put_opt(&mut out, e.dedup_key.as_deref());
        put_str(&mut out, &e.event_type);
        put_var(&mut out, u64::from(e.schema_version));
        put_str(&mut out, &e.content_type);
        put_opt(&mut out, m.correlation_id.as_deref());
        put_opt(&mut out, m.causation_id.as_deref());
        put_var(&mut out, m.headers.len() as u64);
        for (k, v) in &m.headers {
            put_str(&mut out, k);
            put_str(&mut out, v);
        }
        put_var(&mut out, e.payload.len() as u64);
        out.extend_from_slice(&e.payload);
        out
    }

    /// The fields an [`crate::EventFilter`] looks at, borrowed from an encoded event.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    #[non_exhaustive]
    pub struct Head<'a> {
        /// Tenant id.
        pub tenant: &'a str,
        /// Stream id.
        pub stream: &'a str,
        /// Event type.
        pub event_type: &'a str,
    }

    /// Reads only the [`Head`] of bytes produced by [`encode`], without allocating: lets a
    /// backend skip events a filter rejects before decoding them. Errors as [`decode`] would
    /// for the part it reads; a `Head` does not prove the rest is well formed.
    pub fn peek(bytes: &[u8]) -> Result<Head<'_>, CodecError> {
        let mut r = Reader { b: bytes };
        let tag = r.byte()?;
        if tag != FORMAT_V1 {
            return Err(err(format!("unknown envelope format {tag}")));
        }
        let tenant = r.str()?;
        let stream = r.str()?;
        r.var()?; // version
        r.var()?; // position
        r.var()?; // recorded at
        r.take(16)?; // event id
        match r.byte()? {
            0 => {}
            1 => {
                r.str()?;
            }
            t => return Err(err(format!("bad option tag {t}"))),
        }
        let event_type = r.str()?;
        Ok(Head {
            tenant,
            stream,
            event_type,
        })
    }

    /// Decodes bytes produced by [`encode`]. Never panics; any inconsistency is an error.
    pub fn decode(bytes: &[u8]) -> Result<RecordedEvent, CodecError> {
        let mut r = Reader { b: bytes };
        let tag = r.byte()?;
        if tag != FORMAT_V1 {
            return Err(err(format!("unknown envelope format {tag}")));
        }
        let tenant = TenantId::parse(r.string()?).map_err(|e| err(e.to_string()))?;
        let stream = StreamId::parse(r.string()?).map_err(|e| err(e.to_string()))?;
        let version = Version::new(r.var()?);
        let position = Position::new(r.var()?);
        let z = r.var()?;
        let recorded_at = Timestamp::from_unix_micros(((z >> 1) as i64) ^ -((z & 1) as i64));
        let id: [u8; 16] = r
            .take(16)?
            .try_into()
            .map_err(|_| err("short event id".into()))?;
        let event_id = EventId::from_bytes(id).map_err(|e| err(e.to_string()))?;
        let dedup_key = r.opt()?;
        let event_type = r.string()?;
        let schema_version =
            u32::try_from(r.var()?).map_err(|_| err("schema version out of range".into()))?;
        let content_type = r.string()?;
        let correlation_id = r.opt()?;
        let causation_id = r.opt()?;
        let n = r.var()?;
        // Each header takes at least two bytes, which bounds `n` by the input size.
        if n > r.b.len() as u64 / 2 {
            return Err(err(format!("header count {n} exceeds the input")));
        }
        let mut headers = BTreeMap::new();
        for _ in 0..n {
            let k = r.string()?;
            let v = r.string()?;
            // Headers are written in key order; anything else is not our encoding.
            if headers.last_key_value().is_some_and(|(last, _)| *last >= k) {
                return Err(err(format!("header {k:?} out of order or repeated")));
            }
            headers.insert(k, v);
        }
        let len = r.len()?;
        let payload = Bytes::copy_from_slice(r.take(len)?);
        if !r.b.is_empty() {
            return Err(err(format!("{} trailing bytes", r.b.len())));
        }
        Ok(RecordedEvent {
            tenant,
            stream,
            version,
            position,
            recorded_at,
            event_id,
            dedup_key,
            event_type,
            schema_version,
            content_type,
            payload,
            metadata: Metadata {
                correlation_id,
                causation_id,
                headers,
            },
        })
    }

    fn err(reason: String) -> CodecError {
        CodecError::Decode {
            content_type: "envelope",
            reason,
        }
    }

    fn put_var(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    fn put_str(out: &mut Vec<u8>, s: &str) {
        put_var(out, s.len() as u64);
        out.extend_from_slice(s.as_bytes());
    }

    fn put_opt(out: &mut Vec<u8>, s: Option<&str>) {
        match s {
            None => out.push(0),
            Some(s) => {
                out.push(1);
                put_str(out, s);
            }
        }
    }

    struct Reader<'a> {
        b: &'a [u8],
    }

    impl<'a> Reader<'a> {
        fn byte(&mut self) -> Result<u8, CodecError> {
            let (&first, rest) = self
                .b
                .split_first()
                .ok_or_else(|| err("unexpected end of input".into()))?;
            self.b = rest;
            Ok(first)
        }

        fn var(&mut self) -> Result<u64, CodecError> {
            let mut v = 0u64;
            for shift in (0..64).step_by(7) {
                let b = self.byte()?;
                let bits = u64::from(b & 0x7f);
                if shift == 63 && bits > 1 {
                    return Err(err("varint overflows u64".into()));
                }
                v |= bits << shift;
                if b & 0x80 == 0 {
                    // One encoding per value: a trailing zero group is rejected.
                    if b == 0 && shift > 0 {
                        return Err(err("non-canonical varint".into()));
                    }
                    return Ok(v);
                }
            }
            Err(err("varint longer than 10 bytes".into()))
        }

        fn len(&mut self) -> Result<usize, CodecError> {
            let n = self.var()?;
            if n > self.b.len() as u64 {
                return Err(err(format!(
                    "length {n} exceeds the {} remaining bytes",
                    self.b.len()
                )));
            }
            Ok(n as usize)
        }

        fn take(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
            if n > self.b.len() {
                return Err(err("unexpected end of input".into()));
            }
            let (head, rest) = self.b.split_at(n);
            self.b = rest;
            Ok(head)
        }

        fn str(&mut self) -> Result<&'a str, CodecError> {
            let n = self.len()?;
            let s = self.take(n)?;
            std::str::from_utf8(s).map_err(|e| err(e.to_string()))
        }

        fn string(&mut self) -> Result<String, CodecError> {
            let n = self.len()?;
            let s = self.take(n)?;
            String::from_utf8(s.to_vec()).map_err(|e| err(e.to_string()))
        }

        fn opt(&mut self) -> Result<Option<String>, CodecError> {
            match self.byte()? {
                0 => Ok(None),
                1 => Ok(Some(self.string()?)),
                t => Err(err(format!("bad option tag {t}"))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Metadata;
    use crate::id::{EventId, Position, StreamId, TenantId, Timestamp, Version};
    use proptest::prelude::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        a: u32,
        b: String,
        c: Vec<i64>,
    }

    fn sample() -> Sample {
        Sample {
            a: 7,
            b: "bag".into(),
            c: vec![-1, 2, 3],
        }
    }

    fn recorded(payload: Vec<u8>) -> RecordedEvent {
        let mut headers = std::collections::BTreeMap::new();
        headers.insert("source".to_string(), "BRS".to_string());
        RecordedEvent {
            tenant: TenantId::parse("acme").unwrap(),
            stream: StreamId::parse("Bag-ÄB12").unwrap(),
            version: Version::new(300),
            position: Position::new(u64::MAX - 1),
            recorded_at: Timestamp::from_unix_micros(-5),
            event_id: EventId::new(),
            dedup_key: Some("k1".into()),
            event_type: "BagLoaded".into(),
            schema_version: 2,
            content_type: "application/json".into(),
            payload: payload.into(),
            metadata: Metadata {
                correlation_id: Some("c".into()),
                causation_id: None,
                headers,
            },
        }
    }

    #[test]
    fn payload_codecs_roundtrip() {
        let s = sample();
        assert_eq!(
            JsonCodec::decode::<Sample>(&JsonCodec::encode(&s).unwrap()).unwrap(),
            s
        );
        assert_eq!(
            PostcardCodec::decode::<Sample>(&PostcardCodec::encode(&s).unwrap()).unwrap(),
            s
        );
        #[cfg(feature = "bincode")]
        assert_eq!(
            BincodeCodec::decode::<Sample>(&BincodeCodec::encode(&s).unwrap()).unwrap(),
            s
        );
    }

    #[test]
    fn decode_event_checks_content_type() {
        let e = recorded(PostcardCodec::encode(&sample()).unwrap());
        assert!(matches!(
            PostcardCodec::decode_event::<Sample>(&e),
            Err(CodecError::ContentType { .. })
        ));
        let ne = PostcardCodec::new_event("T", 3, &sample()).unwrap();
        assert_eq!(ne.schema_version, 3);
        assert_eq!(ne.content_type, PostcardCodec::CONTENT_TYPE);
    }

    #[test]
    fn envelope_roundtrips_and_rejects_truncation() {
        let e = recorded(b"{\"x\":1}".to_vec());
        let bytes = envelope::encode(&e);
        assert_eq!(envelope::decode(&bytes).unwrap(), e);
        for cut in 0..bytes.len() {
            assert!(envelope::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(envelope::decode(&longer).is_err());
        // The head agrees with the decoded event, with and without a dedup key.
        let mut keyed = e.clone();
        keyed.dedup_key = Some("dk-1".into());
        for ev in [&e, &keyed] {
            let encoded = envelope::encode(ev);
            let h = envelope::peek(&encoded).unwrap();
            assert_eq!(
                (h.tenant, h.stream, h.event_type),
                (
                    ev.tenant.as_str(),
                    ev.stream.as_str(),
                    ev.event_type.as_str()
                )
            );
        }
        assert!(envelope::peek(&bytes[..3]).is_err());
    }

    proptest! {
        #[test]
        fn decoders_never_panic_on_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = envelope::decode(&bytes);
            let _ = envelope::peek(&bytes);
            let _ = JsonCodec::decode::<Sample>(&bytes);
            let _ = PostcardCodec::decode::<Sample>(&bytes);
            let _ = PostcardCodec::decode::<Vec<String>>(&bytes);
            #[cfg(feature = "bincode")]
            { let _ = BincodeCodec::decode::<Sample>(&bytes); }
        }

        #[test]
        fn envelope_survives_bit_flips(payload in proptest::collection::vec(any::<u8>(), 0..64), idx in any::<prop::sample::Index>(), bit in 0u8..8) {
            let mut bytes = envelope::encode(&recorded(payload));
            let i = idx.index(bytes.len());
            bytes[i] ^= 1 << bit;
            let _ = envelope::decode(&bytes);
        }
    }
}

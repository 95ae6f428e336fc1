//! Bodies of the cargo-fuzz targets in `fuzz/`, shared with the ordinary test that replays
//! their checked-in seed corpora (so CI exercises them on stable without cargo-fuzz).

use serde::{Deserialize, Serialize};

use tracktrace_core::codec::{Codec, JsonCodec, PostcardCodec, envelope};

/// A payload shape with nested containers, strings and numbers for the codec targets.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub struct FuzzPayload {
    /// A number.
    pub n: u64,
    /// A signed number.
    pub i: i32,
    /// A string.
    pub s: String,
    /// A list of strings.
    pub tags: Vec<String>,
    /// An optional nested value.
    pub nested: Option<Box<FuzzPayload>>,
    /// Raw bytes.
    pub bytes: Vec<u8>,
}

/// Envelope decoder target: decoding arbitrary bytes never panics, and whatever decodes
/// re-encodes to the same bytes (the format has one encoding per event).
pub fn envelope_target(data: &[u8]) {
    if let Ok(e) = envelope::decode(data) {
        let again = envelope::encode(&e);
        assert_eq!(again, data, "envelope decode/encode is not canonical");
    }
}

/// Payload codec target: JSON, postcard (and bincode with that feature) decoders never
/// panic, and decoded values round-trip.
pub fn codecs_target(data: &[u8]) {
    if let Ok(v) = JsonCodec::decode::<FuzzPayload>(data) {
        let bytes = JsonCodec::encode(&v).expect("a decoded value encodes");
        assert_eq!(
            JsonCodec::decode::<FuzzPayload>(&bytes).ok().as_ref(),
            Some(&v)
        );
    }
    if let Ok(v) = PostcardCodec::decode::<FuzzPayload>(data) {
        let bytes = PostcardCodec::encode(&v).expect("a decoded value encodes");
        assert_eq!(
            PostcardCodec::decode::<FuzzPayload>(&bytes).ok().as_ref(),
            Some(&v)
        );
    }
    let _ = PostcardCodec::decode::<Vec<(String, u64)>>(data);
    #[cfg(feature = "bincode")]
    {
        use tracktrace_core::codec::BincodeCodec;
        if let Ok(v) = BincodeCodec::decode::<FuzzPayload>(data) {
            let bytes = BincodeCodec::encode(&v).expect("a decoded value encodes");
            assert_eq!(
                BincodeCodec::decode::<FuzzPayload>(&bytes).ok().as_ref(),
                Some(&v)
            );
        }
    }
}

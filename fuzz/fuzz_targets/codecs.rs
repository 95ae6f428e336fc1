//! Fuzzes the payload codecs' decoders (JSON, postcard, bincode).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tracktrace_conformance::fuzz::codecs_target(data);
});

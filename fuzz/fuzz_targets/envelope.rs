//! Fuzzes the stored-event envelope decoder (`tracktrace_core::codec::envelope::decode`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tracktrace_conformance::fuzz::envelope_target(data);
});

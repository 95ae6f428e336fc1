//! Fuzzes the HTTP capture payload validation (`tracktrace_domain::validate_capture`): any
//! bytes give a valid event or a typed error listing field errors, never a panic.
//! Seed corpus: `crates/tracktrace-domain/corpus/capture/` (also replayed by that crate's tests):
//! `cargo fuzz run capture ../crates/tracktrace-domain/corpus/capture`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(tracktrace_domain::CaptureError::Invalid { errors }) =
        tracktrace_domain::validate_capture(data)
    {
        assert!(!errors.is_empty(), "an invalid payload must name at least one field error");
    }
});

//! Runs the checked-in capture seed corpus (`corpus/capture/`, also the seed corpus of the
//! capture fuzz target) through [`validate_capture`]: no input panics, and each seed's outcome
//! is the one its name announces (`valid_*` accepted, `malformed_*` rejected as malformed JSON,
//! everything else rejected with field errors or as malformed).

use tracktrace_domain::{CaptureError, validate_capture};

#[test]
fn seed_corpus_never_panics_and_matches_expectations() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/capture");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let bytes = std::fs::read(&path).unwrap();
        let outcome = std::panic::catch_unwind(|| validate_capture(&bytes));
        let outcome = outcome.unwrap_or_else(|_| panic!("{name}: validate_capture panicked"));
        match outcome {
            Ok(_) => assert!(name.starts_with("valid_"), "{name} was accepted"),
            Err(CaptureError::Malformed { .. }) => assert!(
                !name.starts_with("valid_"),
                "{name} was rejected as malformed"
            ),
            Err(CaptureError::Invalid { errors }) => {
                assert!(!name.starts_with("valid_"), "{name}: {errors:?}");
                assert!(!name.starts_with("malformed_"), "{name}: {errors:?}");
                assert!(!errors.is_empty());
            }
        }
        seen += 1;
    }
    assert!(seen >= 10, "only {seen} seeds in {}", dir.display());
}

//! Replays the checked-in cargo-fuzz seed corpora (`fuzz/corpus/<target>/`) through the same
//! target bodies the fuzzers run, so every CI run exercises them on stable Rust.

use std::path::Path;

use tracktrace_conformance::fuzz::{codecs_target, envelope_target};

fn replay(target: &str, f: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("corpus entry").path();
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        f(&data);
        // Every prefix too: truncated records are the common corruption.
        for cut in 0..data.len() {
            f(&data[..cut]);
        }
        n += 1;
    }
    assert!(n >= 5, "{target}: only {n} seeds in {}", dir.display());
}

#[test]
fn envelope_seed_corpus() {
    replay("envelope", envelope_target);
}

#[test]
fn codecs_seed_corpus() {
    replay("codecs", codecs_target);
}

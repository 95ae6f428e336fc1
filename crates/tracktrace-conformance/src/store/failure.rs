//! What a conformance check reports: [`CheckFailure`] and [`CheckResult`]. A module of its own
//! so that the model-based test (`model`) can use them without importing its parent.

/// A conformance violation, with a description of what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckFailure(pub String);

impl std::fmt::Display for CheckFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CheckFailure {}

/// Result of one check.
pub type CheckResult = Result<(), CheckFailure>;

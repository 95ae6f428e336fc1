//! `ensure!` / `ensure_eq!` for the check functions: they return a
//! `CheckFailure` (which must be in scope) instead of panicking, so the suites can be run
//! against deliberately broken stores.

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(CheckFailure(format!($($fmt)+)));
        }
    };
}

macro_rules! ensure_eq {
    ($a:expr, $b:expr, $($fmt:tt)+) => {{
        let (a, b) = (&$a, &$b);
        if a != b {
            return Err(CheckFailure(format!("{}: left {:?} != right {:?}", format!($($fmt)+), a, b)));
        }
    }};
}

//! Track & Trace reference server (HTTP API). Not implemented yet: see issue 6.

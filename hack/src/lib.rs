//! No code: see Cargo.toml. Every workspace member depends on this crate so that Cargo resolves one
//! feature set per dependency whichever members an invocation builds.

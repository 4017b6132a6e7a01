//! Empty: it exists so that this crate's build-dependencies take part in feature resolution.

fn main() {}

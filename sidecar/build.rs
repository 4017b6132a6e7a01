//! Links the `tally-sidecar` binary with packed relative relocations (DT_RELR, glibc 2.36+, GNU ld 2.38+,
//! lld 15+). The sidecar is a position-independent executable, and the classic `.rela.dyn` table describing
//! where to add the load address takes 24 bytes per pointer: about 800 KB here, all read and kept resident
//! at start-up. DT_RELR encodes the same relocations in under 10 KB, which lowers the idle RSS of every
//! injected sidecar by about 1.2 MiB (BENCHMARKS.md, "a smaller binary") without giving up ASLR.
//! Only the binaries are linked this way; the dependencies and the library are unchanged.

fn main() {
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os == "linux" && env == "gnu" {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
    println!("cargo:rerun-if-changed=build.rs");
}

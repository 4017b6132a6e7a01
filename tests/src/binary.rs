//! Where the `tally-sidecar` binary under test is.

use std::path::PathBuf;

/// The `tally-sidecar` binary: `$TALLY_SIDECAR_BIN`, else `<target>/release/tally-sidecar` next to
/// the running test executable (`<target>/release/deps/<test>`). Panics with the command that builds
/// it when it is missing, so a test never runs against nothing.
pub fn sidecar_binary() -> PathBuf {
    let path = match std::env::var_os("TALLY_SIDECAR_BIN") {
        Some(path) => PathBuf::from(path),
        None => {
            let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
            // <target>/release/deps/<test> -> <target>/release/tally-sidecar
            let release = exe
                .parent()
                .and_then(|deps| deps.parent())
                .unwrap_or_else(|| panic!("unexpected test executable path {}", exe.display()));
            release.join("tally-sidecar")
        }
    };
    assert!(
        path.is_file(),
        "the tally-sidecar binary is missing at {}: build it with \
         `cargo build --release -p tally-sidecar` (same CARGO_TARGET_DIR) or set TALLY_SIDECAR_BIN",
        path.display()
    );
    path
}

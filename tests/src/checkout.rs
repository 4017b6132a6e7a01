//! Where the checkout is, found at run time.

use std::path::{Path, PathBuf};

/// The root of the checkout the tests run from. Cargo sets `CARGO_MANIFEST_DIR` for every test process to its
/// package's directory, a direct child of the root; a compile-time `env!` could name another checkout that shares
/// the build cache (cargo reuses a workspace member's library across checkouts). Without it (a binary run by
/// `make`), the current directory when it holds the workspace, else the directory this crate was compiled in.
pub fn workspace_root() -> PathBuf {
    if let Some(package) = std::env::var_os("CARGO_MANIFEST_DIR")
        && let Some(root) = Path::new(&package).parent()
    {
        return root.to_path_buf();
    }
    if let Ok(dir) = std::env::current_dir()
        && dir.join("Cargo.toml").is_file()
        && dir.join("charts").is_dir()
    {
        return dir;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

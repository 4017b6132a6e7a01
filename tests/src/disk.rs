//! What a data directory occupies on disk.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The allocated blocks of the files directly in `dir`, in bytes: what `du` reports and what
/// the kubelet counts against an emptyDir's `sizeLimit` (a RocksDB directory is flat).
pub fn directory_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.blocks() * 512)
                .sum()
        })
        .unwrap_or_default()
}

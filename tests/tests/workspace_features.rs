//! Every Cargo invocation of the Makefile resolves the same features for each dependency, so that
//! `make test` compiles each crate once (hack/Cargo.toml says why and how). Asks the real `cargo tree`
//! for each invocation's selection of packages and compares it with the whole workspace's.

use std::collections::BTreeSet;
use std::process::Command;

use tally_tests::checkout::workspace_root;

/// The package selections (and edge kinds) of the Makefile's cargo commands: `build --workspace --bins`,
/// `clippy --workspace --all-targets`, `test -p tally-sidecar -p tally-operator`, `test -p tally-tests`
/// (also `bench`), `test -p tally-e2e` and `bench -p tally-operator`.
const SELECTIONS: &[(&[&str], &str)] = &[
    (&["--workspace"], "normal,build"),
    (&["--workspace"], "normal,build,dev"),
    (
        &["-p", "tally-sidecar", "-p", "tally-operator"],
        "normal,build,dev",
    ),
    (&["-p", "tally-tests"], "normal,build,dev"),
    (&["-p", "tally-e2e"], "normal,build,dev"),
    (&["-p", "tally-operator"], "normal,build,dev"),
];

/// One line per (crate, feature set) that the selection compiles, without the workspace's own packages.
fn resolved(selection: &[&str], edges: &str) -> BTreeSet<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let output = Command::new(&cargo)
        .current_dir(workspace_root())
        .args(["tree", "--locked", "--offline", "--prefix", "none"])
        .args(["-f", "{p} [{f}]", "-e", edges])
        .args(selection)
        .output()
        .unwrap_or_else(|e| panic!("{cargo} tree: {e}"));
    assert!(
        output.status.success(),
        "cargo tree {selection:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| !line.is_empty() && !line.starts_with("tally-"))
        .map(|line| line.trim_end_matches(" (*)").to_string())
        .collect()
}

#[test]
fn every_invocation_resolves_the_workspace_features() {
    let union = resolved(&["--workspace"], "normal,build,dev");
    assert!(
        union.iter().any(|line| line.starts_with("rocksdb ")),
        "cargo tree listed no rocksdb: {union:?}"
    );
    let mut differing = Vec::new();
    let mut names = BTreeSet::new();
    for (selection, edges) in SELECTIONS {
        for line in resolved(selection, edges).difference(&union) {
            differing.push(format!("{selection:?} ({edges}): {line}"));
            names.insert(line.split(' ').next().unwrap_or_default().to_string());
        }
    }
    let workspace: Vec<&String> = union
        .iter()
        .filter(|line| names.contains(line.split(' ').next().unwrap_or_default()))
        .collect();
    assert!(
        differing.is_empty(),
        "these crates get other features than in the whole workspace, so `make test` compiles them \
         (and every crate above them) again; add them with the workspace's features to \
         hack/Cargo.toml ([build-dependencies] for proc macros' and build scripts' dependencies):\n{}\n\
         the workspace's: {workspace:#?}",
        differing.join("\n")
    );
}

//! The Python interpreter with the real OpenMeter and CloudEvents SDKs installed.

use std::path::PathBuf;

/// `$TALLY_PYTHON` (the Makefile exports its virtualenv's python), else
/// `${XDG_CACHE_HOME:-$HOME/.cache}/tally/venv/bin/python`. Panics with the commands that create
/// the virtualenv when neither exists: the SDK test must not pass by skipping.
pub fn python_interpreter() -> PathBuf {
    if let Some(path) = std::env::var_os("TALLY_PYTHON") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "TALLY_PYTHON={} does not exist; create the virtualenv with `make python`",
            path.display()
        );
        return path;
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .unwrap_or_else(|| panic!("neither TALLY_PYTHON, XDG_CACHE_HOME nor HOME is set"));
    let venv = cache.join("tally").join("venv");
    let python = venv.join("bin").join("python");
    assert!(
        python.is_file(),
        "no Python with the OpenMeter SDK: TALLY_PYTHON is unset and {} does not exist. Create it:\n  \
         python3 -m venv {venv}\n  {venv}/bin/pip install -r tests/python/requirements.txt\n\
         (or run `make python`, which exports TALLY_PYTHON)",
        python.display(),
        venv = venv.display()
    );
    python
}

/// `tests/python/<name>` in this checkout.
pub fn script(name: &str) -> PathBuf {
    crate::workspace_root()
        .join("tests")
        .join("python")
        .join(name)
}

//! Running a configuration rendered for Kubernetes (the operator's ConfigMap, the injector's `TALLY_CONFIG_YAML`) as a
//! local process, the way its pod would run it. Only what a kubelet and the cluster would provide is replaced: the
//! listen address and data directory (the harness's `${LISTEN}` and `${DATA_DIR}`), the URLs of outputs whose
//! hosts are cluster DNS names or the real upstream, and the paths of mounted files.

use serde_json::{Value, json};

/// What [`localise`] replaced, one line per change, for a reader to see exactly what differs from the cluster.
pub type Replacements = Vec<String>;

/// Rewrites `yaml` for a process on this machine: `listen` and `dataDir` become the harness's placeholders, the
/// output named `urls[i].0` gets the URL `urls[i].1`, and every `tokenFrom`/`secretFrom`/`urlFrom` `file` equal to
/// `files[i].0` becomes `files[i].1`. Fails when `yaml` is not a configuration or a named output does not exist.
pub fn localise(
    yaml: &str,
    urls: &[(&str, &str)],
    files: &[(&str, &str)],
) -> Result<(String, Replacements), String> {
    let mut config: Value = serde_yaml::from_str(yaml)
        .map_err(|e| format!("the rendered configuration is not YAML: {e}"))?;
    let mut replaced = Vec::new();
    for (key, placeholder) in [("listen", "${LISTEN}"), ("dataDir", "${DATA_DIR}")] {
        replaced.push(format!("{key}: {} -> {placeholder}", config[key]));
        config[key] = json!(placeholder);
    }
    let targets = config["outputs"]["targets"]
        .as_array_mut()
        .ok_or("the configuration has no outputs.targets")?;
    for (name, url) in urls {
        let target = targets
            .iter_mut()
            .find(|t| t["name"] == *name)
            .ok_or_else(|| format!("the configuration has no output named {name}"))?;
        replaced.push(format!("outputs[{name}].url: {} -> {url}", target["url"]));
        target["url"] = json!(url);
    }
    for target in targets.iter_mut() {
        for key in ["tokenFrom", "secretFrom", "urlFrom"] {
            for (path, local) in files {
                if target[key]["file"] == *path {
                    replaced.push(format!(
                        "outputs[{}].{key}.file: {path} -> {local}",
                        target["name"]
                    ));
                    target[key]["file"] = json!(local);
                }
            }
        }
    }
    let text = serde_yaml::to_string(&config)
        .map_err(|e| format!("re-serialising the configuration: {e}"))?;
    Ok((text, replaced))
}

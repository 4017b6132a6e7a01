//! The collector configuration: one YAML file for the sidecar, and the same type is the
//! `spec.pipeline` of the operator's `MeteringCollector`, so the two can never disagree.
//!
//! Keys are camelCase, every key has a default, unknown keys are rejected. Durations are
//! strings such as `500ms` or `24h`; sizes accept `1024`, `64Ki`, `1Mi`, `1Gi` and `1MB`.
//!
//! The module is laid out as the file is read: [`types`] holds the keys and their defaults,
//! [`units`] the human-written durations and sizes, [`secret`] where tokens and the pod's
//! identity come from, `validate` the rules serde cannot express, and `yaml` the positions
//! that make every error point at a line and column.

mod secret;
mod types;
mod units;
mod validate;
mod yaml;

use std::path::{Path, PathBuf};

pub use secret::SecretSource;
pub use types::*;
pub use units::{ByteSize, HumanDuration};

/// Why a configuration could not be loaded. The message names the file, the key path and the fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}: {key}: {message}")]
    Invalid {
        origin: String,
        key: String,
        message: String,
    },
    #[error("{origin}: {message}")]
    Secret { origin: String, message: String },
}

impl Config {
    /// Loads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, &path.display().to_string())
    }

    /// Parses and validates configuration text; `origin` names it in error messages.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let invalid = |key: String, message: String| ConfigError::Invalid {
            origin: origin.to_string(),
            key,
            message,
        };
        let config: Config = if text.trim().is_empty() {
            Config::default()
        } else {
            // serde's derived structs reject a repeated field only with the location of the
            // mapping, and maps (`headers`) keep the last value silently; a repeated key is
            // almost always an editing mistake, so it is refused with its own line first.
            if let Some((key, line, column)) = yaml::duplicate_key(text) {
                return Err(invalid(
                    key,
                    format!(
                        "is set twice in the same mapping; delete one of the two \
                         (a key may appear once) at line {line} column {column}"
                    ),
                ));
            }
            let de = serde_yaml::Deserializer::from_str(text);
            serde_path_to_error::deserialize(de).map_err(|e| {
                let key = e.path().to_string();
                let key = if key == "." {
                    "(top level)".to_string()
                } else {
                    key
                };
                // serde_yaml may start its message with (a parent of) the path; say it once.
                let message = e.into_inner().to_string();
                let message = match message.split_once(": ") {
                    Some((head, rest)) if key.starts_with(head) => rest.to_string(),
                    _ => message,
                };
                invalid(key, message)
            })?
        };
        config.validate().map_err(|(key, message)| {
            // Rules checked after parsing still point into the text: at the key's value, or
            // at the nearest enclosing mapping when the key is absent (a default applies).
            let message = match yaml::locate(text, &key) {
                Some((line, column)) => format!("{message} at line {line} column {column}"),
                None => message,
            };
            invalid(key, message)
        })?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests;

//! Secrets and the pod's identity: read from an environment variable or a file when the
//! process starts, never written into the configuration itself.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Config, ConfigError, OutputConfig, PodIdentity};

/// Where a secret comes from: exactly one of an environment variable or a file
/// (`{ env: NAME }` or `{ file: /path }`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.env) != has(self.file)",
    "message": "set exactly one of `env` or `file`"
}]))]
pub struct SecretSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
}

impl SecretSource {
    pub fn env(name: &str) -> SecretSource {
        SecretSource {
            env: Some(name.to_string()),
            file: None,
        }
    }

    pub fn file(path: &Path) -> SecretSource {
        SecretSource {
            env: None,
            file: Some(path.to_path_buf()),
        }
    }

    /// Reads the secret; surrounding whitespace (a trailing newline in a file) is removed.
    pub fn resolve(&self) -> Result<String, String> {
        let (value, origin) = match (&self.env, &self.file) {
            (Some(name), None) => (
                std::env::var(name)
                    .map_err(|_| format!("environment variable {name} is not set"))?,
                format!("environment variable {name}"),
            ),
            (None, Some(path)) => (
                std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read secret file {}: {e}", path.display()))?,
                format!("secret file {}", path.display()),
            ),
            _ => return Err("set exactly one of `env` or `file`".to_string()),
        };
        let trimmed = value.trim();
        if trimmed.is_empty() {
            return Err(format!("{origin} is empty"));
        }
        Ok(trimmed.to_string())
    }

    pub(super) fn check(&self) -> Result<(), String> {
        match (&self.env, &self.file) {
            (Some(_), None) | (None, Some(_)) => Ok(()),
            _ => Err("set exactly one of `env` or `file`".to_string()),
        }
    }
}

impl Config {
    /// The pod's namespace and name, resolved from their sources (environment variables or files).
    pub fn pod_identity(&self) -> Result<PodIdentity, ConfigError> {
        Ok(PodIdentity {
            namespace: resolve_secret(None, self.pod.namespace_from.as_ref(), "pod.namespaceFrom")?,
            name: resolve_secret(None, self.pod.name_from.as_ref(), "pod.nameFrom")?,
        })
    }

    /// The ingest bearer token, resolved from its source.
    pub fn ingest_token(&self) -> Result<Option<String>, ConfigError> {
        resolve_secret(
            self.ingest.auth_token.as_deref(),
            self.ingest.auth_token_from.as_ref(),
            "ingest.authTokenFrom",
        )
    }
}

impl OutputConfig {
    /// The upstream bearer token, resolved from its source.
    pub fn resolved_token(&self, index: usize) -> Result<Option<String>, ConfigError> {
        resolve_secret(
            self.token.as_deref(),
            self.token_from.as_ref(),
            &format!("outputs.targets[{index}].tokenFrom"),
        )
    }
}

fn resolve_secret(
    inline: Option<&str>,
    from: Option<&SecretSource>,
    key: &str,
) -> Result<Option<String>, ConfigError> {
    match (inline, from) {
        (Some(v), _) => Ok(Some(v.to_string())),
        (None, Some(source)) => source
            .resolve()
            .map(Some)
            .map_err(|message| ConfigError::Secret {
                origin: key.to_string(),
                message,
            }),
        (None, None) => Ok(None),
    }
}

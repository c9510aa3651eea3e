//! Where plait keeps its data, and the default model it runs without `--model`.

use std::path::PathBuf;

use serde::Deserialize;

/// The default model's manifest, embedded from `assets/default-model.toml`.
const DEFAULT_MODEL_MANIFEST: &str = include_str!("../assets/default-model.toml");

/// The script that installs the default model, relative to the repository.
pub const INSTALL_SCRIPT: &str = "scripts/install-default-model.sh";

/// Errors finding plait's directories or the default model.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// No home directory to put data in.
    #[error("cannot find a data directory (no home directory); set PLAIT_DATA_DIR")]
    NoDataDir,
    /// The embedded manifest does not parse (a build defect).
    #[error("assets/default-model.toml: {0}")]
    Manifest(#[from] toml::de::Error),
    /// The default model is not installed.
    #[error("the default model {name} is not installed at {}: run {INSTALL_SCRIPT} (or pass --model)", path.display())]
    DefaultModelMissing {
        /// Its name.
        name: String,
        /// Where it was looked for.
        path: PathBuf,
    },
}

/// The default model's manifest.
#[derive(Debug, Clone, Deserialize)]
pub struct DefaultModel {
    /// Model name.
    pub name: String,
    /// File name of the GGUF in the models directory.
    pub file: String,
    /// Its sha256.
    pub sha256: String,
}

impl DefaultModel {
    /// The manifest the binary was built with.
    pub fn manifest() -> Result<Self, ConfigError> {
        Ok(toml::from_str(DEFAULT_MODEL_MANIFEST)?)
    }

    /// Where the default model is installed; an error saying how to install it if absent.
    pub fn installed_path(&self) -> Result<PathBuf, ConfigError> {
        let path = data_dir()?.join("models").join(&self.file);
        if path.is_file() {
            Ok(path)
        } else {
            Err(ConfigError::DefaultModelMissing {
                name: self.name.clone(),
                path,
            })
        }
    }
}

/// plait's data directory: `PLAIT_DATA_DIR`, else the platform's (`~/.local/share/plait`).
pub fn data_dir() -> Result<PathBuf, ConfigError> {
    if let Some(dir) = std::env::var_os("PLAIT_DATA_DIR").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    directories::ProjectDirs::from("", "", "plait")
        .map(|d| d.data_dir().to_path_buf())
        .ok_or(ConfigError::NoDataDir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_manifest_parses() {
        let m = DefaultModel::manifest().unwrap();
        assert!(m.file.ends_with(".gguf"));
        assert_eq!(m.sha256.len(), 64);
    }
}

//! plait's user configuration (`config.toml` plus `-c key=value` overrides), where plait keeps
//! its data, configuration and logs, and the default model it runs without `--model`.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::engine::{SamplingParams, MAX_LOOPS};
use crate::model::DeviceSpec;

/// The default model's manifest, embedded from `assets/default-model.toml`.
const DEFAULT_MODEL_MANIFEST: &str = include_str!("../assets/default-model.toml");

/// The script that installs the default model, relative to the repository.
pub const INSTALL_SCRIPT: &str = "scripts/install-default-model.sh";

/// The configuration file's name inside [`config_dir`].
pub const CONFIG_FILE_NAME: &str = "config.toml";

/// The log file's name inside [`state_dir`].
pub const LOG_FILE_NAME: &str = "plait.log";

/// [`MAX_LOOPS`] in words, for [`RangeError::expected`] (which is static).
const LOOPS_RANGE: &str = "1 to 8";
const _: () = assert!(MAX_LOOPS == 8, "update LOOPS_RANGE");
const _: () = assert!(Theme::ALL.len() == 2, "update the theme's expected values");

/// What a build without the `cuda` feature accepts as `device`, for [`RangeError::expected`].
const DEVICE_WITHOUT_CUDA: &str =
    "\"cpu\" (this plait was built without CUDA: build it with `--features cuda`)";

/// The terminal interface's colour theme, for the terminal's background.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Theme {
    /// Light text on a dark background.
    #[default]
    Dark,
    /// Dark text on a light background.
    Light,
}

impl Theme {
    /// Every theme with its name in `config.toml`: the one list of them.
    pub const ALL: [(&'static str, Theme); 2] = [("dark", Theme::Dark), ("light", Theme::Light)];

    /// The theme `name` names, if any.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().find(|(n, _)| *n == name).map(|&(_, t)| t)
    }
}

/// Errors finding plait's directories, reading its configuration, or finding the default model.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// No home directory to put data in.
    #[error("cannot find a data directory (no home directory); set PLAIT_DATA_DIR")]
    NoDataDir,
    /// No home directory to read configuration from.
    #[error("cannot find a configuration directory (no home directory); set PLAIT_CONFIG_DIR")]
    NoConfigDir,
    /// No home directory to write logs in.
    #[error("cannot find a state directory (no home directory); set PLAIT_STATE_DIR")]
    NoStateDir,
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
    /// A configuration file named explicitly does not exist.
    #[error("configuration file {} does not exist", path.display())]
    Missing {
        /// The file asked for.
        path: PathBuf,
    },
    /// A configuration file exists but cannot be read.
    #[error("cannot read configuration file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Bad TOML, or a value of the wrong type.
    #[error("{origin}: {}{message}", key_prefix(.key))]
    Invalid {
        /// Where the bad text is.
        origin: Origin,
        /// The dotted key it belongs to, when known (not for syntax errors).
        key: Option<String>,
        /// What is wrong, as toml and serde put it.
        message: String,
    },
    /// A key plait does not know (often a typo).
    #[error("{origin}: unknown key `{key}`{}", expected_suffix(.expected))]
    UnknownKey {
        /// Where it is.
        origin: Origin,
        /// The dotted key.
        key: String,
        /// The keys allowed at that level, as serde lists them ("expected one of ...").
        expected: Option<String>,
    },
    /// A value of the right type outside its allowed range.
    #[error("{origin}: {error}")]
    OutOfRange {
        /// Where it is.
        origin: Origin,
        /// The key, the value and the range.
        error: RangeError,
    },
    /// A `-c` override that is not `key=value`.
    #[error("bad override `{text}`: {reason}")]
    BadOverride {
        /// The override as given.
        text: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// `key: ` when there is a key, for [`ConfigError::Invalid`].
fn key_prefix(key: &Option<String>) -> String {
    key.as_ref().map(|k| format!("{k}: ")).unwrap_or_default()
}

/// `; expected ...` when serde listed the allowed keys, for [`ConfigError::UnknownKey`].
fn expected_suffix(expected: &Option<String>) -> String {
    expected
        .as_ref()
        .map(|e| format!("; {e}"))
        .unwrap_or_default()
}

/// Where a configuration value came from, so an error can point at it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A configuration file.
    File {
        /// The file.
        path: PathBuf,
        /// The 1-based line, when known.
        line: Option<usize>,
    },
    /// A `-c key=value` override, as given.
    Override(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File {
                path,
                line: Some(line),
            } => write!(f, "{} line {line}", path.display()),
            Origin::File { path, line: None } => write!(f, "{}", path.display()),
            Origin::Override(text) => write!(f, "override `{text}`"),
        }
    }
}

/// A configuration value outside its allowed range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key} = {value} is out of range: expected {expected}")]
pub struct RangeError {
    /// The dotted key, e.g. `sampling.top_p`.
    pub key: &'static str,
    /// The value given, as TOML would write it.
    pub value: String,
    /// The allowed range, in words.
    pub expected: &'static str,
}

/// plait's user configuration: `config.toml`, then `-c key=value` overrides.
///
/// Every key is optional; `config.example.toml` documents them all.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AppConfig {
    /// Checkpoint directory or `.gguf` file to run; `None` runs the default model.
    pub model: Option<PathBuf>,
    /// Parallel loop count (1..=8); `None` uses the checkpoint's trained count.
    pub loops: Option<usize>,
    /// System prompt; `None` uses the chat template's own default.
    pub system_prompt: Option<String>,
    /// Most tokens kept in context; `None` uses the model's context length.
    pub context_size: Option<usize>,
    /// CPU threads (at least 1); `None` leaves it to the runtime.
    pub threads: Option<usize>,
    /// Device to run on (`cpu`, `cuda`, `cuda:N`); `None` is the CPU.
    pub device: Option<DeviceSpec>,
    /// Terminal interface theme: `"dark"` or `"light"`.
    pub theme: String,
    /// Most tokens to generate for one reply.
    pub max_tokens: usize,
    /// Bytes of KV cache (MiB) the engine keeps across conversations; `None`: sized to the
    /// machine's memory.
    pub cache_budget_mib: Option<usize>,
    /// How tokens are chosen.
    pub sampling: SamplingConfig,
    /// `plait serve`'s settings.
    pub serve: ServeConfig,
    /// The server `plait --remote` answers with.
    pub remote: RemoteConfig,
}

/// The `[remote]` section: an OpenAI-compatible server the TUI answers with.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RemoteConfig {
    /// The server's address (with or without `/v1`); `None`: run the model here, unless
    /// `--remote` gives one.
    pub url: Option<String>,
    /// The environment variable that holds the API key (`--api-key` comes first).
    pub api_key_env: String,
    /// The model to ask for; `None`: the first the server lists.
    pub model: Option<String>,
    /// The context size when the server does not report one.
    pub context_size: Option<usize>,
    /// Fields added to every request as they are (vLLM's `top_k`, `chat_template_kwargs`).
    pub extra: toml::Table,
}

impl Default for RemoteConfig {
    fn default() -> Self {
        Self {
            url: None,
            api_key_env: "PLAIT_API_KEY".to_owned(),
            model: None,
            context_size: None,
            extra: toml::Table::new(),
        }
    }
}

/// Whether `url` is an http(s) address.
pub fn is_http_url(url: &str) -> bool {
    let lower = url.to_ascii_lowercase();
    ["http://", "https://"].iter().any(|scheme| {
        lower
            .strip_prefix(scheme)
            .is_some_and(|rest| !rest.is_empty())
    })
}

/// The `[serve]` section: the HTTP server's settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeConfig {
    /// Address to listen on.
    pub host: String,
    /// Port to listen on.
    pub port: u16,
    /// Key every route but /health needs as `Authorization: Bearer KEY`; `None`: no key.
    pub api_key: Option<String>,
    /// Answers run together, their loop rows in one batch per decode step.
    pub max_conversations: usize,
    /// Prompt positions computed between two decode steps of the running answers.
    pub prefill_chunk: usize,
    /// Requests that may wait behind the running ones; more get 503.
    pub queue_length: usize,
    /// Largest request body in bytes; larger ones get 413.
    pub max_body_bytes: usize,
    /// Origins browsers may call from (CORS); empty: no CORS headers.
    pub cors_origins: Vec<String>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".to_owned(),
            port: 8080,
            api_key: None,
            max_conversations: 4,
            prefill_chunk: 512,
            queue_length: 16,
            max_body_bytes: 8 << 20,
            cors_origins: Vec::new(),
        }
    }
}

impl Default for AppConfig {
    fn default() -> Self {
        Self {
            model: None,
            loops: None,
            system_prompt: None,
            context_size: None,
            threads: None,
            device: None,
            theme: "dark".to_owned(),
            max_tokens: 1024,
            cache_budget_mib: None,
            sampling: SamplingConfig::default(),
            serve: ServeConfig::default(),
            remote: RemoteConfig::default(),
        }
    }
}

/// The `[sampling]` section: the requests' sampling settings (the defaults are greedy).
pub type SamplingConfig = SamplingParams;

impl AppConfig {
    /// Reads `path` (or `config_dir()/config.toml`, where a missing file means the defaults),
    /// then applies `-c key=value` overrides in order, and checks ranges.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Self, ConfigError> {
        match path {
            Some(path) => Self::load_file(path, true, overrides),
            None => match config_file_path() {
                Ok(path) => Self::load_file(&path, false, overrides),
                // Without a home there is no file to read, and plait can still run on defaults.
                Err(e) => {
                    tracing::debug!("no configuration file: {e}");
                    Self::from_sources(None, overrides)
                }
            },
        }
    }

    /// Loads `path`; a missing file is an error only when `required`.
    fn load_file(path: &Path, required: bool, overrides: &[String]) -> Result<Self, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::from_sources(Some((path, &text)), overrides),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if required {
                    Err(ConfigError::Missing {
                        path: path.to_path_buf(),
                    })
                } else {
                    tracing::debug!("no configuration file at {}", path.display());
                    Self::from_sources(None, overrides)
                }
            }
            Err(source) => Err(ConfigError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Parses a configuration file's `text` (`path` names it in errors), then applies overrides.
    pub fn from_toml(path: &Path, text: &str, overrides: &[String]) -> Result<Self, ConfigError> {
        Self::from_sources(Some((path, text)), overrides)
    }

    /// The file (if any) then the overrides; each is checked as it is added, so an error is
    /// blamed on the file or on the one override that caused it.
    fn from_sources(
        file: Option<(&Path, &str)>,
        overrides: &[String],
    ) -> Result<Self, ConfigError> {
        let (mut config, mut table) = match file {
            Some((path, text)) => parse_file(path, text)?,
            None => (Self::default(), toml::Table::new()),
        };
        for text in overrides {
            let (keys, value) = parse_override(text)?;
            set_key(&mut table, &keys, value);
            let origin = Origin::Override(text.clone());
            // Deserializing the edited table (not the value alone) reports type errors exactly
            // as for the file, and the table before this override was already valid.
            config = serde_path_to_error::deserialize(table.clone())
                .map_err(|e| deserialize_error(origin.clone(), e))?;
            config
                .validate()
                .map_err(|error| ConfigError::OutOfRange { origin, error })?;
        }
        Ok(config)
    }

    /// Checks every value is in its range.
    pub fn validate(&self) -> Result<(), RangeError> {
        fn fail(key: &'static str, value: impl fmt::Display, expected: &'static str) -> RangeError {
            RangeError {
                key,
                value: value.to_string(),
                expected,
            }
        }
        if let Some(loops) = self.loops.filter(|n| !(1..=MAX_LOOPS).contains(n)) {
            return Err(fail("loops", loops, LOOPS_RANGE));
        }
        if let Some(size) = self.context_size.filter(|&n| n == 0) {
            return Err(fail("context_size", size, "at least 1"));
        }
        if let Some(threads) = self.threads.filter(|&n| n == 0) {
            return Err(fail("threads", threads, "at least 1"));
        }
        if let Some(device) = self.device.filter(|d| !d.is_available()) {
            return Err(fail("device", format!("\"{device}\""), DEVICE_WITHOUT_CUDA));
        }
        if Theme::from_name(&self.theme).is_none() {
            return Err(fail(
                "theme",
                format!("{:?}", self.theme),
                "\"dark\" or \"light\"",
            ));
        }
        if self.max_tokens == 0 {
            return Err(fail("max_tokens", self.max_tokens, "at least 1"));
        }
        if let Some(mib) = self.cache_budget_mib.filter(|&n| n == 0) {
            return Err(fail("cache_budget_mib", mib, "at least 1"));
        }
        if self.serve.max_conversations == 0 {
            return Err(fail(
                "serve.max_conversations",
                self.serve.max_conversations,
                "at least 1",
            ));
        }
        if self.serve.prefill_chunk == 0 {
            return Err(fail(
                "serve.prefill_chunk",
                self.serve.prefill_chunk,
                "at least 1",
            ));
        }
        if self.serve.max_body_bytes < 1024 {
            return Err(fail(
                "serve.max_body_bytes",
                self.serve.max_body_bytes,
                "at least 1024",
            ));
        }
        if self.serve.api_key.as_deref() == Some("") {
            return Err(fail("serve.api_key", "\"\"", "a non-empty key"));
        }
        if let Some(url) = self.remote.url.as_deref().filter(|u| !is_http_url(u)) {
            return Err(fail(
                "remote.url",
                format!("{url:?}"),
                "an http:// or https:// address",
            ));
        }
        if let Some(size) = self.remote.context_size.filter(|&n| n == 0) {
            return Err(fail("remote.context_size", size, "at least 1"));
        }
        let s = &self.sampling;
        // Written so NaN fails every check (TOML allows `nan`).
        if !(s.temperature >= 0.0 && s.temperature.is_finite()) {
            return Err(fail("sampling.temperature", s.temperature, "a number >= 0"));
        }
        if !(0.0..=1.0).contains(&s.top_p) {
            return Err(fail("sampling.top_p", s.top_p, "0 to 1"));
        }
        if !(0.0..=1.0).contains(&s.min_p) {
            return Err(fail("sampling.min_p", s.min_p, "0 to 1"));
        }
        if !(s.repetition_penalty > 0.0 && s.repetition_penalty.is_finite()) {
            return Err(fail(
                "sampling.repetition_penalty",
                s.repetition_penalty,
                "a number > 0",
            ));
        }
        Ok(())
    }
}

/// Parses and checks a configuration file; returns it both deserialized and as a table to
/// apply overrides to.
fn parse_file(path: &Path, text: &str) -> Result<(AppConfig, toml::Table), ConfigError> {
    let origin = |span: Option<std::ops::Range<usize>>| Origin::File {
        path: path.to_path_buf(),
        line: span.map(|s| line_of(text, s.start)),
    };
    let deserializer = toml::Deserializer::parse(text).map_err(|e| ConfigError::Invalid {
        origin: origin(e.span()),
        key: None,
        message: e.message().to_owned(),
    })?;
    let config: AppConfig = serde_path_to_error::deserialize(deserializer)
        .map_err(|e| deserialize_error(origin(e.inner().span()), e))?;
    config.validate().map_err(|error| ConfigError::OutOfRange {
        origin: origin(value_span(text, error.key)),
        error,
    })?;
    // The text parsed above, so this cannot fail; map the error anyway rather than panic.
    let table = text
        .parse::<toml::Table>()
        .map_err(|e| ConfigError::Invalid {
            origin: origin(e.span()),
            key: None,
            message: e.message().to_owned(),
        })?;
    Ok((config, table))
}

/// The 1-based line holding byte `offset` of `text`.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Where the value of dotted `key` is in `text`, to give a line for a range error.
fn value_span(text: &str, key: &str) -> Option<std::ops::Range<usize>> {
    let root = toml::de::DeTable::parse(text).ok()?;
    let mut table = root.get_ref();
    let mut parts = key.split('.').peekable();
    while let Some(part) = parts.next() {
        let (_, value) = table.iter().find(|(k, _)| k.get_ref() == part)?;
        if parts.peek().is_none() {
            return Some(value.span());
        }
        table = value.get_ref().as_table()?;
    }
    None
}

/// Turns a serde error (with its key path) into a [`ConfigError`].
fn deserialize_error(
    origin: Origin,
    error: serde_path_to_error::Error<toml::de::Error>,
) -> ConfigError {
    let key = (error.path().iter().next().is_some()).then(|| error.path().to_string());
    let message = error.inner().message().to_owned();
    // serde's deny_unknown_fields message; the path already ends with the unknown key.
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let expected = rest.split_once("`, ").map(|(_, e)| e.to_owned());
        let key = key.unwrap_or_else(|| rest.split('`').next().unwrap_or_default().to_owned());
        return ConfigError::UnknownKey {
            origin,
            key,
            expected,
        };
    }
    ConfigError::Invalid {
        origin,
        key,
        message,
    }
}

/// Splits `key=value` into the dotted key's parts and the value: TOML when it parses as a
/// TOML value, else the text as a string (so `theme=light` works without shell quoting).
fn parse_override(text: &str) -> Result<(Vec<String>, toml::Value), ConfigError> {
    let bad = |reason: &str| ConfigError::BadOverride {
        text: text.to_owned(),
        reason: reason.to_owned(),
    };
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| bad("expected key=value, e.g. sampling.temperature=0.7"))?;
    let keys: Vec<String> = key.split('.').map(|k| k.trim().to_owned()).collect();
    if keys.iter().any(String::is_empty) {
        return Err(bad("empty key"));
    }
    let value = value.trim();
    let value = value
        .parse::<toml::Value>()
        .unwrap_or_else(|_| toml::Value::String(value.to_owned()));
    Ok((keys, value))
}

/// Sets dotted `keys` in `table`, making tables on the way; an override wins over whatever
/// was there, even a non-table (the result then fails to deserialize with a type error).
fn set_key(table: &mut toml::Table, keys: &[String], value: toml::Value) {
    let Some((last, parents)) = keys.split_last() else {
        return;
    };
    let mut table = table;
    for key in parents {
        let entry = table
            .entry(key.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        table = match entry {
            toml::Value::Table(t) => t,
            // Made a table just above.
            _ => return,
        };
    }
    table.insert(last.clone(), value);
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

/// The directory in environment variable `var` when set and not empty.
fn env_dir(var: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
}

/// The platform's directories for plait; `None` without a home directory.
fn project_dirs() -> Option<directories::ProjectDirs> {
    directories::ProjectDirs::from("", "", "plait")
}

/// plait's data directory: `PLAIT_DATA_DIR`, else the platform's (`~/.local/share/plait`).
pub fn data_dir() -> Result<PathBuf, ConfigError> {
    if let Some(dir) = env_dir("PLAIT_DATA_DIR") {
        return Ok(dir);
    }
    project_dirs()
        .map(|d| d.data_dir().to_path_buf())
        .ok_or(ConfigError::NoDataDir)
}

/// plait's configuration directory: `PLAIT_CONFIG_DIR`, else the platform's (`~/.config/plait`).
pub fn config_dir() -> Result<PathBuf, ConfigError> {
    if let Some(dir) = env_dir("PLAIT_CONFIG_DIR") {
        return Ok(dir);
    }
    project_dirs()
        .map(|d| d.config_dir().to_path_buf())
        .ok_or(ConfigError::NoConfigDir)
}

/// The configuration file read when none is named: `config_dir()/config.toml`.
pub fn config_file_path() -> Result<PathBuf, ConfigError> {
    Ok(config_dir()?.join(CONFIG_FILE_NAME))
}

/// plait's state directory, for logs: `PLAIT_STATE_DIR`, else the platform's
/// (`~/.local/state/plait`; the local data directory where the platform has no state directory).
pub fn state_dir() -> Result<PathBuf, ConfigError> {
    if let Some(dir) = env_dir("PLAIT_STATE_DIR") {
        return Ok(dir);
    }
    project_dirs()
        .map(|d| {
            // Only Linux has a state directory; elsewhere logs go with local (unsynced) data.
            d.state_dir()
                .unwrap_or_else(|| d.data_local_dir())
                .to_path_buf()
        })
        .ok_or(ConfigError::NoStateDir)
}

/// The log file: `state_dir()/plait.log`.
pub fn log_file_path() -> Result<PathBuf, ConfigError> {
    Ok(state_dir()?.join(LOG_FILE_NAME))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example configuration shipped at the repository root.
    const EXAMPLE: &str = include_str!("../config.example.toml");

    fn file(text: &str) -> Result<AppConfig, ConfigError> {
        AppConfig::from_toml(Path::new("config.toml"), text, &[])
    }

    fn with(overrides: &[&str]) -> Result<AppConfig, ConfigError> {
        let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        AppConfig::from_sources(None, &overrides)
    }

    fn file_line(err: &ConfigError) -> Option<usize> {
        match err {
            ConfigError::Invalid { origin, .. }
            | ConfigError::UnknownKey { origin, .. }
            | ConfigError::OutOfRange { origin, .. } => match origin {
                Origin::File { line, .. } => *line,
                Origin::Override(_) => None,
            },
            _ => None,
        }
    }

    /// The field names of a struct, from what its derived `Deserialize` asks for.
    fn field_names<T: serde::de::DeserializeOwned>() -> Vec<String> {
        use serde::de::{Error as _, Visitor};
        struct Fields;
        impl<'de> serde::Deserializer<'de> for Fields {
            type Error = serde::de::value::Error;
            fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
                Err(Self::Error::custom("not a struct"))
            }
            fn deserialize_struct<V: Visitor<'de>>(
                self,
                _: &'static str,
                fields: &'static [&'static str],
                _: V,
            ) -> Result<V::Value, Self::Error> {
                Err(Self::Error::custom(fields.join(" ")))
            }
            serde::forward_to_deserialize_any! {
                bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
                byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
                identifier ignored_any
            }
        }
        let err = T::deserialize(Fields).err().unwrap().to_string();
        err.split(' ').map(str::to_owned).collect()
    }

    #[test]
    fn the_embedded_manifest_parses() {
        let m = DefaultModel::manifest().unwrap();
        assert!(m.file.ends_with(".gguf"));
        assert_eq!(m.sha256.len(), 64);
    }

    #[test]
    fn defaults() {
        let c = AppConfig::default();
        assert_eq!(c.model, None);
        assert_eq!(c.loops, None);
        assert_eq!(c.system_prompt, None);
        assert_eq!(c.context_size, None);
        assert_eq!(c.threads, None);
        assert_eq!(c.theme, "dark");
        assert_eq!(c.max_tokens, 1024);
        let s = &c.sampling;
        assert_eq!(
            (s.temperature, s.top_k, s.top_p, s.min_p),
            (0.0, 0, 1.0, 0.0)
        );
        assert_eq!((s.repetition_penalty, s.seed), (1.0, 0));
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(file("").unwrap(), c);
        assert_eq!(file("# nothing\n[sampling]\n").unwrap(), c);
        assert_eq!(with(&[]).unwrap(), c);
    }

    #[test]
    fn sampling_defaults_match_the_samplers() {
        assert_eq!(SamplingConfig::default(), SamplingParams::default());
    }

    #[test]
    fn a_file_sets_every_kind_of_value() {
        let c = file(
            "model = \"/models/m.gguf\"\nloops = 3\nsystem_prompt = \"Be terse\"\n\
             context_size = 4096\nthreads = 2\ntheme = \"light\"\nmax_tokens = 64\n\
             [sampling]\ntemperature = 0.7\ntop_k = 40\ntop_p = 0.9\nmin_p = 0.05\n\
             repetition_penalty = 1.1\nseed = 42\n",
        )
        .unwrap();
        assert_eq!(c.model.as_deref(), Some(Path::new("/models/m.gguf")));
        assert_eq!(c.loops, Some(3));
        assert_eq!(c.system_prompt.as_deref(), Some("Be terse"));
        assert_eq!((c.context_size, c.threads), (Some(4096), Some(2)));
        assert_eq!((c.theme.as_str(), c.max_tokens), ("light", 64));
        let p = c.sampling.clone();
        assert_eq!(
            (p.temperature, p.top_k, p.top_p, p.min_p),
            (0.7, 40, 0.9, 0.05)
        );
        assert_eq!((p.repetition_penalty, p.seed), (1.1, 42));
    }

    #[test]
    fn overrides_of_each_kind() {
        assert_eq!(with(&["loops=3"]).unwrap().loops, Some(3));
        assert_eq!(with(&["max_tokens = 10"]).unwrap().max_tokens, 10);
        assert_eq!(
            with(&["sampling.temperature=0.7"])
                .unwrap()
                .sampling
                .temperature,
            0.7
        );
        assert_eq!(with(&["sampling.seed=7"]).unwrap().sampling.seed, 7);
        // Quotes that reach plait make a TOML string; the shell usually strips them, and
        // text that is not TOML is taken as a string anyway.
        for o in ["system_prompt=\"Be terse\"", "system_prompt=Be terse"] {
            assert_eq!(
                with(&[o]).unwrap().system_prompt.as_deref(),
                Some("Be terse")
            );
        }
        assert_eq!(with(&["theme=light"]).unwrap().theme, "light");
        assert_eq!(
            with(&["model=/models/m.gguf"]).unwrap().model.as_deref(),
            Some(Path::new("/models/m.gguf"))
        );
        // Only the first `=` splits, so values may contain one.
        assert_eq!(
            with(&["system_prompt=a=b"])
                .unwrap()
                .system_prompt
                .as_deref(),
            Some("a=b")
        );
        assert_eq!(
            with(&["system_prompt="]).unwrap().system_prompt.as_deref(),
            Some("")
        );
    }

    #[test]
    fn nested_overrides() {
        let c = with(&["sampling.top_k=40", "sampling.top_p=0.9"]).unwrap();
        assert_eq!((c.sampling.top_k, c.sampling.top_p), (40, 0.9));
        // A whole section as an inline table replaces the section.
        let c = with(&["sampling.top_k=40", "sampling={ min_p = 0.1 }"]).unwrap();
        assert_eq!((c.sampling.top_k, c.sampling.min_p), (0, 0.1));
    }

    #[test]
    fn overrides_win_over_the_file_and_later_over_earlier() {
        let overrides = vec![
            "sampling.temperature=0.5".to_owned(),
            "loops=2".to_owned(),
            "loops=4".to_owned(),
        ];
        let c = AppConfig::from_toml(
            Path::new("config.toml"),
            "loops = 1\n[sampling]\ntemperature = 0.2\ntop_k = 5\n",
            &overrides,
        )
        .unwrap();
        assert_eq!(c.loops, Some(4));
        assert_eq!((c.sampling.temperature, c.sampling.top_k), (0.5, 5));
    }

    #[test]
    fn bad_overrides_name_the_override() {
        for o in [
            "loops",
            "=3",
            ".loops=3",
            "sampling..top_k=1",
            "sampling.=1",
        ] {
            let err = with(&[o]).unwrap_err();
            assert!(
                matches!(&err, ConfigError::BadOverride { text, .. } if text == o),
                "{o}: {err}"
            );
            assert!(err.to_string().contains(o), "{err}");
        }
        let err = with(&["loops=three"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "override `loops=three`: loops: invalid type: string \"three\", expected usize"
        );
        let err = with(&["loops=3", "sampling.top_k=-1"]).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Invalid { origin: Origin::Override(t), key: Some(k), .. }
                if t == "sampling.top_k=-1" && k == "sampling.top_k"),
            "{err}"
        );
        // Descending into a value that is not a table is a type error for that key.
        let err = with(&["loops=3", "loops.x=1"]).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Invalid { key: Some(k), .. } if k == "loops"),
            "{err}"
        );
        let err = with(&["sampling=3"]).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("override `sampling=3`: sampling: invalid type"),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = file("loops = 2\ncolour = \"red\"\n").unwrap_err();
        assert!(
            matches!(&err, ConfigError::UnknownKey { key, .. } if key == "colour"),
            "{err}"
        );
        assert_eq!(file_line(&err), Some(2));
        assert!(
            err.to_string()
                .starts_with("config.toml line 2: unknown key `colour`; expected one of `model`"),
            "{err}"
        );

        let err = file("[sampling]\n\ntempurature = 0.5\n").unwrap_err();
        assert!(
            matches!(&err, ConfigError::UnknownKey { key, .. } if key == "sampling.tempurature"),
            "{err}"
        );
        assert_eq!(file_line(&err), Some(3));
        assert!(err.to_string().contains("`temperature`"), "{err}");

        let err = with(&["sampling.tempurature=0.5"]).unwrap_err();
        assert!(
            matches!(&err, ConfigError::UnknownKey { origin: Origin::Override(o), key, .. }
                if o == "sampling.tempurature=0.5" && key == "sampling.tempurature"),
            "{err}"
        );
    }

    #[test]
    fn wrong_types_give_the_line_and_key() {
        let err = file("loops = 3\n\n[sampling]\ntemperature = \"hot\"\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "config.toml line 4: sampling.temperature: invalid type: string \"hot\", expected f64"
        );
        assert_eq!(file_line(&err), Some(4));
        let err = file("theme = 1\n").unwrap_err();
        assert!(
            matches!(&err, ConfigError::Invalid { key: Some(k), .. } if k == "theme"),
            "{err}"
        );
        assert_eq!(file_line(&err), Some(1));
    }

    #[test]
    fn syntax_errors_give_the_line() {
        let err = file("loops = 3\ntheme = light\n").unwrap_err();
        assert!(
            matches!(&err, ConfigError::Invalid { key: None, .. }),
            "{err}"
        );
        assert_eq!(file_line(&err), Some(2));
        assert!(err.to_string().starts_with("config.toml line 2: "), "{err}");
    }

    #[test]
    fn out_of_range_values_name_the_key() {
        let cases = [
            ("loops = 0", "loops"),
            ("loops = 9", "loops"),
            ("threads = 0", "threads"),
            ("context_size = 0", "context_size"),
            ("max_tokens = 0", "max_tokens"),
            ("theme = \"blue\"", "theme"),
            ("[sampling]\ntemperature = -0.1", "sampling.temperature"),
            ("[sampling]\ntemperature = nan", "sampling.temperature"),
            ("[sampling]\ntop_p = 1.5", "sampling.top_p"),
            ("[sampling]\nmin_p = -0.5", "sampling.min_p"),
            (
                "[sampling]\nrepetition_penalty = 0.0",
                "sampling.repetition_penalty",
            ),
            ("sampling = { top_p = 2.0 }", "sampling.top_p"),
        ];
        for (text, key) in cases {
            let err = file(&format!("# leading comment\n{text}\n")).unwrap_err();
            assert!(
                matches!(&err, ConfigError::OutOfRange { error, .. } if error.key == key),
                "{text}: {err}"
            );
            let line = text.lines().count() + 1;
            assert_eq!(file_line(&err), Some(line), "{text}: {err}");
            assert!(err.to_string().contains(key), "{err}");
        }
        let err = file("loops = 9\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "config.toml line 1: loops = 9 is out of range: expected 1 to 8"
        );
        let err = with(&["sampling.top_p=1.5"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "override `sampling.top_p=1.5`: sampling.top_p = 1.5 is out of range: expected 0 to 1"
        );
        // The edges are allowed.
        let ok = with(&["loops=1", "loops=8", "sampling.top_p=0", "sampling.min_p=1"]);
        assert!(ok.is_ok(), "{ok:?}");
    }

    #[test]
    fn a_missing_explicit_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope.toml");
        let err = AppConfig::load(Some(&path), &[]).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Missing { path: p } if *p == path),
            "{err}"
        );
        assert!(err.to_string().contains("nope.toml"), "{err}");
    }

    #[test]
    fn a_missing_default_file_means_defaults_plus_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CONFIG_FILE_NAME);
        let c = AppConfig::load_file(&path, false, &["loops=2".to_owned()]).unwrap();
        assert_eq!(
            c,
            AppConfig {
                loops: Some(2),
                ..AppConfig::default()
            }
        );
    }

    #[test]
    fn load_reads_the_file_and_names_it_in_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("my.toml");
        std::fs::write(&path, "theme = \"light\"\n[sampling]\nseed = 3\n").unwrap();
        let c = AppConfig::load(Some(&path), &["sampling.top_k=9".to_owned()]).unwrap();
        assert_eq!(
            (c.theme.as_str(), c.sampling.seed, c.sampling.top_k),
            ("light", 3, 9)
        );

        std::fs::write(&path, "\nmax_tokens = \"many\"\n").unwrap();
        let err = AppConfig::load(Some(&path), &[]).unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("{} line 2: max_tokens: ", path.display())),
            "{err}"
        );

        let err = AppConfig::load(Some(dir.path()), &[]).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err}");
    }

    #[test]
    fn device_is_checked_and_named() {
        assert_eq!(with(&["device=cpu"]).unwrap().device, Some(DeviceSpec::Cpu));
        let err = file("threads = 2\ndevice = \"gpu\"\n").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("line 2") && text.contains("device"), "{text}");
        assert!(text.contains("expected cpu, cuda or cuda:N"), "{text}");
        let cuda = with(&["device=cuda:1"]);
        if cfg!(feature = "cuda") {
            assert_eq!(cuda.unwrap().device, Some(DeviceSpec::Cuda(1)));
        } else {
            let text = cuda.unwrap_err().to_string();
            assert!(
                text.contains("device") && text.contains("--features cuda"),
                "{text}"
            );
        }
    }

    #[test]
    fn the_example_is_the_defaults() {
        let c = AppConfig::from_toml(Path::new("config.example.toml"), EXAMPLE, &[]).unwrap();
        assert_eq!(c, AppConfig::default());
    }

    /// The example with its commented-out settings (`# key = value`) switched on.
    fn example_uncommented() -> String {
        EXAMPLE
            .lines()
            .map(|line| {
                let rest = line.strip_prefix("# ").unwrap_or(line);
                let is_setting = rest.split_once(" = ").is_some_and(|(k, _)| {
                    !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                });
                if is_setting {
                    rest
                } else {
                    line
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn the_example_documents_every_key() {
        let text = example_uncommented();
        // Every setting in it is a real key with a valid value...
        let path = Path::new("config.example.toml");
        AppConfig::from_toml(path, &text, &[]).unwrap();
        // ...and every key is in it.
        let table: toml::Table = text.parse().unwrap();
        for field in field_names::<AppConfig>() {
            assert!(
                table.contains_key(&field),
                "config.example.toml lacks `{field}`"
            );
        }
        let sampling = table["sampling"].as_table().unwrap();
        for field in field_names::<SamplingConfig>() {
            assert!(
                sampling.contains_key(&field),
                "config.example.toml lacks `sampling.{field}`"
            );
        }
        let serve = table["serve"].as_table().unwrap();
        for field in field_names::<ServeConfig>() {
            assert!(
                serve.contains_key(&field),
                "config.example.toml lacks `serve.{field}`"
            );
        }
        let remote = table["remote"].as_table().unwrap();
        for field in field_names::<RemoteConfig>() {
            assert!(
                remote.contains_key(&field),
                "config.example.toml lacks `remote.{field}`"
            );
        }
        assert_eq!(field_names::<RemoteConfig>().len(), 5);
        assert_eq!(field_names::<AppConfig>().len(), 12);
        assert_eq!(field_names::<ServeConfig>().len(), 8);
        assert_eq!(field_names::<SamplingConfig>().len(), 6);
    }
}

//! `config.json` of a LoopCoder-V2-family checkpoint, with the contract's defaults.

use std::path::Path;

use serde::Deserialize;

use super::error::{ModelError, Result};

/// The model types plait runs from a safetensors checkpoint.
pub const SUPPORTED_MODEL_TYPES: &str = "iquestpltcoder";

/// `eos_token_id` is an int or a list of ints.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum TokenIds {
    /// A single id.
    One(u32),
    /// Several ids.
    Many(Vec<u32>),
}

impl TokenIds {
    /// The ids as a list.
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// config.json as written by the checkpoint; `None` means absent or null.
#[derive(Debug, Clone, Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    max_position_embeddings: Option<usize>,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    rms_norm_eps: Option<f64>,
    hidden_act: Option<String>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<TokenIds>,
    plt_num_loops: Option<usize>,
    plt_window_size: Option<Vec<usize>>,
    plt_emb_scale: Option<f64>,
    plt_hidden_scale: Option<f64>,
    plt_normalize_per_loop: Option<bool>,
    plt_gate_use_hidden_states: Option<bool>,
}

/// A checkpoint's hyperparameters, every default of the contract applied.
#[derive(Debug, Clone, PartialEq)]
pub struct PltConfig {
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP's inner layer.
    pub intermediate_size: usize,
    /// Decoder layers per loop.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA).
    pub num_key_value_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Longest sequence the model supports.
    pub max_position_embeddings: usize,
    /// RoPE base.
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Whether lm_head reuses the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence id, when the config names one.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence ids named by config.json.
    pub eos_token_ids: Vec<u32>,
    /// Loop count the checkpoint was trained with.
    pub plt_num_loops: usize,
    /// Sliding window of loops >= 1 (keys t-window..=t).
    pub plt_window: usize,
    /// Scale of the token embedding in loops >= 1.
    pub plt_emb_scale: f64,
    /// Scale of the previous loop's carried hidden state in loops >= 1.
    pub plt_hidden_scale: f64,
    /// Whether the carry passes through the final norm.
    pub plt_normalize_per_loop: bool,
    /// Hidden-state gate (true) or query gate (false).
    pub plt_gate_use_hidden_states: bool,
}

impl PltConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                ModelError::NotFound {
                    what: "config.json",
                    path: path.to_path_buf(),
                }
            } else {
                ModelError::Io {
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
        Self::from_json(&text, path)
    }

    /// Parses config.json text; `path` is only used in error messages.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            let message = e.inner().to_string();
            config_error(path, &field, message)
        })?;
        let model_type = raw.model_type.clone().unwrap_or_default();
        if model_type != "iquestpltcoder" {
            return Err(ModelError::UnknownModelType {
                path: path.to_path_buf(),
                found: model_type,
                supported: SUPPORTED_MODEL_TYPES,
            });
        }
        Self::from_raw(raw, path)
    }

    fn from_raw(raw: RawConfig, path: &Path) -> Result<Self> {
        let err = |field: &str, message: String| config_error(path, field, message);
        if let Some(act) = raw.hidden_act.as_deref() {
            if act != "silu" {
                return Err(err(
                    "hidden_act",
                    format!("`{act}` is not supported (silu)"),
                ));
            }
        }
        if raw.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(err("rope_scaling", "RoPE scaling is not supported".into()));
        }
        if raw.attention_bias == Some(true) {
            return Err(err(
                "attention_bias",
                "attention biases are not supported".into(),
            ));
        }
        if raw.mlp_bias == Some(true) {
            return Err(err("mlp_bias", "MLP biases are not supported".into()));
        }
        let positive = |field: &str, v: usize| {
            if v == 0 {
                Err(err(field, "must be at least 1".into()))
            } else {
                Ok(v)
            }
        };
        let hidden_size = positive("hidden_size", raw.hidden_size)?;
        let num_attention_heads = positive("num_attention_heads", raw.num_attention_heads)?;
        let num_key_value_heads = positive(
            "num_key_value_heads",
            raw.num_key_value_heads.unwrap_or(num_attention_heads),
        )?;
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(err(
                "num_key_value_heads",
                format!("{num_key_value_heads} does not divide num_attention_heads {num_attention_heads}"),
            ));
        }
        let head_dim = match raw.head_dim {
            Some(d) => positive("head_dim", d)?,
            None if hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
            None => {
                return Err(err(
                    "head_dim",
                    "absent, and hidden_size is not a multiple of num_attention_heads".into(),
                ))
            }
        };
        if head_dim % 2 != 0 {
            return Err(err(
                "head_dim",
                format!("{head_dim} is odd; RoPE needs an even head_dim"),
            ));
        }
        let plt_num_loops = positive("plt_num_loops", raw.plt_num_loops.unwrap_or(1))?;
        let plt_window = match raw.plt_window_size.as_deref() {
            None => 0,
            Some([]) => return Err(err("plt_window_size", "is an empty list".into())),
            Some([w, ..]) => *w,
        };
        let rms_norm_eps = raw.rms_norm_eps.unwrap_or(1e-6);
        if rms_norm_eps.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
            return Err(err(
                "rms_norm_eps",
                format!("{rms_norm_eps} must be positive"),
            ));
        }
        let rope_theta = raw.rope_theta.unwrap_or(10000.0);
        if rope_theta.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
            return Err(err("rope_theta", format!("{rope_theta} must be positive")));
        }
        Ok(Self {
            hidden_size,
            intermediate_size: positive("intermediate_size", raw.intermediate_size)?,
            num_hidden_layers: positive("num_hidden_layers", raw.num_hidden_layers)?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size: positive("vocab_size", raw.vocab_size)?,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(2048),
            rope_theta,
            rms_norm_eps,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            bos_token_id: raw.bos_token_id,
            eos_token_ids: raw.eos_token_id.map(|e| e.to_vec()).unwrap_or_default(),
            plt_num_loops,
            plt_window,
            plt_emb_scale: raw.plt_emb_scale.unwrap_or(1.0),
            plt_hidden_scale: raw.plt_hidden_scale.unwrap_or(1.0),
            plt_normalize_per_loop: raw.plt_normalize_per_loop.unwrap_or(false),
            plt_gate_use_hidden_states: raw.plt_gate_use_hidden_states.unwrap_or(false),
        })
    }

    /// Query heads that share one key/value head.
    pub fn group_size(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }
}

fn config_error(path: &Path, field: &str, message: String) -> ModelError {
    ModelError::Config {
        path: path.to_path_buf(),
        field: field.to_string(),
        message,
    }
}

/// Reads `eos_token_id` (int or list) from `generation_config.json`, if the file exists.
pub fn generation_eos_ids(path: &Path) -> Result<Vec<u32>> {
    #[derive(Deserialize)]
    struct GenerationConfig {
        eos_token_id: Option<TokenIds>,
    }
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(ModelError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let de = &mut serde_json::Deserializer::from_str(&text);
    let cfg: GenerationConfig = serde_path_to_error::deserialize(de)
        .map_err(|e| config_error(path, &e.path().to_string(), e.inner().to_string()))?;
    Ok(cfg.eos_token_id.map(|e| e.to_vec()).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"{"model_type":"iquestpltcoder","hidden_size":64,"intermediate_size":128,
        "num_hidden_layers":2,"num_attention_heads":4,"vocab_size":10"#;

    fn parse(extra: &str) -> Result<PltConfig> {
        PltConfig::from_json(&format!("{BASE}{extra}}}"), Path::new("config.json"))
    }

    #[test]
    fn absent_and_null_fields_take_the_contract_defaults() {
        let c = parse(r#","plt_emb_scale":null"#).unwrap();
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.num_key_value_heads, 4);
        assert_eq!(c.plt_emb_scale, 1.0);
        assert_eq!(c.plt_hidden_scale, 1.0);
        assert!(!c.plt_normalize_per_loop);
        assert!(!c.plt_gate_use_hidden_states);
        assert!(!c.tie_word_embeddings);
        assert_eq!(c.plt_num_loops, 1);
    }

    #[test]
    fn zero_hidden_scale_is_a_value_not_absent() {
        let c = parse(r#","plt_hidden_scale":0.0,"eos_token_id":[2,7]"#).unwrap();
        assert_eq!(c.plt_hidden_scale, 0.0);
        assert_eq!(c.eos_token_ids, vec![2, 7]);
    }

    #[test]
    fn wrong_type_names_the_field() {
        let e = parse(r#","plt_emb_scale":"big""#).unwrap_err().to_string();
        assert!(e.contains("plt_emb_scale"), "{e}");
        let e = parse(r#","plt_window_size":[4,"x"]"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("plt_window_size"), "{e}");
    }

    #[test]
    fn unknown_model_type_is_named() {
        let text = BASE.replace("iquestpltcoder", "mamba") + "}";
        let e = PltConfig::from_json(&text, Path::new("config.json")).unwrap_err();
        assert!(e.to_string().contains("`mamba`"), "{e}");
    }
}

//! `plait convert`: a LoopCoder-V2-layout checkpoint to one GGUF file with PLT metadata,
//! the SentencePiece tokenizer and the chat template.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use super::chat::ChatTemplate;
use super::config::{generation_eos_ids, PltConfig};
use super::error::{ModelError, Result};
use super::gguf::gguf_tensor_name;
use super::sentencepiece::{PieceType, SpmModel};
use super::tokenizer::TokenizerConfig;
use super::weights::Checkpoint;

/// The storage type of the converted matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quant {
    /// 8-bit blocks of 32.
    Q8_0,
    /// 4-bit k-quant blocks of 256.
    Q4K,
    /// 4-bit blocks of 32.
    Q4_0,
    /// 4-bit blocks of 32 with a minimum (what plait's CPU decode kernel reads fastest).
    Q4_1,
    /// Half precision.
    F16,
    /// Full precision (exact; for checks).
    F32,
}

impl Quant {
    /// Parses `q8_0`, `q4_k`, `q4_0`, `q4_1`, `f16` or `f32`.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "q8_0" => Quant::Q8_0,
            "q4_k" => Quant::Q4K,
            "q4_0" => Quant::Q4_0,
            "q4_1" => Quant::Q4_1,
            "f16" => Quant::F16,
            "f32" => Quant::F32,
            _ => return None,
        })
    }

    /// The GGML storage type.
    pub(crate) fn ggml(self) -> GgmlDType {
        match self {
            Quant::Q8_0 => GgmlDType::Q8_0,
            Quant::Q4K => GgmlDType::Q4K,
            Quant::Q4_0 => GgmlDType::Q4_0,
            Quant::Q4_1 => GgmlDType::Q4_1,
            Quant::F16 => GgmlDType::F16,
            Quant::F32 => GgmlDType::F32,
        }
    }
}

/// What a conversion wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvertSummary {
    /// Tensors written.
    pub tensors: usize,
    /// Matrices whose width is not a multiple of the quant's block, stored as the next
    /// type that fits (q8_0, else f16), as llama.cpp's quantizer does.
    pub fallbacks: Vec<String>,
    /// Size of the output file.
    pub bytes: u64,
}

fn convert_error(path: &Path, message: impl std::fmt::Display) -> ModelError {
    ModelError::Gguf {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// Converts the checkpoint in `dir` to `out`, written through a temporary file and renamed.
pub fn convert_to_gguf(dir: &Path, out: &Path, quant: Quant) -> Result<ConvertSummary> {
    let config = PltConfig::from_file(&dir.join("config.json"))?;
    let checkpoint = Checkpoint::open(dir)?;
    let tok_config = TokenizerConfig::from_dir(dir)?;
    let mut metadata = model_metadata(&config, dir)?;
    metadata.extend(tokenizer_metadata(dir, &tok_config)?);
    if let Some(template) = ChatTemplate::source_text(dir, &tok_config)? {
        metadata.push(("tokenizer.chat_template".into(), Value::String(template)));
    }

    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut fallbacks = Vec::new();
    for name in hf_tensor_names(&config) {
        let Some(shape) = checkpoint.shape(&name) else {
            if name == "lm_head.weight" && config.tie_word_embeddings {
                continue;
            }
            return Err(ModelError::MissingTensor { name });
        };
        let mut tensor = checkpoint.load(&name, &shape, DType::F32, &Device::Cpu)?;
        let c = &config;
        if name.ends_with("q_proj.weight") {
            tensor = permute_rows(&tensor, c.num_attention_heads)?;
        } else if name.ends_with("k_proj.weight") {
            tensor = permute_rows(&tensor, c.num_key_value_heads)?;
        } else if name.ends_with("plt_gate.weight") && !c.plt_gate_use_hidden_states {
            // A query gate dots the post-RoPE query: its columns follow q's row order.
            tensor = permute_rows(&tensor.t()?.contiguous()?, 1)?
                .t()?
                .contiguous()?;
        }
        let gguf_name = gguf_tensor_name(&name)
            .ok_or_else(|| ModelError::MissingTensor { name: name.clone() })?;
        let keep_f32 = shape.len() == 1 || name.contains("plt_gate");
        let dtype = if keep_f32 {
            GgmlDType::F32
        } else {
            let wanted = quant.ggml();
            let width = shape[shape.len() - 1];
            let fitting = [wanted, GgmlDType::Q8_0, GgmlDType::F16]
                .into_iter()
                .find(|d| width % d.block_size() == 0)
                .unwrap_or(GgmlDType::F32);
            if fitting != wanted {
                fallbacks.push(format!("{gguf_name} ({fitting:?})"));
            }
            fitting
        };
        let q = QTensor::quantize(&tensor, dtype)
            .map_err(|e| convert_error(out, format!("quantizing `{name}`: {e}")))?;
        tensors.push((gguf_name, q));
    }

    let partial = out.with_extension("gguf.partial");
    let write = || -> Result<u64> {
        let file = File::create(&partial).map_err(|source| ModelError::Io {
            path: partial.clone(),
            source,
        })?;
        let mut writer = BufWriter::new(file);
        let meta: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        gguf_file::write(&mut writer, &meta, &refs).map_err(|e| convert_error(&partial, e))?;
        let file = writer
            .into_inner()
            .map_err(|e| convert_error(&partial, e))?;
        file.sync_all().map_err(|source| ModelError::Io {
            path: partial.clone(),
            source,
        })?;
        Ok(file.metadata().map(|m| m.len()).unwrap_or(0))
    };
    let bytes = match write() {
        Ok(bytes) => bytes,
        Err(e) => {
            // Never leave a half-written file behind.
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };
    std::fs::rename(&partial, out).map_err(|source| ModelError::Io {
        path: out.to_path_buf(),
        source,
    })?;
    Ok(ConvertSummary {
        tensors: tensors.len(),
        fallbacks,
        bytes,
    })
}

/// The Hugging Face names of every tensor the model reads.
fn hf_tensor_names(c: &PltConfig) -> Vec<String> {
    let mut names = vec![
        "model.embed_tokens.weight".to_string(),
        "model.norm.weight".to_string(),
        "lm_head.weight".to_string(),
    ];
    for i in 0..c.num_hidden_layers {
        let p = format!("model.layers.{i}");
        for part in [
            "input_layernorm.weight",
            "post_attention_layernorm.weight",
            "self_attn.q_proj.weight",
            "self_attn.k_proj.weight",
            "self_attn.v_proj.weight",
            "self_attn.o_proj.weight",
            "mlp.gate_proj.weight",
            "mlp.up_proj.weight",
            "mlp.down_proj.weight",
            "self_attn.plt_gate.weight",
            "self_attn.plt_gate.bias",
        ] {
            names.push(format!("{p}.{part}"));
        }
        if c.plt_gate_use_hidden_states {
            names.push(format!("{p}.self_attn.plt_gate.gate_norm.weight"));
        }
    }
    names
}

/// Rows of each head reordered from rotate-half to interleaved RoPE pairs, as llama
/// GGUF converters store q and k: `[heads, 2, hd/2, in]` -> `[heads, hd/2, 2, in]`.
fn permute_rows(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let hd = rows / heads;
    Ok(w.reshape((heads, 2, hd / 2, cols))?
        .transpose(1, 2)?
        .reshape((rows, cols))?
        .contiguous()?)
}

fn u32_value(n: usize) -> Value {
    Value::U32(n as u32)
}

fn model_metadata(c: &PltConfig, dir: &Path) -> Result<Vec<(String, Value)>> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "plt".into());
    let mut stop_ids = c.eos_token_ids.clone();
    stop_ids.extend(generation_eos_ids(&dir.join("generation_config.json"))?);
    stop_ids.sort_unstable();
    stop_ids.dedup();
    Ok(vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("general.name".into(), Value::String(name)),
        (
            "llama.context_length".into(),
            u32_value(c.max_position_embeddings),
        ),
        ("llama.embedding_length".into(), u32_value(c.hidden_size)),
        (
            "llama.feed_forward_length".into(),
            u32_value(c.intermediate_size),
        ),
        ("llama.block_count".into(), u32_value(c.num_hidden_layers)),
        (
            "llama.attention.head_count".into(),
            u32_value(c.num_attention_heads),
        ),
        (
            "llama.attention.head_count_kv".into(),
            u32_value(c.num_key_value_heads),
        ),
        ("llama.attention.key_length".into(), u32_value(c.head_dim)),
        ("llama.attention.value_length".into(), u32_value(c.head_dim)),
        ("llama.rope.dimension_count".into(), u32_value(c.head_dim)),
        (
            "llama.rope.freq_base".into(),
            Value::F32(c.rope_theta as f32),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(c.rms_norm_eps as f32),
        ),
        ("llama.vocab_size".into(), u32_value(c.vocab_size)),
        ("plt.num_loops".into(), u32_value(c.plt_num_loops)),
        ("plt.window_size".into(), u32_value(c.plt_window)),
        ("plt.emb_scale".into(), Value::F32(c.plt_emb_scale as f32)),
        (
            "plt.hidden_scale".into(),
            Value::F32(c.plt_hidden_scale as f32),
        ),
        (
            "plt.normalize_per_loop".into(),
            Value::Bool(c.plt_normalize_per_loop),
        ),
        (
            "plt.gate_use_hidden_states".into(),
            Value::Bool(c.plt_gate_use_hidden_states),
        ),
        (
            "plt.stop_token_ids".into(),
            Value::Array(stop_ids.into_iter().map(Value::U32).collect()),
        ),
    ])
}

/// `tokenizer.model` as llama.cpp's `llama` tokenizer: tokens, scores and types by id,
/// added tokens from tokenizer_config.json included (control when special).
fn tokenizer_metadata(dir: &Path, config: &TokenizerConfig) -> Result<Vec<(String, Value)>> {
    let path = dir.join("tokenizer.model");
    if !path.is_file() {
        return Err(convert_error(
            &path,
            "convert needs the SentencePiece tokenizer.model of the LoopCoder-V2 layout",
        ));
    }
    let bytes = std::fs::read(&path).map_err(|source| ModelError::Io {
        path: path.clone(),
        source,
    })?;
    let spm = SpmModel::parse(&bytes).map_err(|e| ModelError::Tokenizer {
        path: path.clone(),
        message: e.to_string(),
    })?;
    let mut tokens: Vec<(String, f32, i32)> = spm
        .pieces
        .iter()
        .map(|p| {
            let kind = match p.kind {
                PieceType::Normal => 1,
                PieceType::Unknown => 2,
                PieceType::Control => 3,
                PieceType::UserDefined => 4,
                PieceType::Unused => 5,
                PieceType::Byte => 6,
            };
            (p.piece.clone(), p.score, kind)
        })
        .collect();
    for (id, spec) in &config.added_tokens_decoder {
        let id: usize = id.parse().map_err(|_| ModelError::Config {
            path: dir.join("tokenizer_config.json"),
            field: format!("added_tokens_decoder.{id}"),
            message: "the key is not a token id".into(),
        })?;
        while tokens.len() <= id {
            // Unused ids between the pieces and an added token keep the table indexed by id.
            tokens.push((format!("[PAD{}]", tokens.len()), 0.0, 5));
        }
        tokens[id] = (spec.content.clone(), 0.0, if spec.special { 3 } else { 4 });
    }
    let id_of = |value: Option<&serde_json::Value>| {
        let text = TokenizerConfig::token_text(value)?;
        tokens.iter().position(|t| t.0 == text)
    };
    let mut out = vec![
        (
            "tokenizer.ggml.model".to_string(),
            Value::String("llama".into()),
        ),
        (
            "tokenizer.ggml.unknown_token_id".into(),
            u32_value(spm.unk_id as usize),
        ),
        (
            "tokenizer.ggml.add_bos_token".into(),
            Value::Bool(config.add_bos_token.unwrap_or(true)),
        ),
        (
            "tokenizer.ggml.add_eos_token".into(),
            Value::Bool(config.add_eos_token.unwrap_or(false)),
        ),
        (
            "tokenizer.ggml.add_space_prefix".into(),
            Value::Bool(spm.add_dummy_prefix),
        ),
    ];
    if let Some(bos) = id_of(config.bos_token.as_ref()) {
        out.push(("tokenizer.ggml.bos_token_id".into(), u32_value(bos)));
    }
    if let Some(eos) = id_of(config.eos_token.as_ref()) {
        out.push(("tokenizer.ggml.eos_token_id".into(), u32_value(eos)));
    }
    out.push((
        "tokenizer.ggml.tokens".into(),
        Value::Array(tokens.iter().map(|t| Value::String(t.0.clone())).collect()),
    ));
    out.push((
        "tokenizer.ggml.scores".into(),
        Value::Array(tokens.iter().map(|t| Value::F32(t.1)).collect()),
    ));
    out.push((
        "tokenizer.ggml.token_type".into(),
        Value::Array(tokens.iter().map(|t| Value::I32(t.2)).collect()),
    ));
    Ok(out)
}

//! GGUF files (llama.cpp's format): llama-architecture weights kept quantized, the
//! hyperparameters from metadata, and PLT models either lifted or read from `plt.*` keys.

use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Tensor};

use super::config::PltConfig;
use super::error::{candle_message, ModelError, Result};
use super::weights::WeightSource;

/// Window of the loops a lifted (non-looped) model runs: LoopCoder-V2's, so the extra
/// loops cost what they cost in the family.
pub const LIFT_WINDOW: usize = 64;

/// The architectures plait runs from GGUF.
pub const SUPPORTED_GGUF_ARCHITECTURES: &str = "llama";

/// A GGUF file opened for loading.
pub struct GgufWeights {
    path: PathBuf,
    content: Content,
    file: File,
    device: Device,
}

fn gguf_error(path: &Path, message: impl std::fmt::Display) -> ModelError {
    ModelError::Gguf {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// The GGUF name of a tensor named as in a Hugging Face llama checkpoint.
pub fn gguf_tensor_name(hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "lm_head.weight" => Some("output.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, part) = rest.split_once('.')?;
    let part = match part {
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        "self_attn.plt_gate.weight" => "plt_gate.weight",
        "self_attn.plt_gate.bias" => "plt_gate.bias",
        "self_attn.plt_gate.gate_norm.weight" => "plt_gate_norm.weight",
        _ => return None,
    };
    Some(format!("blk.{layer}.{part}"))
}

impl GgufWeights {
    /// Reads the header and checks that every tensor's data lies inside the file.
    pub fn open(path: &Path, device: &Device) -> Result<Self> {
        let mut file = File::open(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let content = Content::read(&mut file).map_err(|e| {
            gguf_error(
                path,
                format!("not a readable GGUF file: {}", candle_message(&e)),
            )
        })?;
        let file_len = file
            .metadata()
            .map_err(|source| ModelError::Io {
                path: path.to_path_buf(),
                source,
            })?
            .len();
        for (name, info) in &content.tensor_infos {
            let dtype = info.ggml_dtype;
            let elems = info.shape.elem_count();
            let bytes = elems / dtype.block_size() * dtype.type_size();
            let end = content.tensor_data_offset + info.offset + bytes as u64;
            if end > file_len {
                return Err(gguf_error(
                    path,
                    format!(
                        "truncated: tensor `{name}` ends at byte {end}, the file has {file_len}"
                    ),
                ));
            }
        }
        let weights = Self {
            path: path.to_path_buf(),
            content,
            file,
            device: device.clone(),
        };
        let arch = weights.string("general.architecture")?;
        if arch != SUPPORTED_GGUF_ARCHITECTURES {
            return Err(gguf_error(
                path,
                format!(
                    "unsupported architecture `{arch}` (supported: {SUPPORTED_GGUF_ARCHITECTURES})"
                ),
            ));
        }
        if weights
            .content
            .tensor_infos
            .contains_key("rope_freqs.weight")
        {
            return Err(gguf_error(
                path,
                "RoPE frequency scaling (`rope_freqs.weight`) is not supported",
            ));
        }
        Ok(weights)
    }

    /// The parsed header: metadata and tensor index.
    pub fn content(&self) -> &Content {
        &self.content
    }

    fn value(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn string(&self, key: &str) -> Result<String> {
        match self.value(key) {
            Some(v) => v
                .to_string()
                .cloned()
                .map_err(|_| self.wrong_type(key, "a string")),
            None => Err(gguf_error(
                &self.path,
                format!("metadata key `{key}` is missing"),
            )),
        }
    }

    fn wrong_type(&self, key: &str, expected: &str) -> ModelError {
        gguf_error(
            &self.path,
            format!("metadata key `{key}` is not {expected}"),
        )
    }

    fn usize_key(&self, key: &str) -> Result<Option<usize>> {
        let Some(v) = self.value(key) else {
            return Ok(None);
        };
        let n = match v {
            Value::U8(x) => u64::from(*x),
            Value::U16(x) => u64::from(*x),
            Value::U32(x) => u64::from(*x),
            Value::U64(x) => *x,
            Value::I32(x) if *x >= 0 => *x as u64,
            Value::I64(x) if *x >= 0 => *x as u64,
            _ => return Err(self.wrong_type(key, "a non-negative integer")),
        };
        usize::try_from(n)
            .map(Some)
            .map_err(|_| self.wrong_type(key, "a size"))
    }

    fn required(&self, key: &str) -> Result<usize> {
        self.usize_key(key)?
            .ok_or_else(|| gguf_error(&self.path, format!("metadata key `{key}` is missing")))
    }

    fn float_key(&self, key: &str) -> Result<Option<f64>> {
        match self.value(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(f64::from(*x))),
            Some(Value::F64(x)) => Ok(Some(*x)),
            Some(_) => Err(self.wrong_type(key, "a float")),
        }
    }

    fn bool_key(&self, key: &str) -> Result<Option<bool>> {
        match self.value(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(self.wrong_type(key, "a bool")),
        }
    }

    /// Whether the file carries PLT metadata (a looped model) rather than plain llama.
    pub fn is_plt(&self) -> bool {
        self.value("plt.num_loops").is_some()
    }

    /// The hyperparameters, from `llama.*` (and `plt.*`) metadata.
    pub fn config(&self) -> Result<PltConfig> {
        let a = "llama";
        let hidden_size = self.required(&format!("{a}.embedding_length"))?;
        let heads = self.required(&format!("{a}.attention.head_count"))?;
        let vocab_size = match self.content.tensor_infos.get("token_embd.weight") {
            Some(info) => info.shape.dims()[0],
            None => {
                return Err(ModelError::MissingTensor {
                    name: "token_embd.weight".into(),
                })
            }
        };
        if heads == 0 || hidden_size % heads != 0 {
            return Err(self.wrong_type(
                &format!("{a}.attention.head_count"),
                "a divisor of embedding_length",
            ));
        }
        let kv_heads = self
            .usize_key(&format!("{a}.attention.head_count_kv"))?
            .unwrap_or(heads);
        if kv_heads == 0 || heads % kv_heads != 0 {
            return Err(self.wrong_type(
                &format!("{a}.attention.head_count_kv"),
                "a divisor of head_count",
            ));
        }
        let head_dim = self
            .usize_key(&format!("{a}.attention.key_length"))?
            .unwrap_or(hidden_size / heads);
        let plt = self.is_plt();
        let eos = self.usize_key("tokenizer.ggml.eos_token_id")?;
        // plait's converter records every stop id of the checkpoint (config and generation config).
        let stop_ids = match self.value("plt.stop_token_ids") {
            None => eos.map(|e| vec![e as u32]).unwrap_or_default(),
            Some(Value::Array(ids)) => ids
                .iter()
                .map(|v| {
                    v.to_u32()
                        .map_err(|_| self.wrong_type("plt.stop_token_ids", "a list of u32"))
                })
                .collect::<Result<Vec<u32>>>()?,
            Some(_) => return Err(self.wrong_type("plt.stop_token_ids", "a list of u32")),
        };
        let bos = self.usize_key("tokenizer.ggml.bos_token_id")?;
        Ok(PltConfig {
            hidden_size,
            intermediate_size: self.required(&format!("{a}.feed_forward_length"))?,
            num_hidden_layers: self.required(&format!("{a}.block_count"))?,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            vocab_size,
            max_position_embeddings: self
                .usize_key(&format!("{a}.context_length"))?
                .unwrap_or(2048),
            rope_theta: self
                .float_key(&format!("{a}.rope.freq_base"))?
                .unwrap_or(10000.0),
            rms_norm_eps: self
                .float_key(&format!("{a}.attention.layer_norm_rms_epsilon"))?
                .unwrap_or(1e-5),
            tie_word_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
            bos_token_id: bos.map(|b| b as u32),
            eos_token_ids: stop_ids,
            plt_num_loops: if plt {
                self.required("plt.num_loops")?
            } else {
                1
            },
            plt_window: if plt {
                self.required("plt.window_size")?
            } else {
                LIFT_WINDOW
            },
            plt_emb_scale: self.float_key("plt.emb_scale")?.unwrap_or(1.0),
            // A lifted model adds nothing of the previous loop: every loop is loop 0 again.
            plt_hidden_scale: if plt {
                self.float_key("plt.hidden_scale")?.unwrap_or(1.0)
            } else {
                0.0
            },
            plt_normalize_per_loop: self.bool_key("plt.normalize_per_loop")?.unwrap_or(false),
            plt_gate_use_hidden_states: self
                .bool_key("plt.gate_use_hidden_states")?
                .unwrap_or(false),
        })
    }

    fn load(&mut self, hf_name: &str, shape: &[usize]) -> Result<QTensor> {
        let name = gguf_tensor_name(hf_name).ok_or_else(|| ModelError::MissingTensor {
            name: hf_name.into(),
        })?;
        let Some(info) = self.content.tensor_infos.get(&name) else {
            return Err(ModelError::MissingTensor { name });
        };
        if info.shape.dims() != shape {
            return Err(ModelError::TensorShape {
                name,
                expected: shape.to_vec(),
                found: info.shape.dims().to_vec(),
            });
        }
        self.content
            .tensor(&mut self.file, &name, &self.device)
            .map_err(|e| gguf_error(&self.path, format!("tensor `{name}`: {e}")))
    }
}

impl WeightSource for GgufWeights {
    fn matrix(&mut self, name: &str, shape: &[usize]) -> Result<QMatMul> {
        let tensor = self.load(name, shape)?;
        Ok(QMatMul::from_qtensor(tensor)?)
    }

    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let tensor = self.load(name, shape)?;
        Ok(tensor.dequantize(&self.device)?.to_dtype(DType::F32)?)
    }

    fn contains(&self, name: &str) -> bool {
        gguf_tensor_name(name).is_some_and(|n| self.content.tensor_infos.contains_key(&n))
    }

    fn ties_missing_head(&self) -> bool {
        true
    }

    fn lifts_missing_gates(&self) -> bool {
        !self.is_plt()
    }

    fn rope_interleaved(&self) -> bool {
        true
    }
}

//! The PLT forward pass: loop-by-loop prefill and cross-loop-parallel decode.

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::ops::{rms_norm, sigmoid, softmax_last_dim};

use super::cache::{CacheShape, PltCache};
use super::config::PltConfig;
use super::device::Placement;
use super::error::{ModelError, Result, MAX_LOOPS};
use super::gguf::GgufWeights;
use super::kernels::{CpuKernels, Isa, QuantMatrix};
use super::weights::{Checkpoint, RandomWeights, SafetensorsWeights, WeightSource};

mod fused;
mod prefill;

/// Positions prefilled per chunk: bounds the attention score matrix of a long prompt.
pub const PREFILL_CHUNK: usize = 512;

/// The gate mixing global and local attention in loops >= 1.
enum PltGate {
    /// `sigmoid(weight @ gate_norm(r) + bias)` on the layer's input r.
    HiddenState {
        weight: Matrix,
        bias: Tensor,
        norm: Tensor,
    },
    /// `sigmoid(q_h . weight_h + bias_h)` on the post-RoPE query.
    Query { weight: Tensor, bias: Tensor },
}

struct DecoderLayer {
    input_norm: Tensor,
    post_attention_norm: Tensor,
    q_proj: Matrix,
    k_proj: Matrix,
    v_proj: Matrix,
    o_proj: Matrix,
    gate_proj: Matrix,
    up_proj: Matrix,
    down_proj: Matrix,
    plt_gate: Option<PltGate>,
}

/// Which logits a prefill returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// None (the positions only fill the cache).
    None,
    /// The last position's, `[vocab]`.
    Last,
    /// Every position's, `[len, vocab]`.
    All,
}

/// What one pass through the layers is doing; decides how attention reads the cache.
enum Step<'a> {
    /// Loop `loop_idx` over a chunk starting at `start`.
    Prefill {
        loop_idx: usize,
        start: usize,
        /// `[rows, start+rows]` causal mask over loop 0's cache, when rows > 1.
        causal_mask: Option<&'a Tensor>,
        /// For loops >= 1: the `[rows, window+1+rows]` window mask over (ring ++ chunk)
        /// keys, and the indices of those keys that form the ring after the chunk.
        window: Option<&'a (Tensor, Tensor)>,
    },
    /// All loops of position `pos`, one row per loop.
    Decode {
        pos: usize,
        /// `[window+1]` mask of ring slots, when some are not valid yet.
        ring_mask: Option<&'a Tensor>,
    },
}

/// A loaded PLT checkpoint, ready to run on its device.
pub struct PltModel {
    config: PltConfig,
    device: Device,
    dtype: DType,
    embed: QMatMul,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    lm_head: Matrix,
    /// RoPE inverse frequencies, `[head_dim/2]`, in f64 for exact angles.
    inv_freq: Vec<f64>,
    /// GGUF llama files store q/k rows permuted for interleaved RoPE; rotating adjacent
    /// pairs on them equals rotate-half on the original rows.
    rope_interleaved: bool,
    /// The norms and gates in f32 for the CPU decode step; None off the CPU or in another
    /// dtype, where decode runs as candle operations.
    cpu: Option<fused::CpuWeights>,
}

/// Gate bias of the identity lift: sigmoid(60) is 1 in f32.
const IDENTITY_GATE_BIAS: f32 = 60.0;

impl PltModel {
    /// Loads a checkpoint directory (config.json + safetensors) or a `.gguf` file onto
    /// `device`, in its default dtype (f32 on the CPU, bf16 on an accelerator).
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        Self::load_with_progress(path, &Placement::new(device.clone(), None), &mut |_| {})
    }

    /// `load` onto a placement, reporting the fraction of layers loaded.
    pub fn load_with_progress(
        path: &Path,
        placement: &Placement,
        progress: &mut dyn FnMut(f32),
    ) -> Result<Self> {
        let device = &placement.device;
        if path.is_file() {
            return Self::from_gguf(&mut GgufWeights::open(path, device)?, placement, progress);
        }
        if !path.is_dir() {
            return Err(ModelError::NotFound {
                what: "model directory or .gguf file",
                path: path.to_path_buf(),
            });
        }
        let config = PltConfig::from_file(&path.join("config.json"))?;
        let dtype = placement.dtype;
        let mut checkpoint = SafetensorsWeights::new(Checkpoint::open(path)?, dtype, device);
        Self::from_source(config, &mut checkpoint, placement, dtype, progress)
    }

    /// A model of `config` with random weights made on the device, for benchmarks (speed
    /// does not depend on the values); matrices stored as `quant` when given (computing in
    /// f32, as a quantized GGUF model does).
    pub fn synthetic(
        config: PltConfig,
        placement: &Placement,
        quant: Option<GgmlDType>,
    ) -> Result<Self> {
        let mut source = RandomWeights::new(placement, quant);
        let dtype = source.dtype();
        Self::from_source(config, &mut source, placement, dtype, &mut |_| {})
    }

    /// Loads the model of an opened GGUF file; quantized matrices stay quantized.
    pub fn from_gguf(
        gguf: &mut GgufWeights,
        placement: &Placement,
        progress: &mut dyn FnMut(f32),
    ) -> Result<Self> {
        let config = gguf.config()?;
        Self::from_source(config, gguf, placement, DType::F32, progress)
    }

    /// The model of `config` from `source` on `placement`'s device, computing in `dtype`;
    /// on the CPU in f32, decode runs the path `placement.kernels` names.
    fn from_source(
        config: PltConfig,
        source: &mut dyn WeightSource,
        placement: &Placement,
        dtype: DType,
        progress: &mut dyn FnMut(f32),
    ) -> Result<Self> {
        let device = &placement.device;
        // plait's kernels are CPU ones, for the f32 compute of quantized and dense models.
        let kernels = match placement.kernels {
            CpuKernels::Plait(isa) if device.is_cpu() && dtype == DType::F32 => Some(isa),
            _ => None,
        };
        let c = &config;
        let (d, h, kv, hd) = (
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
        );
        let embed = source.matrix("model.embed_tokens.weight", &[c.vocab_size, d])?;
        let lm_head = Matrix::new(
            kernels,
            if c.tie_word_embeddings
                || (!source.contains("lm_head.weight") && source.ties_missing_head())
            {
                embed.clone()
            } else {
                source.matrix("lm_head.weight", &[c.vocab_size, d])?
            },
        );
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let gate_name = format!("{p}.self_attn.plt_gate.weight");
            let plt_gate = if source.contains(&gate_name) || c.plt_num_loops > 1 {
                Some(if c.plt_gate_use_hidden_states {
                    PltGate::HiddenState {
                        weight: Matrix::new(kernels, source.matrix(&gate_name, &[h, d])?),
                        bias: source.tensor(&format!("{p}.self_attn.plt_gate.bias"), &[h])?,
                        norm: source
                            .tensor(&format!("{p}.self_attn.plt_gate.gate_norm.weight"), &[d])?,
                    }
                } else {
                    PltGate::Query {
                        weight: source.tensor(&gate_name, &[h, hd])?,
                        bias: source.tensor(&format!("{p}.self_attn.plt_gate.bias"), &[h])?,
                    }
                })
            } else if source.lifts_missing_gates() {
                // The identity lift: a gate saturated to 1 makes every loop >= 1 read only
                // loop 0's cache, so it reproduces loop 0 while its cost is real.
                Some(PltGate::Query {
                    weight: Tensor::zeros((h, hd), dtype, device)?,
                    bias: Tensor::full(IDENTITY_GATE_BIAS, h, device)?.to_dtype(dtype)?,
                })
            } else {
                // A checkpoint trained at one loop may carry no gates; it then runs at one loop.
                None
            };
            let norm = |source: &mut dyn WeightSource, name: &str| {
                source.tensor(&format!("{p}.{name}.weight"), &[d])
            };
            let raw = |source: &mut dyn WeightSource, name: &str, shape: &[usize]| {
                source.matrix(&format!("{p}.{name}.weight"), shape)
            };
            let ffn = c.intermediate_size;
            let [q_proj, k_proj, v_proj] = Matrix::stacked(
                kernels,
                [
                    raw(source, "self_attn.q_proj", &[h * hd, d])?,
                    raw(source, "self_attn.k_proj", &[kv * hd, d])?,
                    raw(source, "self_attn.v_proj", &[kv * hd, d])?,
                ],
            );
            let [gate_proj, up_proj] = Matrix::stacked(
                kernels,
                [
                    raw(source, "mlp.gate_proj", &[ffn, d])?,
                    raw(source, "mlp.up_proj", &[ffn, d])?,
                ],
            );
            layers.push(DecoderLayer {
                input_norm: norm(source, "input_layernorm")?,
                post_attention_norm: norm(source, "post_attention_layernorm")?,
                q_proj,
                k_proj,
                v_proj,
                o_proj: Matrix::new(kernels, raw(source, "self_attn.o_proj", &[d, h * hd])?),
                gate_proj,
                up_proj,
                down_proj: Matrix::new(kernels, raw(source, "mlp.down_proj", &[d, ffn])?),
                plt_gate,
            });
            progress((i + 1) as f32 / c.num_hidden_layers as f32);
        }
        let norm = source.tensor("model.norm.weight", &[d])?;
        let inv_freq = (0..hd / 2)
            .map(|i| 1.0 / c.rope_theta.powf(2.0 * i as f64 / hd as f64))
            .collect();
        let mut model = Self {
            config,
            device: device.clone(),
            dtype,
            embed,
            layers,
            norm,
            lm_head,
            inv_freq,
            rope_interleaved: source.rope_interleaved(),
            cpu: None,
        };
        if let Some(isa) = kernels {
            model.cpu = Some(fused::CpuWeights::new(&model, isa)?);
        }
        Ok(model)
    }

    /// Number of weights (matrices, norms and gates).
    pub fn parameter_count(&self) -> u64 {
        let matrices = self.layers.iter().flat_map(DecoderLayer::matrices);
        let vectors = self
            .layers
            .iter()
            .flat_map(|l| [&l.input_norm, &l.post_attention_norm]);
        let head = if self.config.tie_word_embeddings {
            0
        } else {
            self.lm_head.elem_count()
        };
        (matrices.map(Matrix::elem_count).sum::<usize>()
            + vectors.map(Tensor::elem_count).sum::<usize>()
            + matrix_elems(&self.embed)
            + head
            + self.norm.elem_count()) as u64
    }

    /// Bytes of weights a decode step reads: every matrix, norm and gate, the head, and one
    /// embedding row (the bound a memory-bandwidth-limited decode step cannot beat).
    pub fn decode_weight_bytes(&self) -> u64 {
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let matrix = Matrix::storage_bytes;
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                let gate = match &l.plt_gate {
                    Some(PltGate::HiddenState { weight, bias, norm }) => {
                        matrix(weight) + bytes(bias) + bytes(norm)
                    }
                    Some(PltGate::Query { weight, bias }) => bytes(weight) + bytes(bias),
                    None => 0,
                };
                l.matrices().into_iter().map(matrix).sum::<usize>()
                    + gate
                    + bytes(&l.input_norm)
                    + bytes(&l.post_attention_norm)
            })
            .sum();
        let vocab = self.config.vocab_size.max(1);
        let embed_row = match &self.embed {
            QMatMul::QTensor(t) => t.storage_size_in_bytes() / vocab,
            QMatMul::Tensor(t) | QMatMul::TensorF16(t) => bytes(t) / vocab,
        };
        (layers + matrix(&self.lm_head) + bytes(&self.norm) + embed_row) as u64
    }

    /// Bytes of K/V a decode step at `loops` loops reads with `depth` positions cached:
    /// loop 0's keys and values up to and with the new position (read once for every loop's
    /// row), and each upper loop's ring.
    pub fn decode_kv_bytes(&self, depth: usize, loops: usize) -> u64 {
        let c = &self.config;
        let per_position = c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 2;
        let rings = loops.saturating_sub(1) * (c.plt_window + 1);
        ((depth + 1 + rings) * per_position * self.kv_dtype().size_in_bytes()) as u64
    }

    /// How the layers' weight matrices are stored ("F32", "Q4_1", ...).
    pub fn weight_storage(&self) -> String {
        self.layers
            .first()
            .map_or_else(|| "none".into(), |l| l.q_proj.storage_name())
    }

    /// What runs the decode step: plait's fused CPU step at its width, else candle's
    /// operations (other devices and dtypes, or `PLAIT_CPU_KERNELS=candle`).
    pub fn decode_kernels(&self) -> CpuKernels {
        self.cpu
            .as_ref()
            .map_or(CpuKernels::Candle, |w| CpuKernels::Plait(w.isa))
    }

    /// The checkpoint's configuration.
    pub fn config(&self) -> &PltConfig {
        &self.config
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// An empty cache for a sequence run with `loops` loops.
    pub fn new_cache(&self, loops: usize) -> Result<PltCache> {
        self.check_loops(loops)?;
        PltCache::new(self.cache_shape(), &self.device, loops)
    }

    /// A cache of `tokens`' positions at `loops` loops holding random K/V, ring entries
    /// and carries instead of computed ones, with room for `room` more positions: decode at
    /// a depth can be timed without prefilling it (8192 positions of a 7B model).
    pub fn random_context(&self, loops: usize, tokens: &[u32], room: usize) -> Result<PltCache> {
        self.check_loops(loops)?;
        self.check_ids_at(0, tokens)?;
        let mut cache = PltCache::new(self.cache_shape(), &self.device, loops)?;
        cache.fill_random(tokens, room)?;
        Ok(cache)
    }

    fn cache_shape(&self) -> CacheShape {
        let c = &self.config;
        CacheShape {
            layers: c.num_hidden_layers,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            hidden: c.hidden_size,
            window: c.plt_window,
            dtype: self.dtype,
            kv_dtype: self.kv_dtype(),
        }
    }

    /// The K/V cache's dtype: f16 on the CPU for quantized weights (llama.cpp's default:
    /// half the memory and the bytes attention reads), else the compute dtype, so that a
    /// dense checkpoint keeps the precision its fixtures are checked at.
    pub fn kv_dtype(&self) -> DType {
        let quantized = self.layers.first().is_some_and(|l| l.q_proj.is_quantized());
        if self.device.is_cpu() && self.dtype == DType::F32 && quantized {
            DType::F16
        } else {
            self.dtype
        }
    }

    /// Whether this model can run `loops` loops (1..=MAX_LOOPS, and PLT gates beyond one).
    pub fn check_loops(&self, loops: usize) -> Result<()> {
        if loops == 0 || loops > MAX_LOOPS {
            return Err(ModelError::LoopCount(loops));
        }
        if loops > 1 && self.layers.iter().any(|l| l.plt_gate.is_none()) {
            return Err(ModelError::NoPltGates(loops));
        }
        Ok(())
    }

    fn check_ids(&self, cache: &PltCache, ids: &[u32]) -> Result<()> {
        self.check_ids_at(cache.len(), ids)
    }

    /// Checks ids that would follow `start` cached positions.
    fn check_ids_at(&self, start: usize, ids: &[u32]) -> Result<()> {
        let vocab_size = self.config.vocab_size;
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab_size) {
            return Err(ModelError::TokenOutOfRange { id, vocab_size });
        }
        let len = start + ids.len();
        if len > self.config.max_position_embeddings {
            return Err(ModelError::ContextOverflow {
                len,
                max: self.config.max_position_embeddings,
            });
        }
        Ok(())
    }

    /// Positions recomputed to rebuild loops >= 1 exactly at `loops` loops.
    ///
    /// State dropped before position b is wrong near b, and the error spreads `window`
    /// positions per layer and one position per loop (the carry's shift); it is gone from
    /// every ring slot and carry after `(loops-1) * (layers*window + 1) + 1` positions.
    pub fn rebuild_span(&self, loops: usize) -> usize {
        (loops - 1) * (self.config.num_hidden_layers * self.config.plt_window + 1) + 1
    }

    /// Runs `ids` after the cached positions, loop by loop per chunk, and returns the logits asked for.
    pub fn prefill(
        &self,
        cache: &mut PltCache,
        ids: &[u32],
        logits: Logits,
    ) -> Result<Option<Tensor>> {
        self.check_ids(cache, ids)?;
        let mut all = Vec::new();
        let mut last = None;
        for chunk in ids.chunks(PREFILL_CHUNK) {
            let out = self.prefill_chunk(cache, chunk, logits)?;
            match logits {
                Logits::All => all.extend(out),
                _ => last = out,
            }
        }
        Ok(match logits {
            Logits::None => None,
            Logits::Last => last.map(|l| l.squeeze(0)).transpose()?,
            Logits::All if all.is_empty() => None,
            Logits::All => Some(Tensor::cat(&all, 0)?),
        })
    }

    /// Runs one chunk; `Logits::Last` yields `[1, vocab]`, `Logits::All` `[rows, vocab]`.
    fn prefill_chunk(
        &self,
        cache: &mut PltCache,
        ids: &[u32],
        logits_wanted: Logits,
    ) -> Result<Option<Tensor>> {
        let c = &self.config;
        let (rows, start) = (ids.len(), cache.len());
        cache.reserve(start + rows)?;
        let positions: Vec<usize> = (start..start + rows).collect();
        let (cos, sin) = self.rope_tables(&positions)?;
        let emb = self.embed_ids(ids)?;
        // The CPU's fused attention needs no mask.
        let causal_mask = (rows > 1 && self.cpu.is_none())
            .then(|| self.causal_mask(start, rows))
            .transpose()?;
        let window = (cache.loops > 1)
            .then(|| self.window_mask_and_ring_sources(cache, start, rows))
            .transpose()?;
        let mut new_carries = Vec::new();
        let mut prev_out: Option<Tensor> = None;
        let mut logits = None;
        for loop_idx in 0..cache.loops {
            let mut h = match &prev_out {
                None => emb.clone(),
                Some(prev) => {
                    // Loop l at t reads loop l-1's output at t-1: the carry, then the chunk shifted by one.
                    let carry = self.carry_row(cache, loop_idx - 1)?;
                    let shifted = if rows == 1 {
                        carry
                    } else {
                        Tensor::cat(&[&carry, &prev.narrow(0, 0, rows - 1)?], 0)?
                    };
                    (emb.affine(c.plt_emb_scale, 0.0)?
                        + shifted.affine(c.plt_hidden_scale, 0.0)?)?
                }
            };
            let step = Step::Prefill {
                loop_idx,
                start,
                causal_mask: causal_mask.as_ref(),
                window: window.as_ref(),
            };
            for li in 0..self.layers.len() {
                h = self.layer_forward(li, &h, &cos, &sin, &step, cache)?;
            }
            let normed = rms_norm(&h, &self.norm, c.rms_norm_eps as f32)?;
            if loop_idx + 1 < cache.loops {
                let out = if c.plt_normalize_per_loop { normed } else { h };
                new_carries.push(out.narrow(0, rows - 1, 1)?);
                prev_out = Some(out);
            } else {
                // Logits are f32 whatever the compute dtype (a no-op on the f32 path).
                logits = match logits_wanted {
                    Logits::None => None,
                    Logits::Last => Some(matmul(&self.lm_head, &normed.narrow(0, rows - 1, 1)?)?),
                    Logits::All => Some(matmul(&self.lm_head, &normed)?),
                }
                .map(|l| l.to_dtype(DType::F32))
                .transpose()?;
            }
        }
        if !new_carries.is_empty() {
            cache.carries = Some(Tensor::cat(&new_carries, 0)?);
        }
        cache.tokens.extend_from_slice(ids);
        cache.computed_positions += rows as u64;
        Ok(logits)
    }

    /// Runs one token through all loops as one batch of rows and returns its logits `[vocab]`.
    pub fn decode(&self, cache: &mut PltCache, id: u32) -> Result<Tensor> {
        let mut logits = self.decode_batch(&mut [cache], &[id])?;
        logits.pop().ok_or(ModelError::EmptyInput)
    }

    /// One decode step of several sequences: `ids[i]` after `caches[i]`'s positions, every
    /// loop row of every sequence in one batch through the matrices (the weights read once
    /// for all), each attending over its own cache.
    /// Returns each sequence's logits `[vocab]`, in order.
    pub fn decode_batch(&self, caches: &mut [&mut PltCache], ids: &[u32]) -> Result<Vec<Tensor>> {
        if caches.len() != ids.len() {
            return Err(ModelError::BatchShape {
                caches: caches.len(),
                ids: ids.len(),
            });
        }
        for (cache, &id) in caches.iter_mut().zip(ids) {
            self.check_ids(cache, &[id])?;
            cache.reserve(cache.len() + 1)?;
        }
        let logits = match &self.cpu {
            Some(weights) => fused::decode_batch(self, weights, caches, ids)?,
            None => self.decode_step(caches, ids)?,
        };
        for (cache, &id) in caches.iter_mut().zip(ids) {
            cache.tokens.push(id);
            cache.computed_positions += 1;
        }
        Ok(logits)
    }

    /// The decode step as candle operations (the reference for [`fused::decode_batch`]):
    /// every sequence's loop rows in one batch through the matrices, attention per
    /// sequence over its own cache.
    fn decode_step(&self, caches: &mut [&mut PltCache], ids: &[u32]) -> Result<Vec<Tensor>> {
        let c = &self.config;
        let mut rows = Vec::with_capacity(caches.len());
        let mut h = Vec::with_capacity(caches.len());
        let mut tables = Vec::with_capacity(caches.len());
        let mut ring_masks = Vec::with_capacity(caches.len());
        for (cache, &id) in caches.iter().zip(ids) {
            let pos = cache.len();
            tables.push(self.rope_tables(&vec![pos; cache.loops])?);
            ring_masks.push(self.decode_ring_mask(cache, pos)?);
            let emb = self.embed_ids(&[id])?;
            h.push(match &cache.carries {
                None => emb,
                Some(carries) => {
                    let upper = carries
                        .affine(c.plt_hidden_scale, 0.0)?
                        .broadcast_add(&emb.affine(c.plt_emb_scale, 0.0)?)?;
                    Tensor::cat(&[&emb, &upper], 0)?
                }
            });
            rows.push(cache.loops);
        }
        let mut h = Tensor::cat(&h, 0)?;
        for li in 0..self.layers.len() {
            let (q, k, v) = self.project_qkv(li, &h)?;
            let mut attn = Vec::with_capacity(caches.len());
            let mut first = 0;
            for (i, cache) in caches.iter_mut().enumerate() {
                let part = |t: &Tensor| t.narrow(0, first, rows[i]);
                let (cos, sin) = &tables[i];
                let q = self.rope(&part(&q)?, cos, sin)?;
                let k = self.rope(&part(&k)?, cos, sin)?;
                let step = Step::Decode {
                    pos: cache.len(),
                    ring_mask: ring_masks[i].as_ref(),
                };
                attn.push(self.attention(li, &part(&h)?, &q, &k, &part(&v)?, &step, cache)?);
                first += rows[i];
            }
            h = self.layer_output(li, &h, &Tensor::cat(&attn, 0)?)?;
        }
        let normed = rms_norm(&h, &self.norm, c.rms_norm_eps as f32)?;
        let out = if c.plt_normalize_per_loop {
            &normed
        } else {
            &h
        };
        let mut last = Vec::with_capacity(caches.len());
        let mut first = 0;
        for (cache, &loops) in caches.iter_mut().zip(&rows) {
            if loops > 1 {
                cache.carries = Some(out.narrow(0, first, loops - 1)?.contiguous()?);
            }
            last.push(normed.narrow(0, first + loops - 1, 1)?);
            first += loops;
        }
        let logits = matmul(&self.lm_head, &Tensor::cat(&last, 0)?)?.to_dtype(DType::F32)?;
        (0..caches.len()).map(|i| Ok(logits.get(i)?)).collect()
    }

    /// Drops cached positions from `len` on; loops >= 1 are rebuilt to match a fresh run.
    pub fn truncate(&self, cache: &mut PltCache, len: usize) -> Result<()> {
        if len >= cache.len() {
            return Ok(());
        }
        cache.tokens.truncate(len);
        if cache.loops > 1 {
            self.rebuild_upper_loops(cache, cache.loops)?;
        }
        Ok(())
    }

    /// A separate cache of `cache`'s first `len` positions, as a fresh run of them would
    /// leave it (loop 0's K/V copied, loops >= 1 rebuilt); `cache` is left as it is.
    pub fn fork_cache(&self, cache: &PltCache, len: usize) -> Result<PltCache> {
        let mut fork = cache.copy_prefix(len)?;
        if fork.loops > 1 && !fork.is_empty() {
            let loops = fork.loops;
            self.rebuild_upper_loops(&mut fork, loops)?;
        }
        Ok(fork)
    }

    /// Changes the loop count at a step boundary, keeping loop 0's cache.
    pub fn set_loops(&self, cache: &mut PltCache, loops: usize) -> Result<()> {
        self.check_loops(loops)?;
        if loops <= cache.loops {
            // Loop l's state does not depend on later loops: fewer loops keep it as is.
            return cache.drop_upper_loops(loops);
        }
        self.rebuild_upper_loops(cache, loops)
    }

    /// Recomputes the state of loops >= 1 (and loop 0's outputs that feed it) over the last
    /// `rebuild_span` positions; loop 0's K/V are rewritten with the same values.
    fn rebuild_upper_loops(&self, cache: &mut PltCache, loops: usize) -> Result<()> {
        let len = cache.len();
        let from = len.saturating_sub(self.rebuild_span(loops));
        let replay = cache.tokens.split_off(from);
        cache.reset_upper_loops(loops, from)?;
        self.prefill(cache, &replay, Logits::None)?;
        Ok(())
    }

    /// Reuses the longest cached prefix of `tokens`, computes the rest, and returns the
    /// last position's logits together with the number of positions reused;
    /// `progress(done, total)` follows the computed positions chunk by chunk.
    pub fn prefill_reusing(
        &self,
        cache: &mut PltCache,
        tokens: &[u32],
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<(Tensor, usize)> {
        let keep = self.reuse_prefix(cache, tokens)?;
        let rest = &tokens[keep..];
        let mut logits = None;
        let mut done = 0;
        for chunk in rest.chunks(PREFILL_CHUNK) {
            logits = self.prefill(cache, chunk, Logits::Last)?;
            done += chunk.len();
            progress(done, rest.len());
        }
        Ok((logits.ok_or(ModelError::EmptyInput)?, keep))
    }

    /// Cuts `cache` back to the longest prefix it shares with `tokens`, short of their last
    /// position (whose logits are not kept, so it always runs again), after checking the
    /// ids still to compute; returns how many positions it keeps.
    pub fn reuse_prefix(&self, cache: &mut PltCache, tokens: &[u32]) -> Result<usize> {
        if tokens.is_empty() {
            return Err(ModelError::EmptyInput);
        }
        let keep = cache.shared_prefix(tokens).min(tokens.len() - 1);
        self.check_ids_at(keep, &tokens[keep..])?;
        self.truncate(cache, keep)?;
        Ok(keep)
    }

    fn carry_row(&self, cache: &PltCache, loop_idx: usize) -> Result<Tensor> {
        match &cache.carries {
            Some(carries) => Ok(carries.narrow(0, loop_idx, 1)?),
            None => Ok(Tensor::zeros(
                (1, self.config.hidden_size),
                self.dtype,
                &self.device,
            )?),
        }
    }

    fn embed_ids(&self, ids: &[u32]) -> Result<Tensor> {
        let ids = Tensor::new(ids, &self.device)?;
        Ok(self.embed.embedding(&ids)?.to_dtype(self.dtype)?)
    }

    /// cos and sin `[rows, head_dim/2]` for each row's absolute position.
    fn rope_tables(&self, positions: &[usize]) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            let (c, s) = self.rope_angles(p);
            cos.extend(c);
            sin.extend(s);
        }
        let shape = (positions.len(), half);
        let cos = Tensor::from_vec(cos, shape, &self.device)?.to_dtype(self.dtype)?;
        let sin = Tensor::from_vec(sin, shape, &self.device)?.to_dtype(self.dtype)?;
        Ok((cos, sin))
    }

    /// cos and sin `[head_dim/2]` of position `pos`'s angles.
    fn rope_angles(&self, pos: usize) -> (Vec<f32>, Vec<f32>) {
        self.inv_freq
            .iter()
            .map(|&f| {
                let angle = pos as f64 * f;
                (angle.cos() as f32, angle.sin() as f32)
            })
            .unzip()
    }

    /// RoPE in place on every `head_dim`-wide head of `x`, all at the angles `cos`, `sin`
    /// (what [`Self::rope`] computes).
    fn rope_heads(&self, x: &mut [f32], cos: &[f32], sin: &[f32]) {
        let half = cos.len();
        for head in x.chunks_exact_mut(2 * half) {
            if self.rope_interleaved {
                for (pair, (&c, &s)) in head.chunks_exact_mut(2).zip(cos.iter().zip(sin)) {
                    let (a, b) = (pair[0], pair[1]);
                    pair[0] = a * c - b * s;
                    pair[1] = a * s + b * c;
                }
            } else {
                let (lo, hi) = head.split_at_mut(half);
                for ((a, b), (&c, &s)) in lo.iter_mut().zip(hi).zip(cos.iter().zip(sin)) {
                    let (x1, x2) = (*a, *b);
                    *a = x1 * c - x2 * s;
                    *b = x1 * s + x2 * c;
                }
            }
        }
    }

    fn mask_tensor(
        &self,
        allowed: impl Iterator<Item = bool>,
        shape: (usize, usize),
    ) -> Result<Tensor> {
        let values: Vec<f32> = allowed
            .map(|a| if a { 0.0 } else { f32::NEG_INFINITY })
            .collect();
        Ok(Tensor::from_vec(values, shape, &self.device)?.to_dtype(self.dtype)?)
    }

    fn causal_mask(&self, start: usize, rows: usize) -> Result<Tensor> {
        let keys = start + rows;
        let allowed = (0..rows).flat_map(|i| (0..keys).map(move |j| j <= start + i));
        self.mask_tensor(allowed, (rows, keys))
    }

    /// The window mask over (ring ++ chunk) keys, and which of those keys form the next ring.
    fn window_mask_and_ring_sources(
        &self,
        cache: &PltCache,
        start: usize,
        rows: usize,
    ) -> Result<(Tensor, Tensor)> {
        let w = self.config.plt_window;
        let w1 = w + 1;
        let ring_positions: Vec<Option<usize>> = (0..w1)
            .map(|slot| {
                start
                    .checked_sub(1)
                    .and_then(|last| cache.ring_slot_position(slot, last))
            })
            .collect();
        let key_positions: Vec<Option<usize>> = ring_positions
            .iter()
            .copied()
            .chain((start..start + rows).map(Some))
            .collect();
        let allowed = (0..rows).flat_map(|i| {
            let t = start + i;
            key_positions
                .iter()
                .map(move |k| k.is_some_and(|s| s <= t && s + w >= t))
        });
        let mask = self.mask_tensor(allowed, (rows, w1 + rows))?;
        let last = start + rows - 1;
        let sources: Vec<u32> = (0..w1)
            .map(|slot| {
                let back = (last + w1 - slot) % w1;
                match last.checked_sub(back) {
                    Some(p) if p >= start => (w1 + p - start) as u32,
                    _ => slot as u32,
                }
            })
            .collect();
        Ok((mask, Tensor::new(sources, &self.device)?))
    }

    /// The (ring ++ chunk) keys of a chunk's window attention in position order (the ring
    /// slots of positions `start - (window+1) ..`, then the chunk), and the range of them
    /// each row reads: its position and the `window` before it that are valid.
    fn windows_in_position_order(
        &self,
        cache: &PltCache,
        start: usize,
        rows: usize,
    ) -> Result<(Tensor, Vec<Range<usize>>)> {
        let (w, w1) = (self.config.plt_window, self.config.plt_window + 1);
        let order: Vec<u32> = (0..w1)
            .map(|j| ((start + j) % w1) as u32)
            .chain((w1..w1 + rows).map(|j| j as u32))
            .collect();
        // Ring slots hold positions `start - w1 ..= start - 1` from `ring_valid_from` on;
        // the chunk's own are all valid. Position p is key p + w1 - start.
        let first_valid = cache
            .ring_valid_from
            .max(start.saturating_sub(w1))
            .min(start);
        let windows = (0..rows)
            .map(|r| {
                let t = start + r;
                t.saturating_sub(w).max(first_valid) + w1 - start..r + w1 + 1
            })
            .collect();
        Ok((Tensor::new(order, &self.device)?, windows))
    }

    /// The shape of this model's attention for the CPU kernels of width `isa`.
    fn attention_shape(&self, isa: Isa) -> fused::AttentionShape {
        let c = &self.config;
        fused::AttentionShape {
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            hd: c.head_dim,
            // As candle's affine: the f64 factor rounded to f32.
            scale: (1.0 / (c.head_dim as f64).sqrt()) as f32,
            isa,
        }
    }

    fn decode_ring_mask(&self, cache: &PltCache, pos: usize) -> Result<Option<Tensor>> {
        if cache.loops == 1 {
            return Ok(None);
        }
        let w1 = self.config.plt_window + 1;
        let valid: Vec<bool> = (0..w1)
            .map(|s| cache.ring_slot_position(s, pos).is_some())
            .collect();
        if valid.iter().all(|&v| v) {
            return Ok(None);
        }
        Ok(Some(
            self.mask_tensor(valid.into_iter(), (1, w1))?.reshape(w1)?,
        ))
    }

    /// RoPE on `[rows, heads, hd]` with each row's `[rows, hd/2]` angles.
    /// `t` rounded to `dtype` and back to the compute dtype.
    fn round_to(&self, t: &Tensor, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype {
            return Ok(t.clone());
        }
        Ok(t.to_dtype(dtype)?.to_dtype(self.dtype)?)
    }

    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (rows, heads, hd) = x.dims3()?;
        Ok(if self.rope_interleaved {
            let x = x.reshape((rows, heads, 1, hd))?;
            let cs = |t: &Tensor| t.reshape((rows, 1, hd / 2));
            candle_nn::rotary_emb::rope_i(&x, &cs(cos)?, &cs(sin)?)?.reshape((rows, heads, hd))?
        } else {
            candle_nn::rotary_emb::rope_thd(&x.unsqueeze(0)?, cos, sin)?.squeeze(0)?
        })
    }

    fn layer_forward(
        &self,
        li: usize,
        h: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        step: &Step<'_>,
        cache: &mut PltCache,
    ) -> Result<Tensor> {
        let (q, k, v) = self.project_qkv(li, h)?;
        let q = self.rope(&q, cos, sin)?;
        let k = self.rope(&k, cos, sin)?;
        let attn = self.attention(li, h, &q, &k, &v, step, cache)?;
        self.layer_output(li, h, &attn)
    }

    /// Layer `li`'s queries, keys and values of the rows `h` (`[rows, heads, hd]`, before RoPE).
    fn project_qkv(&self, li: usize, h: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let c = &self.config;
        let layer = &self.layers[li];
        let rows = h.dim(0)?;
        let (heads, kv_heads, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let x = rms_norm(h, &layer.input_norm, c.rms_norm_eps as f32)?;
        let q = matmul(&layer.q_proj, &x)?.reshape((rows, heads, hd))?;
        let k = matmul(&layer.k_proj, &x)?.reshape((rows, kv_heads, hd))?;
        let v = matmul(&layer.v_proj, &x)?.reshape((rows, kv_heads, hd))?;
        Ok((q, k, v))
    }

    /// Layer `li`'s attention output for one sequence's rows `h` and their post-RoPE
    /// queries and keys; writes the K/V to `cache`.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        li: usize,
        h: &Tensor,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        step: &Step<'_>,
        cache: &mut PltCache,
    ) -> Result<Tensor> {
        let c = &self.config;
        let layer = &self.layers[li];
        let rows = h.dim(0)?;
        let hd = c.head_dim;
        // K/V as the cache stores them: this chunk's own keys read the same values as later
        // positions will (and as the CPU decode step does).
        let kv = cache.shape.kv_dtype;
        let (k, v) = (self.round_to(k, kv)?, self.round_to(v, kv)?);
        let stored = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(kv)?) };
        let computed = |t: Tensor| -> Result<Tensor> { Ok(t.to_dtype(self.dtype)?) };
        let attn = match *step {
            Step::Prefill {
                loop_idx,
                start,
                causal_mask,
                window,
            } => {
                let keys = start + rows;
                if loop_idx == 0 {
                    cache.k0[li].slice_set(
                        &stored(&k.transpose(0, 1)?.contiguous()?)?,
                        1,
                        start,
                    )?;
                    cache.v0[li].slice_set(
                        &stored(&v.transpose(0, 1)?.contiguous()?)?,
                        1,
                        start,
                    )?;
                }
                let fused = self.cpu.as_ref().map(|w| self.attention_shape(w.isa));
                let global = match fused {
                    Some(shape) => {
                        let causal: Vec<_> = (0..rows).map(|r| 0..start + r + 1).collect();
                        let (k0, v0) = (&cache.k0[li], &cache.v0[li]);
                        prefill::tensor_attention(q, k0, v0, &causal, shape)?
                    }
                    None => {
                        let k0 = computed(cache.k0[li].narrow(1, 0, keys)?)?;
                        let v0 = computed(cache.v0[li].narrow(1, 0, keys)?)?;
                        attend(q, &k0, &v0, causal_mask, hd)?
                    }
                };
                match window {
                    Some((window_mask, ring_sources)) if loop_idx > 0 => {
                        let ring = loop_idx - 1;
                        let ring_k = computed(cache.ring_k[li].get(ring)?)?;
                        let ring_v = computed(cache.ring_v[li].get(ring)?)?;
                        let local_k =
                            Tensor::cat(&[&ring_k, &k.transpose(0, 1)?], 1)?.contiguous()?;
                        let local_v =
                            Tensor::cat(&[&ring_v, &v.transpose(0, 1)?], 1)?.contiguous()?;
                        let local = match fused {
                            Some(shape) => {
                                let (keys, windows) =
                                    self.windows_in_position_order(cache, start, rows)?;
                                let local_k = local_k.index_select(&keys, 1)?;
                                let local_v = local_v.index_select(&keys, 1)?;
                                prefill::tensor_attention(q, &local_k, &local_v, &windows, shape)?
                            }
                            None => attend(q, &local_k, &local_v, Some(window_mask), hd)?,
                        };
                        let next_k = local_k.index_select(ring_sources, 1)?.unsqueeze(0)?;
                        let next_v = local_v.index_select(ring_sources, 1)?.unsqueeze(0)?;
                        cache.ring_k[li].slice_set(&stored(&next_k)?, 0, ring)?;
                        cache.ring_v[li].slice_set(&stored(&next_v)?, 0, ring)?;
                        let gate = layer.gate(h, q, c.rms_norm_eps)?;
                        mix(&gate, &global, &local, hd)?
                    }
                    _ => global,
                }
            }
            Step::Decode { pos, ring_mask } => {
                // Loop 0 writes position `pos` first: every row's global attention reads it.
                cache.k0[li].slice_set(
                    &stored(&k.narrow(0, 0, 1)?.transpose(0, 1)?.contiguous()?)?,
                    1,
                    pos,
                )?;
                cache.v0[li].slice_set(
                    &stored(&v.narrow(0, 0, 1)?.transpose(0, 1)?.contiguous()?)?,
                    1,
                    pos,
                )?;
                let k0 = computed(cache.k0[li].narrow(1, 0, pos + 1)?)?;
                let v0 = computed(cache.v0[li].narrow(1, 0, pos + 1)?)?;
                let global = attend(q, &k0, &v0, None, hd)?;
                if rows == 1 {
                    global
                } else {
                    let upper = rows - 1;
                    let slot = pos % (c.plt_window + 1);
                    let k_up = k.narrow(0, 1, upper)?.unsqueeze(2)?.contiguous()?;
                    let v_up = v.narrow(0, 1, upper)?.unsqueeze(2)?.contiguous()?;
                    cache.ring_k[li].slice_set(&stored(&k_up)?, 2, slot)?;
                    cache.ring_v[li].slice_set(&stored(&v_up)?, 2, slot)?;
                    let q_up = q.narrow(0, 1, upper)?;
                    let (ring_k, ring_v) = (
                        computed(cache.ring_k[li].clone())?,
                        computed(cache.ring_v[li].clone())?,
                    );
                    let local = attend_rings(&q_up, &ring_k, &ring_v, ring_mask, hd)?;
                    let gate = layer.gate(&h.narrow(0, 1, upper)?, &q_up, c.rms_norm_eps)?;
                    let mixed = mix(&gate, &global.narrow(0, 1, upper)?, &local, hd)?;
                    Tensor::cat(&[&global.narrow(0, 0, 1)?, &mixed], 0)?
                }
            }
        };
        Ok(attn)
    }

    /// Layer `li`'s output rows from its input rows `h` and their attention `attn`.
    fn layer_output(&self, li: usize, h: &Tensor, attn: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let layer = &self.layers[li];
        let h = (h + matmul(&layer.o_proj, attn)?)?;
        let y = rms_norm(&h, &layer.post_attention_norm, c.rms_norm_eps as f32)?;
        let mlp =
            candle_nn::ops::silu(&matmul(&layer.gate_proj, &y)?)? * matmul(&layer.up_proj, &y)?;
        Ok((&h + matmul(&layer.down_proj, &mlp?)?)?)
    }
}

impl DecoderLayer {
    /// The layer's seven projection matrices (not the gate's).
    fn matrices(&self) -> [&Matrix; 7] {
        [
            &self.q_proj,
            &self.k_proj,
            &self.v_proj,
            &self.o_proj,
            &self.gate_proj,
            &self.up_proj,
            &self.down_proj,
        ]
    }

    /// Per-row, per-head gate `[rows, heads]` of loops >= 1.
    fn gate(&self, r: &Tensor, q: &Tensor, eps: f64) -> Result<Tensor> {
        let logits = match &self.plt_gate {
            Some(PltGate::HiddenState { weight, bias, norm }) => {
                let normed = rms_norm(r, norm, eps as f32)?;
                matmul(weight, &normed)?.broadcast_add(bias)?
            }
            Some(PltGate::Query { weight, bias }) => q
                .broadcast_mul(weight)?
                .sum(D::Minus1)?
                .broadcast_add(bias)?,
            // check_loops refuses more than one loop without gates, so no row reaches here.
            None => return Err(ModelError::NoPltGates(2)),
        };
        // The sigmoid in f32 also in half precision (on the f32 path both casts are no-ops).
        Ok(sigmoid(&logits.to_dtype(DType::F32)?)?.to_dtype(r.dtype())?)
    }
}

/// Rows from which a quantized matrix is dequantized for one f32 GEMM. plait's int8 kernels
/// are about twice as fast at any row count (as llama.cpp's prompt processing: pp2048 300
/// vs 245 tok/s on the default model), but f32 activations keep a prompt's prefill at the
/// float64 forward's scores (the default model's text: nll within 1e-4 of it, 3e-3 with
/// int8), the reference the decode path is checked against. A follow-up turn's few new
/// rows, the cost a user waits for at every turn, take the kernels, as decode does.
const DEQUANTIZE_FROM_ROWS: usize = 64;

/// A weight matrix: candle's (dense, or quantized in a format plait has no kernel for), or
/// columns of one of plait's multi-row kernel matrices (Q4_1, Q8_0 and Q4_K on the CPU),
/// which unpack each weight block once for all the rows of a decode step and hold the only
/// copy of the weights.
#[derive(Clone)]
enum Matrix {
    Candle(QMatMul),
    Kernel(FastColumns),
}

/// Columns `cols` of a kernel matrix: matrices read from the same input (q/k/v, gate/up)
/// share one, so the CPU decode step runs them as one product.
#[derive(Clone)]
struct FastColumns {
    kernel: Arc<QuantMatrix>,
    cols: Range<usize>,
    /// How the checkpoint stored the weights (Q4_K is repacked as Q4_1).
    stored: GgmlDType,
}

impl Matrix {
    /// [`Self::stacked`] of one matrix.
    fn new(kernels: Option<Isa>, candle: QMatMul) -> Self {
        let [matrix] = Self::stacked(kernels, [candle]);
        matrix
    }

    /// The matrices of `parts`, sharing one kernel matrix at width `kernels` when there is
    /// one and all are quantized in one supported format with one row length; candle's
    /// otherwise. candle's blocks of a part that gets a kernel are dropped here (unless
    /// another owner keeps them, e.g. the embedding of a tied head).
    fn stacked<const N: usize>(kernels: Option<Isa>, parts: [QMatMul; N]) -> [Self; N] {
        let Some(isa) = kernels else {
            return parts.map(Self::Candle);
        };
        let qtensors: Option<Vec<&QTensor>> = parts
            .iter()
            .map(|m| match m {
                // The kernel is a CPU one; on a GPU it would only copy the weights to the host.
                QMatMul::QTensor(t) if t.device().is_cpu() => Some(t.as_ref()),
                _ => None,
            })
            .collect();
        let Some((kernel, columns)) = qtensors.and_then(|ts| {
            let (kernel, ranges) = QuantMatrix::from_qtensors(&ts, isa)?;
            // from_qtensors gives one range per part.
            let stored = ts.iter().map(|t| t.dtype());
            Some((
                Arc::new(kernel),
                ranges.into_iter().zip(stored).collect::<Vec<_>>(),
            ))
        }) else {
            return parts.map(Self::Candle);
        };
        let mut columns = columns.into_iter();
        parts.map(|candle| match columns.next() {
            Some((cols, stored)) => Self::Kernel(FastColumns {
                kernel: kernel.clone(),
                cols,
                stored,
            }),
            None => Self::Candle(candle),
        })
    }

    /// The kernel columns, if the matrix has a kernel.
    fn fast(&self) -> Option<&FastColumns> {
        match self {
            Self::Kernel(f) => Some(f),
            Self::Candle(_) => None,
        }
    }

    /// Weights held (elements).
    fn elem_count(&self) -> usize {
        match self {
            Self::Candle(m) => matrix_elems(m),
            Self::Kernel(f) => f.cols.len() * f.kernel.k(),
        }
    }

    /// Bytes of weights held.
    fn storage_bytes(&self) -> usize {
        match self {
            Self::Candle(QMatMul::QTensor(t)) => t.storage_size_in_bytes(),
            Self::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => {
                t.elem_count() * t.dtype().size_in_bytes()
            }
            Self::Kernel(f) => f.cols.len() * f.kernel.column_bytes(),
        }
    }

    /// How the weights are stored ("F32", "Q4_1", ...).
    fn storage_name(&self) -> String {
        match self {
            Self::Candle(QMatMul::QTensor(t)) => format!("{:?}", t.dtype()),
            Self::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => {
                t.dtype().as_str().to_uppercase()
            }
            Self::Kernel(f) => format!("{:?}", f.stored),
        }
    }

    /// Whether the weights are stored quantized (in blocks).
    fn is_quantized(&self) -> bool {
        matches!(self, Self::Kernel(_) | Self::Candle(QMatMul::QTensor(_)))
    }

    /// `x @ w^T` on f32 rows (`rows * k`, row-major) in memory: the kernel when there is
    /// one, else candle's forward.
    fn forward_f32(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        match self {
            Self::Kernel(f) => Ok(f.kernel.matmul(x, rows, f.cols.clone())),
            Self::Candle(m) => {
                let x = Tensor::from_slice(x, (rows, x.len() / rows.max(1)), &Device::Cpu)?;
                Ok(m.forward(&x)?.flatten_all()?.to_vec1()?)
            }
        }
    }
}

/// `x @ w^T`: plait's kernels or candle's quantized kernels for few rows (decode), one f32
/// GEMM for many (prefill).
fn matmul(w: &Matrix, x: &Tensor) -> candle_core::Result<Tensor> {
    let rows = x.dim(0)?;
    match w {
        Matrix::Candle(QMatMul::QTensor(q)) if rows >= DEQUANTIZE_FROM_ROWS => {
            let dense = q.dequantize(x.device())?;
            x.matmul(&dense.t()?)
        }
        // Kernels exist only for CPU models, which compute in f32.
        Matrix::Kernel(f) if rows >= DEQUANTIZE_FROM_ROWS => {
            let dense = f.kernel.dequantize(f.cols.clone());
            let dense = Tensor::from_vec(dense, (f.cols.len(), f.kernel.k()), x.device())?;
            x.matmul(&dense.t()?)
        }
        Matrix::Kernel(f) => {
            let input: Vec<f32> = x.flatten_all()?.to_vec1()?;
            let out = f.kernel.matmul(&input, rows, f.cols.clone());
            Tensor::from_vec(out, (rows, f.cols.len()), x.device())
        }
        Matrix::Candle(m) => m.forward(x),
    }
}

fn matrix_elems(m: &QMatMul) -> usize {
    match m {
        QMatMul::QTensor(t) => t.shape().elem_count(),
        QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.elem_count(),
    }
}

/// Attention of `q` `[rows, heads, hd]` over shared keys `k`, `v` `[kv_heads, keys, hd]`
/// (GQA: consecutive query heads share a KV head); returns `[rows, heads*hd]`.
fn attend(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, hd: usize) -> Result<Tensor> {
    let (rows, heads, _) = q.dims3()?;
    let (kv_heads, keys, _) = k.dims3()?;
    let group = heads / kv_heads;
    let q = q
        .reshape((rows, kv_heads, group, hd))?
        .transpose(0, 1)?
        .reshape((kv_heads, rows * group, hd))?;
    let scores = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?;
    let scores = match mask {
        Some(mask) => scores
            .reshape((kv_heads, rows, group, keys))?
            .broadcast_add(&mask.reshape((1, rows, 1, keys))?)?
            .reshape((kv_heads, rows * group, keys))?,
        None => scores,
    };
    let probs = softmax_last_dim(&scores)?;
    let out = probs.matmul(&v.contiguous()?)?;
    Ok(out
        .reshape((kv_heads, rows, group, hd))?
        .transpose(0, 1)?
        .reshape((rows, heads * hd))?)
}

/// Attention of each row of `q` `[rows, heads, hd]` over its own ring `[rows, kv_heads, slots, hd]`.
fn attend_rings(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    hd: usize,
) -> Result<Tensor> {
    let (rows, heads, _) = q.dims3()?;
    let kv_heads = k.dim(1)?;
    let q = q.reshape((rows, kv_heads, heads / kv_heads, hd))?;
    let scores = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?;
    let scores = match mask {
        Some(mask) => scores.broadcast_add(mask)?,
        None => scores,
    };
    let out = softmax_last_dim(&scores)?.matmul(v)?;
    Ok(out.reshape((rows, heads * hd))?)
}

/// Per head `g * global + (1 - g) * local`, with `gate` `[rows, heads]`.
fn mix(gate: &Tensor, global: &Tensor, local: &Tensor, hd: usize) -> Result<Tensor> {
    let (rows, width) = global.dims2()?;
    let heads = width / hd;
    let g = gate.reshape((rows, heads, 1))?;
    let global = global.reshape((rows, heads, hd))?;
    let local = local.reshape((rows, heads, hd))?;
    let mixed = (&local + (global - &local)?.broadcast_mul(&g)?)?;
    Ok(mixed.reshape((rows, width))?)
}

//! The decode step on the CPU in f32: each layer runs on plain buffers with plait's kernels
//! instead of as several hundred candle operations per token, each of which allocates and
//! dispatches. It does the arithmetic of the candle path in `plt.rs`, which stays the
//! reference and runs everywhere else (other devices, other dtypes, prefill); the tests
//! below check the two against each other.

use std::sync::Arc;

use crate::model::kernels::parallel_pieces;

use candle_core::{CpuStorage, Device, InplaceOp1, Layout, Storage, Tensor};

use super::{Matrix, PltGate, PltModel};
use crate::model::cache::PltCache;
use crate::model::error::{ModelError, Result};

/// The model's vectors in f32, read once at load.
pub(super) struct CpuWeights {
    layers: Vec<CpuLayer>,
    norm: Vec<f32>,
}

struct CpuLayer {
    input_norm: Vec<f32>,
    post_attention_norm: Vec<f32>,
    gate: Option<CpuGate>,
}

/// [`PltGate`]'s vectors; the hidden-state gate's matrix stays the layer's.
enum CpuGate {
    HiddenState { norm: Vec<f32>, bias: Vec<f32> },
    Query { weight: Vec<f32>, bias: Vec<f32> },
}

fn to_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1()?)
}

impl CpuWeights {
    /// Reads the norms and gates of a model loaded on the CPU in f32.
    pub(super) fn new(model: &PltModel) -> Result<Self> {
        let layers = model
            .layers
            .iter()
            .map(|l| {
                let gate = match &l.plt_gate {
                    None => None,
                    Some(PltGate::HiddenState { bias, norm, .. }) => Some(CpuGate::HiddenState {
                        norm: to_f32(norm)?,
                        bias: to_f32(bias)?,
                    }),
                    Some(PltGate::Query { weight, bias }) => Some(CpuGate::Query {
                        weight: to_f32(weight)?,
                        bias: to_f32(bias)?,
                    }),
                };
                Ok(CpuLayer {
                    input_norm: to_f32(&l.input_norm)?,
                    post_attention_norm: to_f32(&l.post_attention_norm)?,
                    gate,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            layers,
            norm: to_f32(&model.norm)?,
        })
    }
}

/// All loops of position `cache.len()` (room reserved) for token `id`, one row per loop:
/// writes the K/V and the carries, returns the last loop's logits `[vocab]`.
pub(super) fn decode_step(
    model: &PltModel,
    weights: &CpuWeights,
    cache: &mut PltCache,
    id: u32,
) -> Result<Tensor> {
    let c = &model.config;
    let (d, heads, kv_heads, hd) = (
        c.hidden_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
    );
    let (loops, pos, cap) = (cache.loops, cache.len(), cache.capacity);
    let w1 = c.plt_window + 1;
    let eps = c.rms_norm_eps as f32;
    let (qw, kw) = (heads * hd, kv_heads * hd);
    let group = heads / kv_heads;
    // As candle's affine: the f64 factor rounded to f32.
    let scale = (1.0 / (hd as f64).sqrt()) as f32;

    let emb = to_f32(&model.embed_ids(&[id])?)?;
    let mut h = emb.clone();
    if let Some(carries) = &cache.carries {
        let (hs, es) = (c.plt_hidden_scale as f32, c.plt_emb_scale as f32);
        for carry in to_f32(carries)?.chunks_exact(d) {
            h.extend(carry.iter().zip(&emb).map(|(&s, &e)| s * hs + e * es));
        }
    }
    let (cos, sin) = model.rope_angles(pos);
    let ring_valid: Vec<bool> = (0..w1)
        .map(|s| cache.ring_slot_position(s, pos).is_some())
        .collect();

    for (li, (layer, lw)) in model.layers.iter().zip(&weights.layers).enumerate() {
        let x = rms_norm_rows(&h, &lw.input_norm, eps);
        let qkv = project(&[&layer.q_proj, &layer.k_proj, &layer.v_proj], &x, loops)?;
        let (mut q, mut k, mut v) = (
            Vec::with_capacity(loops * qw),
            Vec::with_capacity(loops * kw),
            Vec::with_capacity(loops * kw),
        );
        for row in qkv.chunks_exact(qw + 2 * kw) {
            q.extend_from_slice(&row[..qw]);
            k.extend_from_slice(&row[qw..qw + kw]);
            v.extend_from_slice(&row[qw + kw..]);
        }
        model.rope_heads(&mut q, &cos, &sin);
        model.rope_heads(&mut k, &cos, &sin);

        // Loop 0 writes position `pos` first: every row's global attention reads it. Rows
        // 1.. go to their rings `[loops-1, kv_heads, w1, hd]`, i.e. (loops-1)*kv_heads
        // heads of w1 slots.
        write_heads(&cache.k0[li], &k[..kw], cap, pos, hd)?;
        write_heads(&cache.v0[li], &v[..kw], cap, pos, hd)?;
        if loops > 1 {
            write_heads(&cache.ring_k[li], &k[kw..], w1, pos % w1, hd)?;
            write_heads(&cache.ring_v[li], &v[kw..], w1, pos % w1, hd)?;
        }

        let gates = match loops {
            1 => Vec::new(),
            _ => gate(layer, lw, &h[d..], &q[qw..], loops - 1, hd, eps)?,
        };
        // Head-major `[heads, loops, hd]`: a thread's run of tasks covers every loop of its
        // heads, so each loop after the first finds the head's K/V in its core's cache.
        let mut by_head = vec![0f32; loops * qw];
        {
            let (k0, k0_layout) = cache.k0[li].storage_and_layout();
            let (v0, v0_layout) = cache.v0[li].storage_and_layout();
            let (k0, v0) = (cpu_f32(&k0, k0_layout)?, cpu_f32(&v0, v0_layout)?);
            // Loops >= 1 only; at one loop the rings are empty and never read.
            let rings = cache.ring_k.get(li).zip(cache.ring_v.get(li));
            let rings = rings.map(|(k, v)| (k.storage_and_layout(), v.storage_and_layout()));
            let (rk, rv) = match &rings {
                Some(((k, kl), (v, vl))) => (cpu_f32(k, kl)?, cpu_f32(v, vl)?),
                None => (&[][..], &[][..]),
            };
            // One task per (head, row).
            parallel_pieces(&mut by_head, hd, |t, out| {
                let (head, r) = (t / loops, t % loops);
                let g = head / group;
                let q = &q[(r * heads + head) * hd..(r * heads + head + 1) * hd];
                let span = g * cap * hd..(g * cap + pos + 1) * hd;
                attend(q, &k0[span.clone()], &v0[span], scale, None, out);
                if r > 0 {
                    let ring = ((r - 1) * kv_heads + g) * w1 * hd..;
                    let ring = ring.start..ring.start + w1 * hd;
                    let mut local = vec![0f32; hd];
                    let valid = Some(&ring_valid[..]);
                    attend(q, &rk[ring.clone()], &rv[ring], scale, valid, &mut local);
                    let gh = gates[(r - 1) * heads + head];
                    // Per head `g * global + (1 - g) * local`, as `mix` computes it.
                    for (o, &l) in out.iter_mut().zip(&local) {
                        *o = l + (*o - l) * gh;
                    }
                }
            });
        }
        let mut attn = vec![0f32; loops * qw];
        for (t, out) in by_head.chunks_exact(hd).enumerate() {
            let (head, r) = (t / loops, t % loops);
            attn[(r * heads + head) * hd..(r * heads + head + 1) * hd].copy_from_slice(out);
        }

        add_assign(&mut h, &project(&[&layer.o_proj], &attn, loops)?);
        let y = rms_norm_rows(&h, &lw.post_attention_norm, eps);
        let ffn = c.intermediate_size;
        let gate_up = project(&[&layer.gate_proj, &layer.up_proj], &y, loops)?;
        let act: Vec<f32> = gate_up
            .chunks_exact(2 * ffn)
            .flat_map(|row| {
                let (g, u) = row.split_at(ffn);
                g.iter().zip(u).map(|(&g, &u)| g / (1.0 + (-g).exp()) * u)
            })
            .collect();
        add_assign(&mut h, &project(&[&layer.down_proj], &act, loops)?);
    }

    let normed = rms_norm_rows(&h, &weights.norm, eps);
    if loops > 1 {
        let out = if c.plt_normalize_per_loop {
            &normed
        } else {
            &h
        };
        let carries = &out[..(loops - 1) * d];
        cache.carries = Some(Tensor::from_slice(carries, (loops - 1, d), &Device::Cpu)?);
    }
    let logits = model.lm_head.forward_f32(&normed[(loops - 1) * d..], 1)?;
    Ok(Tensor::from_vec(logits, c.vocab_size, &Device::Cpu)?)
}

/// The gate of loops >= 1, `[rows, heads]`, from the layer's input rows `r` (hidden-state
/// gate) or the post-RoPE queries `q` (query gate).
fn gate(
    layer: &super::DecoderLayer,
    lw: &CpuLayer,
    r: &[f32],
    q: &[f32],
    rows: usize,
    hd: usize,
    eps: f32,
) -> Result<Vec<f32>> {
    let mut logits = match (&lw.gate, &layer.plt_gate) {
        (Some(CpuGate::HiddenState { norm, bias }), Some(PltGate::HiddenState { weight, .. })) => {
            let mut l = project(&[weight], &rms_norm_rows(r, norm, eps), rows)?;
            add_rows(&mut l, bias);
            l
        }
        (Some(CpuGate::Query { weight, bias }), _) => {
            let mut l: Vec<f32> = q
                .chunks_exact(hd)
                .zip(weight.chunks_exact(hd).cycle())
                .map(|(qh, wh)| qh.iter().zip(wh).map(|(a, b)| a * b).sum())
                .collect();
            add_rows(&mut l, bias);
            l
        }
        // check_loops refuses more than one loop without gates, so no row reaches here.
        _ => return Err(ModelError::NoPltGates(rows + 1)),
    };
    for l in &mut logits {
        *l = 1.0 / ((-*l).exp() + 1.0);
    }
    Ok(logits)
}

/// `x @ w^T` for each matrix of `ms`, their outputs side by side per row: one product when
/// they are consecutive columns of one kernel matrix (q/k/v, gate/up).
fn project(ms: &[&Matrix], x: &[f32], rows: usize) -> Result<Vec<f32>> {
    if let Some(first) = ms.first().and_then(|m| m.fast.as_ref()) {
        let mut end = first.cols.start;
        let joined = ms.iter().all(|m| match &m.fast {
            Some(f) if Arc::ptr_eq(&f.kernel, &first.kernel) && f.cols.start == end => {
                end = f.cols.end;
                true
            }
            _ => false,
        });
        if joined {
            return Ok(first.kernel.matmul(x, rows, first.cols.start..end));
        }
    }
    let outs = ms
        .iter()
        .map(|m| m.forward_f32(x, rows))
        .collect::<Result<Vec<_>>>()?;
    let mut y = Vec::with_capacity(outs.iter().map(Vec::len).sum());
    for r in 0..rows {
        for o in &outs {
            let n = o.len() / rows;
            y.extend_from_slice(&o[r * n..(r + 1) * n]);
        }
    }
    Ok(y)
}

/// RMSNorm of each row of `x` with weight `w`, as candle's `rms_norm` computes it.
fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let n = w.len();
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(n) {
        let sum2: f32 = row.iter().map(|v| v * v).sum();
        let m = (sum2 / n as f32 + eps).sqrt();
        out.extend(row.iter().zip(w).map(|(&v, &a)| v / m * a));
    }
    out
}

fn add_assign(h: &mut [f32], x: &[f32]) {
    for (a, b) in h.iter_mut().zip(x) {
        *a += b;
    }
}

/// Adds `bias` to every row of `x`.
fn add_rows(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        add_assign(row, bias);
    }
}

/// Softmax attention of query `q` over the `[keys, hd]` rows of `k` and `v`, leaving out
/// keys whose `valid` entry is false, written to `out`.
fn attend(q: &[f32], k: &[f32], v: &[f32], scale: f32, valid: Option<&[bool]>, out: &mut [f32]) {
    let hd = q.len();
    let mut p: Vec<f32> = k
        .chunks_exact(hd)
        .enumerate()
        .map(|(j, kr)| match valid {
            Some(m) if !m[j] => f32::NEG_INFINITY,
            _ => dot(q, kr) * scale,
        })
        .collect();
    let max = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for s in p.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    for s in p.iter_mut() {
        *s /= sum;
    }
    out.fill(0.0);
    // Four keys a pass: a quarter of the loads and stores of `out`.
    let (p4, v4) = (p.chunks_exact(4), v.chunks_exact(4 * hd));
    for (&pj, vr) in p4.remainder().iter().zip(v4.remainder().chunks_exact(hd)) {
        for (o, &x) in out.iter_mut().zip(vr) {
            *o += pj * x;
        }
    }
    for (pj, vr) in p4.zip(v4) {
        let (a, rest) = vr.split_at(hd);
        let (b, rest) = rest.split_at(hd);
        let (c, e) = rest.split_at(hd);
        let rows = a.iter().zip(b).zip(c.iter().zip(e));
        for (o, ((&a, &b), (&c, &e))) in out.iter_mut().zip(rows) {
            *o += pj[0] * a + pj[1] * b + pj[2] * c + pj[3] * e;
        }
    }
}

/// `a . b` with 16 partial sums, so that it vectorizes.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (a16, b16) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = a16
        .remainder()
        .iter()
        .zip(b16.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a16.zip(b16) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// The f32 elements of a contiguous f32 tensor on the CPU.
fn cpu_f32<'a>(storage: &'a Storage, layout: &Layout) -> Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(v)), Some((start, end))) => Ok(&v[start..end]),
        _ => Err(not_cpu_f32()),
    }
}

fn not_cpu_f32() -> ModelError {
    candle_core::Error::Msg("CPU decode: cache tensor is not contiguous f32 on the CPU".into())
        .into()
}

/// Writes the `hd`-wide heads of `src` to slot `at` of `t`, `[heads, slots, hd]`.
fn write_heads(t: &Tensor, src: &[f32], slots: usize, at: usize, hd: usize) -> Result<()> {
    Ok(t.inplace_op1(&WriteHeads { src, slots, at, hd })?)
}

/// [`write_heads`] as an in-place op: candle's way to change a tensor's storage.
struct WriteHeads<'a> {
    src: &'a [f32],
    slots: usize,
    at: usize,
    hd: usize,
}

impl InplaceOp1 for WriteHeads<'_> {
    fn name(&self) -> &'static str {
        "plait-write-heads"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let (CpuStorage::F32(v), Some((start, end))) = (storage, layout.contiguous_offsets())
        else {
            candle_core::bail!("CPU decode: cache tensor is not contiguous f32 on the CPU");
        };
        let dst = &mut v[start..end];
        for (i, head) in self.src.chunks_exact(self.hd).enumerate() {
            let at = (i * self.slots + self.at) * self.hd;
            dst[at..at + self.hd].copy_from_slice(head);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::DType;

    use super::*;
    use crate::model::config::PltConfig;
    use crate::model::kernels::tests::lcg;
    use crate::model::weights::WeightSource;
    use crate::model::Logits;

    /// Random weights: matrices quantized as in the default model (Q8_0 embedding, tied
    /// head; Q4_1 layers) or dense, so both the kernels and candle's fallback run.
    struct RandomWeights {
        seed: u64,
        quantized: bool,
        rope_interleaved: bool,
    }

    impl RandomWeights {
        fn values(&mut self, shape: &[usize]) -> Tensor {
            self.seed += 1;
            let len = shape.iter().product();
            Tensor::from_vec(lcg(self.seed, len), shape, &Device::Cpu).unwrap()
        }
    }

    impl WeightSource for RandomWeights {
        fn matrix(&mut self, name: &str, shape: &[usize]) -> Result<QMatMul> {
            let w = (self.values(shape) * 0.3)?;
            if !self.quantized {
                return Ok(QMatMul::Tensor(w));
            }
            let dtype = if name.contains("embed") {
                GgmlDType::Q8_0
            } else {
                GgmlDType::Q4_1
            };
            Ok(QMatMul::from_qtensor(QTensor::quantize(&w, dtype)?)?)
        }

        fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
            let t = self.values(shape);
            // Norm weights near 1, as trained ones are.
            Ok(if name.contains("norm") {
                ((t * 0.3)? + 1.0)?
            } else {
                t
            })
        }

        fn contains(&self, name: &str) -> bool {
            name != "lm_head.weight"
        }

        fn ties_missing_head(&self) -> bool {
            true
        }

        fn rope_interleaved(&self) -> bool {
            self.rope_interleaved
        }
    }

    fn random_model(
        hidden_gate: bool,
        normalize: bool,
        quantized: bool,
        interleaved: bool,
    ) -> PltModel {
        let config = format!(
            r#"{{"model_type": "iquestpltcoder", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 16, "vocab_size": 96, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
            "plt_num_loops": 2, "plt_window_size": [3, 0], "plt_emb_scale": 0.707,
            "plt_hidden_scale": 0.5, "plt_normalize_per_loop": {normalize},
            "plt_gate_use_hidden_states": {hidden_gate}}}"#
        );
        let config = PltConfig::from_json(&config, std::path::Path::new("random")).unwrap();
        let mut source = RandomWeights {
            seed: 7,
            quantized,
            rope_interleaved: interleaved,
        };
        PltModel::from_source(config, &mut source, &Device::Cpu, DType::F32, &mut |_| {}).unwrap()
    }

    /// Logits of every decode step: from an empty cache, after a prefill, and after the
    /// loop count is raised (rings rebuilt from a later position).
    fn decode_run(model: &PltModel, loops: usize) -> Vec<Vec<f32>> {
        let ids = |n: usize, salt: u32| (0..n as u32).map(move |i| (i * 37 + salt) % 96);
        let mut rows = Vec::new();
        let mut step = |cache: &mut PltCache, id: u32| {
            rows.push(model.decode(cache, id).unwrap().to_vec1::<f32>().unwrap());
        };
        let mut cache = model.new_cache(loops).unwrap();
        ids(9, 1).for_each(|id| step(&mut cache, id));
        let mut cache = model.new_cache(loops).unwrap();
        let prompt: Vec<u32> = ids(6, 5).collect();
        model.prefill(&mut cache, &prompt, Logits::None).unwrap();
        ids(7, 11).for_each(|id| step(&mut cache, id));
        model.set_loops(&mut cache, loops + 1).unwrap();
        ids(5, 13).for_each(|id| step(&mut cache, id));
        rows
    }

    #[test]
    fn the_cpu_decode_step_matches_the_candle_path() {
        for (hidden_gate, normalize, quantized, interleaved) in [
            (true, true, true, true),
            (false, false, true, false),
            (true, false, false, false),
            (false, true, false, true),
        ] {
            let mut model = random_model(hidden_gate, normalize, quantized, interleaved);
            assert!(
                model.cpu.is_some(),
                "the CPU f32 model takes the fused path"
            );
            for loops in 1..=3 {
                let fused = decode_run(&model, loops);
                let cpu = model.cpu.take();
                let reference = decode_run(&model, loops);
                model.cpu = cpu;
                for (i, (a, b)) in fused.iter().zip(&reference).enumerate() {
                    let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
                    let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
                    assert!(
                        diff < 1e-4 * scale,
                        "gate {hidden_gate} norm {normalize} quantized {quantized} \
                         interleaved {interleaved} loops {loops} step {i}: {diff} (scale {scale})"
                    );
                }
            }
        }
    }
}

//! The decode step on the CPU in f32 (the KV cache in f32 or f16): each layer runs on plain
//! buffers with plait's kernels instead of as several hundred candle operations per token,
//! each of which allocates and dispatches. It does the arithmetic of the candle path in
//! `plt.rs`, which stays the reference and runs everywhere else (other devices, other
//! dtypes, prefill); the tests below check the two against each other.

use std::sync::Arc;

use crate::model::kernels::{
    attention_scores, parallel_pieces, pool_threads, weighted_sums, Isa, KvElem,
};

use candle_core::{CpuStorage, DType, Device, InplaceOp1, Layout, Storage, Tensor};
use half::f16;

use super::{Matrix, PltGate, PltModel};
use crate::model::cache::PltCache;
use crate::model::error::{ModelError, Result};

/// The model's vectors in f32, read once at load, and the kernel width the step runs at.
pub(super) struct CpuWeights {
    layers: Vec<CpuLayer>,
    norm: Vec<f32>,
    pub(super) isa: Isa,
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
    /// Reads the norms and gates of a model loaded on the CPU in f32, to run at `isa`.
    pub(super) fn new(model: &PltModel, isa: Isa) -> Result<Self> {
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
            isa,
        })
    }
}

/// One decode step for several sequences at once: each cache's position `cache.len()`
/// (room reserved) for its token `ids[i]`, all loops of all sequences as one batch of rows
/// through every matrix (the weights are read once for all of them), attention per
/// sequence over its own cache. Writes each cache's K/V and carries and returns each
/// sequence's last-loop logits `[vocab]`, in order.
pub(super) fn decode_batch(
    model: &PltModel,
    weights: &CpuWeights,
    caches: &mut [&mut PltCache],
    ids: &[u32],
) -> Result<Vec<Tensor>> {
    let c = &model.config;
    let (d, heads, kv_heads, hd) = (
        c.hidden_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
    );
    let w1 = c.plt_window + 1;
    let eps = c.rms_norm_eps as f32;
    let (qw, kw) = (heads * hd, kv_heads * hd);
    // As candle's affine: the f64 factor rounded to f32.
    let scale = (1.0 / (hd as f64).sqrt()) as f32;
    let shape = AttentionShape {
        heads,
        kv_heads,
        hd,
        scale,
        isa: weights.isa,
    };

    // Sequence i's rows are `first[i]..first[i] + loops_i` of the batch.
    let mut first = Vec::with_capacity(caches.len());
    let mut h = Vec::new();
    let mut angles = Vec::with_capacity(caches.len());
    let mut ring_valid = Vec::with_capacity(caches.len());
    for (cache, &id) in caches.iter().zip(ids) {
        first.push(h.len() / d);
        let emb = to_f32(&model.embed_ids(&[id])?)?;
        h.extend_from_slice(&emb);
        if let Some(carries) = &cache.carries {
            let (hs, es) = (c.plt_hidden_scale as f32, c.plt_emb_scale as f32);
            for carry in to_f32(carries)?.chunks_exact(d) {
                h.extend(carry.iter().zip(&emb).map(|(&s, &e)| s * hs + e * es));
            }
        }
        let pos = cache.len();
        angles.push(model.rope_angles(pos));
        ring_valid.push(
            (0..w1)
                .map(|s| cache.ring_slot_position(s, pos).is_some())
                .collect::<Vec<bool>>(),
        );
    }
    let rows = h.len() / d;

    for (li, (layer, lw)) in model.layers.iter().zip(&weights.layers).enumerate() {
        let x = rms_norm_rows(&h, &lw.input_norm, eps);
        let qkv = project(&[&layer.q_proj, &layer.k_proj, &layer.v_proj], &x, rows)?;
        let (mut q, mut k, mut v) = (
            Vec::with_capacity(rows * qw),
            Vec::with_capacity(rows * kw),
            Vec::with_capacity(rows * kw),
        );
        for row in qkv.chunks_exact(qw + 2 * kw) {
            q.extend_from_slice(&row[..qw]);
            k.extend_from_slice(&row[qw..qw + kw]);
            v.extend_from_slice(&row[qw + kw..]);
        }
        let mut attn = Vec::with_capacity(rows * qw);
        for (i, cache) in caches.iter().enumerate() {
            let (loops, pos, cap) = (cache.loops, cache.len(), cache.capacity);
            let span = first[i]..first[i] + loops;
            let (q, k, v) = (
                &mut q[span.start * qw..span.end * qw],
                &mut k[span.start * kw..span.end * kw],
                &v[span.start * kw..span.end * kw],
            );
            let (cos, sin) = &angles[i];
            model.rope_heads(q, cos, sin);
            model.rope_heads(k, cos, sin);
            // Loop 0 writes position `pos` first: every row's global attention reads it.
            // Rows 1.. go to their rings `[loops-1, kv_heads, w1, hd]`, i.e.
            // (loops-1)*kv_heads heads of w1 slots.
            write_heads(&cache.k0[li], &k[..kw], cap, pos, hd)?;
            write_heads(&cache.v0[li], &v[..kw], cap, pos, hd)?;
            if loops > 1 {
                write_heads(&cache.ring_k[li], &k[kw..], w1, pos % w1, hd)?;
                write_heads(&cache.ring_v[li], &v[kw..], w1, pos % w1, hd)?;
            }
            let gates = match loops {
                1 => Vec::new(),
                _ => {
                    let upper = &h[(span.start + 1) * d..span.end * d];
                    gate(layer, lw, upper, &q[qw..], loops - 1, hd, eps)?
                }
            };
            let valid = &ring_valid[i];
            attn.extend(match cache.shape.kv_dtype {
                DType::F16 => attention::<f16>(cache, li, q, &gates, valid, shape)?,
                _ => attention::<f32>(cache, li, q, &gates, valid, shape)?,
            });
        }
        add_assign(&mut h, &project(&[&layer.o_proj], &attn, rows)?);
        let y = rms_norm_rows(&h, &lw.post_attention_norm, eps);
        let ffn = c.intermediate_size;
        let gate_up = project(&[&layer.gate_proj, &layer.up_proj], &y, rows)?;
        let act = silu_mul(&gate_up, ffn);
        add_assign(&mut h, &project(&[&layer.down_proj], &act, rows)?);
    }

    let normed = rms_norm_rows(&h, &weights.norm, eps);
    let out = if c.plt_normalize_per_loop {
        &normed
    } else {
        &h
    };
    let mut last_rows = Vec::with_capacity(caches.len() * d);
    for (cache, &start) in caches.iter_mut().zip(&first) {
        let loops = cache.loops;
        if loops > 1 {
            let carries = &out[start * d..(start + loops - 1) * d];
            cache.carries = Some(Tensor::from_slice(carries, (loops - 1, d), &Device::Cpu)?);
        }
        let last = start + loops - 1;
        last_rows.extend_from_slice(&normed[last * d..(last + 1) * d]);
    }
    let logits = model.lm_head.forward_f32(&last_rows, caches.len())?;
    logits
        .chunks_exact(c.vocab_size)
        .map(|row| Ok(Tensor::from_slice(row, c.vocab_size, &Device::Cpu)?))
        .collect()
}

/// Head counts and scale of a layer's attention, and the kernel width it runs at.
#[derive(Clone, Copy)]
pub(super) struct AttentionShape {
    pub(super) heads: usize,
    pub(super) kv_heads: usize,
    pub(super) hd: usize,
    pub(super) scale: f32,
    pub(super) isa: Isa,
}

/// Layer `li`'s attention for the rows of `q` (`[loops, heads * hd]`), position `pos` =
/// `cache.len()` already written: every row's global attention over loop 0's keys, rows
/// 1.. mixed per head with their local attention over their rings by `gates`.
fn attention<K: KvElem>(
    cache: &PltCache,
    li: usize,
    q: &[f32],
    gates: &[f32],
    ring_valid: &[bool],
    shape: AttentionShape,
) -> Result<Vec<f32>> {
    let AttentionShape {
        heads,
        kv_heads,
        hd,
        scale,
        isa,
    } = shape;
    let (loops, pos, cap) = (cache.loops, cache.len(), cache.capacity);
    let w1 = ring_valid.len();
    let (qw, group) = (heads * hd, heads / kv_heads);
    let mut attn = vec![0f32; loops * qw];
    let (k0, k0_layout) = cache.k0[li].storage_and_layout();
    let (v0, v0_layout) = cache.v0[li].storage_and_layout();
    let (k0, v0) = (cpu_kv::<K>(&k0, k0_layout)?, cpu_kv::<K>(&v0, v0_layout)?);
    // Global attention: per KV head, the queries of its heads in every row over
    // loop 0's keys 0..=pos, each key read once for all of them; the keys split
    // into `chunks` ranges so that every core works, merged after.
    let keys = pos + 1;
    let (nq, width) = (group * loops, group * hd);
    let chunks = key_chunks(keys, kv_heads);
    let piece = nq * (hd + 2);
    // `[kv_heads, loops, group * hd]`: each KV head's queries in one run, gathered
    // once for all of its key ranges.
    let mut by_kv_head = Vec::with_capacity(q.len());
    for g in 0..kv_heads {
        for row in q.chunks_exact(qw) {
            by_kv_head.extend_from_slice(&row[g * width..(g + 1) * width]);
        }
    }
    let mut partials = vec![0f32; kv_heads * chunks * piece];
    parallel_pieces(&mut partials, piece, |t, out| {
        let (g, c) = (t / chunks, t % chunks);
        let span = g * cap + c * keys / chunks..g * cap + (c + 1) * keys / chunks;
        let span = span.start * hd..span.end * hd;
        let queries = &by_kv_head[g * nq * hd..(g + 1) * nq * hd];
        attend_partial(queries, &k0[span.clone()], &v0[span], scale, None, isa, out);
    });
    for (g, pieces) in partials.chunks_exact(chunks * piece).enumerate() {
        let merged = merge_partials(pieces, chunks, nq, hd);
        for (row, m) in attn.chunks_exact_mut(qw).zip(merged.chunks_exact(width)) {
            row[g * width..(g + 1) * width].copy_from_slice(m);
        }
    }
    if loops > 1 {
        // Local attention of rows 1.. over their rings `[loops-1, kv_heads, w1, hd]`,
        // per (row, KV head), mixed in per head as `g * global + (1 - g) * local`.
        let (rk, rk_layout) = cache.ring_k[li].storage_and_layout();
        let (rv, rv_layout) = cache.ring_v[li].storage_and_layout();
        let (rk, rv) = (cpu_kv::<K>(&rk, rk_layout)?, cpu_kv::<K>(&rv, rv_layout)?);
        let piece = group * (hd + 2);
        let mut local = vec![0f32; (loops - 1) * kv_heads * piece];
        parallel_pieces(&mut local, piece, |t, out| {
            let (r, g) = (1 + t / kv_heads, t % kv_heads);
            let ring = t * w1 * hd..(t + 1) * w1 * hd;
            let start = r * qw + g * group * hd;
            let queries = &q[start..start + group * hd];
            let valid = Some(ring_valid);
            attend_partial(
                queries,
                &rk[ring.clone()],
                &rv[ring],
                scale,
                valid,
                isa,
                out,
            );
        });
        for (t, piece) in local.chunks_exact(piece).enumerate() {
            let (r, g) = (1 + t / kv_heads, t % kv_heads);
            let local = merge_partials(piece, 1, group, hd);
            for (hh, l) in local.chunks_exact(hd).enumerate() {
                let head = g * group + hh;
                let gh = gates[(r - 1) * heads + head];
                let o = &mut attn[r * qw + head * hd..r * qw + (head + 1) * hd];
                for (o, &l) in o.iter_mut().zip(l) {
                    *o = l + (*o - l) * gh;
                }
            }
        }
    }
    Ok(attn)
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
    if let Some(first) = ms.first().and_then(|m| m.fast()) {
        let mut end = first.cols.start;
        let joined = ms.iter().all(|m| match m.fast() {
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

/// How many key ranges each KV head's global attention is split into: enough tasks for
/// two per thread, each of at least [`MIN_CHUNK_KEYS`] keys.
fn key_chunks(keys: usize, kv_heads: usize) -> usize {
    (2 * pool_threads())
        .div_ceil(kv_heads)
        .min(keys / MIN_CHUNK_KEYS)
        .max(1)
}

/// Fewer keys than this per task cost more in merging than they save.
const MIN_CHUNK_KEYS: usize = 32;

/// Softmax attention of the queries `q` (`[nq, hd]`, hd = `out.len() / nq - 2`) over the
/// `[keys, hd]` rows of `k` and `v`, leaving out keys whose `valid` entry is false. Written
/// to `out` unnormalized, so that key ranges can be merged ([`merge_partials`]): `[nq, hd]`
/// sums of `exp(score - max) * v`, then the `nq` maxima, then the `nq` sums of the weights.
fn attend_partial<K: KvElem>(
    q: &[f32],
    k: &[K],
    v: &[K],
    scale: f32,
    valid: Option<&[bool]>,
    isa: Isa,
    out: &mut [f32],
) {
    // out = nq * (hd + 2) and q = nq * hd.
    let nq = (out.len() - q.len()) / 2;
    let hd = q.len() / nq;
    let n = k.len() / hd;
    let mut scores = vec![0f32; nq * n];
    attention_scores(q, k, hd, scale, &mut scores, isa);
    let (acc, stats) = out.split_at_mut(nq * hd);
    let (maxima, sums) = stats.split_at_mut(nq);
    for (i, p) in scores.chunks_exact_mut(n).enumerate() {
        let kept = |j: usize| valid.is_none_or(|m| m[j]);
        let max = (0..n)
            .filter(|&j| kept(j))
            .map(|j| p[j])
            .fold(f32::NEG_INFINITY, f32::max);
        p.iter_mut().for_each(|x| *x -= max);
        exp_in_place(p);
        if let Some(m) = valid {
            p.iter_mut()
                .zip(m)
                .filter(|(_, &ok)| !ok)
                .for_each(|(x, _)| *x = 0.0);
        }
        maxima[i] = max;
        sums[i] = p.iter().sum();
    }
    weighted_sums(&scores, v, hd, acc, isa);
}

/// The `nq` normalized attention outputs `[nq, hd]` of `chunks` pieces of
/// [`attend_partial`] over consecutive key ranges.
fn merge_partials(pieces: &[f32], chunks: usize, nq: usize, hd: usize) -> Vec<f32> {
    let piece = nq * (hd + 2);
    let mut out = vec![0f32; nq * hd];
    for (i, o) in out.chunks_exact_mut(hd).enumerate() {
        let stat = |c: usize, at: usize| pieces[c * piece + nq * hd + at * nq + i];
        let max = (0..chunks)
            .map(|c| stat(c, 0))
            .fold(f32::NEG_INFINITY, f32::max);
        let mut total = 0f32;
        for c in 0..chunks {
            let w = (stat(c, 0) - max).exp();
            total += w * stat(c, 1);
            let acc = &pieces[c * piece + i * hd..c * piece + (i + 1) * hd];
            for (o, &a) in o.iter_mut().zip(acc) {
                *o += w * a;
            }
        }
        for o in o.iter_mut() {
            *o /= total;
        }
    }
    out
}

/// `silu(g) * u` for each `[g | u]` row (`ffn` each) of `gate_up`.
fn silu_mul(gate_up: &[f32], ffn: usize) -> Vec<f32> {
    let mut act = Vec::with_capacity(gate_up.len() / 2);
    for row in gate_up.chunks_exact(2 * ffn) {
        let (g, u) = row.split_at(ffn);
        let start = act.len();
        act.extend(g.iter().map(|&g| -g));
        exp_in_place(&mut act[start..]);
        for ((a, &g), &u) in act[start..].iter_mut().zip(g).zip(u) {
            *a = g / (1.0 + *a) * u;
        }
    }
    act
}

/// `x = exp(x)` for each element, with a polynomial (Cephes' `expf`, relative error about
/// 2e-7) that the compiler vectorizes, unlike calls to libm. Inputs are clamped to
/// -87..=88, so exp(-inf) is 1.6e-38 rather than 0.
pub(super) fn exp_in_place(x: &mut [f32]) {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 in two parts, so `n * LN2_HI` is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding then subtracting 1.5 * 2^23 rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    for v in x.iter_mut() {
        let a = v.clamp(-87.0, 88.0);
        let n = (a * LOG2E + ROUND) - ROUND;
        let r = a - n * LN2_HI - n * LN2_LO;
        let p = 1.987_569_1e-4;
        let p = p * r + 1.398_2e-3;
        let p = p * r + 8.333_452e-3;
        let p = p * r + 4.166_579_6e-2;
        let p = p * r + 1.666_666_5e-1;
        let p = p * r + 0.5;
        let p = p * r * r + r + 1.0;
        // 2^n through the exponent bits; n lies in -126..=127 after the clamp.
        *v = p * f32::from_bits(((n as i32 + 127) as u32) << 23);
    }
}

/// The elements of a contiguous CPU tensor of element type `K`.
pub(super) fn cpu_kv<'a, K: KvElem>(storage: &'a Storage, layout: &Layout) -> Result<&'a [K]> {
    match (storage, layout.contiguous_offsets()) {
        (Storage::Cpu(cpu), Some((start, end))) => K::cpu_storage_as_slice(cpu)
            .map(|v| &v[start..end])
            .map_err(|_| not_cpu_kv()),
        _ => Err(not_cpu_kv()),
    }
}

fn not_cpu_kv() -> ModelError {
    candle_core::Error::Msg("CPU decode: cache tensor is not contiguous on the CPU".into()).into()
}

/// Writes the `hd`-wide heads of `src` to slot `at` of `t`, `[heads, slots, hd]`, rounded to
/// the tensor's element type.
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

impl WriteHeads<'_> {
    fn write<K: KvElem>(&self, storage: &mut CpuStorage, layout: &Layout) -> Option<()> {
        let (start, end) = layout.contiguous_offsets()?;
        let dst = &mut K::slice_mut(storage)?[start..end];
        for (i, head) in self.src.chunks_exact(self.hd).enumerate() {
            let at = (i * self.slots + self.at) * self.hd;
            for (d, &x) in dst[at..at + self.hd].iter_mut().zip(head) {
                *d = K::from_f32(x);
            }
        }
        Some(())
    }
}

impl InplaceOp1 for WriteHeads<'_> {
    fn name(&self) -> &'static str {
        "plait-write-heads"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let written = match storage {
            CpuStorage::F16(_) => self.write::<f16>(storage, layout),
            _ => self.write::<f32>(storage, layout),
        };
        written.ok_or_else(|| {
            candle_core::Error::Msg("CPU decode: cache tensor is not contiguous f32 or f16".into())
        })
    }
}

#[cfg(test)]
pub(super) mod tests {
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::DType;

    use super::*;
    use crate::model::config::PltConfig;
    use crate::model::device::Placement;
    use crate::model::kernels::tests::lcg;
    use crate::model::kernels::CpuKernels;
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

    pub(in crate::model::plt) fn random_model(
        hidden_gate: bool,
        normalize: bool,
        quantized: bool,
        interleaved: bool,
        kernels: CpuKernels,
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
        let placement = Placement::new(Device::Cpu, None).with_kernels(kernels);
        PltModel::from_source(config, &mut source, &placement, DType::F32, &mut |_| {}).unwrap()
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

    /// Softmax attention in f64, the plain way.
    pub(in crate::model::plt) fn naive_attention(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        hd: usize,
        valid: &[bool],
    ) -> Vec<f32> {
        let mut out = Vec::new();
        for qi in q.chunks_exact(hd) {
            let scores: Vec<f64> = k
                .chunks_exact(hd)
                .map(|kr| {
                    qi.iter()
                        .zip(kr)
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum::<f64>()
                })
                .map(|s| s * 0.25)
                .collect();
            let max = scores
                .iter()
                .zip(valid)
                .filter(|(_, &ok)| ok)
                .map(|(&s, _)| s);
            let max = max.fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = scores
                .iter()
                .zip(valid)
                .map(|(&s, &ok)| if ok { (s - max).exp() } else { 0.0 })
                .collect();
            let total: f64 = w.iter().sum();
            for c in 0..hd {
                let o = w
                    .iter()
                    .zip(v.chunks_exact(hd))
                    .map(|(&w, vr)| w * vr[c] as f64);
                out.push((o.sum::<f64>() / total) as f32);
            }
        }
        out
    }

    #[test]
    fn attention_split_over_key_ranges_equals_one_softmax() {
        // At every width this CPU runs: hd 16 and 80 take the 512-bit kernels at vnni512,
        // 24 the 256-bit ones, 12 the portable ones.
        for isa in Isa::supported() {
            for hd in [16, 80, 24, 12] {
                attention_split_over_key_ranges(hd, isa);
            }
        }
    }

    fn attention_split_over_key_ranges(hd: usize, isa: Isa) {
        let (nq, n) = (6, 101);
        let (q, k, v) = (lcg(1, nq * hd), lcg(2, n * hd), lcg(3, n * hd));
        let q: Vec<f32> = q.iter().map(|x| x * 4.0).collect();
        // Values exact in f16, so that an f16 cache must give the f32 cache's answer.
        let (k16, v16): (Vec<f16>, Vec<f16>) = (
            k.iter().map(|&x| f16::from_f32(x)).collect(),
            v.iter().map(|&x| f16::from_f32(x)).collect(),
        );
        let k: Vec<f32> = k16.iter().map(|x| x.to_f32()).collect();
        let v: Vec<f32> = v16.iter().map(|x| x.to_f32()).collect();
        let valid: Vec<bool> = (0..n).map(|j| j % 7 != 3).collect();
        for mask in [None, Some(&valid[..])] {
            let expected = naive_attention(&q, &k, &v, hd, mask.unwrap_or(&[true; 101]));
            for chunks in 1..=4 {
                for (dtype, got) in [
                    ("f32", split_attention(&q, &k, &v, hd, mask, chunks, isa)),
                    (
                        "f16",
                        split_attention(&q, &k16, &v16, hd, mask, chunks, isa),
                    ),
                ] {
                    let diff = got
                        .iter()
                        .zip(&expected)
                        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                    assert!(
                        diff < 1e-5,
                        "{isa:?} hd {hd} {dtype} chunks {chunks} mask {}: {diff}",
                        mask.is_some()
                    );
                }
            }
        }
    }

    /// [`attend_partial`] over `chunks` key ranges, merged.
    fn split_attention<K: KvElem>(
        q: &[f32],
        k: &[K],
        v: &[K],
        hd: usize,
        mask: Option<&[bool]>,
        chunks: usize,
        isa: Isa,
    ) -> Vec<f32> {
        let (nq, n) = (q.len() / hd, k.len() / hd);
        let piece = nq * (hd + 2);
        let mut pieces = vec![0f32; chunks * piece];
        for (c, out) in pieces.chunks_exact_mut(piece).enumerate() {
            let (a, b) = (c * n / chunks, (c + 1) * n / chunks);
            let keys = a * hd..b * hd;
            let m = mask.map(|m| &m[a..b]);
            attend_partial(q, &k[keys.clone()], &v[keys], 0.25, m, isa, out);
        }
        merge_partials(&pieces, chunks, nq, hd)
    }

    #[test]
    fn the_polynomial_exp_matches_libm() {
        let xs: Vec<f32> = (-1990..=2010).map(|i| i as f32 * 0.0437).collect();
        let mut ys = xs.clone();
        exp_in_place(&mut ys);
        for (&x, &y) in xs.iter().zip(&ys) {
            let rel = ((y as f64 - (x as f64).exp()) / (x as f64).exp()).abs();
            assert!(rel < 5e-7, "exp({x}) = {y}: relative error {rel}");
        }
        let mut edge = [f32::NEG_INFINITY, -1000.0, 0.0];
        exp_in_place(&mut edge);
        assert!(
            edge[0] < 1e-37 && edge[1] < 1e-37 && edge[2] == 1.0,
            "{edge:?}"
        );
    }

    /// Largest difference between two runs' logits, over the logits' scale; the step.
    pub(in crate::model::plt) fn worst_step(got: &[Vec<f32>], want: &[Vec<f32>]) -> (f32, usize) {
        assert_eq!(got.len(), want.len());
        let mut worst = (0f32, 0);
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
            let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            if diff / scale > worst.0 {
                worst = (diff / scale, i);
            }
        }
        worst
    }

    #[test]
    fn the_cpu_decode_step_matches_the_candle_path() {
        for (hidden_gate, normalize, quantized, interleaved) in [
            (true, true, true, true),
            (false, false, true, false),
            (true, false, false, false),
            (false, true, false, true),
        ] {
            let config = format!(
                "gate {hidden_gate} norm {normalize} quantized {quantized} interleaved {interleaved}"
            );
            let model =
                |kernels| random_model(hidden_gate, normalize, quantized, interleaved, kernels);
            // candle's operations and quantized products throughout.
            let candle = model(CpuKernels::Candle);
            assert!(candle.cpu.is_none(), "the candle path has no fused step");
            // Both cache dtypes: f16 for quantized weights, f32 for dense ones.
            let kv = if quantized { DType::F16 } else { DType::F32 };
            assert_eq!(candle.kv_dtype(), kv);
            let references: Vec<_> = (1..=3).map(|loops| decode_run(&candle, loops)).collect();
            // Every width this CPU runs, so a wide machine proves the narrow kernels too.
            for isa in Isa::supported() {
                let mut fused = model(CpuKernels::Plait(isa));
                assert_eq!(fused.cpu.as_ref().map(|w| w.isa), Some(isa));
                for (loops, candle_run) in (1..=3).zip(&references) {
                    let got = decode_run(&fused, loops);
                    let (diff, step) = worst_step(&got, candle_run);
                    if !quantized {
                        // f32 throughout: only the summation order differs.
                        assert!(
                            diff < 1e-4,
                            "{isa:?} {config} loops {loops} step {step}: {diff}"
                        );
                        continue;
                    }
                    // The activations are quantized to int8 per 32-block, and summing in
                    // another order (FMA, SIMD lanes: ~1e-6) can move a value across a
                    // rounding boundary; the other choice is as close, yet it changes what
                    // follows by a few percent. So the step is checked tightly against the
                    // candle operations on the same kernels (one product, bit for bit),
                    // and against candle's own quantized products only for its structure.
                    assert!(
                        diff < 0.2,
                        "{isa:?} {config} loops {loops} step {step}: {diff}"
                    );
                    let cpu = fused.cpu.take();
                    let reference = decode_run(&fused, loops);
                    fused.cpu = cpu;
                    let (diff, step) = worst_step(&got, &reference);
                    assert!(
                        diff < 1e-4,
                        "{isa:?} {config} loops {loops} step {step} vs the candle operations \
                         on the same kernels: {diff}"
                    );
                }
            }
        }
    }

    /// Logits of `steps` decode steps of sequences of several loop counts and depths, run
    /// either one by one or as batches: sequence 3 joins at step 2 and sequence 1 leaves
    /// after step 3; the tokens fed are fixed, so the two runs see the same inputs.
    fn interleaved_run(model: &PltModel, batched: bool) -> Vec<Vec<Vec<f32>>> {
        let ids = |n: usize, salt: u32| (0..n as u32).map(move |i| (i * 29 + salt) % 96);
        let plan = [(1, 0), (2, 5), (3, 9), (2, 3)];
        let mut caches: Vec<PltCache> = plan
            .iter()
            .enumerate()
            .map(|(i, &(loops, depth))| {
                let mut cache = model.new_cache(loops).unwrap();
                let prompt: Vec<u32> = ids(depth, i as u32).collect();
                model.prefill(&mut cache, &prompt, Logits::None).unwrap();
                cache
            })
            .collect();
        let mut out = vec![Vec::new(); plan.len()];
        for step in 0..6u32 {
            let active: Vec<usize> = (0..plan.len())
                .filter(|&i| !(i == 3 && step < 2 || i == 1 && step > 3))
                .collect();
            let tokens: Vec<u32> = active
                .iter()
                .map(|&i| (step * 13 + i as u32 * 7) % 96)
                .collect();
            let logits = if batched {
                let mut batch: Vec<&mut PltCache> = caches
                    .iter_mut()
                    .enumerate()
                    .filter(|(i, _)| active.contains(i))
                    .map(|(_, c)| c)
                    .collect();
                model.decode_batch(&mut batch, &tokens).unwrap()
            } else {
                active
                    .iter()
                    .zip(&tokens)
                    .map(|(&i, &id)| model.decode(&mut caches[i], id).unwrap())
                    .collect()
            };
            for (&i, l) in active.iter().zip(logits) {
                out[i].push(l.to_vec1::<f32>().unwrap());
            }
        }
        out
    }

    #[test]
    fn a_batched_decode_step_gives_each_sequence_its_solo_logits() {
        let argmax = |l: &[f32]| {
            (0..l.len())
                .max_by(|&a, &b| l[a].total_cmp(&l[b]))
                .unwrap_or(0)
        };
        let kernels = Isa::supported()
            .map(CpuKernels::Plait)
            .chain([CpuKernels::Candle]);
        for kernels in kernels {
            for (hidden_gate, quantized) in [(true, false), (false, true)] {
                let model = random_model(hidden_gate, true, quantized, false, kernels);
                let solo = interleaved_run(&model, false);
                let batched = interleaved_run(&model, true);
                for (seq, (solo, batched)) in solo.iter().zip(&batched).enumerate() {
                    assert_eq!(solo.len(), batched.len());
                    let (diff, step) = worst_step(batched, solo);
                    let what =
                        format!("{kernels:?} quantized {quantized} sequence {seq} step {step}");
                    assert!(diff < 1e-4, "{what}: {diff}");
                    for (b, s) in batched.iter().zip(solo) {
                        assert_eq!(argmax(b), argmax(s), "{what}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_decode_batch_needs_one_token_per_cache() {
        let model = random_model(true, true, false, false, CpuKernels::Plait(Isa::Scalar));
        let mut cache = model.new_cache(2).unwrap();
        let err = model.decode_batch(&mut [&mut cache], &[1, 2]).unwrap_err();
        assert!(
            err.to_string().contains("1 caches was given 2 tokens"),
            "{err}"
        );
        assert!(cache.is_empty());
    }
}

//! Attention of a prefill chunk on the CPU, fused: the keys the chunk reads are converted
//! once from the cache (f16 or f32) into f32, keys transposed into the score kernel's
//! lanes, and read a tile at a time by blocks of the chunk's rows with an online softmax,
//! so no `[rows, keys]` score matrix or mask is made and no masked-out key is scored (a
//! causal chunk costs half of a dense one). It computes what `attend` with a causal or
//! window mask computes in `plt.rs`; the tests below check the two against each other.

use std::ops::Range;

use candle_core::{DType, Tensor};
use half::f16;

use super::fused::{cpu_kv, exp_in_place, AttentionShape};
use crate::model::error::Result;
use crate::model::kernels::{
    add_weighted_sums, parallel_pieces, transposed_scores, KvElem, KEY_LANES,
};

/// Rows of a chunk whose queries go through the keys together: their keys are read once
/// for all of them.
const ROW_BLOCK: usize = 16;

/// Keys scored at a time (a multiple of [`KEY_LANES`]): the block's scores stay in L1.
const KEY_TILE: usize = 128;

/// Attention of each row `r` of `q` (`[rows, heads * hd]`) over the keys `ranges[r]` of its
/// heads' KV head in `k` and `v` (`[kv_heads, slots, hd]`); returns `[rows, heads * hd]`.
/// Every range must be non-empty.
pub(super) fn ranged_attention<K: KvElem>(
    q: &[f32],
    k: &[K],
    v: &[K],
    slots: usize,
    ranges: &[Range<usize>],
    shape: AttentionShape,
) -> Vec<f32> {
    let AttentionShape {
        heads,
        kv_heads,
        hd,
        scale,
        ..
    } = shape;
    let (rows, qw, group) = (ranges.len(), heads * hd, heads / kv_heads);
    // The keys any row reads, from a multiple of KEY_LANES, as f32: per KV head its keys
    // transposed (`[hd, span]`, keys in the lanes of the score kernel) and its values
    // (`[span, hd]`), zero past the last key. Made once for all the chunk's rows.
    let base = ranges.iter().map(|r| r.start).min().unwrap_or(0) / KEY_LANES * KEY_LANES;
    let end = ranges.iter().map(|r| r.end).max().unwrap_or(0);
    let span = (end - base).next_multiple_of(KEY_LANES);
    let head_floats = 2 * hd * span;
    let mut keys = vec![0f32; kv_heads * head_floats];
    parallel_pieces(&mut keys, head_floats, |g, out| {
        let (kt, vs) = out.split_at_mut(hd * span);
        let used = (g * slots + base) * hd..(g * slots + end) * hd;
        let mut buf = Vec::new();
        for (j, key) in K::as_f32(&k[used.clone()], &mut buf)
            .chunks_exact(hd)
            .enumerate()
        {
            for (c, &x) in key.iter().enumerate() {
                kt[c * span + j] = x;
            }
        }
        vs[..used.len()].copy_from_slice(K::as_f32(&v[used], &mut buf));
    });
    let blocks = rows.div_ceil(ROW_BLOCK);
    let piece = ROW_BLOCK * group * hd;
    // Task t is (KV head, row block); the blocks of each head alternate light and heavy
    // (0, last, 1, last-1, ...), so that the even runs of tasks each thread takes cost
    // about the same under a causal mask.
    let order: Vec<usize> = (0..blocks)
        .map(|i| match i % 2 {
            0 => i / 2,
            _ => blocks - 1 - i / 2,
        })
        .collect();
    // Task t's KV head and chunk rows.
    let task = |t: usize| {
        let block = order[t % blocks];
        (
            t / blocks,
            block * ROW_BLOCK..((block + 1) * ROW_BLOCK).min(rows),
        )
    };
    let mut pieces = vec![0f32; kv_heads * blocks * piece];
    parallel_pieces(&mut pieces, piece, |t, out| {
        let (g, block_rows) = task(t);
        let mut queries = Vec::with_capacity(piece);
        for r in block_rows.clone() {
            let at = r * qw + g * group * hd;
            queries.extend(q[at..at + group * hd].iter().map(|x| x * scale));
        }
        let (kt, vs) = keys[g * head_floats..(g + 1) * head_floats].split_at(hd * span);
        let ranges: Vec<_> = ranges[block_rows]
            .iter()
            .map(|r| r.start - base..r.end - base)
            .collect();
        let head = HeadKeys { kt, vs, span };
        block_attention(&queries, group, head, &ranges, shape, out);
    });
    let mut attn = vec![0f32; rows * qw];
    for (t, out) in pieces.chunks_exact(piece).enumerate() {
        let (g, block_rows) = task(t);
        for (r, o) in block_rows.zip(out.chunks_exact(group * hd)) {
            let at = r * qw + g * group * hd;
            attn[at..at + group * hd].copy_from_slice(o);
        }
    }
    attn
}

/// One KV head's keys as [`ranged_attention`] lays them out.
#[derive(Clone, Copy)]
struct HeadKeys<'a> {
    /// `[hd, span]`: key j's element c at `c * span + j`.
    kt: &'a [f32],
    /// `[span, hd]`.
    vs: &'a [f32],
    span: usize,
}

/// The attention of `queries` (`[rows, group, hd]`, scaled: `group` heads per row) over the
/// keys `ranges[row]` of one KV head, tile by tile with a running maximum and sum per
/// query; writes `[rows, group, hd]` to the front of `out`.
fn block_attention(
    queries: &[f32],
    group: usize,
    head: HeadKeys<'_>,
    ranges: &[Range<usize>],
    shape: AttentionShape,
    out: &mut [f32],
) {
    let AttentionShape { hd, isa, .. } = shape;
    let nq = queries.len() / hd;
    let first = ranges.iter().map(|r| r.start).min().unwrap_or(0) / KEY_LANES * KEY_LANES;
    let end = ranges.iter().map(|r| r.end).max().unwrap_or(0);
    let end = end.next_multiple_of(KEY_LANES).min(head.span);
    let mut maxima = vec![f32::NEG_INFINITY; nq];
    let mut sums = vec![0f32; nq];
    let mut acc = vec![0f32; nq * hd];
    let mut scores = vec![0f32; nq * KEY_TILE];
    for a in (first..end).step_by(KEY_TILE) {
        let b = (a + KEY_TILE).min(end);
        let n = b - a;
        let scores = &mut scores[..nq * n];
        transposed_scores(queries, hd, &head.kt[a..], head.span, n, scores, isa);
        for (i, p) in scores.chunks_exact_mut(n).enumerate() {
            let range = &ranges[i / group];
            let (lo, hi) = (range.start.clamp(a, b) - a, range.end.clamp(a, b) - a);
            if lo >= hi {
                p.fill(0.0);
                continue;
            }
            let tile_max = p[lo..hi].iter().copied().fold(f32::NEG_INFINITY, f32::max);
            if tile_max > maxima[i] {
                // The keys so far, weighed against the new maximum.
                let rescale = (maxima[i] - tile_max).exp();
                sums[i] *= rescale;
                acc[i * hd..(i + 1) * hd]
                    .iter_mut()
                    .for_each(|x| *x *= rescale);
                maxima[i] = tile_max;
            }
            let kept = &mut p[lo..hi];
            kept.iter_mut().for_each(|x| *x -= maxima[i]);
            exp_in_place(kept);
            sums[i] += kept.iter().sum::<f32>();
            p[..lo].fill(0.0);
            p[hi..].fill(0.0);
        }
        add_weighted_sums(scores, &head.vs[a * hd..b * hd], hd, &mut acc, isa);
    }
    for ((o, a), &s) in out
        .chunks_exact_mut(hd)
        .zip(acc.chunks_exact(hd))
        .zip(&sums)
    {
        for (o, &a) in o.iter_mut().zip(a) {
            *o = a / s;
        }
    }
}

/// [`ranged_attention`] of `q` (`[rows, heads, hd]`) over CPU tensors `k` and `v`
/// (`[kv_heads, slots, hd]`, f16 or f32, contiguous); returns `[rows, heads * hd]`.
pub(super) fn tensor_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    ranges: &[Range<usize>],
    shape: AttentionShape,
) -> Result<Tensor> {
    let queries: Vec<f32> = q.flatten_all()?.to_vec1()?;
    let slots = k.dim(1)?;
    let (ks, k_layout) = k.storage_and_layout();
    let (vs, v_layout) = v.storage_and_layout();
    let out = match k.dtype() {
        DType::F16 => {
            let (k, v) = (cpu_kv::<f16>(&ks, k_layout)?, cpu_kv::<f16>(&vs, v_layout)?);
            ranged_attention(&queries, k, v, slots, ranges, shape)
        }
        _ => {
            let (k, v) = (cpu_kv::<f32>(&ks, k_layout)?, cpu_kv::<f32>(&vs, v_layout)?);
            ranged_attention(&queries, k, v, slots, ranges, shape)
        }
    };
    let width = shape.heads * shape.hd;
    Ok(Tensor::from_vec(out, (ranges.len(), width), q.device())?)
}

#[cfg(test)]
mod tests {
    use half::f16;

    use super::super::fused::tests::{naive_attention, random_model, worst_step};
    use super::super::PltModel;
    use super::*;
    use crate::model::kernels::tests::lcg;
    use crate::model::kernels::{CpuKernels, Isa};
    use crate::model::Logits;

    /// Every position's logits over prefills of chunk sizes that meet each edge: one row, a
    /// window (3) + 1, a prompt longer than a prefill chunk (512), a few after it; then the
    /// loop count raised (rings rebuilt, valid from a later position) and more chunks.
    fn prefill_run(model: &PltModel, loops: usize) -> Vec<Vec<f32>> {
        let mut rows = Vec::new();
        let mut cache = model.new_cache(loops).unwrap();
        let mut next = 0u32;
        let mut prefill = |cache: &mut _, n: usize| {
            let ids: Vec<u32> = (0..n as u32).map(|i| (next + i) * 37 % 96).collect();
            next += n as u32;
            let logits = model.prefill(cache, &ids, Logits::All).unwrap().unwrap();
            rows.extend(logits.to_vec2::<f32>().unwrap());
        };
        for n in [1, 4, 2, 530, 1, 9] {
            prefill(&mut cache, n);
        }
        model.set_loops(&mut cache, loops + 1).unwrap();
        for n in [3, 1, 6] {
            prefill(&mut cache, n);
        }
        rows
    }

    /// Dense weights, so both paths compute in f32 and only the summation order differs: with
    /// int8 activations a value can cross a rounding boundary on either path, which moves
    /// what follows by a few percent (the decode step's test says more). The f16 cache is
    /// checked exactly below, and on the default model by the perplexity test.
    #[test]
    fn the_fused_prefill_attention_matches_the_candle_path() {
        for (hidden_gate, normalize, interleaved) in [(true, true, true), (false, false, false)] {
            for isa in Isa::supported() {
                let kernels = CpuKernels::Plait(isa);
                let mut model = random_model(hidden_gate, normalize, false, interleaved, kernels);
                for loops in 1..=3 {
                    let fused = prefill_run(&model, loops);
                    let cpu = model.cpu.take();
                    let reference = prefill_run(&model, loops);
                    model.cpu = cpu;
                    let (diff, step) = worst_step(&fused, &reference);
                    assert!(
                        diff < 1e-4,
                        "{isa:?} gate {hidden_gate} loops {loops} position {step}: {diff}"
                    );
                }
            }
        }
    }

    #[test]
    fn ranged_attention_equals_one_softmax_over_each_rows_keys() {
        // hd 16 and 80 take the 512-bit kernels at vnni512, 24 the 256-bit ones, 12 the
        // portable ones; 37 rows are more than two row blocks, 300 keys two key tiles.
        let (heads, kv_heads, rows, slots) = (6, 2, 37, 300);
        let causal: Vec<_> = (0..rows).map(|r| 0..250 + r + 1).collect();
        let windows: Vec<_> = (0..rows).map(|r| (r + 3).min(r * 2)..r + 9).collect();
        for isa in Isa::supported() {
            for hd in [16, 80, 24, 12] {
                let q: Vec<f32> = lcg(1, rows * heads * hd).iter().map(|x| x * 4.0).collect();
                // Values exact in f16, so that an f16 cache must give the f32 cache's answer.
                let exact = |seed| -> Vec<f16> {
                    let xs = lcg(seed, kv_heads * slots * hd);
                    xs.iter().map(|&x| f16::from_f32(x)).collect()
                };
                let (k16, v16) = (exact(2), exact(3));
                let k: Vec<f32> = k16.iter().map(|x| x.to_f32()).collect();
                let v: Vec<f32> = v16.iter().map(|x| x.to_f32()).collect();
                let shape = AttentionShape {
                    heads,
                    kv_heads,
                    hd,
                    scale: 0.25,
                    isa,
                };
                for ranges in [&causal, &windows] {
                    let mut expected = Vec::new();
                    for (r, range) in ranges.iter().enumerate() {
                        for h in 0..heads {
                            let qh = &q[(r * heads + h) * hd..(r * heads + h + 1) * hd];
                            let g = h / (heads / kv_heads);
                            let keys = (g * slots + range.start) * hd..(g * slots + range.end) * hd;
                            let valid = vec![true; range.len()];
                            expected.extend(naive_attention(
                                qh,
                                &k[keys.clone()],
                                &v[keys],
                                hd,
                                &valid,
                            ));
                        }
                    }
                    for (dtype, got) in [
                        ("f32", ranged_attention(&q, &k, &v, slots, ranges, shape)),
                        (
                            "f16",
                            ranged_attention(&q, &k16, &v16, slots, ranges, shape),
                        ),
                    ] {
                        let diff = got
                            .iter()
                            .zip(&expected)
                            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                        assert!(diff < 1e-5, "{isa:?} hd {hd} {dtype}: {diff}");
                    }
                }
            }
        }
    }
}

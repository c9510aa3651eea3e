//! Hand-written CPU kernels for the decode hot path.
//!
//! [`QuantMatrix`] multiplies GGUF Q4_1 or Q8_0 weights by a handful of f32 activation rows
//! (one per PLT loop during decode). candle's own dot products walk the weights once per
//! row; here every weight block is read and unpacked once and then dotted with all rows, so
//! `rows = 2` costs much less than twice `rows = 1`. Columns are split over candle's
//! persistent barrier pool ([`parallel_pieces`]), so even a one-row product of a small
//! matrix uses every thread.
//!
//! Numerics follow ggml/candle exactly: each activation row is quantized per 32-block to
//! Q8_1 (`d = amax / 127` rounded to f16, `q = round(x / d)`, `s = d * sum(q)` in f16). A
//! Q4_1 block contributes `d4 * d8 * sum(q4 * q8) + m4 * s8`, a Q8_0 block
//! `d * d8 * sum(q * q8)` (Q8_0 activations are Q8_1's without `s`). Results therefore
//! match `QMatMul::forward` up to f32 summation order.

use std::ops::Range;
use std::sync::{Mutex, PoisonError};

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, WithDType};
use half::{f16, slice::HalfFloatSliceExt};

use super::error::ModelError;

/// Elements per block (Q4_1, Q8_0 and the Q8_1 activations alike).
const QK: usize = 32;
/// Activation rows handled per pass over the weights (accumulators kept in registers).
const MAX_ROWS: usize = 8;
/// Below this much work (weights times activation rows, at most [`MAX_ROWS`]) a product runs
/// on the calling thread: waking the pool costs more than it saves.
/// Weight bytes of the tiles that every row group runs over in turn: they stay in L2.
const L2_WEIGHT_BYTES: usize = 256 << 10;

const PARALLEL_MIN_WORK: usize = 1 << 16;
/// The block formats the kernels read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    /// `d: f16, m: f16, qs: [u8; 16]` (two 4-bit weights a byte).
    Q4_1,
    /// `d: f16, qs: [i8; 32]`.
    Q8_0,
}

impl Format {
    /// The format `dtype` is read as: Q4_K's sub-blocks enter as Q4_1 blocks.
    fn of(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q4_1 | GgmlDType::Q4K => Some(Self::Q4_1),
            GgmlDType::Q8_0 => Some(Self::Q8_0),
            _ => None,
        }
    }

    /// Bytes per GGUF block.
    fn block_bytes(self) -> usize {
        match self {
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
        }
    }

    /// Bytes of weights per block (the rest are f16 scales in front).
    fn weight_bytes(self) -> usize {
        match self {
            Self::Q4_1 => 16,
            Self::Q8_0 => 32,
        }
    }
}

/// Bytes of a Q4_K super-block: `d: f16, dmin: f16, scales: [u8; 12], qs: [u8; 128]`.
const Q4_K_BLOCK_BYTES: usize = 144;

/// Q4_K super-blocks (256 weights) as Q4_1 blocks (32): sub-block j has scale `d * sc_j`
/// and minimum `-dmin * m_j`, rounded to f16 (at most 2^-11 relative, far below the 4-bit
/// steps), and its 4-bit values in Q4_1's order. `None` for a partial super-block.
fn q4_k_as_q4_1(bytes: &[u8]) -> Option<Vec<u8>> {
    if !bytes.len().is_multiple_of(Q4_K_BLOCK_BYTES) {
        return None;
    }
    let sub_blocks = bytes.len() / Q4_K_BLOCK_BYTES * 8;
    let mut out = Vec::with_capacity(sub_blocks * Format::Q4_1.block_bytes());
    for sb in bytes.chunks_exact(Q4_K_BLOCK_BYTES) {
        let d = f16::from_le_bytes([sb[0], sb[1]]).to_f32();
        let dmin = f16::from_le_bytes([sb[2], sb[3]]).to_f32();
        let (scales, qs) = (&sb[4..16], &sb[16..]);
        for j in 0..8 {
            // ggml's `get_scale_min_k4`: 6-bit scale and minimum of sub-block j.
            let (sc, m) = if j < 4 {
                (scales[j] & 63, scales[j + 4] & 63)
            } else {
                (
                    (scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4),
                    (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
                )
            };
            out.extend_from_slice(&f16::from_f32(d * f32::from(sc)).to_le_bytes());
            out.extend_from_slice(&f16::from_f32(-dmin * f32::from(m)).to_le_bytes());
            // Sub-blocks 2c and 2c+1 are the low and high nibbles of bytes 32c..32c+32;
            // Q4_1 keeps values i and i+16 in byte i.
            let chunk = &qs[32 * (j / 2)..32 * (j / 2 + 1)];
            let value = |i: usize| {
                if j % 2 == 0 {
                    chunk[i] & 0xF
                } else {
                    chunk[i] >> 4
                }
            };
            out.extend((0..16).map(|i| value(i) | (value(i + 16) << 4)));
        }
    }
    Some(out)
}

/// Output columns per tile of the repacked layout.
const TILE: usize = 8;

/// Quantized weights `[n, k]` (k a multiple of 32) repacked for multi-row products.
///
/// The GGUF blocks of [`TILE`] consecutive output columns are interleaved: per tile, per
/// block, the columns' scales `d` (then, for Q4_1, their minimums `m`) as f16, then the
/// weight bytes in groups of 4 (`4 * g ..` of each column in turn). One 32-byte load then
/// holds 4 weights of each of 8 columns, so a SIMD lane accumulates one column and every
/// lane does useful work, with no horizontal sums. Same bytes as GGUF, in another order.
pub(crate) struct QuantMatrix {
    format: Format,
    /// Columns, a multiple of [`TILE`] (each stacked part padded with zero columns).
    n: usize,
    k: usize,
    /// `n / TILE` tiles of `k / 32` interleaved blocks each.
    data: Vec<u8>,
    /// The kernel width products run at (this CPU has it: checked where it is chosen).
    isa: Isa,
}

/// A value counts as an outlier when it is above the block's largest |x| over this factor
/// and at most [`MAX_OUTLIERS`] of the block are (see [`Q8Rows`]).
const OUTLIER_RATIO: f32 = 4.0;
/// Most outliers taken out of one block.
const MAX_OUTLIERS: u32 = 2;
/// Only blocks whose amax² is at least this many times the row's mean amax² give their
/// outliers up: the int8 error a block adds to a product grows with amax², so the others
/// cost more to split than they lose.
const OUTLIER_SHARE: f32 = 4.0;

/// Up to [`MAX_ROWS`] activation rows quantized to Q8_1, stored block-major so the rows of
/// one block sit next to each other: `qs[(b * rows + r) * 32 ..]`, `d[b * rows + r]`, and
/// `s[b * MAX_ROWS + r]` (padded with zeros so a block's sums load as one vector).
///
/// A block's one or two values that are [`OUTLIER_RATIO`] times every other (the massive
/// activations of a few hidden dimensions, up to 150x the rest of their block in the
/// default model) are taken out of the block and kept in f32 in `outliers`, when the
/// block's scale matters to the row ([`OUTLIER_SHARE`]): with them in, the block's step
/// `amax / 127` would round the other values to a few levels, losing most of them, and that
/// loss, not the int8 step itself, is what sends a decode step's distribution far from the
/// f32 one at the rare positions that depend on those values. The kernels multiply the rest
/// as int8; [`QuantMatrix::add_outliers`] adds each outlier times its weights in f32.
struct Q8Rows {
    rows: usize,
    qs: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
    /// `sum(q)` of each block, `[b * rows + r]`, exact.
    sums: Vec<i32>,
    /// `(row, index in the row, value)` of the values left out of their blocks.
    outliers: Vec<(usize, usize, f32)>,
}

impl Q8Rows {
    /// Quantize `x` (`rows * k`, row-major) like ggml's `quantize_row_q8_1`, outliers apart.
    fn quantize(x: &[f32], rows: usize, k: usize, isa: Isa) -> Self {
        let kb = k / QK;
        let mut qs = vec![0i8; rows * k];
        let mut d = vec![0f32; rows * kb];
        let mut s = vec![0f32; MAX_ROWS * kb];
        let mut sums = vec![0i32; rows * kb];
        let mut outliers = Vec::new();
        #[cfg(target_arch = "x86_64")]
        let simd = isa != Isa::Scalar;
        #[cfg(not(target_arch = "x86_64"))]
        let _ = isa;
        let quantize = |xs: &[f32], out: &mut [i8]| {
            #[cfg(target_arch = "x86_64")]
            if simd {
                // SAFETY: `isa` is supported by this CPU (see `QuantMatrix::isa`), and
                // every width above Scalar has AVX2.
                return unsafe { avx2::quantize_block(xs, out) };
            }
            quantize_block(xs, out)
        };
        let mut blocks = Vec::with_capacity(kb);
        for r in 0..rows {
            // Every block as ggml quantizes it, then again without the outliers of those
            // whose scale matters to the row (the error a block adds grows with amax²).
            blocks.clear();
            for b in 0..kb {
                let xs = &x[r * k + b * QK..r * k + (b + 1) * QK];
                let out = &mut qs[(b * rows + r) * QK..(b * rows + r + 1) * QK];
                blocks.push(quantize(xs, out));
            }
            let mean_sq = blocks.iter().map(|(dd, ..)| dd * dd).sum::<f32>() / kb as f32;
            for (b, &(mut dd, mut sum, above)) in blocks.iter().enumerate() {
                let few = (1..=MAX_OUTLIERS).contains(&above.count_ones());
                if few && dd * dd >= OUTLIER_SHARE * mean_sq {
                    // The block again without its outliers.
                    let xs = &x[r * k + b * QK..r * k + (b + 1) * QK];
                    let mut rest = [0f32; QK];
                    rest.copy_from_slice(xs);
                    for (i, v) in rest.iter_mut().enumerate() {
                        if above & (1 << i) != 0 {
                            outliers.push((r, b * QK + i, *v));
                            *v = 0.0;
                        }
                    }
                    let out = &mut qs[(b * rows + r) * QK..(b * rows + r + 1) * QK];
                    (dd, sum, _) = quantize(&rest, out);
                }
                let dh = f16::from_f32(dd).to_f32();
                d[b * rows + r] = dh;
                sums[b * rows + r] = sum;
                // candle: `f16::from_f32(sum as f32) * d`, an f16 product.
                let sum_h = f16::from_f32(sum as f32).to_f32();
                s[b * MAX_ROWS + r] = f16::from_f32(sum_h * dh).to_f32();
            }
        }
        Self {
            rows,
            qs,
            d,
            s,
            sums,
            outliers,
        }
    }
}

/// One block of 32 activations quantized as ggml's `quantize_row_q8_1`: returns the scale
/// `amax / 127`, the sum of the quantized values, and the mask (bit i: value i) of the
/// values above `amax / OUTLIER_RATIO`, the outliers when there are at most
/// [`MAX_OUTLIERS`] (none for a block of zeros).
fn quantize_block(xs: &[f32], out: &mut [i8]) -> (f32, i32, u32) {
    let amax = xs.iter().fold(0f32, |a, &v| a.max(v.abs()));
    let dd = amax / 127.0;
    let id = if dd != 0.0 { 1.0 / dd } else { 0.0 };
    let mut sum = 0i32;
    for (q, &v) in out.iter_mut().zip(xs) {
        *q = (v * id).round() as i8;
        sum += *q as i32;
    }
    let above = xs
        .iter()
        .enumerate()
        .filter(|(_, v)| v.abs() > amax / OUTLIER_RATIO)
        .fold(0u32, |mask, (i, _)| mask | 1 << i);
    (dd, sum, above)
}

impl QuantMatrix {
    /// The matrices of `parts` stacked (their rows one after another, each padded to a
    /// multiple of [`TILE`]), from candle QTensors, with the columns each part occupies;
    /// None unless all are 2-D, of one supported format, with the same row length, a
    /// multiple of 32. Products run at `isa`, or the widest this CPU has if that is narrower.
    pub(crate) fn from_qtensors(parts: &[&QTensor], isa: Isa) -> Option<(Self, Vec<Range<usize>>)> {
        let format = Format::of(parts.first()?.dtype())?;
        let bb = format.block_bytes();
        let (mut n, mut k) = (0, None);
        let mut data = Vec::new();
        let mut ranges = Vec::with_capacity(parts.len());
        for t in parts {
            let (rows, cols) = t.shape().dims2().ok()?;
            if Format::of(t.dtype()) != Some(format)
                || cols % QK != 0
                || k.is_some_and(|k| k != cols)
            {
                return None;
            }
            let kb = cols / QK;
            let bytes = t.data().ok()?;
            let bytes = match t.dtype() {
                GgmlDType::Q4K => std::borrow::Cow::Owned(q4_k_as_q4_1(&bytes)?),
                _ => bytes,
            };
            if bytes.len() != rows * kb * bb {
                return None;
            }
            let zero = vec![0u8; bb];
            let scale_bytes = bb - format.weight_bytes();
            for tile in 0..rows.div_ceil(TILE) {
                for b in 0..kb {
                    let blocks: Vec<&[u8]> = (0..TILE)
                        .map(|c| match tile * TILE + c {
                            j if j < rows => &bytes[(j * kb + b) * bb..(j * kb + b + 1) * bb],
                            _ => &zero[..],
                        })
                        .collect();
                    // The scales, one f16 field at a time (d, then m for Q4_1).
                    for field in (0..scale_bytes).step_by(2) {
                        for blk in &blocks {
                            data.extend_from_slice(&blk[field..field + 2]);
                        }
                    }
                    for group in (scale_bytes..bb).step_by(4) {
                        for blk in &blocks {
                            data.extend_from_slice(&blk[group..group + 4]);
                        }
                    }
                }
            }
            ranges.push(n..n + rows);
            n += rows.next_multiple_of(TILE);
            k = Some(cols);
        }
        let matrix = Self {
            format,
            n,
            k: k?,
            data,
            isa: isa.min(Isa::widest()),
        };
        Some((matrix, ranges))
    }

    /// The row length (inputs per column).
    pub(crate) fn k(&self) -> usize {
        self.k
    }

    /// Bytes held per column.
    pub(crate) fn column_bytes(&self) -> usize {
        self.k / QK * self.format.block_bytes()
    }

    /// Columns `cols` as f32 rows `[cols.len(), k]`: `d * q + m` (Q4_1) or `d * q` (Q8_0)
    /// per weight, the values candle's dequantization gives for the same blocks.
    pub(crate) fn dequantize(&self, cols: Range<usize>) -> Vec<f32> {
        assert!(
            cols.end <= self.n,
            "QuantMatrix::dequantize: columns out of range"
        );
        let mut out = vec![0f32; cols.len() * self.k];
        parallel_pieces(&mut out, self.k, |i, row| {
            let (tile, c) = ((cols.start + i) / TILE, (cols.start + i) % TILE);
            for (b, values) in row.chunks_exact_mut(QK).enumerate() {
                let column = self.block_column(tile, b, c);
                for (t, v) in values.iter_mut().enumerate() {
                    *v = column.weight(t);
                }
            }
        });
        out
    }

    /// `y[r][j - cols.start] = sum_i x[r][i] * w[j][i]` for `j` in `cols`: `x` is
    /// `rows * k` f32 (row-major), returns `rows * cols.len()` f32 (row-major).
    pub(crate) fn matmul(&self, x: &[f32], rows: usize, cols: Range<usize>) -> Vec<f32> {
        self.matmul_with(x, rows, cols, self.isa, true)
    }

    /// [`Self::matmul`] with the kernel and whether to use the pool chosen by the caller.
    fn matmul_with(
        &self,
        x: &[f32],
        rows: usize,
        cols: Range<usize>,
        isa: Isa,
        parallel: bool,
    ) -> Vec<f32> {
        let k = self.k;
        assert_eq!(x.len(), rows * k, "QuantMatrix::matmul: x is not rows * k");
        assert!(
            cols.end <= self.n,
            "QuantMatrix::matmul: columns out of range"
        );
        let n = cols.len();
        // Whole tiles covering `cols`; `skip` columns of the first are not wanted.
        let first_tile = cols.start / TILE;
        let tiles = cols.end.div_ceil(TILE) - first_tile;
        let skip = cols.start - first_tile * TILE;
        // Every group of up to MAX_ROWS rows quantized first; then each thread takes a run
        // of tiles and, a block of tiles at a time (their weights held in L2), runs every
        // group over it: the weights come from memory once per product, not once per group.
        let groups: Vec<Q8Rows> = (0..rows)
            .step_by(MAX_ROWS)
            .map(|r0| {
                let g = (rows - r0).min(MAX_ROWS);
                Q8Rows::quantize(&x[r0 * k..(r0 + g) * k], g, k, isa)
            })
            .collect();
        let threads = match parallel && n * k * rows >= PARALLEL_MIN_WORK {
            true => pool_threads(),
            false => 1,
        };
        let per = tiles.div_ceil(threads);
        let tile_bytes = TILE * k / QK * self.format.block_bytes();
        let block = (L2_WEIGHT_BYTES / tile_bytes).max(1);
        // `[piece][row][per * TILE]`: each piece's outputs for every row.
        let mut pieces = vec![0f32; per * threads * TILE * rows];
        let run = |i: usize, piece: &mut [f32]| {
            let first = first_tile + i * per;
            let count = per.min((first_tile + tiles).saturating_sub(first));
            let mut out = Vec::new();
            for b0 in (0..count).step_by(block) {
                let nb = block.min(count - b0);
                let mut r0 = 0;
                for q8 in &groups {
                    out.resize(nb * TILE * q8.rows, 0.0);
                    self.tiles(q8, first + b0, &mut out, isa);
                    // `out` is `[tile][row][TILE]`.
                    for (t, tile) in out.chunks_exact(q8.rows * TILE).enumerate() {
                        for (r, src) in tile.chunks_exact(TILE).enumerate() {
                            let at = (r0 + r) * per * TILE + (b0 + t) * TILE;
                            piece[at..at + TILE].copy_from_slice(src);
                        }
                    }
                    r0 += q8.rows;
                }
            }
        };
        if threads > 1 {
            parallel_pieces(&mut pieces, per * TILE * rows, run);
        } else {
            run(0, &mut pieces);
        }
        // Column `skip + j` of the tiles is output column j.
        let mut y = vec![0f32; rows * n];
        for (i, piece) in pieces.chunks_exact(per * TILE * rows).enumerate() {
            let from = (i * per * TILE).max(skip);
            let to = ((i + 1) * per * TILE).min(skip + n);
            if from >= to {
                continue;
            }
            for (r, src) in piece.chunks_exact(per * TILE).enumerate() {
                let src = &src[from - i * per * TILE..to - i * per * TILE];
                y[r * n + from - skip..r * n + to - skip].copy_from_slice(src);
            }
        }
        y
    }

    /// Column `c` of tile `tile`'s interleaved block `b`.
    fn block_column(&self, tile: usize, b: usize, c: usize) -> BlockColumn<'_> {
        let (bb, kb) = (self.format.block_bytes(), self.k / QK);
        let start = (tile * kb + b) * TILE * bb;
        let blk = &self.data[start..start + TILE * bb];
        let f16_at = |i: usize| f16::from_le_bytes([blk[i], blk[i + 1]]).to_f32();
        let scale_bytes = bb - self.format.weight_bytes();
        BlockColumn {
            format: self.format,
            weights: &blk[TILE * scale_bytes..],
            c,
            d: f16_at(2 * c),
            m: match self.format {
                Format::Q4_1 => f16_at(2 * TILE + 2 * c),
                Format::Q8_0 => 0.0,
            },
        }
    }

    /// Adds each of `q8`'s outliers times its weights, in f32, to the outputs of tiles
    /// `t0 ..` (`out` as [`Self::tiles`] writes it); `avx2::add_outliers` is the same with
    /// SIMD.
    fn add_outliers(&self, q8: &Q8Rows, t0: usize, out: &mut [f32]) {
        for (t, tile) in out.chunks_exact_mut(TILE * q8.rows).enumerate() {
            for &(r, i, x) in &q8.outliers {
                let row = &mut tile[r * TILE..(r + 1) * TILE];
                for (c, y) in row.iter_mut().enumerate() {
                    *y += x * self.block_column(t0 + t, i / QK, c).weight(i % QK);
                }
            }
        }
    }

    /// Outputs for tiles `t0 ..` (as many as `out` holds), written `[tile][row][column]`:
    /// the int8 blocks by the kernel of `isa`, then the outliers in f32.
    fn tiles(&self, q8: &Q8Rows, t0: usize, out: &mut [f32], isa: Isa) {
        let kb = self.k / QK;
        let tile_bytes = TILE * kb * self.format.block_bytes();
        let count = out.len() / (TILE * q8.rows);
        let w = &self.data[t0 * tile_bytes..(t0 + count) * tile_bytes];
        #[cfg(target_arch = "x86_64")]
        if isa != Isa::Scalar {
            // SAFETY: `isa` is `Isa::widest()` or below it (`from_qtensors` and the tests
            // pass only those), so this CPU has its features; every width above Scalar has
            // AVX2, FMA and F16C.
            unsafe {
                avx2::tiles(isa, self.format, w, kb, q8, out);
                if !q8.outliers.is_empty() {
                    avx2::add_outliers(self.format, w, kb, q8, out);
                }
            }
            return;
        }
        tiles_scalar(self.format, w, kb, q8, out);
        self.add_outliers(q8, t0, out);
    }
}

/// One column's block of a tile: its scales and its 32 weights.
struct BlockColumn<'a> {
    format: Format,
    /// The tile block's interleaved weight bytes.
    weights: &'a [u8],
    c: usize,
    d: f32,
    /// Q4_1's minimum (0 for Q8_0).
    m: f32,
}

impl BlockColumn<'_> {
    /// Weight `t` (0..32) as candle dequantizes it: `d * q + m` or `d * q`.
    fn weight(&self, t: usize) -> f32 {
        match self.format {
            Format::Q4_1 => {
                let q = tile_byte(self.weights, self.c, t % 16);
                let q = if t < 16 { q & 0x0F } else { q >> 4 };
                f32::from(q) * self.d + self.m
            }
            Format::Q8_0 => f32::from(tile_byte(self.weights, self.c, t) as i8) * self.d,
        }
    }
}

/// Threads of candle's barrier pool: its workers and the calling thread.
pub(crate) fn pool_threads() -> usize {
    candle_core::utils::barrier_pool().n_workers() + 1
}

/// Runs `f(i, piece)` for each `len`-long piece of `out` (the last may be shorter) on
/// candle's barrier pool, whose workers spin between calls, so that even short work uses
/// every thread; each thread takes one contiguous run of pieces, so neighbouring pieces
/// that read the same data stay on one core.
pub(crate) fn parallel_pieces(out: &mut [f32], len: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let pieces: Vec<Mutex<&mut [f32]>> = out.chunks_mut(len.max(1)).map(Mutex::new).collect();
    let (n, threads) = (pieces.len(), pool_threads());
    candle_core::utils::barrier_pool().execute(|tid| {
        for (i, piece) in pieces
            .iter()
            .enumerate()
            .take((tid + 1) * n / threads)
            .skip(tid * n / threads)
        {
            f(i, &mut piece.lock().unwrap_or_else(PoisonError::into_inner));
        }
    });
}

/// Widths of plait's CPU kernels, narrowest first; each needs the features of those before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Portable Rust.
    Scalar,
    /// AVX2, FMA and F16C.
    Avx2,
    /// The AVX2 kernel with AVX512-VNNI's `vpdpbusd` for the integer dot products.
    Vnni,
    /// 512-bit `vpdpbusd` over two tiles (16 columns) at once, twice the integer work per
    /// instruction at the same rate; the 256-bit VNNI kernel for an odd last tile.
    Vnni512,
}

impl Isa {
    /// Every width, narrowest first.
    pub const ALL: [Self; 4] = [Self::Scalar, Self::Avx2, Self::Vnni, Self::Vnni512];

    /// The widest kernel this CPU runs (detected once).
    pub fn widest() -> Self {
        static WIDEST: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *WIDEST.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                let avx2 = is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c");
                let vnni =
                    is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl");
                let avx512 =
                    is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw");
                match (avx2, vnni, avx512) {
                    (true, true, true) => Isa::Vnni512,
                    (true, true, false) => Isa::Vnni,
                    (true, false, _) => Isa::Avx2,
                    _ => Isa::Scalar,
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                Isa::Scalar
            }
        })
    }

    /// The widths this CPU runs, narrowest first.
    pub fn supported() -> impl Iterator<Item = Self> {
        Self::ALL.into_iter().filter(|&isa| isa <= Self::widest())
    }

    /// The name `PLAIT_CPU_KERNELS` takes.
    pub fn name(self) -> &'static str {
        match self {
            Self::Scalar => "scalar",
            Self::Avx2 => "avx2",
            Self::Vnni => "vnni",
            Self::Vnni512 => "vnni512",
        }
    }

    /// The CPU features the width needs, as a user would look them up.
    fn features(self) -> &'static str {
        match self {
            Self::Scalar => "nothing",
            Self::Avx2 => "AVX2, FMA and F16C",
            Self::Vnni => "AVX2, FMA, F16C, AVX512-VNNI and AVX512VL",
            Self::Vnni512 => "AVX2, FMA, F16C, AVX512F, AVX512BW, AVX512-VNNI and AVX512VL",
        }
    }
}

/// What runs a CPU model's decode step: candle's operations, or plait's fused step with its
/// kernels at one width. `PLAIT_CPU_KERNELS` chooses (unset: plait's, the widest the CPU has).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuKernels {
    /// candle's operations and quantized products throughout: the reference the fused step
    /// is checked against.
    Candle,
    /// plait's fused decode step and multi-row kernels at this width, or narrower where a
    /// shape does not fit it.
    Plait(Isa),
}

impl CpuKernels {
    /// The environment variable that forces a path.
    pub const ENV: &'static str = "PLAIT_CPU_KERNELS";

    /// plait's kernels at the widest width this CPU has.
    pub fn widest() -> Self {
        Self::Plait(Isa::widest())
    }

    /// Every path: candle's, then plait's at each width, narrowest first.
    fn all() -> impl Iterator<Item = Self> {
        std::iter::once(Self::Candle).chain(Isa::ALL.map(Self::Plait))
    }

    /// Whether this CPU runs the path.
    fn is_supported(self) -> bool {
        match self {
            Self::Candle => true,
            Self::Plait(isa) => isa <= Isa::widest(),
        }
    }

    /// Every path this CPU runs: candle's, then plait's at each width, narrowest first.
    pub fn supported() -> Vec<Self> {
        Self::all().filter(|k| k.is_supported()).collect()
    }

    /// The path's name, as `PLAIT_CPU_KERNELS` takes it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Candle => "candle",
            Self::Plait(isa) => isa.name(),
        }
    }

    /// The path named `name`; an unknown name, or a width this CPU lacks, is an error that
    /// names the valid ones.
    pub fn parse(name: &str) -> Result<Self, ModelError> {
        let names = |paths: &[Self]| {
            paths
                .iter()
                .map(|p| p.name())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let all: Vec<Self> = Self::all().collect();
        let Some(&path) = all.iter().find(|p| p.name() == name) else {
            return Err(ModelError::CpuKernels {
                value: name.to_string(),
                reason: format!("unknown kernel path (valid: {})", names(&all)),
            });
        };
        match path {
            Self::Plait(isa) if !path.is_supported() => Err(ModelError::CpuKernels {
                value: name.to_string(),
                reason: format!(
                    "this CPU lacks the features it needs ({}); it runs: {}",
                    isa.features(),
                    names(&Self::supported())
                ),
            }),
            path => Ok(path),
        }
    }

    /// The path `PLAIT_CPU_KERNELS` names, or the widest when it is unset or empty.
    pub fn from_env() -> Result<Self, ModelError> {
        match std::env::var(Self::ENV) {
            Ok(name) if !name.trim().is_empty() => Self::parse(name.trim()),
            Ok(_) | Err(std::env::VarError::NotPresent) => Ok(Self::widest()),
            Err(std::env::VarError::NotUnicode(_)) => Err(ModelError::CpuKernels {
                value: "(not UTF-8)".into(),
                reason: "not a kernel path name".into(),
            }),
        }
    }
}

/// The widest f32 vector (16 or 8 lanes) of `isa` that divides `hd`; 0 for none.
#[cfg(target_arch = "x86_64")]
fn f32_lanes(isa: Isa, hd: usize) -> usize {
    match isa {
        Isa::Vnni512 if hd.is_multiple_of(16) => 16,
        Isa::Scalar => 0,
        _ if hd.is_multiple_of(8) => 8,
        _ => 0,
    }
}

/// An element type of the KV cache: f32, or f16 (half the memory and the bytes attention
/// reads per token, as llama.cpp's default cache). candle's [`WithDType`] reads its storage.
pub(crate) trait KvElem: WithDType {
    /// Whether [`KvElem::as_f32`] converts into its buffer (rather than borrowing `x`).
    const CONVERTS: bool;
    /// `x` as f32: itself, or converted into `buf` (with F16C where the CPU has it).
    fn as_f32<'a>(x: &'a [Self], buf: &'a mut Vec<f32>) -> &'a [f32];
    /// `x` rounded to this type.
    fn from_f32(x: f32) -> Self;
    /// The elements of CPU storage of this type, to write.
    fn slice_mut(storage: &mut CpuStorage) -> Option<&mut [Self]>;
    /// `x` as the bits of f16 values, when it is f16 (for the SIMD kernels' own conversion).
    fn f16_bits(x: &[Self]) -> Option<&[u16]>;
    /// `x` as f32 values, when it is f32.
    fn f32s(x: &[Self]) -> Option<&[f32]>;
}

impl KvElem for f32 {
    const CONVERTS: bool = false;
    fn as_f32<'a>(x: &'a [Self], _: &'a mut Vec<f32>) -> &'a [f32] {
        x
    }
    fn from_f32(x: f32) -> Self {
        x
    }
    fn slice_mut(storage: &mut CpuStorage) -> Option<&mut [Self]> {
        match storage {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
    fn f16_bits(_: &[Self]) -> Option<&[u16]> {
        None
    }
    fn f32s(x: &[Self]) -> Option<&[f32]> {
        Some(x)
    }
}

impl KvElem for f16 {
    const CONVERTS: bool = true;
    fn as_f32<'a>(x: &'a [Self], buf: &'a mut Vec<f32>) -> &'a [f32] {
        buf.resize(x.len(), 0.0);
        x.convert_to_f32_slice(buf);
        buf
    }
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    fn slice_mut(storage: &mut CpuStorage) -> Option<&mut [Self]> {
        match storage {
            CpuStorage::F16(v) => Some(v),
            _ => None,
        }
    }
    fn f16_bits(x: &[Self]) -> Option<&[u16]> {
        Some(x.reinterpret_cast())
    }
    fn f32s(_: &[Self]) -> Option<&[f32]> {
        None
    }
}

/// Attention scores `out[i * n + j] = scale * (q_i . k_j)` for the `hd`-long rows of `q`
/// (`nq` of them) and of `k` (`n`), with SIMD of `isa` or narrower.
pub(crate) fn attention_scores<K: KvElem>(
    q: &[f32],
    k: &[K],
    hd: usize,
    scale: f32,
    out: &mut [f32],
    isa: Isa,
) {
    let (nq, n) = (q.len() / hd, k.len() / hd);
    assert_eq!(out.len(), nq * n, "attention_scores: out is not nq * n");
    #[cfg(target_arch = "x86_64")]
    match f32_lanes(isa.min(Isa::widest()), hd) {
        // SAFETY: `f32_lanes` found AVX512F on this CPU.
        16 => return unsafe { avx2::attention_scores512(q, k, hd, scale, out) },
        // SAFETY: `f32_lanes` found AVX2 and FMA on this CPU.
        8 => return unsafe { avx2::attention_scores(q, k, hd, scale, out) },
        _ => {}
    }
    let mut buf = Vec::new();
    let k = K::as_f32(k, &mut buf);
    for (i, qi) in q.chunks_exact(hd).enumerate() {
        for (j, kj) in k.chunks_exact(hd).enumerate() {
            out[i * n + j] = dot(qi, kj) * scale;
        }
    }
}

/// `out_i = sum_j p[i * n + j] * v_j` for the `hd`-long rows of `v` (`n` of them) and of
/// `out` (`nq`), with SIMD of `isa` or narrower.
pub(crate) fn weighted_sums<K: KvElem>(p: &[f32], v: &[K], hd: usize, out: &mut [f32], isa: Isa) {
    let (nq, n) = (out.len() / hd, v.len() / hd);
    assert_eq!(p.len(), nq * n, "weighted_sums: p is not nq * n");
    #[cfg(target_arch = "x86_64")]
    match f32_lanes(isa.min(Isa::widest()), hd) {
        // SAFETY: `f32_lanes` found AVX512F on this CPU.
        16 => return unsafe { avx2::weighted_sums512(p, v, hd, out) },
        // SAFETY: `f32_lanes` found AVX2 and FMA on this CPU.
        8 => return unsafe { avx2::weighted_sums(p, v, hd, out) },
        _ => {}
    }
    let mut buf = Vec::new();
    out.fill(0.0);
    add_weighted_sums(p, K::as_f32(v, &mut buf), hd, out, Isa::Scalar);
}

/// Keys a [`transposed_scores`] tile is padded to a multiple of: two vectors of the widest
/// kernel.
pub(crate) const KEY_LANES: usize = 32;

/// Scores of many queries against a tile of keys laid out transposed, keys in the lanes:
/// `out[i * n + j] = sum_c q[i * hd + c] * kt[c * stride + j]` for the `hd`-long rows of `q`
/// and `j < n`, `n` a multiple of [`KEY_LANES`] (the queries already scaled). Four queries
/// share each load of keys, so a prompt's block of rows runs at the FMA units' rate.
pub(crate) fn transposed_scores(
    q: &[f32],
    hd: usize,
    kt: &[f32],
    stride: usize,
    n: usize,
    out: &mut [f32],
    isa: Isa,
) {
    let nq = q.len() / hd;
    assert!(
        n.is_multiple_of(KEY_LANES) && out.len() == nq * n && kt.len() >= (hd - 1) * stride + n,
        "transposed_scores: shapes do not match"
    );
    #[cfg(target_arch = "x86_64")]
    match f32_lanes(isa.min(Isa::widest()), hd) {
        // SAFETY: `f32_lanes` found AVX512F on this CPU.
        16 => return unsafe { avx2::transposed_scores512(q, hd, kt, stride, n, out) },
        // SAFETY: `f32_lanes` found AVX2 and FMA on this CPU.
        8 => return unsafe { avx2::transposed_scores(q, hd, kt, stride, n, out) },
        _ => {}
    }
    for (qi, o) in q.chunks_exact(hd).zip(out.chunks_exact_mut(n)) {
        o.fill(0.0);
        for (c, &x) in qi.iter().enumerate() {
            for (o, &k) in o.iter_mut().zip(&kt[c * stride..c * stride + n]) {
                *o += x * k;
            }
        }
    }
}

/// `out_i += sum_j p[i * n + j] * v_j` for the `hd`-long f32 rows of `v` (`n` of them) and
/// of `out`; four queries share each load of values.
pub(crate) fn add_weighted_sums(p: &[f32], v: &[f32], hd: usize, out: &mut [f32], isa: Isa) {
    let (nq, n) = (out.len() / hd, v.len() / hd);
    assert_eq!(p.len(), nq * n, "add_weighted_sums: p is not nq * n");
    #[cfg(target_arch = "x86_64")]
    match f32_lanes(isa.min(Isa::widest()), hd) {
        // SAFETY: `f32_lanes` found AVX512F on this CPU.
        16 => return unsafe { avx2::add_weighted_sums512(p, v, hd, out) },
        // SAFETY: `f32_lanes` found AVX2 and FMA on this CPU.
        8 => return unsafe { avx2::add_weighted_sums(p, v, hd, out) },
        _ => {}
    }
    for (pi, o) in p.chunks_exact(n.max(1)).zip(out.chunks_exact_mut(hd)) {
        for (&pj, vj) in pi.iter().zip(v.chunks_exact(hd)) {
            for (o, &x) in o.iter_mut().zip(vj) {
                *o += pj * x;
            }
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

/// Byte `i` of column `c`'s block among a tile's interleaved weight bytes (groups of 4
/// bytes, one group of each column in turn).
fn tile_byte(weights: &[u8], c: usize, i: usize) -> u8 {
    weights[((i / 4) * TILE + c) * 4 + i % 4]
}

/// Portable kernel: same arithmetic as the SIMD ones, summed in a different order.
fn tiles_scalar(format: Format, w: &[u8], kb: usize, q8: &Q8Rows, out: &mut [f32]) {
    let rows = q8.rows;
    let bb = format.block_bytes();
    let scale_bytes = bb - format.weight_bytes();
    for (tile, ws) in out
        .chunks_exact_mut(TILE * rows)
        .zip(w.chunks_exact(TILE * kb * bb))
    {
        let mut acc = [[0f32; MAX_ROWS]; TILE];
        for (b, blk) in ws.chunks_exact(TILE * bb).enumerate() {
            let f16_at = |i: usize| f16::from_le_bytes([blk[i], blk[i + 1]]).to_f32();
            let weights = &blk[TILE * scale_bytes..];
            for (c, acc) in acc.iter_mut().enumerate() {
                let d = f16_at(2 * c);
                let byte = |i: usize| tile_byte(weights, c, i);
                for (r, a) in acc.iter_mut().enumerate().take(rows) {
                    let i = b * rows + r;
                    let y = &q8.qs[i * QK..(i + 1) * QK];
                    *a += match format {
                        Format::Q4_1 => {
                            let sumi: i32 = (0..QK / 2)
                                .map(|t| {
                                    let q = byte(t);
                                    (q & 0x0F) as i32 * y[t] as i32
                                        + (q >> 4) as i32 * y[t + 16] as i32
                                })
                                .sum();
                            let m = f16_at(2 * TILE + 2 * c);
                            sumi as f32 * (d * q8.d[i]) + m * q8.s[b * MAX_ROWS + r]
                        }
                        Format::Q8_0 => {
                            let sumi: i32 =
                                (0..QK).map(|t| byte(t) as i8 as i32 * y[t] as i32).sum();
                            sumi as f32 * (d * q8.d[i])
                        }
                    };
                }
            }
        }
        for (c, acc) in acc.iter().enumerate() {
            for (r, &v) in acc.iter().enumerate().take(rows) {
                tile[r * TILE + c] = v;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Format, Isa, KvElem, Q8Rows, MAX_ROWS, OUTLIER_RATIO, QK, TILE};
    use std::arch::x86_64::*;

    /// SIMD kernel for [`super::QuantMatrix::tiles`]: lane c of a vector is column c of
    /// the tile.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C, for [`Isa::Vnni`] also AVX512-VNNI and
    /// AVX512VL, and for [`Isa::Vnni512`] also AVX512F and AVX512BW.
    pub(super) unsafe fn tiles(
        isa: Isa,
        format: Format,
        w: &[u8],
        kb: usize,
        q8: &Q8Rows,
        out: &mut [f32],
    ) {
        // SAFETY: the caller checked the CPU features of `isa`.
        unsafe {
            match isa {
                Isa::Vnni => tiles_vnni(format, w, kb, q8, out),
                Isa::Vnni512 => tiles_vnni512(format, w, kb, q8, out),
                _ => tiles_avx2(format, w, kb, q8, out),
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn tiles_avx2(format: Format, w: &[u8], kb: usize, q8: &Q8Rows, out: &mut [f32]) {
        by_rows::<Avx2>(format, w, kb, q8, out);
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
    fn tiles_vnni(format: Format, w: &[u8], kb: usize, q8: &Q8Rows, out: &mut [f32]) {
        by_rows::<Vnni>(format, w, kb, q8, out);
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    fn tiles_vnni512(format: Format, w: &[u8], kb: usize, q8: &Q8Rows, out: &mut [f32]) {
        let block = match format {
            Format::Q4_1 => Q4_1_TILE_BLOCK,
            Format::Q8_0 => Q8_0_TILE_BLOCK,
        };
        let pairs = out.len() / (2 * TILE * q8.rows);
        let (w_pairs, w_last) = w.split_at(pairs * 2 * kb * block);
        let (out_pairs, out_last) = out.split_at_mut(pairs * 2 * TILE * q8.rows);
        match (format, q8.rows) {
            (Format::Q4_1, 1) => q4_1_pairs::<1>(w_pairs, kb, q8, out_pairs),
            (Format::Q4_1, 2) => q4_1_pairs::<2>(w_pairs, kb, q8, out_pairs),
            (Format::Q4_1, 3) => q4_1_pairs::<3>(w_pairs, kb, q8, out_pairs),
            (Format::Q4_1, 4) => q4_1_pairs::<4>(w_pairs, kb, q8, out_pairs),
            (Format::Q4_1, 5) => q4_1_pairs::<5>(w_pairs, kb, q8, out_pairs),
            (Format::Q4_1, 6) => q4_1_pairs::<6>(w_pairs, kb, q8, out_pairs),
            (Format::Q4_1, 7) => q4_1_pairs::<7>(w_pairs, kb, q8, out_pairs),
            (Format::Q4_1, 8) => q4_1_pairs::<8>(w_pairs, kb, q8, out_pairs),
            (Format::Q8_0, 1) => q8_0_pairs::<1>(w_pairs, kb, q8, out_pairs),
            (Format::Q8_0, 2) => q8_0_pairs::<2>(w_pairs, kb, q8, out_pairs),
            (Format::Q8_0, 3) => q8_0_pairs::<3>(w_pairs, kb, q8, out_pairs),
            (Format::Q8_0, 4) => q8_0_pairs::<4>(w_pairs, kb, q8, out_pairs),
            (Format::Q8_0, 5) => q8_0_pairs::<5>(w_pairs, kb, q8, out_pairs),
            (Format::Q8_0, 6) => q8_0_pairs::<6>(w_pairs, kb, q8, out_pairs),
            (Format::Q8_0, 7) => q8_0_pairs::<7>(w_pairs, kb, q8, out_pairs),
            (Format::Q8_0, 8) => q8_0_pairs::<8>(w_pairs, kb, q8, out_pairs),
            (_, r) => unreachable!("quantized kernel called with {r} rows"),
        }
        by_rows::<Vnni>(format, w_last, kb, q8, out_last);
    }

    /// The 32 bytes at `at` of `lo` and of `hi` as one 512-bit vector (`lo` in the low half).
    #[inline(always)]
    fn load32x2(lo: &[u8], hi: &[u8], at: usize) -> __m512i {
        // SAFETY: only reached from `tiles_vnni512`, compiled with AVX512F.
        unsafe { _mm512_inserti64x4(_mm512_castsi256_si512(load32(lo, at)), load32(hi, at), 1) }
    }

    /// The 8 f16 at `at` of `lo` and of `hi` as 16 f32 (`lo`'s in the low half).
    #[inline(always)]
    fn f16x8x2(lo: &[u8], hi: &[u8], at: usize) -> __m512 {
        let (a, b) = (&lo[at..at + 16], &hi[at..at + 16]);
        // SAFETY: `a` and `b` are 16 bytes each, one unaligned 128-bit load each; only
        // reached from `tiles_vnni512`, compiled with AVX512F.
        unsafe {
            let a = _mm256_castsi128_si256(_mm_loadu_si128(a.as_ptr().cast()));
            _mm512_cvtph_ps(_mm256_inserti128_si256(
                a,
                _mm_loadu_si128(b.as_ptr().cast()),
                1,
            ))
        }
    }

    /// The 4 bytes of `y` from `at` broadcast to every 32-bit lane of a 512-bit vector.
    #[inline(always)]
    fn broadcast4x16(y: &[i8], at: usize) -> __m512i {
        let b: [i8; 4] = [y[at], y[at + 1], y[at + 2], y[at + 3]];
        // SAFETY: only reached from `tiles_vnni512`, compiled with AVX512F.
        unsafe { _mm512_set1_epi32(i32::from_le_bytes(b.map(|v| v as u8))) }
    }

    /// Writes the R accumulators of a tile pair (lane c: column c of the pair) to `tiles`,
    /// `[tile][row][column]`.
    #[inline(always)]
    fn store_pair<const R: usize>(acc: &[__m512; R], tiles: &mut [f32]) {
        let (first, second) = tiles.split_at_mut(TILE * R);
        for ((a, lo), hi) in acc
            .iter()
            .zip(first.chunks_exact_mut(TILE))
            .zip(second.chunks_exact_mut(TILE))
        {
            // SAFETY: `lo` and `hi` are 8 f32s each, one unaligned 256-bit store each; only
            // reached from `tiles_vnni512`, compiled with AVX512F.
            unsafe {
                _mm256_storeu_ps(lo.as_mut_ptr(), _mm512_castps512_ps256(*a));
                let upper = _mm512_extractf64x4_pd(_mm512_castps_pd(*a), 1);
                _mm256_storeu_ps(hi.as_mut_ptr(), _mm256_castpd_ps(upper));
            }
        }
    }

    #[inline(always)]
    fn q4_1_pairs<const R: usize>(w: &[u8], kb: usize, q8: &Q8Rows, out: &mut [f32]) {
        let tile_bytes = kb * Q4_1_TILE_BLOCK;
        // SAFETY (all intrinsics below): inlined only into `tiles_vnni512`, compiled with
        // AVX512F/BW/VNNI, which the caller checked.
        unsafe {
            let low = _mm512_set1_epi8(0x0F);
            for (tiles, ws) in out
                .chunks_exact_mut(2 * TILE * R)
                .zip(w.chunks_exact(2 * tile_bytes))
            {
                let (w0, w1) = ws.split_at(tile_bytes);
                let mut acc = [_mm512_setzero_ps(); R];
                let blocks = w0.chunks_exact(Q4_1_TILE_BLOCK);
                for (b, (b0, b1)) in blocks.zip(w1.chunks_exact(Q4_1_TILE_BLOCK)).enumerate() {
                    let d = f16x8x2(b0, b1, 0);
                    let m = f16x8x2(b0, b1, 16);
                    let mut lo = [_mm512_setzero_si512(); 4];
                    let mut hi = [_mm512_setzero_si512(); 4];
                    for g in 0..4 {
                        let q = load32x2(b0, b1, 32 + 32 * g);
                        lo[g] = _mm512_and_si512(q, low);
                        hi[g] = _mm512_and_si512(_mm512_srli_epi16(q, 4), low);
                    }
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let i = b * R + r;
                        let y = &q8.qs[i * QK..(i + 1) * QK];
                        // Two chains of four: half the latency of one of eight.
                        let (mut s, mut t) = (_mm512_setzero_si512(), _mm512_setzero_si512());
                        for g in 0..4 {
                            s = _mm512_dpbusd_epi32(s, lo[g], broadcast4x16(y, 4 * g));
                            t = _mm512_dpbusd_epi32(t, hi[g], broadcast4x16(y, 16 + 4 * g));
                        }
                        let s = _mm512_add_epi32(s, t);
                        let scale = _mm512_mul_ps(d, _mm512_set1_ps(q8.d[i]));
                        *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, *acc);
                        *acc = _mm512_fmadd_ps(m, _mm512_set1_ps(q8.s[b * MAX_ROWS + r]), *acc);
                    }
                }
                store_pair(&acc, tiles);
            }
        }
    }

    #[inline(always)]
    fn q8_0_pairs<const R: usize>(w: &[u8], kb: usize, q8: &Q8Rows, out: &mut [f32]) {
        let tile_bytes = kb * Q8_0_TILE_BLOCK;
        // SAFETY (all intrinsics below): as in `q4_1_pairs`.
        unsafe {
            // `vpdpbusd` multiplies unsigned by signed bytes: the weights go in as q + 128
            // (a flip of the top bit) and 128 * sum(y) comes off after.
            let flip = _mm512_set1_epi8(-128);
            for (tiles, ws) in out
                .chunks_exact_mut(2 * TILE * R)
                .zip(w.chunks_exact(2 * tile_bytes))
            {
                let (w0, w1) = ws.split_at(tile_bytes);
                let mut acc = [_mm512_setzero_ps(); R];
                let blocks = w0.chunks_exact(Q8_0_TILE_BLOCK);
                for (b, (b0, b1)) in blocks.zip(w1.chunks_exact(Q8_0_TILE_BLOCK)).enumerate() {
                    let d = f16x8x2(b0, b1, 0);
                    let mut u = [_mm512_setzero_si512(); 8];
                    for (g, u) in u.iter_mut().enumerate() {
                        *u = _mm512_xor_si512(load32x2(b0, b1, 16 + 32 * g), flip);
                    }
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let i = b * R + r;
                        let y = &q8.qs[i * QK..(i + 1) * QK];
                        // Two chains of four, as in `q4_1_pairs`.
                        let mut s = _mm512_set1_epi32(-128 * q8.sums[i]);
                        let mut t = _mm512_setzero_si512();
                        for g in 0..4 {
                            s = _mm512_dpbusd_epi32(s, u[g], broadcast4x16(y, 4 * g));
                            t = _mm512_dpbusd_epi32(t, u[4 + g], broadcast4x16(y, 16 + 4 * g));
                        }
                        let s = _mm512_add_epi32(s, t);
                        let scale = _mm512_mul_ps(d, _mm512_set1_ps(q8.d[i]));
                        *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, *acc);
                    }
                }
                store_pair(&acc, tiles);
            }
        }
    }

    /// [`super::QuantMatrix::add_outliers`] over the tiles of `w`: lane c of a vector is
    /// column c of a tile.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn add_outliers(
        format: Format,
        w: &[u8],
        kb: usize,
        q8: &Q8Rows,
        out: &mut [f32],
    ) {
        let (block, weights_at) = match format {
            Format::Q4_1 => (Q4_1_TILE_BLOCK, 32),
            Format::Q8_0 => (Q8_0_TILE_BLOCK, 16),
        };
        // Per outlier, where its weight byte sits in a tile and the shifts that take it out
        // of each column's 32-bit lane: Q4_1 keeps weights t and t + 16 in one byte's low
        // and high nibbles; Q8_0's bytes are signed.
        // Sorted by index, so that rows with an outlier at the same index (the same
        // massive dimension in every loop's row) share one pass over its weights.
        let mut at: Vec<(usize, usize, usize, usize, i32, f32)> = q8
            .outliers
            .iter()
            .map(|&(r, i, x)| {
                let (b, t) = (i / QK, i % QK);
                let (group, shift) = match format {
                    Format::Q4_1 => ((t % 16) / 4, 8 * (t % 4) as i32 + 4 * (t / 16) as i32),
                    Format::Q8_0 => (t / 4, 24 - 8 * (t % 4) as i32),
                };
                (
                    i,
                    r,
                    b * block,
                    b * block + weights_at + 32 * group,
                    shift,
                    x,
                )
            })
            .collect();
        at.sort_by_key(|a| (a.0, a.1));
        let rows = q8.rows;
        // SAFETY (all intrinsics): AVX2, FMA and F16C are enabled here; loads and stores
        // are of slices cut to their size.
        unsafe {
            let nibble = _mm256_set1_epi32(0x0F);
            for (tile, ws) in out
                .chunks_exact_mut(TILE * rows)
                .zip(w.chunks_exact(kb * block))
            {
                let (mut last, mut value) = (usize::MAX, _mm256_setzero_ps());
                for &(i, r, blk, group, shift, x) in &at {
                    if i != last {
                        let d = f16x8(ws, blk);
                        let v = load32(ws, group);
                        let shift = _mm_cvtsi32_si128(shift);
                        value = match format {
                            Format::Q4_1 => {
                                let q = _mm256_and_si256(_mm256_srl_epi32(v, shift), nibble);
                                _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), d, f16x8(ws, blk + 16))
                            }
                            Format::Q8_0 => {
                                let q = _mm256_srai_epi32(_mm256_sll_epi32(v, shift), 24);
                                _mm256_mul_ps(_mm256_cvtepi32_ps(q), d)
                            }
                        };
                        last = i;
                    }
                    let row = &mut tile[r * TILE..(r + 1) * TILE];
                    let y =
                        _mm256_fmadd_ps(value, _mm256_set1_ps(x), _mm256_loadu_ps(row.as_ptr()));
                    _mm256_storeu_ps(row.as_mut_ptr(), y);
                }
            }
        }
    }

    /// The integer dot products of one block, per instruction set: lane c of the result
    /// is `sum(w * y)` over the 32 weights of column c.
    trait BlockSums {
        /// Q4_1: `lo[g]` / `hi[g]` hold weights `4g..` / `16+4g..` of each column.
        unsafe fn q4_1(lo: &[__m256i; 4], hi: &[__m256i; 4], y: &[i8]) -> __m256i;
        /// Q8_0: `q[g]` holds weights `4g..` of each column, `abs[g]` their magnitudes.
        unsafe fn q8_0(q: &[__m256i; 8], abs: &[__m256i; 8], y: &[i8]) -> __m256i;
    }

    struct Avx2;
    impl BlockSums for Avx2 {
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn q4_1(lo: &[__m256i; 4], hi: &[__m256i; 4], y: &[i8]) -> __m256i {
            // u4 * i8 pairs are at most 2 * 15 * 127 = 3810, and 8 of them (30480) still
            // fit i16: one widening per block.
            let mut s16 = _mm256_setzero_si256();
            for g in 0..4 {
                let l = _mm256_maddubs_epi16(lo[g], broadcast4(y, 4 * g));
                let h = _mm256_maddubs_epi16(hi[g], broadcast4(y, 16 + 4 * g));
                s16 = _mm256_add_epi16(s16, _mm256_add_epi16(l, h));
            }
            _mm256_madd_epi16(s16, _mm256_set1_epi16(1))
        }

        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn q8_0(q: &[__m256i; 8], abs: &[__m256i; 8], y: &[i8]) -> __m256i {
            let mut s32 = _mm256_setzero_si256();
            for g in 0..8 {
                // maddubs wants unsigned * signed: |w| * (y with w's sign). GGUF Q8_0
                // weights lie in -127..=127, so the pair sums fit i16.
                let sy = _mm256_sign_epi8(broadcast4(y, 4 * g), q[g]);
                let p = _mm256_maddubs_epi16(abs[g], sy);
                s32 = _mm256_add_epi32(s32, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
            }
            s32
        }
    }

    /// `vpdpbusd` sums four u8 * i8 products into each i32 lane in one instruction.
    struct Vnni;
    impl BlockSums for Vnni {
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
        unsafe fn q4_1(lo: &[__m256i; 4], hi: &[__m256i; 4], y: &[i8]) -> __m256i {
            let mut s = _mm256_setzero_si256();
            for g in 0..4 {
                s = _mm256_dpbusd_epi32(s, lo[g], broadcast4(y, 4 * g));
                s = _mm256_dpbusd_epi32(s, hi[g], broadcast4(y, 16 + 4 * g));
            }
            s
        }

        #[inline]
        #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
        unsafe fn q8_0(q: &[__m256i; 8], abs: &[__m256i; 8], y: &[i8]) -> __m256i {
            let mut s = _mm256_setzero_si256();
            for g in 0..8 {
                let sy = _mm256_sign_epi8(broadcast4(y, 4 * g), q[g]);
                s = _mm256_dpbusd_epi32(s, abs[g], sy);
            }
            s
        }
    }

    /// [`super::quantize_block`] for 32 values.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn quantize_block(xs: &[f32], out: &mut [i8]) -> (f32, i32, u32) {
        let (xs, out) = (&xs[..QK], &mut out[..QK]);
        // SAFETY (all intrinsics): AVX2 is enabled here; loads and stores are of 32 f32s
        // and 32 bytes of slices just checked to hold them.
        unsafe {
            let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(xs[8 * i..].as_ptr()));
            let sign = _mm256_set1_ps(-0.0);
            let abs = v.map(|v| _mm256_andnot_ps(sign, v));
            let m = _mm256_max_ps(_mm256_max_ps(abs[0], abs[1]), _mm256_max_ps(abs[2], abs[3]));
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
            let amax = _mm_cvtss_f32(m);
            let dd = amax / 127.0;
            let limit = _mm256_set1_ps(amax / OUTLIER_RATIO);
            let above = abs.iter().enumerate().fold(0u32, |mask, (i, &a)| {
                let bits = _mm256_movemask_ps(_mm256_cmp_ps(a, limit, _CMP_GT_OQ)) as u32;
                mask | bits << (8 * i)
            });
            let id = _mm256_set1_ps(if dd != 0.0 { 1.0 / dd } else { 0.0 });
            // f32::round (half away from zero): truncate x + copysign(0.5 - 2^-25, x); the
            // sum is exact or rounds up to the next integer exactly at the halves.
            let half = _mm256_set1_ps(0.5 - f32::EPSILON / 4.0);
            let q = v.map(|v| {
                let x = _mm256_mul_ps(v, id);
                let t = _mm256_add_ps(x, _mm256_or_ps(half, _mm256_and_ps(sign, x)));
                _mm256_cvttps_epi32(t)
            });
            // i32 -> i16 -> i8 packs interleave 128-bit lanes; the permute puts the 8
            // groups of 4 back in order.
            let p = _mm256_packs_epi16(
                _mm256_packs_epi32(q[0], q[1]),
                _mm256_packs_epi32(q[2], q[3]),
            );
            let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256(out.as_mut_ptr().cast(), p);
            let s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
            let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
            (dd, _mm_cvtsi128_si32(s), above)
        }
    }

    /// An f32 vector type for the attention kernels.
    trait F32s: Copy {
        /// Lanes per vector.
        const LANES: usize;
        fn zero() -> Self;
        /// The `LANES` f32s from `at` of `x`.
        fn load(x: &[f32], at: usize) -> Self;
        /// `a * b + c`.
        fn fma(a: Self, b: Self, c: Self) -> Self;
        /// `v` broadcast to every lane.
        fn splat(v: f32) -> Self;
        /// Stores the `LANES` f32s to the start of `x`.
        fn store(self, x: &mut [f32]);
        /// Lanes summed pairwise down to 8 (lane i of the result: lanes i, i + 8, ...).
        fn to_256(self) -> __m256;
    }

    impl F32s for __m256 {
        const LANES: usize = 8;
        #[inline(always)]
        fn zero() -> Self {
            // SAFETY (each method): only reached from functions compiled with AVX2 and
            // FMA; every load and store is of 8 f32s of a slice checked to hold them.
            unsafe { _mm256_setzero_ps() }
        }
        #[inline(always)]
        fn load(x: &[f32], at: usize) -> Self {
            unsafe { _mm256_loadu_ps(x[at..at + 8].as_ptr()) }
        }
        #[inline(always)]
        fn fma(a: Self, b: Self, c: Self) -> Self {
            unsafe { _mm256_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        fn splat(v: f32) -> Self {
            unsafe { _mm256_set1_ps(v) }
        }
        #[inline(always)]
        fn store(self, x: &mut [f32]) {
            unsafe { _mm256_storeu_ps(x[..8].as_mut_ptr(), self) }
        }
        #[inline(always)]
        fn to_256(self) -> __m256 {
            self
        }
    }

    impl F32s for __m512 {
        const LANES: usize = 16;
        #[inline(always)]
        fn zero() -> Self {
            // SAFETY (each method): only reached from functions compiled with AVX512F;
            // every load and store is of 16 f32s of a slice checked to hold them.
            unsafe { _mm512_setzero_ps() }
        }
        #[inline(always)]
        fn load(x: &[f32], at: usize) -> Self {
            unsafe { _mm512_loadu_ps(x[at..at + 16].as_ptr()) }
        }
        #[inline(always)]
        fn fma(a: Self, b: Self, c: Self) -> Self {
            unsafe { _mm512_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        fn splat(v: f32) -> Self {
            unsafe { _mm512_set1_ps(v) }
        }
        #[inline(always)]
        fn store(self, x: &mut [f32]) {
            unsafe { _mm512_storeu_ps(x[..16].as_mut_ptr(), self) }
        }
        #[inline(always)]
        fn to_256(self) -> __m256 {
            unsafe {
                let upper = _mm512_extractf64x4_pd(_mm512_castps_pd(self), 1);
                _mm256_add_ps(_mm512_castps512_ps256(self), _mm256_castpd_ps(upper))
            }
        }
    }

    /// [`super::attention_scores`] for `hd` a multiple of 8.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn attention_scores<K: KvElem>(
        q: &[f32],
        k: &[K],
        hd: usize,
        scale: f32,
        out: &mut [f32],
    ) {
        scores::<__m256, K>(q, k, hd, scale, out);
    }

    /// [`super::attention_scores`] for `hd` a multiple of 16, on 512-bit vectors.
    ///
    /// # Safety
    /// The CPU must support AVX512F (and so AVX2 and FMA).
    #[target_feature(enable = "avx2,fma,f16c,avx512f")]
    pub(super) unsafe fn attention_scores512<K: KvElem>(
        q: &[f32],
        k: &[K],
        hd: usize,
        scale: f32,
        out: &mut [f32],
    ) {
        scores::<__m512, K>(q, k, hd, scale, out);
    }

    /// `x` (a multiple of 8 long) as f32: itself, or converted into `buf` with F16C.
    #[inline(always)]
    fn as_f32s<'a, K: KvElem>(x: &'a [K], buf: &'a mut [f32]) -> &'a [f32] {
        if let Some(x) = K::f32s(x) {
            return x;
        }
        let bits = K::f16_bits(x).unwrap_or_default();
        for (d, s) in buf.chunks_exact_mut(8).zip(bits.chunks_exact(8)) {
            // SAFETY: inlined only into functions compiled with F16C and AVX; `s` is 8 u16s
            // (one unaligned 128-bit load) and `d` 8 f32s (one unaligned 256-bit store).
            unsafe {
                let h = _mm_loadu_si128(s.as_ptr().cast());
                _mm256_storeu_ps(d.as_mut_ptr(), _mm256_cvtph_ps(h));
            }
        }
        &buf[..bits.len()]
    }

    #[inline(always)]
    fn scores<V: F32s, K: KvElem>(q: &[f32], k: &[K], hd: usize, scale: f32, out: &mut [f32]) {
        let (nq, n) = (q.len() / hd, k.len() / hd);
        // Four keys at a time, converted once for all queries when stored as f16; two
        // queries share each load of them.
        let mut buf = vec![0f32; 4 * hd];
        for j in (0..n - n % 4).step_by(4) {
            let keys = as_f32s(&k[j * hd..(j + 4) * hd], &mut buf);
            let mut i = 0;
            while i + 2 <= nq {
                four_scores::<V, 2>(q, i, keys, hd, scale, (j, n), out);
                i += 2;
            }
            if i < nq {
                four_scores::<V, 1>(q, i, keys, hd, scale, (j, n), out);
            }
        }
        for j in n - n % 4..n {
            let key = as_f32s(&k[j * hd..(j + 1) * hd], &mut buf);
            for (i, qi) in q.chunks_exact(hd).enumerate() {
                out[i * n + j] = super::dot(qi, key) * scale;
            }
        }
    }

    /// Scores of queries `i0 .. i0 + Q` against the four keys `keys` (`[4, hd]`, keys
    /// `j ..` of `n`): four accumulators per query reduced together by three `hadd`s.
    #[inline(always)]
    fn four_scores<V: F32s, const Q: usize>(
        q: &[f32],
        i0: usize,
        keys: &[f32],
        hd: usize,
        scale: f32,
        (j, n): (usize, usize),
        out: &mut [f32],
    ) {
        let mut acc = [[V::zero(); 4]; Q];
        for c in (0..hd).step_by(V::LANES) {
            // Written out: an array `map` is not inlined into the SIMD entry points.
            let k = [
                V::load(keys, c),
                V::load(keys, hd + c),
                V::load(keys, 2 * hd + c),
                V::load(keys, 3 * hd + c),
            ];
            for (r, a) in acc.iter_mut().enumerate() {
                let qv = V::load(q, (i0 + r) * hd + c);
                for (a, &k) in a.iter_mut().zip(&k) {
                    *a = V::fma(qv, k, *a);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            let a = [a[0].to_256(), a[1].to_256(), a[2].to_256(), a[3].to_256()];
            // SAFETY: inlined only into the entry points above, compiled with AVX2; `dst`
            // is 4 f32s, one unaligned 128-bit store.
            unsafe {
                let h = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
                // Lane t of each half holds half of key j + t's sum.
                let s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
                let s = _mm_mul_ps(s, _mm_set1_ps(scale));
                let row = (i0 + r) * n + j;
                _mm_storeu_ps(out[row..row + 4].as_mut_ptr(), s);
            }
        }
    }

    /// [`super::transposed_scores`] for `hd` a multiple of 8.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn transposed_scores(
        q: &[f32],
        hd: usize,
        kt: &[f32],
        stride: usize,
        n: usize,
        out: &mut [f32],
    ) {
        by_four_queries::<__m256>(q, hd, kt, stride, n, out);
    }

    /// [`super::transposed_scores`] for `hd` a multiple of 16, on 512-bit vectors.
    ///
    /// # Safety
    /// The CPU must support AVX512F.
    #[target_feature(enable = "avx2,fma,avx512f")]
    pub(super) unsafe fn transposed_scores512(
        q: &[f32],
        hd: usize,
        kt: &[f32],
        stride: usize,
        n: usize,
        out: &mut [f32],
    ) {
        by_four_queries::<__m512>(q, hd, kt, stride, n, out);
    }

    #[inline(always)]
    fn by_four_queries<V: F32s>(
        q: &[f32],
        hd: usize,
        kt: &[f32],
        stride: usize,
        n: usize,
        out: &mut [f32],
    ) {
        let nq = q.len() / hd;
        let mut i = 0;
        while i + 4 <= nq {
            transposed_block::<V, 4>(q, i, hd, kt, stride, n, out);
            i += 4;
        }
        while i < nq {
            transposed_block::<V, 1>(q, i, hd, kt, stride, n, out);
            i += 1;
        }
    }

    /// Scores of queries `i0 .. i0 + Q` against all `n` keys, two vectors of keys at a time.
    #[inline(always)]
    fn transposed_block<V: F32s, const Q: usize>(
        q: &[f32],
        i0: usize,
        hd: usize,
        kt: &[f32],
        stride: usize,
        n: usize,
        out: &mut [f32],
    ) {
        let queries = &q[i0 * hd..(i0 + Q) * hd];
        for j in (0..n).step_by(2 * V::LANES) {
            let mut acc = [[V::zero(); 2]; Q];
            for c in 0..hd {
                let k0 = V::load(kt, c * stride + j);
                let k1 = V::load(kt, c * stride + j + V::LANES);
                for (r, a) in acc.iter_mut().enumerate() {
                    let b = V::splat(queries[r * hd + c]);
                    a[0] = V::fma(b, k0, a[0]);
                    a[1] = V::fma(b, k1, a[1]);
                }
            }
            for (r, a) in acc.iter().enumerate() {
                let row = (i0 + r) * n + j;
                a[0].store(&mut out[row..]);
                a[1].store(&mut out[row + V::LANES..]);
            }
        }
    }

    /// [`super::add_weighted_sums`] for `hd` a multiple of 8.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn add_weighted_sums(p: &[f32], v: &[f32], hd: usize, out: &mut [f32]) {
        add_by_four_queries::<__m256>(p, v, hd, out);
    }

    /// [`super::add_weighted_sums`] for `hd` a multiple of 16, on 512-bit vectors.
    ///
    /// # Safety
    /// The CPU must support AVX512F.
    #[target_feature(enable = "avx2,fma,avx512f")]
    pub(super) unsafe fn add_weighted_sums512(p: &[f32], v: &[f32], hd: usize, out: &mut [f32]) {
        add_by_four_queries::<__m512>(p, v, hd, out);
    }

    #[inline(always)]
    fn add_by_four_queries<V: F32s>(p: &[f32], v: &[f32], hd: usize, out: &mut [f32]) {
        let (nq, n) = (out.len() / hd, v.len() / hd);
        let weights = Weights {
            p,
            stride: n,
            start: 0,
        };
        let mut i = 0;
        while i + 4 <= nq {
            add_weighted_block::<V, 4>(weights, v, hd, i, out);
            i += 4;
        }
        while i < nq {
            add_weighted_block::<V, 1>(weights, v, hd, i, out);
            i += 1;
        }
    }

    /// Query i's weight of key j at `p[i * stride + start + j]`.
    #[derive(Clone, Copy)]
    struct Weights<'a> {
        p: &'a [f32],
        stride: usize,
        start: usize,
    }

    /// Adds to the outputs of queries `i0 .. i0 + Q` their weighted sums of the `[n, hd]`
    /// values `v`, two vectors of columns at a time while they last, then one.
    #[inline(always)]
    fn add_weighted_block<V: F32s, const Q: usize>(
        weights: Weights<'_>,
        v: &[f32],
        hd: usize,
        i0: usize,
        out: &mut [f32],
    ) {
        let n = v.len() / hd;
        let mut rows: [&[f32]; Q] = [&[]; Q];
        for (r, row) in rows.iter_mut().enumerate() {
            let at = (i0 + r) * weights.stride + weights.start;
            *row = &weights.p[at..at + n];
        }
        let mut c = 0;
        while c < hd {
            let w = if c + 2 * V::LANES <= hd { 2 } else { 1 };
            let mut acc = [[V::zero(); 2]; Q];
            for (r, a) in acc.iter_mut().enumerate() {
                for (x, a) in a.iter_mut().enumerate().take(w) {
                    *a = V::load(out, (i0 + r) * hd + c + x * V::LANES);
                }
            }
            for j in 0..n {
                let v0 = V::load(v, j * hd + c);
                let v1 = if w == 2 {
                    V::load(v, j * hd + c + V::LANES)
                } else {
                    V::zero()
                };
                for (a, w) in acc.iter_mut().zip(&rows) {
                    let b = V::splat(w[j]);
                    a[0] = V::fma(b, v0, a[0]);
                    a[1] = V::fma(b, v1, a[1]);
                }
            }
            for (r, a) in acc.iter().enumerate() {
                for (x, a) in a.iter().enumerate().take(w) {
                    a.store(&mut out[(i0 + r) * hd + c + x * V::LANES..]);
                }
            }
            c += w * V::LANES;
        }
    }

    /// [`super::weighted_sums`] for `hd` a multiple of 8.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn weighted_sums<K: KvElem>(p: &[f32], v: &[K], hd: usize, out: &mut [f32]) {
        weighted::<__m256, K>(p, v, hd, out);
    }

    /// [`super::weighted_sums`] for `hd` a multiple of 16, on 512-bit vectors.
    ///
    /// # Safety
    /// The CPU must support AVX512F.
    #[target_feature(enable = "avx2,fma,f16c,avx512f")]
    pub(super) unsafe fn weighted_sums512<K: KvElem>(
        p: &[f32],
        v: &[K],
        hd: usize,
        out: &mut [f32],
    ) {
        weighted::<__m512, K>(p, v, hd, out);
    }

    #[inline(always)]
    fn weighted<V: F32s, K: KvElem>(p: &[f32], v: &[K], hd: usize, out: &mut [f32]) {
        let (nq, n) = (out.len() / hd, v.len() / hd);
        // f16 values in blocks of keys, each converted once for all queries; f32 values are
        // read in place, as one block. Four queries share each load of them.
        let block = if K::CONVERTS { VALUE_BLOCK } else { n.max(1) };
        let mut buf = vec![0f32; if K::CONVERTS { block * hd } else { 0 }];
        out.fill(0.0);
        for start in (0..n).step_by(block) {
            let end = (start + block).min(n);
            let values = as_f32s(&v[start * hd..end * hd], &mut buf);
            let weights = Weights {
                p,
                stride: n,
                start,
            };
            let mut i = 0;
            while i + 4 <= nq {
                add_weighted_block::<V, 4>(weights, values, hd, i, out);
                i += 4;
            }
            while i < nq {
                add_weighted_block::<V, 1>(weights, values, hd, i, out);
                i += 1;
            }
        }
    }

    /// Keys per block of converted f16 values.
    const VALUE_BLOCK: usize = 32;

    /// Instantiates the kernels for 1..=MAX_ROWS rows; inlined into each instruction
    /// set's entry point so that it is compiled with that set's features.
    #[inline(always)]
    fn by_rows<S: BlockSums>(format: Format, w: &[u8], kb: usize, q8: &Q8Rows, out: &mut [f32]) {
        match (format, q8.rows) {
            (Format::Q4_1, 1) => q4_1::<S, 1>(w, kb, q8, out),
            (Format::Q4_1, 2) => q4_1::<S, 2>(w, kb, q8, out),
            (Format::Q4_1, 3) => q4_1::<S, 3>(w, kb, q8, out),
            (Format::Q4_1, 4) => q4_1::<S, 4>(w, kb, q8, out),
            (Format::Q4_1, 5) => q4_1::<S, 5>(w, kb, q8, out),
            (Format::Q4_1, 6) => q4_1::<S, 6>(w, kb, q8, out),
            (Format::Q4_1, 7) => q4_1::<S, 7>(w, kb, q8, out),
            (Format::Q4_1, 8) => q4_1::<S, 8>(w, kb, q8, out),
            (Format::Q8_0, 1) => q8_0::<S, 1>(w, kb, q8, out),
            (Format::Q8_0, 2) => q8_0::<S, 2>(w, kb, q8, out),
            (Format::Q8_0, 3) => q8_0::<S, 3>(w, kb, q8, out),
            (Format::Q8_0, 4) => q8_0::<S, 4>(w, kb, q8, out),
            (Format::Q8_0, 5) => q8_0::<S, 5>(w, kb, q8, out),
            (Format::Q8_0, 6) => q8_0::<S, 6>(w, kb, q8, out),
            (Format::Q8_0, 7) => q8_0::<S, 7>(w, kb, q8, out),
            (Format::Q8_0, 8) => q8_0::<S, 8>(w, kb, q8, out),
            (_, r) => unreachable!("quantized kernel called with {r} rows"),
        }
    }

    /// Interleaved Q4_1 bytes per block of a tile: 8 d, 8 m, 8 x 16 weight bytes.
    const Q4_1_TILE_BLOCK: usize = 160;
    /// Interleaved Q8_0 bytes per block of a tile: 8 d, 8 x 32 weights.
    const Q8_0_TILE_BLOCK: usize = 272;

    /// The 4 bytes of `y` from `at` broadcast to every 32-bit lane.
    #[inline(always)]
    fn broadcast4(y: &[i8], at: usize) -> __m256i {
        let b: [i8; 4] = [y[at], y[at + 1], y[at + 2], y[at + 3]];
        // SAFETY: only reached from functions compiled with AVX (all of this module's).
        unsafe { _mm256_set1_epi32(i32::from_le_bytes(b.map(|v| v as u8))) }
    }

    /// The 8 f16 at `at` of `blk` as f32.
    #[inline(always)]
    fn f16x8(blk: &[u8], at: usize) -> __m256 {
        let v = &blk[at..at + 16];
        // SAFETY: `v` is 16 bytes, exactly one unaligned 128-bit load; only reached from
        // functions compiled with F16C.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(v.as_ptr().cast())) }
    }

    /// The 32 bytes at `at` of `blk`.
    #[inline(always)]
    fn load32(blk: &[u8], at: usize) -> __m256i {
        let v = &blk[at..at + 32];
        // SAFETY: `v` is 32 bytes, exactly one unaligned 256-bit load.
        unsafe { _mm256_loadu_si256(v.as_ptr().cast()) }
    }

    /// Writes the R accumulators (lane c: column c) to `tile` `[row][column]`.
    #[inline(always)]
    fn store<const R: usize>(acc: &[__m256; R], tile: &mut [f32]) {
        for (row, a) in tile.chunks_exact_mut(TILE).zip(acc) {
            // SAFETY: `row` is 8 f32s, exactly one unaligned 256-bit store.
            unsafe { _mm256_storeu_ps(row.as_mut_ptr(), *a) };
        }
    }

    #[inline(always)]
    fn q4_1<S: BlockSums, const R: usize>(w: &[u8], kb: usize, q8: &Q8Rows, out: &mut [f32]) {
        // SAFETY (all intrinsics below): inlined only into the entry points, compiled
        // with AVX2, FMA, F16C and S's features, which the caller checked.
        unsafe {
            let low = _mm256_set1_epi8(0x0F);
            for (tile, ws) in out
                .chunks_exact_mut(TILE * R)
                .zip(w.chunks_exact(kb * Q4_1_TILE_BLOCK))
            {
                let mut acc = [_mm256_setzero_ps(); R];
                for (b, blk) in ws.chunks_exact(Q4_1_TILE_BLOCK).enumerate() {
                    let d = f16x8(blk, 0);
                    let m = f16x8(blk, 16);
                    let mut lo = [_mm256_setzero_si256(); 4];
                    let mut hi = [_mm256_setzero_si256(); 4];
                    for g in 0..4 {
                        let q = load32(blk, 32 + 32 * g);
                        lo[g] = _mm256_and_si256(q, low);
                        hi[g] = _mm256_and_si256(_mm256_srli_epi16(q, 4), low);
                    }
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let i = b * R + r;
                        let s = S::q4_1(&lo, &hi, &q8.qs[i * QK..(i + 1) * QK]);
                        let scale = _mm256_mul_ps(d, _mm256_set1_ps(q8.d[i]));
                        *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, *acc);
                        *acc = _mm256_fmadd_ps(m, _mm256_set1_ps(q8.s[b * MAX_ROWS + r]), *acc);
                    }
                }
                store(&acc, tile);
            }
        }
    }

    #[inline(always)]
    fn q8_0<S: BlockSums, const R: usize>(w: &[u8], kb: usize, q8: &Q8Rows, out: &mut [f32]) {
        // SAFETY (all intrinsics below): as in `q4_1`.
        unsafe {
            for (tile, ws) in out
                .chunks_exact_mut(TILE * R)
                .zip(w.chunks_exact(kb * Q8_0_TILE_BLOCK))
            {
                let mut acc = [_mm256_setzero_ps(); R];
                for (b, blk) in ws.chunks_exact(Q8_0_TILE_BLOCK).enumerate() {
                    let d = f16x8(blk, 0);
                    let mut q = [_mm256_setzero_si256(); 8];
                    let mut abs = [_mm256_setzero_si256(); 8];
                    for g in 0..8 {
                        q[g] = load32(blk, 16 + 32 * g);
                        abs[g] = _mm256_sign_epi8(q[g], q[g]);
                    }
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let i = b * R + r;
                        let s = S::q8_0(&q, &abs, &q8.qs[i * QK..(i + 1) * QK]);
                        let scale = _mm256_mul_ps(d, _mm256_set1_ps(q8.d[i]));
                        *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, *acc);
                    }
                }
                store(&acc, tile);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::quantized::QMatMul;
    use candle_core::{Device, Module, Tensor};

    /// Deterministic values in [-1, 1).
    pub(crate) fn lcg(seed: u64, len: usize) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn quantized(n: usize, k: usize, seed: u64, dtype: GgmlDType) -> QTensor {
        let w = Tensor::from_vec(lcg(seed, n * k), (n, k), &Device::Cpu).unwrap();
        QTensor::quantize(&w, dtype).unwrap()
    }

    /// The weights of `q`, row-major.
    fn dequantized(q: &QTensor) -> Vec<f32> {
        let w = q.dequantize(&Device::Cpu).unwrap();
        w.flatten_all().unwrap().to_vec1().unwrap()
    }

    fn rms(v: &[f32]) -> f32 {
        (v.iter().map(|x| (x * x) as f64).sum::<f64>() / v.len() as f64).sqrt() as f32
    }

    fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    }

    const FORMATS: [GgmlDType; 2] = [GgmlDType::Q4_1, GgmlDType::Q8_0];

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn simd_activation_quantization_equals_the_portable_one() {
        if Isa::widest() == Isa::Scalar {
            return;
        }
        let mut blocks: Vec<Vec<f32>> = (0..64).map(|s| lcg(s, QK)).collect();
        // With 127 in the block the step is 1, so the others land exactly on halves (both
        // signs); then zeros, and one value alone.
        blocks.push(
            (0..QK)
                .map(|i| if i == 0 { 127.0 } else { i as f32 - 16.5 })
                .collect(),
        );
        blocks.push(vec![0.0; QK]);
        blocks.push((0..QK).map(|i| if i == 7 { -3.5 } else { 0.0 }).collect());
        // One and two outliers, and values just at amax / OUTLIER_RATIO (not above it).
        let mut one = lcg(90, QK);
        one[3] = 40.0;
        let mut two = one.clone();
        two[30] = -25.0;
        let edge: Vec<f32> = (0..QK).map(|i| if i < 2 { 8.0 } else { 2.0 }).collect();
        blocks.extend([one, two, edge]);
        for xs in &blocks {
            let (mut a, mut b) = ([0i8; QK], [0i8; QK]);
            let portable = quantize_block(xs, &mut a);
            // SAFETY: Isa::widest() found AVX2.
            let simd = unsafe { avx2::quantize_block(xs, &mut b) };
            assert_eq!((portable, a), (simd, b), "{xs:?}");
        }
    }

    #[test]
    fn takes_only_matching_supported_formats() {
        let w = Tensor::from_vec(lcg(1, 64 * 64), (64, 64), &Device::Cpu).unwrap();
        let q4k = QTensor::quantize(&w, GgmlDType::Q4_0).unwrap();
        assert!(QuantMatrix::from_qtensors(&[&q4k], Isa::widest()).is_none());
        let a = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        let b = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        assert!(QuantMatrix::from_qtensors(&[&a, &b], Isa::widest()).is_none());
        let (m, ranges) = QuantMatrix::from_qtensors(&[&a, &a], Isa::widest()).unwrap();
        assert_eq!((m.n, m.k, ranges), (128, 64, vec![0..64, 64..128]));
        // Parts are padded to whole tiles.
        let w = Tensor::from_vec(lcg(2, 9 * 64), (9, 64), &Device::Cpu).unwrap();
        let nine = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let (m, ranges) = QuantMatrix::from_qtensors(&[&nine, &nine], Isa::widest()).unwrap();
        assert_eq!((m.n, ranges), (32, vec![0..9, 16..25]));
        let w = Tensor::from_vec(lcg(1, 64 * 96), (64, 96), &Device::Cpu).unwrap();
        let c = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        assert!(QuantMatrix::from_qtensors(&[&a, &c], Isa::widest()).is_none());
    }

    #[test]
    fn q4_k_enters_as_q4_1_blocks_of_the_same_weights() {
        let q = quantized(24, 512, 9, GgmlDType::Q4K);
        let want = dequantized(&q);
        let (m, _) = QuantMatrix::from_qtensors(&[&q], Isa::widest()).unwrap();
        let got = m.dequantize(0..24);
        // Only the f16 rounding of d * sc and dmin * m, 2^-11 of each: at most 2^-11 of a
        // sub-block's range (15 * d * sc <= 2 * top) plus of its minimum (<= top). The
        // 4-bit step itself is about 2 * top / 15, ~200x larger.
        let top = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = max_abs_diff(&got, &want);
        assert!(err <= 3.0 * top / 2048.0, "err {err} vs max {top}");
        assert!(q4_k_as_q4_1(&q.data().unwrap()[..100]).is_none());
    }

    #[test]
    fn matches_dequantized_and_candle() {
        for dtype in FORMATS.into_iter().chain([GgmlDType::Q4K]) {
            for &(n, k) in &[(64usize, 64usize), (9, 64), (1536, 576), (576, 1536)] {
                if !k.is_multiple_of(dtype.block_size()) {
                    continue;
                }
                let q = quantized(n, k, (n * 31 + k) as u64, dtype);
                let w = dequantized(&q);
                let (m, _) = QuantMatrix::from_qtensors(&[&q], Isa::widest()).unwrap();
                // The repacked blocks hold the same weights (Q4_K: up to its scale rounding,
                // checked in `q4_k_enters_as_q4_1_blocks_of_the_same_weights`).
                if dtype != GgmlDType::Q4K {
                    assert_eq!(m.dequantize(0..n), w, "{dtype:?} n={n} k={k}");
                    let part = m.dequantize(n / 4..n / 2);
                    assert_eq!(part, w[n / 4 * k..n / 2 * k], "{dtype:?} columns");
                }
                let qmm =
                    QMatMul::from_qtensor(quantized(n, k, (n * 31 + k) as u64, dtype)).unwrap();
                for &rows in &[1usize, 2, 3, 8, 11] {
                    let x = lcg(rows as u64 * 7 + 3, rows * k);
                    let y = m.matmul(&x, rows, 0..n);
                    assert_eq!(y.len(), rows * n);

                    // (a) f32 product with the dequantized weights.
                    let mut exact = vec![0f32; rows * n];
                    for r in 0..rows {
                        for j in 0..n {
                            exact[r * n + j] = (0..k)
                                .map(|i| x[r * k + i] as f64 * w[j * k + i] as f64)
                                .sum::<f64>() as f32;
                        }
                    }
                    let scale = rms(&exact);
                    let err = max_abs_diff(&y, &exact);
                    assert!(
                        err < 2e-2 * scale,
                        "{dtype:?} n={n} k={k} rows={rows}: err {err} vs rms {scale}"
                    );

                    // The pool's split gives the same numbers as one thread.
                    assert_eq!(y, m.matmul_with(&x, rows, 0..n, Isa::widest(), false));

                    // A column range is that slice of every row.
                    let cols = n / 4..n / 2 + 3;
                    let part = m.matmul(&x, rows, cols.clone());
                    for r in 0..rows {
                        let want = &y[r * n + cols.start..r * n + cols.end];
                        let got = &part[r * cols.len()..(r + 1) * cols.len()];
                        assert_eq!(got, want, "{dtype:?} columns {cols:?} row {r}");
                    }
                    // (b) candle's quantized matmul: same algorithm, except that candle
                    // repacks Q8_0 with k a multiple of 256 and quantizes x its own way, and
                    // multiplies Q4_K by Q8_K (256-blocks) where plait reads it as Q4_1.
                    if (dtype == GgmlDType::Q8_0 && k % 256 == 0) || dtype == GgmlDType::Q4K {
                        continue;
                    }
                    let xt = Tensor::from_vec(x.clone(), (rows, k), &Device::Cpu).unwrap();
                    let yc: Vec<f32> = qmm
                        .forward(&xt)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap();
                    let err = max_abs_diff(&y, &yc);
                    assert!(
                        err < 1e-4 * scale,
                        "vs candle {dtype:?} n={n} k={k} rows={rows}: err {err} vs rms {scale}"
                    );
                }
            }
        }
    }

    /// Rows of `lcg` values with outliers: one in block 0 of every row, two in block 1 of
    /// odd rows (massive-activation dimensions, as trained models have).
    fn with_outliers(rows: usize, k: usize, seed: u64) -> Vec<f32> {
        let mut x = lcg(seed, rows * k);
        for r in 0..rows {
            x[r * k + 5] = 60.0 + r as f32;
            if r % 2 == 1 {
                x[r * k + QK + 9] = -45.0;
                x[r * k + QK + 20] = 30.0;
            }
        }
        x
    }

    #[test]
    fn a_product_of_many_rows_over_many_tile_blocks_equals_its_rows_alone() {
        // 4096-long columns: a block of tiles that stays in L2 is 12 of the 130 tiles; 19
        // rows are three row groups; columns 13..1000 start and end inside tiles.
        let (n, k, rows) = (1037, 4096, 19);
        for dtype in FORMATS {
            let q = quantized(n, k, 23, dtype);
            let (m, _) = QuantMatrix::from_qtensors(&[&q], Isa::widest()).unwrap();
            let x = with_outliers(rows, k, 5);
            for isa in Isa::supported() {
                for cols in [0..n, 13..1000] {
                    let all = m.matmul_with(&x, rows, cols.clone(), isa, true);
                    let alone: Vec<f32> = x
                        .chunks_exact(k)
                        .flat_map(|row| m.matmul_with(row, 1, cols.clone(), isa, false))
                        .collect();
                    let err = max_abs_diff(&all, &alone);
                    assert!(
                        err <= 1e-6 * rms(&alone),
                        "{isa:?} {dtype:?} {cols:?}: {err}"
                    );
                }
            }
        }
    }

    #[test]
    fn outliers_are_kept_in_f32_and_leave_their_blocks_exact() {
        let (n, k) = (72, 512);
        for dtype in FORMATS {
            let q = quantized(n, k, 17, dtype);
            let w = dequantized(&q);
            let (m, _) = QuantMatrix::from_qtensors(&[&q], Isa::widest()).unwrap();
            for rows in [1, 2, 3] {
                let x = with_outliers(rows, k, 3);
                let q8 = Q8Rows::quantize(&x, rows, k, Isa::Scalar);
                let taken: Vec<(usize, usize)> = q8.outliers.iter().map(|o| (o.0, o.1)).collect();
                let mut want = vec![];
                for r in 0..rows {
                    want.push((r, 5));
                    if r % 2 == 1 {
                        want.extend([(r, QK + 9), (r, QK + 20)]);
                    }
                }
                assert_eq!(taken, want, "{dtype:?} rows {rows}");
                let exact = |x: &[f32]| -> Vec<f32> {
                    (0..rows * n)
                        .map(|o| {
                            let (r, j) = (o / n, o % n);
                            (0..k)
                                .map(|i| x[r * k + i] as f64 * w[j * k + i] as f64)
                                .sum::<f64>() as f32
                        })
                        .collect()
                };
                // The error is that of the values without outliers: int8 steps set by
                // them, not by the outliers (which would round the rest of their blocks
                // to a few levels).
                let inliers: Vec<f32> = x
                    .iter()
                    .map(|&v| if v.abs() > 2.0 { 0.0 } else { v })
                    .collect();
                let scale = rms(&exact(&inliers));
                for isa in Isa::supported() {
                    let y = m.matmul_with(&x, rows, 0..n, isa, false);
                    let err = max_abs_diff(&y, &exact(&x));
                    assert!(
                        err < 2e-2 * scale,
                        "{isa:?} {dtype:?} rows {rows}: err {err} vs rms {scale}"
                    );
                }
            }
        }
    }

    #[test]
    fn every_instruction_set_matches_the_scalar_kernel() {
        let isas: Vec<Isa> = Isa::supported().filter(|&i| i != Isa::Scalar).collect();
        if isas.is_empty() {
            eprintln!("no AVX2/FMA/F16C: SIMD kernels not tested");
        }
        for isa in isas {
            for dtype in FORMATS {
                for &(n, k) in &[(64, 64), (67, 96), (96, 1536)] {
                    let (m, _) =
                        QuantMatrix::from_qtensors(&[&quantized(n, k, 99, dtype)], Isa::widest())
                            .unwrap();
                    for rows in 1..=9 {
                        let x = with_outliers(rows, k, rows as u64);
                        let a = m.matmul_with(&x, rows, 0..n, isa, false);
                        let b = m.matmul_with(&x, rows, 0..n, Isa::Scalar, false);
                        let scale = rms(&b);
                        let err = max_abs_diff(&a, &b);
                        assert!(
                            err < 1e-5 * scale,
                            "{isa:?} {dtype:?} n={n} k={k} rows={rows}: {err}"
                        );
                    }
                }
            }
        }
    }

    /// `cargo test --release --lib kernels -- --ignored --nocapture`
    #[test]
    #[ignore = "benchmark"]
    fn bench_quantized_matmul() {
        use std::time::Instant;
        fn time(iters: usize, mut f: impl FnMut()) -> f64 {
            for _ in 0..iters / 10 + 1 {
                f();
            }
            let t = Instant::now();
            for _ in 0..iters {
                f();
            }
            t.elapsed().as_nanos() as f64 / iters as f64
        }
        let shapes = [
            (GgmlDType::Q4_1, 576, 576),
            (GgmlDType::Q4_1, 3072, 576),
            (GgmlDType::Q4_1, 576, 1536),
            (GgmlDType::Q8_0, 49152, 576),
        ];
        for (dtype, n, k) in shapes {
            let q = quantized(n, k, 5, dtype);
            let (m, _) = QuantMatrix::from_qtensors(&[&q], Isa::widest()).unwrap();
            let qmm = QMatMul::from_qtensor(q).unwrap();
            let iters = (200_000_000 / (n * k)).max(5);
            for rows in [1usize, 2, 3, 8] {
                let x = lcg(rows as u64, rows * k);
                let xt = Tensor::from_vec(x.clone(), (rows, k), &Device::Cpu).unwrap();
                let isa = Isa::widest();
                let avx2 = time(iters, || {
                    std::hint::black_box(m.matmul_with(&x, rows, 0..n, Isa::Avx2, false));
                });
                let single = time(iters, || {
                    std::hint::black_box(m.matmul_with(&x, rows, 0..n, isa, false));
                });
                let pooled = time(iters, || {
                    std::hint::black_box(m.matmul_with(&x, rows, 0..n, isa, true));
                });
                let candle = time(iters.div_ceil(4), || {
                    std::hint::black_box(qmm.forward(&xt).unwrap());
                });
                println!(
                    "{dtype:?} {n}x{k} rows={rows}: AVX2 1 thread {avx2:.0} ns, {isa:?} 1 thread \
                     {single:.0} ns, pool {pooled:.0} ns, candle QMatMul {candle:.0} ns"
                );
            }
        }
    }
}

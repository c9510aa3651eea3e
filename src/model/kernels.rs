//! Hand-written CPU kernels for the decode hot path.
//!
//! [`QuantMatrix`] multiplies GGUF Q4_1 or Q8_0 weights by a handful of f32 activation rows
//! (one per PLT loop during decode). candle's own dot products walk the weights once per
//! row; here every weight block is read and unpacked once and then dotted with all rows, so
//! `rows = 2` costs much less than twice `rows = 1`. Columns are split over candle's
//! persistent barrier pool, whose workers spin between calls, so even a one-row product of
//! a small matrix uses every thread.
//!
//! Numerics follow ggml/candle exactly: each activation row is quantized per 32-block to
//! Q8_1 (`d = amax / 127` rounded to f16, `q = round(x / d)`, `s = d * sum(q)` in f16). A
//! Q4_1 block contributes `d4 * d8 * sum(q4 * q8) + m4 * s8`, a Q8_0 block
//! `d * d8 * sum(q * q8)` (Q8_0 activations are Q8_1's without `s`). Results therefore
//! match `QMatMul::forward` up to f32 summation order.

use std::ops::Range;
use std::sync::{Mutex, PoisonError};

use candle_core::quantized::{GgmlDType, QTensor};

/// Elements per block (Q4_1, Q8_0 and the Q8_1 activations alike).
const QK: usize = 32;
/// Activation rows handled per pass over the weights (accumulators kept in registers).
const MAX_ROWS: usize = 8;
/// Below this much work (weights times activation rows, at most [`MAX_ROWS`]) a product runs
/// on the calling thread: waking the pool costs more than it saves.
const PARALLEL_MIN_WORK: usize = 1 << 16;
/// Column chunks per thread: a thread slowed by other work on the machine leaves its
/// share to the others instead of holding up the barrier.
const CHUNKS_PER_THREAD: usize = 4;

/// The block formats the kernels read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    /// `d: f16, m: f16, qs: [u8; 16]` (two 4-bit weights a byte).
    Q4_1,
    /// `d: f16, qs: [i8; 32]`.
    Q8_0,
}

impl Format {
    fn of(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q4_1 => Some(Self::Q4_1),
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
}

/// Quantized weights `[n, k]` (k a multiple of 32) laid out as GGUF blocks, ready for
/// multi-row products.
pub(crate) struct QuantMatrix {
    format: Format,
    n: usize,
    k: usize,
    /// `n * k / 32` GGUF blocks, row (output column) after row.
    data: Vec<u8>,
}

/// Up to [`MAX_ROWS`] activation rows quantized to Q8_1, stored block-major so the rows of
/// one block sit next to each other: `qs[(b * rows + r) * 32 ..]`, `d[b * rows + r]`, and
/// `s[b * MAX_ROWS + r]` (padded with zeros so a block's sums load as one vector).
struct Q8Rows {
    rows: usize,
    qs: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
}

impl Q8Rows {
    /// Quantize `x` (`rows * k`, row-major) like ggml's `quantize_row_q8_1`.
    fn quantize(x: &[f32], rows: usize, k: usize) -> Self {
        let kb = k / QK;
        let mut qs = vec![0i8; rows * k];
        let mut d = vec![0f32; rows * kb];
        let mut s = vec![0f32; MAX_ROWS * kb];
        for r in 0..rows {
            for b in 0..kb {
                let xs = &x[r * k + b * QK..r * k + (b + 1) * QK];
                let amax = xs.iter().fold(0f32, |a, &v| a.max(v.abs()));
                let dd = amax / 127.0;
                let id = if dd != 0.0 { 1.0 / dd } else { 0.0 };
                let dh = f16_to_f32(f32_to_f16(dd));
                let out = &mut qs[(b * rows + r) * QK..(b * rows + r + 1) * QK];
                let mut sum = 0i32;
                for (q, &v) in out.iter_mut().zip(xs) {
                    *q = (v * id).round() as i8;
                    sum += *q as i32;
                }
                d[b * rows + r] = dh;
                // candle: `f16::from_f32(sum as f32) * d`, an f16 product.
                let sum_h = f16_to_f32(f32_to_f16(sum as f32));
                s[b * MAX_ROWS + r] = f16_to_f32(f32_to_f16(sum_h * dh));
            }
        }
        Self { rows, qs, d, s }
    }
}

impl QuantMatrix {
    /// The matrices of `parts` stacked (their rows one after another), from candle
    /// QTensors; None unless all are 2-D, of one supported format, with the same row
    /// length, a multiple of 32.
    pub(crate) fn from_qtensors(parts: &[&QTensor]) -> Option<Self> {
        let format = Format::of(parts.first()?.dtype())?;
        let (mut n, mut k) = (0, None);
        let mut data = Vec::new();
        for t in parts {
            let (rows, cols) = t.shape().dims2().ok()?;
            if Format::of(t.dtype()) != Some(format)
                || cols % QK != 0
                || k.is_some_and(|k| k != cols)
            {
                return None;
            }
            let bytes = t.data().ok()?;
            if bytes.len() != rows * (cols / QK) * format.block_bytes() {
                return None;
            }
            data.extend_from_slice(&bytes);
            n += rows;
            k = Some(cols);
        }
        Some(Self {
            format,
            n,
            k: k?,
            data,
        })
    }

    /// Output features (rows of the weight matrix).
    pub(crate) fn n(&self) -> usize {
        self.n
    }

    /// `y[r][j - cols.start] = sum_i x[r][i] * w[j][i]` for `j` in `cols`: `x` is
    /// `rows * k` f32 (row-major), returns `rows * cols.len()` f32 (row-major).
    pub(crate) fn matmul(&self, x: &[f32], rows: usize, cols: Range<usize>) -> Vec<f32> {
        self.matmul_with(x, rows, cols, simd_available(), true)
    }

    /// [`Self::matmul`] with the kernel and whether to use the pool chosen by the caller.
    fn matmul_with(
        &self,
        x: &[f32],
        rows: usize,
        cols: Range<usize>,
        simd: bool,
        parallel: bool,
    ) -> Vec<f32> {
        let k = self.k;
        assert_eq!(x.len(), rows * k, "QuantMatrix::matmul: x is not rows * k");
        assert!(
            cols.end <= self.n,
            "QuantMatrix::matmul: columns out of range"
        );
        let n = cols.len();
        let mut y = vec![0f32; rows * n];
        let pool = candle_core::utils::barrier_pool();
        let threads = pool.n_workers() + 1;
        let mut r0 = 0;
        while r0 < rows {
            let g = (rows - r0).min(MAX_ROWS);
            let q8 = Q8Rows::quantize(&x[r0 * k..(r0 + g) * k], g, k);
            // Column-major `[n][g]`, so each chunk is one contiguous range of columns.
            let mut out = vec![0f32; n * g];
            if parallel && threads > 1 && n * k * g >= PARALLEL_MIN_WORK {
                // Multiples of 4 columns keep the kernel on its widest tiles.
                let per = n.div_ceil(threads * CHUNKS_PER_THREAD).next_multiple_of(4);
                let chunks: Vec<Mutex<&mut [f32]>> =
                    out.chunks_mut(per * g).map(Mutex::new).collect();
                pool.execute_chunked(chunks.len(), |range| {
                    for i in range {
                        let mut chunk = chunks[i].lock().unwrap_or_else(PoisonError::into_inner);
                        self.columns(&q8, cols.start + i * per, &mut chunk, simd);
                    }
                });
            } else {
                self.columns(&q8, cols.start, &mut out, simd);
            }
            for (j, col) in out.chunks_exact(g).enumerate() {
                for (r, &v) in col.iter().enumerate() {
                    y[(r0 + r) * n + j] = v;
                }
            }
            r0 += g;
        }
        y
    }

    /// Outputs for columns `j0 .. j0 + out.len() / q8.rows`, written `[column][row]`.
    fn columns(&self, q8: &Q8Rows, j0: usize, out: &mut [f32], simd: bool) {
        let kb = self.k / QK;
        let ncols = out.len() / q8.rows;
        let col_bytes = kb * self.format.block_bytes();
        let w = &self.data[j0 * col_bytes..(j0 + ncols) * col_bytes];
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: `simd` is only true when `simd_available()` found AVX2, FMA and F16C
            // on this CPU (the tests pass it after checking the same).
            unsafe { avx2::columns(self.format, w, kb, q8, out) };
            return;
        }
        let _ = simd;
        columns_scalar(self.format, w, kb, q8, out);
    }
}

/// Whether the AVX2 kernel can run on this CPU.
fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Portable kernel: same arithmetic as the AVX2 one, summed in a different order.
fn columns_scalar(format: Format, w: &[u8], kb: usize, q8: &Q8Rows, out: &mut [f32]) {
    let rows = q8.rows;
    let bytes = format.block_bytes();
    for (col, ws) in out.chunks_exact_mut(rows).zip(w.chunks_exact(kb * bytes)) {
        let mut acc = [0f32; MAX_ROWS];
        for (b, blk) in ws.chunks_exact(bytes).enumerate() {
            let d = f16_to_f32(u16::from_le_bytes([blk[0], blk[1]]));
            for (r, a) in acc.iter_mut().enumerate().take(rows) {
                let i = b * rows + r;
                let y = &q8.qs[i * QK..(i + 1) * QK];
                *a += match format {
                    Format::Q4_1 => {
                        let m = f16_to_f32(u16::from_le_bytes([blk[2], blk[3]]));
                        let sumi: i32 = (0..QK / 2)
                            .map(|t| {
                                let q = blk[4 + t];
                                (q & 0x0F) as i32 * y[t] as i32 + (q >> 4) as i32 * y[t + 16] as i32
                            })
                            .sum();
                        sumi as f32 * (d * q8.d[i]) + m * q8.s[b * MAX_ROWS + r]
                    }
                    Format::Q8_0 => {
                        let sumi: i32 =
                            (0..QK).map(|t| blk[2 + t] as i8 as i32 * y[t] as i32).sum();
                        sumi as f32 * (d * q8.d[i])
                    }
                };
            }
        }
        col.copy_from_slice(&acc[..rows]);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Format, Q8Rows, MAX_ROWS, QK};
    use std::arch::x86_64::*;

    /// Q4_1 block bytes.
    const Q4_1_BYTES: usize = 20;
    /// Q8_0 block bytes.
    const Q8_0_BYTES: usize = 34;

    /// AVX2 kernel for [`super::QuantMatrix::columns`].
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn columns(
        format: Format,
        w: &[u8],
        kb: usize,
        q8: &Q8Rows,
        out: &mut [f32],
    ) {
        match format {
            Format::Q4_1 => by_rows::<Q41>(w, kb, q8, out),
            Format::Q8_0 => by_rows::<Q80>(w, kb, q8, out),
        }
    }

    /// One block format: how a block of weights is dotted with one row's Q8 block.
    trait Block {
        /// Bytes per block.
        const BYTES: usize;
        /// Weights unpacked for the block's dot products.
        type Unpacked: Copy;
        /// Unpacks `blk`: the scale `d` broadcast, its minimum `m` (Q4_1; zero otherwise)
        /// and the weights.
        unsafe fn unpack(blk: &[u8]) -> (__m256, __m256, Self::Unpacked);
        /// Eight lanes whose sum is `sum(w * y)` for the 32 weights and the 32 `y`.
        unsafe fn dot(w: Self::Unpacked, y: __m256i) -> __m256i;
    }

    struct Q41;
    impl Block for Q41 {
        const BYTES: usize = Q4_1_BYTES;
        type Unpacked = __m256i;
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn unpack(blk: &[u8]) -> (__m256, __m256, __m256i) {
            debug_assert!(blk.len() >= Q4_1_BYTES);
            // SAFETY: `blk` holds one 20-byte block (the callers slice it so): a 4-byte
            // read at 0 and a 16-byte read at 4 are in bounds.
            unsafe {
                let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(
                    blk.as_ptr().cast::<i32>().read_unaligned(),
                ));
                let q = _mm_loadu_si128(blk.as_ptr().add(4).cast());
                // Elements 0..16 are the low nibbles, 16..32 the high ones.
                let nib = _mm256_and_si256(
                    _mm256_set_m128i(_mm_srli_epi16(q, 4), q),
                    _mm256_set1_epi8(0x0F),
                );
                (
                    _mm256_broadcastss_ps(dm),
                    _mm256_broadcastss_ps(_mm_movehdup_ps(dm)),
                    nib,
                )
            }
        }
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn dot(nib: __m256i, y: __m256i) -> __m256i {
            // u4 * i8 pairs fit i16 (at most 2 * 15 * 128): no saturation.
            _mm256_madd_epi16(_mm256_maddubs_epi16(nib, y), _mm256_set1_epi16(1))
        }
    }

    struct Q80;
    impl Block for Q80 {
        const BYTES: usize = Q8_0_BYTES;
        /// `|w|` and the sign of `w`.
        type Unpacked = (__m256i, __m256i);
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn unpack(blk: &[u8]) -> (__m256, __m256, (__m256i, __m256i)) {
            debug_assert!(blk.len() >= Q8_0_BYTES);
            // SAFETY: `blk` holds one 34-byte block: a 2-byte read at 0 and a 32-byte read
            // at 2 are in bounds.
            unsafe {
                let d = _mm_cvtph_ps(_mm_cvtsi32_si128(
                    blk.as_ptr().cast::<u16>().read_unaligned() as i32,
                ));
                let q = _mm256_loadu_si256(blk.as_ptr().add(2).cast());
                (
                    _mm256_broadcastss_ps(d),
                    _mm256_setzero_ps(),
                    (_mm256_sign_epi8(q, q), q),
                )
            }
        }
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn dot((abs, sign): (__m256i, __m256i), y: __m256i) -> __m256i {
            // maddubs wants unsigned * signed: |w| * (y with w's sign). GGUF Q8_0 weights lie
            // in -127..=127, so the pair sums fit i16.
            let p = _mm256_maddubs_epi16(abs, _mm256_sign_epi8(y, sign));
            _mm256_madd_epi16(p, _mm256_set1_epi16(1))
        }
    }

    /// Columns per tile: with few rows, several columns give the FMA chains enough
    /// independent work to hide their latency; with many rows the rows already do.
    #[target_feature(enable = "avx2,fma,f16c")]
    fn by_rows<B: Block>(w: &[u8], kb: usize, q8: &Q8Rows, out: &mut [f32]) {
        match q8.rows {
            1 => tiled::<B, 1, 4>(w, kb, q8, out),
            2 => tiled::<B, 2, 4>(w, kb, q8, out),
            3 => tiled::<B, 3, 2>(w, kb, q8, out),
            4 => tiled::<B, 4, 2>(w, kb, q8, out),
            5 => tiled::<B, 5, 1>(w, kb, q8, out),
            6 => tiled::<B, 6, 1>(w, kb, q8, out),
            7 => tiled::<B, 7, 1>(w, kb, q8, out),
            8 => tiled::<B, 8, 1>(w, kb, q8, out),
            r => unreachable!("quantized kernel called with {r} rows"),
        }
    }

    /// Tiles of `C` columns, then the leftover columns one at a time.
    #[target_feature(enable = "avx2,fma,f16c")]
    fn tiled<B: Block, const R: usize, const C: usize>(
        w: &[u8],
        kb: usize,
        q8: &Q8Rows,
        out: &mut [f32],
    ) {
        let full = out.len() / R / C * C;
        let (out_a, out_b) = out.split_at_mut(full * R);
        let (w_a, w_b) = w.split_at(full * kb * B::BYTES);
        columns_n::<B, R, C>(w_a, kb, q8, out_a);
        columns_n::<B, R, 1>(w_b, kb, q8, out_b);
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn columns_n<B: Block, const R: usize, const C: usize>(
        w: &[u8],
        kb: usize,
        q8: &Q8Rows,
        out: &mut [f32],
    ) {
        debug_assert_eq!(q8.rows, R);
        let qs8 = &q8.qs[..kb * R * QK];
        let d8 = &q8.d[..kb * R];
        let s8 = &q8.s[..kb * MAX_ROWS];
        let col_bytes = kb * B::BYTES;
        for (tile, ws) in out
            .chunks_exact_mut(R * C)
            .zip(w.chunks_exact(C * col_bytes))
        {
            let mut acc = [[_mm256_setzero_ps(); R]; C];
            // Lane r: sum over blocks of m4 * s8[r] (Q4_1 only; m is zero otherwise).
            let mut macc = [_mm256_setzero_ps(); C];
            for b in 0..kb {
                let ys = &qs8[b * R * QK..(b + 1) * R * QK];
                let s = &s8[b * MAX_ROWS..(b + 1) * MAX_ROWS];
                // SAFETY: `s` is MAX_ROWS = 8 f32s, exactly one unaligned 256-bit load.
                let s = unsafe { _mm256_loadu_ps(s.as_ptr()) };
                for c in 0..C {
                    let off = c * col_bytes + b * B::BYTES;
                    // SAFETY: the slice is exactly one block (the caller checked the CPU).
                    let (d, m, wq) = unsafe { B::unpack(&ws[off..off + B::BYTES]) };
                    macc[c] = _mm256_fmadd_ps(m, s, macc[c]);
                    for r in 0..R {
                        let y = &ys[r * QK..(r + 1) * QK];
                        // SAFETY: `y` is 32 bytes, exactly one unaligned 256-bit load.
                        let y = unsafe { _mm256_loadu_si256(y.as_ptr().cast()) };
                        // SAFETY: this function's target features include the block's.
                        let p = unsafe { B::dot(wq, y) };
                        let scale = _mm256_mul_ps(d, _mm256_set1_ps(d8[b * R + r]));
                        acc[c][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, acc[c][r]);
                    }
                }
            }
            for c in 0..C {
                let mut m = [0f32; MAX_ROWS];
                // SAFETY: `m` is 8 f32s, exactly one unaligned 256-bit store.
                unsafe { _mm256_storeu_ps(m.as_mut_ptr(), macc[c]) };
                for r in 0..R {
                    tile[c * R + r] = hsum(acc[c][r]) + m[r];
                }
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }
}

/// IEEE half (bits) to f32.
fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h as u32) & 0x8000) << 16;
    let exp = ((h >> 10) & 0x1F) as u32;
    let man = (h & 0x3FF) as u32;
    let bits = match exp {
        0 => {
            // Zero or subnormal: man * 2^-24, exact in f32.
            let v = man as f32 * f32::from_bits(0x3380_0000);
            return if sign != 0 { -v } else { v };
        }
        0x1F => sign | 0x7F80_0000 | (man << 13),
        _ => sign | ((exp + 112) << 23) | (man << 13),
    };
    f32::from_bits(bits)
}

/// f32 to IEEE half (bits), rounding to nearest even like `half::f16::from_f32`.
fn f32_to_f16(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exp = ((bits >> 23) & 0xFF) as i32;
    let man = bits & 0x7F_FFFF;
    if exp == 0xFF {
        return sign | 0x7C00 | if man != 0 { 0x200 } else { 0 };
    }
    let e = exp - 127 + 15;
    if e >= 31 {
        return sign | 0x7C00;
    }
    if e <= 0 {
        if e < -10 {
            return sign;
        }
        let m = man | 0x80_0000;
        let shift = (14 - e) as u32;
        let mut r = m >> shift;
        let rem = m & ((1 << shift) - 1);
        let halfway = 1 << (shift - 1);
        if rem > halfway || (rem == halfway && r & 1 == 1) {
            r += 1;
        }
        return sign | r as u16;
    }
    let mut r = ((e as u32) << 10) | (man >> 13);
    let rem = man & 0x1FFF;
    if rem > 0x1000 || (rem == 0x1000 && r & 1 == 1) {
        // A carry out of the mantissa bumps the exponent, up to infinity: still correct.
        r += 1;
    }
    sign | r as u16
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
    fn f16_conversions_round_trip() {
        for h in 0..=u16::MAX {
            let f = f16_to_f32(h);
            if f.is_nan() {
                continue;
            }
            assert_eq!(f32_to_f16(f), h, "{h:#x} -> {f}");
        }
        // Round to nearest even between 1.0 and the next half (1 + 2^-10).
        assert_eq!(f32_to_f16(1.0 + 0.5 / 1024.0), 0x3C00);
        assert_eq!(f32_to_f16(1.0 + 1.5 / 1024.0), 0x3C02);
        assert_eq!(f32_to_f16(1.0e6), 0x7C00);
        assert_eq!(f32_to_f16(4064.0), 0x6BF0);
    }

    #[test]
    fn takes_only_matching_supported_formats() {
        let w = Tensor::from_vec(lcg(1, 64 * 64), (64, 64), &Device::Cpu).unwrap();
        let q4k = QTensor::quantize(&w, GgmlDType::Q4_0).unwrap();
        assert!(QuantMatrix::from_qtensors(&[&q4k]).is_none());
        let a = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        let b = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        assert!(QuantMatrix::from_qtensors(&[&a, &b]).is_none());
        let m = QuantMatrix::from_qtensors(&[&a, &a]).unwrap();
        assert_eq!((m.n(), m.k), (128, 64));
        let w = Tensor::from_vec(lcg(1, 64 * 96), (64, 96), &Device::Cpu).unwrap();
        let c = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        assert!(QuantMatrix::from_qtensors(&[&a, &c]).is_none());
    }

    #[test]
    fn matches_dequantized_and_candle() {
        for dtype in FORMATS {
            for &(n, k) in &[(64, 64), (1536, 576), (576, 1536)] {
                let q = quantized(n, k, (n * 31 + k) as u64, dtype);
                let w = q.dequantize(&Device::Cpu).unwrap();
                let w: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
                let m = QuantMatrix::from_qtensors(&[&q]).unwrap();
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
                    let simd = simd_available();
                    assert_eq!(y, m.matmul_with(&x, rows, 0..n, simd, false));

                    // A column range is that slice of every row.
                    let cols = n / 4..n / 2 + 3;
                    let part = m.matmul(&x, rows, cols.clone());
                    for r in 0..rows {
                        let want = &y[r * n + cols.start..r * n + cols.end];
                        let got = &part[r * cols.len()..(r + 1) * cols.len()];
                        assert_eq!(got, want, "{dtype:?} columns {cols:?} row {r}");
                    }
                    // (b) candle's quantized matmul: same algorithm, except that candle
                    // repacks Q8_0 with k a multiple of 256 and quantizes x its own way.
                    if dtype == GgmlDType::Q8_0 && k % 256 == 0 {
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

    #[test]
    fn scalar_matches_simd() {
        if !simd_available() {
            eprintln!("no AVX2/FMA/F16C: SIMD kernel not tested");
            return;
        }
        for dtype in FORMATS {
            for &(n, k) in &[(64, 64), (67, 96), (96, 1536)] {
                let m = QuantMatrix::from_qtensors(&[&quantized(n, k, 99, dtype)]).unwrap();
                for rows in 1..=9 {
                    let x = lcg(rows as u64, rows * k);
                    let a = m.matmul_with(&x, rows, 0..n, true, false);
                    let b = m.matmul_with(&x, rows, 0..n, false, false);
                    let scale = rms(&b);
                    let err = max_abs_diff(&a, &b);
                    assert!(
                        err < 1e-5 * scale,
                        "{dtype:?} n={n} k={k} rows={rows}: {err}"
                    );
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
            let m = QuantMatrix::from_qtensors(&[&q]).unwrap();
            let qmm = QMatMul::from_qtensor(q).unwrap();
            let iters = (200_000_000 / (n * k)).max(5);
            for rows in [1usize, 2, 3, 8] {
                let x = lcg(rows as u64, rows * k);
                let xt = Tensor::from_vec(x.clone(), (rows, k), &Device::Cpu).unwrap();
                let simd = simd_available();
                let single = time(iters, || {
                    std::hint::black_box(m.matmul_with(&x, rows, 0..n, simd, false));
                });
                let pooled = time(iters, || {
                    std::hint::black_box(m.matmul_with(&x, rows, 0..n, simd, true));
                });
                let candle = time(iters.div_ceil(4), || {
                    std::hint::black_box(qmm.forward(&xt).unwrap());
                });
                println!(
                    "{dtype:?} {n}x{k} rows={rows}: 1 thread {single:.0} ns, pool {pooled:.0} ns, \
                     candle QMatMul {candle:.0} ns"
                );
            }
        }
    }
}

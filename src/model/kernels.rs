//! Hand-written CPU kernels for the decode hot path.
//!
//! [`Q41Matrix`] multiplies GGUF Q4_1 weights by a handful of f32 activation rows (one per
//! PLT loop during decode). candle's own Q4_1 dot product is scalar and walks the weights once
//! per row; here every weight block is read and unpacked once and then dotted with all rows,
//! so `rows = 2` costs much less than twice `rows = 1`.
//!
//! Numerics follow ggml/candle exactly: each activation row is quantized per 32-block to
//! Q8_1 (`d = amax / 127` rounded to f16, `q = round(x / d)`, `s = d * sum(q)` in f16), and a
//! block contributes `d4 * d8 * sum(q4 * q8) + m4 * s8`. Results therefore match
//! `QMatMul::forward` up to f32 summation order.

use candle_core::quantized::{GgmlDType, QTensor};

/// Elements per Q4_1 / Q8_1 block.
const QK: usize = 32;
/// Bytes per GGUF Q4_1 block: `d: f16, m: f16, qs: [u8; 16]`.
const BLOCK_BYTES: usize = 20;
/// Activation rows handled per pass over the weights (accumulators kept in registers).
const MAX_ROWS: usize = 8;
/// Below this much work (weights times activation rows, at most [`MAX_ROWS`]) a product runs
/// on the calling thread: spawning costs more than it saves. Measured with `bench_q41_matmul`
/// on 2 cores: a 1536x576 matrix loses ~15% with 2 threads at 1 row, gains ~8% at 2 rows and
/// ~20% at 3 rows; a 49152x576 one gains ~2x at every row count.
const PARALLEL_MIN_WORK: usize = 1 << 21;

/// Q4_1 weights `[n, k]` (k a multiple of 32) laid out as GGUF blocks, ready for multi-row
/// products.
pub(crate) struct Q41Matrix {
    n: usize,
    k: usize,
    /// `n * k / 32` GGUF Q4_1 blocks, row (output column) after row.
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

impl Q41Matrix {
    /// From a candle QTensor of dtype Q4_1; None if it is not Q4_1, not 2-D, or its row
    /// length is not a multiple of 32.
    pub(crate) fn from_qtensor(t: &QTensor) -> Option<Self> {
        if t.dtype() != GgmlDType::Q4_1 {
            return None;
        }
        let (n, k) = t.shape().dims2().ok()?;
        if k % QK != 0 {
            return None;
        }
        let data = t.data().ok()?;
        if data.len() != n * (k / QK) * BLOCK_BYTES {
            return None;
        }
        Some(Self {
            n,
            k,
            data: data.into_owned(),
        })
    }

    /// Output features (rows of the weight matrix).
    pub(crate) fn n(&self) -> usize {
        self.n
    }

    /// `y[r][j] = sum_i x[r][i] * w[j][i]`: `x` is `rows * k` f32 (row-major), returns
    /// `rows * n` f32 (row-major).
    pub(crate) fn matmul(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let parts = if self.n * self.k * rows.min(MAX_ROWS) >= PARALLEL_MIN_WORK {
            std::thread::available_parallelism().map_or(1, |p| p.get())
        } else {
            1
        };
        self.matmul_with(x, rows, simd_available(), parts)
    }

    /// [`Self::matmul`] with the kernel and the thread count chosen by the caller.
    fn matmul_with(&self, x: &[f32], rows: usize, simd: bool, parts: usize) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        assert_eq!(x.len(), rows * k, "Q41Matrix::matmul: x is not rows * k");
        let mut y = vec![0f32; rows * n];
        let mut r0 = 0;
        while r0 < rows {
            let g = (rows - r0).min(MAX_ROWS);
            let q8 = Q8Rows::quantize(&x[r0 * k..(r0 + g) * k], g, k);
            // Column-major `[n][g]`, so each thread owns one contiguous range of columns.
            let mut out = vec![0f32; n * g];
            let parts = parts.clamp(1, n.max(1));
            if parts == 1 {
                self.columns(&q8, 0, &mut out, simd);
            } else {
                let cols_per = n.div_ceil(parts);
                std::thread::scope(|scope| {
                    let mut chunks = out.chunks_mut(cols_per * g).enumerate();
                    let first = chunks.next();
                    for (i, chunk) in chunks {
                        let q8 = &q8;
                        scope.spawn(move || self.columns(q8, i * cols_per, chunk, simd));
                    }
                    if let Some((_, chunk)) = first {
                        self.columns(&q8, 0, chunk, simd);
                    }
                });
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
        let w = &self.data[j0 * kb * BLOCK_BYTES..(j0 + ncols) * kb * BLOCK_BYTES];
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: `simd` is only true when `simd_available()` found AVX2, FMA and F16C
            // on this CPU (the tests pass it after checking the same).
            unsafe { avx2::columns(w, kb, q8, out) };
            return;
        }
        let _ = simd;
        columns_scalar(w, kb, q8, out);
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
fn columns_scalar(w: &[u8], kb: usize, q8: &Q8Rows, out: &mut [f32]) {
    let rows = q8.rows;
    for (col, ws) in out
        .chunks_exact_mut(rows)
        .zip(w.chunks_exact(kb * BLOCK_BYTES))
    {
        let mut acc = [0f32; MAX_ROWS];
        for (b, blk) in ws.chunks_exact(BLOCK_BYTES).enumerate() {
            let d4 = f16_to_f32(u16::from_le_bytes([blk[0], blk[1]]));
            let m4 = f16_to_f32(u16::from_le_bytes([blk[2], blk[3]]));
            let qs = &blk[4..BLOCK_BYTES];
            for (r, a) in acc.iter_mut().enumerate().take(rows) {
                let i = b * rows + r;
                let y = &q8.qs[i * QK..(i + 1) * QK];
                let mut sumi = 0i32;
                for (t, &q) in qs.iter().enumerate() {
                    sumi += (q & 0x0F) as i32 * y[t] as i32 + (q >> 4) as i32 * y[t + 16] as i32;
                }
                *a += sumi as f32 * (d4 * q8.d[i]) + m4 * q8.s[b * MAX_ROWS + r];
            }
        }
        col.copy_from_slice(&acc[..rows]);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Q8Rows, BLOCK_BYTES, MAX_ROWS, QK};
    use std::arch::x86_64::*;

    /// AVX2 kernel for [`super::Q41Matrix::columns`].
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn columns(w: &[u8], kb: usize, q8: &Q8Rows, out: &mut [f32]) {
        // Columns per tile: with few rows, several columns give the FMA chains enough
        // independent work to hide their latency; with many rows the rows already do.
        match q8.rows {
            1 => tiled::<1, 4>(w, kb, q8, out),
            2 => tiled::<2, 4>(w, kb, q8, out),
            3 => tiled::<3, 2>(w, kb, q8, out),
            4 => tiled::<4, 2>(w, kb, q8, out),
            5 => tiled::<5, 1>(w, kb, q8, out),
            6 => tiled::<6, 1>(w, kb, q8, out),
            7 => tiled::<7, 1>(w, kb, q8, out),
            8 => tiled::<8, 1>(w, kb, q8, out),
            r => unreachable!("Q4_1 kernel called with {r} rows"),
        }
    }

    /// Tiles of `C` columns, then the leftover columns one at a time.
    #[target_feature(enable = "avx2,fma,f16c")]
    fn tiled<const R: usize, const C: usize>(w: &[u8], kb: usize, q8: &Q8Rows, out: &mut [f32]) {
        let full = out.len() / R / C * C;
        let (out_a, out_b) = out.split_at_mut(full * R);
        let (w_a, w_b) = w.split_at(full * kb * BLOCK_BYTES);
        columns_n::<R, C>(w_a, kb, q8, out_a);
        columns_n::<R, 1>(w_b, kb, q8, out_b);
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn columns_n<const R: usize, const C: usize>(
        w: &[u8],
        kb: usize,
        q8: &Q8Rows,
        out: &mut [f32],
    ) {
        debug_assert_eq!(q8.rows, R);
        let low_nibbles = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let qs8 = &q8.qs[..kb * R * QK];
        let d8 = &q8.d[..kb * R];
        let s8 = &q8.s[..kb * MAX_ROWS];
        let col_bytes = kb * BLOCK_BYTES;
        for (tile, ws) in out
            .chunks_exact_mut(R * C)
            .zip(w.chunks_exact(C * col_bytes))
        {
            let mut acc = [[_mm256_setzero_ps(); R]; C];
            // Lane r: sum over blocks of m4 * s8[r].
            let mut macc = [_mm256_setzero_ps(); C];
            for b in 0..kb {
                let ys = &qs8[b * R * QK..(b + 1) * R * QK];
                // The range is exactly MAX_ROWS long, so the conversion cannot fail.
                let s: &[f32; MAX_ROWS] = s8[b * MAX_ROWS..(b + 1) * MAX_ROWS].try_into().unwrap();
                // SAFETY: `s` is 8 f32s, exactly one unaligned 256-bit load.
                let s = unsafe { _mm256_loadu_ps(s.as_ptr()) };
                for c in 0..C {
                    let off = c * col_bytes + b * BLOCK_BYTES;
                    // The range is exactly BLOCK_BYTES long, so the conversion cannot fail.
                    let blk: &[u8; BLOCK_BYTES] = ws[off..off + BLOCK_BYTES].try_into().unwrap();
                    let dm = i32::from_le_bytes([blk[0], blk[1], blk[2], blk[3]]);
                    let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(dm));
                    let d4 = _mm256_broadcastss_ps(dm);
                    let m4 = _mm256_broadcastss_ps(_mm_movehdup_ps(dm));
                    macc[c] = _mm256_fmadd_ps(m4, s, macc[c]);
                    // SAFETY: `blk` is 20 bytes, so bytes 4..20 are in bounds for a 16-byte
                    // unaligned load.
                    let q = unsafe { _mm_loadu_si128(blk.as_ptr().add(4).cast()) };
                    // Elements 0..16 are the low nibbles, 16..32 the high ones.
                    let nib =
                        _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), low_nibbles);
                    for r in 0..R {
                        let y = &ys[r * QK..(r + 1) * QK];
                        // SAFETY: `y` is 32 bytes, exactly one unaligned 256-bit load.
                        let y = unsafe { _mm256_loadu_si256(y.as_ptr().cast()) };
                        // u4 * i8 pairs fit i16 (at most 2 * 15 * 128): no saturation.
                        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(nib, y), ones);
                        let scale = _mm256_mul_ps(d4, _mm256_set1_ps(d8[b * R + r]));
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
mod tests {
    use super::*;
    use candle_core::quantized::QMatMul;
    use candle_core::{Device, Module, Tensor};

    /// Deterministic values in [-1, 1).
    fn lcg(seed: u64, len: usize) -> Vec<f32> {
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

    fn quantized(n: usize, k: usize, seed: u64) -> QTensor {
        let w = Tensor::from_vec(lcg(seed, n * k), (n, k), &Device::Cpu).unwrap();
        QTensor::quantize(&w, GgmlDType::Q4_1).unwrap()
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
    fn rejects_non_q4_1() {
        let w = Tensor::from_vec(lcg(1, 64 * 64), (64, 64), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        assert!(Q41Matrix::from_qtensor(&q).is_none());
        let q = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        let m = Q41Matrix::from_qtensor(&q).unwrap();
        assert_eq!((m.n(), m.k), (64, 64));
    }

    #[test]
    fn matches_dequantized_and_candle() {
        for &(n, k) in &[(64, 64), (1536, 576), (576, 1536)] {
            let q = quantized(n, k, (n * 31 + k) as u64);
            let w = q.dequantize(&Device::Cpu).unwrap();
            let w: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
            let m = Q41Matrix::from_qtensor(&q).unwrap();
            let qmm = QMatMul::from_qtensor(quantized(n, k, (n * 31 + k) as u64)).unwrap();
            for &rows in &[1usize, 2, 3, 8, 11] {
                let x = lcg(rows as u64 * 7 + 3, rows * k);
                let y = m.matmul(&x, rows);
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
                    "n={n} k={k} rows={rows}: err {err} vs rms {scale}"
                );

                // (b) candle's Q4_1 x Q8_1 matmul: same algorithm.
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
                    "vs candle n={n} k={k} rows={rows}: err {err} vs rms {scale}"
                );

                // Threaded split gives the same numbers.
                let yt = m.matmul_with(&x, rows, simd_available(), 3);
                assert_eq!(yt, m.matmul_with(&x, rows, simd_available(), 1));
            }
        }
    }

    #[test]
    fn scalar_matches_simd() {
        if !simd_available() {
            eprintln!("no AVX2/FMA/F16C: SIMD kernel not tested");
            return;
        }
        for &(n, k) in &[(64, 64), (67, 96), (96, 1536)] {
            let m = Q41Matrix::from_qtensor(&quantized(n, k, 99)).unwrap();
            for rows in 1..=9 {
                let x = lcg(rows as u64, rows * k);
                let a = m.matmul_with(&x, rows, true, 1);
                let b = m.matmul_with(&x, rows, false, 1);
                let scale = rms(&b);
                let err = max_abs_diff(&a, &b);
                assert!(err < 1e-5 * scale, "n={n} k={k} rows={rows}: {err}");
            }
        }
    }

    /// `cargo test --release --lib kernels -- --ignored --nocapture`
    #[test]
    #[ignore = "benchmark"]
    fn bench_q41_matmul() {
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
        for &(n, k) in &[(1536, 576), (576, 1536), (49152, 576)] {
            let q = quantized(n, k, 5);
            let m = Q41Matrix::from_qtensor(&q).unwrap();
            let qmm = QMatMul::from_qtensor(q).unwrap();
            let iters = (200_000_000 / (n * k)).max(5);
            let threads = std::thread::available_parallelism().map_or(1, |p| p.get());
            for rows in [1usize, 2, 3, 4, 8] {
                let x = lcg(rows as u64, rows * k);
                let xt = Tensor::from_vec(x.clone(), (rows, k), &Device::Cpu).unwrap();
                let single = time(iters, || {
                    std::hint::black_box(m.matmul_with(&x, rows, simd_available(), 1));
                });
                let threaded = time(iters, || {
                    std::hint::black_box(m.matmul_with(&x, rows, simd_available(), threads));
                });
                let scalar = time(iters.div_ceil(4), || {
                    std::hint::black_box(m.matmul_with(&x, rows, false, 1));
                });
                let candle = time(iters.div_ceil(4), || {
                    std::hint::black_box(qmm.forward(&xt).unwrap());
                });
                println!(
                    "{n}x{k} rows={rows}: simd 1 thread {:.0} ns, {threads} threads {:.0} ns, \
                     scalar {:.0} ns, candle QMatMul {:.0} ns",
                    single, threaded, scalar, candle
                );
            }
        }
    }
}

//! Perplexity scoring: through the prefill path, through the decode path one token at a
//! time, and the two compared position by position (what a decode kernel costs in accuracy).

use crate::model::{CpuKernels, Logits, ModelError, PltModel, Result};

/// Perplexity figures of a sequence.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Score {
    /// Tokens in the sequence.
    pub tokens: usize,
    /// Tokens scored (all but the first).
    pub scored: usize,
    /// Mean negative log-likelihood of ids[1..] given their prefix.
    pub nll: f64,
}

/// Scores `ids` with a fresh cache at `loops` loops, through the prefill path.
pub fn score(model: &PltModel, ids: &[u32], loops: usize) -> Result<Score> {
    let rows = prefill_logits(model, ids, loops)?;
    let total: f64 = (0..ids.len() - 1)
        .map(|t| {
            let row: Vec<f32> = rows.get(t)?.to_vec1()?;
            Ok(-log_softmax(&row)[ids[t + 1] as usize])
        })
        .sum::<Result<f64>>()?;
    Ok(Score {
        tokens: ids.len(),
        scored: ids.len() - 1,
        nll: total / (ids.len() - 1) as f64,
    })
}

/// The prefill path's logits `[len - 1, vocab]` of every position of `ids` but the last.
fn prefill_logits(model: &PltModel, ids: &[u32], loops: usize) -> Result<candle_core::Tensor> {
    if ids.len() < 2 {
        return Err(ModelError::TooFewTokens(ids.len()));
    }
    let mut cache = model.new_cache(loops)?;
    model
        .prefill(&mut cache, &ids[..ids.len() - 1], Logits::All)?
        .ok_or(ModelError::EmptyInput)
}

/// Log-softmax of a row in f64 (the oracle's tolerance on nll is 1e-4).
fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let log_sum = row
        .iter()
        .map(|&x| (x as f64 - max).exp())
        .sum::<f64>()
        .ln()
        + max;
    row.iter().map(|&x| x as f64 - log_sum).collect()
}

/// Tokens below this probability in both paths are left out of
/// [`Comparison::max_logprob_error`]: far in the tail, log-probabilities carry no signal.
pub const LOGPROB_ERROR_FLOOR: f64 = 1e-3;

/// The decode path against the prefill path over the same ids.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Comparison {
    /// The prefill path's mean negative log-likelihood.
    pub nll_prefill: f64,
    /// Mean over positions of KL(prefill || decode), over the full vocabulary.
    pub kl_mean: f64,
    /// The 99th percentile of the positions' KL.
    pub kl_p99: f64,
    /// The largest position's KL.
    pub kl_max: f64,
    /// Fraction of positions whose most likely token is the same in both paths.
    pub top1_agreement: f64,
    /// Largest |log p_prefill - log p_decode| of a token either path gives at least
    /// [`LOGPROB_ERROR_FLOOR`].
    pub max_logprob_error: f64,
    /// Index in the sequence of the token whose prediction has the largest KL.
    pub worst_position: usize,
}

/// [`score`] through the decode path, and with `compare` its [`Comparison`] with the
/// prefill path.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IncrementalScore {
    /// The decode path's figures.
    pub score: Score,
    /// How the decode step ran (`candle` where there is no fused CPU step).
    pub kernels: CpuKernels,
    /// Against the prefill path, when asked for.
    pub comparison: Option<Comparison>,
}

/// Scores `ids` at `loops` loops through the decode path: a prefill of the first token,
/// then one decode step per token; with `compare`, also through the prefill path, and the
/// two compared position by position.
pub fn score_incremental(
    model: &PltModel,
    ids: &[u32],
    loops: usize,
    compare: bool,
) -> Result<IncrementalScore> {
    if ids.len() < 2 {
        return Err(ModelError::TooFewTokens(ids.len()));
    }
    let reference = compare
        .then(|| prefill_logits(model, ids, loops))
        .transpose()?;
    let mut cache = model.new_cache(loops)?;
    let mut logits = model
        .prefill(&mut cache, &ids[..1], Logits::Last)?
        .ok_or(ModelError::EmptyInput)?;
    let scored = ids.len() - 1;
    let (mut nll, mut nll_prefill, mut agree, mut max_err) = (0f64, 0f64, 0usize, 0f64);
    let mut kls = Vec::with_capacity(if compare { scored } else { 0 });
    for t in 0..scored {
        if t > 0 {
            logits = model.decode(&mut cache, ids[t])?;
        }
        let target = ids[t + 1] as usize;
        let got = log_softmax(&logits.to_vec1::<f32>()?);
        nll -= got[target];
        let Some(reference) = &reference else {
            continue;
        };
        let want = log_softmax(&reference.get(t)?.to_vec1::<f32>()?);
        nll_prefill -= want[target];
        let mut kl = 0f64;
        for (&w, &g) in want.iter().zip(&got) {
            let p = w.exp();
            kl += p * (w - g);
            if p.max(g.exp()) >= LOGPROB_ERROR_FLOOR {
                max_err = max_err.max((w - g).abs());
            }
        }
        kls.push(kl.max(0.0));
        agree += usize::from(argmax(&want) == argmax(&got));
    }
    let score = Score {
        tokens: ids.len(),
        scored,
        nll: nll / scored as f64,
    };
    let comparison = reference.map(|_| {
        let (worst, &kl_max) = kls
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap_or((0, &0.0));
        let mut sorted = kls.clone();
        sorted.sort_by(f64::total_cmp);
        // The nearest-rank percentile.
        let p99 = sorted[((0.99 * scored as f64).ceil() as usize).clamp(1, scored) - 1];
        Comparison {
            nll_prefill: nll_prefill / scored as f64,
            kl_mean: kls.iter().sum::<f64>() / scored as f64,
            kl_p99: p99,
            kl_max,
            top1_agreement: agree as f64 / scored as f64,
            max_logprob_error: max_err,
            worst_position: worst + 1,
        }
    });
    Ok(IncrementalScore {
        score,
        kernels: model.decode_kernels(),
        comparison,
    })
}

fn argmax(row: &[f64]) -> usize {
    row.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i)
}

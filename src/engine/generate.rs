//! The generation loop (prefill, sample, decode until a stop) and perplexity scoring.

use std::time::Instant;

use crate::model::{Logits, ModelError, PltCache, PltModel, Result, Sampler};

use super::metrics::GenerationMetrics;

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The model produced a stop token.
    Eos,
    /// `max_tokens` were generated.
    MaxTokens,
    /// The caller cancelled.
    Cancelled,
}

impl StopReason {
    /// The name used in JSON output.
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::Eos => "eos",
            StopReason::MaxTokens => "max_tokens",
            StopReason::Cancelled => "cancelled",
        }
    }
}

/// What to generate from.
pub struct GenerateRequest<'a> {
    /// The whole sequence so far; its cached prefix is reused.
    pub prompt: &'a [u32],
    /// Most tokens to produce.
    pub max_tokens: usize,
    /// Ids that end generation; they are not part of the output.
    pub stop_ids: &'a [u32],
}

/// The result of a generation.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Generated ids, without the stop token.
    pub ids: Vec<u32>,
    /// Why it ended.
    pub stop_reason: StopReason,
    /// Its timings.
    pub metrics: GenerationMetrics,
}

/// What the caller wants after a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepControl {
    /// Go on.
    Continue,
    /// Stop here (cancelled).
    Stop,
    /// Go on with this many loops from the next decode step.
    SetLoops(usize),
}

/// Sees a generation as it happens.
pub trait GenerationObserver {
    /// `done` of `total` prompt positions computed.
    fn prefill_progress(&mut self, _done: usize, _total: usize) {}
    /// A token was generated; the answer says how to go on.
    fn token(&mut self, id: u32) -> StepControl;
}

impl<F: FnMut(u32) -> StepControl> GenerationObserver for F {
    fn token(&mut self, id: u32) -> StepControl {
        self(id)
    }
}

/// Continues `request.prompt` in `cache`, reporting to `observer`.
pub fn generate(
    model: &PltModel,
    cache: &mut PltCache,
    sampler: &mut Sampler,
    request: &GenerateRequest<'_>,
    observer: &mut dyn GenerationObserver,
) -> Result<Generation> {
    let started = Instant::now();
    let (mut logits, reused) =
        model.prefill_reusing(cache, request.prompt, &mut |done, total| {
            observer.prefill_progress(done, total)
        })?;
    let mut metrics = GenerationMetrics {
        prefill_tokens: request.prompt.len() - reused,
        reused_tokens: reused,
        prefill: started.elapsed(),
        ..GenerationMetrics::default()
    };
    let mut history = request.prompt.to_vec();
    let mut ids = Vec::new();
    let mut step_started = Instant::now();
    let stop_reason = loop {
        if ids.len() == request.max_tokens {
            break StopReason::MaxTokens;
        }
        let next = sampler.sample_tensor(&logits, &history)?;
        if ids.is_empty() {
            metrics.time_to_first_token = started.elapsed();
        } else {
            metrics.token_latencies.push(step_started.elapsed());
        }
        if request.stop_ids.contains(&next) {
            break StopReason::Eos;
        }
        ids.push(next);
        history.push(next);
        match observer.token(next) {
            StepControl::Continue => {}
            StepControl::Stop => break StopReason::Cancelled,
            StepControl::SetLoops(loops) => model.set_loops(cache, loops)?,
        }
        if ids.len() == request.max_tokens {
            break StopReason::MaxTokens;
        }
        step_started = Instant::now();
        logits = model.decode(cache, next)?;
    };
    Ok(Generation {
        ids,
        stop_reason,
        metrics,
    })
}

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

/// Scores `ids` with a fresh cache at `loops` loops.
pub fn score(model: &PltModel, ids: &[u32], loops: usize) -> Result<Score> {
    if ids.len() < 2 {
        return Err(ModelError::TooFewTokens(ids.len()));
    }
    let mut cache = model.new_cache(loops)?;
    let logits = model
        .prefill(&mut cache, &ids[..ids.len() - 1], Logits::All)?
        .ok_or(ModelError::EmptyInput)?;
    let rows: Vec<Vec<f32>> = logits.to_vec2()?;
    let total: f64 = rows
        .iter()
        .zip(&ids[1..])
        .map(|(row, &target)| {
            // log-softmax in f64: the oracle's tolerance on nll is 1e-4.
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
            let log_sum = row
                .iter()
                .map(|&x| (x as f64 - max).exp())
                .sum::<f64>()
                .ln()
                + max;
            log_sum - row[target as usize] as f64
        })
        .sum();
    let scored = ids.len() - 1;
    Ok(Score {
        tokens: ids.len(),
        scored,
        nll: total / scored as f64,
    })
}

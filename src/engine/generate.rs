//! The generation loop: prefill, sample, decode until a stop.

use std::time::Instant;

use crate::model::{PltCache, PltModel, Result, Sampler};

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

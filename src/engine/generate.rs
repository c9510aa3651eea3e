//! The generation loop: prefill, sample, decode until a stop.

use std::time::Instant;

use candle_core::Tensor;

use crate::model::{Logits, ModelError, PltCache, PltModel, Result, Sampler, PREFILL_CHUNK};

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

/// One sequence being answered, step by step, so that a scheduler can interleave many:
/// its prompt computed chunk by chunk, then a token sampled from each step's logits. The
/// caller runs the decode steps ([`PltModel::decode_batch`] for several at once) and gives
/// back their logits; the cache travels beside it.
pub struct Sequence {
    /// The prompt, then the tokens generated (the sampler's penalties read it all).
    history: Vec<u32>,
    prompt_len: usize,
    /// Prompt positions in the cache so far (reused or computed).
    computed: usize,
    max_tokens: usize,
    stop_ids: Vec<u32>,
    /// The logits the next token is sampled from, once computed.
    logits: Option<Tensor>,
    /// The sampled token whose decode step is due.
    pending: Option<u32>,
    stop_reason: Option<StopReason>,
    metrics: GenerationMetrics,
    started: Instant,
    step_started: Instant,
}

impl Sequence {
    /// Starts answering `request` in `cache`: the cache is cut back to the prefix it shares
    /// with the prompt (whose ids are checked), the rest is left to [`Self::prefill_chunk`].
    pub fn start(
        model: &PltModel,
        cache: &mut PltCache,
        request: &GenerateRequest<'_>,
    ) -> Result<Self> {
        let started = Instant::now();
        let reused = model.reuse_prefix(cache, request.prompt)?;
        Ok(Self {
            history: request.prompt.to_vec(),
            prompt_len: request.prompt.len(),
            computed: reused,
            max_tokens: request.max_tokens,
            stop_ids: request.stop_ids.to_vec(),
            logits: None,
            pending: None,
            stop_reason: None,
            metrics: GenerationMetrics {
                prefill_tokens: request.prompt.len() - reused,
                reused_tokens: reused,
                ..GenerationMetrics::default()
            },
            started,
            step_started: started,
        })
    }

    /// Whether prompt positions are still to compute.
    pub fn is_prefilling(&self) -> bool {
        self.computed < self.prompt_len
    }

    /// Tokens generated so far.
    fn generated(&self) -> usize {
        self.history.len() - self.prompt_len
    }

    /// Computes up to `rows` more prompt positions; returns (computed, to compute) of the
    /// positions not reused. After the last chunk the first token can be sampled.
    pub fn prefill_chunk(
        &mut self,
        model: &PltModel,
        cache: &mut PltCache,
        rows: usize,
    ) -> Result<(usize, usize)> {
        let end = self.prompt_len.min(self.computed + rows.max(1));
        let logits = model.prefill(cache, &self.history[self.computed..end], Logits::Last)?;
        self.computed = end;
        if !self.is_prefilling() {
            self.logits = Some(logits.ok_or(ModelError::EmptyInput)?);
            self.metrics.prefill = self.started.elapsed();
        }
        let reused = self.metrics.reused_tokens;
        Ok((self.computed - reused, self.prompt_len - reused))
    }

    /// Samples the next token with `sampler` once logits are ready: `Some(id)` for a token
    /// of the answer (the caller streams it), `None` when there is nothing to sample or the
    /// answer ended.
    pub fn sample(&mut self, sampler: &mut Sampler) -> Result<Option<u32>> {
        if self.stop_reason.is_some() {
            return Ok(None);
        }
        if self.generated() == self.max_tokens {
            self.stop_reason = Some(StopReason::MaxTokens);
            return Ok(None);
        }
        let Some(logits) = self.logits.take() else {
            return Ok(None);
        };
        let next = sampler.sample_tensor(&logits, &self.history)?;
        if self.generated() == 0 {
            self.metrics.time_to_first_token = self.started.elapsed();
        } else {
            self.metrics
                .token_latencies
                .push(self.step_started.elapsed());
        }
        if self.stop_ids.contains(&next) {
            self.stop_reason = Some(StopReason::Eos);
            return Ok(None);
        }
        self.history.push(next);
        if self.generated() == self.max_tokens {
            self.stop_reason = Some(StopReason::MaxTokens);
        } else {
            self.pending = Some(next);
        }
        Ok(Some(next))
    }

    /// The token whose decode step is due, if any; the step's clock starts here.
    pub fn due(&mut self) -> Option<u32> {
        if self.pending.is_some() {
            self.step_started = Instant::now();
        }
        self.pending
    }

    /// The logits of the decode step of [`Self::due`]'s token.
    pub fn stepped(&mut self, logits: Tensor) {
        self.pending = None;
        self.logits = Some(logits);
    }

    /// Stops the answer here (the caller cancelled).
    pub fn cancel(&mut self) {
        self.pending = None;
        self.logits = None;
        self.stop_reason = Some(StopReason::Cancelled);
    }

    /// Prompt positions served from the cache.
    pub fn reused_tokens(&self) -> usize {
        self.metrics.reused_tokens
    }

    /// Why the answer ended, once it has.
    pub fn stop_reason(&self) -> Option<StopReason> {
        self.stop_reason
    }

    /// The answer so far and its timings.
    pub fn finish(mut self) -> Generation {
        Generation {
            ids: self.history.split_off(self.prompt_len),
            stop_reason: self.stop_reason.unwrap_or(StopReason::Cancelled),
            metrics: self.metrics,
        }
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
    let mut sequence = Sequence::start(model, cache, request)?;
    while sequence.is_prefilling() {
        let (done, total) = sequence.prefill_chunk(model, cache, PREFILL_CHUNK)?;
        observer.prefill_progress(done, total);
    }
    while let Some(token) = sequence.sample(sampler)? {
        match observer.token(token) {
            StepControl::Continue => {}
            StepControl::Stop => sequence.cancel(),
            StepControl::SetLoops(loops) => model.set_loops(cache, loops)?,
        }
        let Some(next) = sequence.due() else { break };
        sequence.stepped(model.decode(cache, next)?);
    }
    Ok(sequence.finish())
}

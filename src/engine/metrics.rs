//! Latency figures of one generation.

use std::time::Duration;

/// Timings of one generation: prefill, first token, and each decode step.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationMetrics {
    /// Prompt positions computed (not served from the cache).
    pub prefill_tokens: usize,
    /// Prompt positions served from the kept cache.
    pub reused_tokens: usize,
    /// Time spent computing the prompt.
    pub prefill: Duration,
    /// Time from the request to the first sampled token.
    pub time_to_first_token: Duration,
    /// Latency of each decode step, in order.
    pub token_latencies: Vec<Duration>,
}

impl GenerationMetrics {
    /// Prompt tokens computed per second (0 when none were).
    pub fn prefill_tokens_per_second(&self) -> f64 {
        per_second(self.prefill_tokens, self.prefill)
    }

    /// Decode steps per second (0 before the first step).
    pub fn decode_tokens_per_second(&self) -> f64 {
        per_second(
            self.token_latencies.len(),
            self.token_latencies.iter().sum(),
        )
    }
}

fn per_second(count: usize, elapsed: Duration) -> f64 {
    if count == 0 || elapsed.is_zero() {
        0.0
    } else {
        count as f64 / elapsed.as_secs_f64()
    }
}

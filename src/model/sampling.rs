//! Choosing the next token from logits: greedy or seeded sampling with the usual filters.

use candle_core::{Tensor, D};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::error::Result;

/// How to pick tokens; the defaults are greedy decoding.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f64,
    /// Keep the k most likely tokens (0: off).
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches p (1.0: off).
    pub top_p: f64,
    /// Drop tokens below min_p times the top probability (0.0: off).
    pub min_p: f64,
    /// Penalise tokens already in the sequence (1.0: off), as HF and llama.cpp do.
    pub repetition_penalty: f64,
    /// Seed of the random generator; the same seed gives the same tokens.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

/// A seeded sampler; order: repetition penalty, temperature, top-k, top-p, min-p (as HF).
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    /// A sampler seeded from `params.seed`.
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Self { params, rng }
    }

    /// The settings this sampler uses.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from a `[vocab]` logits tensor on any device.
    ///
    /// Greedy decoding off the CPU takes the argmax on the device, so a decode step sends
    /// only the token id back to the host. Every other setting (a temperature, a repetition
    /// penalty) copies the row of f32 logits to the host, 4 * vocab bytes per token, and
    /// samples there; so does the CPU, where that costs nothing.
    pub fn sample_tensor(&mut self, logits: &Tensor, history: &[u32]) -> Result<u32> {
        let p = &self.params;
        if !logits.device().is_cpu() && p.temperature <= 0.0 && p.repetition_penalty == 1.0 {
            return Ok(logits.argmax(D::Minus1)?.to_scalar::<u32>()?);
        }
        Ok(self.sample(&logits.to_vec1::<f32>()?, history))
    }

    /// Picks the next token from `logits`, given the tokens of the sequence so far.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let p = &self.params;
        let mut scores: Vec<f64> = logits.iter().map(|&l| l as f64).collect();
        if p.repetition_penalty != 1.0 {
            let mut seen = vec![false; scores.len()];
            for &id in history {
                if let Some(s) = seen.get_mut(id as usize) {
                    *s = true;
                }
            }
            for (score, _) in scores.iter_mut().zip(&seen).filter(|(_, &s)| s) {
                *score = if *score > 0.0 {
                    *score / p.repetition_penalty
                } else {
                    *score * p.repetition_penalty
                };
            }
        }
        if p.temperature <= 0.0 {
            return argmax(&scores);
        }
        // Candidates sorted by score, best first; ties keep the lower id first.
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
        if p.top_k > 0 {
            order.truncate(p.top_k);
        }
        let top = scores[order[0]] / p.temperature;
        let mut probs: Vec<f64> = order
            .iter()
            .map(|&i| (scores[i] / p.temperature - top).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
        if p.top_p < 1.0 {
            let mut cumulative = 0.0;
            let keep = probs
                .iter()
                .position(|&q| {
                    cumulative += q;
                    cumulative >= p.top_p
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
        }
        if p.min_p > 0.0 {
            let floor = probs[0] * p.min_p;
            let keep = probs.iter().take_while(|&&q| q >= floor).count();
            probs.truncate(keep.max(1));
        }
        let total: f64 = probs.iter().sum();
        let mut draw = self.rng.random::<f64>() * total;
        for (q, &id) in probs.iter().zip(&order) {
            draw -= q;
            if draw <= 0.0 {
                return id as u32;
            }
        }
        order[probs.len() - 1] as u32
    }
}

/// Index of the largest score; the first one on ties.
fn argmax(scores: &[f64]) -> u32 {
    let mut best = 0;
    for (i, s) in scores.iter().enumerate() {
        if *s > scores[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f64) -> SamplingParams {
        SamplingParams {
            temperature,
            seed: 7,
            ..SamplingParams::default()
        }
    }

    #[test]
    fn greedy_takes_the_argmax() {
        let mut s = Sampler::new(params(0.0));
        assert_eq!(s.sample(&[0.1, 3.0, 2.0], &[]), 1);
    }

    #[test]
    fn repetition_penalty_can_change_the_choice() {
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            ..params(0.0)
        });
        assert_eq!(s.sample(&[0.1, 3.0, 2.0], &[1]), 2);
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = || {
            let mut s = Sampler::new(params(1.0));
            (0..20).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        let a = run();
        assert_eq!(a, run());
        assert!(
            a.iter().any(|&t| t != a[0]),
            "sampling at temperature 1 should vary"
        );
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() {
        let logits = [0.5, 2.5, 2.4, -1.0];
        let mut k = Sampler::new(SamplingParams {
            top_k: 1,
            ..params(1.0)
        });
        let mut p = Sampler::new(SamplingParams {
            top_p: 1e-9,
            ..params(1.0)
        });
        let mut m = Sampler::new(SamplingParams {
            min_p: 0.99,
            ..params(1.0)
        });
        for _ in 0..10 {
            assert_eq!(k.sample(&logits, &[]), 1);
            assert_eq!(p.sample(&logits, &[]), 1);
            assert_eq!(m.sample(&logits, &[]), 1);
        }
    }
}

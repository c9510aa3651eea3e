//! `plait bench`: prefill and decode speed per loop count, and the kept cache's payoff.

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};

use crate::model::{
    Logits, ModelError, Placement, PltConfig, PltModel, Result, Sampler, SamplingParams,
};

/// The released LoopCoder-V2 checkpoint's config.json (from the model contract).
const LOOPCODER_V2_CONFIG: &str = include_str!("../../assets/loopcoder-v2-config.json");

/// A model with random weights on the placement's device, for speed figures of a checkpoint
/// one does not have: `config` is a config.json path, or `loopcoder-v2` for the released one.
pub fn synthetic_model(config: &str, placement: &Placement) -> Result<PltModel> {
    let config = if config == "loopcoder-v2" {
        PltConfig::from_json(LOOPCODER_V2_CONFIG, std::path::Path::new("loopcoder-v2"))?
    } else {
        PltConfig::from_file(std::path::Path::new(config))?
    };
    PltModel::synthetic(config, placement)
}

/// Figures for one loop count.
#[derive(Debug, Clone, PartialEq)]
pub struct LoopBench {
    /// Loop count.
    pub loops: usize,
    /// Prompt length.
    pub prompt_tokens: usize,
    /// Tokens decoded.
    pub gen_tokens: usize,
    /// Prompt tokens per second.
    pub prefill_tok_s: f64,
    /// Decode steps per second.
    pub decode_tok_s: f64,
    /// Prefill plus the first sample.
    pub ttft_ms: f64,
    /// Median decode step.
    pub token_ms_p50: f64,
    /// 90th percentile decode step.
    pub token_ms_p90: f64,
    /// Cache size after the run.
    pub kv_bytes: usize,
}

/// Time to first token of a follow-up turn, with and without the kept cache.
#[derive(Debug, Clone, PartialEq)]
pub struct FollowupBench {
    /// Conversation length before the follow-up.
    pub context_tokens: usize,
    /// Tokens the follow-up adds.
    pub new_tokens: usize,
    /// TTFT when the conversation's cache is kept.
    pub ttft_cached_ms: f64,
    /// TTFT when the whole conversation is computed again.
    pub ttft_uncached_ms: f64,
}

/// Deterministic prompt ids spread over the vocabulary (the content does not change speed).
pub fn bench_ids(count: usize, vocab_size: usize, salt: usize) -> Vec<u32> {
    (0..count)
        .map(|i| ((i + salt).wrapping_mul(2_654_435_761) % vocab_size) as u32)
        .collect()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((sorted.len() - 1) as f64 * p).round() as usize;
    ms(sorted[rank])
}

/// Prefill `prompt_tokens`, then decode `gen_tokens` greedily, at `loops` loops.
pub fn bench_loops(
    model: &PltModel,
    loops: usize,
    prompt_tokens: usize,
    gen_tokens: usize,
) -> Result<LoopBench> {
    if prompt_tokens == 0 {
        return Err(ModelError::EmptyInput);
    }
    let vocab = model.config().vocab_size;
    let prompt = bench_ids(prompt_tokens, vocab, 0);
    // Warm up: first-touch of weights and thread pools is not part of the figures.
    let mut warm = model.new_cache(loops)?;
    model.prefill(&mut warm, &prompt[..prompt.len().min(8)], Logits::None)?;
    for &id in &prompt[..prompt.len().min(4)] {
        model.decode(&mut warm, id)?;
    }
    drop(warm);

    let mut sampler = Sampler::new(SamplingParams::default());
    let mut cache = model.new_cache(loops)?;
    let started = Instant::now();
    let logits = model
        .prefill(&mut cache, &prompt, Logits::Last)?
        .ok_or(ModelError::EmptyInput)?;
    // A GPU runs the queued work after prefill returns; wait for it (a no-op on the CPU).
    model.device().synchronize()?;
    let prefill = started.elapsed();
    let mut next = sampler.sample_tensor(&logits, &[])?;
    let ttft = started.elapsed();
    let mut steps = Vec::with_capacity(gen_tokens);
    for _ in 0..gen_tokens {
        let step = Instant::now();
        let logits = model.decode(&mut cache, next)?;
        next = sampler.sample_tensor(&logits, &[])?;
        steps.push(step.elapsed());
    }
    let decode_total: Duration = steps.iter().sum();
    steps.sort();
    Ok(LoopBench {
        loops,
        prompt_tokens,
        gen_tokens,
        prefill_tok_s: prompt_tokens as f64 / prefill.as_secs_f64(),
        decode_tok_s: if decode_total.is_zero() {
            0.0
        } else {
            gen_tokens as f64 / decode_total.as_secs_f64()
        },
        ttft_ms: ms(ttft),
        token_ms_p50: percentile(&steps, 0.5),
        token_ms_p90: percentile(&steps, 0.9),
        kv_bytes: cache.size_bytes(),
    })
}

/// TTFT of a `new_tokens` follow-up after a `context_tokens` conversation, kept cache vs cold.
pub fn bench_followup(
    model: &PltModel,
    loops: usize,
    context_tokens: usize,
    new_tokens: usize,
) -> Result<FollowupBench> {
    let vocab = model.config().vocab_size;
    let context = bench_ids(context_tokens, vocab, 0);
    let whole: Vec<u32> = context
        .iter()
        .copied()
        .chain(bench_ids(new_tokens, vocab, context_tokens))
        .collect();
    let mut sampler = Sampler::new(SamplingParams::default());
    let mut time_to_first = |cache: &mut crate::model::PltCache| -> Result<f64> {
        let started = Instant::now();
        let (logits, _) = model.prefill_reusing(cache, &whole, &mut |_, _| {})?;
        sampler.sample_tensor(&logits, &[])?;
        Ok(ms(started.elapsed()))
    };
    let mut kept = model.new_cache(loops)?;
    model.prefill(&mut kept, &context, Logits::None)?;
    let ttft_cached_ms = time_to_first(&mut kept)?;
    let ttft_uncached_ms = time_to_first(&mut model.new_cache(loops)?)?;
    Ok(FollowupBench {
        context_tokens,
        new_tokens,
        ttft_cached_ms,
        ttft_uncached_ms,
    })
}

/// Device-to-device copy bandwidth in GB/s (bytes read plus bytes written per second, best
/// of `repeats` copies of a `bytes` buffer): the memory ceiling a decode step is held to.
pub fn copy_bandwidth(device: &Device, bytes: usize, repeats: usize) -> Result<f64> {
    let source = Tensor::zeros(bytes, DType::U8, device)?;
    let mut best = f64::INFINITY;
    for _ in 0..repeats.max(1) + 1 {
        device.synchronize()?;
        let started = Instant::now();
        let copy = source.copy()?;
        device.synchronize()?;
        best = best.min(started.elapsed().as_secs_f64());
        drop(copy);
    }
    Ok(2.0 * bytes as f64 / best / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loopcoder_v2_config_has_the_contracts_shape() {
        let c = PltConfig::from_json(LOOPCODER_V2_CONFIG, std::path::Path::new("x")).unwrap();
        assert_eq!((c.num_hidden_layers, c.hidden_size), (14, 5120));
        assert_eq!((c.plt_num_loops, c.plt_window), (2, 64));
        assert!(c.plt_gate_use_hidden_states && c.plt_normalize_per_loop);
    }

    #[test]
    fn a_synthetic_model_runs_and_counts_its_bytes() {
        let config = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/plt-tiny-2loop/config.json"
        );
        let model = synthetic_model(config, &Placement::new(Device::Cpu, None)).unwrap();
        let result = bench_loops(&model, 2, 8, 4).unwrap();
        assert_eq!(result.gen_tokens, 4);
        let c = model.config();
        // f32: more than the layers' matrices, less than all weights plus the embedding.
        let floor = 4 * c.num_hidden_layers * 3 * c.hidden_size * c.intermediate_size;
        let bytes = model.decode_weight_bytes() as usize;
        assert!(
            bytes > floor && bytes < 4 * model.parameter_count() as usize,
            "{bytes}"
        );
        assert!(copy_bandwidth(&Device::Cpu, 1 << 20, 2).unwrap() > 0.0);
    }
}

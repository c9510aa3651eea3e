//! `plait bench`: prefill and decode speed per loop count, and the kept cache's payoff.

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};

use super::{ChatMessage, Engine, EngineOptions, Event, GenerateJob, Prompt, Request};
use crate::model::{
    DeviceSpec, LoadedModel, Logits, ModelError, Placement, PltCache, PltConfig, PltModel, Quant,
    Result, Sampler, SamplingParams, TextTokenizer,
};

/// The released LoopCoder-V2 checkpoint's config.json (from the model contract).
const LOOPCODER_V2_CONFIG: &str = include_str!("../../assets/loopcoder-v2-config.json");

/// A model with random weights on the placement's device, for speed figures of a checkpoint
/// one does not have: `config` is a config.json path, or `loopcoder-v2` for the released one;
/// matrices stored as `quant` when given (as `plait convert` would store them).
pub fn synthetic_model(
    config: &str,
    placement: &Placement,
    quant: Option<Quant>,
) -> Result<PltModel> {
    let config = if config == "loopcoder-v2" {
        PltConfig::from_json(LOOPCODER_V2_CONFIG, std::path::Path::new("loopcoder-v2"))?
    } else {
        PltConfig::from_file(std::path::Path::new(config))?
    };
    PltModel::synthetic(config, placement, quant.map(Quant::ggml))
}

/// Figures for one loop count (at one depth).
#[derive(Debug, Clone, PartialEq)]
pub struct LoopBench {
    /// Loop count.
    pub loops: usize,
    /// Positions cached when the timed decode starts.
    pub depth: usize,
    /// Tokens prefilled in the timed prefill (0 when none was).
    pub prompt_tokens: usize,
    /// Tokens decoded.
    pub gen_tokens: usize,
    /// Prompt tokens per second; None when no prefill was timed.
    pub prefill_tok_s: Option<f64>,
    /// Decode steps per second.
    pub decode_tok_s: f64,
    /// Prefill plus the first sample; None when the decode does not follow a timed prefill.
    pub ttft_ms: Option<f64>,
    /// Median decode step.
    pub token_ms_p50: f64,
    /// 90th percentile decode step.
    pub token_ms_p90: f64,
    /// Median time the host spends issuing a decode step, before it waits for the sampled
    /// token: on a GPU, near `token_ms_p50` when the step is bound by the host's launches,
    /// well under it when by the GPU; on the CPU, which computes as it issues, the step.
    pub host_ms_p50: f64,
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

/// Prefill `prompt_tokens`, then decode `gen_tokens` greedily, at each loop count of
/// `loop_counts`: `repeat` rounds that each run every count once, so that a machine whose
/// speed drifts (other tenants, clocks) moves all counts alike; each count's figures pool
/// its rounds (percentiles over all steps).
pub fn bench_loop_counts(
    model: &PltModel,
    loop_counts: &[usize],
    prompt_tokens: usize,
    gen_tokens: usize,
    repeat: usize,
) -> Result<Vec<LoopBench>> {
    let mut runs: Vec<Vec<LoopRun>> = loop_counts.iter().map(|_| Vec::new()).collect();
    for _ in 0..repeat.max(1) {
        for (&loops, runs) in loop_counts.iter().zip(&mut runs) {
            runs.push(run_loops(model, loops, prompt_tokens, gen_tokens)?);
        }
    }
    Ok(loop_counts
        .iter()
        .zip(&runs)
        .map(|(&loops, runs)| summarize(loops, prompt_tokens, prompt_tokens, gen_tokens, runs))
        .collect())
}

/// How [`bench_depths`] makes the context a decode runs after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DepthContext {
    /// Prefilled once per depth and round at one loop, and copied for each loop count (its
    /// loops >= 1 rebuilt as a loop-count change rebuilds them).
    Prefill,
    /// Random K/V, ring entries and carries ([`PltModel::random_context`]): for a model too
    /// large to prefill thousands of tokens through on this machine.
    Random,
}

/// Decode `gen_tokens` greedily after a context of each of `depths` positions, at each loop
/// count of `loop_counts`, in `repeat` rounds that each run every pair once (figures pool
/// the rounds, as [`bench_loop_counts`]'s). A prefilled context's prefill is timed at one
/// loop and reported with every loop count of its depth.
pub fn bench_depths(
    model: &PltModel,
    loop_counts: &[usize],
    depths: &[usize],
    gen_tokens: usize,
    repeat: usize,
    context: DepthContext,
) -> Result<Vec<LoopBench>> {
    let (vocab, max) = (
        model.config().vocab_size,
        model.config().max_position_embeddings,
    );
    // Every step must fit before any context is prefilled.
    for &depth in depths {
        check_room(max, depth, gen_tokens)?;
    }
    // `[depth][loop count]`.
    let mut runs: Vec<Vec<LoopRun>> = vec![Vec::new(); depths.len() * loop_counts.len()];
    for _ in 0..repeat.max(1) {
        for (di, &depth) in depths.iter().enumerate() {
            let ids = bench_ids(depth, vocab, 0);
            let prefilled = match context {
                DepthContext::Prefill if depth > 0 => {
                    let mut cache = model.new_cache(1)?;
                    let started = Instant::now();
                    model.prefill(&mut cache, &ids, Logits::None)?;
                    model.device().synchronize()?;
                    Some((cache, started.elapsed()))
                }
                _ => None,
            };
            for (li, &loops) in loop_counts.iter().enumerate() {
                let context = prefilled.as_ref().map(|(cache, _)| cache);
                let mut cache = context_cache(model, context, &ids, loops, gen_tokens)?;
                let first = ids.last().copied().unwrap_or(0);
                let (steps, issued) =
                    decode_steps(model, &mut cache, first, WARM_STEPS + gen_tokens)?;
                runs[di * loop_counts.len() + li].push(LoopRun {
                    prefill: prefilled.as_ref().map(|(_, time)| *time),
                    ttft: None,
                    steps: steps[WARM_STEPS..].to_vec(),
                    issued: issued[WARM_STEPS..].to_vec(),
                    kv_bytes: cache.size_bytes(),
                });
            }
        }
    }
    let mut results = Vec::with_capacity(runs.len());
    for (di, &depth) in depths.iter().enumerate() {
        for (li, &loops) in loop_counts.iter().enumerate() {
            let runs = &runs[di * loop_counts.len() + li];
            let prompt = if runs.iter().any(|r| r.prefill.is_some()) {
                depth
            } else {
                0
            };
            results.push(summarize(loops, depth, prompt, gen_tokens, runs));
        }
    }
    Ok(results)
}

/// Figures of several conversations decoding together (one batched step per token).
#[derive(Debug, Clone, PartialEq)]
pub struct ConcurrentBench {
    /// Conversations in every step.
    pub conversations: usize,
    /// Loop count of each.
    pub loops: usize,
    /// Positions each conversation had cached when the timed steps began.
    pub context_tokens: usize,
    /// Tokens per second over all conversations.
    pub aggregate_tok_s: f64,
    /// Tokens per second of each conversation.
    pub stream_tok_s: f64,
    /// Median step (each conversation's per-token latency).
    pub token_ms_p50: f64,
    /// 99th percentile step.
    pub token_ms_p99: f64,
}

/// For each count of `conversations` and each loop count, that many conversations, each
/// after its own context of `context_tokens` positions, decode `gen_tokens` greedy tokens
/// together, every step one [`PltModel::decode_batch`] over all of their loop rows; in
/// `repeat` rounds that each run every pair once (figures pool the rounds). A prefilled
/// context is computed once per round at one loop and copied for each conversation (their
/// first tokens differ); a random one is made per conversation.
pub fn bench_concurrent(
    model: &PltModel,
    loop_counts: &[usize],
    conversations: &[usize],
    context_tokens: usize,
    gen_tokens: usize,
    repeat: usize,
    context: DepthContext,
) -> Result<Vec<ConcurrentBench>> {
    let (vocab, max) = (
        model.config().vocab_size,
        model.config().max_position_embeddings,
    );
    check_room(max, context_tokens, gen_tokens)?;
    let ids = bench_ids(context_tokens, vocab, 0);
    let pairs: Vec<(usize, usize)> = conversations
        .iter()
        .flat_map(|&n| loop_counts.iter().map(move |&l| (n, l)))
        .collect();
    let mut steps: Vec<Vec<Duration>> = vec![Vec::new(); pairs.len()];
    for _ in 0..repeat.max(1) {
        let prefilled = match context {
            DepthContext::Prefill if context_tokens > 0 => {
                let mut cache = model.new_cache(1)?;
                model.prefill(&mut cache, &ids, Logits::None)?;
                Some(cache)
            }
            _ => None,
        };
        for (&(n, loops), steps) in pairs.iter().zip(&mut steps) {
            let mut caches = (0..n)
                .map(|_| context_cache(model, prefilled.as_ref(), &ids, loops, gen_tokens))
                .collect::<Result<Vec<_>>>()?;
            let mut next: Vec<u32> = (0..n).map(|i| bench_ids(1, vocab, i + 1)[0]).collect();
            let mut sampler = Sampler::new(SamplingParams::default());
            for step in 0..WARM_STEPS + gen_tokens {
                let started = Instant::now();
                let mut batch: Vec<&mut PltCache> = caches.iter_mut().collect();
                let logits = model.decode_batch(&mut batch, &next)?;
                for (next, logits) in next.iter_mut().zip(&logits) {
                    *next = sampler.sample_tensor(logits, &[])?;
                }
                if step >= WARM_STEPS {
                    steps.push(started.elapsed());
                }
            }
        }
    }
    Ok(pairs
        .iter()
        .zip(&mut steps)
        .map(|(&(conversations, loops), steps)| {
            steps.sort();
            let total: Duration = steps.iter().sum();
            let stream = match total.is_zero() {
                true => 0.0,
                false => steps.len() as f64 / total.as_secs_f64(),
            };
            ConcurrentBench {
                conversations,
                loops,
                context_tokens,
                aggregate_tok_s: stream * conversations as f64,
                stream_tok_s: stream,
                token_ms_p50: percentile(steps, 0.5),
                token_ms_p99: percentile(steps, 0.99),
            }
        })
        .collect())
}

/// Refuses a context of `depth` positions whose warm-up and `gen_tokens` steps would pass
/// the model's `max` positions.
fn check_room(max: usize, depth: usize, gen_tokens: usize) -> Result<()> {
    let len = depth + WARM_STEPS + gen_tokens;
    match len > max {
        true => Err(ModelError::ContextOverflow { len, max }),
        false => Ok(()),
    }
}

/// A cache at `loops` loops holding the context `ids`: a copy of `prefilled` (its upper
/// loops rebuilt), else random K/V; with room for the warm-up and `gen_tokens` steps, so
/// that none pays for the cache growing.
fn context_cache(
    model: &PltModel,
    prefilled: Option<&PltCache>,
    ids: &[u32],
    loops: usize,
    gen_tokens: usize,
) -> Result<PltCache> {
    let mut cache = match prefilled {
        Some(prefilled) => {
            let mut cache = model.fork_cache(prefilled, ids.len())?;
            model.set_loops(&mut cache, loops)?;
            cache
        }
        None if !ids.is_empty() => model.random_context(loops, ids, 0)?,
        None => model.new_cache(loops)?,
    };
    cache.reserve(ids.len() + WARM_STEPS + gen_tokens)?;
    Ok(cache)
}

/// Untimed decode steps before a depth's timed ones: the first step after a loop-count
/// change or a fresh context touches memory the others find warm.
const WARM_STEPS: usize = 2;

/// The raw timings of one prefill and decode at one loop count.
#[derive(Clone)]
struct LoopRun {
    prefill: Option<Duration>,
    ttft: Option<Duration>,
    steps: Vec<Duration>,
    /// Each step's time until it was issued (see [`LoopBench::host_ms_p50`]).
    issued: Vec<Duration>,
    kv_bytes: usize,
}

/// Times `count` greedy decode steps from token `first`: each step, and the part of it
/// spent issuing the step before the sampled token is waited for.
fn decode_steps(
    model: &PltModel,
    cache: &mut PltCache,
    first: u32,
    count: usize,
) -> Result<(Vec<Duration>, Vec<Duration>)> {
    let mut sampler = Sampler::new(SamplingParams::default());
    let mut next = first;
    let (mut steps, mut issued) = (Vec::with_capacity(count), Vec::with_capacity(count));
    for _ in 0..count {
        let step = Instant::now();
        let logits = model.decode(cache, next)?;
        issued.push(step.elapsed());
        next = sampler.sample_tensor(&logits, &[])?;
        steps.push(step.elapsed());
    }
    Ok((steps, issued))
}

fn run_loops(
    model: &PltModel,
    loops: usize,
    prompt_tokens: usize,
    gen_tokens: usize,
) -> Result<LoopRun> {
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
    let first = sampler.sample_tensor(&logits, &[])?;
    let ttft = started.elapsed();
    let (steps, issued) = decode_steps(model, &mut cache, first, gen_tokens)?;
    Ok(LoopRun {
        prefill: Some(prefill),
        ttft: Some(ttft),
        steps,
        issued,
        kv_bytes: cache.size_bytes(),
    })
}

/// One count's figures from its runs: rates over the summed times, the median TTFT, and
/// step percentiles over every run's steps.
fn summarize(
    loops: usize,
    depth: usize,
    prompt_tokens: usize,
    gen_tokens: usize,
    runs: &[LoopRun],
) -> LoopBench {
    let rate = |count: usize, time: Duration| match time.is_zero() {
        true => 0.0,
        false => (count * runs.len()) as f64 / time.as_secs_f64(),
    };
    let pooled = |times: fn(&LoopRun) -> &Vec<Duration>| {
        let mut all: Vec<Duration> = runs.iter().flat_map(|r| times(r).iter().copied()).collect();
        all.sort();
        all
    };
    let (steps, issued) = (pooled(|r| &r.steps), pooled(|r| &r.issued));
    let prefills: Option<Duration> = runs.iter().map(|r| r.prefill).sum();
    let mut ttfts: Option<Vec<Duration>> = runs.iter().map(|r| r.ttft).collect();
    ttfts.iter_mut().for_each(|t| t.sort());
    LoopBench {
        loops,
        depth,
        prompt_tokens,
        gen_tokens,
        prefill_tok_s: prefills.map(|time| rate(prompt_tokens, time)),
        decode_tok_s: rate(gen_tokens, steps.iter().sum()),
        ttft_ms: ttfts.map(|t| percentile(&t, 0.5)),
        token_ms_p50: percentile(&steps, 0.5),
        token_ms_p90: percentile(&steps, 0.9),
        host_ms_p50: percentile(&issued, 0.5),
        kv_bytes: runs.last().map_or(0, |r| r.kv_bytes),
    }
}

/// TTFT of a follow-up question of about `new_tokens` tokens after a conversation of about
/// `context_tokens` (a user message of code and the model's short answer), timed through
/// the engine as a user meets it: messages in, template rendered, tokenized, the kept cache
/// found, first token out. With the conversation's cache kept, and after a reset (cold);
/// the median of `rounds` of each. The engine runs on `loaded` at `loops` loops.
pub fn bench_followup(
    loaded: LoadedModel,
    loops: usize,
    context_tokens: usize,
    new_tokens: usize,
    rounds: usize,
) -> Result<FollowupBench> {
    let tokenizer = loaded.tokenizer.as_ref().ok_or_else(|| {
        ModelError::Encode("a follow-up needs a model with a tokenizer and template".into())
    })?;
    let code = text_of_tokens(
        tokenizer,
        context_tokens,
        "let value_{i} = compute({i}, \"item {i}\");\n",
    )?;
    let question = text_of_tokens(tokenizer, new_tokens, "Why does line {i} call compute? ")?;
    let (events, inbox) = std::sync::mpsc::channel();
    let options = EngineOptions {
        model: "bench".into(),
        loops: Some(loops),
        context_size: None,
        device: DeviceSpec::Cpu,
        dtype: None,
        cache_budget: None,
        batching: Default::default(),
    };
    let engine = Engine::spawn_loaded(loaded, options, move |e| {
        let _ = events.send(e);
    })
    .map_err(|e| ModelError::Encode(format!("cannot start the engine: {e}")))?;
    let mut turns = Turns {
        engine: &engine,
        inbox: &inbox,
        next_id: 0,
    };
    turns.wait(|e| matches!(e, Event::Loaded(_)))?;
    let user = |text: &str| ChatMessage::new("user", text);
    let (mut cached, mut cold) = (Vec::new(), Vec::new());
    let mut shape = (0, 0);
    for _ in 0..rounds.max(1) {
        turns.reset()?;
        let (answer, _) = turns.ask(vec![user(&code)], 16)?;
        let followup = vec![
            user(&code),
            ChatMessage::new("assistant", answer),
            user(&question),
        ];
        let (_, kept) = turns.ask(followup.clone(), 1)?;
        turns.reset()?;
        let (_, fresh) = turns.ask(followup, 1)?;
        shape = (kept.cached_tokens, kept.prompt_tokens - kept.cached_tokens);
        cached.push(kept.first_token);
        cold.push(fresh.first_token);
    }
    cached.sort();
    cold.sort();
    Ok(FollowupBench {
        context_tokens: shape.0,
        new_tokens: shape.1,
        ttft_cached_ms: percentile(&cached, 0.5),
        ttft_uncached_ms: percentile(&cold, 0.5),
    })
}

/// Text of about `tokens` tokens: `line` (with `{i}` numbered) repeated until it has them.
fn text_of_tokens(tokenizer: &TextTokenizer, tokens: usize, line: &str) -> Result<String> {
    let mut text = String::new();
    for i in 0.. {
        if tokenizer.encode(&text, false)?.len() >= tokens {
            break;
        }
        text.push_str(&line.replace("{i}", &i.to_string()));
    }
    Ok(text)
}

/// A turn's figures as the engine reported them and as its client timed them.
struct TurnTiming {
    prompt_tokens: usize,
    cached_tokens: usize,
    /// From the request sent to its first token's event.
    first_token: Duration,
}

/// Turns of one conversation with the engine, each waited for.
struct Turns<'a> {
    engine: &'a Engine,
    inbox: &'a std::sync::mpsc::Receiver<Event>,
    next_id: u64,
}

impl Turns<'_> {
    /// The next event that `done` accepts; an engine failure is an error.
    fn wait(&mut self, mut done: impl FnMut(&Event) -> bool) -> Result<Event> {
        loop {
            let event = self
                .inbox
                .recv_timeout(Duration::from_secs(600))
                .map_err(|_| {
                    ModelError::Encode("the engine stopped answering during the follow-up".into())
                })?;
            match event {
                Event::Failed { message, .. } | Event::LoadFailed(message) => {
                    return Err(ModelError::Encode(message))
                }
                e if done(&e) => return Ok(e),
                _ => {}
            }
        }
    }

    fn reset(&mut self) -> Result<()> {
        self.engine.send(Request::Reset);
        self.wait(|e| matches!(e, Event::ResetDone)).map(drop)
    }

    /// Asks `messages` greedily for up to `max_tokens`: the answer's text and its timing.
    fn ask(
        &mut self,
        messages: Vec<ChatMessage>,
        max_tokens: usize,
    ) -> Result<(String, TurnTiming)> {
        self.next_id += 1;
        let id = self.next_id;
        let sent = Instant::now();
        self.engine.send(Request::Generate(GenerateJob {
            id,
            prompt: Prompt::Chat {
                messages,
                drop_oldest: false,
                tools: Vec::new(),
            },
            sampling: super::SamplingParams::default(),
            max_tokens: Some(max_tokens),
            loops: None,
            cache_key: None,
        }));
        let (mut text, mut first, mut counts) = (String::new(), None, (0, 0));
        loop {
            match self.wait(|_| true)? {
                Event::Started {
                    prompt_tokens,
                    cached_tokens,
                    ..
                } => counts = (prompt_tokens, cached_tokens),
                Event::Token { text: t, .. } => {
                    first.get_or_insert_with(|| sent.elapsed());
                    text.push_str(&t);
                }
                Event::Done { .. } => break,
                _ => {}
            }
        }
        let timing = TurnTiming {
            prompt_tokens: counts.0,
            cached_tokens: counts.1,
            first_token: first.unwrap_or_else(|| sent.elapsed()),
        };
        Ok((text, timing))
    }
}

/// Memory bandwidth in GB/s, the ceiling a decode step is held to: on a GPU a device copy
/// (bytes read plus bytes written per second), on the CPU a read of a `bytes` buffer by
/// every worker thread (a copy there would time the page faults of its fresh destination);
/// best of `repeats`.
pub fn copy_bandwidth(device: &Device, bytes: usize, repeats: usize) -> Result<f64> {
    if device.is_cpu() {
        return Ok(cpu_read_bandwidth(bytes, repeats));
    }
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

/// GB/s of candle's worker threads summing disjoint parts of a written `bytes` buffer.
fn cpu_read_bandwidth(bytes: usize, repeats: usize) -> f64 {
    // Written (not calloc'd zero pages, which all map one cached page).
    let words = vec![1u64; (bytes / 8).max(1)];
    let part = words
        .len()
        .div_ceil(candle_core::utils::get_num_threads().max(1));
    let mut best = f64::INFINITY;
    for _ in 0..repeats.max(1) + 1 {
        let started = Instant::now();
        let total: u64 = std::thread::scope(|s| {
            let sums: Vec<_> = words
                .chunks(part)
                .map(|p| s.spawn(move || p.iter().fold(0u64, |a, &w| a.wrapping_add(w))))
                .collect();
            sums.into_iter().map(|h| h.join().unwrap_or(0)).sum()
        });
        best = best.min(started.elapsed().as_secs_f64());
        std::hint::black_box(total);
    }
    (words.len() * 8) as f64 / best / 1e9
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
        let model = synthetic_model(config, &Placement::new(Device::Cpu, None), None).unwrap();
        let rounds = bench_loop_counts(&model, &[1, 3], 8, 4, 2).unwrap();
        assert_eq!(rounds.iter().map(|r| r.loops).collect::<Vec<_>>(), [1, 3]);
        for r in &rounds {
            assert!(
                r.token_ms_p50 <= r.token_ms_p90 && r.decode_tok_s > 0.0,
                "{r:?}"
            );
            assert!(r.prefill_tok_s > Some(0.0) && r.kv_bytes > 0, "{r:?}");
        }
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

//! Command-line interface: argument parsing and the non-interactive commands.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::DType;
use clap::{Args, Parser, Subcommand};
use plait::config::{AppConfig, DefaultModel};
use plait::engine::{
    self, Batching, ChatMessage, Engine, EngineOptions, GenerateRequest, Generation, RemoteBackend,
    RemoteOptions, StepControl,
};
use plait::model::{convert_to_gguf, Quant};
use plait::model::{DeviceSpec, Placement, PltModel};
use plait::model::{LoadedModel, Sampler, SamplingParams, TextTokenizer};
use plait::patch::{self, ChangeKind, Edit, FileChange, Journal, PatchError};
use plait::tui::Settings;
use plait::tui::TuiOptions;
use serde_json::json;

/// plait: a local coding assistant for Parallel Loop Transformer models.
///
/// With no command, plait opens its terminal UI in the current directory.
#[derive(Parser)]
#[command(version, about, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    tui: TuiArgs,
}

#[derive(Args)]
struct TuiArgs {
    /// Checkpoint directory or .gguf file (default: config.toml's `model`, else the default model).
    #[arg(long, value_name = "PATH")]
    model: Option<PathBuf>,
    /// Loop count to start with (1..=8).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(1..=8))]
    loops: Option<u8>,
    /// Override a config.toml key, e.g. `-c sampling.temperature=0.7` (repeatable).
    #[arg(short = 'c', value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Read this config file instead of the user's config.toml.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    device: DeviceArgs,
    /// Answer with this OpenAI-compatible server (plait serve, vLLM, llama-server), e.g.
    /// http://127.0.0.1:8080/v1, instead of a model run here.
    #[arg(long, value_name = "URL", conflicts_with = "model")]
    remote: Option<String>,
    /// The remote server's API key (default: the variable remote.api_key_env names).
    #[arg(
        long,
        value_name = "KEY",
        env = "PLAIT_API_KEY",
        hide_env_values = true
    )]
    api_key: Option<String>,
    /// The model to ask the remote server for (default: the first it lists).
    #[arg(long, value_name = "NAME")]
    remote_model: Option<String>,
}

#[derive(Args)]
struct DeviceArgs {
    /// Device to run on: cpu, cuda or cuda:N (CUDA needs a build with `--features cuda`).
    #[arg(long, value_name = "DEVICE")]
    device: Option<DeviceSpec>,
    /// Compute dtype of a safetensors checkpoint: f32, bf16 or f16 (default: f32 on the
    /// CPU, bf16 on a GPU; GGUF models compute in f32).
    #[arg(long, value_name = "DTYPE", value_parser = plait::model::parse_dtype)]
    dtype: Option<DType>,
}

impl DeviceArgs {
    /// The device given (else the CPU), opened, with the dtype given.
    fn placement(&self) -> Result<Placement> {
        Ok(Placement::open(
            self.device.unwrap_or_default(),
            self.dtype,
        )?)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Mean negative log-likelihood of a token sequence or a file's text.
    Perplexity(PerplexityArgs),
    /// Continue a token sequence or a text prompt.
    Generate(GenerateArgs),
    /// Ask the model a question; the answer streams to stdout.
    Ask(AskArgs),
    /// Measure prefill and decode speed per loop count, and the kept cache's payoff.
    Bench(BenchArgs),
    /// Convert a LoopCoder-V2-layout checkpoint directory to one GGUF file.
    Convert(ConvertArgs),
    /// Apply the edits in a model reply (a markdown file) to a workspace, all or nothing.
    Apply(ApplyArgs),
    /// Undo the last set of edits applied to a workspace.
    Undo(UndoArgs),
    /// Serve the model over the OpenAI APIs (Chat Completions, Responses, Completions).
    Serve(ServeArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// Checkpoint directory or .gguf file (default: config.toml's `model`, else the default model).
    #[arg(long, value_name = "PATH")]
    model: Option<PathBuf>,
    /// Address to listen on (default: config's serve.host, 127.0.0.1). A non-loopback
    /// address needs an API key.
    #[arg(long, value_name = "HOST")]
    host: Option<String>,
    /// Port to listen on; 0 picks a free one (default: config's serve.port, 8080).
    #[arg(long, value_name = "PORT")]
    port: Option<u16>,
    /// Key every route but /health requires as `Authorization: Bearer KEY` (default:
    /// config's serve.api_key, else none).
    #[arg(
        long,
        value_name = "KEY",
        env = "PLAIT_API_KEY",
        hide_env_values = true
    )]
    api_key: Option<String>,
    /// Loop count of requests that do not ask for one (1..=8; default: the trained count).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(1..=8))]
    loops: Option<u8>,
    /// Most tokens in an answer whose request sets no limit (default: the room left in the
    /// context).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    max_tokens: Option<u64>,
    /// Override a config.toml key, e.g. `-c serve.queue_length=4` (repeatable).
    #[arg(short = 'c', value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Read this config file instead of the user's config.toml.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    device: DeviceArgs,
}

#[derive(Args)]
struct ApplyArgs {
    /// Say what would happen; write nothing.
    #[arg(long)]
    check: bool,
    /// The workspace the reply's paths are relative to.
    #[arg(long, value_name = "DIR", default_value = ".")]
    root: PathBuf,
    /// Allow the reply to delete files.
    #[arg(long)]
    yes: bool,
    /// A file (relative to the root) the model was shown: when the reply has no explicit
    /// edits, its plain code blocks are placed in these files (repeatable).
    #[arg(long, value_name = "PATH")]
    context: Vec<PathBuf>,
    /// The reply: SEARCH/REPLACE blocks, unified diffs or whole files, each after its path line.
    reply: PathBuf,
}

#[derive(Args)]
struct UndoArgs {
    /// The workspace whose last applied set to undo.
    #[arg(long, value_name = "DIR", default_value = ".")]
    root: PathBuf,
    /// Undo even files that changed after the apply, losing those changes.
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
struct ConvertArgs {
    /// Storage type of the weight matrices: q8_0, q4_k, q4_0, q4_1, f16 or f32.
    #[arg(long, value_parser = parse_quant)]
    quant: Quant,
    /// The checkpoint directory.
    input: PathBuf,
    /// The GGUF file to write.
    output: PathBuf,
}

fn parse_quant(name: &str) -> std::result::Result<Quant, String> {
    Quant::parse(name)
        .ok_or_else(|| format!("unknown quantization `{name}` (q8_0, q4_k, q4_0, q4_1, f16, f32)"))
}

#[derive(Args)]
struct BenchArgs {
    /// Checkpoint directory or .gguf file; default: the default model.
    #[arg(long, value_name = "PATH")]
    model: Option<PathBuf>,
    /// Loop counts to measure, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3", value_parser = clap::value_parser!(u8).range(1..=8))]
    loops: Vec<u8>,
    /// Prompt length.
    #[arg(long, default_value_t = 256)]
    prompt_tokens: usize,
    /// Tokens to decode.
    #[arg(long, default_value_t = 128)]
    gen_tokens: usize,
    /// Time decode after contexts of these lengths (comma separated) instead of after a
    /// timed prompt: a model's context is prefilled once per depth and round and reused
    /// for every loop count, a synthetic model's is filled with random K/V.
    #[arg(long, value_delimiter = ',', conflicts_with = "prompt_tokens")]
    depth: Vec<usize>,
    /// Also time this many conversations decoding together (comma separated), at each
    /// loop count, each after its own context of --prompt-tokens positions (a synthetic
    /// model's filled with random K/V): one batched decode step per token for all of them.
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u16).range(1..=256))]
    concurrent: Vec<u16>,
    /// Rounds, each measuring every loop count once; figures pool the rounds.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    repeat: u16,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Bench random weights of this config.json, made on the device, instead of a model;
    /// `loopcoder-v2` is the released LoopCoder-V2's config (14 layers x 5120).
    #[arg(long, value_name = "CONFIG", conflicts_with = "model")]
    synthetic: Option<String>,
    /// Store the synthetic model's matrices quantized, as `plait convert --quant` would
    /// (q8_0, q4_k, q4_0, q4_1, f16, f32): its speed on the CPU before converting it.
    #[arg(long, value_parser = parse_quant, requires = "synthetic")]
    quant: Option<Quant>,
    /// Skip the follow-up measurement (a 512-token conversation: minutes for a large model).
    #[arg(long)]
    no_followup: bool,
    /// Also measure the device's memory bandwidth (GPU: a device copy; CPU: a read by every
    /// thread) and each decode's fraction of the ceiling it sets (weight bytes per token /
    /// bandwidth).
    #[arg(long)]
    copy_bandwidth: bool,
    #[command(flatten)]
    device: DeviceArgs,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ModelArgs {
    /// Checkpoint directory (config.json + safetensors) or .gguf file; default: the default model.
    #[arg(long, value_name = "PATH")]
    model: Option<PathBuf>,
    /// Loop count (1..=8); defaults to the checkpoint's plt_num_loops.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(1..=8))]
    loops: Option<u8>,
    #[command(flatten)]
    device: DeviceArgs,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct PerplexityArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Token ids, comma separated.
    #[arg(
        long,
        value_name = "IDS",
        value_delimiter = ',',
        required_unless_present = "file",
        conflicts_with = "file"
    )]
    ids: Vec<u32>,
    /// A text file, scored exactly as it is (nothing trimmed or added).
    #[arg(long, value_name = "FILE")]
    file: Option<PathBuf>,
    /// Score through the decode path, one token at a time (a prefill of the first token,
    /// then decode steps), as generation runs.
    #[arg(long)]
    incremental: bool,
    /// With --incremental, also score through the prefill path and compare the two per
    /// position: KL(prefill || incremental) over the full vocabulary (mean, p99, max and
    /// where), top-1 agreement, and the largest log-prob error of a token either path gives
    /// at least 1e-3.
    #[arg(long, requires = "incremental")]
    compare: bool,
}

#[derive(Args)]
struct SamplingArgs {
    /// Most tokens to generate.
    #[arg(long, value_name = "N", default_value_t = 512)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Keep only the k most likely tokens (0: off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Nucleus sampling threshold (1: off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Drop tokens below this fraction of the top probability (0: off).
    #[arg(long, default_value_t = 0.0)]
    min_p: f64,
    /// Penalty for tokens already in the sequence (1: off).
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f64,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Token ids to continue, comma separated.
    #[arg(long, value_name = "IDS", value_delimiter = ',', required_unless_present_any = ["prompt", "prompt_file"], conflicts_with_all = ["prompt", "prompt_file"])]
    ids: Vec<u32>,
    /// Text to continue.
    #[arg(long, value_name = "TEXT", conflicts_with = "prompt_file")]
    prompt: Option<String>,
    /// A file whose text to continue.
    #[arg(long, value_name = "FILE")]
    prompt_file: Option<PathBuf>,
    #[command(flatten)]
    sampling: SamplingArgs,
}

#[derive(Args)]
struct AskArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// System prompt (the template's own default when absent).
    #[arg(long, value_name = "TEXT")]
    system: Option<String>,
    /// The question.
    question: String,
    #[command(flatten)]
    sampling: SamplingArgs,
}

impl Cli {
    /// Whether this invocation opens the terminal UI (logs must then go to a file).
    pub fn is_tui(&self) -> bool {
        self.command.is_none()
    }

    /// Runs the chosen command, or the TUI.
    pub fn run(self) -> Result<()> {
        let Some(command) = self.command else {
            return tui(self.tui);
        };
        match command {
            Command::Perplexity(args) => perplexity(args),
            Command::Generate(args) => generate(args),
            Command::Ask(args) => ask(args),
            Command::Bench(args) => bench(args),
            Command::Convert(args) => convert(args),
            Command::Apply(args) => apply(args),
            Command::Undo(args) => undo(args),
            Command::Serve(args) => serve(args),
        }
    }
}

/// The model to run: the one given, else the installed default model.
fn model_path(given: Option<&Path>) -> Result<PathBuf> {
    match given {
        Some(path) => Ok(path.to_path_buf()),
        None => Ok(DefaultModel::manifest()?.installed_path()?),
    }
}

fn load(dir: &Path, args: &ModelArgs) -> Result<(LoadedModel, usize)> {
    let placement = args.device.placement()?;
    let loaded = LoadedModel::load_with_progress(dir, &placement, &mut |_| {})
        .with_context(|| format!("cannot load model from {}", dir.display()))?;
    let loops = args.loops;
    let loops = loops.map_or(loaded.model.config().plt_num_loops, usize::from);
    Ok((loaded, loops))
}

fn tokenizer<'a>(loaded: &'a LoadedModel, dir: &Path) -> Result<&'a TextTokenizer> {
    loaded.tokenizer.as_ref().with_context(|| {
        format!(
            "{} has no tokenizer (tokenizer.json or tokenizer.model): pass token ids instead",
            dir.display()
        )
    })
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

fn perplexity(args: PerplexityArgs) -> Result<()> {
    let dir = model_path(args.model.model.as_deref())?;
    let (loaded, loops) = load(&dir, &args.model)?;
    let ids = match &args.file {
        Some(file) => tokenizer(&loaded, &dir)?.encode(&read_text(file)?, true)?,
        None => args.ids,
    };
    if args.incremental {
        return perplexity_incremental(&loaded.model, &ids, loops, args.compare, args.model.json);
    }
    let score = engine::score(&loaded.model, &ids, loops)?;
    let perplexity = score.nll.exp();
    if args.model.json {
        let out = json!({
            "tokens": score.tokens,
            "scored": score.scored,
            "nll": score.nll,
            "perplexity": perplexity,
            "loops": loops,
        });
        println!("{out}");
    } else {
        println!(
            "{} tokens, {} scored, loops {loops}: nll {:.6}, perplexity {:.4}",
            score.tokens, score.scored, score.nll, perplexity
        );
    }
    Ok(())
}

fn perplexity_incremental(
    model: &PltModel,
    ids: &[u32],
    loops: usize,
    compare: bool,
    as_json: bool,
) -> Result<()> {
    let result = engine::score_incremental(model, ids, loops, compare)?;
    let score = result.score;
    let kernels = result.kernels.name();
    let mut out = json!({
        "tokens": score.tokens,
        "scored": score.scored,
        "nll": score.nll,
        "perplexity": score.nll.exp(),
        "loops": loops,
        "kernels": kernels,
    });
    if let Some(c) = &result.comparison {
        out["nll_prefill"] = c.nll_prefill.into();
        out["kl_mean"] = c.kl_mean.into();
        out["kl_p99"] = c.kl_p99.into();
        out["kl_max"] = c.kl_max.into();
        out["top1_agreement"] = c.top1_agreement.into();
        out["max_logprob_error"] = c.max_logprob_error.into();
        out["worst_position"] = c.worst_position.into();
    }
    if as_json {
        println!("{out}");
        return Ok(());
    }
    println!(
        "{} tokens, {} scored, loops {loops}, kernels {kernels}: incremental nll {:.6}, \
         perplexity {:.4}",
        score.tokens,
        score.scored,
        score.nll,
        score.nll.exp()
    );
    if let Some(c) = &result.comparison {
        println!(
            "prefill nll {:.6}; KL(prefill || incremental) mean {:.5}, p99 {:.5}, max {:.5} \
             (predicting token {}); top-1 agreement {:.4}; max log-prob error {:.4}",
            c.nll_prefill,
            c.kl_mean,
            c.kl_p99,
            c.kl_max,
            c.worst_position,
            c.top1_agreement,
            c.max_logprob_error
        );
    }
    Ok(())
}

fn sampler(args: &SamplingArgs) -> Result<Sampler> {
    for (name, value) in [("--top-p", args.top_p), ("--min-p", args.min_p)] {
        if !(0.0..=1.0).contains(&value) {
            bail!("{name} {value} is outside 0..=1");
        }
    }
    if args.temperature.is_nan() || args.temperature < 0.0 {
        bail!("--temperature {} must be >= 0", args.temperature);
    }
    if args.repeat_penalty.is_nan() || args.repeat_penalty <= 0.0 {
        bail!("--repeat-penalty {} must be > 0", args.repeat_penalty);
    }
    Ok(Sampler::new(SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: args.min_p,
        repetition_penalty: args.repeat_penalty,
        seed: args.seed,
    }))
}

/// Receives streamed text as it becomes final.
type TextSink<'a> = dyn FnMut(&str) -> Result<()> + 'a;

/// Runs a generation, streaming text to `on_text` when a tokenizer is given.
fn run_generation(
    loaded: &LoadedModel,
    loops: usize,
    prompt: &[u32],
    sampling: &SamplingArgs,
    mut on_text: Option<&mut TextSink<'_>>,
) -> Result<Generation> {
    let mut sampler = sampler(sampling)?;
    let mut cache = loaded.model.new_cache(loops)?;
    let request = GenerateRequest {
        prompt,
        max_tokens: sampling.max_tokens,
        stop_ids: &loaded.stop_ids,
    };
    let mut stream = match (&loaded.tokenizer, &on_text) {
        (Some(tok), Some(_)) => Some(tok.stream()),
        _ => None,
    };
    let mut failure = None;
    let mut observer = |id| {
        let (Some(stream), Some(on_text)) = (stream.as_mut(), on_text.as_mut()) else {
            return StepControl::Continue;
        };
        let step = stream
            .push(id)
            .map_err(anyhow::Error::from)
            .and_then(|chunk| chunk.map_or(Ok(()), |c| on_text(&c)));
        match step {
            Ok(()) => StepControl::Continue,
            Err(e) => {
                failure = Some(e);
                StepControl::Stop
            }
        }
    };
    let out = engine::generate(
        &loaded.model,
        &mut cache,
        &mut sampler,
        &request,
        &mut observer,
    )?;
    if let Some(e) = failure {
        return Err(e);
    }
    if let (Some(stream), Some(on_text)) = (stream.as_mut(), on_text.as_mut()) {
        if let Some(rest) = stream.finish()? {
            on_text(&rest)?;
        }
    }
    Ok(out)
}

fn generation_json(
    loaded: &LoadedModel,
    prompt_tokens: usize,
    loops: usize,
    out: &Generation,
) -> Result<serde_json::Value> {
    let m = &out.metrics;
    let mut json = json!({
        "prompt_tokens": prompt_tokens,
        "ids": out.ids,
        "loops": loops,
        "stop_reason": out.stop_reason.as_str(),
        "ttft_ms": m.time_to_first_token.as_secs_f64() * 1e3,
        "prefill_tok_s": m.prefill_tokens_per_second(),
        "decode_tok_s": m.decode_tokens_per_second(),
    });
    if let Some(tok) = &loaded.tokenizer {
        json["text"] = tok.decode(&out.ids)?.into();
    }
    Ok(json)
}

fn summary(out: &Generation, loops: usize, trained: usize) -> String {
    let m = &out.metrics;
    let loops = if loops == trained {
        format!("loops {loops}")
    } else {
        format!("loops {loops} (trained {trained})")
    };
    format!(
        "{} tokens, TTFT {:.1} ms, prefill {:.1} tok/s, decode {:.1} tok/s, {loops}, stop: {}",
        out.ids.len(),
        m.time_to_first_token.as_secs_f64() * 1e3,
        m.prefill_tokens_per_second(),
        m.decode_tokens_per_second(),
        out.stop_reason.as_str()
    )
}

fn generate(args: GenerateArgs) -> Result<()> {
    let dir = &model_path(args.model.model.as_deref())?;
    let (loaded, loops) = load(dir, &args.model)?;
    let text = match (&args.prompt, &args.prompt_file) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(f)) => Some(read_text(f)?),
        (None, None) => None,
    };
    let prompt = match &text {
        Some(text) => tokenizer(&loaded, dir)?.encode(text, true)?,
        None => args.ids.clone(),
    };
    let out = run_generation(&loaded, loops, &prompt, &args.sampling, None)?;
    if args.model.json {
        println!("{}", generation_json(&loaded, prompt.len(), loops, &out)?);
    } else {
        match &loaded.tokenizer {
            Some(tok) => println!("{}", tok.decode(&out.ids)?),
            None => println!(
                "{}",
                out.ids
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        }
        eprintln!(
            "{}",
            summary(&out, loops, loaded.model.config().plt_num_loops)
        );
    }
    Ok(())
}

fn ask(args: AskArgs) -> Result<()> {
    let dir = &model_path(args.model.model.as_deref())?;
    let (loaded, loops) = load(dir, &args.model)?;
    let tok = tokenizer(&loaded, dir)?;
    let mut messages = Vec::new();
    if let Some(system) = &args.system {
        messages.push(ChatMessage::new("system", system.as_str()));
    }
    messages.push(ChatMessage::new("user", args.question.as_str()));
    // The engine's conversation policy, as the TUI's: the template, and the answer's room.
    let context = loaded.model.config().max_position_embeddings;
    let fitted = engine::conversation_prompt(
        &loaded,
        tok,
        &messages,
        &[],
        Some(args.sampling.max_tokens),
        context,
        true,
    )?;
    let (prompt, max_tokens) = (fitted.ids, fitted.max_tokens);
    let sampling = SamplingArgs {
        max_tokens,
        ..args.sampling
    };
    if args.model.json {
        let out = run_generation(&loaded, loops, &prompt, &sampling, None)?;
        println!("{}", generation_json(&loaded, prompt.len(), loops, &out)?);
        return Ok(());
    }
    let mut stdout = std::io::stdout().lock();
    let mut print = |chunk: &str| -> Result<()> {
        stdout.write_all(chunk.as_bytes())?;
        stdout.flush()?;
        Ok(())
    };
    let out = run_generation(&loaded, loops, &prompt, &sampling, Some(&mut print))?;
    println!();
    eprintln!(
        "{}",
        summary(&out, loops, loaded.model.config().plt_num_loops)
    );
    Ok(())
}

/// Puts the default worker thread count in the environment, once, at start (no other
/// thread runs yet): unset, candle counts the physical cores again from /proc/cpuinfo on
/// every CPU matmul, about 50 us each, most of a small model's decode step.
pub fn fix_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        set_threads(candle_core::utils::get_num_threads());
    }
}

/// Sets the worker thread count; called before any model code runs.
fn set_threads(threads: usize) {
    // candle's CPU kernels size their thread pools from this variable on first use.
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
}

fn bench(args: BenchArgs) -> Result<()> {
    if let Some(threads) = args.threads {
        if threads == 0 {
            bail!("--threads must be at least 1");
        }
        set_threads(threads);
    }
    // The count candle's kernels run with (from the environment, set at start or above).
    let threads = candle_core::utils::get_num_threads();
    let placement = args.device.placement()?;
    // A model with its tokenizer (for the follow-up's conversation), or random weights.
    let (name, mut loaded, synthetic) = match &args.synthetic {
        Some(config) => (
            format!("synthetic {config}"),
            None,
            Some(engine::synthetic_model(config, &placement, args.quant)?),
        ),
        None => {
            let path = model_path(args.model.as_deref())?;
            let loaded = LoadedModel::load_with_progress(&path, &placement, &mut |_| {})
                .with_context(|| format!("cannot load model from {}", path.display()))?;
            (path.display().to_string(), Some(loaded), None)
        }
    };
    let Some(model) = loaded.as_ref().map(|l| &l.model).or(synthetic.as_ref()) else {
        bail!("no model to bench");
    };
    // 2 GiB: long enough that timing overhead is noise even at several TB/s.
    let bandwidth = args
        .copy_bandwidth
        .then(|| engine::copy_bandwidth(model.device(), 2 << 30, 5))
        .transpose()?;
    let weight_bytes = model.decode_weight_bytes();
    // The decode rate at which every weight byte is read once per token at that bandwidth.
    let ceiling = bandwidth.map(|gb_s| gb_s * 1e9 / weight_bytes as f64);
    let loop_counts: Vec<usize> = args.loops.iter().map(|&l| usize::from(l)).collect();
    let repeat = usize::from(args.repeat);
    let results = match args.depth.as_slice() {
        [] => engine::bench_loop_counts(
            model,
            &loop_counts,
            args.prompt_tokens,
            args.gen_tokens,
            repeat,
        )?,
        depths => {
            let context = match args.synthetic {
                Some(_) => engine::DepthContext::Random,
                None => engine::DepthContext::Prefill,
            };
            engine::bench_depths(
                model,
                &loop_counts,
                depths,
                args.gen_tokens,
                repeat,
                context,
            )
            .with_context(|| {
                format!(
                    "--depth {depths:?} with --gen-tokens {} (and 2 untimed warm-up steps)",
                    args.gen_tokens
                )
            })?
        }
    };
    // Per result: the rate at which a step reads the weights and the K/V at its depth.
    let ceiling_at = |r: &engine::LoopBench| {
        let bytes = weight_bytes + model.decode_kv_bytes(r.depth, r.loops);
        bandwidth.map(|gb_s| gb_s * 1e9 / bytes as f64)
    };
    let ceilings: Vec<Option<f64>> = results.iter().map(ceiling_at).collect();
    let followup_loops = args
        .loops
        .first()
        .map_or(model.config().plt_num_loops, |&l| usize::from(l));
    let conversations: Vec<usize> = args.concurrent.iter().map(|&n| usize::from(n)).collect();
    let concurrent = match conversations.as_slice() {
        [] => Vec::new(),
        counts => engine::bench_concurrent(
            model,
            &loop_counts,
            counts,
            args.prompt_tokens,
            args.gen_tokens,
            repeat,
            match args.synthetic {
                Some(_) => engine::DepthContext::Random,
                None => engine::DepthContext::Prefill,
            },
        )
        .with_context(|| {
            format!(
                "--concurrent {counts:?} after --prompt-tokens {} with --gen-tokens {} (and 2 \
                 untimed warm-up steps)",
                args.prompt_tokens, args.gen_tokens
            )
        })?,
    };
    let (device, weights) = (device_name(model.device()), model.weight_storage());
    let kernels = model.decode_kernels().name();
    // The follow-up runs the engine on the loaded model, which it takes.
    let followup = match (args.no_followup, loaded.take()) {
        (false, Some(loaded)) => Some(engine::bench_followup(
            loaded,
            followup_loops,
            512,
            32,
            repeat,
        )?),
        _ => None,
    };
    if args.json {
        let results: Vec<serde_json::Value> = results
            .iter()
            .zip(&ceilings)
            .map(|(r, &ceiling_at)| {
                json!({
                    "loops": r.loops,
                    "depth": r.depth,
                    "prompt_tokens": r.prompt_tokens,
                    "gen_tokens": r.gen_tokens,
                    "prefill_tok_s": r.prefill_tok_s,
                    "decode_tok_s": r.decode_tok_s,
                    "ttft_ms": r.ttft_ms,
                    "token_ms_p50": r.token_ms_p50,
                    "token_ms_p90": r.token_ms_p90,
                    "host_ms_p50": r.host_ms_p50,
                    "kv_bytes": r.kv_bytes,
                    "decode_ceiling_tok_s": ceiling_at,
                    "ceiling_fraction": ceiling_at.map(|c| r.decode_tok_s / c),
                })
            })
            .collect();
        let out = json!({
            "model": name,
            "device": device,
            "weights": weights,
            "kernels": kernels,
            "threads": threads,
            "decode_weight_bytes": weight_bytes,
            "copy_gb_s": bandwidth,
            "decode_ceiling_tok_s": ceiling,
            "results": results,
            "concurrent": concurrent.iter().map(|c| json!({
                "conversations": c.conversations,
                "loops": c.loops,
                "context_tokens": c.context_tokens,
                "aggregate_tok_s": c.aggregate_tok_s,
                "stream_tok_s": c.stream_tok_s,
                "token_ms_p50": c.token_ms_p50,
                "token_ms_p99": c.token_ms_p99,
            })).collect::<Vec<_>>(),
            "followup": followup.as_ref().map(|f| json!({
                "context_tokens": f.context_tokens,
                "new_tokens": f.new_tokens,
                "ttft_cached_ms": f.ttft_cached_ms,
                "ttft_uncached_ms": f.ttft_uncached_ms,
            })),
        });
        println!("{out}");
        return Ok(());
    }
    println!(
        "model {name} ({weights}) on {device} ({threads} threads, {kernels} decode), {:.1} MB \
         of weights per token",
        weight_bytes as f64 / 1e6
    );
    if let (Some(gb_s), Some(ceiling)) = (bandwidth, ceiling) {
        println!("memory bandwidth {gb_s:.1} GB/s: decode ceiling {ceiling:.1} tok/s");
    }
    println!(
        "{:>5} {:>6} {:>7} {:>5} {:>12} {:>11} {:>9} {:>8} {:>8} {:>10} {:>8}",
        "loops",
        "depth",
        "prompt",
        "gen",
        "prefill t/s",
        "decode t/s",
        "ttft ms",
        "p50 ms",
        "p90 ms",
        "kv bytes",
        "ceiling"
    );
    let or_dash = |v: Option<f64>, digits: usize| match v {
        Some(v) => format!("{v:.digits$}"),
        None => "-".into(),
    };
    for (r, &ceiling_at) in results.iter().zip(&ceilings) {
        println!(
            "{:>5} {:>6} {:>7} {:>5} {:>12} {:>11.1} {:>9} {:>8.2} {:>8.2} {:>10} {:>8}",
            r.loops,
            r.depth,
            r.prompt_tokens,
            r.gen_tokens,
            or_dash(r.prefill_tok_s, 1),
            r.decode_tok_s,
            or_dash(r.ttft_ms, 1),
            r.token_ms_p50,
            r.token_ms_p90,
            r.kv_bytes,
            or_dash(ceiling_at, 1),
        );
    }
    if !concurrent.is_empty() {
        println!(
            "{:>13} {:>5} {:>7} {:>14} {:>12} {:>8} {:>8}",
            "conversations", "loops", "context", "aggregate t/s", "stream t/s", "p50 ms", "p99 ms"
        );
    }
    for c in &concurrent {
        println!(
            "{:>13} {:>5} {:>7} {:>14.1} {:>12.1} {:>8.2} {:>8.2}",
            c.conversations,
            c.loops,
            c.context_tokens,
            c.aggregate_tok_s,
            c.stream_tok_s,
            c.token_ms_p50,
            c.token_ms_p99,
        );
    }
    if let Some(f) = followup {
        println!(
            "follow-up of {} tokens after {}: TTFT {:.1} ms with the kept cache, {:.1} ms cold",
            f.new_tokens, f.context_tokens, f.ttft_cached_ms, f.ttft_uncached_ms
        );
    }
    Ok(())
}

/// `cpu`, `cuda:0`: where a model runs, for bench output.
fn device_name(device: &candle_core::Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".to_string(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

fn convert(args: ConvertArgs) -> Result<()> {
    let started = std::time::Instant::now();
    let summary = convert_to_gguf(&args.input, &args.output, args.quant)
        .with_context(|| format!("cannot convert {}", args.input.display()))?;
    for fallback in &summary.fallbacks {
        eprintln!("note: {fallback}: width not a multiple of the block size");
    }
    eprintln!(
        "wrote {} ({} tensors, {:.1} MB) in {:.1} s",
        args.output.display(),
        summary.tensors,
        summary.bytes as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The edits of each path, in order of first appearance.
fn group_by_path(edits: &[Edit]) -> Vec<(&str, Vec<Edit>)> {
    let mut groups: Vec<(&str, Vec<Edit>)> = Vec::new();
    for e in edits {
        match groups.iter_mut().find(|(p, _)| *p == e.path()) {
            Some((_, group)) => group.push(e.clone()),
            None => groups.push((e.path(), vec![e.clone()])),
        }
    }
    groups
}

/// A user-given path inside `root`, relative to it: an absolute one is accepted when it
/// lies inside the root (model-given paths stay relative-only).
fn relative_to_root(root: &Path, path: &Path) -> Result<PathBuf> {
    if path.is_relative() {
        return Ok(path.to_path_buf());
    }
    let canonical =
        |p: &Path| std::fs::canonicalize(p).with_context(|| format!("cannot read {}", p.display()));
    let (root_abs, path_abs) = (canonical(root)?, canonical(path)?);
    match path_abs.strip_prefix(&root_abs) {
        Ok(relative) => Ok(relative.to_path_buf()),
        Err(_) => bail!(
            "--context {} is outside --root {}",
            path.display(),
            root.display()
        ),
    }
}

/// Edits inferred from the reply's plain code blocks, placed in the `context` files.
fn infer(reply: &str, root: &Path, context: &[PathBuf]) -> Result<Vec<Edit>> {
    let files = context
        .iter()
        .map(|path| {
            let relative = relative_to_root(root, path)?;
            Ok((
                relative.to_string_lossy().into_owned(),
                read_text(&root.join(&relative))?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let inference = patch::infer_edits(reply, &files);
    // stdout keeps one line per file (applied, or why not); what inference did goes to stderr.
    for reason in &inference.skipped {
        eprintln!("{reason}");
    }
    Ok(inference
        .edits
        .into_iter()
        .map(|inferred| {
            eprintln!(
                "{}: inferred from a code block at {}",
                inferred.edit.path(),
                inferred.anchors.join(", ")
            );
            inferred.edit
        })
        .collect())
}

fn apply(args: ApplyArgs) -> Result<()> {
    let root = &args.root;
    if !root.is_dir() {
        bail!("{}: not a directory", root.display());
    }
    let reply = read_text(&args.reply)?;
    let mut edits = patch::parse_edits(&reply);
    if edits.is_empty() && !args.context.is_empty() {
        edits = infer(&reply, root, &args.context)?;
    }
    if edits.is_empty() {
        bail!(
            "{}: no edits found (expected SEARCH/REPLACE blocks, unified diffs or whole files, each after a line naming its path{})",
            args.reply.display(),
            if args.context.is_empty() {
                "; --context PATH places plain code blocks in that file"
            } else {
                ""
            }
        );
    }
    let deletions: Vec<&str> = edits
        .iter()
        .filter(|e| matches!(e, Edit::Delete { .. }))
        .map(Edit::path)
        .collect();
    if !deletions.is_empty() && !args.yes {
        for path in &deletions {
            println!("{path}: the reply deletes this file; pass --yes to allow deletions");
        }
        bail!("refused to delete files without --yes; nothing was written");
    }
    // The reply carries no hashes: the files are taken as they are now.
    let expected = HashMap::new();
    // Each file alone first, so that every failing file is named, not only the first.
    let groups = group_by_path(&edits);
    let checked: Vec<Result<Vec<FileChange>, PatchError>> = groups
        .iter()
        .map(|(_, group)| patch::prepare(root, group, &expected))
        .collect();
    let failed = checked.iter().filter(|c| c.is_err()).count();
    if failed > 0 {
        for ((path, _), check) in groups.iter().zip(&checked) {
            match check {
                Err(e) => println!("{e}"),
                Ok(_) => println!("{path}: not applied, because another file failed"),
            }
        }
        bail!(
            "{failed} of {} files failed; nothing was written",
            groups.len()
        );
    }
    // The set as a whole (edits of one file spelt two ways meet only here).
    if let Err(e) = patch::prepare(root, &edits, &expected) {
        println!("{e}");
        bail!("nothing was written");
    }
    if args.check {
        for ((path, _), check) in groups.iter().zip(&checked) {
            let line = match check.as_deref().ok().and_then(<[_]>::first) {
                Some(c) if c.kind == ChangeKind::Create => format!("would create {path}"),
                Some(c) if c.kind == ChangeKind::Delete => format!("would delete {path}"),
                Some(_) => format!("would apply {path}"),
                None => format!("{path}: already up to date"),
            };
            println!("{line}");
        }
        println!("check only: nothing was written");
        return Ok(());
    }
    // Opened before writing, so that a journal problem stops the apply instead of losing undo.
    let journal = Journal::open(&plait::config::state_dir()?, root)?;
    let record = patch::apply_edits(root, &edits, &expected)?;
    for ((path, _), check) in groups.iter().zip(&checked) {
        let changed = check.as_deref().is_ok_and(|changes| {
            changes
                .iter()
                .any(|c| record.entries.iter().any(|e| e.path == c.path))
        });
        if changed {
            println!("applied {path}");
        } else {
            println!("{path}: already up to date");
        }
    }
    journal.push(&record).with_context(|| {
        format!(
            "the edits were applied but could not be recorded for undo in {}",
            journal.dir().display()
        )
    })?;
    Ok(())
}

fn undo(args: UndoArgs) -> Result<()> {
    let journal = Journal::open(&plait::config::state_dir()?, &args.root)?;
    let record = match journal.undo_last(args.force) {
        Ok(Some(record)) => record,
        Ok(None) => bail!("nothing to undo in {}", args.root.display()),
        Err(PatchError::Changed { path }) => {
            println!("{path}: changed after the apply");
            bail!("nothing was undone; pass --force to undo anyway and lose those changes");
        }
        Err(e) => return Err(e.into()),
    };
    for e in &record.entries {
        if e.previous.is_some() {
            println!("restored {}", e.path);
        } else {
            println!("removed {}", e.path);
        }
    }
    println!("{} more set(s) can be undone", journal.depth()?);
    Ok(())
}

fn serve(args: ServeArgs) -> Result<()> {
    let config = AppConfig::load(args.config.as_deref(), &args.overrides)?;
    if let Some(threads) = config.threads {
        set_threads(threads);
    }
    let model = model_path(args.model.as_deref().or(config.model.as_deref()))?;
    let engine = engine_options(model, args.loops, &args.device, &config);
    let serve = config.serve;
    plait::serve::run(plait::serve::ServeOptions {
        engine,
        host: args.host.unwrap_or(serve.host),
        port: args.port.unwrap_or(serve.port),
        api_key: args.api_key.or(serve.api_key),
        queue_length: serve.queue_length,
        max_body_bytes: serve.max_body_bytes,
        cors_origins: serve.cors_origins,
        max_tokens: args
            .max_tokens
            .map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
    })?;
    Ok(())
}

/// The local engine's options: the command line's, then the config's.
fn engine_options(
    model: PathBuf,
    loops: Option<u8>,
    device: &DeviceArgs,
    config: &AppConfig,
) -> EngineOptions {
    EngineOptions {
        model,
        loops: loops.map(usize::from).or(config.loops),
        context_size: config.context_size,
        device: device.device.or(config.device).unwrap_or_default(),
        dtype: device.dtype,
        cache_budget: config.cache_budget_mib.map(|mib| mib << 20),
        batching: Batching {
            max_conversations: config.serve.max_conversations,
            prefill_chunk: config.serve.prefill_chunk,
        },
    }
}

fn tui(args: TuiArgs) -> Result<()> {
    let config = AppConfig::load(args.config.as_deref(), &args.overrides)?;
    if let Some(threads) = config.threads {
        set_threads(threads);
    }
    // `--remote` first; a `--model` runs here even when the config names a server.
    let remote_url = args.remote.clone().or_else(|| {
        args.model
            .is_none()
            .then(|| config.remote.url.clone())
            .flatten()
    });
    let backend = match remote_url {
        Some(url) => {
            if !plait::config::is_http_url(&url) {
                bail!("--remote {url:?} is not an http:// or https:// address");
            }
            AnswerWith::Remote(remote_options(url, &args, &config)?)
        }
        None => AnswerWith::Local(engine_options(
            model_path(args.model.as_deref().or(config.model.as_deref()))?,
            args.loops,
            &args.device,
            &config,
        )),
    };
    let options = TuiOptions {
        model_name: match &backend {
            AnswerWith::Local(engine) => engine
                .model
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            AnswerWith::Remote(remote) => remote.url.clone(),
        },
        settings: Settings {
            sampling: config.sampling.clone(),
            max_tokens: config.max_tokens,
            // The default prompt teaches the edit format the diff pane reads.
            system_prompt: Some(
                config
                    .system_prompt
                    .clone()
                    .unwrap_or_else(|| plait::tui::DEFAULT_SYSTEM_PROMPT.to_string()),
            ),
        },
        color: std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        // Checked when the config was loaded.
        theme: plait::config::Theme::from_name(&config.theme).unwrap_or_default(),
        workspace: std::env::current_dir().context("cannot read the current directory")?,
        state_dir: plait::config::state_dir()?,
    };
    plait::tui::run(options, move |sink| {
        Ok(match backend {
            AnswerWith::Local(engine) => {
                Box::new(Engine::spawn(engine, sink)?) as Box<dyn plait::engine::Backend>
            }
            AnswerWith::Remote(remote) => Box::new(RemoteBackend::spawn(remote, sink)?),
        })
    })?;
    Ok(())
}

/// What the TUI answers with.
enum AnswerWith {
    /// The model, run here.
    Local(EngineOptions),
    /// An OpenAI-compatible server.
    Remote(RemoteOptions),
}

/// The remote client's options: the command line over `[remote]`.
fn remote_options(url: String, args: &TuiArgs, config: &AppConfig) -> Result<RemoteOptions> {
    let remote = &config.remote;
    let api_key = args.api_key.clone().or_else(|| {
        std::env::var(&remote.api_key_env)
            .ok()
            .filter(|key| !key.is_empty())
    });
    let extra =
        match serde_json::to_value(&remote.extra).context("remote.extra cannot be sent as JSON")? {
            serde_json::Value::Object(fields) => fields,
            _ => serde_json::Map::new(),
        };
    Ok(RemoteOptions {
        api_key,
        key_setting: format!("--api-key, PLAIT_API_KEY or ${}", remote.api_key_env),
        model: args.remote_model.clone().or_else(|| remote.model.clone()),
        extra,
        context_size: remote.context_size,
        loops: args.loops.map(usize::from),
        ..RemoteOptions::new(url)
    })
}

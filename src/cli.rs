//! Command-line interface: argument parsing and the non-interactive commands.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::{Args, Parser, Subcommand};
use plait::engine::{self, GenerateRequest, Generation};
use plait::model::{ChatMessage, LoadedModel, Sampler, SamplingParams, TextTokenizer};
use serde_json::json;

/// plait: a local coding assistant for Parallel Loop Transformer models.
#[derive(Parser)]
#[command(version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Mean negative log-likelihood of a token sequence or a file's text.
    Perplexity(PerplexityArgs),
    /// Continue a token sequence or a text prompt.
    Generate(GenerateArgs),
    /// Ask the model a question; the answer streams to stdout.
    Ask(AskArgs),
}

#[derive(Args)]
struct ModelArgs {
    /// Checkpoint directory (config.json + safetensors).
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// Loop count (1..=8); defaults to the checkpoint's plt_num_loops.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(1..=8))]
    loops: Option<u8>,
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
    /// Checkpoint directory (config.json + safetensors).
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,
    /// Loop count (1..=8); defaults to the checkpoint's plt_num_loops.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(1..=8))]
    loops: Option<u8>,
    /// Print the generate JSON (with `text`) instead of streaming.
    #[arg(long)]
    json: bool,
    /// System prompt (the template's own default when absent).
    #[arg(long, value_name = "TEXT")]
    system: Option<String>,
    /// The question.
    question: String,
    #[command(flatten)]
    sampling: SamplingArgs,
}

impl Cli {
    /// Runs the chosen command.
    pub fn run(self) -> Result<()> {
        match self.command {
            Command::Perplexity(args) => perplexity(args),
            Command::Generate(args) => generate(args),
            Command::Ask(args) => ask(args),
        }
    }
}

fn load(dir: &Path, loops: Option<u8>) -> Result<(LoadedModel, usize)> {
    let loaded = LoadedModel::load(dir, &Device::Cpu)
        .with_context(|| format!("cannot load model from {}", dir.display()))?;
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
    let (loaded, loops) = load(&args.model.model, args.model.loops)?;
    let ids = match &args.file {
        Some(file) => tokenizer(&loaded, &args.model.model)?.encode(&read_text(file)?, true)?,
        None => args.ids,
    };
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
    let out = engine::generate(&loaded.model, &mut cache, &mut sampler, &request, |id| {
        let (Some(stream), Some(on_text)) = (stream.as_mut(), on_text.as_mut()) else {
            return true;
        };
        let step = stream
            .push(id)
            .map_err(anyhow::Error::from)
            .and_then(|chunk| chunk.map_or(Ok(()), |c| on_text(&c)));
        match step {
            Ok(()) => true,
            Err(e) => {
                failure = Some(e);
                false
            }
        }
    })?;
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
    let dir = &args.model.model;
    let (loaded, loops) = load(dir, args.model.loops)?;
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
    let Some(dir) = args.model.as_deref() else {
        bail!("no model given: pass --model DIR (a LoopCoder-V2-layout checkpoint directory)");
    };
    let (loaded, loops) = load(dir, args.loops)?;
    let tok = tokenizer(&loaded, dir)?;
    let mut messages = Vec::new();
    if let Some(system) = &args.system {
        messages.push(ChatMessage::new("system", system.as_str()));
    }
    messages.push(ChatMessage::new("user", args.question.as_str()));
    let rendered = loaded.template.render(&messages, true)?;
    let prompt = tok.encode(&rendered, false)?;
    if args.json {
        let out = run_generation(&loaded, loops, &prompt, &args.sampling, None)?;
        println!("{}", generation_json(&loaded, prompt.len(), loops, &out)?);
        return Ok(());
    }
    let mut stdout = std::io::stdout().lock();
    let mut print = |chunk: &str| -> Result<()> {
        stdout.write_all(chunk.as_bytes())?;
        stdout.flush()?;
        Ok(())
    };
    let out = run_generation(&loaded, loops, &prompt, &args.sampling, Some(&mut print))?;
    println!();
    eprintln!(
        "{}",
        summary(&out, loops, loaded.model.config().plt_num_loops)
    );
    Ok(())
}

//! Command-line interface: argument parsing and the non-interactive commands.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::{Args, Parser, Subcommand};
use plait::engine::{self, GenerateRequest};
use plait::model::{generation_eos_ids, PltModel, Sampler, SamplingParams};
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
    /// Mean negative log-likelihood of a token sequence.
    Perplexity(PerplexityArgs),
    /// Continue a token sequence.
    Generate(GenerateArgs),
}

#[derive(Args)]
struct ModelArgs {
    /// Checkpoint directory (config.json + safetensors).
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// Token ids, comma separated.
    #[arg(long, value_name = "IDS", value_delimiter = ',', required = true)]
    ids: Vec<u32>,
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
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Most tokens to generate.
    #[arg(long, value_name = "N")]
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

impl Cli {
    /// Runs the chosen command.
    pub fn run(self) -> Result<()> {
        match self.command {
            Command::Perplexity(args) => perplexity(args),
            Command::Generate(args) => generate(args),
        }
    }
}

fn load(args: &ModelArgs) -> Result<(PltModel, usize)> {
    let model = PltModel::load(&args.model, &Device::Cpu)
        .with_context(|| format!("cannot load model from {}", args.model.display()))?;
    let loops = args
        .loops
        .map_or(model.config().plt_num_loops, |l| l as usize);
    Ok((model, loops))
}

fn perplexity(args: PerplexityArgs) -> Result<()> {
    let args = args.model;
    let (model, loops) = load(&args)?;
    let score = engine::score(&model, &args.ids, loops)?;
    let perplexity = score.nll.exp();
    if args.json {
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

fn generate(args: GenerateArgs) -> Result<()> {
    let (model, loops) = load(&args.model)?;
    for (name, value) in [("--top-p", args.top_p), ("--min-p", args.min_p)] {
        if !(0.0..=1.0).contains(&value) {
            bail!("{name} {value} is outside 0..=1");
        }
    }
    if args.temperature < 0.0 || args.repeat_penalty <= 0.0 {
        bail!("--temperature must be >= 0 and --repeat-penalty > 0");
    }
    let mut stop_ids = model.config().eos_token_ids.clone();
    stop_ids.extend(generation_eos_ids(
        &args.model.model.join("generation_config.json"),
    )?);
    let mut sampler = Sampler::new(SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: args.min_p,
        repetition_penalty: args.repeat_penalty,
        seed: args.seed,
    });
    let mut cache = model.new_cache(loops)?;
    let request = GenerateRequest {
        prompt: &args.model.ids,
        max_tokens: args.max_tokens,
        stop_ids: &stop_ids,
    };
    let out = engine::generate(&model, &mut cache, &mut sampler, &request, |_| true)?;
    let m = &out.metrics;
    let ttft_ms = m.time_to_first_token.as_secs_f64() * 1e3;
    if args.model.json {
        let json = json!({
            "prompt_tokens": args.model.ids.len(),
            "ids": out.ids,
            "loops": loops,
            "stop_reason": out.stop_reason.as_str(),
            "ttft_ms": ttft_ms,
            "prefill_tok_s": m.prefill_tokens_per_second(),
            "decode_tok_s": m.decode_tokens_per_second(),
        });
        println!("{json}");
    } else {
        let ids: Vec<String> = out.ids.iter().map(u32::to_string).collect();
        println!("{}", ids.join(","));
        eprintln!(
            "loops {loops}, stop: {}, ttft {ttft_ms:.1} ms, prefill {:.1} tok/s, decode {:.1} tok/s",
            out.stop_reason.as_str(),
            m.prefill_tokens_per_second(),
            m.decode_tokens_per_second()
        );
    }
    Ok(())
}

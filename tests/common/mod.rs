//! Helpers shared by the integration tests: fixture paths and the oracle's values.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod fake_server;
pub mod server;

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use plait::engine::{self, GenerateRequest, StepControl};
use plait::model::{PltModel, Sampler, SamplingParams};

/// The fixture checkpoints copied from ../shared/fixtures.
pub const FIXTURES: [&str; 2] = ["plt-tiny-2loop", "plt-tiny-3loop-bf16"];

/// Path of a fixture directory: under `PLAIT_TEST_FIXTURES` when set (a test binary run
/// away from its checkout, as on the GPU machine), else the repository's tests/fixtures.
pub fn fixture(name: &str) -> PathBuf {
    std::env::var_os("PLAIT_TEST_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"))
        .join(name)
}

/// The fixture's expected.json.
pub fn expected(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixture(name).join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A list of ids from expected.json.
pub fn ids(value: &serde_json::Value) -> Vec<u32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

/// The oracle's logits `[len, vocab]` of the full forward with `loops` loops.
pub fn expected_logits(name: &str, loops: usize) -> Vec<Vec<f32>> {
    let all = candle_core::safetensors::load(
        fixture(name).join("expected_logits.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    all[&format!("logits_loops{loops}")].to_vec2().unwrap()
}

/// Largest absolute difference between two rows of logits.
pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A tensor of logits as a host vector.
pub fn row(t: &Tensor) -> Vec<f32> {
    t.to_vec1().unwrap()
}

/// A writable copy of a fixture's config.json and weights in a temporary directory.
pub fn fixture_copy(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    dir
}

/// Edits a JSON file in place.
pub fn edit_json(path: &std::path::Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut value);
    std::fs::write(path, serde_json::to_string_pretty(&value).unwrap()).unwrap();
}

/// Rewrites the single-file weights of `dir` after `edit` changes the tensor map.
pub fn edit_weights(
    dir: &std::path::Path,
    edit: impl FnOnce(&mut std::collections::HashMap<String, Tensor>),
) {
    let path = dir.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, &path).unwrap();
}

/// Runs the plait binary; returns (exit code, stdout, stderr).
pub fn plait(args: &[&str]) -> (i32, String, String) {
    plait_with_env(args, &[])
}

/// [`plait`] with these environment variables set.
pub fn plait_with_env(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_plait"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `max_tokens` greedy ids after `prompt` at `loops` loops, from a fresh cache, no stop ids.
pub fn greedy(model: &PltModel, prompt: &[u32], loops: usize, max_tokens: usize) -> Vec<u32> {
    let mut cache = model.new_cache(loops).unwrap();
    let mut sampler = Sampler::new(SamplingParams::default());
    let request = GenerateRequest {
        prompt,
        max_tokens,
        stop_ids: &[],
    };
    engine::generate(model, &mut cache, &mut sampler, &request, &mut |_| {
        StepControl::Continue
    })
    .unwrap()
    .ids
}

/// A generation of the conversation `messages` (oldest messages may be left out to fit),
/// greedy, with `id` and at most `max_tokens`.
pub fn chat_job(
    id: u64,
    messages: &[plait::engine::ChatMessage],
    max_tokens: usize,
) -> plait::engine::GenerateJob {
    plait::engine::GenerateJob {
        id,
        prompt: plait::engine::Prompt::Chat {
            messages: messages.to_vec(),
            drop_oldest: true,
            tools: Vec::new(),
        },
        sampling: plait::engine::SamplingParams::default(),
        max_tokens: Some(max_tokens),
        loops: None,
        cache_key: None,
    }
}

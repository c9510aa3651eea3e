//! Real clients against `plait serve` on the default model: its answers equal `plait ask`,
//! the OpenAI Python SDK streams from it, and Codex CLI runs `codex exec` on it twice, the
//! second time mostly from the kept cache. `.ci/run` installs the clients
//! (scripts/install-test-clients.sh) and names the release binary; outside CI a test whose
//! client is not installed says so and passes.
// Test helpers outside #[test] functions unwrap as the tests do.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::server::*;
use serde_json::{json, Value};

fn default_model() -> PathBuf {
    plait::config::DefaultModel::manifest()
        .unwrap()
        .installed_path()
        .unwrap_or_else(|e| panic!("{e}: the server's client tests need the default model"))
}

/// The client named by `var`, or `None` (outside CI only) when it is not installed.
fn client_tool(var: &str) -> Option<PathBuf> {
    installed_tool(var, "scripts/install-test-clients.sh")
}

/// Runs `command` to completion within `limit`, returning (success, stdout, stderr).
fn run_bounded(command: &mut Command, limit: Duration) -> (bool, String, String) {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the client starts");
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut s).ok();
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut s).ok();
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the client ran past {limit:?}: {}", err.join().unwrap());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    (status.success(), out.join().unwrap(), err.join().unwrap())
}

#[test]
fn the_default_model_served_answers_as_plait_ask_does() {
    let bin = plait_binary(true);
    let model = default_model();
    let question = "Write a Python function that reverses a string.";
    let asked = plait_json(
        &bin,
        &[
            "ask",
            "--model",
            model.to_str().unwrap(),
            "--max-tokens",
            "24",
            question,
        ],
    );
    let body = json!({
        "model": "gpt-whatever",
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 24,
        "temperature": 0,
    });
    // Each on a fresh server: a prompt served from the kept cache runs its last position
    // through another kernel path, which on a quantized model may change a greedy pick
    // (tests/gguf.rs bounds that difference); a fresh prompt computes as `ask` does.
    let served = Served::start(&bin, &model, &[]);
    let answer = served.post_json("/v1/chat/completions", &body, 200);
    assert_eq!(answer["choices"][0]["message"]["content"], asked["text"]);
    assert_eq!(answer["model"], "SmolLM2-135M-Instruct.Q4_1");
    drop(served);
    let served = Served::start(&bin, &model, &[]);
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let chunks = sse_values(served.post("/v1/chat/completions", &streamed));
    assert_eq!(streamed_text(&chunks), asked["text"].as_str().unwrap());
}

#[test]
fn the_openai_python_sdk_streams_chat_and_responses() {
    let Some(python) = client_tool("PLAIT_TEST_PYTHON") else {
        return;
    };
    let served = Served::start(&plait_binary(true), &default_model(), &[]);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/clients/openai_sdk.py");
    let (ok, stdout, stderr) = run_bounded(
        Command::new(python).arg(script).arg(&served.base),
        Duration::from_secs(300),
    );
    assert!(ok, "the SDK script failed:\n{stderr}");
    let out: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert!(!out["chat_streamed"].as_str().unwrap().is_empty());
    // The second answer's prompt comes from the cache: not pinned to the first's text.
    assert!(!out["chat_plain"].as_str().unwrap().is_empty());
    assert!(["stop", "length"].contains(&out["chat_finish_reason"].as_str().unwrap()));
    assert!(out["chat_usage"]["completion_tokens"].as_u64().unwrap() > 0);
    let cached = out["chat_usage"]["prompt_tokens_details"]["cached_tokens"].as_u64();
    assert!(cached.is_some(), "{}", out["chat_usage"]);
    let kinds: Vec<&str> = out["responses_events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(kinds.first(), Some(&"response.created"));
    assert_eq!(kinds.last(), Some(&"response.completed"));
    assert!(kinds.contains(&"response.output_text.delta"));
    assert!(!out["responses_text"].as_str().unwrap().is_empty());
    assert!(out["responses_usage"]["input_tokens"].as_u64().unwrap() > 0);
    assert_eq!(out["models"], json!(["SmolLM2-135M-Instruct.Q4_1"]));
}

#[test]
fn codex_exec_finishes_its_turns_and_the_second_comes_from_the_cache() {
    let Some(codex) = client_tool("PLAIT_TEST_CODEX") else {
        return;
    };
    // Codex sets no output limit: --max-tokens keeps the small model's answers short.
    let served = Served::start(
        &plait_binary(true),
        &default_model(),
        &["--max-tokens", "48"],
    );
    let home = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    std::fs::write(
        home.path().join("config.toml"),
        format!(
            "model = \"SmolLM2-135M-Instruct.Q4_1\"\nmodel_provider = \"plait\"\n\n\
             [model_providers.plait]\nname = \"plait\"\nbase_url = \"{}/v1\"\nwire_api = \"responses\"\n",
            served.base
        ),
    )
    .unwrap();
    let exec = || {
        let mut command = Command::new(&codex);
        command
            .args(["exec", "--skip-git-repo-check", "Say hello in one word."])
            .current_dir(work.path())
            .env("CODEX_HOME", home.path())
            .env_remove("OPENAI_API_KEY")
            .stdin(Stdio::null());
        run_bounded(&mut command, Duration::from_secs(600))
    };
    let (ok, _, stderr) = exec();
    assert!(ok, "codex exec failed:\n{stderr}");
    let prompt_before = served.metric("plait_prompt_tokens_total");
    let cached_before = served.metric("plait_prompt_tokens_cached_total");
    let (ok, _, stderr) = exec();
    assert!(ok, "the second codex exec failed:\n{stderr}");
    let prompt = served.metric("plait_prompt_tokens_total") - prompt_before;
    let cached = served.metric("plait_prompt_tokens_cached_total") - cached_before;
    println!("second codex exec: {cached} of {prompt} prompt tokens from the kept cache");
    assert!(prompt > 1000.0, "Codex's prompt is long: {prompt}");
    assert!(
        cached > 0.5 * prompt,
        "only {cached} of {prompt} prompt tokens were cached"
    );
}

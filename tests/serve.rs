//! `plait serve` over the tiny fixture: answers equal `plait ask` / `plait generate`, the
//! loops extension, per-conversation caches, and every fault a client can cause.
// Test helpers outside #[test] functions unwrap as the tests do.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use common::fixture;
use common::server::*;
use serde_json::{json, Value};

fn tiny() -> std::path::PathBuf {
    fixture("plt-tiny-2loop")
}

fn debug_binary() -> std::path::PathBuf {
    plait_binary(false)
}

fn chat(question: &str, max_tokens: u64) -> Value {
    json!({
        "model": "anything",
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
    })
}

#[test]
fn chat_completions_streamed_and_not_equal_plait_ask() {
    let bin = debug_binary();
    let served = Served::start(&bin, &tiny(), &[]);
    let model = tiny();
    let model = model.to_str().unwrap();
    for loops in [None, Some(3)] {
        let mut ask_args = vec!["ask", "--model", model, "--max-tokens", "12"];
        let loops_text = loops.map(|n: u64| n.to_string());
        if let Some(n) = &loops_text {
            ask_args.extend(["--loops", n.as_str()]);
        }
        ask_args.push("Write a function that adds two numbers.");
        let asked = plait_json(&bin, &ask_args);
        let mut body = chat("Write a function that adds two numbers.", 12);
        if let Some(n) = loops {
            body["plait"] = json!({ "loops": n });
        }
        let answer = served.post_json("/v1/chat/completions", &body, 200);
        assert_eq!(answer["choices"][0]["message"]["content"], asked["text"]);
        assert_eq!(
            answer["plait"]["loops"], asked["loops"],
            "the loops that ran"
        );
        assert_eq!(
            answer["usage"]["completion_tokens"],
            asked["ids"].as_array().unwrap().len()
        );
        assert_eq!(answer["model"], "plt-tiny-2loop");
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        let chunks = sse_values(served.post("/v1/chat/completions", &body));
        assert_eq!(streamed_text(&chunks), asked["text"].as_str().unwrap());
        let usage = chunks.last().unwrap();
        assert_eq!(
            usage["choices"],
            json!([]),
            "the usage chunk has no choices"
        );
        assert_eq!(usage["plait"]["loops"], asked["loops"]);
        assert!(usage["timings"]["predicted_n"].as_u64().unwrap() > 0);
    }
}

#[test]
fn completions_equal_plait_generate_for_text_and_ids() {
    let bin = debug_binary();
    let served = Served::start(&bin, &tiny(), &[]);
    let model = tiny();
    let model = model.to_str().unwrap();
    let generated = plait_json(
        &bin,
        &[
            "generate",
            "--model",
            model,
            "--max-tokens",
            "10",
            "--prompt",
            "def add(a, b):",
        ],
    );
    let body =
        json!({"model": "m", "prompt": "def add(a, b):", "max_tokens": 10, "temperature": 0});
    let answer = served.post_json("/v1/completions", &body, 200);
    assert_eq!(answer["choices"][0]["text"], generated["text"]);
    let ids = plait_json(
        &bin,
        &[
            "generate",
            "--model",
            model,
            "--max-tokens",
            "6",
            "--ids",
            "5,6,7,8",
        ],
    );
    let body = json!({"model": "m", "prompt": [5, 6, 7, 8], "max_tokens": 6, "temperature": 0});
    let answer = served.post_json("/v1/completions", &body, 200);
    assert_eq!(answer["choices"][0]["text"], ids["text"]);
}

#[test]
fn responses_streamed_and_not_equal_plait_ask_with_a_system_prompt() {
    let bin = debug_binary();
    let served = Served::start(&bin, &tiny(), &[]);
    let model = tiny();
    let asked = plait_json(
        &bin,
        &[
            "ask",
            "--model",
            model.to_str().unwrap(),
            "--max-tokens",
            "9",
            "--system",
            "Be brief.",
            "Name a prime.",
        ],
    );
    let body = json!({
        "model": "m",
        "instructions": "Be brief.",
        "input": [
            {"type": "reasoning", "summary": []},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Name a prime."}]},
        ],
        "max_output_tokens": 9,
        "temperature": 0,
        "tools": [{"type": "custom", "name": "apply_patch"}],
        "tool_choice": "auto",
        "parallel_tool_calls": false,
        "reasoning": {"effort": "high"},
        "store": false,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "abc",
    });
    let answer = served.post_json("/v1/responses", &body, 200);
    assert_eq!(answer["output"][0]["content"][0]["text"], asked["text"]);
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let events = sse_values_until_end(served.post("/v1/responses", &streamed));
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds[..2], ["response.created", "response.in_progress"]);
    assert!(kinds.contains(&"response.output_item.added"));
    assert!(kinds.contains(&"response.output_item.done"));
    assert_eq!(*kinds.last().unwrap(), "response.completed");
    let text: String = events
        .iter()
        .filter(|e| e["type"] == "response.output_text.delta")
        .map(|e| e["delta"].as_str().unwrap())
        .collect();
    assert_eq!(text, asked["text"].as_str().unwrap());
    let usage = &events.last().unwrap()["response"]["usage"];
    assert!(
        usage["input_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            > 0,
        "the same prompt again comes from the cache: {usage}"
    );
}

/// Every `data:` JSON of a Responses stream (it ends without `[DONE]`).
fn sse_values_until_end(response: reqwest::blocking::Response) -> Vec<Value> {
    assert_eq!(response.status(), 200);
    BufReader::new(response)
        .lines()
        .map(Result::unwrap)
        .filter_map(|l| Some(serde_json::from_str(l.strip_prefix("data: ")?).unwrap()))
        .collect()
}

#[test]
fn interleaved_conversations_each_report_their_own_cached_tokens() {
    let served = Served::start(&debug_binary(), &tiny(), &[]);
    let questions = [
        "Write a function that adds two numbers.",
        "What is a closure?",
    ];
    let mut conversations: Vec<Vec<Value>> = questions
        .iter()
        .map(|q| {
            vec![
                json!({"role": "system", "content": "You are terse."}),
                json!({"role": "user", "content": q}),
            ]
        })
        .collect();
    let mut first_prompts = Vec::new();
    for messages in &mut conversations {
        let body = json!({"model": "m", "messages": messages, "max_tokens": 6, "temperature": 0});
        let answer = served.post_json("/v1/chat/completions", &body, 200);
        first_prompts.push(answer["usage"]["prompt_tokens"].as_u64().unwrap());
        messages.push(answer["choices"][0]["message"].clone());
        messages.push(json!({"role": "user", "content": "And in Rust?"}));
    }
    for (messages, first) in conversations.iter().zip(first_prompts) {
        let body = json!({"model": "m", "messages": messages, "max_tokens": 4, "temperature": 0});
        let answer = served.post_json("/v1/chat/completions", &body, 200);
        let cached = answer["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap();
        assert!(
            cached >= first,
            "cached {cached} of a conversation whose first prompt was {first}"
        );
        assert_eq!(answer["timings"]["cache_n"], cached);
    }
}

#[test]
fn models_health_and_metrics_describe_the_served_model() {
    let served = Served::start(&debug_binary(), &tiny(), &["--loops", "3"]);
    let models: Value = client()
        .get(served.url("/v1/models"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let model = &models["data"][0];
    assert_eq!(model["id"], "plt-tiny-2loop");
    assert_eq!(
        (
            model["plait"]["trained_loops"].as_u64(),
            model["plait"]["loops"].as_u64()
        ),
        (Some(2), Some(3))
    );
    assert!(model["context_length"].as_u64().unwrap() > 0);
    served.post_json("/v1/chat/completions", &chat("hi", 3), 200);
    let text = client()
        .get(served.url("/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    for name in [
        "plait_requests_total{route=\"/v1/chat/completions\",status=\"200\"} 1",
        "plait_generated_tokens_total 3",
        "plait_loops 3",
        "plait_time_to_first_token_seconds_count 1",
        "plait_inter_token_latency_seconds_count 2",
        "plait_queue_length 0",
    ] {
        assert!(text.contains(name), "{name} missing from\n{text}");
    }
    assert!(served.metric("plait_kv_cache_bytes") > 0.0);
}

/// Asserts an OpenAI-shaped error with this status and `param`.
fn assert_error(response: reqwest::blocking::Response, status: u16, param: Option<&str>) -> Value {
    assert_eq!(response.status().as_u16(), status);
    let body: Value = response.json().unwrap();
    let error = &body["error"];
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(error["type"].is_string(), "{body}");
    if let Some(param) = param {
        assert_eq!(error["param"], param, "{body}");
    }
    body
}

#[test]
fn bad_requests_get_openai_errors_naming_the_field() {
    let served = Served::start(
        &debug_binary(),
        &tiny(),
        &["-c", "context_size=64", "-c", "serve.max_body_bytes=4096"],
    );
    let raw = |body: &str| {
        client()
            .post(served.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .unwrap()
    };
    assert_error(raw("{not json"), 400, None);
    assert_error(raw("[1, 2]"), 400, None);
    let cases = [
        (json!({"messages": "hi"}), "messages"),
        (json!({"messages": []}), "messages"),
        (
            json!({"messages": [{"role": "wizard", "content": "hi"}]}),
            "messages[0].role",
        ),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
            "messages[0].content[0].type",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}),
            "temperature",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "temperature": 3}),
            "temperature",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "top_p": -1}),
            "top_p",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}),
            "max_tokens",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "n": 2}),
            "n",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "stop": 5}),
            "stop",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"}], "plait": {"loops": 0}}),
            "plait.loops",
        ),
    ];
    for (body, param) in &cases {
        assert_error(served.post("/v1/chat/completions", body), 400, Some(param));
    }
    let long = "word ".repeat(80);
    let body = assert_error(
        served.post("/v1/chat/completions", &chat(&long, 4)),
        400,
        Some("messages"),
    );
    assert_eq!(body["error"]["code"], "context_length_exceeded");
    let body = assert_error(served.post("/v1/completions", &json!({"prompt": [1, 2, 3], "max_tokens": 1, "temperature": 0, "extra": long.repeat(20)})), 413, None);
    assert_eq!(body["error"]["code"], "request_too_large");
    assert_error(
        served.post("/v1/completions", &json!({"prompt": {"a": 1}})),
        400,
        Some("prompt"),
    );
    assert_error(
        served.post("/v1/responses", &json!({"input": 5})),
        400,
        Some("input"),
    );
    assert_error(
        served.post(
            "/v1/responses",
            &json!({"input": [{"type": "message", "role": "x", "content": "hi"}]}),
        ),
        400,
        Some("input[0].role"),
    );
    let overflow = json!({"input": long, "stream": true});
    let events = sse_values_until_end(served.post("/v1/responses", &overflow));
    let failed = events.last().unwrap();
    assert_eq!(failed["type"], "response.failed");
    assert_eq!(
        failed["response"]["error"]["code"],
        "context_length_exceeded"
    );
    assert_error(
        client().get(served.url("/v1/nothing")).send().unwrap(),
        404,
        None,
    );
    assert_error(
        client()
            .get(served.url("/v1/chat/completions"))
            .send()
            .unwrap(),
        405,
        None,
    );
    // A max_tokens beyond what fits is clamped, not refused.
    let answer = served.post_json("/v1/chat/completions", &chat("hi", 100_000), 200);
    assert_eq!(answer["choices"][0]["finish_reason"], "length");
    let used = answer["usage"]["total_tokens"].as_u64().unwrap();
    assert_eq!(used, 64, "the answer fills the context: {answer}");
    // The worker survived all of it.
    served.post_json("/v1/chat/completions", &chat("hi", 2), 200);
}

#[test]
fn an_api_key_guards_every_route_but_health() {
    let served = Served::start(&debug_binary(), &tiny(), &["--api-key", "sesame"]);
    assert_eq!(
        client().get(served.url("/health")).send().unwrap().status(),
        200
    );
    assert_error(
        client().get(served.url("/v1/models")).send().unwrap(),
        401,
        None,
    );
    let wrong = client()
        .get(served.url("/metrics"))
        .bearer_auth("sesam")
        .send()
        .unwrap();
    assert_error(wrong, 401, None);
    let ok = client()
        .post(served.url("/v1/chat/completions"))
        .bearer_auth("sesame")
        .json(&chat("hi", 2))
        .send()
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert!(
        ok.headers().get("access-control-allow-origin").is_none(),
        "no CORS unless configured"
    );
}

#[test]
fn a_non_loopback_host_without_a_key_is_refused_at_start() {
    let out = std::process::Command::new(debug_binary())
        .args(["serve", "--host", "0.0.0.0", "--port", "0", "--model"])
        .arg(tiny())
        .env(
            "PLAIT_CONFIG_DIR",
            std::env::temp_dir().join("plait-serve-test-no-config"),
        )
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("without an API key") && stderr.contains("--api-key"),
        "{stderr}"
    );
}

/// Starts a long streamed answer and reads until its first text arrives.
fn start_long_stream(served: &Served) -> BufReader<reqwest::blocking::Response> {
    let mut body = chat("Count to a thousand.", 3500);
    body["stream"] = json!(true);
    let response = served.post("/v1/chat/completions", &body);
    assert_eq!(response.status(), 200);
    let mut reader = BufReader::new(response);
    let mut line = String::new();
    let mut chunks = 0;
    while chunks < 3 {
        line.clear();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "the stream ended early"
        );
        chunks += usize::from(line.starts_with("data: "));
    }
    reader
}

#[test]
fn a_client_that_disconnects_frees_the_worker() {
    let served = Served::start(&debug_binary(), &tiny(), &[]);
    let stream = start_long_stream(&served);
    drop(stream);
    let answer = served.post_json("/v1/chat/completions", &chat("hi", 2), 200);
    assert_eq!(answer["usage"]["completion_tokens"], 2);
    // The abandoned answer stopped early: far fewer than its 3500 tokens were generated.
    let generated = served.metric("plait_generated_tokens_total");
    assert!(generated < 3000.0, "{generated} tokens generated");
}

#[test]
fn a_full_queue_answers_503_with_retry_after() {
    let one = [
        "-c",
        "serve.max_conversations=1",
        "-c",
        "serve.queue_length=0",
    ];
    let served = Served::start(&debug_binary(), &tiny(), &one);
    let stream = start_long_stream(&served);
    let refused = served.post("/v1/chat/completions", &chat("hi", 2));
    assert!(refused.headers().get("retry-after").is_some());
    assert_error(refused, 503, None);
    drop(stream);
    // Its place is freed: the next request is served (bounded wait for the cancel).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let response = served.post("/v1/chat/completions", &chat("hi", 2));
        if response.status() == 200 {
            break;
        }
        assert_eq!(response.status(), 503);
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigterm_drains_the_running_answer_and_exits() {
    let served = Served::start(&debug_binary(), &tiny(), &[]);
    let mut body = chat("Say something.", 200);
    body["stream"] = json!(true);
    let response = served.post("/v1/chat/completions", &body);
    let status = std::process::Command::new("kill")
        .args(["-TERM", &served.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let chunks = sse_values(response);
    assert!(
        chunks
            .iter()
            .any(|c| c["choices"][0]["finish_reason"].is_string()),
        "the answer finished"
    );
    let (status, log) = served.wait(Duration::from_secs(60));
    assert!(status.success(), "{status}: {log}");
}

#[test]
fn a_bounded_load_is_all_answered_or_refused_never_lost() {
    let served = Served::start(&debug_binary(), &tiny(), &["-c", "serve.queue_length=4"]);
    let base = served.base.clone();
    let clients = 8;
    let per_client = 8;
    let results: Vec<(u16, Duration)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                let base = base.clone();
                scope.spawn(move || {
                    let client = client();
                    (0..per_client)
                        .map(|i| {
                            let started = Instant::now();
                            let body = chat(&format!("client {c} request {i}"), 8);
                            let response = client
                                .post(format!("{base}/v1/chat/completions"))
                                .json(&body)
                                .send()
                                .unwrap();
                            let status = response.status().as_u16();
                            let body: Value = response.json().unwrap();
                            match status {
                                200 => {
                                    assert!(body["choices"][0]["message"]["content"].is_string())
                                }
                                503 => assert!(body["error"]["message"].is_string()),
                                other => panic!("status {other}: {body}"),
                            }
                            (status, started.elapsed())
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert_eq!(
        results.len(),
        clients * per_client,
        "every request answered"
    );
    let served_ok = results.iter().filter(|(s, _)| *s == 200).count();
    assert!(
        served_ok >= 5,
        "at least the running one and the queue were served"
    );
    let mut latencies: Vec<Duration> = results
        .iter()
        .filter(|(s, _)| *s == 200)
        .map(|(_, d)| *d)
        .collect();
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize];
    println!(
        "load: {} requests, {served_ok} answered, {} refused with 503; p50 {:?}, p99 {:?}",
        results.len(),
        results.len() - served_ok,
        pct(0.5),
        pct(0.99)
    );
    let requests =
        served.metric("plait_requests_total{route=\"/v1/chat/completions\",status=\"200\"}");
    assert_eq!(
        requests as usize, served_ok,
        "the metrics count what was answered"
    );
}

/// The tiny fixture with a chat template that renders tools, as tool-calling models ship.
fn tiny_with_tool_template() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(tiny()).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "{% if tools %}<|im_start|>system\nTools:\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}\
         {% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}\
         {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    )
    .unwrap();
    dir
}

#[test]
fn tools_reach_a_template_that_renders_them_and_are_left_out_otherwise() {
    let tool = json!({"type": "function", "function": {"name": "shell", "description": "Run a command.", "parameters": {"type": "object"}}});
    let prompt_tokens = |served: &Served, tools: bool| {
        let mut body = chat("List the files.", 1);
        if tools {
            body["tools"] = json!([tool]);
        }
        let answer = served.post_json("/v1/chat/completions", &body, 200);
        answer["usage"]["prompt_tokens"].as_u64().unwrap()
    };
    let plain = Served::start(&debug_binary(), &tiny(), &[]);
    assert_eq!(
        prompt_tokens(&plain, true),
        prompt_tokens(&plain, false),
        "no tools in a template without them"
    );
    let model = tiny_with_tool_template();
    let served = Served::start(&debug_binary(), model.path(), &[]);
    let (with, without) = (prompt_tokens(&served, true), prompt_tokens(&served, false));
    assert!(
        with > without + 5,
        "the tool is rendered: {with} vs {without} prompt tokens"
    );
    // The Responses API's flat function tools are rendered the same way; the answer streams whole.
    let body = json!({
        "input": "List the files.",
        "max_output_tokens": 3,
        "temperature": 0,
        "stream": true,
        "tools": [{"type": "function", "name": "shell", "description": "Run a command.", "parameters": {"type": "object"}}, {"type": "custom", "name": "apply_patch"}],
    });
    let events = sse_values_until_end(served.post("/v1/responses", &body));
    let done = events.last().unwrap();
    assert_eq!(done["type"], "response.completed");
    assert_eq!(
        done["response"]["usage"]["input_tokens"], with,
        "the same prompt as chat's"
    );
}

#[test]
fn earlier_function_calls_and_their_outputs_are_rendered_into_the_conversation() {
    let served = Served::start(&debug_binary(), &tiny(), &[]);
    let input_tokens = |items: Value| {
        let body = json!({"input": items, "max_output_tokens": 1, "temperature": 0});
        let answer = served.post_json("/v1/responses", &body, 200);
        answer["usage"]["input_tokens"].as_u64().unwrap()
    };
    let user = |text: &str| json!({"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]});
    let bare = input_tokens(json!([user("List the files."), user("Thanks.")]));
    let with_call = input_tokens(json!([
        user("List the files."),
        {"type": "reasoning", "summary": [], "encrypted_content": "xyz"},
        {"type": "function_call", "name": "shell", "arguments": "{\"command\":[\"ls\"]}", "call_id": "c1"},
        {"type": "function_call_output", "call_id": "c1", "output": "README.md\nsrc"},
        {"type": "custom_tool_call", "name": "apply_patch", "input": "*** Begin Patch", "call_id": "c2"},
        user("Thanks."),
    ]));
    assert!(with_call > bare + 10, "{with_call} vs {bare}");
}

#[test]
fn tokenize_counts_what_a_chat_completion_runs_and_plain_text() {
    let served = Served::start(&debug_binary(), &tiny(), &[]);
    let messages = json!([
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Write a function that adds two numbers."},
    ]);
    let counted = served.post_json("/tokenize", &json!({ "messages": messages }), 200);
    let answered = served.post_json(
        "/v1/chat/completions",
        &json!({ "model": "plt-tiny-2loop", "messages": messages, "max_tokens": 2 }),
        200,
    );
    // The count is the prompt the chat completion ran.
    assert_eq!(counted["count"], answered["usage"]["prompt_tokens"]);
    assert_eq!(
        counted["tokens"].as_array().unwrap().len() as u64,
        counted["count"].as_u64().unwrap()
    );
    assert!(counted["max_model_len"].as_u64().unwrap() > 0);
    // Text, in vLLM's (`prompt`) and llama.cpp's (`content`) forms, counts alike.
    let vllm = served.post_json("/tokenize", &json!({ "prompt": "fn add(a: i32) {}" }), 200);
    let llama = served.post_json("/tokenize", &json!({ "content": "fn add(a: i32) {}" }), 200);
    assert_eq!(vllm["tokens"], llama["tokens"]);
    assert!(vllm["count"].as_u64().unwrap() > 0);
    // Neither or both is a 400 that names the field; another model is refused.
    let neither = served.post_json("/tokenize", &json!({}), 400);
    assert_eq!(neither["error"]["param"], "messages");
    let other = served.post_json(
        "/tokenize",
        &json!({ "model": "gpt-4", "prompt": "x" }),
        400,
    );
    assert!(other["error"]["message"]
        .as_str()
        .unwrap()
        .contains("gpt-4"));
}

#[test]
fn four_streaming_clients_at_once_each_get_their_solo_answer() {
    let served = Served::start(&debug_binary(), &tiny(), &[]);
    let questions = [
        ("hi", 1),
        ("Write a function that adds two numbers.", 2),
        ("What is a loop?", 3),
        ("Name three colours and say why you like them.", 2),
    ];
    let body = |question: &str, loops: usize| {
        let mut body = chat(question, 32);
        body["stream"] = json!(true);
        body["plait"] = json!({ "loops": loops });
        body
    };
    let path = "/v1/chat/completions";
    let solo: Vec<String> = questions
        .iter()
        .map(|&(q, loops)| streamed_text(&sse_values(served.post(path, &body(q, loops)))))
        .collect();
    let (steps, rows) = (
        served.metric("plait_decode_steps_total"),
        served.metric("plait_decode_rows_total"),
    );
    // All four at once: every client starts its request together and reads its stream.
    let start = std::sync::Barrier::new(questions.len());
    let together: Vec<String> = std::thread::scope(|scope| {
        let clients: Vec<_> = questions
            .iter()
            .map(|&(q, loops)| {
                let (served, start, body) = (&served, &start, body(q, loops));
                scope.spawn(move || {
                    start.wait();
                    streamed_text(&sse_values(served.post(path, &body)))
                })
            })
            .collect();
        clients.into_iter().map(|c| c.join().unwrap()).collect()
    });
    for (i, (together, solo)) in together.iter().zip(&solo).enumerate() {
        assert!(!solo.is_empty(), "question {i} has an answer");
        assert_eq!(together, solo, "question {i}: together and alone");
    }
    // Alone, a step carries one answer's loops; together, more rows per step.
    let solo_rows_per_step = rows / steps;
    let together_rows_per_step = (served.metric("plait_decode_rows_total") - rows)
        / (served.metric("plait_decode_steps_total") - steps);
    assert!(
        together_rows_per_step > solo_rows_per_step + 1.0,
        "rows per step: {together_rows_per_step} together, {solo_rows_per_step} alone"
    );
    assert_eq!(served.metric("plait_running_answers"), 0.0);
    assert_eq!(served.metric("plait_queue_length"), 0.0);
}

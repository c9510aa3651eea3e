//! A small OpenAI-compatible server that speaks vLLM's dialect (its `/v1/models` fields,
//! `/tokenize`, its error bodies), answers from a script and records what it was sent: the
//! remote client's tests run against it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde_json::{json, Value};

/// The context the fake server reports.
pub const CONTEXT: usize = 2048;

/// What the fake server answers a chat completion with.
#[derive(Clone)]
pub enum Reply {
    /// A status and a JSON body.
    Status(u16, Value),
    /// These chunks as server-sent events, then `[DONE]`; with `cut`, the connection drops
    /// after them instead.
    Stream {
        /// The chunks.
        chunks: Vec<Value>,
        /// Whether the connection drops after them.
        cut: bool,
    },
}

/// The fake server's script and what it was sent.
#[derive(Default)]
pub struct Fake {
    /// Replies to chat completions, in order; when empty, a short answer.
    pub replies: Mutex<VecDeque<Reply>>,
    /// The chat completion bodies received.
    pub requests: Mutex<Vec<Value>>,
    /// Whether `/v1/models` refuses the key.
    pub refuse_key: bool,
}

pub fn chunk(delta: Value, finish: Value) -> Value {
    json!({
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "loopcoder",
        "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
    })
}

/// A streamed answer of `words`, with usage at the end.
pub fn answer(words: &[&str]) -> Reply {
    let mut chunks = vec![chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    )];
    chunks.extend(
        words
            .iter()
            .map(|w| chunk(json!({ "content": w }), Value::Null)),
    );
    chunks.push(chunk(json!({}), json!("stop")));
    chunks.push(json!({
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "loopcoder",
        "choices": [],
        "usage": {"prompt_tokens": 40, "completion_tokens": words.len(), "total_tokens": 40 + words.len(),
                  "prompt_tokens_details": {"cached_tokens": 32}},
    }));
    Reply::Stream { chunks, cut: false }
}

/// The fake's token count: one per four bytes of content, four per message (so a test can
/// work out the clamped max_tokens).
pub fn fake_count(messages: &Value) -> usize {
    messages
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_str().unwrap().len() / 4 + 4)
        .sum()
}

async fn models(State(fake): State<Arc<Fake>>) -> Response {
    if fake.refuse_key {
        let body = json!({"error": {"message": "Unauthorized", "type": "invalid_request_error"}});
        return (StatusCode::UNAUTHORIZED, Json(body)).into_response();
    }
    Json(json!({"object": "list", "data": [{
        "id": "loopcoder", "object": "model", "created": 0, "owned_by": "vllm",
        "root": "Multilingual-Multimodal-NLP/LoopCoder-V2", "max_model_len": CONTEXT,
    }]}))
    .into_response()
}

async fn tokenize(Json(body): Json<Value>) -> Json<Value> {
    let count = fake_count(&body["messages"]);
    Json(json!({"count": count, "max_model_len": CONTEXT, "tokens": vec![1; count]}))
}

async fn chat(State(fake): State<Arc<Fake>>, Json(body): Json<Value>) -> Response {
    fake.requests.lock().unwrap().push(body);
    let reply = fake
        .replies
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or_else(|| answer(&["Hello", " there."]));
    match reply {
        Reply::Status(status, body) => {
            (StatusCode::from_u16(status).unwrap(), Json(body)).into_response()
        }
        Reply::Stream { chunks, cut } => {
            let mut parts: Vec<Result<String, std::io::Error>> = chunks
                .iter()
                .map(|c| Ok(format!("data: {c}\n\n")))
                .collect();
            if cut {
                parts.push(Err(std::io::Error::other("cut")));
            } else {
                parts.push(Ok("data: [DONE]\n\n".into()));
            }
            // The cut comes after the chunks have reached the client, as a dropped
            // connection mid-answer does.
            let stream = futures_util::stream::iter(parts).then(|part| async move {
                if part.is_err() {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                part
            });
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(Body::from_stream(stream))
                .unwrap()
        }
    }
}

/// Serves `fake` on `listener` (on the current runtime).
pub fn serve_fake(listener: tokio::net::TcpListener, fake: Arc<Fake>) {
    let app = Router::new()
        .route("/v1/models", get(models))
        .route("/tokenize", post(tokenize))
        .route("/v1/chat/completions", post(chat))
        .with_state(fake);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
}

/// The fake on a fresh loopback port; its `/v1` address.
pub async fn start_fake(fake: Arc<Fake>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    serve_fake(listener, fake);
    url
}

/// The fake on a fresh loopback port, served by a thread of its own (for a test that does
/// not run tokio); its `/v1` address.
pub fn spawn_fake(fake: Arc<Fake>) -> String {
    let (sender, address) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let url = start_fake(fake).await;
            sender.send(url).unwrap();
            std::future::pending::<()>().await;
        });
    });
    address.recv().unwrap()
}

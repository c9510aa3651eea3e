//! `POST /v1/chat/completions` and `POST /v1/completions`.

use std::convert::Infallible;
use std::sync::Arc;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::engine::{ChatMessage, Event, GenerateJob, Prompt, TurnStats};

use super::answer::{engine_gone, Answer, Step};
use super::openai::{
    finish_reason, fresh_id, max_tokens, now, parse, plait_extension, stop_strings, timings,
    ApiError, Common,
};
use super::tools::split_tool_calls;
use super::Server;

/// A message as clients send it.
#[derive(Debug, Deserialize)]
struct InMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
    #[serde(default)]
    tool_calls: Option<Vec<Value>>,
}

/// Message content: text, or parts of which only text is understood.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Typed parts.
    Parts(Vec<ContentPart>),
}

/// One part of a message's content.
#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

impl Content {
    /// The text of the content; a part that is not text is an error naming `param`.
    pub fn text(&self, param: &str) -> Result<String, ApiError> {
        match self {
            Content::Text(text) => Ok(text.clone()),
            Content::Parts(parts) => {
                let mut out = String::new();
                for (j, part) in parts.iter().enumerate() {
                    match (part.kind.as_str(), &part.text) {
                        ("text" | "input_text" | "output_text", Some(text)) => out.push_str(text),
                        // A refusal or a summary is text the model wrote earlier.
                        ("refusal" | "summary_text", Some(text)) => out.push_str(text),
                        (kind, _) => {
                            return Err(ApiError::invalid(
                                format!("{param}[{j}].type"),
                                format!("content parts of type {kind:?} are not supported: the model reads text"),
                            ))
                        }
                    }
                }
                Ok(out)
            }
        }
    }
}

/// The role a message is rendered with: `developer` is `system`; unknown roles are an error.
pub fn template_role(role: &str, param: &str) -> Result<&'static str, ApiError> {
    Ok(match role {
        "system" | "developer" => "system",
        "user" => "user",
        "assistant" => "assistant",
        "tool" | "function" => "tool",
        other => {
            return Err(ApiError::invalid(
                param,
                format!(
                    "unknown role {other:?}: expected system, developer, user, assistant or tool"
                ),
            ))
        }
    })
}

/// An earlier function call, as text in the assistant's turn (the form Hermes-style
/// templates train on).
pub fn tool_call_text(name: &str, arguments: &str) -> String {
    format!(
        "<tool_call>\n{{\"name\": {}, \"arguments\": {arguments}}}\n</tool_call>",
        json!(name)
    )
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    messages: Vec<InMessage>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
}

#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

fn chat_messages(messages: &[InMessage]) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid("messages", "messages must not be empty"));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let role = template_role(&m.role, &format!("messages[{i}].role"))?;
            let mut content = match &m.content {
                Some(c) => c.text(&format!("messages[{i}].content"))?,
                None => String::new(),
            };
            for call in m.tool_calls.iter().flatten() {
                let function = &call["function"];
                let arguments = function["arguments"].as_str().unwrap_or("{}");
                content.push_str(&tool_call_text(
                    function["name"].as_str().unwrap_or_default(),
                    arguments,
                ));
            }
            Ok(ChatMessage::new(role, content))
        })
        .collect()
}

/// A job with its id left for the hub to assign.
fn job(prompt: Prompt, common: &Common, max_tokens: Option<usize>) -> GenerateJob {
    GenerateJob {
        id: 0,
        prompt,
        sampling: common.sampling.clone(),
        max_tokens,
        loops: common.loops,
        cache_key: common.cache_key.clone(),
    }
}

fn usage(answer_prompt: usize, cached: usize, completion: usize) -> Value {
    json!({
        "prompt_tokens": answer_prompt,
        "completion_tokens": completion,
        "total_tokens": answer_prompt + completion,
        "prompt_tokens_details": { "cached_tokens": cached },
    })
}

/// A whole (not streamed) answer: `head` (id, object, created, model) with its one choice,
/// usage, timings and the loops that ran.
fn whole_answer(
    mut head: Value,
    choice: Value,
    prompt: (usize, usize),
    stats: &TurnStats,
) -> Value {
    head["choices"] = json!([choice]);
    head["usage"] = usage(prompt.0, prompt.1, stats.tokens);
    head["timings"] = timings(stats);
    head["plait"] = plait_extension(stats);
    head
}

/// SSE `data:` events from a stream of JSON values, ending with `[DONE]`.
fn sse(values: impl Stream<Item = Vec<Value>> + Send + 'static) -> Response {
    let events = values
        .flat_map(|batch| {
            stream::iter(
                batch
                    .into_iter()
                    .map(|v| SseEvent::default().data(v.to_string())),
            )
        })
        .chain(stream::once(async { SseEvent::default().data("[DONE]") }))
        .map(Ok::<_, Infallible>);
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// The assistant's message and finish reason, with the calls it wrote split out when the
/// request offered tools.
fn assistant_turn(
    text: String,
    tools_offered: bool,
    finish: &'static str,
) -> (Value, &'static str) {
    if !tools_offered {
        return (json!({ "role": "assistant", "content": text }), finish);
    }
    let (text, calls) = split_tool_calls(&text);
    if calls.is_empty() {
        return (json!({ "role": "assistant", "content": text }), finish);
    }
    let calls: Vec<Value> = calls
        .iter()
        .enumerate()
        .map(|(index, call)| {
            json!({
                "index": index,
                "id": fresh_id("call"),
                "type": "function",
                "function": { "name": call.name, "arguments": call.arguments },
            })
        })
        .collect();
    let content = if text.is_empty() {
        Value::Null
    } else {
        text.into()
    };
    (
        json!({ "role": "assistant", "content": content, "tool_calls": calls }),
        "tool_calls",
    )
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(server: Arc<Server>, body: Value) -> Result<Response, ApiError> {
    let model = server.model_id()?;
    let request: ChatRequest = parse(&body)?;
    let common = Common::from_body(&body)?;
    let messages = chat_messages(&request.messages)?;
    let max = max_tokens(&body, &["max_completion_tokens", "max_tokens"])?;
    let stops = stop_strings(&body)?;
    let tools = server.tools(&body);
    let tools_offered = !tools.is_empty();
    let prompt = Prompt::Chat {
        messages,
        drop_oldest: false,
        tools,
    };
    let max = max.or(server.max_tokens);
    let answer = Answer::start(&server.hub, job(prompt, &common, max), stops, "messages").await?;
    let (prompt_tokens, cached) = (answer.prompt_tokens, answer.cached_tokens);
    let id = fresh_id("chatcmpl");
    let created = now();
    let include_usage = request.stream_options.unwrap_or_default().include_usage;
    let chunk = move |delta: Value, finish: Value| {
        json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish }],
        })
    };
    // The stream's last chunks: the finish reason, then the usage when asked.
    let last_chunks =
        move |chunk: &dyn Fn(Value, Value) -> Value, stats: &TurnStats, finish: &str| {
            let mut last = vec![chunk(json!({}), finish.into())];
            if include_usage {
                let mut usage_chunk = chunk(json!({}), Value::Null);
                usage_chunk["choices"] = json!([]);
                usage_chunk["usage"] = usage(prompt_tokens, cached, stats.tokens);
                usage_chunk["timings"] = timings(stats);
                usage_chunk["plait"] = plait_extension(stats);
                last.push(usage_chunk);
            }
            last
        };
    if !common.stream || tools_offered {
        // With tools the answer is read whole, so that a call is never streamed as text.
        let (text, stats, stopped) = answer.collect().await?;
        let (message, finish) = assistant_turn(text, tools_offered, finish_reason(&stats, stopped));
        if common.stream {
            let mut values = vec![chunk(message, Value::Null)];
            values.extend(last_chunks(&chunk, &stats, finish));
            return Ok(sse(stream::iter([values])));
        }
        let mut head = chunk(Value::Null, Value::Null);
        head["object"] = "chat.completion".into();
        let choice =
            json!({ "index": 0, "message": message, "logprobs": null, "finish_reason": finish });
        return Ok(
            axum::Json(whole_answer(head, choice, (prompt_tokens, cached), &stats)).into_response(),
        );
    }
    let first = chunk(json!({ "role": "assistant", "content": "" }), Value::Null);
    let state = (answer, chunk, false);
    let rest = stream::unfold(state, move |(mut answer, chunk, ended)| async move {
        if ended {
            return None;
        }
        let batch = match answer.next().await {
            Step::Text(text) => vec![chunk(json!({ "content": text }), Value::Null)],
            Step::Progress => Vec::new(),
            Step::Done(stats, stopped) => {
                let last = last_chunks(&chunk, &stats, finish_reason(&stats, stopped));
                return Some((last, (answer, chunk, true)));
            }
            Step::Failed(e) => {
                return Some((vec![json!({ "error": e.body() })], (answer, chunk, true)))
            }
        };
        Some((batch, (answer, chunk, false)))
    });
    Ok(sse(stream::once(async { vec![first] }).chain(rest)))
}

/// `POST /v1/completions`.
pub async fn completions(server: Arc<Server>, body: Value) -> Result<Response, ApiError> {
    let model = server.model_id()?;
    let common = Common::from_body(&body)?;
    let prompt = completion_prompt(&body)?;
    let max = max_tokens(&body, &["max_tokens"])?;
    let stops = stop_strings(&body)?;
    let max = max.or(server.max_tokens);
    let answer = Answer::start(&server.hub, job(prompt, &common, max), stops, "prompt").await?;
    let id = fresh_id("cmpl");
    let created = now();
    let (prompt_tokens, cached) = (answer.prompt_tokens, answer.cached_tokens);
    if !common.stream {
        let (text, stats, stopped) = answer.collect().await?;
        let choice = json!({
            "text": text,
            "index": 0,
            "logprobs": null,
            "finish_reason": finish_reason(&stats, stopped),
        });
        let head =
            json!({ "id": id, "object": "text_completion", "created": created, "model": model });
        return Ok(
            axum::Json(whole_answer(head, choice, (prompt_tokens, cached), &stats)).into_response(),
        );
    }
    let chunk = move |text: &str, finish: Value| {
        json!({
            "id": id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [{ "text": text, "index": 0, "logprobs": null, "finish_reason": finish }],
        })
    };
    let values = stream::unfold(
        (answer, chunk, false),
        move |(mut answer, chunk, ended)| async move {
            if ended {
                return None;
            }
            let (batch, ended) = match answer.next().await {
                Step::Text(text) => (vec![chunk(&text, Value::Null)], false),
                Step::Progress => (Vec::new(), false),
                Step::Done(stats, stopped) => {
                    let mut last = chunk("", finish_reason(&stats, stopped).into());
                    last["usage"] = usage(prompt_tokens, cached, stats.tokens);
                    last["timings"] = timings(&stats);
                    (vec![last], true)
                }
                Step::Failed(e) => (vec![json!({ "error": e.body() })], true),
            };
            Some((batch, (answer, chunk, ended)))
        },
    );
    Ok(sse(values))
}

/// The completion prompt: text, one text in a list, token ids, or one list of ids.
fn completion_prompt(body: &Value) -> Result<Prompt, ApiError> {
    let bad = || {
        ApiError::invalid(
            "prompt",
            "prompt must be a string, token ids, or a list of one of them",
        )
    };
    let ids = |items: &[Value]| -> Result<Prompt, ApiError> {
        items
            .iter()
            .map(|v| {
                v.as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(bad)
            })
            .collect::<Result<Vec<u32>, _>>()
            .map(Prompt::Ids)
    };
    match body.get("prompt") {
        Some(Value::String(text)) => Ok(Prompt::Text(text.clone())),
        Some(Value::Array(items)) => match items.as_slice() {
            [Value::String(text)] => Ok(Prompt::Text(text.clone())),
            [Value::Array(inner)] => ids(inner),
            items if !items.is_empty() && items.iter().all(Value::is_number) => ids(items),
            _ => Err(bad()),
        },
        None | Some(Value::Null) => Err(ApiError::invalid("prompt", "prompt is required")),
        Some(_) => Err(bad()),
    }
}

/// `POST /tokenize`: what a prompt encodes to, as vLLM's and llama.cpp's servers answer it,
/// so a client can fit a conversation to the context with the model's own tokenizer.
#[derive(Debug, Deserialize)]
struct TokenizeRequest {
    #[serde(default)]
    model: Option<String>,
    /// A conversation, rendered with the chat template (vLLM's form).
    #[serde(default)]
    messages: Option<Vec<InMessage>>,
    /// Text, encoded with the tokenizer's special prefix (vLLM's form).
    #[serde(default)]
    prompt: Option<String>,
    /// Text (llama.cpp's form).
    #[serde(default)]
    content: Option<String>,
}

/// Answers `POST /tokenize` with the ids, their count and the context size.
pub async fn tokenize(server: Arc<Server>, body: Value) -> Result<Response, ApiError> {
    let model = server.model_id()?;
    let request: TokenizeRequest = parse(&body)?;
    if let Some(asked) = request.model.as_deref().filter(|asked| *asked != model) {
        return Err(ApiError::invalid(
            "model",
            format!("this server serves {model}, not {asked}"),
        ));
    }
    let prompt = match (&request.messages, request.prompt.or(request.content)) {
        (Some(messages), None) => Prompt::Chat {
            messages: chat_messages(messages)?,
            drop_oldest: false,
            tools: Vec::new(),
        },
        (None, Some(text)) => Prompt::Text(text),
        _ => {
            return Err(ApiError::invalid(
                "messages",
                "give either messages or prompt (or content)",
            ))
        }
    };
    let mut ticket = server.hub.tokenize(prompt)?;
    loop {
        match ticket.next().await {
            Some(Event::Tokenized { ids, .. }) => {
                return Ok(axum::Json(json!({
                    "count": ids.len(),
                    "max_model_len": server.context_size(),
                    "tokens": ids,
                }))
                .into_response())
            }
            Some(Event::Failed { kind, message, .. }) => {
                return Err(ApiError::from_failure(kind, message, "messages"))
            }
            Some(_) => {}
            None => return Err(engine_gone()),
        }
    }
}

//! `POST /v1/responses`: the Responses API as Codex CLI speaks it.

use std::convert::Infallible;
use std::sync::Arc;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::engine::{ChatMessage, GenerateJob, Prompt, TurnStats};

use super::answer::{Answer, Step};
use super::chat::{template_role, tool_call_text, Content};
use super::openai::{fresh_id, max_tokens, now, parse, plait_extension, timings, ApiError, Common};
use super::tools::split_tool_calls;
use super::Server;

#[derive(Debug, Deserialize)]
struct ResponsesRequest {
    #[serde(default)]
    instructions: Option<String>,
    input: Input,
}

/// `input`: text, or a list of items.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Input {
    Text(String),
    Items(Vec<Value>),
}

/// The conversation the request's instructions and input items make.
fn conversation(request: &ResponsesRequest) -> Result<Vec<ChatMessage>, ApiError> {
    let mut messages = Vec::new();
    if let Some(instructions) = request.instructions.as_deref().filter(|s| !s.is_empty()) {
        messages.push(ChatMessage::new("system", instructions));
    }
    let items = match &request.input {
        Input::Text(text) => {
            messages.push(ChatMessage::new("user", text.as_str()));
            return Ok(messages);
        }
        Input::Items(items) => items,
    };
    for (i, item) in items.iter().enumerate() {
        let param = format!("input[{i}]");
        let kind = item["type"].as_str().unwrap_or("message");
        match kind {
            "message" => {
                let role = item["role"].as_str().ok_or_else(|| {
                    ApiError::invalid(format!("{param}.role"), "a message needs a role")
                })?;
                let role = template_role(role, &format!("{param}.role"))?;
                let content: Content = parse(&item["content"]).map_err(|_| {
                    ApiError::invalid(
                        format!("{param}.content"),
                        "content must be a string or a list of content parts",
                    )
                })?;
                let text = content.text(&format!("{param}.content"))?;
                messages.push(ChatMessage::new(role, text));
            }
            "function_call" => {
                let name = item["name"].as_str().unwrap_or_default();
                let arguments = item["arguments"].as_str().unwrap_or("{}");
                messages.push(ChatMessage::new(
                    "assistant",
                    tool_call_text(name, arguments),
                ));
            }
            "function_call_output" => {
                let output = match &item["output"] {
                    Value::String(s) => s.clone(),
                    Value::Null => String::new(),
                    other => match parse::<Content>(other) {
                        Ok(content) => content.text(&format!("{param}.output"))?,
                        Err(_) => other.to_string(),
                    },
                };
                messages.push(ChatMessage::new("tool", output));
            }
            // Reasoning, custom and built-in tool calls: nothing a local model can use.
            _ => {}
        }
    }
    if messages.iter().all(|m| m.role == "system") {
        return Err(ApiError::invalid("input", "input has no message to answer"));
    }
    Ok(messages)
}

/// The response object in a given state.
struct Envelope {
    id: String,
    created: u64,
    model: String,
    max_output_tokens: Option<usize>,
    temperature: f64,
    top_p: f64,
}

impl Envelope {
    fn object(&self, status: &str, output: Value, extra: Value) -> Value {
        let mut object = json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "model": self.model,
            "output": output,
            "error": null,
            "incomplete_details": null,
            "max_output_tokens": self.max_output_tokens,
            "parallel_tool_calls": false,
            "tool_choice": "auto",
            "tools": [],
            "temperature": self.temperature,
            "top_p": self.top_p,
            "usage": null,
        });
        if let (Some(object), Value::Object(extra)) = (object.as_object_mut(), extra) {
            object.extend(extra);
        }
        object
    }

    /// The finished response: its output items, usage, and why it ended.
    fn finished(&self, output: Vec<Value>, answer: (usize, usize), stats: &TurnStats) -> Value {
        let (prompt_tokens, cached) = answer;
        let incomplete = stats.stop_reason == crate::engine::StopReason::MaxTokens;
        self.object(
            if incomplete { "incomplete" } else { "completed" },
            Value::Array(output),
            json!({
                "incomplete_details": if incomplete { json!({"reason": "max_output_tokens"}) } else { Value::Null },
                "usage": {
                    "input_tokens": prompt_tokens,
                    "input_tokens_details": { "cached_tokens": cached },
                    "output_tokens": stats.tokens,
                    "output_tokens_details": { "reasoning_tokens": 0 },
                    "total_tokens": prompt_tokens + stats.tokens,
                },
                "timings": timings(stats),
                "plait": plait_extension(stats),
            }),
        )
    }
}

fn message_item(id: &str, status: &str, text: Option<&str>) -> Value {
    let content = match text {
        Some(text) => json!([{ "type": "output_text", "text": text, "annotations": [] }]),
        None => json!([]),
    };
    json!({ "id": id, "type": "message", "status": status, "role": "assistant", "content": content })
}

/// Numbers the stream's events.
struct Events {
    sequence: u64,
}

impl Events {
    fn event(&mut self, kind: &str, mut body: Value) -> SseEvent {
        body["type"] = kind.into();
        body["sequence_number"] = self.sequence.into();
        self.sequence += 1;
        SseEvent::default().event(kind).data(body.to_string())
    }
}

/// `POST /v1/responses`.
pub async fn responses(server: Arc<Server>, body: Value) -> Result<Response, ApiError> {
    let model = server.model_id()?;
    let request: ResponsesRequest = parse(&body)?;
    let common = Common::from_body(&body)?;
    let messages = conversation(&request)?;
    let max = max_tokens(&body, &["max_output_tokens"])?;
    let envelope = Envelope {
        id: fresh_id("resp"),
        created: now(),
        model,
        max_output_tokens: max,
        temperature: common.sampling.temperature,
        top_p: common.sampling.top_p,
    };
    let tools = server.tools(&body);
    let tools_offered = !tools.is_empty();
    let job = GenerateJob {
        id: 0,
        prompt: Prompt::Chat {
            messages,
            drop_oldest: false,
            tools,
        },
        sampling: common.sampling.clone(),
        max_tokens: max.or(server.max_tokens),
        loops: common.loops,
        cache_key: common.cache_key.clone(),
    };
    let started = Answer::start(&server.hub, job, Vec::new(), "input").await;
    let mut state = Streaming {
        envelope,
        events: Events { sequence: 0 },
        item_id: fresh_id("msg"),
        text: String::new(),
        opened: false,
        ended: false,
        tools_offered,
    };
    if !common.stream {
        let answer = started?;
        let counts = (answer.prompt_tokens, answer.cached_tokens);
        let (text, stats, _) = answer.collect().await?;
        let output = state.output(text);
        return Ok(axum::Json(state.envelope.finished(output, counts, &stats)).into_response());
    }
    let answer = match started {
        Ok(answer) => answer,
        // A prompt the engine refused is still a stream, as OpenAI's: created, then failed.
        Err(e) if e.code() == "context_length_exceeded" => {
            let mut events = state.opening();
            events.truncate(1);
            events.extend(state.step(Step::Failed(e), (0, 0)));
            return Ok(
                Sse::new(stream::iter(events.into_iter().map(Ok::<_, Infallible>))).into_response(),
            );
        }
        Err(e) => return Err(e),
    };
    let opening = state.opening();
    let counts = (answer.prompt_tokens, answer.cached_tokens);
    if tools_offered {
        // With tools the answer is read whole, so that a call is never streamed as text.
        let mut events = opening;
        match answer.collect().await {
            Ok((text, stats, stopped)) => {
                events.extend(state.step(Step::Text(text), counts));
                events.extend(state.step(Step::Done(stats, stopped), counts));
            }
            Err(e) => events.extend(state.step(Step::Failed(e), counts)),
        }
        return Ok(
            Sse::new(stream::iter(events.into_iter().map(Ok::<_, Infallible>))).into_response(),
        );
    }
    let rest = stream::unfold((state, answer), move |(mut state, mut answer)| async move {
        if state.ended {
            return None;
        }
        let batch = state.step(answer.next().await, counts);
        Some((batch, (state, answer)))
    });
    let all = stream::iter([opening])
        .chain(rest)
        .flat_map(|batch| stream::iter(batch.into_iter().map(Ok::<_, Infallible>)));
    Ok(Sse::new(all)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// A response as it is produced: its events, numbered, and what it has said.
struct Streaming {
    envelope: Envelope,
    events: Events,
    item_id: String,
    text: String,
    /// Whether the output message was announced.
    opened: bool,
    ended: bool,
    /// Whether the answer's function calls are split out of its text.
    tools_offered: bool,
}

impl Streaming {
    /// `response.created` and `response.in_progress`.
    fn opening(&mut self) -> Vec<SseEvent> {
        let in_progress = self.envelope.object("in_progress", json!([]), json!({}));
        vec![
            self.events
                .event("response.created", json!({ "response": in_progress })),
            self.events
                .event("response.in_progress", json!({ "response": in_progress })),
        ]
    }

    /// The output items of a whole answer: its message (when it has text or no calls),
    /// then each function call it wrote.
    fn output(&self, text: String) -> Vec<Value> {
        let (text, calls) = if self.tools_offered {
            split_tool_calls(&text)
        } else {
            (text, Vec::new())
        };
        let mut output = Vec::new();
        if !text.is_empty() || calls.is_empty() {
            output.push(message_item(&self.item_id, "completed", Some(&text)));
        }
        for call in calls {
            let call_id = fresh_id("call");
            output.push(json!({
                "id": fresh_id("fc"),
                "type": "function_call",
                "status": "completed",
                "call_id": call_id,
                "name": call.name,
                "arguments": call.arguments,
            }));
        }
        output
    }

    /// The events of the answer's next step; `counts` are its (prompt, cached) tokens.
    fn step(&mut self, step: Step, counts: (usize, usize)) -> Vec<SseEvent> {
        let mut out = Vec::new();
        match step {
            Step::Progress => {
                // Keeps the client's idle timer from firing during a long prompt.
                let response = self.envelope.object("in_progress", json!([]), json!({}));
                out.push(
                    self.events
                        .event("response.in_progress", json!({ "response": response })),
                );
            }
            Step::Text(delta) => {
                let (shown, _) = if self.tools_offered {
                    split_tool_calls(&delta)
                } else {
                    (delta.clone(), Vec::new())
                };
                self.text.push_str(&delta);
                if shown.is_empty() {
                    return out;
                }
                self.open(&mut out);
                out.push(self.events.event(
                    "response.output_text.delta",
                    json!({ "item_id": self.item_id, "output_index": 0, "content_index": 0, "delta": shown, "logprobs": [] }),
                ));
            }
            Step::Done(stats, _) => {
                let text = std::mem::take(&mut self.text);
                let output = self.output(text);
                for (index, item) in output.iter().enumerate() {
                    if item["type"] == "message" {
                        self.open(&mut out);
                        let text = item["content"][0]["text"].clone();
                        let part =
                            json!({ "type": "output_text", "text": text, "annotations": [] });
                        out.push(self.events.event(
                            "response.output_text.done",
                            json!({ "item_id": self.item_id, "output_index": index, "content_index": 0, "text": text }),
                        ));
                        out.push(self.events.event(
                            "response.content_part.done",
                            json!({ "item_id": self.item_id, "output_index": index, "content_index": 0, "part": part }),
                        ));
                    } else {
                        out.push(self.events.event(
                            "response.output_item.added",
                            json!({ "output_index": index, "item": item }),
                        ));
                    }
                    out.push(self.events.event(
                        "response.output_item.done",
                        json!({ "output_index": index, "item": item }),
                    ));
                }
                let response = self.envelope.finished(output, counts, &stats);
                out.push(
                    self.events
                        .event("response.completed", json!({ "response": response })),
                );
                self.ended = true;
            }
            Step::Failed(e) => {
                let response = self.envelope.object(
                    "failed",
                    json!([]),
                    json!({ "error": { "code": e.code(), "message": e.message() } }),
                );
                out.push(
                    self.events
                        .event("response.failed", json!({ "response": response })),
                );
                self.ended = true;
            }
        }
        out
    }

    /// Announces the output message and its text part, once.
    fn open(&mut self, out: &mut Vec<SseEvent>) {
        if self.opened {
            return;
        }
        self.opened = true;
        out.push(self.events.event(
            "response.output_item.added",
            json!({ "output_index": 0, "item": message_item(&self.item_id, "in_progress", None) }),
        ));
        out.push(self.events.event(
            "response.content_part.added",
            json!({
                "item_id": self.item_id, "output_index": 0, "content_index": 0,
                "part": { "type": "output_text", "text": "", "annotations": [] },
            }),
        ));
    }
}

//! The typed messages between a front end (the TUI, a server) and the engine's worker.

use std::path::PathBuf;
use std::time::Duration;

use crate::model;

use super::generate::StopReason;

/// The most loops a request may run: the model's limit.
pub const MAX_LOOPS: usize = model::MAX_LOOPS;

/// One message of a conversation, as a front end sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The message text.
    pub content: String,
}

impl ChatMessage {
    /// A message with the given role.
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Self {
            role: role.to_string(),
            content: content.into(),
        }
    }
}

impl From<&ChatMessage> for model::ChatMessage {
    fn from(message: &ChatMessage) -> Self {
        Self::new(&message.role, message.content.as_str())
    }
}

/// How a request picks tokens; the defaults are greedy decoding. Deserializes from config
/// files (missing fields take the defaults, unknown ones are refused).
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f64,
    /// Keep the k most likely tokens (0: off).
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches p (1.0: off).
    pub top_p: f64,
    /// Drop tokens below min_p times the top probability (0.0: off).
    pub min_p: f64,
    /// Penalise tokens already in the sequence (1.0: off), as HF and llama.cpp do.
    pub repetition_penalty: f64,
    /// Seed of the random generator; the same seed gives the same tokens.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        let greedy = model::SamplingParams::default();
        Self {
            temperature: greedy.temperature,
            top_k: greedy.top_k,
            top_p: greedy.top_p,
            min_p: greedy.min_p,
            repetition_penalty: greedy.repetition_penalty,
            seed: greedy.seed,
        }
    }
}

impl From<&SamplingParams> for model::SamplingParams {
    fn from(params: &SamplingParams) -> Self {
        Self {
            temperature: params.temperature,
            top_k: params.top_k,
            top_p: params.top_p,
            min_p: params.min_p,
            repetition_penalty: params.repetition_penalty,
            seed: params.seed,
        }
    }
}

/// Names one generation request; every event about it carries it back.
pub type RequestId = u64;

/// What to answer: a conversation rendered with the model's chat template, or raw input.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Messages rendered with the chat template, with the assistant's turn opened.
    Chat {
        /// The conversation, system prompt first when there is one.
        messages: Vec<ChatMessage>,
        /// Whether the oldest messages (after the system prompt) may be left out so that it
        /// fits the context; otherwise a prompt that does not fit fails.
        drop_oldest: bool,
        /// Functions the model may call, rendered when the template reads `tools`.
        tools: Vec<serde_json::Value>,
    },
    /// Text continued as it is (encoded with the tokenizer's special prefix, as `generate`).
    Text(String),
    /// Token ids continued as they are.
    Ids(Vec<u32>),
}

/// One generation to run.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateJob {
    /// Comes back on every event about this job.
    pub id: RequestId,
    /// What to continue.
    pub prompt: Prompt,
    /// How to pick tokens.
    pub sampling: SamplingParams,
    /// Most tokens in the answer; `None`: the room left in the context.
    pub max_tokens: Option<usize>,
    /// Loop count for this answer; `None`: the engine's current count.
    pub loops: Option<usize>,
    /// Which kept cache to prefer and to replace (a conversation's name); the cache is
    /// always chosen by the longest token prefix, this only breaks ties and says where to
    /// keep the result.
    pub cache_key: Option<String>,
}

/// A prompt to count: its token ids as a generation would see them, unfitted.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizeJob {
    /// Comes back on the answer.
    pub id: RequestId,
    /// What to encode.
    pub prompt: Prompt,
}

/// What a front end asks of the engine.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// Run a generation: beside the running ones while there is room (the conversation
    /// limit and the KV budget), else queued in order.
    Generate(GenerateJob),
    /// Encode a prompt (answered with `Event::Tokenized` before the next step).
    Tokenize(TokenizeJob),
    /// Stop this request: at its next step when running, at once when queued.
    Cancel(RequestId),
    /// Run with this many loops from the next decode step, and for later requests.
    SetLoops(usize),
    /// Stop the answers in progress and forget every kept cache.
    Reset,
    /// End the worker.
    Shutdown,
}

/// What a UI sends its requests to: the local worker ([`super::Engine`]) or a stand-in;
/// events come back through the sink the backend was started with.
pub trait Backend {
    /// Queues a request; never blocks on the model.
    fn send(&self, request: Request);
}

/// Where a backend reports its events.
pub type EventSink = Box<dyn Fn(Event) + Send>;

/// How a running count of loops can change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoopControl {
    /// From the next decode step, even mid-answer (the local engine).
    Live,
    /// From the next request (a plait server: its `plait.loops` field).
    NextRequest,
    /// Not at all: the server fixes it (vLLM, llama.cpp's server).
    Fixed,
}

/// Facts about the loaded model, for the status line and `/model`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    /// Display name (file or directory name).
    pub name: String,
    /// Where it was loaded from.
    pub path: PathBuf,
    /// Parameter count.
    pub parameters: u64,
    /// Storage of the weights ("f32", "Q4_1", ...).
    pub quantization: String,
    /// Loop count the checkpoint was trained with.
    pub trained_loops: usize,
    /// Loop count in use.
    pub loops: usize,
    /// Sliding window of loops >= 1.
    pub window: usize,
    /// Longest context.
    pub context_size: usize,
    /// Whether the chat template renders tools (and the model may answer with calls).
    pub supports_tools: bool,
    /// How the loop count can change.
    pub loop_control: LoopControl,
    /// The server that runs it (host and port), when it is not this process.
    pub server: Option<String>,
}

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The prompt (with room for an answer) does not fit the context.
    ContextLength,
    /// The request cannot be served as asked (no tokenizer, a bad id, a bad loop count).
    InvalidRequest,
    /// The model failed while running.
    Internal,
    /// The server refused the credentials (401 or 403).
    Unauthorized,
    /// The server could not serve it (5xx after the retries, or unreachable).
    Unavailable,
    /// The answer's stream stopped before its end; what came stays.
    Interrupted,
}

/// What the engine tells the front end.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Loading advanced to this fraction (0..=1).
    Loading(f32),
    /// The model is ready.
    Loaded(ModelInfo),
    /// The model could not be loaded; the engine answers nothing else.
    LoadFailed(String),
    /// A request's prompt was encoded and its computation starts.
    Started {
        /// The request.
        id: RequestId,
        /// Prompt tokens.
        prompt_tokens: usize,
        /// Of those, the ones a kept cache already holds.
        cached_tokens: usize,
    },
    /// `done` of `total` prompt positions computed.
    PrefillProgress {
        /// The request.
        id: RequestId,
        /// Positions computed.
        done: usize,
        /// Positions to compute.
        total: usize,
    },
    /// Text of the answer that became final, and how long its token took.
    Token {
        /// The request.
        id: RequestId,
        /// The text (may be empty while a character is incomplete).
        text: String,
        /// Time since the previous token (or since the request, for the first).
        latency: Duration,
    },
    /// The loop count changed.
    LoopsChanged(usize),
    /// The answer ended.
    Done {
        /// The request.
        id: RequestId,
        /// Its figures.
        stats: TurnStats,
    },
    /// The kept caches were dropped.
    ResetDone,
    /// A request failed; nothing more comes for it.
    Failed {
        /// The request.
        id: RequestId,
        /// What kind of failure.
        kind: FailureKind,
        /// What went wrong, for a person.
        message: String,
    },
    /// Something not tied to a request failed (a loop change).
    Error(String),
    /// Something worth showing that is not a failure (a retry, a fallback).
    Notice(String),
    /// The backend cannot serve yet (a server not reachable); it keeps trying.
    Unavailable(String),
    /// Reasoning text of the answer (a thinking model's), before or between its text.
    Reasoning {
        /// The request.
        id: RequestId,
        /// The text.
        text: String,
    },
    /// The worker's scheduling after one of its steps (a decode step of every running
    /// answer with a token due, beside at most one prompt chunk).
    Step {
        /// Answers running: prefilling or decoding.
        running: usize,
        /// Requests waiting for a place (the conversation limit or the KV budget).
        waiting: usize,
        /// Rows the decode step carried (the running answers' loops); 0 when it had none.
        rows: usize,
    },
    /// A prompt's token ids.
    Tokenized {
        /// The request.
        id: RequestId,
        /// The ids.
        ids: Vec<u32>,
    },
}

/// Figures of one answered turn.
#[derive(Debug, Clone, PartialEq)]
pub struct TurnStats {
    /// Why it ended.
    pub stop_reason: StopReason,
    /// Tokens generated.
    pub tokens: usize,
    /// Prompt tokens (served from the cache or computed).
    pub prompt_tokens: usize,
    /// Time spent computing the prompt positions not in the cache.
    pub prefill_time: Duration,
    /// Time to the first token.
    pub time_to_first_token: Duration,
    /// Time spent in decode steps after the first token.
    pub decode_time: Duration,
    /// Decode tokens per second.
    pub decode_tok_s: f64,
    /// Prompt positions served from the kept cache.
    pub reused_tokens: usize,
    /// Loop count the answer ended with.
    pub loops: usize,
    /// Positions in the cache now.
    pub context_used: usize,
    /// Bytes the kept caches hold, all together.
    pub kv_bytes: usize,
    /// Oldest messages left out so that the conversation fits the context.
    pub dropped_messages: usize,
}

//! The typed messages between the UI and the engine's worker thread.

use std::path::PathBuf;
use std::time::Duration;

use crate::model::{ChatMessage, SamplingParams};

use super::generate::StopReason;

/// What the UI asks of the engine.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// Answer the conversation's last message.
    Generate {
        /// Conversation so far, system prompt first when there is one.
        messages: Vec<ChatMessage>,
        /// How to pick tokens.
        sampling: SamplingParams,
        /// Most tokens in the answer.
        max_tokens: usize,
    },
    /// Stop the answer in progress.
    Cancel,
    /// Run with this many loops from the next decode step.
    SetLoops(usize),
    /// Forget the conversation and its cache.
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
}

/// What the engine tells the UI.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Loading advanced to this fraction (0..=1).
    Loading(f32),
    /// The model is ready.
    Loaded(ModelInfo),
    /// The model could not be loaded; the engine answers nothing else.
    LoadFailed(String),
    /// `done` of `total` prompt positions computed.
    PrefillProgress {
        /// Positions computed.
        done: usize,
        /// Positions to compute.
        total: usize,
    },
    /// Text of the answer that became final, and how long its token took.
    Token {
        /// The text (may be empty while a character is incomplete).
        text: String,
        /// Time since the previous token (or since the request, for the first).
        latency: Duration,
    },
    /// The loop count changed.
    LoopsChanged(usize),
    /// The answer ended.
    Done(TurnStats),
    /// The conversation and cache were reset.
    ResetDone,
    /// A request failed.
    Error(String),
}

/// Figures of one answered turn.
#[derive(Debug, Clone, PartialEq)]
pub struct TurnStats {
    /// Why it ended.
    pub stop_reason: StopReason,
    /// Tokens generated.
    pub tokens: usize,
    /// Time to the first token.
    pub time_to_first_token: Duration,
    /// Decode tokens per second.
    pub decode_tok_s: f64,
    /// Prompt positions served from the kept cache.
    pub reused_tokens: usize,
    /// Positions in the cache now.
    pub context_used: usize,
    /// Bytes the cache holds.
    pub kv_bytes: usize,
    /// Oldest messages left out so that the conversation fits the context.
    pub dropped_messages: usize,
}

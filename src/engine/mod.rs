//! The engine: a worker thread that owns the model and the conversations' kept caches, the request/event protocol,
//! generation, scoring and benchmarks.

mod bench;
mod caches;
mod conversation;
mod generate;
mod metrics;
mod protocol;
mod remote;
mod score;
mod worker;

pub use bench::{
    bench_concurrent, bench_depths, bench_followup, bench_ids, bench_loop_counts, copy_bandwidth,
    synthetic_model, ConcurrentBench, DepthContext, FollowupBench, LoopBench,
};
pub use caches::default_cache_budget;
pub use conversation::{
    answer_room, conversation_prompt, encode_conversation, raw_prompt, ConversationPrompt,
    DropOrder,
};
pub use generate::{
    generate, GenerateRequest, Generation, GenerationObserver, StepControl, StopReason,
};
pub use metrics::GenerationMetrics;
pub use protocol::{
    Backend, ChatMessage, Event, EventSink, FailureKind, GenerateJob, LoopControl, ModelInfo,
    Prompt, Request, RequestId, SamplingParams, TokenizeJob, TurnStats, MAX_LOOPS,
};
pub use remote::{RemoteBackend, RemoteOptions};
pub use score::{
    score, score_incremental, Comparison, IncrementalScore, Score, LOGPROB_ERROR_FLOOR,
};
pub use worker::{Batching, Engine, EngineOptions};

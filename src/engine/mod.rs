//! The engine: a worker thread that owns the model and the conversations' kept caches, the request/event protocol,
//! generation, scoring and benchmarks.

mod bench;
mod caches;
mod conversation;
mod generate;
mod metrics;
mod protocol;
mod score;
mod worker;

pub use bench::{
    bench_followup, bench_ids, bench_loop_counts, copy_bandwidth, synthetic_model, FollowupBench,
    LoopBench,
};
pub use caches::default_cache_budget;
pub use conversation::{conversation_prompt, raw_prompt, ConversationPrompt};
pub use generate::{
    generate, GenerateRequest, Generation, GenerationObserver, StepControl, StopReason,
};
pub use metrics::GenerationMetrics;
pub use protocol::{
    Backend, ChatMessage, Event, EventSink, FailureKind, GenerateJob, ModelInfo, Prompt, Request,
    RequestId, SamplingParams, TurnStats, MAX_LOOPS,
};
pub use score::{
    score, score_incremental, Comparison, IncrementalScore, Score, LOGPROB_ERROR_FLOOR,
};
pub use worker::{Engine, EngineOptions};

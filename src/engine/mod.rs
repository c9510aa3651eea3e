//! The engine: a worker thread that owns the model and cache, the request/event protocol,
//! generation, scoring and benchmarks.

mod bench;
mod generate;
mod metrics;
mod protocol;
mod worker;

pub use bench::{
    bench_followup, bench_ids, bench_loop_counts, copy_bandwidth, synthetic_model, FollowupBench,
    LoopBench,
};
pub use generate::{
    generate, score, GenerateRequest, Generation, GenerationObserver, Score, StepControl,
    StopReason,
};
pub use metrics::GenerationMetrics;
pub use protocol::{Event, ModelInfo, Request, TurnStats};
pub use worker::{Engine, EngineOptions};

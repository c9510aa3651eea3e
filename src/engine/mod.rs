//! The engine: runs generation, scoring and benchmarks over a model and its cache.

mod bench;
mod generate;
mod metrics;

pub use bench::{bench_followup, bench_ids, bench_loops, FollowupBench, LoopBench};
pub use generate::{generate, score, GenerateRequest, Generation, Score, StopReason};
pub use metrics::GenerationMetrics;

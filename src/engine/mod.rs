//! The engine: runs generation and scoring over a model and its cache, with metrics.

mod generate;
mod metrics;

pub use generate::{generate, score, GenerateRequest, Generation, Score, StopReason};
pub use metrics::GenerationMetrics;

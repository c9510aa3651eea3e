//! plait: a terminal coding assistant that runs Parallel Loop Transformer models locally.

pub mod config;
pub mod engine;
pub mod model;
pub mod patch;
pub mod serve;
pub mod tui;

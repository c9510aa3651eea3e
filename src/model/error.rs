//! Errors raised while loading or running a model.

use std::path::PathBuf;

/// Everything that can go wrong in `model`; each variant names its culprit.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file or directory the checkpoint needs is not there.
    #[error("{what} not found: {}", path.display())]
    NotFound {
        /// What the path should have been (e.g. "model directory").
        what: &'static str,
        /// The path that was looked for.
        path: PathBuf,
    },
    /// Reading a file failed.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file being read.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A JSON file could not be parsed, or a field has the wrong type or value.
    #[error("{}: field `{field}`: {message}", path.display())]
    Config {
        /// The JSON file.
        path: PathBuf,
        /// Dotted path of the field ("." when the whole file is wrong).
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// `model_type` names an architecture plait does not run.
    #[error("{}: unknown model_type `{found}` (supported: {supported})", path.display())]
    UnknownModelType {
        /// The config.json.
        path: PathBuf,
        /// The model_type it declares.
        found: String,
        /// The model types plait runs.
        supported: &'static str,
    },
    /// `PLAIT_CPU_KERNELS` names no kernel path, or one this CPU cannot run.
    #[error("PLAIT_CPU_KERNELS={value}: {reason}")]
    CpuKernels {
        /// The value given.
        value: String,
        /// What is wrong, and the valid values.
        reason: String,
    },
    /// A GGUF file is not readable, truncated, or of an unsupported kind.
    #[error("{}: {message}", path.display())]
    Gguf {
        /// The GGUF file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A safetensors file is truncated or corrupt.
    #[error("{}: not a valid safetensors file: {message}", path.display())]
    Safetensors {
        /// The weights file.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// The shard index names a shard file that does not exist.
    #[error("{}: shard `{shard}` listed for tensor `{tensor}` does not exist", index.display())]
    MissingShard {
        /// The model.safetensors.index.json.
        index: PathBuf,
        /// The missing shard's file name.
        shard: String,
        /// One tensor routed to it.
        tensor: String,
    },
    /// The checkpoint lacks a tensor the architecture needs.
    #[error("tensor `{name}` is missing from the checkpoint")]
    MissingTensor {
        /// Checkpoint name of the tensor.
        name: String,
    },
    /// A tensor has a shape other than the config implies.
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?}")]
    TensorShape {
        /// Checkpoint name of the tensor.
        name: String,
        /// Shape the config implies.
        expected: Vec<usize>,
        /// Shape in the file.
        found: Vec<usize>,
    },
    /// A tensor is stored in a dtype plait does not load.
    #[error("tensor `{name}` has unsupported dtype {dtype} (expected f32, f16 or bf16)")]
    TensorDtype {
        /// Checkpoint name of the tensor.
        name: String,
        /// The dtype found.
        dtype: String,
    },
    /// A loop count outside 1..=8 was asked for.
    #[error("loop count {0} is out of range: plait runs 1..={MAX_LOOPS} loops")]
    LoopCount(usize),
    /// More than one loop was asked of a checkpoint that has no PLT gates.
    #[error("cannot run {0} loops: the checkpoint has no PLT gates (model.layers.N.self_attn.plt_gate.*), so it runs at 1 loop")]
    NoPltGates(usize),
    /// Scoring needs at least two tokens.
    #[error("perplexity needs at least 2 token ids, got {0}")]
    TooFewTokens(usize),
    /// A tokenizer file could not be read or converted.
    #[error("{}: {message}", path.display())]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Encoding or decoding text failed.
    #[error("tokenizer: {0}")]
    Encode(String),
    /// A chat template failed to compile or render.
    #[error("chat template {name}: {message}")]
    Template {
        /// Where the template came from.
        name: String,
        /// The template engine's message, with the line.
        message: String,
    },
    /// A batched decode step was given a different number of caches and tokens.
    #[error("a decode batch of {caches} caches was given {ids} tokens")]
    BatchShape {
        /// Caches in the batch.
        caches: usize,
        /// Tokens given.
        ids: usize,
    },
    /// A forward pass was asked for no tokens.
    #[error("no tokens to run")]
    EmptyInput,
    /// A token id is not in the vocabulary.
    #[error("token id {id} is outside the vocabulary (size {vocab_size})")]
    TokenOutOfRange {
        /// The offending id.
        id: u32,
        /// Vocabulary size of the model.
        vocab_size: usize,
    },
    /// The sequence would exceed the model's context length.
    #[error("sequence of {len} tokens exceeds the model's context of {max} positions")]
    ContextOverflow {
        /// Requested length.
        len: usize,
        /// max_position_embeddings.
        max: usize,
    },
    /// The device asked for cannot be used.
    #[error("{0}")]
    Device(String),
    /// A tensor operation failed.
    #[error("{}", candle_message(.0))]
    Candle(#[from] candle_core::Error),
}

/// The largest loop count plait runs.
pub const MAX_LOOPS: usize = 8;

/// Result alias for the model module.
pub type Result<T> = std::result::Result<T, ModelError>;

/// A candle error's own message, without the path and backtrace candle wraps it in (with
/// `RUST_BACKTRACE` set, candle captures one); the backtrace goes to the log only.
pub(crate) fn candle_message(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithPath { inner, .. } => candle_message(inner),
        candle_core::Error::WithBacktrace { inner, backtrace } => {
            tracing::debug!("candle error backtrace:\n{backtrace}");
            candle_message(inner)
        }
        other => other.to_string(),
    }
}

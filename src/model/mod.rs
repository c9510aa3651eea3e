//! The model: config, weights, the PLT forward pass, its cache, and sampling.

mod bundle;
mod cache;
mod chat;
mod config;
mod convert;
mod device;
mod error;
mod gguf;
mod gguf_tokenizer;
pub(crate) mod kernels;
mod plt;
mod sampling;
mod sentencepiece;
mod tokenizer;
mod weights;

pub use bundle::LoadedModel;
pub use cache::PltCache;
pub use chat::{ChatMessage, ChatTemplate, CHATML_TEMPLATE};
pub use config::{generation_eos_ids, PltConfig, TokenIds, SUPPORTED_MODEL_TYPES};
pub use convert::{convert_to_gguf, ConvertSummary, Quant};
pub use device::{parse_dtype, DeviceSpec, Placement, NO_CUDA};
pub use error::{ModelError, Result, MAX_LOOPS};
pub use gguf::{gguf_tensor_name, GgufWeights, LIFT_WINDOW};
pub use gguf_tokenizer::{chat_template_from_gguf, tokenizer_from_gguf};
pub use kernels::{CpuKernels, Isa};
pub use plt::{Logits, PltModel, PREFILL_CHUNK};
pub use sampling::{Sampler, SamplingParams};
pub use sentencepiece::{SpmError, SpmModel};
pub use tokenizer::{TextStream, TextTokenizer, TokenizerConfig};
pub use weights::Checkpoint;

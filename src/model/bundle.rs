//! A model directory loaded whole: weights, tokenizer, chat template and stop ids.

use std::path::Path;

use candle_core::Device;

use super::chat::ChatTemplate;
use super::config::generation_eos_ids;
use super::error::Result;
use super::plt::PltModel;
use super::tokenizer::{TextTokenizer, TokenizerConfig};

/// Everything needed to chat with a checkpoint.
pub struct LoadedModel {
    /// The network.
    pub model: PltModel,
    /// Its tokenizer, when the directory has one.
    pub tokenizer: Option<TextTokenizer>,
    /// Its chat template (ChatML when it ships none).
    pub template: ChatTemplate,
    /// Ids generation stops on: config.json's, generation_config.json's and the tokenizer's EOS.
    pub stop_ids: Vec<u32>,
}

impl LoadedModel {
    /// Loads a checkpoint directory in the LoopCoder-V2 layout.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let model = PltModel::load(dir, device)?;
        let config = TokenizerConfig::from_dir(dir)?;
        let tokenizer = TextTokenizer::from_dir(dir, &config)?;
        let template = ChatTemplate::from_dir(dir, &config)?;
        let mut stop_ids = model.config().eos_token_ids.clone();
        stop_ids.extend(generation_eos_ids(&dir.join("generation_config.json"))?);
        stop_ids.extend(tokenizer.as_ref().and_then(TextTokenizer::eos_id));
        stop_ids.sort_unstable();
        stop_ids.dedup();
        Ok(Self {
            model,
            tokenizer,
            template,
            stop_ids,
        })
    }
}

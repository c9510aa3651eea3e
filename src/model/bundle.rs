//! A model directory loaded whole: weights, tokenizer, chat template and stop ids.

use std::path::Path;

use candle_core::Device;

use super::chat::{ChatTemplate, CHATML_TEMPLATE};
use super::config::generation_eos_ids;
use super::device::Placement;
use super::error::Result;
use super::gguf::GgufWeights;
use super::gguf_tokenizer::{chat_template_from_gguf, tokenizer_from_gguf};
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
    /// Loads a checkpoint directory in the LoopCoder-V2 layout, or a `.gguf` file, in the
    /// device's default dtype.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        Self::load_with_progress(dir, &Placement::new(device.clone(), None), &mut |_| {})
    }

    /// `load` onto a placement, reporting the fraction of the weights loaded.
    pub fn load_with_progress(
        dir: &Path,
        placement: &Placement,
        progress: &mut dyn FnMut(f32),
    ) -> Result<Self> {
        if dir.is_file() {
            return Self::load_gguf(dir, placement, progress);
        }
        let model = PltModel::load_with_progress(dir, placement, progress)?;
        let config = TokenizerConfig::from_dir(dir)?;
        let tokenizer = TextTokenizer::from_dir(dir, &config)?;
        let template = ChatTemplate::from_dir(dir, &config)?;
        let mut stop_ids = model.config().eos_token_ids.clone();
        stop_ids.extend(generation_eos_ids(&dir.join("generation_config.json"))?);
        stop_ids.extend(tokenizer.as_ref().and_then(TextTokenizer::eos_id));
        Ok(Self::assemble(model, tokenizer, template, stop_ids))
    }

    /// A GGUF file carries its tokenizer and chat template in its metadata.
    fn load_gguf(
        path: &Path,
        placement: &Placement,
        progress: &mut dyn FnMut(f32),
    ) -> Result<Self> {
        let mut gguf = GgufWeights::open(path, &placement.device)?;
        let model = PltModel::from_gguf(&mut gguf, placement, progress)?;
        let tokenizer = tokenizer_from_gguf(gguf.content(), path)?;
        let template = match chat_template_from_gguf(gguf.content()) {
            Some(text) => ChatTemplate::new(
                &format!("{} (tokenizer.chat_template)", path.display()),
                text,
                tokenizer
                    .bos_id()
                    .map(|id| tokenizer.decode(&[id]))
                    .transpose()?
                    .unwrap_or_default(),
                tokenizer
                    .eos_id()
                    .map(|id| tokenizer.decode(&[id]))
                    .transpose()?
                    .unwrap_or_default(),
            )?,
            None => {
                tracing::warn!("{} has no chat template; using ChatML", path.display());
                ChatTemplate::new(
                    "ChatML (built in)",
                    CHATML_TEMPLATE.to_string(),
                    String::new(),
                    String::new(),
                )?
            }
        };
        let mut stop_ids = model.config().eos_token_ids.clone();
        stop_ids.extend(tokenizer.eos_id());
        Ok(Self::assemble(model, Some(tokenizer), template, stop_ids))
    }

    fn assemble(
        model: PltModel,
        tokenizer: Option<TextTokenizer>,
        template: ChatTemplate,
        mut stop_ids: Vec<u32>,
    ) -> Self {
        stop_ids.sort_unstable();
        stop_ids.dedup();
        Self {
            model,
            tokenizer,
            template,
            stop_ids,
        }
    }
}

//! The conversation policy every front end shares (the TUI's worker, `ask`, a server): a
//! conversation's messages rendered with the model's chat template and fitted to the
//! context, with room left for the answer.

use crate::model::{self, LoadedModel, ModelError, Result, TextTokenizer};

use super::protocol::ChatMessage;

/// A conversation's prompt, fitted to the context.
pub struct ConversationPrompt {
    /// The prompt's token ids.
    pub ids: Vec<u32>,
    /// The oldest messages left out so that it fits.
    pub dropped_messages: usize,
    /// The most tokens the answer may have: what was asked, within the room left.
    pub max_tokens: usize,
}

/// The prompt for `messages`, rendered with `loaded`'s chat template and encoded by
/// `tokenizer` (the model's), within `context` positions with room left for an answer
/// (`max_tokens`, or when `None` all the room left). With `drop_oldest`, the oldest messages
/// after the system prompt are left out (a question with its answer) until it fits; a
/// prompt that does not fit otherwise is an error.
pub fn conversation_prompt(
    loaded: &LoadedModel,
    tokenizer: &TextTokenizer,
    messages: &[ChatMessage],
    tools: &[serde_json::Value],
    max_tokens: Option<usize>,
    context: usize,
    drop_oldest: bool,
) -> Result<ConversationPrompt> {
    // Room for at least a short answer, even when max_tokens asks for more than fits.
    let answer_room = max_tokens.map_or(1, |n| n.clamp(1, (context / 4).max(1)));
    let max_tokens = max_tokens.unwrap_or(usize::MAX);
    let system = usize::from(messages.first().is_some_and(|m| m.role == "system"));
    let mut dropped = 0;
    loop {
        let kept: Vec<model::ChatMessage> = messages[..system]
            .iter()
            .chain(&messages[system + dropped..])
            .map(model::ChatMessage::from)
            .collect();
        let ids = tokenizer.encode(
            &loaded.template.render_with_tools(&kept, tools, true)?,
            false,
        )?;
        if ids.len() + answer_room <= context {
            return Ok(ConversationPrompt {
                max_tokens: max_tokens.min(context - ids.len()),
                ids,
                dropped_messages: dropped,
            });
        }
        if !drop_oldest || system + dropped + 1 >= messages.len() {
            // Only the system prompt and the last message are left, and they do not fit.
            return Err(ModelError::ContextOverflow {
                len: ids.len() + answer_room,
                max: context,
            });
        }
        dropped += 1;
        // A conversation starts with a question: never keep an answer without its message.
        while system + dropped + 1 < messages.len() && messages[system + dropped].role != "user" {
            dropped += 1;
        }
    }
}

/// A raw prompt's room for an answer: `max_tokens` (or all the room left) within `context`;
/// a prompt that leaves no room is an error.
pub fn raw_prompt(
    ids: Vec<u32>,
    max_tokens: Option<usize>,
    context: usize,
) -> Result<ConversationPrompt> {
    if ids.is_empty() {
        return Err(ModelError::EmptyInput);
    }
    if ids.len() >= context {
        return Err(ModelError::ContextOverflow {
            len: ids.len() + 1,
            max: context,
        });
    }
    Ok(ConversationPrompt {
        max_tokens: max_tokens.unwrap_or(usize::MAX).min(context - ids.len()),
        ids,
        dropped_messages: 0,
    })
}

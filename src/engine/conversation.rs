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

/// The order in which a conversation gives way to fit a context: the oldest messages
/// after the system prompt first, a question with its answers, never the last message.
pub struct DropOrder<'a> {
    messages: &'a [ChatMessage],
    /// 1 when the first message is the system prompt.
    system: usize,
    dropped: usize,
}

impl<'a> DropOrder<'a> {
    /// Nothing dropped yet.
    pub fn new(messages: &'a [ChatMessage]) -> Self {
        let system = usize::from(messages.first().is_some_and(|m| m.role == "system"));
        Self {
            messages,
            system,
            dropped: 0,
        }
    }

    /// The messages kept now.
    pub fn kept(&self) -> Vec<ChatMessage> {
        self.messages[..self.system]
            .iter()
            .chain(&self.messages[self.system + self.dropped..])
            .cloned()
            .collect()
    }

    /// How many messages are left out.
    pub fn dropped(&self) -> usize {
        self.dropped
    }

    /// Leaves out the next oldest question with its answers; false when only the system
    /// prompt and the last message are left.
    pub fn drop_oldest(&mut self) -> bool {
        let (system, len) = (self.system, self.messages.len());
        if system + self.dropped + 1 >= len {
            return false;
        }
        self.dropped += 1;
        // A conversation starts with a question: never keep an answer without its message.
        while system + self.dropped + 1 < len && self.messages[system + self.dropped].role != "user"
        {
            self.dropped += 1;
        }
        true
    }
}

/// Room kept for the answer when fitting: at least a short one, even when `max_tokens`
/// asks for more than fits.
pub fn answer_room(max_tokens: Option<usize>, context: usize) -> usize {
    max_tokens.map_or(1, |n| n.clamp(1, (context / 4).max(1)))
}

/// `messages` (and `tools`) rendered with `loaded`'s chat template, the assistant's turn
/// opened, and encoded by `tokenizer`.
pub fn encode_conversation(
    loaded: &LoadedModel,
    tokenizer: &TextTokenizer,
    messages: &[ChatMessage],
    tools: &[serde_json::Value],
) -> Result<Vec<u32>> {
    let messages: Vec<model::ChatMessage> = messages.iter().map(model::ChatMessage::from).collect();
    tokenizer.encode(
        &loaded.template.render_with_tools(&messages, tools, true)?,
        false,
    )
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
    let room = answer_room(max_tokens, context);
    let max_tokens = max_tokens.unwrap_or(usize::MAX);
    let mut order = DropOrder::new(messages);
    loop {
        let ids = encode_conversation(loaded, tokenizer, &order.kept(), tools)?;
        if ids.len() + room <= context {
            return Ok(ConversationPrompt {
                max_tokens: max_tokens.min(context - ids.len()),
                ids,
                dropped_messages: order.dropped(),
            });
        }
        if !drop_oldest || !order.drop_oldest() {
            // Only the system prompt and the last message are left, and they do not fit.
            return Err(ModelError::ContextOverflow {
                len: ids.len() + room,
                max: context,
            });
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

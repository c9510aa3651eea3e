//! Chat templates rendered with minijinja the way Hugging Face renders them.

use std::path::Path;

use minijinja::{Environment, Error, ErrorKind, Value};
use serde::Serialize;

use super::error::{ModelError, Result};
use super::tokenizer::TokenizerConfig;

/// The template used when a model ships none.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

const TEMPLATE_NAME: &str = "chat_template";

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The message text.
    pub content: String,
}

impl ChatMessage {
    /// A message with the given role.
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Self {
            role: role.to_string(),
            content: content.into(),
        }
    }
}

/// A compiled chat template with the special tokens it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    /// Whether the template reads a `tools` list (HF's convention for tool calling).
    reads_tools: bool,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// The model's template: `chat_template.jinja`, else `tokenizer_config.json`'s
    /// `chat_template` (a string, or a list of named ones: "default" or the first);
    /// ChatML when there is none (logged once, here).
    pub fn from_dir(dir: &Path, config: &TokenizerConfig) -> Result<Self> {
        let (source, text) = match Self::find(dir, config)? {
            Some(found) => found,
            None => {
                tracing::warn!("{} has no chat template; using ChatML", dir.display());
                ("ChatML (built in)".to_string(), CHATML_TEMPLATE.to_string())
            }
        };
        Self::new(
            &source,
            text,
            TokenizerConfig::token_text(config.bos_token.as_ref()).unwrap_or_default(),
            TokenizerConfig::token_text(config.eos_token.as_ref()).unwrap_or_default(),
        )
    }

    /// The template text a checkpoint directory ships, if any.
    pub fn source_text(dir: &Path, config: &TokenizerConfig) -> Result<Option<String>> {
        Ok(Self::find(dir, config)?.map(|(_, text)| text))
    }

    /// (where it came from, text) of the directory's template.
    fn find(dir: &Path, config: &TokenizerConfig) -> Result<Option<(String, String)>> {
        let file = dir.join("chat_template.jinja");
        if file.is_file() {
            let text = std::fs::read_to_string(&file).map_err(|source| ModelError::Io {
                path: file.clone(),
                source,
            })?;
            return Ok(Some((file.display().to_string(), text)));
        }
        let from_config = template_from_config(config, dir)?;
        Ok(from_config.map(|text| {
            (
                dir.join("tokenizer_config.json").display().to_string(),
                text,
            )
        }))
    }

    /// Compiles a template; `source` names it in errors.
    pub fn new(source: &str, text: String, bos_token: String, eos_token: String) -> Result<Self> {
        let mut env = Environment::new();
        // HF renders with trim_blocks and lstrip_blocks on and keep_trailing_newline off.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        let reads_tools = text.contains("tools");
        env.add_template_owned(TEMPLATE_NAME, text)
            .map_err(|e| template_error(source, &e))?;
        Ok(Self {
            env,
            source: source.to_string(),
            reads_tools,
            bos_token,
            eos_token,
        })
    }

    /// Where the template came from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether tools given to [`Self::render_with_tools`] reach the prompt.
    pub fn supports_tools(&self) -> bool {
        self.reads_tools
    }

    /// Renders the conversation, ending with the assistant's header when asked.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.render_with_tools(messages, &[], add_generation_prompt)
    }

    /// Renders the conversation with the tools it may call (HF's `tools`: a list of
    /// `{"type": "function", "function": {...}}`; none leaves `tools` undefined).
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: &[serde_json::Value],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| template_error(&self.source, &e))?;
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                tools => (!tools.is_empty()).then_some(tools),
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| template_error(&self.source, &e))
    }
}

fn template_from_config(config: &TokenizerConfig, dir: &Path) -> Result<Option<String>> {
    let bad = |message: &str| ModelError::Config {
        path: dir.join("tokenizer_config.json"),
        field: "chat_template".into(),
        message: message.into(),
    };
    match &config.chat_template {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(serde_json::Value::Array(list)) => {
            let named = |name: &str| {
                list.iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some(name))
            };
            let chosen = named("default")
                .or(list.first())
                .ok_or_else(|| bad("is an empty list"))?;
            chosen
                .get("template")
                .and_then(|t| t.as_str())
                .map(|t| Some(t.to_string()))
                .ok_or_else(|| bad("a list entry has no `template` string"))
        }
        Some(_) => Err(bad("must be a string or a list of {name, template}")),
    }
}

/// The engine's message with the template line it points at.
fn template_error(source: &str, e: &Error) -> ModelError {
    let mut message = match e.kind() {
        ErrorKind::InvalidOperation => e.detail().unwrap_or("raised an exception").to_string(),
        _ => e.to_string(),
    };
    if let Some(line) = e.line() {
        if !message.contains("line") {
            message = format!("{message} (line {line})");
        }
    }
    ModelError::Template {
        name: source.to_string(),
        message,
    }
}

fn raise_exception(message: String) -> std::result::Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

fn strftime_now(format: String) -> std::result::Result<String, Error> {
    use chrono::format::{Item, StrftimeItems};
    let items: Vec<Item<'_>> = StrftimeItems::new(&format).collect();
    if items.iter().any(|i| matches!(i, Item::Error)) {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: invalid format {format:?}"),
        ));
    }
    Ok(chrono::Local::now()
        .format_with_items(items.into_iter())
        .to_string())
}

/// Python's `json.dumps(value, ensure_ascii=False)`: `", "` and `": "` separators, or an indent.
fn tojson(value: Value, indent: Option<usize>) -> std::result::Result<Value, Error> {
    let mut out = Vec::new();
    let result = match indent {
        Some(n) => {
            let pad = vec![b' '; n];
            let mut ser = serde_json::Serializer::with_formatter(
                &mut out,
                serde_json::ser::PrettyFormatter::with_indent(&pad),
            );
            value.serialize(&mut ser)
        }
        None => {
            let mut ser = serde_json::Serializer::with_formatter(&mut out, PythonFormatter);
            value.serialize(&mut ser)
        }
    };
    result.map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let text = String::from_utf8(out)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    Ok(Value::from_safe_string(text))
}

fn item_separator<W: ?Sized + std::io::Write>(writer: &mut W, first: bool) -> std::io::Result<()> {
    if first {
        Ok(())
    } else {
        writer.write_all(b", ")
    }
}

/// serde_json's compact output with Python's default separators.
struct PythonFormatter;

impl serde_json::ser::Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        item_separator(writer, first)
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        item_separator(writer, first)
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(text: &str, messages: &[ChatMessage]) -> Result<String> {
        ChatTemplate::new("test", text.to_string(), "<s>".into(), "</s>".into())?
            .render(messages, true)
    }

    #[test]
    fn chatml_fallback_renders_a_generation_prompt() {
        let out = render(CHATML_TEMPLATE, &[ChatMessage::new("user", "hi")]).unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn blocks_are_trimmed_and_python_string_methods_work() {
        let t = "{% for m in messages %}\n  {% if m.role == 'user' %}\n{{ m.content.strip().upper() }}|{{ m | tojson }}\n  {% endif %}\n{% endfor %}";
        let out = render(t, &[ChatMessage::new("user", "  héllo  ")]).unwrap();
        assert_eq!(
            out,
            "HÉLLO|{\"role\": \"user\", \"content\": \"  héllo  \"}\n"
        );
    }

    #[test]
    fn raise_exception_shows_its_message() {
        let e = render(
            "{{ raise_exception('only user and assistant roles') }}",
            &[],
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("only user and assistant roles"),
            "{e}"
        );
    }

    #[test]
    fn a_syntax_error_gives_the_line() {
        let e = render("line one\n{% for m in messages %}\n{{ m.content }\n", &[]).unwrap_err();
        assert!(e.to_string().contains("line 3"), "{e}");
    }

    #[test]
    fn strftime_now_formats_the_date() {
        let out = render("{{ strftime_now('%Y') }}", &[]).unwrap();
        assert_eq!(out.len(), 4, "{out}");
        assert!(render("{{ strftime_now('%Q') }}", &[]).is_err());
    }
}

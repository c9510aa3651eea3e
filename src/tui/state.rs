//! The TUI's state: the chat, the composer, the readout, the review, and the events and
//! effects that pass between the update function and the runtime.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::time::Duration;

use crossterm::event::KeyEvent;

use crate::engine::{
    ChatMessage, Event as EngineEvent, ModelInfo, Request, RequestId, SamplingParams,
};
use crate::patch::{Edit, FileChange};

use super::cells::{AnswerStatus, Cell, ErrorCell, Look, NoticeCell};
use super::composer::Composer;
use super::markdown::Theme;
use super::review::Review;

/// Token latencies kept for the sparkline.
pub const SPARKLINE_LEN: usize = 40;

/// What the engine is doing, as the status line shows it.
#[derive(Debug, Clone, PartialEq)]
pub enum EngineState {
    /// Loading the model (fraction done).
    Loading(f32),
    /// Loading failed.
    Failed,
    /// The backend cannot be reached yet; it keeps trying.
    Offline,
    /// Ready.
    Idle,
    /// Computing the prompt (fraction done).
    Prefill(f32),
    /// Streaming an answer.
    Generating,
}

/// Which part of the screen takes keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Focus {
    /// The message box.
    Input,
    /// The chat history (keys scroll it).
    Chat,
    /// The diff pane (keys review hunks).
    Diff,
}

/// The live figures of the status line.
#[derive(Debug, Clone, PartialEq)]
pub struct Readout {
    /// Model name.
    pub model: String,
    /// Loop count in use.
    pub loops: usize,
    /// Loop count the checkpoint was trained with.
    pub trained_loops: usize,
    /// Engine state.
    pub state: EngineState,
    /// Time to first token of the current or last answer.
    pub ttft: Option<Duration>,
    /// Decode speed of the current or last answer.
    pub tok_s: Option<f64>,
    /// The last token latencies, oldest first.
    pub latencies: VecDeque<Duration>,
    /// Positions in the cache.
    pub context_used: usize,
    /// Model context size.
    pub context_size: usize,
    /// Prompt positions served from the kept cache on the last turn.
    pub cached_tokens: usize,
    /// Tokens of the current answer and their summed latency (for the live speed).
    pub(super) turn_tokens: usize,
    pub(super) turn_decode_time: Duration,
}

/// Settings a request carries.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// How to pick tokens.
    pub sampling: SamplingParams,
    /// Most tokens per answer.
    pub max_tokens: usize,
    /// System prompt, if any.
    pub system_prompt: Option<String>,
}

/// Everything the screen shows.
#[derive(Debug, Clone)]
pub struct App {
    /// The conversation and notices.
    pub cells: Vec<Cell>,
    /// The message being typed, and the ones sent.
    pub composer: Composer,
    /// Lines scrolled up from the bottom of the chat (0 follows new text), kept within the
    /// chat's height by the update.
    pub scroll_from_bottom: usize,
    /// The terminal's size (columns, rows), as the last resize reported it.
    pub screen: (u16, u16),
    /// Which part takes keys.
    pub focus: Focus,
    /// Whether the help overlay is open.
    pub help: bool,
    /// Whether one Ctrl+C was pressed while idle.
    pub quit_armed: bool,
    /// The status line's figures.
    pub readout: Readout,
    /// Facts about the loaded model.
    pub model_info: Option<ModelInfo>,
    /// Files whose contents go into the context, with their text.
    pub files: Vec<(PathBuf, String)>,
    /// Request settings.
    pub settings: Settings,
    /// Whether colours are allowed (NO_COLOR unset).
    pub color: bool,
    /// Light or dark terminal background.
    pub theme: Theme,
    /// KV bytes after the last turn.
    pub kv_bytes: usize,
    /// Id of the last request sent to the engine (what a cancel names).
    pub request: RequestId,
    /// Edits of the last answer, under review in the diff pane.
    pub review: Option<Review>,
    /// Whether the diff pane takes most of the screen.
    pub diff_large: bool,
    /// Hashes of the files the model was shown for the current answer, by path.
    pub(super) reply_hashes: HashMap<String, u64>,
    /// Whether `/retry` waits for the context files to be read again.
    pub(super) retry_pending: bool,
    /// Edits found so far in the streaming answer.
    pub(super) edits_seen: usize,
    /// Failed edits sent back to the model since the user's last message.
    pub(super) edit_retries: usize,
    /// Whether an apply that deletes files waits for a second `a` or `/apply`.
    pub(super) confirm_delete: bool,
    /// Whether answers show their reasoning in full (otherwise one line says it is there).
    pub show_reasoning: bool,
}

/// What happened: a key, paste, mouse wheel, resize, an engine event, or a file read.
#[derive(Debug, Clone, PartialEq)]
pub enum AppEvent {
    /// A key press.
    Key(KeyEvent),
    /// The terminal's new size.
    Resize {
        /// Columns.
        width: u16,
        /// Rows.
        height: u16,
    },
    /// Bracketed paste.
    Paste(String),
    /// Mouse wheel: positive scrolls up.
    Wheel(i32),
    /// The engine reported something.
    Engine(EngineEvent),
    /// A file asked for by `/add` was read.
    FileRead {
        /// The path as given.
        path: PathBuf,
        /// Its text, or the error.
        result: Result<String, String>,
    },
    /// A transcript was saved (or not).
    Saved(Result<PathBuf, String>),
    /// The files a message names with `@path` were read.
    AttachmentsRead(Vec<(PathBuf, Result<String, String>)>),
    /// The edits of an answer were checked against the files.
    EditsPrepared {
        /// The changes, or why the edits cannot apply.
        result: Result<Vec<FileChange>, String>,
        /// Whether the answer is complete (a failure then goes back to the model).
        complete: bool,
        /// Where inferred edits were anchored; empty for explicit edits.
        anchors: Vec<String>,
    },
    /// Accepted hunks were written (the paths), or nothing was.
    Applied(Result<Vec<String>, String>),
    /// The last applied set was reverted (the paths; `None`: nothing to undo), or not.
    Undone(Result<Option<Vec<String>>, String>),
    /// The context files were read again.
    FilesRefreshed(Vec<(PathBuf, Result<String, String>)>),
}

/// What the runtime must do after an update.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Send a request to the engine.
    Send(Request),
    /// Read a file, then report `AppEvent::FileRead`.
    ReadFile(PathBuf),
    /// Read the files a message attaches, then report `AppEvent::AttachmentsRead`.
    ReadAttachments(Vec<PathBuf>),
    /// Write the transcript, then report `AppEvent::Saved`.
    Save {
        /// Where.
        path: PathBuf,
        /// The markdown.
        text: String,
    },
    /// Check edits against the workspace, then report `AppEvent::EditsPrepared`.
    PrepareEdits {
        /// The edits, in reply order.
        edits: Vec<Edit>,
        /// Hashes of the files as the model saw them, by path.
        expected: HashMap<String, u64>,
        /// Whether the answer is complete.
        complete: bool,
        /// Where inferred edits were anchored; empty for explicit edits.
        anchors: Vec<String>,
    },
    /// Write the accepted hunks, then report `AppEvent::Applied`.
    Apply(Vec<(FileChange, Vec<bool>)>),
    /// Revert the last applied set, then report `AppEvent::Undone`.
    Undo {
        /// Overwrite files changed since the apply.
        force: bool,
    },
    /// Read the context files again, then report `AppEvent::FilesRefreshed`.
    RefreshFiles(Vec<PathBuf>),
    /// Leave.
    Quit,
}

impl App {
    /// A fresh session for `model` (name shown while it loads).
    pub fn new(model: &str, settings: Settings, color: bool) -> Self {
        Self {
            cells: Vec::new(),
            composer: Composer::default(),
            scroll_from_bottom: 0,
            screen: (80, 24),
            focus: Focus::Input,
            help: false,
            quit_armed: false,
            readout: Readout {
                model: model.to_string(),
                loops: 1,
                trained_loops: 1,
                state: EngineState::Loading(0.0),
                ttft: None,
                tok_s: None,
                latencies: VecDeque::new(),
                context_used: 0,
                context_size: 0,
                cached_tokens: 0,
                turn_tokens: 0,
                turn_decode_time: Duration::ZERO,
            },
            model_info: None,
            files: Vec::new(),
            settings,
            color,
            theme: Theme::Dark,
            kv_bytes: 0,
            request: 0,
            review: None,
            diff_large: false,
            reply_hashes: HashMap::new(),
            retry_pending: false,
            edits_seen: 0,
            edit_retries: 0,
            confirm_delete: false,
            show_reasoning: false,
        }
    }

    /// Whether an answer is being computed.
    pub fn busy(&self) -> bool {
        matches!(
            self.readout.state,
            EngineState::Prefill(_) | EngineState::Generating
        )
    }

    /// How cells are drawn `width` columns wide.
    pub fn look(&self, width: u16) -> Look {
        Look {
            width,
            color: self.color,
            theme: self.theme,
            reasoning: self.show_reasoning,
        }
    }

    /// Adds plait's own note to the chat.
    pub(super) fn notice(&mut self, text: impl Into<String>) {
        self.cells.push(Cell::Notice(NoticeCell::new(text)));
    }

    /// Adds a failure to the chat.
    pub(super) fn error(&mut self, message: impl Into<String>) {
        self.cells.push(Cell::Error(ErrorCell::new(message)));
    }

    /// The files the model is shown: the context files, then those attached to messages.
    pub(super) fn shown_files(&self) -> impl Iterator<Item = &(PathBuf, String)> {
        self.files
            .iter()
            .chain(self.cells.iter().flat_map(|c| match c {
                Cell::User(user) => user.attachments(),
                _ => &[],
            }))
    }

    /// The conversation as the engine sees it: system prompt and context files first.
    pub fn messages(&self) -> Vec<ChatMessage> {
        let mut system = self.settings.system_prompt.clone().unwrap_or_default();
        if !self.files.is_empty() {
            if !system.is_empty() {
                system.push_str("\n\n");
            }
            system.push_str("Files in the conversation:\n");
            for (path, text) in &self.files {
                system.push_str(&format!(
                    "\n{}\n```\n{}\n```\n",
                    path.display(),
                    text.trim_end()
                ));
            }
        }
        let mut messages = Vec::new();
        if !system.is_empty() {
            messages.push(ChatMessage::new("system", system));
        }
        for cell in &self.cells {
            match cell {
                Cell::User(user) => messages.push(ChatMessage::new("user", user.content())),
                Cell::Answer(answer) => messages.push(ChatMessage::new("assistant", answer.text())),
                Cell::Notice(_) | Cell::EditSummary(_) | Cell::Error(_) => {}
            }
        }
        messages
    }

    /// The transcript as markdown.
    pub fn transcript(&self) -> String {
        let mut out = String::from("# plait transcript\n");
        for cell in &self.cells {
            let (who, text) = match cell {
                Cell::User(user) => ("You", user.text()),
                Cell::Answer(answer) => ("plait", answer.text()),
                _ => continue,
            };
            out.push_str(&format!("\n## {who}\n\n{}\n", text.trim_end()));
            if cell
                .answer()
                .is_some_and(|a| a.status() == AnswerStatus::Cancelled)
            {
                out.push_str("\n*(cancelled)*\n");
            }
        }
        out
    }
}

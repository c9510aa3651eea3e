//! The TUI's state and its update: a plain function of (state, event) returning effects.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers, MouseEventKind};

use crate::engine::{
    ChatMessage, Event as EngineEvent, GenerateJob, ModelInfo, Prompt, Request, RequestId,
    SamplingParams, StopReason, TurnStats, MAX_LOOPS,
};
use crate::patch::{content_hash, infer_edits, parse_edits, Edit, FileChange};

use super::markdown::Theme;
use super::review::Review;

/// How many times a failed edit goes back to the model for a corrected one.
const MAX_EDIT_RETRIES: usize = 2;

/// Token latencies kept for the sparkline.
pub const SPARKLINE_LEN: usize = 40;

/// Lines a mouse wheel notch scrolls.
const WHEEL_LINES: usize = 3;

/// The slash commands, with their one-line help.
pub const COMMANDS: &[(&str, &str)] = &[
    ("/help", "show keys and commands"),
    ("/loops N", "run with N loops (1..=8)"),
    ("/clear", "start a new conversation (resets the cache)"),
    ("/add PATH", "put a file's contents in the context"),
    ("/drop PATH", "take a file out of the context"),
    ("/files", "list the files in the context"),
    ("/model", "show the model's path, size and settings"),
    ("/save FILE", "save the transcript as markdown"),
    (
        "/diff",
        "show the edits of the last answer in the diff pane",
    ),
    ("/apply", "write the accepted hunks to the files"),
    (
        "/undo",
        "revert the last applied edits (--force: even if changed since)",
    ),
    (
        "/retry",
        "re-read the context files and answer the last message again",
    ),
    ("/quit", "leave plait"),
];

/// The keys, with what they do (the help overlay lists these).
pub const KEYS: &[(&str, &str)] = &[
    ("Enter", "send the message (or run the /command)"),
    ("Alt+Enter, Ctrl+J", "new line in the message"),
    ("Up / Down", "recall earlier messages (empty input)"),
    ("Alt+Up, F3", "one more loop (up to 8), from the next token"),
    ("Alt+Down, F2", "one loop fewer (down to 1)"),
    ("Esc", "cancel the answer / close this help"),
    ("Ctrl+C", "cancel; when idle, press twice to quit"),
    ("PgUp / PgDn, wheel", "scroll the chat"),
    ("Home / End", "top / bottom of the chat (empty input)"),
    ("Tab", "next focus: input, chat, diff; completes a /command"),
    (
        "Diff: j/k, Space",
        "move to the next/previous hunk; accept or reject it",
    ),
    (
        "Diff: a, A, r, f",
        "apply accepted hunks; accept all; reject all; size",
    ),
    ("F1, ?", "this help (? in an empty input)"),
];

/// Who a chat cell is from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The user's message.
    User,
    /// The model's answer.
    Assistant,
    /// A message from plait itself (command output, errors).
    Notice,
}

/// Where an answer stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CellStatus {
    /// Still streaming.
    Streaming,
    /// Complete.
    Done,
    /// Cancelled by the user; the text so far stays.
    Cancelled,
    /// Ended by an error.
    Failed,
}

/// One entry of the chat history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cell {
    /// Who it is from.
    pub role: Role,
    /// Its text (markdown for answers).
    pub text: String,
    /// Where it stands.
    pub status: CellStatus,
    /// Files attached with `@path`, sent to the model after the text but not shown.
    pub attachments: Vec<(PathBuf, String)>,
}

impl Cell {
    fn new(role: Role, text: impl Into<String>) -> Self {
        Self {
            role,
            text: text.into(),
            status: CellStatus::Done,
            attachments: Vec::new(),
        }
    }

    /// The text the model sees: the message, then any attached files.
    fn content(&self) -> String {
        let mut content = self.text.clone();
        for (path, text) in &self.attachments {
            content.push_str(&format!(
                "\n\n{}\n```\n{}\n```",
                path.display(),
                text.trim_end()
            ));
        }
        content
    }
}

/// The `@path` words of a message.
pub fn attachment_paths(text: &str) -> Vec<PathBuf> {
    text.split_whitespace()
        .filter_map(|w| w.strip_prefix('@'))
        .map(|p| p.trim_end_matches([',', '.', ';', ':', ')', '?', '!']))
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .collect()
}

/// What the engine is doing, as the status line shows it.
#[derive(Debug, Clone, PartialEq)]
pub enum EngineState {
    /// Loading the model (fraction done).
    Loading(f32),
    /// Loading failed.
    Failed,
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
    turn_tokens: usize,
    turn_decode_time: Duration,
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
    /// The message being typed.
    pub input: String,
    /// Cursor position in `input` (byte index at a char boundary).
    pub cursor: usize,
    /// Messages sent, oldest first (for Up/Down recall).
    pub sent: Vec<String>,
    recall: Option<usize>,
    /// Lines scrolled up from the bottom of the chat; 0 follows new text.
    pub scroll_from_bottom: usize,
    /// Height of the chat pane in lines (set by the renderer, used for paging).
    pub chat_height: usize,
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
    reply_hashes: HashMap<String, u64>,
    /// Whether `/retry` waits for the context files to be read again.
    retry_pending: bool,
    /// Edits found so far in the streaming answer.
    edits_seen: usize,
    /// Failed edits sent back to the model since the user's last message.
    edit_retries: usize,
    /// Whether an apply that deletes files waits for a second `a` or `/apply`.
    confirm_delete: bool,
}

/// What happened: a key, paste, mouse wheel, resize, an engine event, or a file read.
#[derive(Debug, Clone, PartialEq)]
pub enum AppEvent {
    /// A key press.
    Key(KeyEvent),
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
            input: String::new(),
            cursor: 0,
            sent: Vec::new(),
            recall: None,
            scroll_from_bottom: 0,
            chat_height: 10,
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
        }
    }

    /// Whether an answer is being computed.
    pub fn busy(&self) -> bool {
        matches!(
            self.readout.state,
            EngineState::Prefill(_) | EngineState::Generating
        )
    }

    fn notice(&mut self, text: impl Into<String>) {
        self.cells.push(Cell::new(Role::Notice, text));
    }

    /// The files the model is shown: the context files, then those attached to messages.
    fn shown_files(&self) -> impl Iterator<Item = &(PathBuf, String)> {
        self.files
            .iter()
            .chain(self.cells.iter().flat_map(|c| &c.attachments))
    }

    /// The slash commands that match what is typed, when the input is a command name.
    pub fn completions(&self) -> Vec<&'static (&'static str, &'static str)> {
        if !self.input.starts_with('/') || self.input.contains(char::is_whitespace) {
            return Vec::new();
        }
        COMMANDS
            .iter()
            .filter(|(name, _)| name.starts_with(self.input.as_str()))
            .collect()
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
            match cell.role {
                Role::User => messages.push(ChatMessage::new("user", cell.content())),
                Role::Assistant => messages.push(ChatMessage::new("assistant", cell.text.as_str())),
                Role::Notice => {}
            }
        }
        messages
    }

    /// The transcript as markdown.
    pub fn transcript(&self) -> String {
        let mut out = String::from("# plait transcript\n");
        for cell in &self.cells {
            let who = match cell.role {
                Role::User => "You",
                Role::Assistant => "plait",
                Role::Notice => continue,
            };
            out.push_str(&format!("\n## {who}\n\n{}\n", cell.text.trim_end()));
            if cell.status == CellStatus::Cancelled {
                out.push_str("\n*(cancelled)*\n");
            }
        }
        out
    }
}

/// Applies one event to the state; returns what the runtime must do.
pub fn update(app: &mut App, event: AppEvent) -> Vec<Effect> {
    match event {
        AppEvent::Key(key) if key.kind != KeyEventKind::Release => on_key(app, key),
        AppEvent::Key(_) => Vec::new(),
        AppEvent::Paste(text) => {
            let text = text.replace("\r\n", "\n").replace('\r', "\n");
            app.input.insert_str(app.cursor, &text);
            app.cursor += text.len();
            Vec::new()
        }
        AppEvent::Wheel(lines) => {
            scroll(app, lines.saturating_mul(WHEEL_LINES as i32));
            Vec::new()
        }
        AppEvent::Engine(event) => on_engine(app, event),
        AppEvent::FileRead { path, result } => {
            match result {
                Ok(text) => {
                    let lines = text.lines().count();
                    app.files.retain(|(p, _)| p != &path);
                    app.files.push((path.clone(), text));
                    app.notice(format!(
                        "added {} ({lines} lines) to the context",
                        path.display()
                    ));
                }
                Err(e) => app.notice(format!("cannot add {}: {e}", path.display())),
            }
            Vec::new()
        }
        AppEvent::AttachmentsRead(read) => attachments_read(app, read),
        AppEvent::Saved(result) => {
            match result {
                Ok(path) => app.notice(format!("saved the transcript to {}", path.display())),
                Err(e) => app.notice(format!("cannot save the transcript: {e}")),
            }
            Vec::new()
        }
        AppEvent::EditsPrepared {
            result,
            complete,
            anchors,
        } => edits_prepared(app, result, complete, anchors),
        AppEvent::Applied(result) => {
            match result {
                Ok(paths) => {
                    app.review = None;
                    if app.focus == Focus::Diff {
                        app.focus = Focus::Input;
                    }
                    app.notice(format!("applied: {} (/undo reverts)", paths.join(", ")));
                    return refresh_files(app);
                }
                Err(e) => app.notice(e),
            }
            Vec::new()
        }
        AppEvent::Undone(result) => {
            match result {
                Ok(Some(paths)) => {
                    app.notice(format!("undid the last apply: {}", paths.join(", ")));
                    return refresh_files(app);
                }
                Ok(None) => app.notice("nothing to undo"),
                Err(e) => app.notice(e),
            }
            Vec::new()
        }
        AppEvent::FilesRefreshed(read) => {
            for (path, result) in read {
                match result {
                    Ok(text) => {
                        if let Some(entry) = app.files.iter_mut().find(|(p, _)| p == &path) {
                            entry.1 = text;
                        }
                    }
                    Err(e) => {
                        app.files.retain(|(p, _)| p != &path);
                        app.notice(format!("dropped {} from the context: {e}", path.display()));
                    }
                }
            }
            if std::mem::take(&mut app.retry_pending) {
                return start_answer(app);
            }
            Vec::new()
        }
    }
}

/// The path as a key of the hash map sent with edits (`./` dropped).
fn path_key(path: &Path) -> String {
    let text = path.to_string_lossy();
    text.strip_prefix("./").unwrap_or(&text).to_string()
}

fn refresh_files(app: &App) -> Vec<Effect> {
    if app.files.is_empty() {
        return Vec::new();
    }
    vec![Effect::RefreshFiles(
        app.files.iter().map(|(p, _)| p.clone()).collect(),
    )]
}

/// Proposes the edits of the latest answer once a new one has closed (or the answer is done).
fn propose_edits(app: &mut App, complete: bool) -> Vec<Effect> {
    let Some(cell) = app.cells.iter().rev().find(|c| c.role == Role::Assistant) else {
        return Vec::new();
    };
    let edits = parse_edits(&cell.text);
    if edits.is_empty() && complete {
        return infer(app);
    }
    if edits.is_empty() || (!complete && edits.len() == app.edits_seen) {
        return Vec::new();
    }
    app.edits_seen = edits.len();
    vec![Effect::PrepareEdits {
        edits,
        expected: app.reply_hashes.clone(),
        complete,
        anchors: Vec::new(),
    }]
}

/// Proposes edits from the code blocks of an answer that wrote none in an edit format,
/// placing them in the files the model was shown.
fn infer(app: &mut App) -> Vec<Effect> {
    let Some(cell) = app.cells.iter().rev().find(|c| c.role == Role::Assistant) else {
        return Vec::new();
    };
    let context: Vec<(String, String)> = app
        .shown_files()
        .map(|(path, text)| (path_key(path), text.clone()))
        .collect();
    if context.is_empty() {
        return Vec::new();
    }
    let inference = infer_edits(&cell.text, &context);
    for reason in &inference.skipped {
        app.notice(reason.clone());
    }
    if inference.edits.is_empty() {
        return Vec::new();
    }
    let anchors = inference
        .edits
        .iter()
        .flat_map(|e| e.anchors.iter().cloned())
        .collect();
    vec![Effect::PrepareEdits {
        edits: inference.edits.into_iter().map(|e| e.edit).collect(),
        expected: app.reply_hashes.clone(),
        complete: true,
        anchors,
    }]
}

fn edits_prepared(
    app: &mut App,
    result: Result<Vec<FileChange>, String>,
    complete: bool,
    anchors: Vec<String>,
) -> Vec<Effect> {
    let inferred = !anchors.is_empty();
    match result {
        Ok(changes) if changes.is_empty() => {
            if complete {
                app.notice("the answer's edits change nothing");
            }
            Vec::new()
        }
        Ok(changes) => {
            let mut review = Review::new(changes, anchors);
            if let Some(previous) = &app.review {
                review.carry_choices_from(previous);
            }
            if complete {
                let files = review.changes.len();
                app.notice(format!(
                    "{}{} hunk{} in {files} file{} in the diff pane: Tab to review, Space toggles, a applies",
                    if inferred { "inferred from the answer's code: " } else { "" },
                    review.hunk_count(),
                    if review.hunk_count() == 1 { "" } else { "s" },
                    if files == 1 { "" } else { "s" },
                ));
            }
            app.review = Some(review);
            Vec::new()
        }
        Err(_) if !complete => Vec::new(),
        Err(e) if inferred => {
            // Inference was the fallback: the answer is not sent back for a correction.
            app.notice(format!("the inferred edit cannot be applied: {e}"));
            Vec::new()
        }
        Err(e) => {
            app.notice(format!("the edit cannot be applied: {e}"));
            if app.edit_retries >= MAX_EDIT_RETRIES {
                app.notice(format!(
                    "no corrected edit after {MAX_EDIT_RETRIES} tries: ask again or edit the file yourself"
                ));
                return Vec::new();
            }
            app.edit_retries += 1;
            app.notice(format!(
                "asking the model for a corrected edit ({}/{MAX_EDIT_RETRIES})",
                app.edit_retries
            ));
            app.cells.push(Cell::new(
                Role::User,
                format!(
                    "The edit could not be applied: {e}\n\nSend a corrected SEARCH/REPLACE block whose SEARCH lines are copied exactly from the file."
                ),
            ));
            start_answer(app)
        }
    }
}

fn apply_accepted(app: &mut App, confirmed: bool) -> Vec<Effect> {
    let Some(review) = &app.review else {
        app.notice("no edits to apply");
        return Vec::new();
    };
    if app.busy() {
        app.notice("wait for the answer to finish before applying its edits");
        return Vec::new();
    }
    if review.accepted_count() == 0 {
        app.notice("no hunk is accepted: Space accepts the selected one, A accepts all");
        return Vec::new();
    }
    let deletions = review.accepted_deletions();
    if !deletions.is_empty() && !confirmed {
        app.confirm_delete = true;
        app.notice(format!(
            "this deletes {}: press a (or /apply) again to confirm",
            deletions.join(", ")
        ));
        return Vec::new();
    }
    vec![Effect::Apply(review.selection())]
}

fn on_diff_key(app: &mut App, key: KeyEvent) -> Vec<Effect> {
    // A deletion is confirmed only by the very next action.
    let confirming = std::mem::take(&mut app.confirm_delete);
    let Some(review) = app.review.as_mut() else {
        app.focus = Focus::Input;
        return Vec::new();
    };
    match key.code {
        KeyCode::Up | KeyCode::Char('k') => review.select(-1),
        KeyCode::Down | KeyCode::Char('j') => review.select(1),
        KeyCode::Home => review.selected = 0,
        KeyCode::End => review.select(isize::MAX),
        KeyCode::Char(' ') => review.toggle_selected(),
        KeyCode::Char('A') => review.set_all(true),
        KeyCode::Char('r') => review.set_all(false),
        KeyCode::Char('f') => app.diff_large = !app.diff_large,
        KeyCode::Char('a') => return apply_accepted(app, confirming),
        _ => {}
    }
    Vec::new()
}

fn scroll(app: &mut App, up: i32) {
    if up >= 0 {
        app.scroll_from_bottom = app.scroll_from_bottom.saturating_add(up as usize);
    } else {
        app.scroll_from_bottom = app
            .scroll_from_bottom
            .saturating_sub(up.unsigned_abs() as usize);
    }
}

fn change_loops(app: &mut App, delta: i32) -> Vec<Effect> {
    let next = (app.readout.loops as i32 + delta).clamp(1, MAX_LOOPS as i32) as usize;
    if next == app.readout.loops || app.model_info.is_none() {
        return Vec::new();
    }
    app.readout.loops = next;
    vec![Effect::Send(Request::SetLoops(next))]
}

fn on_key(app: &mut App, key: KeyEvent) -> Vec<Effect> {
    let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
    let alt = key.modifiers.contains(KeyModifiers::ALT);
    if !(ctrl && key.code == KeyCode::Char('c')) {
        app.quit_armed = false;
    }
    if app.help {
        // Any key closes the help; F1/Esc/? only close it.
        app.help = false;
        if matches!(key.code, KeyCode::Esc | KeyCode::F(1) | KeyCode::Char('?')) {
            return Vec::new();
        }
    }
    match key.code {
        KeyCode::Char('c') if ctrl => {
            if app.busy() {
                return vec![Effect::Send(Request::Cancel(app.request))];
            }
            if app.quit_armed {
                return vec![Effect::Quit];
            }
            app.quit_armed = true;
            app.notice("press Ctrl+C again to quit");
            Vec::new()
        }
        KeyCode::Esc => {
            app.confirm_delete = false;
            if app.busy() {
                return vec![Effect::Send(Request::Cancel(app.request))];
            }
            app.focus = Focus::Input;
            Vec::new()
        }
        KeyCode::Up if alt => change_loops(app, 1),
        KeyCode::Down if alt => change_loops(app, -1),
        KeyCode::F(3) => change_loops(app, 1),
        KeyCode::F(2) => change_loops(app, -1),
        KeyCode::F(1) => {
            app.help = true;
            Vec::new()
        }
        KeyCode::PageUp => {
            scroll(app, app.chat_height.max(2) as i32 - 1);
            Vec::new()
        }
        KeyCode::PageDown => {
            scroll(app, -(app.chat_height.max(2) as i32 - 1));
            Vec::new()
        }
        KeyCode::Tab => {
            if let Some((name, _)) = app.completions().first() {
                let command = name.split(' ').next().unwrap_or(name);
                app.input = format!("{command} ");
                app.cursor = app.input.len();
            } else {
                app.focus = match app.focus {
                    Focus::Input => Focus::Chat,
                    Focus::Chat if app.review.is_some() => Focus::Diff,
                    Focus::Chat | Focus::Diff => Focus::Input,
                };
            }
            Vec::new()
        }
        _ if app.focus == Focus::Diff => on_diff_key(app, key),
        _ if app.focus == Focus::Chat => {
            match key.code {
                KeyCode::Up | KeyCode::Char('k') => scroll(app, 1),
                KeyCode::Down | KeyCode::Char('j') => scroll(app, -1),
                KeyCode::Home => app.scroll_from_bottom = usize::MAX / 2,
                KeyCode::End => app.scroll_from_bottom = 0,
                _ => {}
            }
            Vec::new()
        }
        _ => on_input_key(app, key, ctrl, alt),
    }
}

fn prev_boundary(s: &str, i: usize) -> usize {
    s[..i].char_indices().next_back().map_or(0, |(j, _)| j)
}

fn next_boundary(s: &str, i: usize) -> usize {
    s[i..].chars().next().map_or(i, |c| i + c.len_utf8())
}

fn on_input_key(app: &mut App, key: KeyEvent, ctrl: bool, alt: bool) -> Vec<Effect> {
    match key.code {
        KeyCode::Enter if alt => insert(app, "\n"),
        KeyCode::Char('j') if ctrl => insert(app, "\n"),
        KeyCode::Enter => return submit(app),
        KeyCode::Char('?') if app.input.is_empty() => app.help = true,
        KeyCode::Char(c) if !ctrl => insert(app, c.encode_utf8(&mut [0; 4])),
        KeyCode::Backspace if app.cursor > 0 => {
            let start = prev_boundary(&app.input, app.cursor);
            app.input.replace_range(start..app.cursor, "");
            app.cursor = start;
        }
        KeyCode::Delete if app.cursor < app.input.len() => {
            let end = next_boundary(&app.input, app.cursor);
            app.input.replace_range(app.cursor..end, "");
        }
        KeyCode::Left => app.cursor = prev_boundary(&app.input, app.cursor),
        KeyCode::Right => app.cursor = next_boundary(&app.input, app.cursor),
        KeyCode::Home if app.input.is_empty() => app.scroll_from_bottom = usize::MAX / 2,
        KeyCode::End if app.input.is_empty() => app.scroll_from_bottom = 0,
        KeyCode::Home => app.cursor = app.input[..app.cursor].rfind('\n').map_or(0, |i| i + 1),
        KeyCode::End => {
            app.cursor = app.input[app.cursor..]
                .find('\n')
                .map_or(app.input.len(), |i| app.cursor + i)
        }
        KeyCode::Up if app.input.is_empty() || app.recall.is_some() => recall(app, -1),
        KeyCode::Down if app.recall.is_some() => recall(app, 1),
        _ => {}
    }
    Vec::new()
}

fn insert(app: &mut App, text: &str) {
    app.input.insert_str(app.cursor, text);
    app.cursor += text.len();
    app.recall = None;
}

fn recall(app: &mut App, step: i32) {
    if app.sent.is_empty() {
        return;
    }
    let last = app.sent.len() - 1;
    let next = match (app.recall, step < 0) {
        (None, true) => Some(last),
        (None, false) => None,
        (Some(0), true) => Some(0),
        (Some(i), true) => Some(i - 1),
        (Some(i), false) if i >= last => None,
        (Some(i), false) => Some(i + 1),
    };
    app.recall = next;
    app.input = next.map(|i| app.sent[i].clone()).unwrap_or_default();
    app.cursor = app.input.len();
}

fn submit(app: &mut App) -> Vec<Effect> {
    // A deletion is confirmed only by the very next action.
    let confirming = std::mem::take(&mut app.confirm_delete);
    let text = app.input.trim_end().to_string();
    if text.trim().is_empty() {
        return Vec::new();
    }
    app.input.clear();
    app.cursor = 0;
    app.recall = None;
    app.sent.push(text.clone());
    if text.starts_with('/') {
        return command(app, &text, confirming);
    }
    if app.model_info.is_none() {
        app.notice("the model is not loaded yet");
        return Vec::new();
    }
    if app.busy() {
        app.notice("an answer is still streaming: wait, or press Esc to cancel it");
        return Vec::new();
    }
    let paths = attachment_paths(&text);
    app.edit_retries = 0;
    app.cells.push(Cell::new(Role::User, text));
    if !paths.is_empty() {
        // The message goes out once its files are read.
        if let Some(cell) = app.cells.last_mut() {
            cell.status = CellStatus::Streaming;
        }
        return vec![Effect::ReadAttachments(paths)];
    }
    start_answer(app)
}

fn attachments_read(app: &mut App, read: Vec<(PathBuf, Result<String, String>)>) -> Vec<Effect> {
    let Some(index) = app
        .cells
        .iter()
        .rposition(|c| c.role == Role::User && c.status == CellStatus::Streaming)
    else {
        return Vec::new();
    };
    let mut failed = Vec::new();
    for (path, result) in read {
        match result {
            Ok(text) => app.cells[index].attachments.push((path, text)),
            Err(e) => failed.push(format!("@{}: {e}", path.display())),
        }
    }
    if !failed.is_empty() {
        // Nothing is sent: the message stays in the history to edit with Up.
        app.cells.remove(index);
        app.notice(format!("cannot attach {}", failed.join("; ")));
        return Vec::new();
    }
    app.cells[index].status = CellStatus::Done;
    start_answer(app)
}

fn start_answer(app: &mut App) -> Vec<Effect> {
    app.cells.push(Cell {
        role: Role::Assistant,
        text: String::new(),
        status: CellStatus::Streaming,
        attachments: Vec::new(),
    });
    app.scroll_from_bottom = 0;
    app.readout.state = EngineState::Prefill(0.0);
    app.readout.ttft = None;
    app.readout.tok_s = None;
    app.readout.turn_tokens = 0;
    app.readout.turn_decode_time = Duration::ZERO;
    app.edits_seen = 0;
    // What the model is shown now is what its edits are checked against when applied.
    app.reply_hashes = app
        .shown_files()
        .map(|(path, text)| (path_key(path), content_hash(text.as_bytes())))
        .collect();
    let mut messages = app.messages();
    // The streaming answer's empty cell is not part of the prompt.
    if messages
        .last()
        .is_some_and(|m| m.role == "assistant" && m.content.is_empty())
    {
        messages.pop();
    }
    app.request += 1;
    vec![Effect::Send(Request::Generate(GenerateJob {
        id: app.request,
        prompt: Prompt::Chat {
            messages,
            drop_oldest: true,
            tools: Vec::new(),
        },
        sampling: app.settings.sampling.clone(),
        max_tokens: Some(app.settings.max_tokens),
        loops: None,
        cache_key: None,
    }))]
}

fn command(app: &mut App, line: &str, confirming: bool) -> Vec<Effect> {
    let mut parts = line.splitn(2, char::is_whitespace);
    let name = parts.next().unwrap_or_default();
    let arg = parts.next().map(str::trim).unwrap_or_default();
    let needs_arg = |app: &mut App, usage: &str| {
        app.notice(format!("usage: {usage}"));
        Vec::new()
    };
    match name {
        "/help" => {
            app.help = true;
            Vec::new()
        }
        "/quit" | "/exit" => vec![Effect::Quit],
        "/loops" => match arg.parse::<usize>() {
            Ok(n) if (1..=MAX_LOOPS).contains(&n) => {
                if app.model_info.is_none() {
                    app.notice("the model is not loaded yet");
                    return Vec::new();
                }
                app.readout.loops = n;
                vec![Effect::Send(Request::SetLoops(n))]
            }
            _ => {
                app.notice(format!(
                    "/loops takes a number from 1 to {MAX_LOOPS}, not `{arg}`"
                ));
                Vec::new()
            }
        },
        "/clear" => {
            app.cells.clear();
            app.scroll_from_bottom = 0;
            app.readout.context_used = 0;
            app.readout.cached_tokens = 0;
            vec![Effect::Send(Request::Reset)]
        }
        "/add" if arg.is_empty() => needs_arg(app, "/add PATH"),
        "/add" => vec![Effect::ReadFile(PathBuf::from(arg))],
        "/drop" if arg.is_empty() => needs_arg(app, "/drop PATH"),
        "/drop" => {
            let path = PathBuf::from(arg);
            let before = app.files.len();
            app.files.retain(|(p, _)| p != &path);
            if app.files.len() == before {
                app.notice(format!("{arg} is not in the context"));
            } else {
                app.notice(format!("dropped {arg} from the context"));
            }
            Vec::new()
        }
        "/files" => {
            if app.files.is_empty() {
                app.notice("no files in the context (add one with /add PATH)");
            } else {
                let list: Vec<String> = app
                    .files
                    .iter()
                    .map(|(p, t)| format!("{} ({} lines)", p.display(), t.lines().count()))
                    .collect();
                app.notice(format!("files in the context: {}", list.join(", ")));
            }
            Vec::new()
        }
        "/model" => {
            let text = match &app.model_info {
                None => "the model is not loaded yet".to_string(),
                Some(m) => format!(
                    "{} — {}\n{:.1}M parameters, {}, trained loops {}, running {}, window {}, context {} tokens, KV cache {:.1} MiB",
                    m.name,
                    m.path.display(),
                    m.parameters as f64 / 1e6,
                    m.quantization,
                    m.trained_loops,
                    app.readout.loops,
                    m.window,
                    m.context_size,
                    app.kv_bytes as f64 / (1024.0 * 1024.0)
                ),
            };
            app.notice(text);
            Vec::new()
        }
        "/diff" => {
            if app.review.is_some() {
                app.focus = Focus::Diff;
            } else {
                app.notice("no edits to review");
            }
            Vec::new()
        }
        "/apply" => apply_accepted(app, confirming),
        "/undo" => match arg {
            "" => vec![Effect::Undo { force: false }],
            "--force" => vec![Effect::Undo { force: true }],
            _ => needs_arg(app, "/undo [--force]"),
        },
        "/retry" => retry(app),
        "/save" if arg.is_empty() => needs_arg(app, "/save FILE"),
        "/save" => vec![Effect::Save {
            path: PathBuf::from(arg),
            text: app.transcript(),
        }],
        _ => {
            app.notice(format!("unknown command {name}: /help lists the commands"));
            Vec::new()
        }
    }
}

/// Drops the answers after the last message and asks again, with the context files re-read.
fn retry(app: &mut App) -> Vec<Effect> {
    if app.model_info.is_none() || app.busy() {
        app.notice("/retry needs a loaded model and no answer streaming");
        return Vec::new();
    }
    let Some(last_user) = app.cells.iter().rposition(|c| c.role == Role::User) else {
        app.notice("no message to answer again");
        return Vec::new();
    };
    let mut index = 0;
    app.cells.retain(|c| {
        index += 1;
        index <= last_user + 1 || c.role != Role::Assistant
    });
    if app.files.is_empty() {
        return start_answer(app);
    }
    app.retry_pending = true;
    refresh_files(app)
}

fn streaming_cell(app: &mut App) -> Option<&mut Cell> {
    app.cells
        .iter_mut()
        .rev()
        .find(|c| c.role == Role::Assistant && c.status == CellStatus::Streaming)
}

fn on_engine(app: &mut App, event: EngineEvent) -> Vec<Effect> {
    let r = &mut app.readout;
    match event {
        EngineEvent::Started { .. } => {}
        EngineEvent::Loading(p) => r.state = EngineState::Loading(p),
        EngineEvent::Loaded(info) => {
            r.state = EngineState::Idle;
            r.model = info.name.clone();
            r.loops = info.loops;
            r.trained_loops = info.trained_loops;
            r.context_size = info.context_size;
            app.model_info = Some(info);
        }
        EngineEvent::LoadFailed(message) => {
            r.state = EngineState::Failed;
            app.notice(message);
        }
        EngineEvent::PrefillProgress { done, total, .. } => {
            if matches!(r.state, EngineState::Prefill(_)) {
                r.state = EngineState::Prefill(done as f32 / total.max(1) as f32);
            }
        }
        EngineEvent::Token { text, latency, .. } => {
            if r.ttft.is_none() {
                r.ttft = Some(latency);
            } else {
                r.turn_tokens += 1;
                r.turn_decode_time += latency;
                r.tok_s = Some(r.turn_tokens as f64 / r.turn_decode_time.as_secs_f64().max(1e-9));
            }
            if latency > Duration::ZERO {
                r.latencies.push_back(latency);
                while r.latencies.len() > SPARKLINE_LEN {
                    r.latencies.pop_front();
                }
            }
            r.state = EngineState::Generating;
            if let Some(cell) = streaming_cell(app) {
                cell.text.push_str(&text);
                // Only a token with a backtick can close a fence: the reply is parsed
                // again only then, not on every token.
                if text.contains('`') {
                    return propose_edits(app, false);
                }
            }
        }
        EngineEvent::LoopsChanged(n) => r.loops = n,
        EngineEvent::Done { stats, .. } => {
            let cancelled = stats.stop_reason == StopReason::Cancelled;
            finish_turn(app, stats);
            // A cancelled answer's closed edits can be reviewed, but never go back to the model.
            return propose_edits(app, !cancelled);
        }
        EngineEvent::ResetDone => app.notice("new conversation"),
        EngineEvent::Error(message) | EngineEvent::Failed { message, .. } => {
            if let Some(cell) = streaming_cell(app) {
                cell.status = CellStatus::Failed;
            }
            if app.busy() {
                app.readout.state = EngineState::Idle;
            }
            app.notice(format!("error: {message}"));
        }
    }
    Vec::new()
}

fn finish_turn(app: &mut App, stats: TurnStats) {
    let r = &mut app.readout;
    r.state = EngineState::Idle;
    r.ttft = Some(stats.time_to_first_token);
    if stats.tokens > 1 {
        r.tok_s = Some(stats.decode_tok_s);
    }
    r.context_used = stats.context_used;
    r.cached_tokens = stats.reused_tokens;
    app.kv_bytes = stats.kv_bytes;
    if stats.dropped_messages > 0 {
        app.notice(format!(
            "the conversation outgrew the context: its {} oldest message{} were left out",
            stats.dropped_messages,
            if stats.dropped_messages == 1 { "" } else { "s" }
        ));
    }
    if let Some(cell) = streaming_cell(app) {
        cell.status = if stats.stop_reason == StopReason::Cancelled {
            CellStatus::Cancelled
        } else {
            CellStatus::Done
        };
    }
}

/// Keys from crossterm's mouse events that plait reacts to.
pub fn wheel(kind: MouseEventKind) -> Option<AppEvent> {
    match kind {
        MouseEventKind::ScrollUp => Some(AppEvent::Wheel(1)),
        MouseEventKind::ScrollDown => Some(AppEvent::Wheel(-1)),
        _ => None,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::path::Path;

    /// An app whose engine has loaded plt-tiny-2loop (2 trained loops, window 4).
    pub(crate) fn loaded_app() -> App {
        let mut app = App::new(
            "plt-tiny-2loop",
            Settings {
                sampling: SamplingParams::default(),
                max_tokens: 64,
                system_prompt: None,
            },
            true,
        );
        update(
            &mut app,
            AppEvent::Engine(EngineEvent::Loaded(ModelInfo {
                name: "plt-tiny-2loop".into(),
                path: "tests/fixtures/plt-tiny-2loop".into(),
                parameters: 160_000,
                quantization: "F32".into(),
                trained_loops: 2,
                loops: 2,
                window: 4,
                context_size: 4096,
                supports_tools: false,
            })),
        );
        app
    }

    /// `/add`s the file `name` of `root` as the runtime would; returns its text.
    fn add_file(app: &mut App, root: &Path, name: &str) -> String {
        let text = std::fs::read_to_string(root.join(name)).unwrap();
        let result = Ok(text.clone());
        update(
            app,
            AppEvent::FileRead {
                path: PathBuf::from(name),
                result,
            },
        );
        text
    }

    /// The text of the newest chat cell.
    fn last_notice(app: &App) -> &str {
        &app.cells.last().unwrap().text
    }

    fn key(code: KeyCode) -> AppEvent {
        AppEvent::Key(KeyEvent::new(code, KeyModifiers::NONE))
    }

    fn with(code: KeyCode, modifiers: KeyModifiers) -> AppEvent {
        AppEvent::Key(KeyEvent::new(code, modifiers))
    }

    fn type_text(app: &mut App, text: &str) {
        for c in text.chars() {
            update(app, key(KeyCode::Char(c)));
        }
    }

    fn token(text: &str, ms: u64) -> AppEvent {
        AppEvent::Engine(EngineEvent::Token {
            id: 1,
            text: text.into(),
            latency: Duration::from_millis(ms),
        })
    }

    fn done(stop_reason: StopReason) -> AppEvent {
        AppEvent::Engine(EngineEvent::Done {
            id: 1,
            stats: TurnStats {
                stop_reason,
                tokens: 3,
                prompt_tokens: 30,
                prefill_time: Duration::from_millis(30),
                time_to_first_token: Duration::from_millis(40),
                decode_tok_s: 50.0,
                decode_time: Duration::from_millis(40),
                loops: 2,
                reused_tokens: 12,
                context_used: 30,
                kv_bytes: 1024,
                dropped_messages: 0,
            },
        })
    }

    #[test]
    fn sending_a_message_asks_the_engine_with_the_whole_conversation() {
        let mut app = loaded_app();
        type_text(&mut app, "hello");
        let effects = update(&mut app, key(KeyCode::Enter));
        let [Effect::Send(Request::Generate(GenerateJob {
            prompt: Prompt::Chat { messages, .. },
            max_tokens: Some(max_tokens),
            ..
        }))] = effects.as_slice()
        else {
            panic!("{effects:?}");
        };
        assert_eq!(messages, &vec![ChatMessage::new("user", "hello")]);
        assert_eq!(*max_tokens, 64);
        assert!(app.input.is_empty());
        assert_eq!(app.readout.state, EngineState::Prefill(0.0));
        assert_eq!(app.cells.len(), 2);
    }

    #[test]
    fn tokens_stream_into_the_answer_and_done_reports_the_figures() {
        let mut app = loaded_app();
        type_text(&mut app, "hi");
        update(&mut app, key(KeyCode::Enter));
        update(&mut app, token("Hel", 40));
        update(&mut app, token("lo", 20));
        update(&mut app, token("!", 20));
        assert_eq!(app.cells[1].text, "Hello!");
        assert_eq!(app.readout.state, EngineState::Generating);
        assert_eq!(app.readout.ttft, Some(Duration::from_millis(40)));
        assert!((app.readout.tok_s.unwrap() - 50.0).abs() < 1e-6);
        update(&mut app, done(StopReason::Eos));
        assert_eq!(app.cells[1].status, CellStatus::Done);
        assert_eq!(app.readout.state, EngineState::Idle);
        assert_eq!(app.readout.cached_tokens, 12);
        assert_eq!(app.readout.context_used, 30);
        // The next turn carries the answer.
        type_text(&mut app, "more");
        let effects = update(&mut app, key(KeyCode::Enter));
        let [Effect::Send(Request::Generate(GenerateJob {
            prompt: Prompt::Chat { messages, .. },
            ..
        }))] = effects.as_slice()
        else {
            panic!("{effects:?}");
        };
        assert_eq!(messages.len(), 3);
        assert_eq!(messages[1], ChatMessage::new("assistant", "Hello!"));
    }

    #[test]
    fn esc_and_ctrl_c_cancel_and_a_cancelled_answer_stays_marked() {
        let mut app = loaded_app();
        type_text(&mut app, "hi");
        update(&mut app, key(KeyCode::Enter));
        update(&mut app, token("partial", 10));
        assert_eq!(
            update(&mut app, key(KeyCode::Esc)),
            vec![Effect::Send(Request::Cancel(1))]
        );
        assert_eq!(
            update(&mut app, with(KeyCode::Char('c'), KeyModifiers::CONTROL)),
            vec![Effect::Send(Request::Cancel(1))]
        );
        update(&mut app, done(StopReason::Cancelled));
        assert_eq!(app.cells[1].status, CellStatus::Cancelled);
        assert_eq!(app.cells[1].text, "partial");
    }

    #[test]
    fn ctrl_c_when_idle_asks_once_then_quits() {
        let mut app = loaded_app();
        let ctrl_c = with(KeyCode::Char('c'), KeyModifiers::CONTROL);
        assert!(update(&mut app, ctrl_c.clone()).is_empty());
        assert!(app.quit_armed);
        assert_eq!(update(&mut app, ctrl_c.clone()), vec![Effect::Quit]);
        // Another key in between disarms it.
        let mut app = loaded_app();
        update(&mut app, ctrl_c.clone());
        update(&mut app, key(KeyCode::Char('x')));
        assert!(update(&mut app, ctrl_c).is_empty());
    }

    #[test]
    fn loop_keys_stay_within_one_to_eight() {
        let mut app = loaded_app();
        assert_eq!(
            update(&mut app, with(KeyCode::Up, KeyModifiers::ALT)),
            vec![Effect::Send(Request::SetLoops(3))]
        );
        assert_eq!(
            update(&mut app, key(KeyCode::F(2))),
            vec![Effect::Send(Request::SetLoops(2))]
        );
        update(&mut app, key(KeyCode::F(2)));
        assert_eq!(app.readout.loops, 1);
        assert!(update(&mut app, with(KeyCode::Down, KeyModifiers::ALT)).is_empty());
        for _ in 0..10 {
            update(&mut app, key(KeyCode::F(3)));
        }
        assert_eq!(app.readout.loops, 8);
        assert!(update(&mut app, key(KeyCode::F(3))).is_empty());
    }

    #[test]
    fn scrolling_moves_away_from_the_bottom_and_back() {
        let mut app = loaded_app();
        app.chat_height = 11;
        update(&mut app, key(KeyCode::PageUp));
        assert_eq!(app.scroll_from_bottom, 10);
        update(&mut app, AppEvent::Wheel(1));
        assert_eq!(app.scroll_from_bottom, 13);
        update(&mut app, AppEvent::Wheel(-2));
        assert_eq!(app.scroll_from_bottom, 7);
        update(&mut app, key(KeyCode::PageDown));
        assert_eq!(app.scroll_from_bottom, 0);
        update(&mut app, key(KeyCode::Home));
        assert!(app.scroll_from_bottom > 1000);
        update(&mut app, key(KeyCode::End));
        assert_eq!(app.scroll_from_bottom, 0);
    }

    #[test]
    fn commands_run_and_bad_ones_get_a_one_line_error() {
        let mut app = loaded_app();
        type_text(&mut app, "/loops 3");
        assert_eq!(
            update(&mut app, key(KeyCode::Enter)),
            vec![Effect::Send(Request::SetLoops(3))]
        );
        type_text(&mut app, "/loops 9");
        assert!(update(&mut app, key(KeyCode::Enter)).is_empty());
        assert!(app.cells.last().unwrap().text.contains("1 to 8"));
        type_text(&mut app, "/frobnicate");
        update(&mut app, key(KeyCode::Enter));
        assert!(last_notice(&app).contains("unknown command /frobnicate"));
        type_text(&mut app, "/add src/main.rs");
        assert_eq!(
            update(&mut app, key(KeyCode::Enter)),
            vec![Effect::ReadFile("src/main.rs".into())]
        );
        update(
            &mut app,
            AppEvent::FileRead {
                path: "src/main.rs".into(),
                result: Ok("fn main() {}\n".into()),
            },
        );
        assert_eq!(app.messages()[0].role, "system");
        assert!(app.messages()[0].content.contains("fn main() {}"));
        type_text(&mut app, "/drop src/main.rs");
        update(&mut app, key(KeyCode::Enter));
        assert!(app.files.is_empty());
        type_text(&mut app, "/save");
        update(&mut app, key(KeyCode::Enter));
        assert!(app.cells.last().unwrap().text.contains("usage: /save FILE"));
        type_text(&mut app, "/clear");
        assert_eq!(
            update(&mut app, key(KeyCode::Enter)),
            vec![Effect::Send(Request::Reset)]
        );
        assert!(app.cells.is_empty());
        type_text(&mut app, "/quit");
        assert_eq!(update(&mut app, key(KeyCode::Enter)), vec![Effect::Quit]);
    }

    #[test]
    fn slash_completes_with_tab_and_question_mark_opens_help() {
        let mut app = loaded_app();
        type_text(&mut app, "/mo");
        assert_eq!(app.completions().len(), 1);
        update(&mut app, key(KeyCode::Tab));
        assert_eq!(app.input, "/model ");
        app.input.clear();
        app.cursor = 0;
        update(&mut app, key(KeyCode::Char('?')));
        assert!(app.help);
        update(&mut app, key(KeyCode::Esc));
        assert!(!app.help);
    }

    #[test]
    fn at_path_attaches_a_file_to_the_message_before_it_is_sent() {
        let mut app = loaded_app();
        type_text(&mut app, "explain @src/lib.rs please");
        assert_eq!(
            update(&mut app, key(KeyCode::Enter)),
            vec![Effect::ReadAttachments(vec!["src/lib.rs".into()])]
        );
        let effects = update(
            &mut app,
            AppEvent::AttachmentsRead(vec![("src/lib.rs".into(), Ok("pub mod tui;".into()))]),
        );
        let [Effect::Send(Request::Generate(GenerateJob {
            prompt: Prompt::Chat { messages, .. },
            ..
        }))] = effects.as_slice()
        else {
            panic!("{effects:?}");
        };
        assert!(messages[0]
            .content
            .starts_with("explain @src/lib.rs please"));
        assert!(messages[0].content.contains("pub mod tui;"));
        // A file that cannot be read stops the message with a one-line error.
        type_text(&mut app, "and @nope.rs");
        update(&mut app, done(StopReason::Eos));
        update(&mut app, key(KeyCode::Enter));
        let effects = update(
            &mut app,
            AppEvent::AttachmentsRead(vec![("nope.rs".into(), Err("not found".into()))]),
        );
        assert!(effects.is_empty());
        assert!(last_notice(&app).contains("cannot attach @nope.rs: not found"));
    }

    #[test]
    fn newline_keys_and_history_recall_edit_the_input() {
        let mut app = loaded_app();
        type_text(&mut app, "a");
        update(&mut app, with(KeyCode::Enter, KeyModifiers::ALT));
        update(&mut app, with(KeyCode::Char('j'), KeyModifiers::CONTROL));
        type_text(&mut app, "b");
        assert_eq!(app.input, "a\n\nb");
        update(&mut app, key(KeyCode::Enter));
        update(&mut app, done(StopReason::Eos));
        type_text(&mut app, "second");
        update(&mut app, key(KeyCode::Enter));
        update(&mut app, done(StopReason::Eos));
        update(&mut app, key(KeyCode::Up));
        assert_eq!(app.input, "second");
        update(&mut app, key(KeyCode::Up));
        assert_eq!(app.input, "a\n\nb");
        update(&mut app, key(KeyCode::Down));
        assert_eq!(app.input, "second");
        update(&mut app, key(KeyCode::Down));
        assert_eq!(app.input, "");
    }

    /// An answer that edits `hello.py` in two far-apart places.
    pub(crate) const EDIT_ANSWER: &[&str] = &[
        "Change both:\n\nhello.py\n```python\n<<<<<<< SEARCH\n",
        "def greet(name):\n    print(\"Hello\", name)\n=======\n",
        "def greet(name):\n    print(f\"Hello, {name}!\")\n>>>>>>> REPLACE\n```\n\n",
        "hello.py\n```python\n<<<<<<< SEARCH\ndef bye():\n    pass\n=======\n",
        "def bye():\n    print(\"Bye\")\n>>>>>>> REPLACE\n```\n",
    ];

    /// The file `EDIT_ANSWER` edits, in a fresh workspace.
    pub(crate) fn hello_workspace() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let mut text = String::from("def greet(name):\n    print(\"Hello\", name)\n");
        for i in 0..8 {
            text.push_str(&format!("\n# filler {i}\n"));
        }
        text.push_str("\ndef bye():\n    pass\n");
        std::fs::write(dir.path().join("hello.py"), text).unwrap();
        dir
    }

    /// Runs `effects` as the runtime would for edits, against `root`; returns what comes back.
    pub(crate) fn run_edit_effects(
        app: &mut App,
        root: &Path,
        effects: Vec<Effect>,
    ) -> Vec<Effect> {
        let mut rest = Vec::new();
        for effect in effects {
            match effect {
                Effect::PrepareEdits {
                    edits,
                    expected,
                    complete,
                    anchors,
                } => {
                    let event =
                        crate::tui::prepare_edits(root, &edits, &expected, complete, anchors);
                    rest.extend(update(app, event));
                }
                other => rest.push(other),
            }
        }
        rest
    }

    fn answer_with_edits(app: &mut App, root: &Path) -> Vec<Effect> {
        type_text(app, "tidy hello.py");
        update(app, key(KeyCode::Enter));
        let mut prepared = 0;
        for text in EDIT_ANSWER {
            let effects = update(app, token(text, 20));
            prepared += effects.len();
            assert!(run_edit_effects(app, root, effects).is_empty());
        }
        // One proposal as each SEARCH/REPLACE fence closes.
        assert_eq!(prepared, 2);
        let effects = update(app, done(StopReason::Eos));
        run_edit_effects(app, root, effects)
    }

    #[test]
    fn edits_stream_into_the_diff_pane_and_only_accepted_hunks_are_applied() {
        let dir = hello_workspace();
        let mut app = loaded_app();
        assert!(answer_with_edits(&mut app, dir.path()).is_empty());
        let review = app.review.as_ref().unwrap();
        assert_eq!(review.changes.len(), 1);
        assert_eq!((review.hunk_count(), review.accepted_count()), (2, 2));
        assert!(app.cells.last().unwrap().text.contains("2 hunks in 1 file"));
        // Tab reaches the diff pane; reject the first hunk and apply.
        update(&mut app, key(KeyCode::Tab));
        update(&mut app, key(KeyCode::Tab));
        assert_eq!(app.focus, Focus::Diff);
        update(&mut app, key(KeyCode::Char(' ')));
        update(&mut app, key(KeyCode::Char('j')));
        let effects = update(&mut app, key(KeyCode::Char('a')));
        let [Effect::Apply(selection)] = effects.as_slice() else {
            panic!("{effects:?}");
        };
        assert_eq!(selection[0].1, vec![false, true]);
        let record = crate::patch::apply_reviewed(&[(&selection[0].0, &selection[0].1)]).unwrap();
        let text = std::fs::read_to_string(dir.path().join("hello.py")).unwrap();
        assert!(text.contains("print(\"Hello\", name)") && text.contains("print(\"Bye\")"));
        update(
            &mut app,
            AppEvent::Applied(Ok(record.entries.iter().map(|e| e.path.clone()).collect())),
        );
        assert!(app.review.is_none());
        assert_eq!(app.focus, Focus::Input);
        type_text(&mut app, "/undo");
        assert_eq!(
            update(&mut app, key(KeyCode::Enter)),
            vec![Effect::Undo { force: false }]
        );
    }

    #[test]
    fn a_failed_edit_goes_back_to_the_model_at_most_twice() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("hello.py"), "print('other')\n").unwrap();
        let mut app = loaded_app();
        let effects = answer_with_edits(&mut app, dir.path());
        assert!(
            matches!(effects.as_slice(), [Effect::Send(Request::Generate(_))]),
            "{effects:?}"
        );
        let cells = app.cells.len();
        assert_eq!(app.cells[cells - 2].role, Role::User);
        assert!(app.cells[cells - 2].text.contains("could not be applied"));
        for round in 0..2 {
            for text in EDIT_ANSWER {
                let effects = update(&mut app, token(text, 20));
                run_edit_effects(&mut app, dir.path(), effects);
            }
            let effects = update(&mut app, done(StopReason::Eos));
            let rest = run_edit_effects(&mut app, dir.path(), effects);
            assert_eq!(
                rest.len(),
                usize::from(round == 0),
                "round {round}: {rest:?}"
            );
        }
        assert!(last_notice(&app).contains("no corrected edit after 2 tries"));
        assert!(app.review.is_none());
        // A new message from the user starts the count again.
        type_text(&mut app, "again");
        update(&mut app, key(KeyCode::Enter));
        assert_eq!(app.edit_retries, 0);
    }

    #[test]
    fn a_deletion_waits_for_a_second_apply() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("old.py"), "x = 1\n").unwrap();
        let mut app = loaded_app();
        let changes = crate::patch::prepare(
            dir.path(),
            &[Edit::Delete {
                path: "old.py".into(),
            }],
            &HashMap::new(),
        )
        .unwrap();
        update(
            &mut app,
            AppEvent::EditsPrepared {
                result: Ok(changes),
                complete: true,
                anchors: Vec::new(),
            },
        );
        type_text(&mut app, "/apply");
        assert!(update(&mut app, key(KeyCode::Enter)).is_empty());
        assert!(last_notice(&app).contains("this deletes old.py"));
        // Another action in between cancels the confirmation.
        type_text(&mut app, "/files");
        update(&mut app, key(KeyCode::Enter));
        type_text(&mut app, "/apply");
        assert!(update(&mut app, key(KeyCode::Enter)).is_empty());
        type_text(&mut app, "/apply");
        assert!(matches!(
            update(&mut app, key(KeyCode::Enter)).as_slice(),
            [Effect::Apply(_)]
        ));
    }

    #[test]
    fn the_model_is_shown_file_hashes_that_edits_are_checked_against() {
        let dir = hello_workspace();
        let mut app = loaded_app();
        let text = add_file(&mut app, dir.path(), "./hello.py");
        // The file changes after the model was shown it: the edit is refused and retried.
        std::fs::write(dir.path().join("hello.py"), text.replace("bye", "ciao")).unwrap();
        let effects = answer_with_edits(&mut app, dir.path());
        assert!(app.cells.iter().any(|c| c.text.contains("changed since")));
        assert_eq!(effects.len(), 1);
    }

    #[test]
    fn a_plain_code_block_becomes_an_inferred_edit_that_starts_rejected() {
        let dir = hello_workspace();
        let mut app = loaded_app();
        add_file(&mut app, dir.path(), "hello.py");
        type_text(&mut app, "make greet friendlier");
        update(&mut app, key(KeyCode::Enter));
        update(
            &mut app,
            token(
                "```python\ndef greet(name):\n    print(f\"Hi, {name}!\")\n```\n",
                20,
            ),
        );
        let effects = update(&mut app, done(StopReason::Eos));
        assert!(run_edit_effects(&mut app, dir.path(), effects).is_empty());
        let review = app.review.as_ref().unwrap();
        assert_eq!(review.anchors, vec!["hello.py:1 `def greet(name):`"]);
        assert_eq!((review.hunk_count(), review.accepted_count()), (1, 0));
        assert!(app.cells.last().unwrap().text.starts_with("inferred"));
        type_text(&mut app, "/apply");
        assert!(update(&mut app, key(KeyCode::Enter)).is_empty());
        assert!(last_notice(&app).contains("no hunk is accepted"));
        type_text(&mut app, "/diff");
        update(&mut app, key(KeyCode::Enter));
        update(&mut app, key(KeyCode::Char(' ')));
        let effects = update(&mut app, key(KeyCode::Char('a')));
        let [Effect::Apply(selection)] = effects.as_slice() else {
            panic!("{effects:?}");
        };
        crate::patch::apply_reviewed(&[(&selection[0].0, &selection[0].1)]).unwrap();
        let written = std::fs::read_to_string(dir.path().join("hello.py")).unwrap();
        assert!(written.starts_with("def greet(name):\n    print(f\"Hi, {name}!\")\n\n# filler 0"));
    }

    #[test]
    fn an_unplaceable_code_block_says_why_and_is_not_sent_back() {
        let mut app = loaded_app();
        update(
            &mut app,
            AppEvent::FileRead {
                path: PathBuf::from("hello.py"),
                result: Ok("def greet():\n    pass\n".into()),
            },
        );
        type_text(&mut app, "add a function");
        update(&mut app, key(KeyCode::Enter));
        update(
            &mut app,
            token("```python\ndef wave():\n    pass\n```\n", 20),
        );
        assert!(update(&mut app, done(StopReason::Eos)).is_empty());
        assert!(app.review.is_none());
        assert!(app
            .cells
            .last()
            .unwrap()
            .text
            .contains("`def wave():` is in none of the context files"));
    }
}

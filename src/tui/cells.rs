//! The chat's cells: one kind per thing the transcript shows (a message, an answer, a notice,
//! an edit summary, an error), each drawing its own lines. A cell keeps the lines it last
//! drew with the look they were drawn for, so a finished cell's markdown and highlighting are
//! rendered once per width, and a streaming answer renders only its growing last block.

use std::cell::RefCell;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};

use super::markdown::{render_markdown, top_level_blocks, Highlighter, Theme, ThemeColors};

/// How cells are drawn: the width of the chat's text and the colours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Look {
    /// Columns of text.
    pub width: u16,
    /// Whether colours are allowed.
    pub color: bool,
    /// Light or dark background.
    pub theme: Theme,
    /// Whether answers show their reasoning in full.
    pub reasoning: bool,
}

impl Look {
    /// `color` as a foreground, readable on the theme; no style without colours.
    pub fn fg(self, color: Color) -> Style {
        if self.color {
            Style::default().fg(self.theme.adapt(color))
        } else {
            Style::default()
        }
    }

    /// `text` as markdown at this look.
    fn markdown(self, text: &str) -> Vec<Line<'static>> {
        render_markdown(
            text,
            self.width,
            Highlighter::shared(self.theme),
            self.color,
        )
    }
}

/// Rendered lines, shared between a cell's cache and a frame.
pub type Lines = Arc<Vec<Line<'static>>>;

/// One kind of chat cell.
pub trait HistoryCell {
    /// The cell's lines at `look`.
    fn display_lines(&self, look: Look) -> Lines;

    /// How many lines the cell takes at `look`.
    fn desired_height(&self, look: Look) -> usize {
        self.display_lines(look).len()
    }
}

/// The lines a cell last drew and the look they were drawn for. Only a change to the cell
/// (through `&mut`) empties it; a copy of a cell draws its own lines again.
#[derive(Default)]
struct LineCache(RefCell<Option<(Look, Lines)>>);

impl LineCache {
    /// The lines for `look`: kept ones, or `render`'s, then kept.
    fn get(&self, look: Look, render: impl FnOnce() -> Vec<Line<'static>>) -> Lines {
        if let Some((kept, lines)) = &*self.0.borrow() {
            if *kept == look {
                return Arc::clone(lines);
            }
        }
        let lines = Arc::new(render());
        *self.0.borrow_mut() = Some((look, Arc::clone(&lines)));
        lines
    }

    fn clear(&mut self) {
        *self.0.get_mut() = None;
    }
}

impl Clone for LineCache {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl fmt::Debug for LineCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kept = self.0.borrow().as_ref().map(|(look, _)| look.width);
        f.debug_tuple("LineCache").field(&kept).finish()
    }
}

fn bold(style: Style) -> Style {
    style.add_modifier(Modifier::BOLD)
}

/// A message the user sent, with the files it attaches.
#[derive(Debug, Clone)]
pub struct UserCell {
    text: String,
    /// Files attached with `@path`, sent to the model after the text but not shown.
    attachments: Vec<(PathBuf, String)>,
    /// Whether its attachments are still being read (it is not sent yet).
    pending: bool,
    cache: LineCache,
}

impl UserCell {
    /// A message as typed.
    pub fn new(text: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            attachments: Vec::new(),
            pending: false,
            cache: LineCache::default(),
        }
    }

    /// The message as typed.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The files it attaches, with their text.
    pub fn attachments(&self) -> &[(PathBuf, String)] {
        &self.attachments
    }

    /// Attaches a file read for it.
    pub fn attach(&mut self, path: PathBuf, text: String) {
        self.attachments.push((path, text));
    }

    /// Whether its attachments are still being read.
    pub fn pending(&self) -> bool {
        self.pending
    }

    /// Marks it waiting for its attachments, or ready.
    pub fn set_pending(&mut self, pending: bool) {
        self.pending = pending;
    }

    /// The text the model sees: the message, then any attached files.
    pub fn content(&self) -> String {
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

impl HistoryCell for UserCell {
    fn display_lines(&self, look: Look) -> Lines {
        self.cache.get(look, || {
            let mut lines = vec![Line::styled("you", bold(look.fg(Color::Cyan)))];
            lines.extend(look.markdown(&self.text));
            lines
        })
    }
}

/// Where an answer stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerStatus {
    /// Still streaming.
    Streaming,
    /// Complete.
    Done,
    /// Cancelled by the user; the text so far stays.
    Cancelled,
    /// Ended by an error.
    Failed,
    /// Its stream stopped before the end; the text so far stays.
    Interrupted,
}

/// A streaming answer's completed top-level block: what it was drawn from (width, colour,
/// the block's text) and its lines.
type Block = ((Look, String), Lines);

/// The model's answer, streaming or finished.
#[derive(Debug, Clone)]
pub struct AnswerCell {
    text: String,
    /// A thinking model's reasoning, streamed before (or between) the text.
    reasoning: String,
    status: AnswerStatus,
    cache: LineCache,
    /// While streaming: the lines of the blocks before the growing one, in order.
    blocks: RefCell<Vec<Block>>,
}

impl AnswerCell {
    /// An answer about to stream.
    pub fn streaming() -> Self {
        Self::with_status(String::new(), AnswerStatus::Streaming)
    }

    /// An answer with this text and status.
    pub fn with_status(text: String, status: AnswerStatus) -> Self {
        Self {
            text,
            reasoning: String::new(),
            status,
            cache: LineCache::default(),
            blocks: RefCell::default(),
        }
    }

    /// Its markdown so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Where it stands.
    pub fn status(&self) -> AnswerStatus {
        self.status
    }

    /// Appends streamed text.
    pub fn push_text(&mut self, text: &str) {
        self.text.push_str(text);
        self.cache.clear();
    }

    /// Its reasoning so far.
    pub fn reasoning(&self) -> &str {
        &self.reasoning
    }

    /// Appends streamed reasoning.
    pub fn push_reasoning(&mut self, text: &str) {
        self.reasoning.push_str(text);
        self.cache.clear();
    }

    /// Ends it (or marks it again) with `status`.
    pub fn set_status(&mut self, status: AnswerStatus) {
        self.status = status;
        self.cache.clear();
        if status != AnswerStatus::Streaming {
            self.blocks.get_mut().clear();
        }
    }

    /// The header: who, and how the answer ended when it did not end well.
    fn header(&self, look: Look) -> Line<'static> {
        let mut header = vec![Span::styled("plait", bold(look.fg(Color::Green)))];
        match self.status {
            AnswerStatus::Cancelled => {
                header.push(Span::styled(" (cancelled)", look.fg(Color::Yellow)))
            }
            AnswerStatus::Failed => header.push(Span::styled(" (failed)", look.fg(Color::Red))),
            AnswerStatus::Interrupted => {
                header.push(Span::styled(" (interrupted)", look.fg(Color::Red)))
            }
            AnswerStatus::Streaming if self.text.is_empty() => header.push(Span::raw(" …")),
            _ => {}
        }
        Line::from(header)
    }

    /// The markdown of a streaming answer: its completed blocks from the kept lines, its
    /// last block rendered again.
    fn streaming_markdown(&self, look: Look) -> Vec<Line<'static>> {
        let text = &self.text;
        let starts = top_level_blocks(text);
        let Some((&growing, completed)) = starts.split_last() else {
            return look.markdown(text);
        };
        let mut kept = self.blocks.borrow_mut();
        let mut lines: Vec<Line<'static>> = Vec::new();
        let join = |lines: &mut Vec<Line<'static>>, more: &[Line<'static>]| {
            if !lines.is_empty() && !more.is_empty() {
                lines.push(Line::default());
            }
            lines.extend_from_slice(more);
        };
        for (i, window) in starts.windows(2).enumerate().take(completed.len()) {
            let block = &text[window[0]..window[1]];
            let fresh = kept
                .get(i)
                .is_none_or(|((drawn, source), _)| *drawn != look || source != block);
            if fresh {
                kept.truncate(i);
                kept.push(((look, block.to_owned()), Arc::new(look.markdown(block))));
            }
            join(&mut lines, &kept[i].1);
        }
        join(&mut lines, &look.markdown(&text[growing..]));
        lines
    }
}

impl AnswerCell {
    /// The reasoning, dimmed: in full when the look shows it, else one line that says so.
    fn reasoning_lines(&self, look: Look) -> Vec<Line<'static>> {
        let reasoning = self.reasoning.trim();
        if reasoning.is_empty() {
            return Vec::new();
        }
        let dim = look.fg(Color::DarkGray).add_modifier(Modifier::ITALIC);
        if !look.reasoning {
            let lines = reasoning.lines().count();
            let what = if self.status == AnswerStatus::Streaming && self.text.is_empty() {
                "thinking"
            } else {
                "thought"
            };
            return vec![Line::styled(
                format!(
                    "▸ {what} ({lines} line{}; Ctrl+R shows)",
                    if lines == 1 { "" } else { "s" }
                ),
                dim,
            )];
        }
        let inner = Look {
            width: look.width.saturating_sub(2).max(1),
            ..look
        };
        let mut lines = vec![Line::styled("▾ reasoning (Ctrl+R hides)", dim)];
        for line in inner.markdown(reasoning) {
            let mut spans = vec![Span::styled("│ ", dim)];
            spans.extend(
                line.spans
                    .into_iter()
                    .map(|span| Span::styled(span.content, dim)),
            );
            lines.push(Line::from(spans));
        }
        lines
    }
}

impl HistoryCell for AnswerCell {
    fn display_lines(&self, look: Look) -> Lines {
        self.cache.get(look, || {
            let mut lines = vec![self.header(look)];
            lines.extend(self.reasoning_lines(look));
            if self.status == AnswerStatus::Streaming {
                lines.extend(self.streaming_markdown(look));
            } else {
                lines.extend(look.markdown(&self.text));
            }
            lines
        })
    }
}

/// Dimmed italic lines, each after a dot: how plait speaks for itself.
fn notice_lines(look: Look, text: &str, color: Color) -> Vec<Line<'static>> {
    let style = look.fg(color).add_modifier(Modifier::ITALIC);
    text.lines()
        .map(|line| Line::styled(format!("· {line}"), style))
        .collect()
}

/// A message from plait itself: command output, hints.
#[derive(Debug, Clone)]
pub struct NoticeCell {
    text: String,
    cache: LineCache,
}

impl NoticeCell {
    /// A notice saying `text`.
    pub fn new(text: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            cache: LineCache::default(),
        }
    }
}

impl HistoryCell for NoticeCell {
    fn display_lines(&self, look: Look) -> Lines {
        self.cache
            .get(look, || notice_lines(look, &self.text, Color::DarkGray))
    }
}

/// What the diff pane now holds for the last answer.
#[derive(Debug, Clone)]
pub struct EditSummaryCell {
    hunks: usize,
    files: usize,
    inferred: bool,
    cache: LineCache,
}

impl EditSummaryCell {
    /// `hunks` hunks in `files` files, `inferred` from code blocks or written as edits.
    pub fn new(hunks: usize, files: usize, inferred: bool) -> Self {
        Self {
            hunks,
            files,
            inferred,
            cache: LineCache::default(),
        }
    }

    /// The summary as one line of text.
    pub fn text(&self) -> String {
        let plural = |n: usize| if n == 1 { "" } else { "s" };
        format!(
            "{}{} hunk{} in {} file{} in the diff pane: Tab to review, Space toggles, a applies",
            if self.inferred {
                "inferred from the answer's code: "
            } else {
                ""
            },
            self.hunks,
            plural(self.hunks),
            self.files,
            plural(self.files),
        )
    }
}

impl HistoryCell for EditSummaryCell {
    fn display_lines(&self, look: Look) -> Lines {
        self.cache
            .get(look, || notice_lines(look, &self.text(), Color::DarkGray))
    }
}

/// Something that failed: the model, the engine or a request.
#[derive(Debug, Clone)]
pub struct ErrorCell {
    message: String,
    cache: LineCache,
}

impl ErrorCell {
    /// An error saying `message`.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            cache: LineCache::default(),
        }
    }

    /// The message, after `error:`.
    pub fn text(&self) -> String {
        format!("error: {}", self.message)
    }
}

impl HistoryCell for ErrorCell {
    fn display_lines(&self, look: Look) -> Lines {
        self.cache
            .get(look, || notice_lines(look, &self.text(), Color::Red))
    }
}

/// One entry of the chat.
#[derive(Debug, Clone)]
pub enum Cell {
    /// The user's message.
    User(UserCell),
    /// The model's answer.
    Answer(AnswerCell),
    /// plait's own note.
    Notice(NoticeCell),
    /// The edits an answer put in the diff pane.
    EditSummary(EditSummaryCell),
    /// A failure.
    Error(ErrorCell),
}

impl Cell {
    /// The cell as the trait its kind implements.
    pub fn history(&self) -> &dyn HistoryCell {
        match self {
            Cell::User(cell) => cell,
            Cell::Answer(cell) => cell,
            Cell::Notice(cell) => cell,
            Cell::EditSummary(cell) => cell,
            Cell::Error(cell) => cell,
        }
    }

    /// What the cell says, as plain text.
    pub fn text(&self) -> String {
        match self {
            Cell::User(cell) => cell.text.clone(),
            Cell::Answer(cell) => cell.text.clone(),
            Cell::Notice(cell) => cell.text.clone(),
            Cell::EditSummary(cell) => cell.text(),
            Cell::Error(cell) => cell.text(),
        }
    }

    /// The answer, when this is one.
    pub fn answer(&self) -> Option<&AnswerCell> {
        match self {
            Cell::Answer(answer) => Some(answer),
            _ => None,
        }
    }
}

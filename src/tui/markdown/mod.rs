//! Markdown rendering for the chat pane.
//!
//! [`render_markdown`] turns a chat message, which may still be streaming in and so be
//! incomplete (an unclosed code fence, half a list), into styled ratatui [`Line`]s wrapped to
//! the pane's width; the chat's cells keep what it returns per width (`super::cells`).
//! Fenced code blocks are highlighted with syntect through a shared [`Highlighter`], whose
//! syntaxes and theme are loaded once. Wrapping lives in `wrap`, highlighting in `highlight`.

use pulldown_cmark::{Alignment, CodeBlockKind, Event, HeadingLevel, Options, Parser, Tag, TagEnd};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};

pub use crate::config::Theme;

mod highlight;
#[cfg(test)]
mod tests;
mod wrap;

pub use highlight::{Highlighter, ThemeColors};
use wrap::{char_width, push_merged, spans_width, str_width, trim_end, wrap, LineBuilder};

/// Indentation of each code line under a code block's header.
const CODE_INDENT: &str = "  ";

/// Renders markdown `text` into lines at most `width` columns wide (`color == false`: no colours).
pub fn render_markdown(
    text: &str,
    width: u16,
    highlighter: &Highlighter,
    color: bool,
) -> Vec<Line<'static>> {
    let options =
        Options::ENABLE_TABLES | Options::ENABLE_STRIKETHROUGH | Options::ENABLE_TASKLISTS;
    let mut renderer = Renderer::new(usize::from(width).max(1), highlighter, color);
    for event in Parser::new_ext(text, options) {
        renderer.event(event);
    }
    renderer.finish()
}

/// Where each top-level block of the text starts. A streaming answer grows only its last
/// block, so the lines of the blocks before it can be kept while it streams.
pub fn top_level_blocks(text: &str) -> Vec<usize> {
    let options =
        Options::ENABLE_TABLES | Options::ENABLE_STRIKETHROUGH | Options::ENABLE_TASKLISTS;
    let mut depth = 0usize;
    let mut starts = Vec::new();
    for (event, range) in Parser::new_ext(text, options).into_offset_iter() {
        match event {
            Event::Start(_) => {
                if depth == 0 {
                    starts.push(range.start);
                }
                depth += 1;
            }
            Event::End(_) => depth = depth.saturating_sub(1),
            _ if depth == 0 => starts.push(range.start),
            _ => {}
        }
    }
    starts
}

/// A block that prefixes each of its lines: a list item or a block quote.
struct Container {
    /// Prefix of the container's first line (a list marker).
    first: Vec<Span<'static>>,
    /// Prefix of its later lines (indentation, a quote bar).
    rest: Vec<Span<'static>>,
    /// Whether `first` has been emitted.
    used: bool,
    /// Whether this is a list item.
    item: bool,
}

/// A code block being collected.
struct CodeState {
    lang: Option<String>,
    text: String,
}

/// One table row's cells (each cell a run of spans) and whether it is the header.
type Row = (Vec<Vec<Span<'static>>>, bool);

/// A table being collected.
struct TableState {
    aligns: Vec<Alignment>,
    rows: Vec<Row>,
    row: Vec<Vec<Span<'static>>>,
}

/// The colours used outside code blocks; all of them vanish without colour.
struct Palette {
    color: bool,
    theme: Theme,
}

impl Palette {
    fn style(&self, fg: Color, modifier: Modifier) -> Style {
        let style = Style::default().add_modifier(modifier);
        if self.color {
            style.fg(self.theme.adapt(fg))
        } else {
            style
        }
    }

    fn heading(&self, level: HeadingLevel) -> Style {
        match level {
            HeadingLevel::H1 => self.style(Color::Magenta, Modifier::BOLD | Modifier::UNDERLINED),
            _ => self.style(Color::Magenta, Modifier::BOLD),
        }
    }

    fn inline_code(&self) -> Style {
        if self.color {
            Style::default().fg(self.theme.adapt(Color::Cyan))
        } else {
            Style::default().add_modifier(Modifier::REVERSED)
        }
    }

    fn link(&self) -> Style {
        self.style(Color::Blue, Modifier::UNDERLINED)
    }

    fn marker(&self) -> Style {
        self.style(Color::Yellow, Modifier::empty())
    }

    fn quote(&self) -> Style {
        self.style(Color::Green, Modifier::empty())
    }

    fn dim(&self) -> Style {
        self.style(Color::DarkGray, Modifier::empty())
    }
}

/// Walks pulldown-cmark's events and builds the lines.
struct Renderer<'h> {
    highlighter: &'h Highlighter,
    width: usize,
    color: bool,
    palette: Palette,
    out: Vec<Line<'static>>,
    containers: Vec<Container>,
    /// Per open list: the next number of an ordered list, `None` for a bullet list.
    lists: Vec<Option<u64>>,
    /// Inline styles; the last one applies to text.
    styles: Vec<Style>,
    /// The logical line being collected (a paragraph, a heading, a tight list item's text).
    inline: Vec<Span<'static>>,
    /// Whether a blank line goes before the next block.
    need_blank: bool,
    code: Option<CodeState>,
    table: Option<TableState>,
}

impl<'h> Renderer<'h> {
    fn new(width: usize, highlighter: &'h Highlighter, color: bool) -> Self {
        Self {
            highlighter,
            width,
            color,
            palette: Palette {
                color,
                theme: highlighter.ui_theme(),
            },
            out: Vec::new(),
            containers: Vec::new(),
            lists: Vec::new(),
            styles: vec![Style::default()],
            inline: Vec::new(),
            need_blank: false,
            code: None,
            table: None,
        }
    }

    fn finish(mut self) -> Vec<Line<'static>> {
        // Parsers close every open block at the end of input, but be safe with a stream.
        if let Some(code) = self.code.take() {
            self.render_code(code);
        }
        self.flush_inline(false);
        self.out
    }

    fn event(&mut self, event: Event<'_>) {
        match event {
            Event::Start(tag) => self.start(tag),
            Event::End(tag) => self.end(tag),
            Event::Text(text) => match &mut self.code {
                Some(code) => code.text.push_str(&text),
                None => self.push_text(&text),
            },
            Event::Code(text) => {
                let style = self.style().patch(self.palette.inline_code());
                self.push_span(&text, style);
            }
            Event::InlineMath(text) | Event::DisplayMath(text) => {
                let style = self.style().patch(self.palette.inline_code());
                self.push_span(&text, style);
            }
            Event::Html(text) => {
                // Block HTML comes a line at a time: keep its lines.
                for part in text.split_inclusive('\n') {
                    self.push_text(part.trim_end_matches(['\n', '\r']));
                    if part.ends_with('\n') {
                        self.flush_inline(true);
                    }
                }
            }
            Event::InlineHtml(text) => self.push_text(&text),
            Event::FootnoteReference(label) => self.push_text(&format!("[^{label}]")),
            Event::SoftBreak => self.push_text(" "),
            Event::HardBreak => {
                if self.table.is_some() {
                    self.push_text(" ");
                } else {
                    self.flush_inline(true);
                }
            }
            Event::Rule => self.rule(),
            Event::TaskListMarker(checked) => {
                let marker = if checked { "[x] " } else { "[ ] " };
                self.push_span(marker, self.palette.marker());
            }
        }
    }

    fn start(&mut self, tag: Tag<'_>) {
        match tag {
            Tag::Paragraph
            | Tag::HtmlBlock
            | Tag::DefinitionList
            | Tag::DefinitionListTitle
            | Tag::DefinitionListDefinition
            | Tag::MetadataBlock(_) => self.start_block(),
            Tag::Heading { level, .. } => {
                self.start_block();
                self.push_style(self.palette.heading(level));
            }
            Tag::BlockQuote(_) => {
                self.start_block();
                let bar = vec![Span::styled("│ ", self.palette.quote())];
                self.containers.push(Container {
                    first: bar.clone(),
                    rest: bar,
                    used: false,
                    item: false,
                });
            }
            Tag::CodeBlock(kind) => {
                self.start_block();
                let lang = match kind {
                    CodeBlockKind::Fenced(info) => info
                        .split(|c: char| c.is_whitespace() || c == ',' || c == '{')
                        .next()
                        .filter(|lang| !lang.is_empty())
                        .map(str::to_string),
                    CodeBlockKind::Indented => None,
                };
                self.code = Some(CodeState {
                    lang,
                    text: String::new(),
                });
            }
            Tag::List(start) => {
                self.start_block();
                self.lists.push(start);
            }
            Tag::Item => {
                self.flush_inline(false);
                let depth = self.lists.len();
                let marker = match self.lists.last_mut() {
                    Some(Some(number)) => {
                        let marker = format!("{number}. ");
                        *number += 1;
                        marker
                    }
                    _ => bullet(depth).to_string(),
                };
                let indent = " ".repeat(str_width(&marker));
                self.containers.push(Container {
                    first: vec![Span::styled(marker, self.palette.marker())],
                    rest: vec![Span::raw(indent)],
                    used: false,
                    item: true,
                });
            }
            Tag::FootnoteDefinition(label) => {
                self.start_block();
                self.push_text(&format!("[^{label}]: "));
            }
            Tag::Table(aligns) => {
                self.start_block();
                self.table = Some(TableState {
                    aligns,
                    rows: Vec::new(),
                    row: Vec::new(),
                });
            }
            Tag::TableHead | Tag::TableRow => {
                if let Some(table) = &mut self.table {
                    table.row.clear();
                }
            }
            Tag::TableCell => self.inline.clear(),
            Tag::Emphasis => self.push_style(Style::default().add_modifier(Modifier::ITALIC)),
            Tag::Strong => self.push_style(Style::default().add_modifier(Modifier::BOLD)),
            Tag::Strikethrough => {
                self.push_style(Style::default().add_modifier(Modifier::CROSSED_OUT));
            }
            Tag::Superscript | Tag::Subscript => self.push_style(Style::default()),
            Tag::Link { .. } => self.push_style(self.palette.link()),
            Tag::Image { .. } => {
                self.push_style(Style::default());
                self.push_text("[");
            }
        }
    }

    fn end(&mut self, tag: TagEnd) {
        match tag {
            TagEnd::Paragraph
            | TagEnd::HtmlBlock
            | TagEnd::FootnoteDefinition
            | TagEnd::DefinitionList
            | TagEnd::DefinitionListTitle
            | TagEnd::DefinitionListDefinition
            | TagEnd::MetadataBlock(_) => {
                self.flush_inline(false);
                self.need_blank = true;
            }
            TagEnd::Heading(_) => {
                self.flush_inline(false);
                self.pop_style();
                self.need_blank = true;
            }
            TagEnd::BlockQuote(_) => {
                self.flush_inline(false);
                self.containers.pop();
                self.need_blank = true;
            }
            TagEnd::CodeBlock => {
                if let Some(code) = self.code.take() {
                    self.render_code(code);
                }
                self.need_blank = true;
            }
            TagEnd::List(_) => {
                self.flush_inline(false);
                self.lists.pop();
                // A list nested in a tight item runs on into the next item without a gap.
                if !self.containers.iter().any(|c| c.item) {
                    self.need_blank = true;
                }
            }
            TagEnd::Item => {
                self.flush_inline(false);
                if self.containers.last().is_some_and(|c| !c.used) {
                    // An empty item still shows its marker.
                    self.emit_cut("", Vec::new());
                }
                self.containers.pop();
            }
            TagEnd::Table => {
                if let Some(table) = self.table.take() {
                    self.render_table(table);
                }
                self.need_blank = true;
            }
            TagEnd::TableHead | TagEnd::TableRow => {
                if let Some(table) = &mut self.table {
                    let row = std::mem::take(&mut table.row);
                    table.rows.push((row, tag == TagEnd::TableHead));
                }
            }
            TagEnd::TableCell => {
                let cell = std::mem::take(&mut self.inline);
                if let Some(table) = &mut self.table {
                    table.row.push(cell);
                }
            }
            TagEnd::Emphasis
            | TagEnd::Strong
            | TagEnd::Strikethrough
            | TagEnd::Superscript
            | TagEnd::Subscript
            | TagEnd::Link => self.pop_style(),
            TagEnd::Image => {
                self.push_text("]");
                self.pop_style();
            }
        }
    }

    fn style(&self) -> Style {
        self.styles.last().copied().unwrap_or_default()
    }

    fn push_style(&mut self, style: Style) {
        self.styles.push(self.style().patch(style));
    }

    fn pop_style(&mut self) {
        // The first entry is the base style and stays.
        if self.styles.len() > 1 {
            self.styles.pop();
        }
    }

    fn push_text(&mut self, text: &str) {
        self.push_span(text, self.style());
    }

    /// Appends inline text, with tabs and newlines as spaces and other control characters gone.
    fn push_span(&mut self, text: &str, style: Style) {
        let text: String = text
            .chars()
            .filter_map(|c| match c {
                '\t' | '\n' => Some(' '),
                c if c.is_control() => None,
                c => Some(c),
            })
            .collect();
        if text.is_empty() {
            return;
        }
        push_merged(&mut self.inline, text, style);
    }

    /// Emits pending inline text (or, with `force`, an empty line when there is none).
    fn flush_inline(&mut self, force: bool) {
        if self.table.is_some() || (self.inline.is_empty() && !force) {
            return;
        }
        let spans = std::mem::take(&mut self.inline);
        let (first, rest) = self.take_prefixes();
        self.out.extend(wrap(spans, first, rest, self.width));
    }

    /// Ends any pending text and puts the blank line that separates blocks.
    fn start_block(&mut self) {
        self.flush_inline(false);
        if self.need_blank && !self.out.is_empty() {
            let mut spans: Vec<Span<'static>> = self
                .containers
                .iter()
                .flat_map(|c| c.rest.iter().cloned())
                .collect();
            trim_end(&mut spans);
            self.out.push(Line::from(spans));
        }
        self.need_blank = false;
    }

    /// The prefixes for the next line and for the lines after it; marks markers as shown.
    fn take_prefixes(&mut self) -> (Vec<Span<'static>>, Vec<Span<'static>>) {
        let mut first = Vec::new();
        let mut rest = Vec::new();
        for container in &mut self.containers {
            if container.used {
                first.extend(container.rest.iter().cloned());
            } else {
                first.extend(container.first.iter().cloned());
                container.used = true;
            }
            rest.extend(container.rest.iter().cloned());
        }
        (first, rest)
    }

    /// The width of the prefix the next line will get.
    fn prefix_width(&self) -> usize {
        self.containers
            .iter()
            .map(|c| spans_width(if c.used { &c.rest } else { &c.first }))
            .sum()
    }

    /// Emits `spans` after `indent` without word wrapping, cut into lines at the width.
    fn emit_cut(&mut self, indent: &str, spans: Vec<Span<'static>>) {
        let (first, rest) = self.take_prefixes();
        let mut line = LineBuilder::new(first, indent, self.width);
        for span in spans {
            for c in span.content.chars() {
                let width = char_width(c);
                if line.overflows_with(width) {
                    self.out.push(line.finish());
                    line = LineBuilder::new(rest.clone(), indent, self.width);
                }
                line.push_char(c, width, span.style);
            }
        }
        self.out.push(line.finish());
    }

    fn rule(&mut self) {
        self.start_block();
        let width = self.width.saturating_sub(self.prefix_width()).max(1);
        let rule = Span::styled("─".repeat(width), self.palette.dim());
        self.emit_cut("", vec![rule]);
        self.need_blank = true;
    }

    fn render_code(&mut self, code: CodeState) {
        let label = code.lang.as_deref().unwrap_or("code");
        let header = Span::styled(format!("─ {label} ─"), self.palette.dim());
        self.emit_cut("", vec![header]);
        let lines = self
            .highlighter
            .highlight(code.lang.as_deref(), &code.text, self.color);
        for line in lines {
            self.emit_cut(CODE_INDENT, line);
        }
    }

    fn render_table(&mut self, table: TableState) {
        let columns = table
            .rows
            .iter()
            .map(|(row, _)| row.len())
            .max()
            .unwrap_or(0);
        if columns == 0 {
            return;
        }
        let mut widths = vec![0; columns];
        for (row, _) in &table.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(spans_width(cell));
            }
        }
        let separator = Span::styled(" │ ", self.palette.dim());
        let total = widths.iter().sum::<usize>() + 3 * (columns - 1);
        let avail = self.width.saturating_sub(self.prefix_width()).max(1);
        let bold = Style::default().add_modifier(Modifier::BOLD);
        for (row, header) in table.rows {
            let cells = row.into_iter().map(|cell| {
                if header {
                    cell.into_iter().map(|s| s.patch_style(bold)).collect()
                } else {
                    cell
                }
            });
            let mut spans = Vec::new();
            if total <= avail {
                let mut cells = cells;
                for (i, width) in widths.iter().enumerate() {
                    if i > 0 {
                        spans.push(separator.clone());
                    }
                    let cell: Vec<Span<'static>> = cells.next().unwrap_or_default();
                    let pad = width.saturating_sub(spans_width(&cell));
                    let (left, right) = match table.aligns.get(i) {
                        Some(Alignment::Right) => (pad, 0),
                        Some(Alignment::Center) => (pad / 2, pad - pad / 2),
                        _ => (0, pad),
                    };
                    spans.push(Span::raw(" ".repeat(left)));
                    spans.extend(cell);
                    spans.push(Span::raw(" ".repeat(right)));
                }
                self.emit_cut("", spans);
            } else {
                // Too wide to line up: one wrapped line per row.
                for (i, cell) in cells.enumerate() {
                    if i > 0 {
                        spans.push(separator.clone());
                    }
                    spans.extend(cell);
                }
                let (first, rest) = self.take_prefixes();
                self.out.extend(wrap(spans, first, rest, self.width));
            }
            if header {
                let rule = if total <= avail {
                    widths
                        .iter()
                        .map(|w| "─".repeat(*w))
                        .collect::<Vec<_>>()
                        .join("─┼─")
                } else {
                    "─".repeat(avail)
                };
                self.emit_cut("", vec![Span::styled(rule, self.palette.dim())]);
            }
        }
    }
}

/// The bullet for a list nested `depth` lists deep.
fn bullet(depth: usize) -> &'static str {
    match depth {
        0 | 1 => "• ",
        2 => "◦ ",
        _ => "▪ ",
    }
}

//! Markdown rendering for the chat pane.
//!
//! [`render_markdown`] turns a chat message, which may still be streaming in and so be
//! incomplete (an unclosed code fence, half a list), into styled ratatui [`Line`]s wrapped to
//! the pane's width. The whole message is re-rendered on every redraw, so re-rendering at a new
//! width simply re-wraps. Fenced code blocks are highlighted with syntect through a shared
//! [`Highlighter`], whose syntaxes and theme are loaded once.

use std::fmt;

use pulldown_cmark::{Alignment, CodeBlockKind, Event, HeadingLevel, Options, Parser, Tag, TagEnd};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use syntect::easy::HighlightLines;
use syntect::highlighting::{FontStyle, Theme as SyntectTheme, ThemeSet};
use syntect::parsing::{SyntaxReference, SyntaxSet};
use syntect::util::LinesWithEndings;

pub use crate::config::Theme;

/// What the interface draws with in each theme.
pub trait ThemeColors {
    /// syntect's theme for code in this theme.
    fn syntect_name(self) -> &'static str;
    /// `color` made readable on this theme's background: pale colours darken on light.
    fn adapt(self, color: Color) -> Color;
}

impl ThemeColors for Theme {
    fn syntect_name(self) -> &'static str {
        match self {
            Theme::Dark => "base16-ocean.dark",
            Theme::Light => "InspiredGitHub",
        }
    }

    fn adapt(self, color: Color) -> Color {
        match (self, color) {
            (Theme::Light, Color::Cyan) => Color::Blue,
            (Theme::Light, Color::Yellow) => Color::Rgb(140, 90, 0),
            (Theme::Light, Color::Green) => Color::Rgb(0, 120, 0),
            (Theme::Light, Color::Magenta) => Color::Rgb(140, 0, 140),
            _ => color,
        }
    }
}

/// Indentation of each code line under a code block's header.
const CODE_INDENT: &str = "  ";

/// Syntax highlighting data for fenced code blocks; slow to load, so create it once and share it.
pub struct Highlighter {
    syntaxes: SyntaxSet,
    theme: SyntectTheme,
    /// The UI theme the syntect theme was chosen for.
    ui_theme: Theme,
}

impl Highlighter {
    /// Loads syntect's default syntaxes and the dark theme (takes tens of ms).
    pub fn new() -> Self {
        Self::with_theme(Theme::Dark)
    }

    /// Loads syntect's default syntaxes and the code theme for `ui_theme`.
    pub fn with_theme(ui_theme: Theme) -> Self {
        let syntaxes = SyntaxSet::load_defaults_newlines();
        let mut themes = ThemeSet::load_defaults();
        // The theme ships with syntect's defaults; should it ever go missing, an empty theme
        // (everything in the default colour) is a better outcome than a panic.
        let theme = themes
            .themes
            .remove(ui_theme.syntect_name())
            .unwrap_or_default();
        Self {
            syntaxes,
            theme,
            ui_theme,
        }
    }

    /// The UI theme this highlighter was made for.
    pub fn ui_theme(&self) -> Theme {
        self.ui_theme
    }

    /// The syntax for a fence's language, falling back to plain text.
    fn syntax(&self, lang: Option<&str>) -> &SyntaxReference {
        let plain = self.syntaxes.find_syntax_plain_text();
        let Some(lang) = lang else {
            return plain;
        };
        let lang = lang.trim().to_ascii_lowercase();
        // Common fence names that syntect's bundled syntaxes don't know by that token.
        let token = match lang.as_str() {
            "shell" | "zsh" | "console" | "shellscript" | "shell-session" => "bash",
            "ts" | "typescript" | "tsx" | "jsx" | "mjs" | "cjs" => "js",
            "jsonc" | "json5" => "json",
            "c++" => "cpp",
            "golang" => "go",
            "py3" | "python3" => "py",
            "yml" => "yaml",
            other => other,
        };
        self.syntaxes.find_syntax_by_token(token).unwrap_or(plain)
    }

    /// Splits `code` from the file at `path` into lines of spans, highlighted by its extension.
    pub fn highlight_file(&self, path: &str, code: &str, color: bool) -> Vec<Vec<Span<'static>>> {
        let extension = std::path::Path::new(path)
            .extension()
            .and_then(|e| e.to_str());
        self.highlight(extension, code, color)
    }

    /// Splits `code` into lines of spans, highlighted when `color` is on.
    fn highlight(&self, lang: Option<&str>, code: &str, color: bool) -> Vec<Vec<Span<'static>>> {
        if !color {
            return LinesWithEndings::from(code).map(plain_code_line).collect();
        }
        let mut highlighter = HighlightLines::new(self.syntax(lang), &self.theme);
        let mut failed = false;
        let mut lines = Vec::new();
        for line in LinesWithEndings::from(code) {
            let regions = if failed {
                None
            } else {
                highlighter.highlight_line(line, &self.syntaxes).ok()
            };
            match regions {
                Some(regions) => lines.push(
                    regions
                        .into_iter()
                        .filter_map(|(style, text)| {
                            let text = clean_code(text);
                            (!text.is_empty()).then(|| Span::styled(text, convert_style(style)))
                        })
                        .collect(),
                ),
                None => {
                    // A syntax that fails once keeps failing: show the rest unhighlighted.
                    failed = true;
                    lines.push(plain_code_line(line));
                }
            }
        }
        lines
    }
}

impl Default for Highlighter {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Highlighter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Highlighter")
            .field("syntaxes", &self.syntaxes.syntaxes().len())
            .field("theme", &self.theme.name)
            .finish()
    }
}

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
                if line.width + width > line.avail && line.width > line.indent {
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

/// A line being filled: its prefix, then content up to `avail` columns.
struct LineBuilder {
    spans: Vec<Span<'static>>,
    /// How many of `spans` are the prefix (never merged with content).
    prefix_len: usize,
    /// Width of the content so far.
    width: usize,
    /// Width available for content.
    avail: usize,
    /// Width of the indent at the start of the content.
    indent: usize,
}

impl LineBuilder {
    /// A line with `prefix`, then `indent` counted as content, in a pane `width` wide.
    ///
    /// In a pane too narrow for them, the prefix and indent are cut short so that at least one
    /// column is left for content.
    fn new(mut prefix: Vec<Span<'static>>, indent: &str, width: usize) -> Self {
        let width = width.max(1);
        if spans_width(&prefix) >= width {
            truncate_spans(&mut prefix, width - 1);
        }
        let avail = width - spans_width(&prefix);
        let prefix_len = prefix.len();
        let mut line = Self {
            spans: prefix,
            prefix_len,
            width: 0,
            avail,
            indent: 0,
        };
        let mut indent = indent.to_string();
        if str_width(&indent) >= avail {
            let mut spans = vec![Span::raw(indent)];
            truncate_spans(&mut spans, avail - 1);
            indent = spans
                .pop()
                .map(|s| s.content.into_owned())
                .unwrap_or_default();
        }
        if !indent.is_empty() {
            line.width = str_width(&indent);
            line.indent = line.width;
            line.spans.push(Span::raw(indent));
            line.prefix_len += 1;
        }
        line
    }

    fn has_content(&self) -> bool {
        self.spans.len() > self.prefix_len
    }

    fn push(&mut self, span: Span<'static>) {
        self.width += span.width();
        if self.has_content() {
            push_merged(&mut self.spans, span.content.into_owned(), span.style);
        } else {
            self.spans.push(span);
        }
    }

    fn push_char(&mut self, c: char, width: usize, style: Style) {
        self.width += width;
        if self.has_content() {
            push_merged(&mut self.spans, c.to_string(), style);
        } else {
            self.spans.push(Span::styled(c.to_string(), style));
        }
    }

    fn finish(mut self) -> Line<'static> {
        trim_end(&mut self.spans);
        Line::from(self.spans)
    }
}

/// A run of inline content that wrapping keeps whole, or a run of spaces it may break at.
enum Token {
    Word(Vec<Span<'static>>),
    Space(Vec<Span<'static>>),
}

/// Whether wrapping may break a line at `c`.
fn is_break(c: char) -> bool {
    c.is_whitespace() && !matches!(c, '\u{a0}' | '\u{202f}' | '\u{2007}')
}

/// Splits spans into words and spaces; a word may cross spans of different styles.
fn tokenize(spans: Vec<Span<'static>>) -> Vec<Token> {
    fn add(tokens: &mut Vec<Token>, space: bool, text: &str, style: Style) {
        let span = Span::styled(text.to_string(), style);
        match tokens.last_mut() {
            Some(Token::Space(spans)) if space => spans.push(span),
            Some(Token::Word(spans)) if !space => spans.push(span),
            _ if space => tokens.push(Token::Space(vec![span])),
            _ => tokens.push(Token::Word(vec![span])),
        }
    }
    let mut tokens = Vec::new();
    for span in spans {
        let text = span.content.as_ref();
        let mut start = 0;
        let mut kind = None;
        for (i, c) in text.char_indices() {
            let space = is_break(c);
            if kind != Some(space) {
                if let Some(previous) = kind {
                    add(&mut tokens, previous, &text[start..i], span.style);
                }
                start = i;
                kind = Some(space);
            }
        }
        if let Some(previous) = kind {
            add(&mut tokens, previous, &text[start..], span.style);
        }
    }
    tokens
}

/// Greedy word wrap of `spans` to `width`, keeping styles; words wider than a line are cut.
fn wrap(
    spans: Vec<Span<'static>>,
    first: Vec<Span<'static>>,
    rest: Vec<Span<'static>>,
    width: usize,
) -> Vec<Line<'static>> {
    let mut out = Vec::new();
    let mut line = LineBuilder::new(first, "", width);
    let mut pending: Vec<Span<'static>> = Vec::new();
    for token in tokenize(spans) {
        let word = match token {
            Token::Space(space) => {
                pending.extend(space);
                continue;
            }
            Token::Word(word) => word,
        };
        let word_width = spans_width(&word);
        let pending_width = spans_width(&pending);
        if line.has_content() && line.width + pending_width + word_width > line.avail {
            out.push(line.finish());
            line = LineBuilder::new(rest.clone(), "", width);
        }
        // Spaces are dropped at the start of a line.
        let pending = std::mem::take(&mut pending);
        if line.has_content() {
            for span in pending {
                line.push(span);
            }
        }
        if line.width + word_width <= line.avail {
            for span in word {
                line.push(span);
            }
            continue;
        }
        // Too long for any line: cut it, a character at a time.
        for span in word {
            for c in span.content.chars() {
                let char_width = char_width(c);
                if line.width + char_width > line.avail && line.width > 0 {
                    out.push(line.finish());
                    line = LineBuilder::new(rest.clone(), "", width);
                }
                line.push_char(c, char_width, span.style);
            }
        }
    }
    out.push(line.finish());
    out
}

/// Appends `text` to `spans`, extending the last span when it has the same style.
fn push_merged(spans: &mut Vec<Span<'static>>, text: String, style: Style) {
    match spans.last_mut() {
        Some(last) if last.style == style => last.content.to_mut().push_str(&text),
        _ => spans.push(Span::styled(text, style)),
    }
}

/// Cuts spans down to at most `max_width` columns.
fn truncate_spans(spans: &mut Vec<Span<'static>>, max_width: usize) {
    let mut used = 0;
    let mut keep = 0;
    for span in spans.iter_mut() {
        let width = span.width();
        if used + width <= max_width {
            used += width;
            keep += 1;
            continue;
        }
        let mut text = String::new();
        for c in span.content.chars() {
            let c_width = char_width(c);
            if used + c_width > max_width {
                break;
            }
            used += c_width;
            text.push(c);
        }
        if !text.is_empty() {
            span.content = text.into();
            keep += 1;
        }
        break;
    }
    spans.truncate(keep);
}

/// Removes trailing whitespace from the end of a line's spans.
fn trim_end(spans: &mut Vec<Span<'static>>) {
    while let Some(last) = spans.last_mut() {
        let trimmed = last.content.trim_end().len();
        if trimmed == 0 {
            spans.pop();
        } else {
            if trimmed < last.content.len() {
                last.content.to_mut().truncate(trimmed);
            }
            break;
        }
    }
}

/// Display width of a string in terminal columns.
fn str_width(text: &str) -> usize {
    Span::raw(text).width()
}

/// Display width of a character in terminal columns.
fn char_width(c: char) -> usize {
    let mut buf = [0; 4];
    str_width(c.encode_utf8(&mut buf))
}

/// Total display width of spans.
fn spans_width(spans: &[Span<'_>]) -> usize {
    spans.iter().map(Span::width).sum()
}

/// A code line's text without its line ending, with tabs expanded and control characters gone.
fn clean_code(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\t' => out.push_str("    "),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// An unhighlighted code line.
fn plain_code_line(line: &str) -> Vec<Span<'static>> {
    let text = clean_code(line);
    if text.is_empty() {
        Vec::new()
    } else {
        vec![Span::raw(text)]
    }
}

/// Converts a syntect style to a ratatui one (foreground and font style; the theme's
/// background is left to the terminal).
fn convert_style(style: syntect::highlighting::Style) -> Style {
    let fg = style.foreground;
    let mut out = Style::default().fg(Color::Rgb(fg.r, fg.g, fg.b));
    if style.font_style.contains(FontStyle::BOLD) {
        out = out.add_modifier(Modifier::BOLD);
    }
    if style.font_style.contains(FontStyle::ITALIC) {
        out = out.add_modifier(Modifier::ITALIC);
    }
    if style.font_style.contains(FontStyle::UNDERLINE) {
        out = out.add_modifier(Modifier::UNDERLINED);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::OnceLock;

    use super::*;

    fn highlighter() -> &'static Highlighter {
        static HIGHLIGHTER: OnceLock<Highlighter> = OnceLock::new();
        HIGHLIGHTER.get_or_init(Highlighter::new)
    }

    fn render(text: &str, width: u16, color: bool) -> Vec<Line<'static>> {
        render_markdown(text, width, highlighter(), color)
    }

    fn line_text(line: &Line<'_>) -> String {
        line.spans.iter().map(|s| s.content.as_ref()).collect()
    }

    fn plain(lines: &[Line<'_>]) -> String {
        lines.iter().map(line_text).collect::<Vec<_>>().join("\n")
    }

    fn all_spans<'a>(lines: &'a [Line<'static>]) -> impl Iterator<Item = &'a Span<'static>> {
        lines.iter().flat_map(|l| l.spans.iter())
    }

    fn span_with<'a>(lines: &'a [Line<'static>], text: &str) -> &'a Span<'static> {
        all_spans(lines)
            .find(|s| s.content.contains(text))
            .unwrap_or_else(|| panic!("no span containing {text:?} in {lines:#?}"))
    }

    fn assert_fits(lines: &[Line<'_>], width: usize) {
        for line in lines {
            assert!(
                line.width() <= width,
                "line wider than {width}: {:?}",
                line_text(line)
            );
        }
    }

    const SAMPLE: &str = "\
# Plait notes

This paragraph has *emphasis*, **strong text**, `inline code` and a [link](https://example.com) \
that is long enough to wrap at a narrow width.

## Steps

1. Install the model weights into the cache directory before the first run.
2. Run `plait` in the repository.
   - nested bullet with a continuation line that wraps
   - second nested bullet

- a bullet
- another bullet

> A quoted remark that goes on for a while, so that it has to wrap onto more lines.
>
> Second quoted paragraph.

```python
def greet(name):
    return f\"hello {name}\"  # a comment that is long enough to be cut at forty columns
```

---

| Name | Size |
|------|-----:|
| a.rs | 10 |
| long_name.rs | 2000 |

Done.";

    #[test]
    fn wrapping_fits_and_loses_no_words() {
        let text = "The quick brown fox jumps over the lazy dog, then keeps running through \
                    the field of wheat and barley until the sun goes down behind the hills. \
                    Short words and some considerably lengthier vocabulary intermingle here.";
        for width in [12u16, 17, 25, 40, 80, 200] {
            let lines = render(text, width, true);
            assert_fits(&lines, usize::from(width));
            let out = plain(&lines);
            let out_words: Vec<&str> = out.split_whitespace().collect();
            let in_words: Vec<&str> = text.split_whitespace().collect();
            assert_eq!(out_words, in_words, "width {width}");
        }
        // A narrower width re-wraps into more lines.
        assert!(render(text, 30, true).len() > render(text, 80, true).len());
    }

    #[test]
    fn long_words_are_cut_not_lost() {
        let word = "x".repeat(75);
        let text = format!("short {word} tail");
        let lines = render(&text, 20, true);
        assert_fits(&lines, 20);
        let joined: String = plain(&lines).split_whitespace().collect();
        assert_eq!(joined, format!("short{word}tail"));
    }

    #[test]
    fn wide_characters_wrap_by_display_width() {
        let text = "漢字漢字 漢字漢字漢字 漢字 漢字漢字漢字漢字漢字漢字漢字漢字漢字漢字";
        let lines = render(text, 12, true);
        assert_fits(&lines, 12);
        let joined: String = plain(&lines).split_whitespace().collect();
        assert_eq!(joined, text.split_whitespace().collect::<String>());
    }

    #[test]
    fn wrapping_keeps_styles() {
        let lines = render(
            "plain words then **bold words that wrap across lines** end",
            16,
            true,
        );
        assert_fits(&lines, 16);
        for span in all_spans(&lines) {
            let bold = span.style.add_modifier.contains(Modifier::BOLD);
            let is_bold_text = ["bold", "words", "that", "wrap", "across", "lines"]
                .iter()
                .any(|w| span.content.contains(w))
                && !span.content.contains("plain");
            if span.content.contains("end") || span.content.contains("then") {
                assert!(!bold, "{span:?}");
            } else if is_bold_text && !span.content.contains("words then") {
                assert!(bold, "{span:?}");
            }
        }
    }

    #[test]
    fn heading_styles() {
        for color in [true, false] {
            let lines = render("# Title\n\n### Sub", 40, color);
            assert_eq!(plain(&lines), "Title\n\nSub");
            for text in ["Title", "Sub"] {
                let span = span_with(&lines, text);
                assert!(span.style.add_modifier.contains(Modifier::BOLD));
                assert_eq!(span.style.fg.is_some(), color);
            }
        }
    }

    #[test]
    fn emphasis_strong_and_inline_code() {
        let lines = render("a *it* b **bo** c `co` d", 80, true);
        assert_eq!(plain(&lines), "a it b bo c co d");
        assert!(span_with(&lines, "it")
            .style
            .add_modifier
            .contains(Modifier::ITALIC));
        assert!(span_with(&lines, "bo")
            .style
            .add_modifier
            .contains(Modifier::BOLD));
        let code = span_with(&lines, "co");
        assert_eq!(code.style.fg, Some(Color::Cyan));
        assert_eq!(span_with(&lines, "a ").style, Style::default());

        let lines = render("a `co` d", 80, false);
        let code = span_with(&lines, "co");
        assert!(code.style.add_modifier.contains(Modifier::REVERSED));
        assert_eq!(code.style.fg, None);
    }

    #[test]
    fn lists_have_markers_and_indented_continuations() {
        let text = "- first item that is long enough to wrap\n- second\n\n\
                    1. one\n2. two that also wraps around\n";
        let lines = render(text, 20, true);
        assert_fits(&lines, 20);
        let texts: Vec<String> = lines.iter().map(line_text).collect();
        assert_eq!(
            texts,
            [
                "• first item that is",
                "  long enough to",
                "  wrap",
                "• second",
                "",
                "1. one",
                "2. two that also",
                "   wraps around",
            ]
        );
        assert_eq!(span_with(&lines, "•").style.fg, Some(Color::Yellow));
    }

    #[test]
    fn nested_lists_indent() {
        let lines = render("- outer\n  - inner\n- next", 40, true);
        assert_eq!(plain(&lines), "• outer\n  ◦ inner\n• next");
    }

    #[test]
    fn block_quotes_and_rules() {
        let lines = render("> quoted\n>\n> more\n\n---\n\nafter", 10, true);
        assert_eq!(plain(&lines), "│ quoted\n│\n│ more\n\n──────────\n\nafter");
    }

    #[test]
    fn python_block_is_highlighted_with_colour_only() {
        let text = "```python\nimport os\n\ndef main(x: int) -> str:\n    \
                    # comment\n    return \"s\" + str(x * 2)\n```\n";
        let lines = render(text, 80, true);
        assert_eq!(line_text(&lines[0]), "─ python ─");
        assert_eq!(line_text(&lines[1]), "  import os");
        assert_eq!(line_text(&lines[2]), "");
        assert_eq!(line_text(&lines[4]), "      # comment");
        let colours: HashSet<Color> = lines[1..]
            .iter()
            .flat_map(|l| l.spans.iter())
            .filter_map(|s| s.style.fg)
            .collect();
        assert!(colours.len() >= 4, "{colours:?}");

        let lines = render(text, 80, false);
        assert_eq!(line_text(&lines[1]), "  import os");
        for span in all_spans(&lines) {
            assert_eq!(span.style.fg, None, "{span:?}");
            assert_eq!(span.style.bg, None, "{span:?}");
        }
    }

    #[test]
    fn unknown_or_missing_language_is_plain() {
        let lines = render("```nosuchlang\nsome code\n```", 40, true);
        assert_eq!(plain(&lines), "─ nosuchlang ─\n  some code");
        let lines = render("    indented code\n", 40, true);
        assert_eq!(plain(&lines), "─ code ─\n  indented code");
    }

    #[test]
    fn unclosed_fence_renders_its_code() {
        let text = "Here you go:\n\n```rust\nfn main() {\n    let answer = 4";
        let lines = render(text, 40, true);
        assert_eq!(
            plain(&lines),
            "Here you go:\n\n─ rust ─\n  fn main() {\n      let answer = 4"
        );
        let colours: HashSet<Color> = all_spans(&lines).filter_map(|s| s.style.fg).collect();
        assert!(colours.len() >= 3, "{colours:?}");
    }

    #[test]
    fn code_lines_are_cut_not_wrapped() {
        let code = "let value = some_function(argument_one, argument_two, argument_three);";
        let lines = render(&format!("```rust\n{code}\n```"), 30, true);
        assert_fits(&lines, 30);
        assert!(lines.len() >= 4);
        let body: String = lines[1..]
            .iter()
            .map(|l| line_text(l).strip_prefix(CODE_INDENT).unwrap().to_string())
            .collect();
        assert_eq!(body, code);
    }

    #[test]
    fn no_colour_means_no_colours() {
        let lines = render(SAMPLE, 40, false);
        for span in all_spans(&lines) {
            assert_eq!(span.style.fg, None, "{span:?}");
            assert_eq!(span.style.bg, None, "{span:?}");
            assert_eq!(span.style.underline_color, None, "{span:?}");
        }
        // Same text either way.
        assert_eq!(plain(&lines), plain(&render(SAMPLE, 40, true)));
    }

    #[test]
    fn sample_fits_every_width() {
        for width in [1u16, 5, 12, 25, 40, 80, 120] {
            assert_fits(&render(SAMPLE, width, true), usize::from(width).max(1));
        }
    }

    #[test]
    fn every_prefix_of_a_stream_renders() {
        // Streaming: every partial message renders without panicking and fits.
        let mut end = 0;
        while end < SAMPLE.len() {
            end += 1;
            while !SAMPLE.is_char_boundary(end) {
                end += 1;
            }
            assert_fits(&render(&SAMPLE[..end], 30, true), 30);
        }
    }

    #[test]
    fn snapshot_width_40() {
        insta::assert_snapshot!(plain(&render(SAMPLE, 40, true)));
    }

    #[test]
    fn snapshot_width_80() {
        insta::assert_snapshot!(plain(&render(SAMPLE, 80, true)));
    }

    #[test]
    fn the_light_theme_colours_code_and_text_for_a_light_background() {
        let text = "# Title\n\n```rust\nfn main() { let x = 1; }\n```\n";
        let colours = |theme: Theme| -> Vec<Option<Color>> {
            let highlighter = Highlighter::with_theme(theme);
            render_markdown(text, 60, &highlighter, true)
                .iter()
                .flat_map(|l| l.spans.iter().map(|s| s.style.fg))
                .collect()
        };
        let (dark, light) = (colours(Theme::Dark), colours(Theme::Light));
        assert_ne!(dark, light);
        assert!(light.contains(&Some(Color::Rgb(140, 0, 140))), "{light:?}");
        assert_eq!(Theme::from_name("light"), Some(Theme::Light));
        assert_eq!(Theme::from_name("dark"), Some(Theme::Dark));
        assert_eq!(Theme::from_name("blue"), None, "not quietly dark");
    }
}

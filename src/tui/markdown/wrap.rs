//! Filling lines to a width: words wrapped by display width, long words and code cut.

use ratatui::style::Style;
use ratatui::text::{Line, Span};

/// A line being filled: its prefix, then content up to `avail` columns.
pub(super) struct LineBuilder {
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
    pub(super) fn new(mut prefix: Vec<Span<'static>>, indent: &str, width: usize) -> Self {
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

    /// Whether `width` more columns would pass the edge of a line that has content.
    pub(super) fn overflows_with(&self, width: usize) -> bool {
        self.width + width > self.avail && self.width > self.indent
    }

    pub(super) fn has_content(&self) -> bool {
        self.spans.len() > self.prefix_len
    }

    pub(super) fn push(&mut self, span: Span<'static>) {
        self.width += span.width();
        if self.has_content() {
            push_merged(&mut self.spans, span.content.into_owned(), span.style);
        } else {
            self.spans.push(span);
        }
    }

    pub(super) fn push_char(&mut self, c: char, width: usize, style: Style) {
        self.width += width;
        if self.has_content() {
            push_merged(&mut self.spans, c.to_string(), style);
        } else {
            self.spans.push(Span::styled(c.to_string(), style));
        }
    }

    pub(super) fn finish(mut self) -> Line<'static> {
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
pub(super) fn wrap(
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
pub(super) fn push_merged(spans: &mut Vec<Span<'static>>, text: String, style: Style) {
    match spans.last_mut() {
        Some(last) if last.style == style => last.content.to_mut().push_str(&text),
        _ => spans.push(Span::styled(text, style)),
    }
}

/// Cuts spans down to at most `max_width` columns.
pub(super) fn truncate_spans(spans: &mut Vec<Span<'static>>, max_width: usize) {
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
pub(super) fn trim_end(spans: &mut Vec<Span<'static>>) {
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
pub(super) fn str_width(text: &str) -> usize {
    Span::raw(text).width()
}

/// Display width of a character in terminal columns.
pub(super) fn char_width(c: char) -> usize {
    let mut buf = [0; 4];
    str_width(c.encode_utf8(&mut buf))
}

/// Total display width of spans.
pub(super) fn spans_width(spans: &[Span<'_>]) -> usize {
    spans.iter().map(Span::width).sum()
}

//! Syntax highlighting of code with syntect, in the colours of the UI theme.

use std::fmt;
use std::sync::OnceLock;

use ratatui::style::{Color, Modifier, Style};
use ratatui::text::Span;
use syntect::easy::HighlightLines;
use syntect::highlighting::{FontStyle, Theme as SyntectTheme, ThemeSet};
use syntect::parsing::{SyntaxReference, SyntaxSet};
use syntect::util::LinesWithEndings;

use super::Theme;

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

/// Syntax highlighting data for fenced code blocks; slow to load, so create it once and share it.
pub struct Highlighter {
    syntaxes: SyntaxSet,
    theme: SyntectTheme,
    /// The UI theme the syntect theme was chosen for.
    ui_theme: Theme,
}

impl Highlighter {
    /// Loads syntect's default syntaxes and the code theme for `ui_theme` (tens of ms:
    /// [`Highlighter::shared`] does it once per theme).
    fn with_theme(ui_theme: Theme) -> Self {
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

    /// The process's highlighter for `ui_theme`, loaded on first use.
    pub fn shared(ui_theme: Theme) -> &'static Self {
        static DARK: OnceLock<Highlighter> = OnceLock::new();
        static LIGHT: OnceLock<Highlighter> = OnceLock::new();
        let cell = match ui_theme {
            Theme::Dark => &DARK,
            Theme::Light => &LIGHT,
        };
        cell.get_or_init(|| Self::with_theme(ui_theme))
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
    pub(super) fn highlight(
        &self,
        lang: Option<&str>,
        code: &str,
        color: bool,
    ) -> Vec<Vec<Span<'static>>> {
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

impl fmt::Debug for Highlighter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Highlighter")
            .field("syntaxes", &self.syntaxes.syntaxes().len())
            .field("theme", &self.theme.name)
            .finish()
    }
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

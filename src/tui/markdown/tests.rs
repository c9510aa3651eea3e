//! The markdown renderer's tests and snapshots.

use std::collections::HashSet;

use super::*;

fn highlighter() -> &'static Highlighter {
    Highlighter::shared(Theme::Dark)
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
        let highlighter = Highlighter::shared(theme);
        render_markdown(text, 60, highlighter, true)
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

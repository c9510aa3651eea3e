//! Finding where a SEARCH text sits in a file, with progressively looser matching.
//!
//! Texts are compared line by line (LF line endings). The levels, tried in
//! order: exact; ignoring trailing whitespace; ignoring indentation (the
//! replacement is then re-indented by the same offset); with Unicode
//! punctuation normalised. The first level with any match decides: the match
//! must be unique.

use std::fmt;

/// How loosely a match was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatchLevel {
    /// Byte for byte.
    Exact,
    /// Ignoring trailing whitespace.
    TrailingWhitespace,
    /// Ignoring indentation.
    Indentation,
    /// Ignoring indentation, with curly quotes, dashes and odd spaces normalised.
    Unicode,
}

/// Where a SEARCH text was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    /// Index (0-based) of the first matched line.
    pub start_line: usize,
    /// Number of matched lines.
    pub line_count: usize,
    /// Level at which the match was found.
    pub level: MatchLevel,
}

/// Why a SEARCH text could not be located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocateError {
    /// The SEARCH text is empty.
    Empty,
    /// No match; `nearest` holds the most similar lines of the file (1-based numbers).
    NotFound {
        /// Most similar window of the file, as (1-based line number, text).
        nearest: Vec<(usize, String)>,
    },
    /// Several matches, starting at these 1-based lines.
    Ambiguous {
        /// 1-based first lines of each match.
        lines: Vec<usize>,
    },
}

impl fmt::Display for LocateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LocateError::Empty => write!(f, "the SEARCH text is empty"),
            LocateError::NotFound { nearest } if nearest.is_empty() => {
                write!(f, "SEARCH text not found (the file is empty)")
            }
            LocateError::NotFound { nearest } => {
                write!(f, "SEARCH text not found; did you mean these lines?")?;
                for (n, l) in nearest {
                    write!(f, "\n{n:>5} | {l}")?;
                }
                Ok(())
            }
            LocateError::Ambiguous { lines } => {
                let list: Vec<String> = lines.iter().map(|n| n.to_string()).collect();
                write!(
                    f,
                    "SEARCH text matches {} places (lines {}); include more context to make it unique",
                    lines.len(),
                    list.join(", ")
                )
            }
        }
    }
}

impl std::error::Error for LocateError {}

const NEAREST_MAX_LINES: usize = 12;

fn normalize_unicode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\u{2018}' | '\u{2019}' | '\u{201A}' | '\u{201B}' | '\u{2032}' => out.push('\''),
            '\u{201C}' | '\u{201D}' | '\u{201E}' | '\u{201F}' | '\u{2033}' => out.push('"'),
            '\u{2010}' | '\u{2011}' | '\u{2012}' | '\u{2013}' | '\u{2014}' | '\u{2015}'
            | '\u{2212}' => out.push('-'),
            '\u{00A0}' | '\u{2007}' | '\u{202F}' | '\u{2002}' | '\u{2003}' | '\u{2009}' => {
                out.push(' ')
            }
            '\u{2026}' => out.push_str("..."),
            '\u{200B}' | '\u{FEFF}' => {}
            _ => out.push(c),
        }
    }
    out
}

fn lines_equal(level: MatchLevel, a: &str, b: &str) -> bool {
    match level {
        MatchLevel::Exact => a == b,
        MatchLevel::TrailingWhitespace => a.trim_end() == b.trim_end(),
        MatchLevel::Indentation => a.trim() == b.trim(),
        MatchLevel::Unicode => normalize_unicode(a).trim() == normalize_unicode(b).trim(),
    }
}

/// Split LF text into lines without terminators (a final newline adds no empty line).
fn split_lines(text: &str) -> Vec<&str> {
    let body = text.strip_suffix('\n').unwrap_or(text);
    if text.is_empty() {
        Vec::new()
    } else {
        body.split('\n').collect()
    }
}

fn matches_at(level: MatchLevel, file: &[&str], search: &[&str], at: usize) -> bool {
    search
        .iter()
        .enumerate()
        .all(|(k, s)| lines_equal(level, file[at + k], s))
}

/// Find the unique place where `search` sits in `content` (both LF text).
pub fn locate(content: &str, search: &str) -> Result<Located, LocateError> {
    let file = split_lines(content);
    let needle = split_lines(search);
    if needle.iter().all(|l| l.trim().is_empty()) {
        return Err(LocateError::Empty);
    }
    if needle.len() <= file.len() {
        for level in [
            MatchLevel::Exact,
            MatchLevel::TrailingWhitespace,
            MatchLevel::Indentation,
            MatchLevel::Unicode,
        ] {
            let hits: Vec<usize> = (0..=file.len() - needle.len())
                .filter(|&at| matches_at(level, &file, &needle, at))
                .collect();
            match hits.as_slice() {
                [] => continue,
                [at] => {
                    return Ok(Located {
                        start_line: *at,
                        line_count: needle.len(),
                        level,
                    })
                }
                _ => {
                    return Err(LocateError::Ambiguous {
                        lines: hits.iter().map(|h| h + 1).collect(),
                    })
                }
            }
        }
    }
    Err(LocateError::NotFound {
        nearest: nearest_lines(&file, &needle),
    })
}

/// Dice coefficient over character bigrams of the trimmed lines.
fn similarity(a: &str, b: &str) -> f64 {
    let a: Vec<char> = a.trim().chars().collect();
    let b: Vec<char> = b.trim().chars().collect();
    if a == b {
        return 1.0;
    }
    if a.len() < 2 || b.len() < 2 {
        return 0.0;
    }
    let mut bigrams: Vec<(char, char)> = a.windows(2).map(|w| (w[0], w[1])).collect();
    let total = bigrams.len() + b.len() - 1;
    let mut common = 0usize;
    for w in b.windows(2) {
        if let Some(pos) = bigrams.iter().position(|&x| x == (w[0], w[1])) {
            bigrams.swap_remove(pos);
            common += 1;
        }
    }
    2.0 * common as f64 / total as f64
}

fn nearest_lines(file: &[&str], needle: &[&str]) -> Vec<(usize, String)> {
    if file.is_empty() {
        return Vec::new();
    }
    let window = needle.len().clamp(1, NEAREST_MAX_LINES).min(file.len());
    let mut best = (0usize, -1.0f64);
    for at in 0..=file.len() - window {
        let score: f64 = (0..window)
            .map(|k| similarity(file[at + k], needle.get(k).copied().unwrap_or("")))
            .sum();
        if score > best.1 {
            best = (at, score);
        }
    }
    (best.0..best.0 + window)
        .map(|i| (i + 1, file[i].to_string()))
        .collect()
}

fn leading_ws(s: &str) -> &str {
    &s[..s.len() - s.trim_start().len()]
}

/// Replace the unique occurrence of `search` in `content` by `replace` (all LF text).
///
/// When the match ignored indentation, `replace` is re-indented by the same offset.
pub fn replace_unique(content: &str, search: &str, replace: &str) -> Result<String, LocateError> {
    let found = locate(content, search)?;
    let file = split_lines(content);
    let needle = split_lines(search);
    let mut new_lines: Vec<String> = split_lines(replace).iter().map(|s| s.to_string()).collect();

    if matches!(found.level, MatchLevel::Indentation | MatchLevel::Unicode) {
        // Offset between the file's and the SEARCH text's indentation, from the first non-blank line.
        if let Some(k) = needle.iter().position(|l| !l.trim().is_empty()) {
            let file_ws = leading_ws(file[found.start_line + k]);
            let search_ws = leading_ws(needle[k]);
            if let Some(extra) = file_ws.strip_suffix(search_ws) {
                for l in new_lines.iter_mut().filter(|l| !l.trim().is_empty()) {
                    *l = format!("{extra}{l}");
                }
            } else if let Some(less) = search_ws.strip_suffix(file_ws) {
                for l in new_lines.iter_mut() {
                    if let Some(rest) = l.strip_prefix(less) {
                        *l = rest.to_string();
                    }
                }
            }
        }
    }

    let end = found.start_line + found.line_count;
    let mut out: Vec<String> = file[..found.start_line]
        .iter()
        .map(|s| s.to_string())
        .collect();
    out.extend(new_lines);
    out.extend(file[end..].iter().map(|s| s.to_string()));
    let mut text = out.join("\n");
    if !text.is_empty() && content.ends_with('\n') {
        text.push('\n');
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "fn main() {\n    let x = 1;\n    println!(\"{x}\");\n}\n";

    #[test]
    fn exact() {
        let got = locate(FILE, "    let x = 1;\n").ok();
        assert_eq!(
            got,
            Some(Located {
                start_line: 1,
                line_count: 1,
                level: MatchLevel::Exact
            })
        );
        assert_eq!(
            replace_unique(FILE, "    let x = 1;\n", "    let x = 2;\n")
                .ok()
                .as_deref(),
            Some("fn main() {\n    let x = 2;\n    println!(\"{x}\");\n}\n")
        );
    }

    #[test]
    fn trailing_whitespace() {
        let got = locate("a  \nb\t\nc\n", "a\nb\n").map(|l| l.level);
        assert_eq!(got, Ok(MatchLevel::TrailingWhitespace));
    }

    #[test]
    fn indentation_and_reindent() {
        let search = "let x = 1;\nprintln!(\"{x}\");\n";
        let replace = "let x = 2;\nif x > 1 {\n    println!(\"{x}\");\n}\n";
        assert_eq!(
            locate(FILE, search).map(|l| l.level),
            Ok(MatchLevel::Indentation)
        );
        assert_eq!(
            replace_unique(FILE, search, replace).ok().as_deref(),
            Some("fn main() {\n    let x = 2;\n    if x > 1 {\n        println!(\"{x}\");\n    }\n}\n")
        );
        // SEARCH more indented than the file: the replacement is dedented.
        let got = replace_unique(
            "if a:\n  b()\n",
            "        b()\n",
            "        c()\n        d()\n",
        );
        assert_eq!(got.ok().as_deref(), Some("if a:\n  c()\n  d()\n"));
    }

    #[test]
    fn unicode_punctuation() {
        let file = "say(\"hello\") - it's\u{a0}fine\n";
        let search = "say(\u{201C}hello\u{201D}) \u{2014} it\u{2019}s fine\n";
        assert_eq!(
            locate(file, search).map(|l| l.level),
            Ok(MatchLevel::Unicode)
        );
        assert_eq!(
            replace_unique(file, search, "bye()\n").ok().as_deref(),
            Some("bye()\n")
        );
    }

    #[test]
    fn ambiguous() {
        let err = locate("x\ny\nx\n", "x\n");
        assert_eq!(err, Err(LocateError::Ambiguous { lines: vec![1, 3] }));
        let msg = err.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            msg.contains("2 places") && msg.contains("lines 1, 3"),
            "{msg}"
        );
    }

    #[test]
    fn exact_match_wins_over_looser_ones() {
        assert_eq!(
            locate("  x\nx\n", "x\n").map(|l| (l.start_line, l.level)),
            Ok((1, MatchLevel::Exact))
        );
    }

    #[test]
    fn not_found_shows_nearest_lines() {
        let file = "alpha\nbeta\nfn compute(a: i32) -> i32 {\n    a + 1\n}\nomega\n";
        let err = locate(file, "fn compute(a: u32) -> u32 {\n    a + 2\n}\n");
        match &err {
            Err(LocateError::NotFound { nearest }) => {
                assert_eq!(nearest.first().map(|n| n.0), Some(3));
                assert_eq!(nearest.len(), 3);
            }
            other => panic!("unexpected {other:?}"),
        }
        let msg = err.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("did you mean"), "{msg}");
        assert!(msg.contains("    3 | fn compute(a: i32) -> i32 {"), "{msg}");
        assert_eq!(
            locate("", "x\n").err().map(|e| e.to_string()).as_deref(),
            Some("SEARCH text not found (the file is empty)")
        );
        assert_eq!(locate("x\n", "\n"), Err(LocateError::Empty));
    }

    #[test]
    fn missing_final_newline_kept() {
        assert_eq!(
            replace_unique("a\nb", "b\n", "c\n").ok().as_deref(),
            Some("a\nc")
        );
        assert_eq!(
            replace_unique("a\nb\n", "a\n", "").ok().as_deref(),
            Some("b\n")
        );
    }
}

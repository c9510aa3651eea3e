//! Parsing of file edits out of a model's markdown reply.
//!
//! Three formats are recognised, all inside closed ``` fences (an unclosed
//! fence at the end of a streaming reply produces nothing yet):
//! SEARCH/REPLACE blocks, unified diffs and whole files.

/// One edit to one file, as proposed by the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Edit {
    /// Replace the unique occurrence of `search` with `replace`; an empty `search` creates (or appends to) the file.
    SearchReplace {
        /// File path as written in the reply.
        path: String,
        /// Text to find (LF line endings, ends with a newline unless empty).
        search: String,
        /// Text to put in its place.
        replace: String,
    },
    /// A unified diff for one file.
    Diff {
        /// File path as written in the reply (the `+++` side).
        path: String,
        /// The hunks, in order.
        hunks: Vec<Hunk>,
    },
    /// The complete new content of a file.
    WholeFile {
        /// File path as written in the reply.
        path: String,
        /// The new content.
        content: String,
    },
    /// Delete a file (only from a diff to `/dev/null`; the caller must confirm it).
    Delete {
        /// File path as written in the reply.
        path: String,
    },
}

impl Edit {
    /// The path this edit targets, as written in the reply.
    pub fn path(&self) -> &str {
        match self {
            Edit::SearchReplace { path, .. }
            | Edit::Diff { path, .. }
            | Edit::WholeFile { path, .. }
            | Edit::Delete { path } => path,
        }
    }
}

/// One line of a diff hunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HunkLine {
    /// A line kept as is.
    Context(String),
    /// A line removed.
    Remove(String),
    /// A line added.
    Add(String),
}

/// One `@@` hunk of a unified diff.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Hunk {
    /// The old start line from the `@@` header, a hint only.
    pub old_start: Option<usize>,
    /// The hunk's lines, in order.
    pub lines: Vec<HunkLine>,
}

impl Hunk {
    /// The text this hunk expects to find (context and removed lines).
    pub fn old_text(&self) -> String {
        self.collect(|l| match l {
            HunkLine::Context(s) | HunkLine::Remove(s) => Some(s),
            HunkLine::Add(_) => None,
        })
    }

    /// The text this hunk leaves behind (context and added lines).
    pub fn new_text(&self) -> String {
        self.collect(|l| match l {
            HunkLine::Context(s) | HunkLine::Add(s) => Some(s),
            HunkLine::Remove(_) => None,
        })
    }

    fn collect<'a>(&'a self, pick: impl Fn(&'a HunkLine) -> Option<&'a String>) -> String {
        let mut out = String::new();
        for s in self.lines.iter().filter_map(pick) {
            out.push_str(s);
            out.push('\n');
        }
        out
    }
}

/// A closed fenced block of a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Fence<'a> {
    /// The path alone on the line before the fence, if there is one.
    pub(crate) path: Option<String>,
    /// The info string after the opening backticks.
    pub(crate) info: &'a str,
    /// The lines between the fences.
    pub(crate) body: Vec<&'a str>,
}

impl Fence<'_> {
    /// The fence's language: the first word of its info string.
    pub(crate) fn lang(&self) -> &str {
        self.info.split_whitespace().next().unwrap_or("")
    }

    /// Whether the block holds SEARCH/REPLACE markers or a unified diff.
    pub(crate) fn has_edit_markers(&self) -> bool {
        let body = &self.body;
        let looks_like_diff = body.iter().any(|l| l.starts_with("+++ "))
            && body.iter().any(|l| l.starts_with("@@"))
            && body.iter().any(|l| l.starts_with("--- "));
        body.iter().any(|l| is_search_marker(l))
            || matches!(self.lang(), "diff" | "patch")
            || looks_like_diff
    }
}

/// Every closed fenced block of `reply`, in order; an unclosed one ends the scan.
pub(crate) fn fences(reply: &str) -> Vec<Fence<'_>> {
    let lines: Vec<&str> = reply
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .collect();
    let mut fences = Vec::new();
    let mut i = 0;
    let mut last_text: Option<&str> = None;
    while i < lines.len() {
        let line = lines[i];
        let Some((ticks, info)) = fence_open(line) else {
            if !line.trim().is_empty() {
                last_text = Some(line);
            }
            i += 1;
            continue;
        };
        // Collect the body up to the closing fence; fences inside a
        // SEARCH/REPLACE block are content.
        let mut body = Vec::new();
        let mut in_block = false;
        let mut closed = false;
        let mut j = i + 1;
        while j < lines.len() {
            let l = lines[j];
            if is_search_marker(l) {
                in_block = true;
            } else if is_replace_marker(l) {
                in_block = false;
            } else if !in_block && fence_close(l, ticks) {
                closed = true;
                break;
            }
            body.push(l);
            j += 1;
        }
        if !closed {
            break;
        }
        fences.push(Fence {
            path: last_text.and_then(path_from_line),
            info,
            body,
        });
        last_text = None;
        i = j + 1;
    }
    fences
}

/// Parse every edit in `reply`, in order; unclosed fences are ignored.
pub fn parse_edits(reply: &str) -> Vec<Edit> {
    let mut edits = Vec::new();
    for fence in fences(reply) {
        parse_fence(&fence, &mut edits);
    }
    edits
}

fn parse_fence(fence: &Fence<'_>, edits: &mut Vec<Edit>) {
    let (path, body) = (fence.path.clone(), fence.body.as_slice());
    if body.iter().any(|l| is_search_marker(l)) {
        parse_search_replace(path, body, edits);
        return;
    }
    if fence.has_edit_markers() {
        parse_diff(path, body, edits);
        return;
    }
    if let Some(path) = path {
        let mut content = body.join("\n");
        if !body.is_empty() {
            content.push('\n');
        }
        edits.push(Edit::WholeFile { path, content });
    }
}

fn parse_search_replace(mut path: Option<String>, body: &[&str], edits: &mut Vec<Edit>) {
    enum State {
        Idle,
        Search,
        Replace,
    }
    let mut state = State::Idle;
    let mut search = String::new();
    let mut replace = String::new();
    for l in body {
        match state {
            State::Idle => {
                if is_search_marker(l) {
                    state = State::Search;
                    search.clear();
                    replace.clear();
                } else if let Some(p) = path_from_line(l) {
                    path = Some(p);
                }
            }
            State::Search => {
                if is_divider(l) {
                    state = State::Replace;
                } else {
                    search.push_str(l);
                    search.push('\n');
                }
            }
            State::Replace => {
                if is_replace_marker(l) {
                    state = State::Idle;
                    if let Some(p) = &path {
                        edits.push(Edit::SearchReplace {
                            path: p.clone(),
                            search: std::mem::take(&mut search),
                            replace: std::mem::take(&mut replace),
                        });
                    }
                } else {
                    replace.push_str(l);
                    replace.push('\n');
                }
            }
        }
    }
}

/// Parse a unified diff; hunks before any `---`/`+++` header go to `path` (the path line before the fence).
fn parse_diff(path: Option<String>, body: &[&str], edits: &mut Vec<Edit>) {
    let mut current: Option<(String, bool, Vec<Hunk>)> = path.map(|p| (p, false, Vec::new()));
    let flush = |cur: &mut Option<(String, bool, Vec<Hunk>)>, edits: &mut Vec<Edit>| {
        if let Some((path, delete, hunks)) = cur.take() {
            if delete {
                edits.push(Edit::Delete { path });
            } else if !hunks.is_empty() {
                edits.push(Edit::Diff { path, hunks });
            }
        }
    };
    let mut k = 0;
    while k < body.len() {
        let l = body[k];
        if let (Some(old), Some(new)) = (
            l.strip_prefix("--- "),
            body.get(k + 1).and_then(|n| n.strip_prefix("+++ ")),
        ) {
            flush(&mut current, edits);
            let old = diff_path(old);
            let new = diff_path(new);
            current = match (old, new) {
                (Some(old), None) => Some((old, true, Vec::new())),
                (_, Some(new)) => Some((new, false, Vec::new())),
                (None, None) => None,
            };
            k += 2;
            continue;
        }
        if let Some((_, _, hunks)) = current.as_mut() {
            if l.starts_with("@@") {
                hunks.push(Hunk {
                    old_start: hunk_old_start(l),
                    lines: Vec::new(),
                });
            } else if let Some(h) = hunks.last_mut() {
                if let Some(s) = l.strip_prefix('+') {
                    h.lines.push(HunkLine::Add(s.to_string()));
                } else if let Some(s) = l.strip_prefix('-') {
                    h.lines.push(HunkLine::Remove(s.to_string()));
                } else if let Some(s) = l.strip_prefix(' ') {
                    h.lines.push(HunkLine::Context(s.to_string()));
                } else if l.is_empty() {
                    h.lines.push(HunkLine::Context(String::new()));
                }
                // "\ No newline at end of file" and other noise is ignored.
            }
        }
        k += 1;
    }
    flush(&mut current, edits);
}

/// The path of a `---`/`+++` header, without `a/`/`b/` and timestamps; `None` for `/dev/null`.
fn diff_path(header: &str) -> Option<String> {
    let p = header.split('\t').next().unwrap_or("").trim();
    if p == "/dev/null" || p.is_empty() {
        return None;
    }
    let p = p
        .strip_prefix("a/")
        .or_else(|| p.strip_prefix("b/"))
        .unwrap_or(p);
    Some(p.to_string())
}

fn hunk_old_start(header: &str) -> Option<usize> {
    let rest = header.strip_prefix("@@")?.trim_start().strip_prefix('-')?;
    let num: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    num.parse().ok()
}

fn is_search_marker(l: &str) -> bool {
    let t = l.trim();
    t.starts_with("<<<<<<<") && t.trim_start_matches('<').trim() == "SEARCH"
}

fn is_divider(l: &str) -> bool {
    let t = l.trim();
    t.len() >= 7 && t.chars().all(|c| c == '=')
}

fn is_replace_marker(l: &str) -> bool {
    let t = l.trim();
    t.starts_with(">>>>>>>") && t.trim_start_matches('>').trim() == "REPLACE"
}

/// An opening fence: its backtick count and info string.
fn fence_open(line: &str) -> Option<(usize, &str)> {
    let t = line.trim_start();
    if line.len() - t.len() > 3 {
        return None;
    }
    let ticks = t.chars().take_while(|&c| c == '`').count();
    if ticks < 3 {
        return None;
    }
    let info = t[ticks..].trim();
    if info.contains('`') {
        return None;
    }
    Some((ticks, info))
}

fn fence_close(line: &str, ticks: usize) -> bool {
    let t = line.trim();
    t.len() >= ticks && t.chars().all(|c| c == '`')
}

/// The file path on `line`, if the line is nothing but a path.
pub fn path_from_line(line: &str) -> Option<String> {
    let mut t = line.trim();
    t = t.trim_start_matches('#').trim_start();
    t = t.strip_suffix(':').unwrap_or(t).trim();
    for wrap in ["**", "`", "*"] {
        if let Some(inner) = t.strip_prefix(wrap).and_then(|s| s.strip_suffix(wrap)) {
            t = inner.trim();
        }
    }
    t = t.strip_suffix(':').unwrap_or(t).trim();
    let quoted = ['"', '\'']
        .iter()
        .find_map(|&q| t.strip_prefix(q).and_then(|s| s.strip_suffix(q)));
    let p = match quoted {
        Some(inner) => inner,
        None => {
            if t.chars().any(char::is_whitespace) {
                return None;
            }
            t
        }
    };
    if p.is_empty()
        || p.contains("://")
        || p.chars()
            .any(|c| matches!(c, '<' | '>' | '|' | '*' | '`' | '"' | '?') || c.is_control())
    {
        return None;
    }
    let name = p.rsplit('/').next().unwrap_or("");
    let has_ext = name.rsplit_once('.').is_some_and(|(stem, ext)| {
        !ext.is_empty() && ext.len() <= 10 && ext.chars().all(|c| c.is_ascii_alphanumeric()) && {
            !stem.is_empty() || name.len() > 1
        }
    });
    let has_slash = p.contains('/') && !name.is_empty();
    if has_ext || has_slash {
        Some(p.to_string())
    } else {
        None
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A SEARCH/REPLACE edit, for tests.
    pub(crate) fn sr(path: &str, search: &str, replace: &str) -> Edit {
        Edit::SearchReplace {
            path: path.into(),
            search: search.into(),
            replace: replace.into(),
        }
    }

    #[test]
    fn search_replace_several_blocks_in_one_fence() {
        let reply = "Here is the fix.\n\nsrc/main.rs\n```rust\n<<<<<<< SEARCH\nfn a() {}\n=======\nfn a() { 1 }\n>>>>>>> REPLACE\n<<<<<<< SEARCH\nfn b() {}\n=======\n>>>>>>> REPLACE\n```\nDone.";
        assert_eq!(
            parse_edits(reply),
            vec![
                sr("src/main.rs", "fn a() {}\n", "fn a() { 1 }\n"),
                sr("src/main.rs", "fn b() {}\n", ""),
            ]
        );
    }

    #[test]
    fn search_replace_multiple_files_and_new_file() {
        let reply = "`a.py`\n```python\n<<<<<<< SEARCH\nx = 1\n=======\nx = 2\n>>>>>>> REPLACE\n```\n\n**lib/new.txt**\n```\n<<<<<<< SEARCH\n=======\nhello\n>>>>>>> REPLACE\n```\n";
        assert_eq!(
            parse_edits(reply),
            vec![
                sr("a.py", "x = 1\n", "x = 2\n"),
                sr("lib/new.txt", "", "hello\n"),
            ]
        );
    }

    #[test]
    fn fence_inside_search_block_is_content() {
        let reply = "README.md\n````\n<<<<<<< SEARCH\n```\nold\n```\n=======\n```\nnew\n```\n>>>>>>> REPLACE\n````\n";
        assert_eq!(
            parse_edits(reply),
            vec![sr("README.md", "```\nold\n```\n", "```\nnew\n```\n")]
        );
    }

    #[test]
    fn unified_diff_multiple_files() {
        let reply = "```diff\n--- a/src/x.rs\n+++ b/src/x.rs\n@@ -3,3 +3,3 @@ fn main\n keep\n-old\n+new\n\n@@ -10 +10 @@\n-z\n+y\n--- a/gone.txt\n+++ /dev/null\n@@ -1 +0,0 @@\n-bye\n--- /dev/null\n+++ b/fresh.txt\n@@ -0,0 +1 @@\n+hi\n\\ No newline at end of file\n```\n";
        let edits = parse_edits(reply);
        assert_eq!(edits.len(), 3);
        match &edits[0] {
            Edit::Diff { path, hunks } => {
                assert_eq!(path, "src/x.rs");
                assert_eq!(hunks.len(), 2);
                assert_eq!(hunks[0].old_start, Some(3));
                assert_eq!(hunks[0].old_text(), "keep\nold\n\n");
                assert_eq!(hunks[0].new_text(), "keep\nnew\n\n");
                assert_eq!(hunks[1].old_text(), "z\n");
                assert_eq!(hunks[1].new_text(), "y\n");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(
            edits[1],
            Edit::Delete {
                path: "gone.txt".into()
            }
        );
        match &edits[2] {
            Edit::Diff { path, hunks } => {
                assert_eq!(path, "fresh.txt");
                assert_eq!(hunks[0].old_text(), "");
                assert_eq!(hunks[0].new_text(), "hi\n");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn diff_without_headers_uses_path_line() {
        let reply = "src/a.rs\n```diff\n@@ -1,2 +1,2 @@\n x\n-y\n+z\n```\n";
        let edits = parse_edits(reply);
        assert_eq!(edits.len(), 1);
        assert_eq!(edits[0].path(), "src/a.rs");
        // A diff fence with nothing usable yields nothing.
        assert_eq!(parse_edits("```diff\nhello\n```\n"), vec![]);
    }

    #[test]
    fn whole_file() {
        let reply = "Create it:\n\nsrc/util/mod.rs\n```rust\npub fn f() {}\n```\n\nSome prose\n```\nnot a file\n```\n";
        assert_eq!(
            parse_edits(reply),
            vec![Edit::WholeFile {
                path: "src/util/mod.rs".into(),
                content: "pub fn f() {}\n".into()
            }]
        );
    }

    #[test]
    fn streaming_prefix_only_closed_fences() {
        let full = "a.rs\n```\n<<<<<<< SEARCH\nx\n=======\ny\n>>>>>>> REPLACE\n```\nb.rs\n```\n<<<<<<< SEARCH\np\n=======\nq\n>>>>>>> REPLACE\n```\n";
        let cut = full.rfind("q\n").unwrap_or(0);
        assert_eq!(parse_edits(&full[..cut]), vec![sr("a.rs", "x\n", "y\n")]);
        // Unclosed whole-file fence yields nothing.
        assert_eq!(parse_edits("c.rs\n```\nfn main() {}\n"), vec![]);
        assert_eq!(parse_edits(full).len(), 2);
    }

    #[test]
    fn path_lines() {
        assert_eq!(path_from_line("src/a.rs"), Some("src/a.rs".into()));
        assert_eq!(path_from_line("`Cargo.toml`"), Some("Cargo.toml".into()));
        assert_eq!(path_from_line("**src/x.rs**:"), Some("src/x.rs".into()));
        assert_eq!(
            path_from_line("### /abs/file.c"),
            Some("/abs/file.c".into())
        );
        assert_eq!(
            path_from_line("\"my dir/a b.txt\""),
            Some("my dir/a b.txt".into())
        );
        assert_eq!(path_from_line("Here is the change."), None);
        assert_eq!(path_from_line("Makefile"), None);
        assert_eq!(path_from_line("https://x.org/a.html"), None);
        assert_eq!(path_from_line("a file.rs"), None);
    }

    #[test]
    fn crlf_reply() {
        let reply =
            "a.rs\r\n```\r\n<<<<<<< SEARCH\r\nx\r\n=======\r\ny\r\n>>>>>>> REPLACE\r\n```\r\n";
        assert_eq!(parse_edits(reply), vec![sr("a.rs", "x\n", "y\n")]);
    }
}

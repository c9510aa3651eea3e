//! Inferring edits from code blocks that name no file and carry no edit markers, the way
//! small models answer: a changed function, or a whole file, in a plain fence.
//!
//! A block is matched against the files in the conversation's context. It replaces a whole
//! file when it is a complete version of exactly one of them; otherwise each of its top-level
//! definitions is anchored by its first meaningful line (a signature is matched by kind and
//! name) in exactly one place, and replaces the definition found there.

use super::parse::{fences, Edit, Fence};

/// File extensions whose blocks end by indentation rather than braces.
const INDENTED: &[&str] = &["py", "pyi", "pyw", "yaml", "yml", "nim", "coffee"];

/// Fence languages by the file extensions they stand for.
const LANGUAGES: &[(&[&str], &[&str])] = &[
    (&["python", "py", "python3", "py3"], &["py", "pyi", "pyw"]),
    (&["rust", "rs"], &["rs"]),
    (
        &["javascript", "js", "jsx", "node", "mjs", "cjs"],
        &["js", "jsx", "mjs", "cjs"],
    ),
    (&["typescript", "ts", "tsx"], &["ts", "tsx"]),
    (&["go", "golang"], &["go"]),
    (&["c"], &["c", "h"]),
    (
        &["cpp", "c++", "cxx", "cc"],
        &["cpp", "cc", "cxx", "hpp", "hh", "h"],
    ),
    (&["java"], &["java"]),
    (&["kotlin", "kt"], &["kt", "kts"]),
    (&["ruby", "rb"], &["rb"]),
    (&["shell", "bash", "sh", "zsh"], &["sh", "bash", "zsh"]),
    (&["yaml", "yml"], &["yaml", "yml"]),
];

/// Words that open a definition, after any modifiers.
const DEFINITION_KEYWORDS: &[&str] = &[
    "def",
    "class",
    "fn",
    "impl",
    "function",
    "struct",
    "enum",
    "trait",
    "interface",
    "type",
    "func",
    "mod",
    "module",
    "union",
];

/// Words that may come before a definition keyword.
const MODIFIERS: &[&str] = &[
    "pub",
    "pub(crate)",
    "pub(super)",
    "async",
    "export",
    "default",
    "static",
    "public",
    "private",
    "protected",
    "unsafe",
    "const",
    "extern",
    "abstract",
    "final",
    "override",
    "inline",
    "virtual",
];

/// An edit inferred from pathless code blocks, with where it was anchored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InferredEdit {
    /// The file's new content, as a whole-file edit.
    pub edit: Edit,
    /// Where each block was placed, e.g. ``hello.py:1 `def greet(name):` ``.
    pub anchors: Vec<String>,
}

/// What inference made of a reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inference {
    /// One edit per changed file.
    pub edits: Vec<InferredEdit>,
    /// Why a block (or a definition in it) gave no edit, one line each.
    pub skipped: Vec<String>,
}

/// Infers edits from the pathless, marker-free code blocks of `reply`, against the
/// `context` files given as (path, text).
pub fn infer_edits(reply: &str, context: &[(String, String)]) -> Inference {
    let mut files: Vec<ContextFile> = context
        .iter()
        .map(|(path, text)| ContextFile {
            path: path.clone(),
            lines: text
                .replace("\r\n", "\n")
                .lines()
                .map(str::to_string)
                .collect(),
            anchors: Vec::new(),
        })
        .collect();
    let originals: Vec<Vec<String>> = files.iter().map(|f| f.lines.clone()).collect();
    let mut inference = Inference::default();
    for fence in fences(reply) {
        if fence.path.is_some() || fence.has_edit_markers() || is_blank(&fence.body) {
            continue;
        }
        if let Some(i) = whole_file_target(&fence, &files) {
            let file = &mut files[i];
            file.lines = fence.body.iter().map(|l| l.to_string()).collect();
            file.anchors.push(format!("{} (whole file)", file.path));
            continue;
        }
        for unit in top_level_units(&fence.body, brace_language(&fence, &files)) {
            match place_unit(&unit, &mut files) {
                Ok(()) => {}
                Err(reason) => inference.skipped.push(reason),
            }
        }
    }
    for (file, original) in files.into_iter().zip(originals) {
        if file.anchors.is_empty() {
            continue;
        }
        if file.lines == original {
            inference.skipped.push(format!(
                "{}: the code block matches the file already",
                file.path
            ));
            continue;
        }
        let mut content = file.lines.join("\n");
        content.push('\n');
        inference.edits.push(InferredEdit {
            edit: Edit::WholeFile {
                path: file.path,
                content,
            },
            anchors: file.anchors,
        });
    }
    inference
}

struct ContextFile {
    path: String,
    lines: Vec<String>,
    anchors: Vec<String>,
}

fn is_blank(lines: &[&str]) -> bool {
    lines.iter().all(|l| l.trim().is_empty())
}

fn extension(path: &str) -> &str {
    std::path::Path::new(path)
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
}

/// Whether a fence in `lang` can hold the file at `path` (no language: any file).
fn language_fits(lang: &str, path: &str) -> bool {
    let lang = lang.to_ascii_lowercase();
    let ext = extension(path).to_ascii_lowercase();
    if lang.is_empty() {
        return true;
    }
    match LANGUAGES
        .iter()
        .find(|(names, _)| names.contains(&lang.as_str()))
    {
        Some((_, extensions)) => extensions.contains(&ext.as_str()),
        None => lang == ext,
    }
}

/// Whether the block's code ends definitions with braces (judged from its language).
fn brace_language(fence: &Fence<'_>, files: &[ContextFile]) -> bool {
    let lang = fence.lang();
    let indented = |ext: &str| INDENTED.contains(&ext);
    match files
        .iter()
        .find(|f| !lang.is_empty() && language_fits(lang, &f.path))
    {
        Some(file) => !indented(extension(&file.path)),
        None => !matches!(
            lang.to_ascii_lowercase().as_str(),
            "python" | "py" | "python3" | "py3" | "yaml" | "yml"
        ),
    }
}

fn indent_of(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// The kind and name of a definition line, e.g. `("fn", "new")`.
fn signature(line: &str) -> Option<(String, String)> {
    let mut words = line.split_whitespace().peekable();
    while words.peek().is_some_and(|w| MODIFIERS.contains(w)) {
        words.next();
    }
    let keyword = words.next()?;
    let keyword = keyword.trim_end_matches('*');
    if !DEFINITION_KEYWORDS.contains(&keyword) {
        return None;
    }
    let rest: String = words.collect::<Vec<_>>().join(" ");
    let name: String = if keyword == "impl" {
        // `impl<T> Trait for Type {`: everything up to the brace names it.
        rest.split('{').next().unwrap_or("").trim().to_string()
    } else {
        rest.trim_start_matches('*')
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == '$')
            .collect()
    };
    (!name.is_empty()).then(|| (keyword.to_string(), name))
}

/// The names of a file's (or block's) top-level definitions.
fn top_level_names<S: AsRef<str>>(lines: &[S]) -> Vec<(String, String)> {
    lines
        .iter()
        .map(AsRef::as_ref)
        .filter(|l| indent_of(l) == 0)
        .filter_map(signature)
        .collect()
}

/// A file's top-level lines that are neither definitions, comments nor closing lines.
fn top_level_statements<S: AsRef<str>>(lines: &[S]) -> Vec<&str> {
    lines
        .iter()
        .map(AsRef::as_ref)
        .filter(|l| indent_of(l) == 0 && !l.trim().is_empty())
        .filter(|l| signature(l).is_none() && !is_preamble(l.trim()) && !continues(l.trim()))
        .map(str::trim)
        .collect()
}

/// The one context file the block is a complete version of, if exactly one.
fn whole_file_target(fence: &Fence<'_>, files: &[ContextFile]) -> Option<usize> {
    let block_names = top_level_names(&fence.body);
    let block_statements = top_level_statements(&fence.body);
    let fits: Vec<usize> = files
        .iter()
        .enumerate()
        .filter(|(_, f)| language_fits(fence.lang(), &f.path))
        .filter(|(_, f)| {
            let names = top_level_names(&f.lines);
            let kept = names.iter().filter(|n| block_names.contains(n)).count();
            // Most of the file's definitions are kept, and so are most of its other top-level
            // lines (imports, constants): a block of functions alone is no whole file.
            let others = top_level_statements(&f.lines);
            let kept_others = others
                .iter()
                .filter(|l| block_statements.contains(l))
                .count();
            !names.is_empty() && kept * 2 > names.len() && kept_others * 2 >= others.len()
        })
        .map(|(i, _)| i)
        .collect();
    match fits.as_slice() {
        [one] => Some(*one),
        _ => None,
    }
}

/// Whether a line opens no unit of its own: it continues the one before.
fn continues(trimmed: &str) -> bool {
    ["}", ")", "]", "else", "elif", "except", "finally", "catch"]
        .iter()
        .any(|p| trimmed.starts_with(p))
}

/// Comment and decorator lines, which belong to the definition after them.
fn is_preamble(trimmed: &str) -> bool {
    ["#", "//", "/*", "*", "@", "///", "--"]
        .iter()
        .any(|p| trimmed.starts_with(p))
}

/// Splits a block into its top-level units (definitions or statements), each with the
/// comments and decorators before it.
fn top_level_units(body: &[&str], braces: bool) -> Vec<Vec<String>> {
    let base = body
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| indent_of(l))
        .min()
        .unwrap_or(0);
    let mut units: Vec<Vec<String>> = Vec::new();
    let mut current: Vec<String> = Vec::new();
    let mut preamble_only = true;
    let mut depth: i64 = 0;
    for line in body {
        let trimmed = line.trim();
        let starts_unit = !trimmed.is_empty()
            && indent_of(line) == base
            && (!braces || depth <= 0)
            && !continues(trimmed);
        if starts_unit && !preamble_only {
            units.push(std::mem::take(&mut current));
            preamble_only = true;
        }
        if !trimmed.is_empty() && !is_preamble(trimmed) {
            preamble_only = false;
        }
        if braces {
            depth += brace_delta(line);
        }
        current.push(line.to_string());
    }
    if !is_blank(&current.iter().map(String::as_str).collect::<Vec<_>>()) {
        units.push(current);
    }
    for unit in &mut units {
        while unit.last().is_some_and(|l| l.trim().is_empty()) {
            unit.pop();
        }
    }
    units
}

/// `{` minus `}` on a line, outside double-quoted strings and `//` comments.
fn brace_delta(line: &str) -> i64 {
    let mut delta = 0;
    let mut in_string = false;
    let mut escaped = false;
    let mut previous = ' ';
    for c in line.chars() {
        if in_string {
            match c {
                '\\' if !escaped => escaped = true,
                '"' if !escaped => in_string = false,
                _ => escaped = false,
            }
            continue;
        }
        match c {
            '"' => in_string = true,
            '/' if previous == '/' => break,
            '{' => delta += 1,
            '}' => delta -= 1,
            _ => {}
        }
        previous = c;
    }
    delta
}

/// The last line (index) of the definition that starts at `start`.
fn definition_end(lines: &[String], start: usize, braces: bool) -> usize {
    if braces {
        let mut depth = 0;
        let mut opened = false;
        for (i, line) in lines.iter().enumerate().skip(start) {
            let delta = brace_delta(line);
            opened |= line.contains('{');
            depth += delta;
            if opened && depth <= 0 {
                return i;
            }
            if !opened && (line.trim_end().ends_with(';') || i > start + 2) {
                // No body in braces: a declaration, or a language without braces here.
                break;
            }
        }
        if opened {
            return lines.len() - 1;
        }
    }
    let indent = indent_of(&lines[start]);
    let mut end = start;
    for (i, line) in lines.iter().enumerate().skip(start + 1) {
        if line.trim().is_empty() {
            continue;
        }
        if indent_of(line) <= indent && !continues(line.trim()) {
            break;
        }
        end = i;
    }
    end
}

/// Finds where `unit` belongs among `files` and replaces the definition there.
fn place_unit(unit: &[String], files: &mut [ContextFile]) -> Result<(), String> {
    let Some(anchor_at) = unit
        .iter()
        .position(|l| !l.trim().is_empty() && !is_preamble(l.trim()))
    else {
        return Err("a code block holds only comments: no edit".into());
    };
    let anchor = unit[anchor_at].trim();
    let wanted = signature(anchor);
    let mut candidates = Vec::new();
    for (f, file) in files.iter().enumerate() {
        for (i, line) in file.lines.iter().enumerate() {
            let hit = match &wanted {
                Some(sig) => signature(line.trim()).as_ref() == Some(sig),
                None => line.trim() == anchor,
            };
            if hit {
                candidates.push((f, i));
            }
        }
    }
    let (f, start) = match candidates.as_slice() {
        [one] => *one,
        [] => {
            return Err(format!(
                "no edit: `{anchor}` is in none of the context files"
            ))
        }
        many => {
            let places: Vec<String> = many
                .iter()
                .map(|(f, i)| format!("{}:{}", files[*f].path, i + 1))
                .collect();
            return Err(format!(
                "no edit: `{anchor}` occurs {} times ({})",
                many.len(),
                places.join(", ")
            ));
        }
    };
    let file = &mut files[f];
    let braces = !INDENTED.contains(&extension(&file.path));
    let end = definition_end(&file.lines, start, braces);
    // Comments and decorators the block repeats from above the anchor are replaced too.
    let mut first = start;
    for line in unit[..anchor_at].iter().rev() {
        match first.checked_sub(1) {
            Some(above) if file.lines[above].trim() == line.trim() => first = above,
            _ => break,
        }
    }
    let replacement = reindent(
        unit,
        indent_of(&file.lines[start]) as isize - indent_of(&unit[anchor_at]) as isize,
    );
    file.lines.splice(first..=end, replacement);
    file.anchors
        .push(format!("{}:{} `{anchor}`", file.path, start + 1));
    Ok(())
}

/// Shifts every non-blank line by `shift` columns (negative: left, never past column 0).
fn reindent(lines: &[String], shift: isize) -> Vec<String> {
    lines
        .iter()
        .map(|l| {
            if l.trim().is_empty() {
                return String::new();
            }
            let indent = indent_of(l) as isize;
            let new = (indent + shift).max(0) as usize;
            format!("{}{}", " ".repeat(new), l.trim_start())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(files: &[(&str, &str)]) -> Vec<(String, String)> {
        files
            .iter()
            .map(|(p, t)| (p.to_string(), t.to_string()))
            .collect()
    }

    fn content(edit: &Edit) -> &str {
        match edit {
            Edit::WholeFile { content, .. } => content,
            other => panic!("{other:?}"),
        }
    }

    const HELLO: &str = "import sys\n\ndef greet(name):\n    print(\"Hello\", name)\n\n\ndef main():\n    greet(sys.argv[1])\n";

    #[test]
    fn a_changed_python_function_replaces_its_definition() {
        let reply =
            "Here you go:\n\n```python\ndef greet(name):\n    print(f\"Hi, {name}!\")\n```\n";
        let inference = infer_edits(reply, &ctx(&[("hello.py", HELLO)]));
        assert_eq!(inference.skipped, Vec::<String>::new());
        let [edit] = inference.edits.as_slice() else {
            panic!("{inference:?}");
        };
        assert_eq!(
            content(&edit.edit),
            HELLO.replace("print(\"Hello\", name)", "print(f\"Hi, {name}!\")")
        );
        assert_eq!(edit.anchors, vec!["hello.py:3 `def greet(name):`"]);
    }

    #[test]
    fn a_rust_method_is_reindented_into_its_impl() {
        let file = "struct S;\n\nimpl S {\n    fn new() -> Self {\n        S\n    }\n\n    fn go(&self) {}\n}\n";
        let reply = "```rust\nfn new() -> Self {\n    let s = S;\n    s\n}\n```";
        let inference = infer_edits(reply, &ctx(&[("src/s.rs", file)]));
        assert_eq!(
            content(&inference.edits[0].edit),
            "struct S;\n\nimpl S {\n    fn new() -> Self {\n        let s = S;\n        s\n    }\n\n    fn go(&self) {}\n}\n"
        );
    }

    #[test]
    fn two_functions_in_one_block_anchor_one_by_one() {
        let reply =
            "```python\ndef greet(name):\n    print(name)\n\ndef main():\n    greet('x')\n```";
        let inference = infer_edits(reply, &ctx(&[("hello.py", HELLO)]));
        let text = content(&inference.edits[0].edit);
        assert!(text.starts_with("import sys\n"), "{text}");
        assert!(
            text.contains("    print(name)\n") && text.contains("greet('x')"),
            "{text}"
        );
        assert_eq!(inference.edits[0].anchors.len(), 2);
    }

    #[test]
    fn a_whole_file_replaces_the_file() {
        let reply = "```python\nimport sys\n\ndef greet(name):\n    print(name)\n\ndef main():\n    greet(sys.argv[1])\n```";
        let inference = infer_edits(
            reply,
            &ctx(&[("hello.py", HELLO), ("other.rs", "fn x() {}\n")]),
        );
        assert_eq!(inference.edits[0].anchors, vec!["hello.py (whole file)"]);
        assert!(content(&inference.edits[0].edit).starts_with("import sys\n\ndef greet"));
    }

    #[test]
    fn ambiguous_and_missing_anchors_give_no_edit_and_say_why() {
        let files = ctx(&[
            ("a.py", "def f():\n    pass\n"),
            ("b.py", "def f():\n    return 1\n"),
        ]);
        let inference = infer_edits("```python\ndef f():\n    return 2\n```", &files);
        assert!(inference.edits.is_empty());
        assert_eq!(
            inference.skipped,
            vec!["no edit: `def f():` occurs 2 times (a.py:1, b.py:1)"]
        );
        let inference = infer_edits("```python\ndef g():\n    return 2\n```", &files);
        assert!(inference.edits.is_empty());
        assert!(inference.skipped[0].contains("in none of the context files"));
    }

    #[test]
    fn blocks_with_paths_or_markers_are_left_to_the_parser() {
        let reply = "hello.py\n```python\ndef greet(name):\n    pass\n```\n";
        assert_eq!(
            infer_edits(reply, &ctx(&[("hello.py", HELLO)])),
            Inference::default()
        );
    }

    #[test]
    fn a_javascript_function_ends_at_its_closing_brace() {
        let file = "function a(x) {\n  if (x) {\n    return \"}\";\n  }\n  return 1;\n}\n\nfunction b() {\n  return 2;\n}\n";
        let reply = "```js\nfunction a(x) {\n  return x ? 0 : 1;\n}\n```";
        let inference = infer_edits(reply, &ctx(&[("app.js", file)]));
        assert_eq!(
            content(&inference.edits[0].edit),
            "function a(x) {\n  return x ? 0 : 1;\n}\n\nfunction b() {\n  return 2;\n}\n"
        );
    }
}

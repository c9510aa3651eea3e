//! Property tests: no reply, however malformed, makes parsing or applying panic,
//! and applying is all or nothing and undone exactly.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use proptest::prelude::*;

use super::{apply_edits, parse_edits, prepare, undo};

/// Pieces of the three edit formats and paths, good and bad.
const FRAGMENTS: &[&str] = &[
    "```",
    "```diff",
    "```patch",
    "```rust",
    "````",
    "<<<<<<< SEARCH",
    "=======",
    ">>>>>>> REPLACE",
    "--- a/a.txt",
    "+++ b/a.txt",
    "--- /dev/null",
    "+++ /dev/null",
    "+++ b/new/n.txt",
    "@@ -1,2 +1,2 @@",
    "@@ -0,0 +1 @@",
    "@@",
    "a.txt",
    "`src/b.rs`",
    "**bin.dat**",
    "dir",
    "dir/",
    "../up.txt",
    "/abs.txt",
    "link/x.txt",
    "one",
    " two",
    "-two",
    "+TWO",
    "\\ No newline at end of file",
    "",
    "   ",
];

/// A fragment, or some noise.
fn fragment() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => proptest::sample::select(FRAGMENTS).prop_map(str::to_string),
        1 => "[ -~]{0,12}",
        1 => any::<String>().prop_map(|s| s.chars().take(8).collect::<String>()),
    ]
}

/// Line ends, including none and a lone CR.
fn line_end() -> impl Strategy<Value = &'static str> {
    prop_oneof![8 => Just("\n"), 2 => Just("\r\n"), 1 => Just(""), 1 => Just("\r")]
}

fn fragment_soup() -> impl Strategy<Value = String> {
    proptest::collection::vec((fragment(), line_end()), 0..48)
        .prop_map(|parts| parts.into_iter().map(|(f, e)| f + e).collect())
}

/// Paths as a reply may name them, inside and outside the workspace.
const PATHS: &[&str] = &[
    "a.txt",
    "./a.txt",
    "src/b.rs",
    "bin.dat",
    "dir",
    "new/n.txt",
    "../up.txt",
    "/abs.txt",
    "link/x.txt",
    "/dev/null",
];

/// Lines of the workspace's files, and lines that are not there.
const CONTENT: &[&str] = &[
    "one",
    "two",
    "three",
    "  two",
    "fn b() {}",
    "TWO",
    "",
    "```",
];

fn content_lines() -> impl Strategy<Value = Vec<String>> {
    let line = prop_oneof![
        6 => proptest::sample::select(CONTENT).prop_map(str::to_string),
        1 => fragment(),
    ];
    proptest::collection::vec(line, 0..5)
}

fn path() -> impl Strategy<Value = String> {
    proptest::sample::select(PATHS).prop_map(str::to_string)
}

/// One edit in one of the three formats, well formed before mutation.
fn block() -> impl Strategy<Value = Vec<String>> {
    let search_replace = (path(), content_lines(), content_lines()).prop_map(|(p, s, r)| {
        let mut v = vec![p, "```".into(), "<<<<<<< SEARCH".into()];
        v.extend(s);
        v.push("=======".into());
        v.extend(r);
        v.extend([">>>>>>> REPLACE".into(), "```".into()]);
        v
    });
    let hunk_line = (
        proptest::sample::select(&[" ", "-", "+"][..]),
        proptest::sample::select(CONTENT),
    )
        .prop_map(|(mark, line)| format!("{mark}{line}"));
    let diff = (path(), path(), proptest::collection::vec(hunk_line, 0..6)).prop_map(
        |(old, new, lines)| {
            let mut v = vec![
                "```diff".to_string(),
                format!("--- a/{old}"),
                format!("+++ b/{new}"),
                "@@ -1,2 +1,2 @@".into(),
            ];
            v.extend(lines);
            v.push("```".into());
            v
        },
    );
    let whole_file = (path(), content_lines()).prop_map(|(p, lines)| {
        let mut v = vec![p, "```".to_string()];
        v.extend(lines);
        v.push("```".into());
        v
    });
    let noise = proptest::collection::vec(fragment(), 0..4);
    prop_oneof![3 => search_replace, 2 => diff, 2 => whole_file, 1 => noise]
}

/// Several edits, then lines dropped at random and line ends varied.
fn block_reply() -> impl Strategy<Value = String> {
    let blocks = proptest::collection::vec(block(), 0..5);
    let keep = proptest::bool::weighted(0.95);
    let mutations = proptest::collection::vec((keep, line_end()), 64);
    (blocks, mutations).prop_map(|(blocks, mutations)| {
        let mut out = String::new();
        for (k, line) in blocks.into_iter().flatten().enumerate() {
            let (keep, end) = mutations.get(k).copied().unwrap_or((true, "\n"));
            if keep {
                out.push_str(&line);
                out.push_str(end);
            }
        }
        out
    })
}

/// Files (bytes) and symlinks below `root`; directories only through their contents.
fn tree(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for path in entries.flatten().map(|e| e.path()) {
            match fs::symlink_metadata(&path) {
                Ok(m) if m.is_dir() => stack.push(path),
                Ok(m) if m.file_type().is_symlink() => {
                    let target = fs::read_link(&path).unwrap_or_default();
                    out.insert(path, target.into_os_string().into_encoded_bytes());
                }
                Ok(_) => {
                    out.insert(path.clone(), fs::read(&path).unwrap_or_default());
                }
                Err(_) => {}
            }
        }
    }
    out
}

/// Parses `reply`, then applies each edit alone and all of them together to a
/// small workspace: nothing may panic, a refusal writes nothing, undo restores
/// everything, and nothing outside the workspace is touched.
fn parse_and_apply(reply: &str) -> Result<(), TestCaseError> {
    let edits = parse_edits(reply);
    let ws = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
    let outside = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
    let root = ws.path();
    let setup = || -> std::io::Result<()> {
        fs::write(root.join("a.txt"), "one\ntwo\nthree\n")?;
        fs::create_dir_all(root.join("src"))?;
        fs::write(root.join("src/b.rs"), "fn b() {}\r\n")?;
        fs::create_dir_all(root.join("dir"))?;
        fs::write(root.join("bin.dat"), [0xff, 0xfe, b'\n'])?;
        fs::write(outside.path().join("x.txt"), "outside\n")?;
        std::os::unix::fs::symlink(outside.path(), root.join("link"))
    };
    setup().map_err(|e| TestCaseError::fail(e.to_string()))?;
    let outside_before = tree(outside.path());
    let none = HashMap::new();
    let singles = edits.iter().map(std::slice::from_ref);
    for set in singles.chain(std::iter::once(&edits[..])) {
        let before = tree(root);
        let checked = prepare(root, set, &none);
        prop_assert_eq!(&tree(root), &before, "check wrote something");
        match apply_edits(root, set, &none) {
            Ok(record) => {
                prop_assert!(checked.is_ok(), "check refused what apply accepted");
                if let Err(e) = undo(&record) {
                    return Err(TestCaseError::fail(format!("undo failed: {e}")));
                }
                prop_assert_eq!(&tree(root), &before, "undo did not restore");
            }
            Err(_) => prop_assert_eq!(&tree(root), &before, "a refusal wrote something"),
        }
        prop_assert_eq!(&tree(outside.path()), &outside_before, "wrote outside");
    }
    Ok(())
}

proptest! {
    // Bounded so that the whole file runs in seconds.
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn arbitrary_text_never_panics(reply in any::<String>()) {
        parse_and_apply(&reply)?;
    }

    #[test]
    fn edit_format_fragments_never_panic(reply in fragment_soup()) {
        parse_and_apply(&reply)?;
    }

    #[test]
    fn mutated_edits_never_panic(reply in block_reply()) {
        parse_and_apply(&reply)?;
    }
}

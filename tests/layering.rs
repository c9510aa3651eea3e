//! The one-way imports of `src/`: `tui` and `serve` -> `engine` -> `model`; `tui` ->
//! `patch`; `model` and `patch` know nothing of the others. Read from the `crate::` paths
//! of every source file, so a forbidden edge fails here, naming the file.
// Test helpers outside #[test] functions unwrap as the tests do.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// What each top-level module may reach besides itself.
fn allowed(module: &str) -> &'static [&'static str] {
    match module {
        "model" => &[],
        "patch" => &[],
        "engine" => &["model"],
        "serve" => &["engine"],
        "tui" => &["engine", "patch", "config"],
        "config" => &["engine", "model"],
        // lib.rs declares the modules.
        _ => &["config", "engine", "model", "patch", "serve", "tui"],
    }
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level modules a file's code names through `crate::`.
fn reached(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (i, _) in text.match_indices("crate::") {
        // `plait::crate::` does not occur; skip identifiers that merely end in "crate".
        let before = text[..i].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let name: String = text[i + "crate::".len()..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            found.insert(name);
        }
    }
    found
}

#[test]
fn imports_point_one_way() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut forbidden = Vec::new();
    let mut edges = BTreeSet::new();
    for file in &files {
        let relative = file.strip_prefix(&src).unwrap();
        let first = relative
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        // The binary (main.rs, cli.rs) reaches the library as `plait::`, not `crate::`.
        let module = first.trim_end_matches(".rs").to_owned();
        let text = std::fs::read_to_string(file).unwrap();
        for target in reached(&text) {
            if target == module {
                continue;
            }
            edges.insert(format!("{module} -> {target}"));
            if !allowed(&module).contains(&target.as_str()) {
                forbidden.push(format!(
                    "src/{}: {module} imports crate::{target}",
                    relative.display()
                ));
            }
        }
    }
    // The scan sees the edges the layering is made of.
    for edge in [
        "engine -> model",
        "serve -> engine",
        "tui -> engine",
        "tui -> patch",
    ] {
        assert!(
            edges.contains(edge),
            "no `{edge}` found: the scan read nothing? {edges:?}"
        );
    }
    assert!(
        forbidden.is_empty(),
        "imports against the layering:\n{}",
        forbidden.join("\n")
    );
}

#[test]
fn the_scan_finds_paths_in_use_lines_and_in_code() {
    let text = "use crate::model::{A, B};\nfn f() { crate::patch::x(); }\nlet my_crate::y = 1;";
    let found: Vec<String> = reached(text).into_iter().collect();
    assert_eq!(found, ["model", "patch"]);
}

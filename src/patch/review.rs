//! Reviewing prepared edits hunk by hunk: each file's change is split into hunks
//! that can be accepted or rejected one by one before anything is written.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use similar::{DiffOp, DiffTag, TextDiff};

use super::apply::{commit, plan, record, Planned};
use super::parse::Edit;
use super::{PatchError, UndoRecord};

/// Lines of unchanged context shown around each hunk.
const CONTEXT_LINES: usize = 3;

/// What a change does to its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// The file does not exist yet.
    Create,
    /// The file is removed.
    Delete,
    /// The file's content changes.
    Modify,
}

/// One line of a hunk, with its 1-based line numbers (old side, new side).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiffLine {
    /// Unchanged.
    Context {
        /// Line number before.
        old: usize,
        /// Line number after.
        new: usize,
        /// The text, without its line ending.
        text: String,
    },
    /// Removed.
    Removed {
        /// Line number before.
        old: usize,
        /// The text, without its line ending.
        text: String,
    },
    /// Added.
    Added {
        /// Line number after.
        new: usize,
        /// The text, without its line ending.
        text: String,
    },
}

/// A run of changed lines with context, accepted or rejected as one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReviewHunk {
    /// The lines, in order.
    pub lines: Vec<DiffLine>,
    /// The changed ranges (non-equal diff ops) this hunk covers.
    ops: Vec<DiffOp>,
}

impl ReviewHunk {
    /// Lines added and removed.
    pub fn counts(&self) -> (usize, usize) {
        self.lines.iter().fold((0, 0), |(a, r), l| match l {
            DiffLine::Added { .. } => (a + 1, r),
            DiffLine::Removed { .. } => (a, r + 1),
            DiffLine::Context { .. } => (a, r),
        })
    }
}

/// One file's checked change, split into hunks; nothing is written until it is applied.
#[derive(Debug, Clone, PartialEq)]
pub struct FileChange {
    /// The path as written in the reply.
    pub path: String,
    /// What happens to the file.
    pub kind: ChangeKind,
    /// The hunks, in file order.
    pub hunks: Vec<ReviewHunk>,
    planned: Planned,
}

impl FileChange {
    fn new(planned: Planned) -> Self {
        let before = text_of(planned.before.as_deref());
        let after = text_of(planned.after.as_deref());
        let kind = match (&planned.before, &planned.after) {
            (None, _) => ChangeKind::Create,
            (_, None) => ChangeKind::Delete,
            _ => ChangeKind::Modify,
        };
        let diff = TextDiff::from_lines(before.as_str(), after.as_str());
        let old: Vec<&str> = diff.old_slices().to_vec();
        let new: Vec<&str> = diff.new_slices().to_vec();
        let hunks = diff
            .grouped_ops(CONTEXT_LINES)
            .into_iter()
            .map(|group| hunk_of(&group, &old, &new))
            .collect();
        Self {
            path: planned.path.clone(),
            kind,
            hunks,
            planned,
        }
    }

    /// The file's bytes with only the hunks marked true in `accepted` applied (`None`: absent).
    pub fn content_with(&self, accepted: &[bool]) -> Option<Vec<u8>> {
        let all = self.hunks.len();
        let taken = accepted.iter().take(all).filter(|a| **a).count();
        if taken == all {
            return self.planned.after.clone();
        }
        if taken == 0 || self.kind != ChangeKind::Modify {
            // A created or deleted file is one hunk: all or nothing.
            return self.planned.before.clone();
        }
        let before = text_of(self.planned.before.as_deref());
        let after = text_of(self.planned.after.as_deref());
        let diff = TextDiff::from_lines(before.as_str(), after.as_str());
        let old = diff.old_slices();
        let new = diff.new_slices();
        let mut take_new: HashMap<(usize, usize), bool> = HashMap::new();
        for (hunk, &accept) in self.hunks.iter().zip(accepted) {
            for op in &hunk.ops {
                take_new.insert(op_key(op), accept);
            }
        }
        let mut out = String::with_capacity(before.len().max(after.len()));
        for op in diff.ops() {
            let new_side = op.tag() != DiffTag::Equal && take_new.get(&op_key(op)) == Some(&true);
            let lines = if new_side {
                &new[op.new_range()]
            } else {
                &old[op.old_range()]
            };
            lines.iter().for_each(|l| out.push_str(l));
        }
        Some(out.into_bytes())
    }
}

fn text_of(bytes: Option<&[u8]>) -> String {
    // plan() has already refused files that are not UTF-8.
    bytes
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .unwrap_or_default()
}

fn op_key(op: &DiffOp) -> (usize, usize) {
    (op.old_range().start, op.new_range().start)
}

fn strip_ending(line: &str) -> String {
    line.trim_end_matches(['\n', '\r']).to_string()
}

fn hunk_of(group: &[DiffOp], old: &[&str], new: &[&str]) -> ReviewHunk {
    let mut lines = Vec::new();
    let mut ops = Vec::new();
    for op in group {
        let (o, n) = (op.old_range(), op.new_range());
        if op.tag() == DiffTag::Equal {
            for (k, i) in o.clone().enumerate() {
                lines.push(DiffLine::Context {
                    old: i + 1,
                    new: n.start + k + 1,
                    text: strip_ending(old[i]),
                });
            }
            continue;
        }
        ops.push(*op);
        for i in o {
            lines.push(DiffLine::Removed {
                old: i + 1,
                text: strip_ending(old[i]),
            });
        }
        for i in n {
            lines.push(DiffLine::Added {
                new: i + 1,
                text: strip_ending(new[i]),
            });
        }
    }
    ReviewHunk { lines, ops }
}

/// Checks `edits` under `root` and splits each file's change into hunks; writes nothing.
pub fn prepare(
    root: &Path,
    edits: &[Edit],
    expected: &HashMap<String, u64>,
) -> Result<Vec<FileChange>, PatchError> {
    Ok(plan(root, edits, expected)?
        .into_iter()
        .map(FileChange::new)
        .collect())
}

/// Applies the accepted hunks of each change, all or nothing. Refused, with nothing
/// written, when a file changed on disk since it was prepared.
pub fn apply_reviewed(changes: &[(&FileChange, &[bool])]) -> Result<UndoRecord, PatchError> {
    let mut steps = Vec::new();
    for (change, accepted) in changes {
        let after = change.content_with(accepted);
        let p = &change.planned;
        if after == p.before {
            continue;
        }
        if current_bytes(&p.path, &p.target)? != p.before {
            return Err(PatchError::Changed {
                path: p.path.clone(),
            });
        }
        steps.push(Planned {
            path: p.path.clone(),
            target: p.target.clone(),
            before: p.before.clone(),
            after,
            perms: p.perms.clone(),
        });
    }
    let created_dirs = commit(&steps)?;
    Ok(record(steps, created_dirs))
}

fn current_bytes(path: &str, target: &PathBuf) -> Result<Option<Vec<u8>>, PatchError> {
    match fs::read(target) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(PatchError::Io {
            path: path.to_string(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::patch::parse::tests::sr;

    fn numbered(n: usize) -> String {
        (1..=n).map(|i| format!("line {i}\n")).collect()
    }

    #[test]
    fn far_apart_changes_become_separate_hunks_that_apply_one_by_one() {
        let dir = tempfile::tempdir().unwrap();
        let original = numbered(30).replace('\n', "\r\n");
        fs::write(dir.path().join("f.txt"), &original).unwrap();
        let edits = [
            sr("f.txt", "line 2\n", "line two\n"),
            sr("f.txt", "line 25\n", "line twenty-five\nextra\n"),
        ];
        let changes = prepare(dir.path(), &edits, &HashMap::new()).unwrap();
        assert_eq!(changes.len(), 1);
        let change = &changes[0];
        assert_eq!(change.kind, ChangeKind::Modify);
        assert_eq!(change.hunks.len(), 2);
        assert_eq!(change.hunks[1].counts(), (2, 1));
        assert!(change.hunks[0].lines.contains(&DiffLine::Removed {
            old: 2,
            text: "line 2".into()
        }));
        // Only the second hunk: CRLF kept, the first change left out.
        apply_reviewed(&[(change, &[false, true])]).unwrap();
        let written = fs::read_to_string(dir.path().join("f.txt")).unwrap();
        assert_eq!(
            written,
            original.replace("line 25\r\n", "line twenty-five\r\nextra\r\n")
        );
    }

    #[test]
    fn rejecting_everything_writes_nothing_and_a_changed_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("f.txt"), numbered(5)).unwrap();
        let changes = prepare(
            dir.path(),
            &[sr("f.txt", "line 3\n", "three\n")],
            &HashMap::new(),
        )
        .unwrap();
        let record = apply_reviewed(&[(&changes[0], &[false])]).unwrap();
        assert!(record.entries.is_empty());
        fs::write(dir.path().join("f.txt"), "edited meanwhile\n").unwrap();
        let err = apply_reviewed(&[(&changes[0], &[true])]).unwrap_err();
        assert!(matches!(err, PatchError::Changed { .. }), "{err}");
        assert_eq!(
            fs::read_to_string(dir.path().join("f.txt")).unwrap(),
            "edited meanwhile\n"
        );
    }

    #[test]
    fn created_files_are_one_hunk_and_undo_removes_them() {
        let dir = tempfile::tempdir().unwrap();
        let changes = prepare(
            dir.path(),
            &[sr("new.py", "", "print('hi')\n")],
            &HashMap::new(),
        )
        .unwrap();
        assert_eq!(changes[0].kind, ChangeKind::Create);
        assert_eq!(changes[0].hunks.len(), 1);
        let record = apply_reviewed(&[(&changes[0], &[true])]).unwrap();
        assert_eq!(
            fs::read_to_string(dir.path().join("new.py")).unwrap(),
            "print('hi')\n"
        );
        super::super::undo(&record).unwrap();
        assert!(!dir.path().join("new.py").exists());
    }
}

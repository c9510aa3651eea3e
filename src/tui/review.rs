//! The diff pane's state: the edits of a reply, file by file and hunk by hunk, each
//! accepted or rejected, and which hunk is selected.

use ratatui::text::Span;

use crate::patch::{ChangeKind, DiffLine, FileChange, ReviewHunk};

use super::markdown::{Highlighter, Theme};

/// One hunk's lines as highlighted spans.
pub type CodeLines = Vec<Vec<Span<'static>>>;

/// Edits under review.
#[derive(Debug, Clone)]
pub struct Review {
    /// The changed files, in reply order.
    pub changes: Vec<FileChange>,
    /// Per file, per hunk: whether the hunk is accepted.
    pub accepted: Vec<Vec<bool>>,
    /// The selected hunk, counted across all files.
    pub selected: usize,
    /// Where inferred edits were anchored; empty for edits written in an edit format.
    pub anchors: Vec<String>,
    /// Each hunk's highlighted code (flat hunk order), made once: syntect is too slow to
    /// run again on every redraw, and the hunks never change.
    pub highlighted: Vec<CodeLines>,
}

impl Review {
    /// A review of `changes`, their code highlighted for `theme` (plain without `color`);
    /// explicit edits start accepted, inferred ones (with their `anchors`) rejected, so
    /// nothing inferred is written unreviewed.
    pub fn new(changes: Vec<FileChange>, anchors: Vec<String>, theme: Theme, color: bool) -> Self {
        let accept = anchors.is_empty();
        let accepted = changes
            .iter()
            .map(|c| vec![accept; c.hunks.len()])
            .collect();
        let highlighter = Highlighter::shared(theme);
        let highlighted = changes
            .iter()
            .flat_map(|change| {
                change
                    .hunks
                    .iter()
                    .map(|hunk| highlight_hunk(hunk, &change.path, highlighter, color))
            })
            .collect();
        Self {
            changes,
            accepted,
            selected: 0,
            anchors,
            highlighted,
        }
    }

    /// Whether the edits were inferred rather than written in an edit format.
    pub fn inferred(&self) -> bool {
        !self.anchors.is_empty()
    }

    /// Keeps the choices and selection of `previous` for the hunks both share (while streaming).
    pub fn carry_choices_from(&mut self, previous: &Review) {
        for (i, change) in self.changes.iter().enumerate() {
            let Some(j) = previous.changes.iter().position(|p| p.path == change.path) else {
                continue;
            };
            if previous.changes[j].hunks == change.hunks {
                self.accepted[i] = previous.accepted[j].clone();
            }
        }
        self.selected = previous.selected.min(self.hunk_count().saturating_sub(1));
    }

    /// Hunks across all files.
    pub fn hunk_count(&self) -> usize {
        self.accepted.iter().map(Vec::len).sum()
    }

    /// Accepted hunks across all files.
    pub fn accepted_count(&self) -> usize {
        self.accepted.iter().flatten().filter(|a| **a).count()
    }

    /// (file, hunk) of the flat hunk index `flat`.
    pub fn locate(&self, flat: usize) -> Option<(usize, usize)> {
        let mut left = flat;
        for (f, hunks) in self.accepted.iter().enumerate() {
            if left < hunks.len() {
                return Some((f, left));
            }
            left -= hunks.len();
        }
        None
    }

    /// Moves the selection by `step` hunks, staying in range.
    pub fn select(&mut self, step: isize) {
        let last = self.hunk_count().saturating_sub(1);
        self.selected = self.selected.saturating_add_signed(step).min(last);
    }

    /// Flips the selected hunk between accepted and rejected.
    pub fn toggle_selected(&mut self) {
        if let Some((f, h)) = self.locate(self.selected) {
            self.accepted[f][h] = !self.accepted[f][h];
        }
    }

    /// Accepts (or rejects) every hunk.
    pub fn set_all(&mut self, accept: bool) {
        self.accepted
            .iter_mut()
            .for_each(|hunks| hunks.iter_mut().for_each(|a| *a = accept));
    }

    /// Files that the accepted hunks would delete.
    pub fn accepted_deletions(&self) -> Vec<String> {
        self.changes
            .iter()
            .zip(&self.accepted)
            .filter(|(c, a)| c.kind == ChangeKind::Delete && a.iter().any(|x| *x))
            .map(|(c, _)| c.path.clone())
            .collect()
    }

    /// Every change with its hunk choices, for applying.
    pub fn selection(&self) -> Vec<(FileChange, Vec<bool>)> {
        self.changes
            .iter()
            .cloned()
            .zip(self.accepted.iter().cloned())
            .collect()
    }
}

/// The hunk's lines highlighted as one run of code in the file's language.
fn highlight_hunk(
    hunk: &ReviewHunk,
    path: &str,
    highlighter: &Highlighter,
    color: bool,
) -> CodeLines {
    let mut code = String::new();
    for line in &hunk.lines {
        let (DiffLine::Context { text, .. }
        | DiffLine::Removed { text, .. }
        | DiffLine::Added { text, .. }) = line;
        code.push_str(text);
        code.push('\n');
    }
    highlighter.highlight_file(path, &code, color)
}

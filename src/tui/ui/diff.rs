//! The diff pane: its lines are files and hunks with line numbers, +/- gutters and syntax
//! highlighting, the selected hunk marked and rejected hunks dimmed.

use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::widgets::{Block, Paragraph};
use ratatui::Frame;

use super::super::markdown::{Theme, ThemeColors};
use super::super::review::Review;
use super::super::state::{App, Focus};
use super::style;
use crate::patch::{ChangeKind, DiffLine, ReviewHunk};

/// Backgrounds of added and removed lines (colour terminals only).
fn tints(theme: Theme) -> (Color, Color) {
    match theme {
        Theme::Dark => (Color::Rgb(0, 48, 0), Color::Rgb(64, 0, 0)),
        Theme::Light => (Color::Rgb(215, 245, 215), Color::Rgb(250, 215, 215)),
    }
}

/// The pane's lines and the index of the selected hunk's header among them.
pub fn diff_lines(review: &Review, theme: Theme, color: bool) -> (Vec<Line<'static>>, usize) {
    let code = &review.highlighted;
    let fg = |c: Color| {
        if color {
            Style::default().fg(theme.adapt(c))
        } else {
            Style::default()
        }
    };
    let mut lines = Vec::new();
    for anchor in &review.anchors {
        lines.push(Line::styled(
            format!("inferred from a code block at {anchor}"),
            fg(Color::Yellow).add_modifier(Modifier::ITALIC),
        ));
    }
    let mut selected_line = 0;
    let mut flat = 0;
    for (change, accepted) in review.changes.iter().zip(&review.accepted) {
        if !lines.is_empty() {
            lines.push(Line::default());
        }
        let (added, removed) = change.hunks.iter().fold((0, 0), |(a, r), h| {
            let (ha, hr) = h.counts();
            (a + ha, r + hr)
        });
        let kind = match change.kind {
            ChangeKind::Create => "new file",
            ChangeKind::Delete => "delete",
            ChangeKind::Modify => "modified",
        };
        let mut header = vec![
            Span::styled(
                change.path.clone(),
                Style::default().add_modifier(Modifier::BOLD),
            ),
            Span::raw(format!("  {kind} ")),
            Span::styled(format!("+{added}"), fg(Color::Green)),
            Span::raw(" "),
            Span::styled(format!("-{removed}"), fg(Color::Red)),
        ];
        if review.inferred() {
            header.push(Span::styled("  inferred", fg(Color::Yellow)));
        }
        lines.push(Line::from(header));
        for (hunk, &on) in change.hunks.iter().zip(accepted) {
            let selected = flat == review.selected;
            if selected {
                selected_line = lines.len();
            }
            lines.push(hunk_header(hunk, on, selected, color));
            let spans = code.get(flat).map(Vec::as_slice).unwrap_or_default();
            for (line, spans) in hunk.lines.iter().zip(spans.iter().cloned()) {
                lines.push(diff_line(line, spans, on, color.then(|| tints(theme))));
            }
            flat += 1;
        }
    }
    (lines, selected_line)
}

fn hunk_header(hunk: &ReviewHunk, accepted: bool, selected: bool, color: bool) -> Line<'static> {
    let (old_start, old_len, new_start, new_len) = ranges(hunk);
    let state = if accepted {
        "[x] accepted"
    } else {
        "[ ] rejected"
    };
    let mut style = Style::default();
    if color {
        style = style.fg(if accepted {
            Color::Green
        } else {
            Color::DarkGray
        });
    }
    if selected {
        style = style.add_modifier(Modifier::REVERSED);
    }
    Line::from(vec![
        Span::raw(if selected { "▶ " } else { "  " }),
        Span::styled(
            format!("{state}  @@ -{old_start},{old_len} +{new_start},{new_len} @@"),
            style,
        ),
    ])
}

/// The hunk's old and new ranges, as a unified diff header gives them.
fn ranges(hunk: &ReviewHunk) -> (usize, usize, usize, usize) {
    let (mut old_start, mut new_start) = (None, None);
    let (mut old_len, mut new_len) = (0, 0);
    for line in &hunk.lines {
        let (old, new) = match line {
            DiffLine::Context { old, new, .. } => (Some(*old), Some(*new)),
            DiffLine::Removed { old, .. } => (Some(*old), None),
            DiffLine::Added { new, .. } => (None, Some(*new)),
        };
        if let Some(o) = old {
            old_start.get_or_insert(o);
            old_len += 1;
        }
        if let Some(n) = new {
            new_start.get_or_insert(n);
            new_len += 1;
        }
    }
    (
        old_start.unwrap_or(0),
        old_len,
        new_start.unwrap_or(0),
        new_len,
    )
}

/// One diff line; `tints` (added, removed backgrounds) is `None` without colour.
fn diff_line(
    line: &DiffLine,
    code: Vec<Span<'static>>,
    accepted: bool,
    tints: Option<(Color, Color)>,
) -> Line<'static> {
    let color = tints.is_some();
    let (added_bg, removed_bg) = tints.unwrap_or((Color::Reset, Color::Reset));
    let number = |n: Option<usize>| n.map_or_else(|| "    ".to_string(), |n| format!("{n:>4}"));
    let (old, new, sign, tint, sign_color) = match line {
        DiffLine::Context { old, new, .. } => (Some(*old), Some(*new), ' ', None, Color::Reset),
        DiffLine::Removed { old, .. } => (Some(*old), None, '-', Some(removed_bg), Color::Red),
        DiffLine::Added { new, .. } => (None, Some(*new), '+', Some(added_bg), Color::Green),
    };
    let gutter = Style::default().fg(Color::DarkGray);
    let mut spans = vec![
        Span::styled(
            format!("{} {} ", number(old), number(new)),
            if color { gutter } else { Style::default() },
        ),
        Span::styled(
            format!("{sign} "),
            if color {
                Style::default().fg(sign_color)
            } else {
                Style::default()
            },
        ),
    ];
    spans.extend(code);
    let mut style = Style::default();
    if color && accepted {
        if let Some(bg) = tint {
            style = style.bg(bg);
        }
    }
    if !accepted {
        style = style.add_modifier(Modifier::DIM);
    }
    Line::from(spans).style(style)
}

/// Chat and diff side by side on wide screens, stacked otherwise; `large` favours the diff.
pub(super) fn split_for_diff(area: Rect, large: bool) -> (Rect, Rect) {
    let diff_share = if large { 70 } else { 50 };
    let constraints = [
        Constraint::Percentage(100 - diff_share),
        Constraint::Percentage(diff_share),
    ];
    let [chat, diff] = if area.width >= 120 {
        Layout::horizontal(constraints).areas(area)
    } else {
        Layout::vertical(constraints).areas(area)
    };
    (chat, diff)
}

/// Draws the review in `area`, the selected hunk in sight.
pub(super) fn draw_diff(frame: &mut Frame<'_>, app: &App, area: Rect) {
    let focused = app.focus == Focus::Diff;
    let border = if focused {
        style(app, Color::Cyan)
    } else {
        Style::default()
    };
    let Some(review) = &app.review else {
        return;
    };
    let title = format!(
        " edits: {}/{} hunks accepted{} ",
        review.accepted_count(),
        review.hunk_count(),
        if focused {
            " · Space toggle · a apply · A all · r none · f size"
        } else {
            " · Tab to review"
        }
    );
    let block = Block::bordered().title(title).border_style(border);
    let inner = block.inner(area);
    let (lines, selected) = diff_lines(review, app.theme, app.color);
    // Scroll only when the selected hunk's header would be out of sight; then keep it near
    // the top, with the file header above it when it fits.
    let height = inner.height as usize;
    let top = if selected + 4 < height {
        0
    } else {
        selected
            .saturating_sub(2)
            .min(lines.len().saturating_sub(height))
    };
    let visible: Vec<Line<'static>> = lines.into_iter().skip(top).take(height).collect();
    frame.render_widget(Paragraph::new(visible).block(block), area);
}

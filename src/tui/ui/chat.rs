//! The chat pane: the cells' lines, from the bottom up to what the scroll position shows.

use ratatui::layout::Rect;
use ratatui::style::Color;
use ratatui::text::Line;
use ratatui::widgets::{Block, Paragraph};
use ratatui::Frame;

use super::super::cells::Lines;
use super::super::state::App;
use super::style;

/// Lines of the whole chat at `width` (cells are separated by a blank line).
pub fn chat_lines_total(app: &App, width: u16) -> usize {
    let look = app.look(width);
    let cells: usize = app
        .cells
        .iter()
        .map(|c| c.history().desired_height(look))
        .sum();
    cells + app.cells.len().saturating_sub(1)
}

/// The `height` lines the chat shows `scroll_from_bottom` lines up from its end (the top
/// ones when it scrolls past the top). Only the cells in sight are drawn, from the last up,
/// so a frame's work does not grow with the transcript.
fn visible_lines(
    app: &App,
    width: u16,
    scroll_from_bottom: usize,
    height: usize,
) -> Vec<Line<'static>> {
    let look = app.look(width);
    let wanted = scroll_from_bottom.saturating_add(height);
    let mut shown: Vec<Lines> = Vec::new();
    let mut lines = 0;
    for cell in app.cells.iter().rev() {
        if lines >= wanted {
            break;
        }
        let cell_lines = cell.history().display_lines(look);
        lines += cell_lines.len() + usize::from(!shown.is_empty());
        shown.push(cell_lines);
    }
    let from_bottom = scroll_from_bottom.min(lines.saturating_sub(height));
    let top = lines - from_bottom - height.min(lines);
    let blank = Line::default();
    shown
        .iter()
        .rev()
        .enumerate()
        .flat_map(|(i, cell)| (i > 0).then_some(&blank).into_iter().chain(cell.iter()))
        .skip(top)
        .take(height)
        .cloned()
        .collect()
}

/// Draws the chat in `area` inside `block`, or a hint when it is empty.
pub(super) fn draw_chat(frame: &mut Frame<'_>, app: &App, block: Block<'static>, area: Rect) {
    let inner = block.inner(area);
    let height = inner.height as usize;
    let width = inner.width.saturating_sub(1).max(1);
    let visible = visible_lines(app, width, app.scroll_from_bottom, height);
    frame.render_widget(Paragraph::new(visible).block(block), area);
    if app.cells.is_empty() {
        let hint =
            Paragraph::new("Ask about your code. F1 or ? for help, /add PATH to share a file.")
                .style(style(app, Color::DarkGray));
        frame.render_widget(hint, Rect { height: 1, ..inner });
    }
}

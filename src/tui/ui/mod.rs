//! Drawing the state, a pure function of it: the chat pane, the diff pane, the message box
//! with its completion popup, the status line and the help overlay.

mod chat;
mod diff;
mod help;
mod status;
#[cfg(test)]
mod tests;

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Clear, Paragraph, Wrap};
use ratatui::Frame;

use super::state::{App, Focus};
pub use chat::chat_lines_total;
pub use diff::diff_lines;
pub use status::{sparkline, status_text};

/// Below this the screen shows a notice instead of the layout.
pub const MIN_WIDTH: u16 = 40;
/// Below this the screen shows a notice instead of the layout.
pub const MIN_HEIGHT: u16 = 10;

/// `color` as a foreground, readable on the app's theme; no style without colours.
fn style(app: &App, color: Color) -> Style {
    app.look(0).fg(color)
}

/// Where each part of the screen goes.
struct Areas {
    chat: Rect,
    diff: Option<Rect>,
    input: Rect,
    status: Rect,
}

/// The screen's parts in `area`; `None` when it is too small to lay out.
fn layout(app: &App, area: Rect) -> Option<Areas> {
    if area.width < MIN_WIDTH || area.height < MIN_HEIGHT {
        return None;
    }
    let input_lines = app.composer.text().split('\n').count().clamp(1, 6) as u16;
    let [chat, input, status] = Layout::vertical([
        Constraint::Min(3),
        Constraint::Length(input_lines + 2),
        Constraint::Length(1),
    ])
    .areas(area);
    let (chat, diff) = match app.review {
        Some(_) => {
            let (chat, diff) = diff::split_for_diff(chat, app.diff_large);
            (chat, Some(diff))
        }
        None => (chat, None),
    };
    Some(Areas {
        chat,
        diff,
        input,
        status,
    })
}

/// The chat pane's frame; its text goes inside.
fn chat_block(app: &App) -> Block<'static> {
    Block::default()
        .borders(Borders::TOP)
        .title(if app.focus == Focus::Chat {
            " chat (focused) "
        } else {
            " chat "
        })
}

/// The chat's text area on the app's screen: columns (one is kept free at the right) and rows.
pub fn chat_text_size(app: &App) -> (u16, usize) {
    let (width, height) = app.screen;
    let Some(areas) = layout(app, Rect::new(0, 0, width, height)) else {
        return (1, 1);
    };
    let inner = chat_block(app).inner(areas.chat);
    (inner.width.saturating_sub(1).max(1), inner.height as usize)
}

/// Draws the whole screen.
pub fn draw(frame: &mut Frame<'_>, app: &App) {
    let area = frame.area();
    let Some(areas) = layout(app, area) else {
        let notice = Paragraph::new(format!(
            "terminal too small ({}x{}): plait needs at least {MIN_WIDTH}x{MIN_HEIGHT}",
            area.width, area.height
        ))
        .wrap(Wrap { trim: true });
        frame.render_widget(notice, area);
        return;
    };
    chat::draw_chat(frame, app, chat_block(app), areas.chat);
    if let Some(diff) = areas.diff {
        diff::draw_diff(frame, app, diff);
    }
    draw_input(frame, app, areas.input);
    status::draw_status(frame, app, areas.status);
    draw_completions(frame, app, areas.input);
    if app.help {
        help::draw_help(frame, app, area);
    }
}

/// The commands that complete what is typed, in a popup above the message box.
fn draw_completions(frame: &mut Frame<'_>, app: &App, input: Rect) {
    let completions = app.composer.completions();
    if completions.is_empty() {
        return;
    }
    let height = completions.len() as u16 + 2;
    let popup = Rect {
        x: input.x + 1,
        y: input.y.saturating_sub(height),
        width: input.width.saturating_sub(2).min(50),
        height,
    };
    let lines: Vec<Line<'_>> = completions
        .iter()
        .map(|command| {
            Line::from(vec![
                Span::styled(
                    format!("{:<12}", command.usage()),
                    Style::default().add_modifier(Modifier::BOLD),
                ),
                Span::raw(command.help),
            ])
        })
        .collect();
    frame.render_widget(Clear, popup);
    frame.render_widget(
        Paragraph::new(lines).block(Block::bordered().title("commands")),
        popup,
    );
}

fn draw_input(frame: &mut Frame<'_>, app: &App, area: Rect) {
    let title = if app.busy() {
        " message (Esc cancels the answer) "
    } else {
        " message "
    };
    let block = Block::bordered()
        .title(title)
        .border_style(if app.focus == Focus::Input {
            style(app, Color::Cyan)
        } else {
            Style::default()
        });
    let inner = block.inner(area);
    // Keep the cursor's line in view when the message is taller than the box.
    let (line, before) = app.composer.cursor_line();
    let cursor_line = line as u16;
    let offset = cursor_line.saturating_sub(inner.height.saturating_sub(1));
    frame.render_widget(
        Paragraph::new(app.composer.text())
            .block(block)
            .scroll((offset, 0)),
        area,
    );
    if app.focus == Focus::Input && !app.help {
        let col = Span::raw(before).width() as u16;
        let x = (inner.x + col).min(inner.right().saturating_sub(1));
        frame.set_cursor_position((x, inner.y + cursor_line - offset));
    }
}

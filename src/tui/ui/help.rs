//! The help overlay: the keys and the slash commands, from their tables.

use ratatui::layout::Rect;
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Clear, Paragraph, Wrap};
use ratatui::Frame;

use super::super::commands::COMMANDS;
use super::super::state::App;
use super::super::update::KEYS;
use super::style;

/// Draws the help over `area`, centred.
pub(super) fn draw_help(frame: &mut Frame<'_>, app: &App, area: Rect) {
    let mut lines = vec![Line::styled(
        "Keys",
        Style::default().add_modifier(Modifier::BOLD),
    )];
    for (keys, what) in KEYS {
        lines.push(Line::from(vec![
            Span::styled(format!("  {keys:<20}"), style(app, Color::Cyan)),
            Span::raw(*what),
        ]));
    }
    lines.push(Line::default());
    lines.push(Line::styled(
        "Commands",
        Style::default().add_modifier(Modifier::BOLD),
    ));
    let full = lines.len() + COMMANDS.len() + 4 <= area.height as usize;
    if full {
        for command in COMMANDS {
            lines.push(Line::from(vec![
                Span::styled(
                    format!("  {:<20}", command.usage()),
                    style(app, Color::Cyan),
                ),
                Span::raw(command.help),
            ]));
        }
    } else {
        // A short screen lists the names only; typing `/` shows what each does.
        for row in COMMANDS.chunks(5) {
            let names: String = row
                .iter()
                .map(|command| format!("  {:<12}", command.usage()))
                .collect();
            lines.push(Line::styled(names, style(app, Color::Cyan)));
        }
    }
    lines.push(Line::default());
    lines.push(Line::raw(
        "  @path in a message attaches that file to it. Esc closes this help.",
    ));
    let width = area.width.saturating_sub(4).min(78);
    let height = (lines.len() as u16 + 2).min(area.height.saturating_sub(2));
    let popup = Rect {
        x: area.x + (area.width - width) / 2,
        y: area.y + (area.height - height) / 2,
        width,
        height,
    };
    frame.render_widget(Clear, popup);
    frame.render_widget(
        Paragraph::new(lines)
            .block(Block::bordered().title(" help "))
            .wrap(Wrap { trim: false }),
        popup,
    );
}

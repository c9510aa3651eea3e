//! Drawing the state: chat pane, input box, status line, help overlay.

use super::markdown::ThemeColors;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Clear, Paragraph, Wrap};
use ratatui::Frame;

use std::cell::RefCell;
use std::rc::Rc;

use super::app::{App, Cell, CellStatus, EngineState, Focus, Role, COMMANDS, KEYS};
use super::diff::diff_lines;
use super::markdown::{render_markdown, top_level_blocks, Highlighter};

/// Below this the screen shows a notice instead of the layout.
pub const MIN_WIDTH: u16 = 40;
/// Below this the screen shows a notice instead of the layout.
pub const MIN_HEIGHT: u16 = 10;

/// Sparkline glyphs, lowest to highest.
const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

fn style(app: &App, color: Color) -> Style {
    if app.color {
        Style::default().fg(app.theme.adapt(color))
    } else {
        Style::default()
    }
}

/// Draws the whole screen; records the chat pane's height in `app` for paging.
pub fn draw(frame: &mut Frame<'_>, app: &mut App, highlighter: &Highlighter, view: &ChatView) {
    let area = frame.area();
    if area.width < MIN_WIDTH || area.height < MIN_HEIGHT {
        let notice = Paragraph::new(format!(
            "terminal too small ({}x{}): plait needs at least {MIN_WIDTH}x{MIN_HEIGHT}",
            area.width, area.height
        ))
        .wrap(Wrap { trim: true });
        frame.render_widget(notice, area);
        return;
    }
    let input_lines = app.input.split('\n').count().clamp(1, 6) as u16;
    let [chat, input, status] = Layout::vertical([
        Constraint::Min(3),
        Constraint::Length(input_lines + 2),
        Constraint::Length(1),
    ])
    .areas(area);
    if app.review.is_some() {
        let (chat, diff) = split_for_diff(chat, app.diff_large);
        draw_chat(frame, app, highlighter, view, chat);
        draw_diff(frame, app, highlighter, diff);
    } else {
        draw_chat(frame, app, highlighter, view, chat);
    }
    draw_input(frame, app, input);
    draw_status(frame, app, status);
    let completions = app.completions();
    if !completions.is_empty() {
        let height = completions.len() as u16 + 2;
        let popup = Rect {
            x: input.x + 1,
            y: input.y.saturating_sub(height),
            width: input.width.saturating_sub(2).min(50),
            height,
        };
        let lines: Vec<Line<'_>> = completions
            .iter()
            .map(|(name, help)| {
                Line::from(vec![
                    Span::styled(
                        format!("{name:<12}"),
                        Style::default().add_modifier(Modifier::BOLD),
                    ),
                    Span::raw(*help),
                ])
            })
            .collect();
        frame.render_widget(Clear, popup);
        frame.render_widget(
            Paragraph::new(lines).block(Block::bordered().title("commands")),
            popup,
        );
    }
    if app.help {
        draw_help(frame, app, area);
    }
}

/// One cell's lines at `width`.
fn cell_lines(app: &App, cell: &Cell, highlighter: &Highlighter, width: u16) -> Vec<Line<'static>> {
    cell_lines_with(app, cell, &mut |text| {
        render_markdown(text, width, highlighter, app.color)
    })
}

/// One cell's lines, its markdown rendered by `markdown`.
fn cell_lines_with(
    app: &App,
    cell: &Cell,
    markdown: &mut dyn FnMut(&str) -> Vec<Line<'static>>,
) -> Vec<Line<'static>> {
    let mut lines = Vec::new();
    match cell.role {
        Role::User => {
            lines.push(Line::styled(
                "you",
                style(app, Color::Cyan).add_modifier(Modifier::BOLD),
            ));
            lines.extend(markdown(&cell.text));
        }
        Role::Assistant => {
            let mut header = vec![Span::styled(
                "plait",
                style(app, Color::Green).add_modifier(Modifier::BOLD),
            )];
            match cell.status {
                CellStatus::Cancelled => {
                    header.push(Span::styled(" (cancelled)", style(app, Color::Yellow)))
                }
                CellStatus::Failed => {
                    header.push(Span::styled(" (failed)", style(app, Color::Red)))
                }
                CellStatus::Streaming if cell.text.is_empty() => header.push(Span::raw(" …")),
                _ => {}
            }
            lines.push(Line::from(header));
            lines.extend(markdown(&cell.text));
        }
        Role::Notice => {
            for line in cell.text.lines() {
                lines.push(Line::styled(
                    format!("· {line}"),
                    style(app, Color::DarkGray).add_modifier(Modifier::ITALIC),
                ));
            }
        }
    }
    lines
}

/// What a cached cell's lines were rendered from.
#[derive(Clone, Copy, PartialEq, Eq)]
struct CellKey {
    width: u16,
    color: bool,
    status: CellStatus,
    text_hash: u64,
}

impl CellKey {
    fn of(app: &App, cell: &Cell, width: u16) -> Self {
        Self {
            width,
            color: app.color,
            status: cell.status,
            text_hash: hash_of((cell.role, &cell.text)),
        }
    }
}

fn hash_of(value: impl std::hash::Hash) -> u64 {
    use std::hash::Hasher;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

/// What a streaming answer's completed block was rendered from: width, colour, its hash.
type BlockKey = (u16, bool, u64);

/// Rendered lines, shared between the cache and a frame.
type Lines = Rc<Vec<Line<'static>>>;

/// The chat pane's rendered cells, kept per width: a finished cell's markdown and
/// highlighting are rendered once, and only a streaming cell again on each redraw.
#[derive(Default)]
pub struct ChatView {
    cells: RefCell<Vec<Option<(CellKey, Lines)>>>,
    /// The streaming cell's completed blocks, in order: (width, color, the block's hash) and
    /// its lines.
    streaming: RefCell<Vec<(BlockKey, Lines)>>,
}

impl ChatView {
    /// The lines of cell `index`, from the cache when it is still what was rendered.
    fn lines(
        &self,
        app: &App,
        index: usize,
        highlighter: &Highlighter,
        width: u16,
    ) -> Rc<Vec<Line<'static>>> {
        let cell = &app.cells[index];
        if cell.status == CellStatus::Streaming {
            return Rc::new(self.streaming_lines(app, cell, highlighter, width));
        }
        let key = CellKey::of(app, cell, width);
        let mut cells = self.cells.borrow_mut();
        if cells.len() < app.cells.len() {
            cells.resize(app.cells.len(), None);
        }
        cells.truncate(app.cells.len());
        if let Some((cached, lines)) = &cells[index] {
            if *cached == key {
                return Rc::clone(lines);
            }
        }
        let lines = Rc::new(cell_lines(app, cell, highlighter, width));
        cells[index] = Some((key, Rc::clone(&lines)));
        lines
    }

    /// A streaming cell's lines: its completed blocks from the cache, its last block rendered.
    fn streaming_lines(
        &self,
        app: &App,
        cell: &Cell,
        highlighter: &Highlighter,
        width: u16,
    ) -> Vec<Line<'static>> {
        cell_lines_with(app, cell, &mut |text| {
            let starts = top_level_blocks(text);
            let Some((&growing, completed)) = starts.split_last() else {
                return render_markdown(text, width, highlighter, app.color);
            };
            let mut kept = self.streaming.borrow_mut();
            let mut lines: Vec<Line<'static>> = Vec::new();
            let join = |lines: &mut Vec<Line<'static>>, more: &[Line<'static>]| {
                if !lines.is_empty() && !more.is_empty() {
                    lines.push(Line::default());
                }
                lines.extend_from_slice(more);
            };
            for (i, window) in starts.windows(2).enumerate().take(completed.len()) {
                let block = &text[window[0]..window[1]];
                let key = (width, app.color, hash_of(block));
                if kept.get(i).is_none_or(|(k, _)| *k != key) {
                    let rendered = Rc::new(render_markdown(block, width, highlighter, app.color));
                    kept.truncate(i);
                    kept.push((key, rendered));
                }
                join(&mut lines, &kept[i].1);
            }
            join(
                &mut lines,
                &render_markdown(&text[growing..], width, highlighter, app.color),
            );
            lines
        })
    }

    /// The chat's lines at `width` from line `top` on, at most `height` of them, and the
    /// number of lines in all (cells are separated by a blank line).
    fn window(
        &self,
        app: &App,
        highlighter: &Highlighter,
        width: u16,
        scroll_from_bottom: usize,
        height: usize,
    ) -> (Vec<Line<'static>>, usize) {
        let rendered: Vec<Rc<Vec<Line<'static>>>> = (0..app.cells.len())
            .map(|i| self.lines(app, i, highlighter, width))
            .collect();
        let total =
            rendered.iter().map(|l| l.len()).sum::<usize>() + rendered.len().saturating_sub(1);
        let max_scroll = total.saturating_sub(height);
        let top = max_scroll - scroll_from_bottom.min(max_scroll);
        let blank = Line::default();
        let visible = rendered
            .iter()
            .enumerate()
            .flat_map(|(i, lines)| (i > 0).then_some(&blank).into_iter().chain(lines.iter()))
            .skip(top)
            .take(height)
            .cloned()
            .collect();
        (visible, total)
    }
}

fn draw_chat(
    frame: &mut Frame<'_>,
    app: &mut App,
    highlighter: &Highlighter,
    view: &ChatView,
    area: Rect,
) {
    let focused = app.focus == Focus::Chat;
    let block = Block::default().borders(Borders::TOP).title(if focused {
        " chat (focused) "
    } else {
        " chat "
    });
    let inner = block.inner(area);
    let height = inner.height as usize;
    let width = inner.width.saturating_sub(1).max(1);
    let (visible, total) = view.window(app, highlighter, width, app.scroll_from_bottom, height);
    app.chat_height = height;
    app.scroll_from_bottom = app.scroll_from_bottom.min(total.saturating_sub(height));
    frame.render_widget(Paragraph::new(visible).block(block), area);
    if app.cells.is_empty() {
        let hint =
            Paragraph::new("Ask about your code. F1 or ? for help, /add PATH to share a file.")
                .style(style(app, Color::DarkGray));
        frame.render_widget(hint, Rect { height: 1, ..inner });
    }
}

/// Chat and diff side by side on wide screens, stacked otherwise; `large` favours the diff.
fn split_for_diff(area: Rect, large: bool) -> (Rect, Rect) {
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

fn draw_diff(frame: &mut Frame<'_>, app: &mut App, highlighter: &Highlighter, area: Rect) {
    let color = app.color;
    let focused = app.focus == Focus::Diff;
    let border = if focused {
        style(app, Color::Cyan)
    } else {
        Style::default()
    };
    let Some(review) = app.review.as_mut() else {
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
    let (lines, selected) = diff_lines(review, highlighter, color);
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
    let cursor_line = app.input[..app.cursor].matches('\n').count() as u16;
    let offset = cursor_line.saturating_sub(inner.height.saturating_sub(1));
    frame.render_widget(
        Paragraph::new(app.input.as_str())
            .block(block)
            .scroll((offset, 0)),
        area,
    );
    if app.focus == Focus::Input && !app.help {
        let col = app.input[..app.cursor]
            .rsplit('\n')
            .next()
            .map_or(0, |l| Span::raw(l).width()) as u16;
        let x = (inner.x + col).min(inner.right().saturating_sub(1));
        frame.set_cursor_position((x, inner.y + cursor_line - offset));
    }
}

/// The sparkline of recent token latencies.
pub fn sparkline(app: &App) -> String {
    let max = app
        .readout
        .latencies
        .iter()
        .max()
        .copied()
        .unwrap_or_default();
    if max.is_zero() {
        return String::new();
    }
    app.readout
        .latencies
        .iter()
        .map(|l| {
            let level =
                (l.as_secs_f64() / max.as_secs_f64() * (BARS.len() - 1) as f64).round() as usize;
            BARS[level.min(BARS.len() - 1)]
        })
        .collect()
}

/// The status line's parts for a line `width` columns wide; the sparkline takes what is left.
pub fn status_text(app: &App, width: u16) -> Vec<Span<'static>> {
    let r = &app.readout;
    let sep = || Span::styled(" │ ", style(app, Color::DarkGray));
    let loops_text = format!("loops {}/{}", r.loops, r.trained_loops);
    let loops = if r.loops == r.trained_loops {
        Span::raw(loops_text)
    } else {
        // A count the checkpoint was not trained with is allowed, and shown as such.
        Span::styled(
            format!("{loops_text}*"),
            style(app, Color::Yellow).add_modifier(Modifier::BOLD),
        )
    };
    let state = match &r.state {
        EngineState::Loading(p) => format!("loading {:.0}%", p * 100.0),
        EngineState::Failed => "load failed".into(),
        EngineState::Idle => "idle".into(),
        EngineState::Prefill(p) => format!("prefill {:.0}%", p * 100.0),
        EngineState::Generating => "generating".into(),
    };
    let mut parts = vec![loops, Span::raw(state)];
    if let Some(ttft) = r.ttft {
        parts.push(Span::raw(format!(
            "TTFT {:.0} ms",
            ttft.as_secs_f64() * 1e3
        )));
    }
    if let Some(tok_s) = r.tok_s {
        parts.push(Span::raw(format!("{tok_s:.1} tok/s")));
    }
    if r.context_size > 0 {
        parts.push(Span::raw(format!(
            "ctx {}/{}",
            r.context_used, r.context_size
        )));
    }
    parts.push(Span::raw(format!("cached {}", r.cached_tokens)));
    let fixed: usize = parts.iter().map(|p| p.width() + 3).sum();
    // The model name gives way first on a narrow screen.
    let name_room = (width as usize).saturating_sub(fixed).max(8);
    let name: String = r.model.chars().take(name_room).collect();
    let mut spans = vec![Span::styled(
        name,
        Style::default().add_modifier(Modifier::BOLD),
    )];
    for part in parts {
        spans.push(sep());
        spans.push(part);
    }
    let used: usize = spans.iter().map(Span::width).sum();
    let room = (width as usize).saturating_sub(used + 3);
    let spark = sparkline(app);
    let skip = spark.chars().count().saturating_sub(room);
    let spark: String = spark.chars().skip(skip).collect();
    if !spark.is_empty() {
        spans.extend([sep(), Span::styled(spark, style(app, Color::Green))]);
    }
    spans
}

fn draw_status(frame: &mut Frame<'_>, app: &App, area: Rect) {
    let line = Line::from(status_text(app, area.width));
    let base = if app.color {
        Style::default().bg(Color::Black)
    } else {
        Style::default().add_modifier(Modifier::REVERSED)
    };
    frame.render_widget(Paragraph::new(line).style(base), area);
}

fn draw_help(frame: &mut Frame<'_>, app: &App, area: Rect) {
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
        for (name, what) in COMMANDS {
            lines.push(Line::from(vec![
                Span::styled(format!("  {name:<20}"), style(app, Color::Cyan)),
                Span::raw(*what),
            ]));
        }
    } else {
        // A short screen lists the names only; typing `/` shows what each does.
        for row in COMMANDS.chunks(5) {
            let names: String = row
                .iter()
                .map(|(name, _)| format!("  {name:<12}"))
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ratatui::backend::TestBackend;
    use ratatui::Terminal;

    use super::*;
    use crate::engine::{Event as EngineEvent, StopReason, TurnStats};
    use crate::tui::app::tests::{hello_workspace, loaded_app, run_edit_effects, EDIT_ANSWER};
    use crate::tui::app::{update, AppEvent};
    use crossterm::event::{KeyCode, KeyEvent};

    fn ask(app: &mut App, question: &str, answer: &[&str]) {
        for c in question.chars() {
            update(
                app,
                AppEvent::Key(crossterm::event::KeyEvent::from(
                    crossterm::event::KeyCode::Char(c),
                )),
            );
        }
        update(
            app,
            AppEvent::Key(crossterm::event::KeyEvent::from(
                crossterm::event::KeyCode::Enter,
            )),
        );
        for (i, text) in answer.iter().enumerate() {
            update(
                app,
                AppEvent::Engine(EngineEvent::Token {
                    id: 1,
                    text: text.to_string(),
                    latency: Duration::from_millis(20 + (i as u64 * 7) % 30),
                }),
            );
        }
    }

    fn render(app: &mut App, width: u16, height: u16) -> Terminal<TestBackend> {
        let highlighter = Highlighter::new();
        let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
        terminal
            .draw(|frame| draw(frame, app, &highlighter, &ChatView::default()))
            .unwrap();
        terminal
    }

    fn render_with(app: &mut App, view: &ChatView, width: u16, height: u16) -> String {
        let highlighter = Highlighter::new();
        let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
        terminal
            .draw(|frame| draw(frame, app, &highlighter, view))
            .unwrap();
        format!("{:?}", terminal.backend().buffer())
    }

    #[test]
    fn cached_cells_draw_as_fresh_ones_after_a_resize_an_edit_or_a_status_change() {
        let mut app = loaded_app();
        ask(&mut app, "hi", CODE_ANSWER);
        update(
            &mut app,
            AppEvent::Engine(EngineEvent::Done {
                id: 1,
                stats: finished_stats(),
            }),
        );
        let view = ChatView::default();
        for (width, height) in [(80, 24), (60, 30), (80, 24)] {
            assert_eq!(
                render_with(&mut app, &view, width, height),
                render_with(&mut app, &ChatView::default(), width, height)
            );
        }
        app.cells[1].text.push_str(" More.");
        app.cells[1].status = CellStatus::Cancelled;
        let drawn = render_with(&mut app, &view, 80, 24);
        assert_eq!(drawn, render_with(&mut app, &ChatView::default(), 80, 24));
        assert!(drawn.contains("(cancelled)"));
    }

    #[test]
    fn a_streaming_answer_draws_as_a_fresh_render_at_every_token() {
        let answers = [
            CODE_ANSWER.concat(),
            "# Plan\n\n1. read\n2. write\n\n- a\n\n- b\n\n> quoted\n> more\n\n| a | b |\n| - | - |\n| 1 | 2 |\n\nTitle\n=====\n\n```rust\nfn f() {}\n```\n\n---\n\nend *here*".to_string(),
        ];
        for answer in answers {
            let mut app = loaded_app();
            ask(&mut app, "hi", &[]);
            let view = ChatView::default();
            for piece in answer.split_inclusive([' ', '\n']) {
                update(
                    &mut app,
                    AppEvent::Engine(EngineEvent::Token {
                        id: 1,
                        text: piece.into(),
                        latency: Duration::from_millis(5),
                    }),
                );
                assert_eq!(
                    render_with(&mut app, &view, 70, 60),
                    render_with(&mut app, &ChatView::default(), 70, 60),
                    "after {:?}",
                    app.cells[1].text
                );
            }
        }
    }

    fn finished_stats() -> TurnStats {
        TurnStats {
            stop_reason: StopReason::Eos,
            tokens: 5,
            prompt_tokens: 30,
            prefill_time: Duration::from_millis(30),
            time_to_first_token: Duration::from_millis(35),
            decode_time: Duration::from_millis(40),
            decode_tok_s: 23.4,
            loops: 2,
            reused_tokens: 12,
            context_used: 40,
            kv_bytes: 4096,
            dropped_messages: 0,
        }
    }

    const CODE_ANSWER: &[&str] = &[
        "Here is one:\n\n",
        "```python\n",
        "def reverse_string(s):\n",
        "    return s[::-1]\n",
        "```\n\nIt uses **slicing**.",
    ];

    #[test]
    fn idle_screen() {
        for (w, h) in [(80, 24), (120, 40)] {
            let mut app = loaded_app();
            let terminal = render(&mut app, w, h);
            insta::assert_snapshot!(format!("idle_{w}x{h}"), terminal.backend());
        }
    }

    #[test]
    fn streaming_with_a_highlighted_code_block() {
        for (w, h) in [(80, 24), (120, 40)] {
            let mut app = loaded_app();
            ask(&mut app, "Reverse a string in Python", CODE_ANSWER);
            let terminal = render(&mut app, w, h);
            insta::assert_snapshot!(format!("streaming_{w}x{h}"), terminal.backend());
            // The code is coloured by syntect: its cells carry several foreground colours.
            let buffer = terminal.backend().buffer();
            let mut colours = std::collections::HashSet::new();
            for y in 0..h {
                let row: String = (0..w)
                    .map(|x| buffer[(x, y)].symbol().to_string())
                    .collect();
                if row.contains("def reverse_string") {
                    for x in 0..w {
                        colours.insert(format!("{:?}", buffer[(x, y)].fg));
                    }
                }
            }
            assert!(colours.len() >= 3, "{colours:?}");
        }
    }

    #[test]
    fn a_finished_turn_and_loops_differing_from_trained() {
        let mut app = loaded_app();
        ask(&mut app, "hi", &["Hello", "!"]);
        update(
            &mut app,
            AppEvent::Engine(EngineEvent::Done {
                id: 1,
                stats: TurnStats {
                    stop_reason: StopReason::Eos,
                    tokens: 2,
                    prompt_tokens: 30,
                    prefill_time: Duration::from_millis(30),
                    time_to_first_token: Duration::from_millis(35),
                    decode_tok_s: 23.4,
                    decode_time: Duration::from_millis(40),
                    loops: 2,
                    reused_tokens: 12,
                    context_used: 40,
                    kv_bytes: 4096,
                    dropped_messages: 0,
                },
            }),
        );
        update(&mut app, AppEvent::Engine(EngineEvent::LoopsChanged(3)));
        for (w, h) in [(80, 24), (120, 40)] {
            let terminal = render(&mut app, w, h);
            insta::assert_snapshot!(format!("loops_differ_{w}x{h}"), terminal.backend());
        }
        let status: String = status_text(&app, 200)
            .iter()
            .map(|s| s.content.to_string())
            .collect();
        assert!(status.contains("loops 3/2*"), "{status}");
        assert!(status.contains("23.4 tok/s"), "{status}");
        assert!(status.contains("cached 12"), "{status}");
    }

    #[test]
    fn help_overlay() {
        for (w, h) in [(80, 24), (120, 40)] {
            let mut app = loaded_app();
            app.help = true;
            let terminal = render(&mut app, w, h);
            insta::assert_snapshot!(format!("help_{w}x{h}"), terminal.backend());
        }
    }

    #[test]
    fn too_small_notice() {
        let mut app = loaded_app();
        let terminal = render(&mut app, 30, 8);
        insta::assert_snapshot!("too_small", terminal.backend());
    }

    #[test]
    fn no_color_draws_without_colours() {
        let mut app = loaded_app();
        app.color = false;
        ask(&mut app, "Reverse a string in Python", CODE_ANSWER);
        let terminal = render(&mut app, 80, 24);
        let buffer = terminal.backend().buffer();
        for cell in buffer.content() {
            assert_eq!(cell.fg, Color::Reset);
            assert_eq!(cell.bg, Color::Reset);
        }
    }

    #[test]
    fn diff_pane_with_accepted_and_rejected_hunks() {
        for (w, h) in [(80, 30), (140, 30)] {
            let dir = hello_workspace();
            let mut app = loaded_app();
            ask(&mut app, "tidy hello.py", &[]);
            for text in EDIT_ANSWER {
                let effects = update(
                    &mut app,
                    AppEvent::Engine(EngineEvent::Token {
                        id: 1,
                        text: text.to_string(),
                        latency: Duration::from_millis(20),
                    }),
                );
                run_edit_effects(&mut app, dir.path(), effects);
            }
            let effects = update(
                &mut app,
                AppEvent::Engine(EngineEvent::Done {
                    id: 1,
                    stats: TurnStats {
                        stop_reason: StopReason::Eos,
                        tokens: 60,
                        prompt_tokens: 30,
                        prefill_time: Duration::from_millis(30),
                        time_to_first_token: Duration::from_millis(40),
                        decode_tok_s: 50.0,
                        decode_time: Duration::from_millis(40),
                        loops: 2,
                        reused_tokens: 0,
                        context_used: 200,
                        kv_bytes: 1024,
                        dropped_messages: 0,
                    },
                }),
            );
            run_edit_effects(&mut app, dir.path(), effects);
            // Focus the pane, reject the first hunk, select the second.
            for code in [
                KeyCode::Tab,
                KeyCode::Tab,
                KeyCode::Char(' '),
                KeyCode::Down,
            ] {
                update(&mut app, AppEvent::Key(KeyEvent::from(code)));
            }
            let terminal = render(&mut app, w, h);
            insta::assert_snapshot!(format!("diff_pane_{w}x{h}"), terminal.backend());
        }
    }
}

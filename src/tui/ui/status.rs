//! The status line: model, loops, engine state, latency figures and a latency sparkline.

use ratatui::layout::Rect;
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::Paragraph;
use ratatui::Frame;

use super::super::state::{App, EngineState};
use super::style;
use crate::engine::LoopControl;

/// Sparkline glyphs, lowest to highest.
const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

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
    let fixed = app
        .model_info
        .as_ref()
        .is_some_and(|m| m.loop_control == LoopControl::Fixed);
    let loops_text = format!("loops {}/{}", r.loops, r.trained_loops);
    let loops = if fixed {
        // The server runs the count it started with and does not say which.
        Span::raw("loops: server")
    } else if r.loops == r.trained_loops {
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
        EngineState::Offline => "offline".into(),
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

pub(super) fn draw_status(frame: &mut Frame<'_>, app: &App, area: Rect) {
    let line = Line::from(status_text(app, area.width));
    let base = if app.color {
        Style::default().bg(Color::Black)
    } else {
        Style::default().add_modifier(Modifier::REVERSED)
    };
    frame.render_widget(Paragraph::new(line).style(base), area);
}

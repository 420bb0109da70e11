//! `lb top`: a live view of one agent over its API socket. Every second it asks for the
//! status, computes rates from the previous answer, and redraws: services and backends
//! with weights, states, health, bucket shares and rates, then the data plane's packets
//! by reason with the drops marked.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use ratatui::{
    crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers},
    layout::{Alignment, Constraint, Layout},
    style::{Color, Modifier, Style},
    text::Line,
    widgets::{Block, Cell, Paragraph, Row, Table},
    Frame,
};

use crate::{
    api::{Health, Request, Response, Status},
    api_client::{self, human, human_rate, Rates},
};

/// What one screen shows.
#[derive(Debug, Default)]
pub struct View {
    pub socket: String,
    pub status: Status,
    /// Rates since the previous status; `None` on the first screen.
    pub rates: Option<Rates>,
    /// Why the last refresh failed, shown instead of stale numbers passing for new.
    pub error: Option<String>,
}

/// Runs the view until `q`, Esc or Ctrl-C, refreshing every `every`.
pub fn run(socket: &Path, every: Duration) -> anyhow::Result<()> {
    let mut terminal = ratatui::init();
    let result = (|| -> anyhow::Result<()> {
        let mut view = View {
            socket: socket.display().to_string(),
            ..View::default()
        };
        let mut last: Option<(Status, Instant)> = None;
        loop {
            let asked = Instant::now();
            match api_client::request(socket, &Request::Status {}) {
                Ok(Response::Status(s)) => {
                    view.rates = last.as_ref().map(|(prev, at)| {
                        Rates::between(prev, &s, asked.duration_since(*at).as_secs_f64())
                    });
                    view.status = s.clone();
                    view.error = None;
                    last = Some((s, asked));
                }
                Ok(Response::Error { kind, message }) => {
                    view.error = Some(format!("{}: {message}", kind.name()));
                }
                Ok(other) => view.error = Some(format!("unexpected answer: {other:?}")),
                Err(e) => view.error = Some(e.to_string()),
            }
            terminal.draw(|f| draw(f, &view))?;
            let next = asked + every;
            while let Some(left) = next.checked_duration_since(Instant::now()) {
                if event::poll(left)? {
                    if let Event::Key(k) = event::read()? {
                        let ctrl_c =
                            k.code == KeyCode::Char('c') && k.modifiers == KeyModifiers::CONTROL;
                        if k.kind == KeyEventKind::Press
                            && (ctrl_c || matches!(k.code, KeyCode::Char('q') | KeyCode::Esc))
                        {
                            return Ok(());
                        }
                    }
                }
            }
        }
    })();
    ratatui::restore();
    result
}

fn health_style(h: Health, draining: bool) -> Style {
    match h {
        Health::Down => Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        _ if draining => Style::new().fg(Color::Yellow),
        Health::Up => Style::new().fg(Color::Green),
        Health::Unchecked => Style::new(),
    }
}

/// A number's cell, right-aligned.
fn num(s: String) -> Cell<'static> {
    Cell::from(Line::from(s).alignment(Alignment::Right))
}

/// Draws `view` on `frame`.
pub fn draw(frame: &mut Frame, view: &View) {
    let rates = view.rates.as_ref();
    let rate = |r: Option<api_client::Rate>| {
        r.map_or(("-".into(), "-".into()), |r| {
            (human_rate(r.packets, false), human_rate(r.bytes, false))
        })
    };

    let mut rows = Vec::new();
    for svc in &view.status.services {
        let (pps, bps) = rate(rates.map(|r| r.service(&svc.name)));
        rows.push(
            Row::new(vec![
                Cell::from(format!(
                    "{} {} {}",
                    svc.name,
                    svc.protocol.to_string().to_uppercase(),
                    api_client::endpoint(svc)
                )),
                Cell::from(""),
                Cell::from(""),
                Cell::from(""),
                num(format!("{}", 1u64 << svc.table_bits)),
                num(pps),
                num(bps),
                num(human(svc.packets, false)),
                Cell::from(""),
            ])
            .style(Style::new().add_modifier(Modifier::BOLD)),
        );
        let size = 1u64 << svc.table_bits;
        for b in &svc.backends {
            let (pps, bps) = rate(rates.map(|r| r.backend(&svc.name, &b.address)));
            let state = api_client::state(b);
            rows.push(Row::new(vec![
                Cell::from(format!("  -> {}", b.address)),
                num(b.weight.to_string()),
                Cell::from(state),
                Cell::from(api_client::health(b.health))
                    .style(health_style(b.health, state == "drain")),
                num(format!(
                    "{:.1}%",
                    100.0 * f64::from(b.buckets) / size as f64
                )),
                num(pps),
                num(bps),
                num(human(b.packets, false)),
                num(format!("{}/{}", b.check_failures, b.checks)),
            ]));
        }
    }
    let services = Table::new(
        rows,
        [
            Constraint::Length(36),
            Constraint::Length(6),
            Constraint::Length(6),
            Constraint::Length(6),
            Constraint::Length(7),
            Constraint::Length(9),
            Constraint::Length(9),
            Constraint::Length(9),
            Constraint::Length(11),
        ],
    )
    .header(
        Row::new([
            Cell::from("service / backend"),
            num("weight".into()),
            Cell::from("state"),
            Cell::from("health"),
            num("share".into()),
            num("pkts/s".into()),
            num("bytes/s".into()),
            num("packets".into()),
            num("fail/check".into()),
        ])
        .style(Style::new().add_modifier(Modifier::REVERSED)),
    )
    .block(Block::bordered().title(" services (share: buckets owned; service row: table size) "));

    let reasons: Vec<Row> = view
        .status
        .reasons
        .iter()
        .filter(|c| c.packets > 0)
        .map(|c| {
            let per_s = rates
                .and_then(|r| r.reasons.get(&c.reason))
                .map_or("-".into(), |v| human_rate(*v, false));
            let style = if c.reason.starts_with("drop_") {
                Style::new().fg(Color::Red)
            } else {
                Style::new()
            };
            Row::new(vec![
                Cell::from(c.reason.clone()),
                num(per_s),
                num(human(c.packets, false)),
            ])
            .style(style)
        })
        .collect();
    let reason_rows = reasons.len() as u16;
    let reasons = Table::new(
        reasons,
        [
            Constraint::Length(24),
            Constraint::Length(9),
            Constraint::Length(9),
        ],
    )
    .header(
        Row::new([
            Cell::from("reason"),
            num("pkts/s".into()),
            num("packets".into()),
        ])
        .style(Style::new().add_modifier(Modifier::REVERSED)),
    )
    .block(Block::bordered().title(" data plane by reason (drops in red) "));

    let total: f64 = rates.map_or(0.0, |r| r.services.values().map(|s| s.packets).sum());
    let drops: f64 = rates.map_or(0.0, |r| {
        r.reasons
            .iter()
            .filter(|(k, _)| k.starts_with("drop_"))
            .map(|(_, v)| v)
            .sum()
    });
    let mut head = vec![Line::from(format!(
        "lb top: {}  forwarded {} pkts/s, dropped {} pkts/s, tables rebuilt {}  (q quits)",
        view.socket,
        human_rate(total, false),
        human_rate(drops, false),
        view.status.table_rebuilds
    ))];
    if let Some(e) = &view.error {
        head.push(Line::styled(
            format!("refresh failed, numbers are from before: {e}"),
            Style::new().fg(Color::Red),
        ));
    }
    let head_height = head.len() as u16;
    let [top, middle, bottom] = Layout::vertical([
        Constraint::Length(head_height),
        Constraint::Min(4),
        Constraint::Length(reason_rows + 3),
    ])
    .areas(frame.area());
    frame.render_widget(Paragraph::new(head), top);
    frame.render_widget(services, middle);
    frame.render_widget(reasons, bottom);
}

#[cfg(test)]
mod tests {
    use ratatui::{backend::TestBackend, Terminal};

    use super::*;

    fn status(packets: u64, drops: u64) -> Status {
        serde_json::from_value(serde_json::json!({
            "services": [{
                "name": "web", "vip": "10.100.0.1", "port": 80, "protocol": "tcp",
                "table_bits": 16, "packets": packets, "bytes": packets * 100,
                "backends": [
                    { "address": "10.0.3.2", "weight": 100, "drain": false, "health": "up",
                      "buckets": 49152, "packets": packets, "bytes": packets * 100,
                      "checks": 10, "check_failures": 0, "health_transitions": 0 },
                    { "address": "10.0.4.2", "weight": 100, "drain": false, "health": "down",
                      "buckets": 16384, "packets": 0, "bytes": 0,
                      "checks": 10, "check_failures": 4, "health_transitions": 1 },
                ],
            }],
            "reasons": [
                { "reason": "encapsulated", "packets": packets },
                { "reason": "drop_no_backend", "packets": drops },
                { "reason": "pass_not_ip", "packets": 0 },
            ],
            "table_rebuilds": 3,
        }))
        .unwrap()
    }

    #[test]
    fn screen_shows_shares_rates_health_and_drops() {
        let before = status(1000, 10);
        let after = status(3000, 30);
        let view = View {
            socket: "/run/lb/lb.sock".into(),
            rates: Some(Rates::between(&before, &after, 2.0)),
            status: after,
            error: None,
        };
        let mut t = Terminal::new(TestBackend::new(110, 20)).unwrap();
        t.draw(|f| draw(f, &view)).unwrap();
        let screen: Vec<String> = t
            .backend()
            .buffer()
            .content()
            .chunks(110)
            .map(|row| row.iter().map(|c| c.symbol()).collect())
            .collect();
        let text = screen.join("\n");
        let row = |first: &str| {
            screen
                .iter()
                .find(|l| l.contains(first))
                .map(|l| {
                    l.split(|c: char| c.is_whitespace() || c == '│')
                        .filter(|w| !w.is_empty())
                        .collect::<Vec<_>>()
                })
                .unwrap_or_else(|| panic!("no {first:?} in\n{text}"))
        };
        assert!(
            text.contains("forwarded 1000 pkts/s, dropped 10.0 pkts/s"),
            "{text}"
        );
        assert_eq!(
            row("10.0.3.2"),
            ["->", "10.0.3.2", "100", "active", "up", "75.0%", "1000", "100K", "3000", "0/10"]
        );
        assert_eq!(
            row("10.0.4.2"),
            ["->", "10.0.4.2", "100", "active", "down", "25.0%", "0.0", "0.0", "0", "4/10"]
        );
        assert_eq!(row("drop_no_backend"), ["drop_no_backend", "10.0", "30"]);
        // Reasons that never counted a packet stay off the screen.
        assert!(!text.contains("pass_not_ip"), "{text}");
    }
}

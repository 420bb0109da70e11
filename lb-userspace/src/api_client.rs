//! The operator side of the API: send one request to the agent, render the answer.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::IpAddr,
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use serde::Serialize;

use crate::api::{
    BackendStatus, Health, PlanSummary, ReloadReport, Request, Response, ServiceStatus, Status,
    TableSummary,
};

/// Errors of talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the agent at {path} (is `lb agent` running? are you root?)")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the agent")]
    Io(#[from] std::io::Error),
    #[error("the agent's answer is not understood")]
    Decode(#[from] serde_json::Error),
    #[error("the agent closed the connection without answering")]
    NoAnswer,
}

/// Sends `req` and waits for the answer.
pub fn request(socket: &Path, req: &Request) -> Result<Response, ClientError> {
    let mut stream = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        path: socket.display().to_string(),
        source,
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    // The agent answers a peer it refuses (not root) and closes at once, maybe before
    // the request is written: the write then fails, but the answer is there to read.
    let written = stream.write_all(line.as_bytes());
    let mut reader = BufReader::new(stream);
    let mut answer = String::new();
    match (reader.read_line(&mut answer), written) {
        (Ok(n), _) if n > 0 => {}
        // Nothing to read: the failed write is what went wrong.
        (_, Err(e)) | (Err(e), Ok(())) => return Err(e.into()),
        (Ok(_), Ok(())) => return Err(ClientError::NoAnswer),
    }
    Ok(serde_json::from_str(&answer)?)
}

/// A count for humans: 1234 -> 1234, 12345 -> 12K, with `exact` always in full.
pub fn human(n: u64, exact: bool) -> String {
    if exact || n < 10_000 {
        return n.to_string();
    }
    let (v, unit) = if n < 10_000_000 {
        (n / 1_000, "K")
    } else if n < 10_000_000_000 {
        (n / 1_000_000, "M")
    } else {
        (n / 1_000_000_000, "G")
    };
    format!("{v}{unit}")
}

pub fn state(b: &BackendStatus) -> &'static str {
    if b.drain || b.weight == 0 {
        "drain"
    } else {
        "active"
    }
}

pub fn health(h: Health) -> &'static str {
    match h {
        Health::Up => "up",
        Health::Down => "down",
        Health::Unchecked => "-",
    }
}

/// `lb list`: a service line, then one line per backend, like `ipvsadm -Ln`.
pub fn render_status(s: &Status, stats: bool, exact: bool) -> String {
    let mut out = String::new();
    // Service rows: the table's size in buckets; backend rows: the buckets it owns.
    let head = "Prot LocalAddress:Port           Name               Table";
    out.push_str(head);
    if stats {
        out.push_str("    Packets      Bytes");
    }
    out.push('\n');
    out.push_str("  -> RemoteAddress              Weight State  Health    Owned");
    if stats {
        out.push_str("    Packets      Bytes     Checks  Failed");
    }
    out.push('\n');
    for svc in &s.services {
        out.push_str(&service_line(svc, stats, exact));
        for b in &svc.backends {
            // The node itself, as ipvsadm marks a real server on the director.
            let addr = if b.local {
                format!("{} (local)", b.address)
            } else {
                b.address.to_string()
            };
            out.push_str(&format!(
                "  -> {:<26} {:>6} {:<6} {:<7} {:>7}",
                addr,
                b.weight,
                state(b),
                health(b.health),
                b.buckets
            ));
            if stats {
                out.push_str(&format!(
                    " {:>10} {:>10} {:>10} {:>7}",
                    human(b.packets, exact),
                    human(b.bytes, exact),
                    human(b.checks, exact),
                    human(b.check_failures, exact)
                ));
            }
            // Why a backend is down (or, with --stats, why its last check failed).
            if let Some(f) = b
                .last_failure
                .as_ref()
                .filter(|_| stats || b.health == Health::Down)
            {
                out.push_str(&format!("  last failure: {f}"));
            }
            if let Some(l) = &b.load {
                out.push_str(&crate::load::render::backend_suffix(l));
            }
            out.push('\n');
        }
    }
    if let Some(l) = &s.load {
        out.push_str(&crate::load::render::status_line(l));
    }
    out
}

fn service_line(svc: &ServiceStatus, stats: bool, exact: bool) -> String {
    let mut line = format!(
        "{:<4} {:<29} {:<16} {:>7}",
        svc.protocol.to_string().to_uppercase(),
        endpoint(svc),
        svc.name,
        1u64 << svc.table_bits
    );
    if stats {
        line.push_str(&format!(
            " {:>10} {:>10}",
            human(svc.packets, exact),
            human(svc.bytes, exact)
        ));
    }
    line.push('\n');
    line
}

/// Packets and bytes per second.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Rate {
    pub packets: f64,
    pub bytes: f64,
}

impl Rate {
    /// The rate from counters `before` to `after` over `secs`; a counter that went back
    /// (the data plane was reloaded) counts from zero.
    fn between(before: (u64, u64), after: (u64, u64), secs: f64) -> Rate {
        let per = |b: u64, a: u64| {
            let d = if a >= b { a - b } else { a };
            d as f64 / secs.max(f64::EPSILON)
        };
        Rate {
            packets: per(before.0, after.0),
            bytes: per(before.1, after.1),
        }
    }
}

/// Rates between two statuses: per service, per (service, backend), per data-plane
/// reason (packets/s). Entries absent from `before` count from zero.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Rates {
    pub seconds: f64,
    pub services: BTreeMap<String, Rate>,
    pub backends: BTreeMap<String, BTreeMap<IpAddr, Rate>>,
    pub reasons: BTreeMap<String, f64>,
}

impl Rates {
    pub fn between(before: &Status, after: &Status, secs: f64) -> Rates {
        let mut r = Rates {
            seconds: secs,
            ..Rates::default()
        };
        for s in &after.services {
            let old = before.services.iter().find(|o| o.name == s.name);
            let was = old.map_or((0, 0), |o| (o.packets, o.bytes));
            r.services.insert(
                s.name.clone(),
                Rate::between(was, (s.packets, s.bytes), secs),
            );
            let backends = r.backends.entry(s.name.clone()).or_default();
            for b in &s.backends {
                let was = old
                    .and_then(|o| o.backends.iter().find(|ob| ob.address == b.address))
                    .map_or((0, 0), |ob| (ob.packets, ob.bytes));
                backends.insert(b.address, Rate::between(was, (b.packets, b.bytes), secs));
            }
        }
        for c in &after.reasons {
            let was = before
                .reasons
                .iter()
                .find(|o| o.reason == c.reason)
                .map_or(0, |o| o.packets);
            r.reasons.insert(
                c.reason.clone(),
                Rate::between((was, 0), (c.packets, 0), secs).packets,
            );
        }
        r
    }

    pub fn service(&self, name: &str) -> Rate {
        self.services.get(name).copied().unwrap_or_default()
    }

    pub fn backend(&self, service: &str, address: &IpAddr) -> Rate {
        self.backends
            .get(service)
            .and_then(|b| b.get(address))
            .copied()
            .unwrap_or_default()
    }
}

/// A rate for humans: one decimal below 100, then K/M/G like `human`.
pub fn human_rate(v: f64, exact: bool) -> String {
    if v < 100.0 && !exact {
        format!("{v:.1}")
    } else {
        human(v.round() as u64, exact)
    }
}

/// `lb list --rate`: the services and backends of `s` with packets/s and bytes/s.
pub fn render_rates(s: &Status, r: &Rates, exact: bool) -> String {
    let mut out = format!(
        "{:<4} {:<29} {:<16} {:>10} {:>10}\n  -> {:<26} {:>6} {:<6} {:<7} {:>10} {:>10}\n",
        "Prot",
        "LocalAddress:Port",
        "Name",
        "Pkts/s",
        "Bytes/s",
        "RemoteAddress",
        "Weight",
        "State",
        "Health",
        "Pkts/s",
        "Bytes/s"
    );
    for svc in &s.services {
        let rate = r.service(&svc.name);
        out.push_str(&format!(
            "{:<4} {:<29} {:<16} {:>10} {:>10}\n",
            svc.protocol.to_string().to_uppercase(),
            endpoint(svc),
            svc.name,
            human_rate(rate.packets, exact),
            human_rate(rate.bytes, exact)
        ));
        for b in &svc.backends {
            let rate = r.backend(&svc.name, &b.address);
            out.push_str(&format!(
                "  -> {:<26} {:>6} {:<6} {:<7} {:>10} {:>10}\n",
                b.address.to_string(),
                b.weight,
                state(b),
                health(b.health),
                human_rate(rate.packets, exact),
                human_rate(rate.bytes, exact)
            ));
        }
    }
    out.push_str(&format!("(over {:.1} s)\n", r.seconds));
    out
}

/// A service's `VIP:port`, with brackets around an IPv6 VIP.
pub fn endpoint(svc: &ServiceStatus) -> String {
    match svc.vip {
        IpAddr::V4(v) => format!("{v}:{}", svc.port),
        IpAddr::V6(v) => format!("[{v}]:{}", svc.port),
    }
}

/// `lb table`.
pub fn render_table(t: &TableSummary) -> String {
    let mut out = format!(
        "service {}: {} buckets, {} empty\n  {:<26} {:>6} {:>8} {:>7} {:>8}\n",
        t.service, t.buckets, t.empty, "backend", "weight", "first", "share", "second"
    );
    for b in &t.backends {
        out.push_str(&format!(
            "  {:<26} {:>6} {:>8} {:>6.2}% {:>8}\n",
            b.address.to_string(),
            b.weight,
            b.first,
            100.0 * f64::from(b.first) / f64::from(t.buckets.max(1)),
            b.second
        ));
    }
    out
}

/// `lb plan` and the answer to a change.
pub fn render_plan(p: &PlanSummary, applied: bool) -> String {
    let verb = if applied { "moved" } else { "would move" };
    let mut out = format!(
        "service {}: {verb} {} of {} buckets ({:.2}%)\n",
        p.service,
        p.moved,
        p.buckets,
        100.0 * f64::from(p.moved) / f64::from(p.buckets.max(1))
    );
    let name = |a: &Option<std::net::IpAddr>| a.map_or("(none)".to_string(), |a| a.to_string());
    for w in &p.warnings {
        out.push_str(&format!("warning: {w}\n"));
    }
    for m in &p.moves {
        out.push_str(&format!(
            "  {:<26} -> {:<26} {:>8}\n",
            name(&m.from),
            name(&m.to),
            m.buckets
        ));
    }
    out
}

/// `lb reload`: what changed, and what waits for a restart.
pub fn render_reload(r: &ReloadReport) -> String {
    let mut out = if r.changed.is_empty() {
        format!("reloaded {}: no change\n", r.file)
    } else {
        let n = r.changed.len();
        format!(
            "reloaded {}: {n} change{}\n",
            r.file,
            if n == 1 { "" } else { "s" }
        )
    };
    for c in &r.changed {
        out.push_str(&format!("  changed: {c}\n"));
    }
    for i in &r.ignored {
        out.push_str(&format!("  ignored: {i}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_numbers() {
        assert_eq!(human(9999, false), "9999");
        assert_eq!(human(12_345, false), "12K");
        assert_eq!(human(12_345_678, false), "12M");
        assert_eq!(human(12_345_678, true), "12345678");
        assert_eq!(human_rate(2.25, false), "2.2");
        assert_eq!(human_rate(123_456.0, false), "123K");
    }

    fn status(packets: u64, backend_packets: [u64; 2]) -> Status {
        serde_json::from_value(serde_json::json!({
            "services": [{
                "name": "web", "vip": "10.100.0.1", "port": 80, "protocol": "tcp",
                "table_bits": 16, "packets": packets, "bytes": packets * 100,
                "backends": backend_packets.iter().enumerate().map(|(i, p)| serde_json::json!({
                    "address": format!("10.0.{i}.2"), "weight": 100, "drain": false,
                    "health": "up", "buckets": 32768, "packets": p, "bytes": p * 100,
                    "checks": 0, "check_failures": 0, "health_transitions": 0,
                })).collect::<Vec<_>>(),
            }],
            "reasons": [{ "reason": "forwarded", "packets": packets }],
            "table_rebuilds": 1,
        }))
        .unwrap()
    }

    #[test]
    fn rates_are_deltas_over_the_interval() {
        let before = status(1000, [600, 400]);
        let after = status(3000, [1600, 200]);
        let r = Rates::between(&before, &after, 2.0);
        assert_eq!(
            r.service("web"),
            Rate {
                packets: 1000.0,
                bytes: 100_000.0
            }
        );
        let b0: IpAddr = "10.0.0.2".parse().unwrap();
        let b1: IpAddr = "10.0.1.2".parse().unwrap();
        assert_eq!(r.backend("web", &b0).packets, 500.0);
        // Went back (data plane reloaded): counted from zero.
        assert_eq!(r.backend("web", &b1).packets, 100.0);
        assert_eq!(r.reasons["forwarded"], 1000.0);
        let text = render_rates(&after, &r, false);
        let has = |words: &[&str]| {
            text.lines()
                .any(|l| l.split_whitespace().eq(words.iter().copied()))
        };
        assert!(
            has(&["TCP", "10.100.0.1:80", "web", "1000", "100K"]),
            "{text}"
        );
        assert!(
            has(&["->", "10.0.0.2", "100", "active", "up", "500", "50K"]),
            "{text}"
        );
    }
}

//! The operator side of the API: send one request to the agent, render the answer.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

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

fn state(b: &BackendStatus) -> &'static str {
    if b.drain || b.weight == 0 {
        "drain"
    } else {
        "active"
    }
}

fn health(h: Health) -> &'static str {
    match h {
        Health::Up => "up",
        Health::Down => "down",
        Health::Unchecked => "-",
    }
}

/// `lb list`: a service line, then one line per backend, like `ipvsadm -Ln`.
pub fn render_status(s: &Status, stats: bool, exact: bool) -> String {
    let mut out = String::new();
    let head = "Prot LocalAddress:Port           Name             Buckets";
    out.push_str(head);
    if stats {
        out.push_str("    Packets      Bytes");
    }
    out.push('\n');
    out.push_str("  -> RemoteAddress              Weight State  Health  Buckets");
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
            out.push('\n');
        }
    }
    out
}

fn service_line(svc: &ServiceStatus, stats: bool, exact: bool) -> String {
    let addr = match svc.vip {
        std::net::IpAddr::V4(v) => format!("{v}:{}", svc.port),
        std::net::IpAddr::V6(v) => format!("[{v}]:{}", svc.port),
    };
    let mut line = format!(
        "{:<4} {:<29} {:<16} {:>7}",
        svc.protocol.to_string().to_uppercase(),
        addr,
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
    }
}

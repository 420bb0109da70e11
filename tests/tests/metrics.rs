//! The metrics page as Prometheus' own tool reads it: both exposition formats pass
//! `promtool`, and every metric the shipped dashboard and alert rules query is one the
//! endpoint exports. promtool comes with Debian's prometheus package (`cargo xtask setup`
//! installs it); without it these tests fail rather than pass unchecked.

use std::{
    io::Write,
    process::{Command, Output, Stdio},
};

use lb::{
    api::Status,
    health::TargetState,
    metrics::{render, Format},
};

/// A status with every kind of sample: two services (IPv4 and IPv6), a backend shared
/// between them, one in each health state, one draining, moved buckets, reasons.
fn status() -> Status {
    serde_json::from_value(serde_json::json!({
        "services": [
            {
                "name": "web", "vip": "10.100.0.1", "port": 80, "protocol": "tcp",
                "table_bits": 16, "packets": 1300, "bytes": 130000,
                "moved_buckets": 13104, "table_digest": 20015998343868u64,
                "backends": [
                    backend("10.0.3.2", "up", false),
                    backend("10.0.4.2", "down", false),
                    backend("10.0.5.2", "up", true),
                ],
            },
            {
                "name": "dns", "vip": "2001:db8::53", "port": 53, "protocol": "udp",
                "table_bits": 12, "packets": 7, "bytes": 700,
                "moved_buckets": 0, "table_digest": 0,
                "backends": [backend("10.0.3.2", "unchecked", false)],
            },
        ],
        "reasons": [
            { "reason": "forwarded", "packets": 1307 },
            { "reason": "no_backend", "packets": 3 },
        ],
        "table_rebuilds": 4,
    }))
    .expect("a valid status")
}

fn backend(address: &str, health: &str, drain: bool) -> serde_json::Value {
    serde_json::json!({
        "address": address, "weight": 100, "drain": drain, "health": health,
        "buckets": 21845, "packets": 400, "bytes": 40000,
        "checks": 50, "check_failures": 3, "health_transitions": 1,
    })
}

fn health(s: &Status) -> Vec<TargetState> {
    let mut out = Vec::new();
    for svc in &s.services {
        for b in &svc.backends {
            out.push(TargetState {
                service: svc.name.clone(),
                backend: b.address,
                up: b.health == lb::api::Health::Up,
                checks: b.checks,
                failures: b.check_failures,
                transitions: b.health_transitions,
                last_reason: String::new(),
            });
        }
    }
    out
}

fn page(format: Format) -> String {
    let s = status();
    render(&s, &health(&s), format)
}

/// Runs promtool with `args`, `input` on its standard input.
fn promtool(args: &[&str], input: &str) -> Output {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is missing: `cargo xtask setup` installs it (Debian's prometheus)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn show(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The sample lines of a page (name, labels, value), without comments.
fn samples(page: &str) -> Vec<&str> {
    let mut v: Vec<&str> = page
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .collect();
    v.sort_unstable();
    v
}

#[test]
fn classic_text_passes_promtool_check_metrics() {
    let text = page(Format::Text);
    let out = promtool(&["check", "metrics"], &text);
    println!("promtool check metrics (text/plain; version=0.0.4):\n{}", show(&out));
    assert!(out.status.success(), "{}\n{text}", show(&out));
    // Lint findings are printed even when they are only warnings.
    assert!(out.stdout.is_empty() && out.stderr.is_empty(), "{}", show(&out));
}

/// `promtool check metrics` reads the classic format only (on an OpenMetrics page it
/// stops at the `info` type). promtool's OpenMetrics parser, the one Prometheus scrapes
/// with, runs in `tsdb create-blocks-from openmetrics`, which wants a timestamp on every
/// sample: the page gets one, and must then parse whole, `# EOF` included, into as many
/// series as the classic page has samples.
#[test]
fn openmetrics_passes_promtool_openmetrics_parser() {
    let om = page(Format::OpenMetrics);
    let dir = std::env::temp_dir().join(format!("lb-metrics-om-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("page.om");
    let stamped: String = om
        .lines()
        .map(|l| {
            if l.starts_with('#') {
                format!("{l}\n")
            } else {
                format!("{l} 1700000000\n")
            }
        })
        .collect();
    std::fs::write(&file, &stamped).unwrap();
    let blocks = dir.join("blocks");
    let out = promtool(
        &[
            "tsdb",
            "create-blocks-from",
            "openmetrics",
            file.to_str().unwrap(),
            blocks.to_str().unwrap(),
        ],
        "",
    );
    let _ = std::fs::remove_dir_all(&dir);
    println!("promtool tsdb create-blocks-from openmetrics:\n{}", show(&out));
    assert!(out.status.success(), "{}\n{om}", show(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let text = page(Format::Text);
    let classic = samples(&text);
    // The block table's row: ULID, min, max, duration, samples, chunks, series, size.
    let series: usize = stdout
        .lines()
        .nth(1)
        .and_then(|row| row.split_whitespace().nth(6))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no block table in {stdout}"));
    assert_eq!(series, classic.len(), "{stdout}");
    // Both formats carry the same samples, and OpenMetrics' counters are named as its
    // families plus `_total`.
    assert_eq!(samples(&om), classic);
    for family in om.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        if let Some(name) = family.strip_suffix(" counter") {
            assert!(!name.ends_with("_total"), "{family}");
            assert!(
                om.lines().any(|l| l.starts_with(&format!("{name}_total"))),
                "no {name}_total sample"
            );
        }
    }
    assert!(om.ends_with("# EOF\n"));
}

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
                last_failure: String::new(),
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

/// Runs promtool with `args` in `dir`.
fn promtool_in(dir: &std::path::Path, args: &[&str]) -> Output {
    Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("promtool is missing: `cargo xtask setup` installs it (Debian's prometheus)")
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
    println!(
        "promtool check metrics (text/plain; version=0.0.4):\n{}",
        show(&out)
    );
    assert!(out.status.success(), "{}\n{text}", show(&out));
    // Lint findings are printed even when they are only warnings.
    assert!(
        out.stdout.is_empty() && out.stderr.is_empty(),
        "{}",
        show(&out)
    );
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
    println!(
        "promtool tsdb create-blocks-from openmetrics:\n{}",
        show(&out)
    );
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

/// The repository's root.
fn repo() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Names of every sample the endpoint exports (every family is on every page).
fn exported() -> std::collections::BTreeSet<String> {
    samples(&page(Format::Text))
        .iter()
        .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
        .collect()
}

/// The `lb_...` metric names `text` mentions.
fn lb_names(text: &str) -> Vec<&str> {
    let mut names = Vec::new();
    let bytes = text.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    for (i, _) in text.match_indices("lb_") {
        if i > 0 && word(bytes[i - 1]) {
            continue;
        }
        let end = text[i..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(text.len(), |n| i + n);
        names.push(&text[i..end]);
    }
    names
}

/// Every string under a key `key` in a JSON document.
fn strings_at<'a>(v: &'a serde_json::Value, key: &str, out: &mut Vec<&'a str>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match v {
                    serde_json::Value::String(s) if k == key => out.push(s),
                    _ => strings_at(v, key, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| strings_at(v, key, out)),
        _ => {}
    }
}

#[test]
fn dashboard_queries_only_exported_metrics_in_valid_promql() {
    let path = repo().join("docs/grafana/lb-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    strings_at(&dashboard["panels"], "expr", &mut exprs);
    let mut templates = Vec::new();
    strings_at(&dashboard["templating"], "definition", &mut templates);
    assert!(exprs.len() >= 15, "{} queries", exprs.len());
    let exported = exported();
    for e in exprs.iter().chain(&templates) {
        let names = lb_names(e);
        assert!(!names.is_empty(), "no lb metric in {e:?}");
        for n in names {
            assert!(exported.contains(n), "{n} in {e:?} is not exported");
        }
    }
    // promtool parses PromQL in rule files: each query becomes a recording rule, with
    // Grafana's variables given values (JSON is YAML).
    let rules = serde_json::json!({"groups": [{
        "name": "dashboard",
        "rules": exprs.iter().enumerate().map(|(i, e)| serde_json::json!({
            "record": format!("dashboard:query_{i}"),
            "expr": e.replace("$__rate_interval", "1m")
                .replace("$instance", ".*")
                .replace("$service", ".*"),
        })).collect::<Vec<_>>(),
    }]});
    let file = std::env::temp_dir().join(format!("lb-dashboard-{}.yml", std::process::id()));
    std::fs::write(&file, rules.to_string()).unwrap();
    let out = promtool(&["check", "rules", file.to_str().unwrap()], "");
    let _ = std::fs::remove_file(&file);
    println!("dashboard queries, promtool check rules:\n{}", show(&out));
    assert!(out.status.success(), "{}", show(&out));
}

#[test]
fn alert_rules_pass_promtool_and_query_only_exported_metrics() {
    let dir = repo().join("docs/prometheus");
    let rules = std::fs::read_to_string(dir.join("lb-alerts.yml")).unwrap();
    let exported = exported();
    let names = lb_names(&rules);
    assert!(names.len() >= 3, "{names:?}");
    for n in names {
        assert!(exported.contains(n), "{n} in lb-alerts.yml is not exported");
    }
    let check = promtool_in(&dir, &["check", "rules", "lb-alerts.yml"]);
    println!("promtool check rules:\n{}", show(&check));
    assert!(check.status.success(), "{}", show(&check));
    // The alerts fire on made-up series as they should (and not before).
    let test = promtool_in(&dir, &["test", "rules", "lb-alerts.test.yml"]);
    println!("promtool test rules:\n{}", show(&test));
    assert!(test.status.success(), "{}", show(&test));
}

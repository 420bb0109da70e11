//! Limits and bad configuration: every limit, one past it, refused by `lb config check`.

use std::{net::Ipv4Addr, path::Path, process::Command};

use serde_json::{json, Value};
use tests::agent::lb_binary;

fn backend_list(n: usize, base: u32) -> Vec<Value> {
    (0..n as u32)
        .map(|i| json!({ "address": Ipv4Addr::from(base + i) }))
        .collect()
}

fn config_with(services: Vec<Value>) -> Value {
    json!({
        "node": { "interfaces": ["eth0"], "address_v4": "10.0.0.2" },
        "services": services,
    })
}

fn service(name: &str, port: u16, table_bits: u32, backends: Vec<Value>) -> Value {
    json!({ "name": name, "vip": "10.100.0.1", "port": port, "protocol": "tcp",
            "table_bits": table_bits, "backends": backends })
}

/// `lb config check` on a file with `text`: (success, stdout + stderr).
fn config_check(dir: &Path, name: &str, text: &str) -> (bool, String) {
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, text).expect("writing a config");
    let out = Command::new(lb_binary())
        .args(["config", "check"])
        .arg(&path)
        .output()
        .expect("running lb config check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Every limit of docs/limits.md, one past it, through `lb config check`: refused, with
/// the limit named.
#[test]
fn over_limit_configs_are_refused_with_their_reasons() {
    let dir = std::env::temp_dir().join(format!("lb-limits-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let base = u32::from(Ipv4Addr::new(10, 8, 0, 0));
    let good = config_with(vec![service("web", 80, 12, backend_list(4096, base))]);
    let (ok, text) = config_check(&dir, "good", &good.to_string());
    assert!(ok, "a config at the limits is accepted: {text}");

    let mut weighted = good.clone();
    weighted["services"][0]["backends"][0]["weight"] = json!(65536);
    let mut slots = good.clone();
    slots["agent"] = json!({ "bucket_slots": 4096 });
    let mut no_slots = good.clone();
    no_slots["agent"] = json!({ "bucket_slots": (1u64 << 26) + 1 });
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "1025 services",
            config_with(
                (0..1025)
                    .map(|i| service(&format!("s{i}"), 1 + i as u16, 4, vec![]))
                    .collect(),
            )
            .to_string(),
            "services: 1025 services, at most 1024",
        ),
        (
            "4097 backends in one service",
            config_with(vec![service("web", 80, 13, backend_list(4097, base))]).to_string(),
            "backends: 4097 backends, at most 4096",
        ),
        (
            "16500 distinct backends over 5 services",
            config_with(
                (0..5u32)
                    .map(|i| {
                        service(
                            &format!("s{i}"),
                            80 + i as u16,
                            12,
                            backend_list(3300, base + i * 3300),
                        )
                    })
                    .collect(),
            )
            .to_string(),
            "services: 16500 distinct backends, at most 16384",
        ),
        (
            "table_bits 21",
            config_with(vec![service("web", 80, 21, vec![])]).to_string(),
            "table_bits: 21 is out of range (4 to 20)",
        ),
        (
            "table_bits 3",
            config_with(vec![service("web", 80, 3, vec![])]).to_string(),
            "table_bits: 3 is out of range (4 to 20)",
        ),
        (
            "17 backends in a table of 16",
            config_with(vec![service("web", 80, 4, backend_list(17, base))]).to_string(),
            "backends: 17 backends do not fit a table of 16 buckets",
        ),
        (
            "weight 65536",
            weighted.to_string(),
            "weight 65536 is above the maximum 65535",
        ),
        (
            "tables larger than agent.bucket_slots",
            slots.to_string(),
            "the tables need 8192 buckets (each double-buffered), agent.bucket_slots is 4096",
        ),
        (
            "agent.bucket_slots 2^26 + 1",
            no_slots.to_string(),
            "agent.bucket_slots: 67108865 is out of range",
        ),
        (
            "truncated JSON",
            good.to_string()[..200].to_string(),
            "EOF while parsing",
        ),
        (
            "unknown field",
            good.to_string()
                .replacen("\"table_bits\"", "\"table_size\"", 1),
            "unknown field `table_size`",
        ),
        (
            "port 65536",
            config_with(vec![service("web", 80, 4, vec![])])
                .to_string()
                .replace("80", "65536"),
            "invalid value: integer `65536`",
        ),
    ];
    let mut failed = Vec::new();
    for (what, text, want) in &cases {
        let (ok, out) = config_check(&dir, "bad", text);
        let first = out.lines().find(|l| l.contains(want)).unwrap_or(out.trim());
        println!("refused: {what}: {}", first.trim());
        if ok || !out.contains(want) {
            failed.push(format!("{what}: ok={ok}, want {want:?}, got:\n{out}"));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

//! Prometheus metrics: a fresh registry per scrape, filled from the agent's status and the
//! health checker's snapshot, served by a minimal read-only HTTP endpoint in the format
//! the scraper asks for: OpenMetrics 1.0 when its `Accept` header prefers it (Prometheus
//! does), the classic text format 0.0.4 otherwise. See docs/metrics.md.

use std::{future::Future, net::IpAddr, sync::Arc, time::Duration};

use futures::future::BoxFuture;
use prometheus_client::{
    encoding::{prometheus_text, text, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge, info::Info},
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tracing::{debug, warn};

use crate::{
    api::{Health, Status},
    health::TargetState,
};

/// The most of a request read: the request line and headers of a scrape fit easily.
const MAX_REQUEST: usize = 8192;
/// How long a client has to send its request and take the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more wait in the listen backlog.
const MAX_CLIENTS: usize = 16;

/// The two exposition formats the endpoint speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0: counter families named without `_total`, ends with `# EOF`.
    OpenMetrics,
    /// Prometheus' classic text format 0.0.4: `# HELP`/`# TYPE` name the samples.
    Text,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Text => prometheus_text::CONTENT_TYPE,
        }
    }

    /// The format for an `Accept` header: OpenMetrics when the client weighs it at least
    /// as high as any form of plain text, the classic text format otherwise (no header,
    /// `*/*`, browsers).
    pub fn negotiate(accept: Option<&str>) -> Format {
        let (mut openmetrics, mut plain) = (0.0f32, 0.0f32);
        for range in accept.unwrap_or("").split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or("").to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
                .map_or(Some(1.0), |(_, v)| v.trim().parse::<f32>().ok())
                .unwrap_or(0.0);
            match media.as_str() {
                "application/openmetrics-text" => openmetrics = openmetrics.max(q),
                "text/plain" | "text/*" | "*/*" => plain = plain.max(q),
                _ => {}
            }
        }
        if openmetrics > 0.0 && openmetrics >= plain {
            Format::OpenMetrics
        } else {
            Format::Text
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
    vip: String,
    port: u16,
    protocol: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceNameLabels {
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceBackendLabels {
    service: String,
    backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FlowHashLabels {
    kind: String,
}

type Counters<L> = Family<L, Counter>;
type Gauges<L> = Family<L, Gauge>;

/// Registers a family and hands it back to be filled.
fn family<M: Default + Clone + prometheus_client::registry::Metric>(
    registry: &mut Registry,
    name: &str,
    help: &str,
) -> M {
    let m = M::default();
    registry.register(name, help, m.clone());
    m
}

/// Traffic a service forwarded to one of its backends: the labels it is exported under
/// and its counters.
pub struct BackendTraffic<'a> {
    pub service: &'a str,
    pub backend: IpAddr,
    pub packets: u64,
    pub bytes: u64,
}

/// The backend traffic counters of `status`, per (service, backend): the data plane
/// counts what each service sends each of its backends, so a service's backend rows add
/// up to its own line. This is the one place that reads backend traffic for metrics.
pub fn backend_traffic(status: &Status) -> Vec<BackendTraffic<'_>> {
    status
        .services
        .iter()
        .flat_map(|s| {
            s.backends.iter().map(move |b| BackendTraffic {
                service: &s.name,
                backend: b.address,
                packets: b.packets,
                bytes: b.bytes,
            })
        })
        .collect()
}

/// The agent's version, as `lb_agent_build_info` reports it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The metrics of `status` and `health` in `format`. Every family is registered on every
/// scrape, with or without samples, so the page always names the same metrics.
pub fn render(status: &Status, health: &[TargetState], format: Format) -> String {
    let mut r = Registry::with_prefix("lb");
    let svc_packets: Counters<ServiceLabels> =
        family(&mut r, "service_packets", "Packets forwarded for a service");
    let svc_bytes: Counters<ServiceLabels> =
        family(&mut r, "service_bytes", "Bytes forwarded for a service");
    let be_packets: Counters<ServiceBackendLabels> = family(
        &mut r,
        "backend_packets",
        "Packets a service forwarded to a backend",
    );
    let be_bytes: Counters<ServiceBackendLabels> = family(
        &mut r,
        "backend_bytes",
        "Bytes a service forwarded to a backend",
    );
    let be_up: Gauges<ServiceBackendLabels> = family(
        &mut r,
        "backend_up",
        "1 when the backend is healthy or unchecked, 0 when its health check failed",
    );
    let be_checked: Gauges<ServiceBackendLabels> = family(
        &mut r,
        "backend_checked",
        "1 when the backend has a health check",
    );
    let be_weight: Gauges<ServiceBackendLabels> =
        family(&mut r, "backend_weight", "Configured weight of the backend");
    let be_drain: Gauges<ServiceBackendLabels> = family(
        &mut r,
        "backend_drain",
        "1 when the backend is draining (no new connections)",
    );
    let be_buckets: Gauges<ServiceBackendLabels> = family(
        &mut r,
        "backend_buckets",
        "Buckets of the service's live table the backend owns (first hop)",
    );
    let table_buckets: Gauges<ServiceNameLabels> =
        family(&mut r, "table_buckets", "Buckets in the service's table");
    let table_digest: Gauges<ServiceNameLabels> = family(
        &mut r,
        "table_digest",
        "Fingerprint of the service's live table; equal on nodes that forward alike",
    );
    let moved: Counters<ServiceNameLabels> = family(
        &mut r,
        "table_moved_buckets",
        "Buckets whose first hop changed in table rebuilds",
    );
    let reasons: Counters<ReasonLabels> = family(
        &mut r,
        "dataplane_packets",
        "Data-plane packets by what happened to them (docs/counters.md)",
    );
    let rebuilds: Counter = family(&mut r, "table_rebuilds", "Forwarding tables rebuilt");
    let checks: Counters<ServiceBackendLabels> =
        family(&mut r, "health_checks", "Health checks done");
    let check_failures: Counters<ServiceBackendLabels> =
        family(&mut r, "health_check_failures", "Health checks that failed");
    let transitions: Counters<ServiceBackendLabels> = family(
        &mut r,
        "health_transitions",
        "Times a backend went up or down by its health check",
    );
    let fleet = crate::fleet::status::FleetMetrics::register(&mut r);
    r.register(
        "agent_build",
        "The running agent's version",
        Info::new(BuildLabels {
            version: VERSION.to_string(),
        }),
    );
    r.register(
        "flow_hash",
        "The flow hash the data plane runs with (node.flow_hash); the same on every LB node \
         of a site",
        Info::new(FlowHashLabels {
            kind: status.flow_hash.name().to_string(),
        }),
    );

    for s in &status.services {
        let labels = ServiceLabels {
            service: s.name.clone(),
            vip: s.vip.to_string(),
            port: s.port,
            protocol: s.protocol.to_string(),
        };
        svc_packets.get_or_create(&labels).inc_by(s.packets);
        svc_bytes.get_or_create(&labels).inc_by(s.bytes);
        let name = ServiceNameLabels {
            service: s.name.clone(),
        };
        table_buckets
            .get_or_create(&name)
            .set(1i64 << s.table_bits.min(62));
        // 53 bits: exact in the float a sample carries.
        table_digest
            .get_or_create(&name)
            .set(i64::try_from(s.table_digest & ((1 << 53) - 1)).unwrap_or(0));
        moved.get_or_create(&name).inc_by(s.moved_buckets);
        for b in &s.backends {
            let l = ServiceBackendLabels {
                service: s.name.clone(),
                backend: b.address.to_string(),
            };
            be_up
                .get_or_create(&l)
                .set(i64::from(b.health != Health::Down));
            be_checked
                .get_or_create(&l)
                .set(i64::from(b.health != Health::Unchecked));
            be_weight.get_or_create(&l).set(i64::from(b.weight));
            be_drain.get_or_create(&l).set(i64::from(b.drain));
            be_buckets.get_or_create(&l).set(i64::from(b.buckets));
        }
    }
    for t in backend_traffic(status) {
        let l = ServiceBackendLabels {
            service: t.service.to_string(),
            backend: t.backend.to_string(),
        };
        be_packets.get_or_create(&l).inc_by(t.packets);
        be_bytes.get_or_create(&l).inc_by(t.bytes);
    }
    for c in &status.reasons {
        let l = ReasonLabels {
            reason: c.reason.clone(),
        };
        reasons.get_or_create(&l).inc_by(c.packets);
    }
    rebuilds.inc_by(status.table_rebuilds);
    if let Some(f) = &status.fleet {
        fleet.set(f);
    }
    for t in health {
        let l = ServiceBackendLabels {
            service: t.service.clone(),
            backend: t.backend.to_string(),
        };
        checks.get_or_create(&l).inc_by(t.checks);
        check_failures.get_or_create(&l).inc_by(t.failures);
        transitions.get_or_create(&l).inc_by(t.transitions);
    }

    load_families(&mut r, status);

    let mut out = String::new();
    match format {
        Format::OpenMetrics => text::encode(&mut out, &r),
        Format::Text => prometheus_text::encode(&mut out, &r),
    }
    .expect("writing to a String cannot fail");
    out
}

/// The load controller's families (docs/load.md): effective weight and utilisation of
/// the backends of services that follow load, and the loop's own state.
fn load_families(r: &mut Registry, status: &Status) {
    type FloatGauges<L> = Family<L, Gauge<f64, std::sync::atomic::AtomicU64>>;
    let effective: Gauges<ServiceBackendLabels> = family(
        r,
        "backend_effective_weight",
        "Weight the table is built from: the configured one corrected by load",
    );
    let utilisation: FloatGauges<ServiceBackendLabels> = family(
        r,
        "backend_utilisation",
        "The backend's smoothed utilisation as the load controller used it (1 = saturated)",
    );
    let frozen: Gauge = family(r, "load_frozen", "1 when the load loop is frozen");
    let leader: Gauge = family(
        r,
        "load_leader",
        "1 when this node runs the fleet's load loop (its elected leader)",
    );
    let changes: Counter = family(
        r,
        "load_weight_changes",
        "Effective weights the load loop changed",
    );
    for s in &status.services {
        for b in &s.backends {
            let Some(l) = &b.load else { continue };
            let labels = ServiceBackendLabels {
                service: s.name.clone(),
                backend: b.address.to_string(),
            };
            effective
                .get_or_create(&labels)
                .set(i64::from(l.effective_weight));
            if let Some(u) = l.utilisation {
                utilisation.get_or_create(&labels).set(u);
            }
        }
    }
    if let Some(l) = &status.load {
        frozen.set(i64::from(l.frozen));
        changes.inc_by(l.changes);
        let this = status.fleet.as_ref().and_then(|f| f.this_node.as_ref());
        leader.set(i64::from(l.leader.is_some() && l.leader.as_ref() == this));
    }
}

/// Serves `GET /metrics` (and `HEAD`) on `listener` with the page `source` renders at each
/// scrape in the negotiated format; other paths get 404, other methods 405. One request per connection. Runs until
/// the task is dropped; errors of single connections are logged, not returned.
pub async fn serve<F>(listener: TcpListener, source: F)
where
    F: Fn(Format) -> BoxFuture<'static, String> + Send + Sync + 'static,
{
    serve_with(listener, source, CLIENT_TIMEOUT).await
}

async fn serve_with<F>(listener: TcpListener, source: F, timeout: Duration)
where
    F: Fn(Format) -> BoxFuture<'static, String> + Send + Sync + 'static,
{
    let source = Arc::new(source);
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors and the like: pause rather than spin.
                warn!("metrics: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let source = source.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = bounded(timeout, respond(stream, &*source)).await {
                debug!(%peer, "metrics: {e}");
            }
        });
    }
}

async fn bounded<T>(
    timeout: Duration,
    f: impl Future<Output = std::io::Result<T>>,
) -> std::io::Result<T> {
    tokio::time::timeout(timeout, f)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "client timed out"))?
}

/// Reads one request head and answers it.
async fn respond<F>(mut stream: TcpStream, source: &F) -> std::io::Result<()>
where
    F: Fn(Format) -> BoxFuture<'static, String>,
{
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let head_len = loop {
        if let Some(end) = head_end(&buf) {
            break end;
        }
        if buf.len() >= MAX_REQUEST {
            let answer = Answer::error(431, "Request Header Fields Too Large");
            return answer.send(&mut stream, true).await;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    match scrape(&buf[..head_len]) {
        Ok(Scrape { head_only, format }) => {
            let headers = format!(
                "Content-Type: {}\r\nVary: Accept\r\n",
                format.content_type()
            );
            let answer = Answer::new(200, "OK", headers, source(format).await.into_bytes());
            answer.send(&mut stream, !head_only).await
        }
        Err(answer) => answer.send(&mut stream, true).await,
    }
}

/// A valid scrape request.
#[derive(Debug, PartialEq)]
struct Scrape {
    head_only: bool,
    format: Format,
}

/// Judges a request head: a scrape, or the error answer it gets.
fn scrape(head: &[u8]) -> Result<Scrape, Answer> {
    let bad = || Answer::error(400, "Bad Request");
    let head = std::str::from_utf8(head).map_err(|_| bad())?;
    let mut lines = head.lines();
    let mut words = lines.next().unwrap_or("").split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return Err(bad());
    };
    if !version.starts_with("HTTP/1.") {
        return Err(bad());
    }
    if target.split('?').next() != Some("/metrics") {
        return Err(Answer::error(404, "Not Found"));
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => {
            let mut answer = Answer::error(405, "Method Not Allowed");
            answer.headers.push_str("Allow: GET, HEAD\r\n");
            return Err(answer);
        }
    };
    let accept = lines.find_map(|l| {
        l.split_once(':')
            .filter(|(name, _)| name.trim().eq_ignore_ascii_case("accept"))
            .map(|(_, value)| value)
    });
    Ok(Scrape {
        head_only,
        format: Format::negotiate(accept),
    })
}

/// The length of the request head up to and including its blank line.
fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    crlf.into_iter().chain(lf).min()
}

/// An HTTP response; sending it closes the connection.
#[derive(Debug, PartialEq)]
struct Answer {
    code: u16,
    text: &'static str,
    headers: String,
    body: Vec<u8>,
}

impl Answer {
    fn new(code: u16, text: &'static str, headers: String, body: Vec<u8>) -> Self {
        Answer {
            code,
            text,
            headers,
            body,
        }
    }

    fn error(code: u16, text: &'static str) -> Self {
        let body = format!("{code} {text}\n").into_bytes();
        let headers = "Content-Type: text/plain; charset=utf-8\r\n".into();
        Answer::new(code, text, headers, body)
    }

    /// Writes the answer, its body unless `with_body` is false (HEAD).
    async fn send(&self, stream: &mut TcpStream, with_body: bool) -> std::io::Result<()> {
        let head = format!(
            "HTTP/1.1 {} {}\r\n{}Content-Length: {}\r\nConnection: close\r\n\r\n",
            self.code,
            self.text,
            self.headers,
            self.body.len()
        );
        stream.write_all(head.as_bytes()).await?;
        if with_body {
            stream.write_all(&self.body).await?;
        }
        stream.shutdown().await?;
        // Take what the client still sends (an unread body, the rest of an oversized
        // head) until it closes: closing with unread data would reset the connection and
        // could destroy the answer in flight. Bounded here and by the client timeout.
        let mut sink = [0u8; 1024];
        let mut left = MAX_REQUEST * 8;
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        api::{BackendStatus, ReasonCount, ServiceStatus},
        config::Protocol,
    };

    fn backend(address: &str, health: Health, packets: u64) -> BackendStatus {
        // Through JSON so that fields this module does not read can come and go.
        serde_json::from_value(serde_json::json!({
            "address": address, "weight": 100, "drain": false, "health": health,
            "buckets": 32768, "packets": packets, "bytes": packets * 100,
            "checks": 0, "check_failures": 0, "health_transitions": 0,
        }))
        .unwrap()
    }

    fn status() -> Status {
        let mut drained = backend("10.0.4.2", Health::Down, 3);
        drained.drain = true;
        drained.weight = 7;
        Status {
            services: vec![
                ServiceStatus {
                    name: "web".into(),
                    vip: "10.100.0.1".parse().unwrap(),
                    port: 80,
                    protocol: Protocol::Tcp,
                    table_bits: 16,
                    packets: 13,
                    bytes: 1300,
                    moved_buckets: 13104,
                    table_digest: 0x1234_5678_9abc,
                    backends: vec![backend("10.0.3.2", Health::Up, 10), drained],
                },
                ServiceStatus {
                    name: "dns".into(),
                    vip: "2001:db8::53".parse().unwrap(),
                    port: 53,
                    protocol: Protocol::Udp,
                    table_bits: 16,
                    packets: 0,
                    bytes: 0,
                    moved_buckets: 0,
                    table_digest: 0,
                    // Shared with "web", which sent it everything.
                    backends: vec![backend("10.0.3.2", Health::Unchecked, 0)],
                },
            ],
            reasons: vec![ReasonCount {
                reason: "forwarded".into(),
                packets: 42,
            }],
            table_rebuilds: 5,
            ..Status::default()
        }
    }

    fn health() -> Vec<TargetState> {
        vec![TargetState {
            service: "web".into(),
            backend: "10.0.4.2".parse().unwrap(),
            up: false,
            checks: 9,
            failures: 4,
            transitions: 1,
            last_reason: "HTTP 503".into(),
            last_failure: "HTTP 503".into(),
        }]
    }

    /// Samples both formats carry alike.
    const PAGE: &[&str] = &[
        r#"lb_service_packets_total{service="web",vip="10.100.0.1",port="80",protocol="tcp"} 13"#,
        r#"lb_service_bytes_total{service="dns",vip="2001:db8::53",port="53",protocol="udp"} 0"#,
        r#"lb_backend_packets_total{service="web",backend="10.0.3.2"} 10"#,
        r#"lb_backend_bytes_total{service="web",backend="10.0.4.2"} 300"#,
        r#"lb_backend_packets_total{service="dns",backend="10.0.3.2"} 0"#,
        r#"lb_backend_up{service="web",backend="10.0.3.2"} 1"#,
        r#"lb_backend_up{service="web",backend="10.0.4.2"} 0"#,
        r#"lb_backend_up{service="dns",backend="10.0.3.2"} 1"#,
        r#"lb_backend_checked{service="dns",backend="10.0.3.2"} 0"#,
        r#"lb_backend_checked{service="web",backend="10.0.4.2"} 1"#,
        r#"lb_backend_weight{service="web",backend="10.0.4.2"} 7"#,
        r#"lb_backend_drain{service="web",backend="10.0.4.2"} 1"#,
        r#"lb_backend_drain{service="web",backend="10.0.3.2"} 0"#,
        r#"lb_backend_buckets{service="dns",backend="10.0.3.2"} 32768"#,
        r#"lb_table_buckets{service="web"} 65536"#,
        r#"lb_table_digest{service="web"} 20015998343868"#,
        r#"lb_table_moved_buckets_total{service="web"} 13104"#,
        r#"lb_dataplane_packets_total{reason="forwarded"} 42"#,
        "lb_table_rebuilds_total 5",
        r#"lb_health_checks_total{service="web",backend="10.0.4.2"} 9"#,
        r#"lb_health_check_failures_total{service="web",backend="10.0.4.2"} 4"#,
        r#"lb_health_transitions_total{service="web",backend="10.0.4.2"} 1"#,
        r#"lb_flow_hash_info{kind="murmur3"} 1"#,
        concat!(
            r#"lb_agent_build_info{version=""#,
            env!("CARGO_PKG_VERSION"),
            r#""} 1"#
        ),
    ];

    fn assert_page(text: &str) {
        let lines: Vec<&str> = text.lines().collect();
        for want in PAGE {
            assert!(lines.contains(want), "missing {want:?} in:\n{text}");
        }
    }

    #[test]
    fn openmetrics_names_counter_families_without_total() {
        let text = render(&status(), &health(), Format::OpenMetrics);
        assert_page(&text);
        assert!(
            text.contains("\n# TYPE lb_service_packets counter\n"),
            "{text}"
        );
        assert!(text.contains("\n# TYPE lb_agent_build info\n"), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn classic_text_names_every_sample_in_help_and_type() {
        let text = render(&status(), &health(), Format::Text);
        assert_page(&text);
        for want in [
            "# HELP lb_service_packets_total Packets forwarded for a service.",
            "# TYPE lb_service_packets_total counter",
            "# TYPE lb_agent_build_info gauge",
        ] {
            assert!(
                text.contains(&format!("{want}\n")),
                "missing {want:?}:\n{text}"
            );
        }
        assert!(!text.contains("# EOF"), "{text}");
    }

    #[test]
    fn render_of_nothing_is_a_valid_page() {
        let text = render(&Status::default(), &[], Format::OpenMetrics);
        assert!(text.contains("lb_table_rebuilds_total 0\n"), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn accept_header_picks_the_format() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
                          version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::negotiate(Some(prometheus)), Format::OpenMetrics);
        assert_eq!(Format::negotiate(None), Format::Text);
        assert_eq!(Format::negotiate(Some("*/*")), Format::Text);
        assert_eq!(
            Format::negotiate(Some("text/html,application/xhtml+xml,*/*;q=0.8")),
            Format::Text
        );
        assert_eq!(
            Format::negotiate(Some("text/plain, application/openmetrics-text;q=0.5")),
            Format::Text
        );
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text; q=0, */*")),
            Format::Text
        );
        assert_eq!(
            Format::negotiate(Some("Application/OpenMetrics-Text")),
            Format::OpenMetrics
        );
    }

    async fn server() -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let source = |format| -> BoxFuture<'static, String> {
            Box::pin(async move { render(&status(), &health(), format) })
        };
        tokio::spawn(serve_with(listener, source, Duration::from_millis(200)));
        addr
    }

    /// Sends `request` raw and reads the whole answer.
    async fn fetch(addr: std::net::SocketAddr, request: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut answer))
            .await
            .expect("an answer in time")
            .unwrap();
        String::from_utf8(answer).unwrap()
    }

    #[tokio::test]
    async fn serves_metrics_and_nothing_else() {
        let addr = server().await;

        let a = fetch(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let (head, body) = a.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.contains("\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8"));
        assert!(head.contains(&format!("\r\nContent-Length: {}\r\n", body.len())));
        assert!(body.contains("lb_table_rebuilds_total 5\n"), "{body}");
        assert!(!body.contains("# EOF"), "{body}");

        let a = fetch(
            addr,
            "GET /metrics?x=1 HTTP/1.1\r\nAccept: application/openmetrics-text;version=1.0.0,\
             text/plain;q=0.5\r\n\r\n",
        )
        .await;
        assert!(a.contains("\r\nContent-Type: application/openmetrics-text; version=1.0.0"));
        assert!(a.ends_with("# EOF\n"), "{a}");

        let a = fetch(addr, "HEAD /metrics HTTP/1.0\r\n\r\n").await;
        assert!(
            a.starts_with("HTTP/1.1 200 OK\r\n") && a.ends_with("\r\n\r\n"),
            "{a}"
        );

        let a = fetch(addr, "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").await;
        assert!(a.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"), "{a}");
        assert!(a.contains("\r\nAllow: GET, HEAD\r\n"), "{a}");

        let a = fetch(addr, "GET / HTTP/1.1\r\n\r\n").await;
        assert!(a.starts_with("HTTP/1.1 404 Not Found\r\n"), "{a}");

        let a = fetch(addr, "nonsense\r\n\r\n").await;
        assert!(a.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{a}");

        let huge = format!(
            "GET /metrics HTTP/1.1\r\nX: {}\r\n",
            "a".repeat(MAX_REQUEST)
        );
        let a = fetch(addr, &huge).await;
        assert!(a.starts_with("HTTP/1.1 431 "), "{a}");
    }

    #[tokio::test]
    async fn a_silent_client_is_dropped_and_others_still_served() {
        let addr = server().await;
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let a = fetch(addr, "GET /metrics HTTP/1.1\r\n\r\n").await;
        assert!(a.starts_with("HTTP/1.1 200 OK\r\n"));
        let mut buf = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(2), silent.read_to_end(&mut buf))
            .await
            .expect("closed after the client timeout")
            .unwrap();
        assert_eq!(n, 0);
    }
}

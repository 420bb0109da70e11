//! Prometheus metrics: a fresh registry per scrape, filled from the agent's status and the
//! health checker's snapshot, served by a minimal read-only HTTP endpoint.

use std::{future::Future, sync::Arc, time::Duration};

use futures::future::BoxFuture;
use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
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

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
    vip: String,
    port: u16,
    protocol: String,
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

/// The metrics of `status` and `health` in the OpenMetrics text format (which Prometheus'
/// classic text parser reads as well). Counter names get the `_total` suffix.
pub fn render(status: &Status, health: &[TargetState]) -> String {
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
        "Buckets of the service's live table the backend owns",
    );
    let reasons: Counters<ReasonLabels> = family(
        &mut r,
        "dataplane_packets",
        "Data-plane packets by what happened to them",
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

    for s in &status.services {
        let labels = ServiceLabels {
            service: s.name.clone(),
            vip: s.vip.to_string(),
            port: s.port,
            protocol: s.protocol.to_string(),
        };
        svc_packets.get_or_create(&labels).inc_by(s.packets);
        svc_bytes.get_or_create(&labels).inc_by(s.bytes);
        for b in &s.backends {
            let l = ServiceBackendLabels {
                service: s.name.clone(),
                backend: b.address.to_string(),
            };
            be_up
                .get_or_create(&l)
                .set(i64::from(b.health != Health::Down));
            be_weight.get_or_create(&l).set(i64::from(b.weight));
            be_drain.get_or_create(&l).set(i64::from(b.drain));
            be_buckets.get_or_create(&l).set(i64::from(b.buckets));
            be_packets.get_or_create(&l).inc_by(b.packets);
            be_bytes.get_or_create(&l).inc_by(b.bytes);
        }
    }
    for c in &status.reasons {
        let l = ReasonLabels {
            reason: c.reason.clone(),
        };
        reasons.get_or_create(&l).inc_by(c.packets);
    }
    rebuilds.inc_by(status.table_rebuilds);
    for t in health {
        let l = ServiceBackendLabels {
            service: t.service.clone(),
            backend: t.backend.to_string(),
        };
        checks.get_or_create(&l).inc_by(t.checks);
        check_failures.get_or_create(&l).inc_by(t.failures);
        transitions.get_or_create(&l).inc_by(t.transitions);
    }

    let mut out = String::new();
    encode(&mut out, &r).expect("writing to a String cannot fail");
    out
}

/// Serves `GET /metrics` (and `HEAD`) on `listener` with the text `source` gives at each
/// scrape; other paths get 404, other methods 405. One request per connection. Runs until
/// the task is dropped; errors of single connections are logged, not returned.
pub async fn serve<F>(listener: TcpListener, source: F)
where
    F: Fn() -> BoxFuture<'static, String> + Send + Sync + 'static,
{
    serve_with(listener, source, CLIENT_TIMEOUT).await
}

async fn serve_with<F>(listener: TcpListener, source: F, timeout: Duration)
where
    F: Fn() -> BoxFuture<'static, String> + Send + Sync + 'static,
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
    F: Fn() -> BoxFuture<'static, String>,
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
        Ok(Scrape {
            head_only,
            content_type,
        }) => {
            let headers = format!("Content-Type: {content_type}\r\n");
            let answer = Answer::new(200, "OK", headers, source().await.into_bytes());
            answer.send(&mut stream, !head_only).await
        }
        Err(answer) => answer.send(&mut stream, true).await,
    }
}

/// A valid scrape request.
#[derive(Debug, PartialEq)]
struct Scrape {
    head_only: bool,
    content_type: &'static str,
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
    // Prometheus asks for OpenMetrics, which is what is rendered; anyone else gets the
    // classic type, whose parsers read the same text, and browsers show it.
    let openmetrics = lines.any(|l| {
        l.split_once(':').is_some_and(|(name, value)| {
            name.eq_ignore_ascii_case("accept") && value.contains("application/openmetrics-text")
        })
    });
    Ok(Scrape {
        head_only,
        content_type: if openmetrics {
            OPENMETRICS
        } else {
            PROMETHEUS_TEXT
        },
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
                    // Shared with "web", which sent it everything.
                    backends: vec![backend("10.0.3.2", Health::Unchecked, 0)],
                },
            ],
            reasons: vec![ReasonCount {
                reason: "forwarded".into(),
                packets: 42,
            }],
            table_rebuilds: 5,
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
        }]
    }

    const PAGE: &[&str] = &[
        "# TYPE lb_service_packets counter",
        r#"lb_service_packets_total{service="web",vip="10.100.0.1",port="80",protocol="tcp"} 13"#,
        r#"lb_service_bytes_total{service="dns",vip="2001:db8::53",port="53",protocol="udp"} 0"#,
        r#"lb_backend_packets_total{service="web",backend="10.0.3.2"} 10"#,
        r#"lb_backend_bytes_total{service="web",backend="10.0.4.2"} 300"#,
        r#"lb_backend_packets_total{service="dns",backend="10.0.3.2"} 0"#,
        "# TYPE lb_backend_up gauge",
        r#"lb_backend_up{service="web",backend="10.0.3.2"} 1"#,
        r#"lb_backend_up{service="web",backend="10.0.4.2"} 0"#,
        r#"lb_backend_up{service="dns",backend="10.0.3.2"} 1"#,
        r#"lb_backend_weight{service="web",backend="10.0.4.2"} 7"#,
        r#"lb_backend_drain{service="web",backend="10.0.4.2"} 1"#,
        r#"lb_backend_drain{service="web",backend="10.0.3.2"} 0"#,
        r#"lb_backend_buckets{service="dns",backend="10.0.3.2"} 32768"#,
        r#"lb_dataplane_packets_total{reason="forwarded"} 42"#,
        "lb_table_rebuilds_total 5",
        r#"lb_health_checks_total{service="web",backend="10.0.4.2"} 9"#,
        r#"lb_health_check_failures_total{service="web",backend="10.0.4.2"} 4"#,
        r#"lb_health_transitions_total{service="web",backend="10.0.4.2"} 1"#,
    ];

    #[test]
    fn render_has_every_metric() {
        let text = render(&status(), &health());
        let lines: Vec<&str> = text.lines().collect();
        for want in PAGE {
            assert!(lines.contains(want), "missing {want:?} in:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn render_of_nothing_is_a_valid_page() {
        let text = render(&Status::default(), &[]);
        assert!(text.contains("lb_table_rebuilds_total 0\n"), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }

    async fn server() -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let source =
            || -> BoxFuture<'static, String> { Box::pin(async { render(&status(), &health()) }) };
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

        let a = fetch(
            addr,
            "GET /metrics?x=1 HTTP/1.1\r\nAccept: application/openmetrics-text;version=1.0.0,\
             text/plain;q=0.5\r\n\r\n",
        )
        .await;
        assert!(a.contains("\r\nContent-Type: application/openmetrics-text; version=1.0.0"));

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

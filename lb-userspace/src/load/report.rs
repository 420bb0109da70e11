//! Load reports: a backend's agent samples its utilisation (`measure::Meter`) and serves
//! the latest figure as JSON at `GET /load` on `load.report.listen`; an LB node's agent
//! fetches it from every backend of the services it drives.
//!
//! A report carries its age on the backend's own clock rather than a time of day alone,
//! so the LB node dates it without trusting the two clocks to agree.

use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::{body::Bytes, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use super::{config::ReportConfig, law, measure::Meter};

/// A report as it travels.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct Wire {
    /// Busy over available CPU time, 1.0 = saturated.
    pub utilisation: f64,
    /// What was measured: `host`, `cgroup lb/web`, `file /run/app/load`.
    pub source: String,
    /// When it was measured, milliseconds since the Unix epoch (for people).
    pub measured_unix_ms: u64,
    /// How long before this answer it was measured, milliseconds (for the LB node).
    pub age_ms: u64,
}

impl Wire {
    /// The report of a sample taken at `at` (`wall` on the wall clock), as of now.
    pub fn of(utilisation: f64, source: &str, at: Instant, wall: SystemTime) -> Self {
        Wire {
            utilisation,
            source: source.to_string(),
            measured_unix_ms: wall
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            age_ms: at.elapsed().as_millis() as u64,
        }
    }
}

/// The latest sample (figure, when on both clocks), shared by the sampler, the listener
/// and the publisher.
pub type Latest = Arc<Mutex<Option<(f64, Instant, SystemTime)>>>;

/// Starts sampling `config.source` and serving it; fails when the address is taken.
pub async fn serve(config: &ReportConfig) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding load.report.listen {}", config.listen))?;
    let source = describe(&config.source);
    info!(addr = %config.listen, %source, "serving load reports");
    let latest: Latest = Arc::default();
    tokio::spawn(sample(
        Meter::new(config.source.clone()),
        Duration::from_millis(config.interval_ms),
        latest.clone(),
    ));
    if let Some(fleet) = &config.fleet {
        tokio::spawn(super::fleet::publish(
            fleet.clone(),
            source.clone(),
            latest.clone(),
            Duration::from_millis(config.interval_ms),
        ));
    }
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    warn!("load reports: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (latest, source) = (latest.clone(), source.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let answer = answer(&req, &latest, &source);
                    async move { Ok::<_, Infallible>(answer) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc);
                if let Err(e) = tokio::time::timeout(Duration::from_secs(10), conn).await {
                    debug!(%peer, "load reports: {e}");
                }
            });
        }
    });
    Ok(())
}

/// A source as the report names it.
pub fn describe(s: &super::measure::Source) -> String {
    use super::measure::Source;
    match s {
        Source::Host => "host".into(),
        Source::Cgroup(c) => format!("cgroup {c}"),
        Source::File(p) => format!("file {}", p.display()),
    }
}

/// Samples the meter every `every`; a failure is logged once until it recovers.
async fn sample(mut meter: Meter, every: Duration, latest: Latest) {
    let mut tick = tokio::time::interval(every);
    let mut failing = false;
    loop {
        tick.tick().await;
        match meter.sample() {
            Ok(Some(u)) => {
                *latest.lock().expect("not poisoned") =
                    Some((u, Instant::now(), SystemTime::now()));
                if failing {
                    info!("load: measuring works again");
                    failing = false;
                }
            }
            Ok(None) => {}
            Err(e) => {
                if !failing {
                    warn!("load: measuring failed (no report is served until it works): {e}");
                    failing = true;
                }
                *latest.lock().expect("not poisoned") = None;
            }
        }
    }
}

fn answer(
    req: &Request<hyper::body::Incoming>,
    latest: &Latest,
    source: &str,
) -> Response<Full<Bytes>> {
    let reply = |code: StatusCode, ctype: &str, body: String| {
        Response::builder()
            .status(code)
            .header("Content-Type", ctype)
            .body(Full::new(Bytes::from(body)))
            .expect("a valid response")
    };
    if req.uri().path() != "/load" {
        return reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "404 Not Found\n".into(),
        );
    }
    if req.method() != hyper::Method::GET {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "405 Method Not Allowed\n".into(),
        );
    }
    let Some((u, at, wall)) = *latest.lock().expect("not poisoned") else {
        return reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "503 no measurement yet\n".into(),
        );
    };
    let body = serde_json::to_string(&Wire::of(u, source, at, wall)).expect("a report serializes");
    reply(StatusCode::OK, "application/json", body)
}

/// Fetches `backend`'s report from `http://BACKEND:PORT/load`, within `timeout`, and
/// dates it on this node's clock.
pub async fn fetch(backend: IpAddr, port: u16, timeout: Duration) -> Result<law::Report> {
    let asked = Instant::now();
    let wire = tokio::time::timeout(timeout, get(SocketAddr::new(backend, port)))
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {timeout:?}"))??;
    if !wire.utilisation.is_finite() {
        bail!("utilisation {} is not a number", wire.utilisation);
    }
    let age = Duration::from_millis(wire.age_ms);
    Ok(law::Report {
        utilisation: wire.utilisation.max(0.0),
        at: asked.checked_sub(age).unwrap_or(asked),
    })
}

async fn get(addr: SocketAddr) -> Result<Wire> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = Request::get("/load")
        .header("Host", addr.to_string())
        .body(http_body_util::Empty::<Bytes>::new())?;
    let resp = send.send_request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        bail!("{status}: {}", String::from_utf8_lossy(&body).trim());
    }
    serde_json::from_slice(&body).context("not a load report")
}

/// What the LB node fetches, and how often.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Targets {
    pub backends: Vec<IpAddr>,
    pub port: u16,
    pub period: Duration,
    pub timeout: Duration,
}

/// A round of fetched reports: each backend's, or why it has none.
pub type Round = Vec<(IpAddr, Result<law::Report, String>)>;

/// Every period, fetches the reports of `targets`' backends at once and sends the round;
/// nothing while there are none to fetch. Ends when the receiver is gone.
pub async fn fetch_loop(
    mut targets: tokio::sync::watch::Receiver<Targets>,
    rounds: tokio::sync::mpsc::Sender<Round>,
) {
    loop {
        let t = targets.borrow_and_update().clone();
        if t.backends.is_empty() || t.period.is_zero() {
            if targets.changed().await.is_err() {
                return;
            }
            continue;
        }
        let started = tokio::time::Instant::now();
        let round = futures::future::join_all(t.backends.iter().map(|b| async {
            let r = fetch(*b, t.port, t.timeout).await;
            (*b, r.map_err(|e| format!("{e:#}")))
        }))
        .await;
        if rounds.send(round).await.is_err() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(started + t.period) => {}
            r = targets.changed() => if r.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::measure::Source;

    #[tokio::test]
    async fn a_served_report_is_fetched_and_dated() {
        let dir = std::env::temp_dir().join(format!("lb-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("load");
        std::fs::write(&file, "0.42\n").unwrap();
        // A free port on loopback.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = ReportConfig {
            source: Source::File(file),
            listen: SocketAddr::from(([127, 0, 0, 1], port)),
            interval_ms: 20,
            fleet: None,
        };
        serve(&config).await.unwrap();
        assert!(serve(&config).await.is_err(), "the address is taken");
        let local: IpAddr = "127.0.0.1".parse().unwrap();
        let mut report = None;
        for _ in 0..100 {
            if let Ok(r) = fetch(local, port, Duration::from_secs(1)).await {
                report = Some(r);
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let r = report.expect("a report within a second");
        assert!((r.utilisation - 0.42).abs() < 1e-9);
        assert!(r.at <= Instant::now() && r.at.elapsed() < Duration::from_secs(1));
        let wire = get(SocketAddr::new(local, port)).await.unwrap();
        assert_eq!(wire.source, format!("file {}", dir.join("load").display()));
        // Nothing listening: an error, not a report.
        drop(std::fs::remove_dir_all(&dir));
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let closed_port = closed.local_addr().unwrap().port();
        drop(closed);
        assert!(fetch(local, closed_port, Duration::from_secs(1))
            .await
            .is_err());
    }
}

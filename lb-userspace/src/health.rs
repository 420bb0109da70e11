//! Backend health checks: one tokio task per (service, backend) running a TCP connect or an
//! HTTP GET every interval, with a rise/fall state machine. Transitions are logged and sent
//! as [`HealthEvent`]s; [`Checker::snapshot`] is the source of truth for the current state.

use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc,
    task::JoinHandle,
    time::MissedTickBehavior,
};
use tracing::{debug, info, warn};

pub use self::tunnel::Tunnel;
use crate::config::{CheckKind, HealthConfig};

mod tunnel;

/// The most of an HTTP answer read to find its status line.
const MAX_STATUS_LINE: usize = 1024;

/// What to check: a backend of a service.
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    pub service: String,
    pub backend: IpAddr,
    /// The port to check: `config.port` when set, else the service port.
    pub port: u16,
    pub config: HealthConfig,
    /// The state a new target starts in. Up, except for a backend the running data
    /// plane already had out of its table: it must pass `rise` checks to come back.
    pub initially_up: bool,
    /// Check through the tunnel, as client packets travel (`health.tunnel`).
    pub tunnel: Option<Tunnel>,
}

impl Target {
    /// A target for `backend` of a service listening on `service_port`.
    pub fn new(service: &str, backend: IpAddr, service_port: u16, config: HealthConfig) -> Self {
        Target {
            service: service.to_owned(),
            backend,
            port: config.port.unwrap_or(service_port),
            config,
            initially_up: true,
            tunnel: None,
        }
    }
}

/// A backend went up or down.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthEvent {
    pub service: String,
    pub backend: IpAddr,
    pub up: bool,
    /// The result of the check that made the transition ("connect refused", "HTTP 503").
    pub reason: String,
}

/// A target's state and counters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetState {
    pub service: String,
    pub backend: IpAddr,
    pub up: bool,
    pub checks: u64,
    pub failures: u64,
    pub transitions: u64,
    /// The result of the last check; empty before the first one.
    pub last_reason: String,
    /// The result of the last failed check; empty before the first failure.
    pub last_failure: String,
}

type Key = (String, IpAddr);

/// Runs the health checks of a set of targets. Dropping it stops them all.
pub struct Checker {
    events: mpsc::Sender<HealthEvent>,
    running: Mutex<HashMap<Key, Running>>,
}

struct Running {
    port: u16,
    tunnel: Option<Tunnel>,
    config: HealthConfig,
    progress: Arc<Mutex<Progress>>,
    task: JoinHandle<()>,
}

/// Per-target state shared between its task and [`Checker::snapshot`].
#[derive(Debug)]
struct Progress {
    state: TargetState,
    /// Results in a row that disagree with `state.up`.
    streak: u32,
}

impl Progress {
    fn new(service: &str, backend: IpAddr, up: bool) -> Self {
        Progress {
            state: TargetState {
                service: service.to_owned(),
                backend,
                // Up until checks say otherwise (see `Target::initially_up`): a restarted
                // agent must not take backends out of the tables before it has checked them.
                up,
                checks: 0,
                failures: 0,
                transitions: 0,
                last_reason: String::new(),
                last_failure: String::new(),
            },
            streak: 0,
        }
    }

    /// Counts one result; returns the new state when it flips.
    fn record(&mut self, result: &CheckResult, rise: u32, fall: u32) -> Option<bool> {
        let s = &mut self.state;
        s.checks += 1;
        s.failures += u64::from(!result.ok);
        s.last_reason.clone_from(&result.reason);
        if !result.ok {
            s.last_failure.clone_from(&result.reason);
        }
        if result.ok == s.up {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if s.up { fall } else { rise };
        if self.streak < needed.max(1) {
            return None;
        }
        self.streak = 0;
        s.up = result.ok;
        s.transitions += 1;
        Some(s.up)
    }
}

impl Checker {
    /// A checker with no targets; transitions go to `events`.
    pub fn new(events: mpsc::Sender<HealthEvent>) -> Self {
        Checker {
            events,
            running: Mutex::new(HashMap::new()),
        }
    }

    /// Makes the checked set `targets`: starts new ones, stops those not listed, restarts
    /// those whose port or check changed. A restarted target keeps its up/down state and
    /// counters (the new check confirms or overturns it through rise/fall); an unchanged
    /// one is left running. Must be called within a tokio runtime.
    pub fn set_targets(&self, targets: Vec<Target>) {
        let mut running = self.lock();
        let mut wanted: HashMap<Key, Target> = targets
            .into_iter()
            .map(|t| ((t.service.clone(), t.backend), t))
            .collect();
        let mut changed = HashMap::new();
        running.retain(|key, r| {
            let Some(t) = wanted.get(key) else {
                r.task.abort();
                return false;
            };
            if t.port == r.port && t.config == r.config && t.tunnel == r.tunnel {
                wanted.remove(key);
                return true;
            }
            r.task.abort();
            lock(&r.progress).streak = 0;
            changed.insert(key.clone(), r.progress.clone());
            false
        });
        for (key, t) in wanted {
            let progress = changed.remove(&key).unwrap_or_else(|| {
                Arc::new(Mutex::new(Progress::new(
                    &t.service,
                    t.backend,
                    t.initially_up,
                )))
            });
            let task = tokio::spawn(run(t.clone(), progress.clone(), self.events.clone()));
            running.insert(
                key,
                Running {
                    port: t.port,
                    tunnel: t.tunnel,
                    config: t.config,
                    progress,
                    task,
                },
            );
        }
    }

    /// Every target's state, sorted by service then backend.
    pub fn snapshot(&self) -> Vec<TargetState> {
        let mut all: Vec<TargetState> = self
            .lock()
            .values()
            .map(|r| lock(&r.progress).state.clone())
            .collect();
        all.sort_by(|a, b| (&a.service, a.backend).cmp(&(&b.service, b.backend)));
        all
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Key, Running>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        for r in self.lock().values() {
            r.task.abort();
        }
    }
}

/// Locks a target's progress; a panic elsewhere cannot leave it half-written, so a
/// poisoned lock is still good to read.
fn lock(p: &Mutex<Progress>) -> MutexGuard<'_, Progress> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

/// One target's loop: check, count, report, wait for the next tick.
async fn run(t: Target, progress: Arc<Mutex<Progress>>, events: mpsc::Sender<HealthEvent>) {
    let addr = SocketAddr::new(t.backend, t.port);
    let mut tick = tokio::time::interval(t.config.interval().max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let result = match &t.tunnel {
            Some(tunnel) => self::tunnel::check(t.backend, t.port, tunnel, &t.config).await,
            None => check(addr, &t.config).await,
        };
        let flipped = lock(&progress).record(&result, t.config.rise, t.config.fall);
        let Some(up) = flipped else {
            if !result.ok {
                debug!(service = %t.service, backend = %t.backend, reason = %result.reason,
                    "health check failed");
            }
            continue;
        };
        info!(service = %t.service, backend = %t.backend, reason = %result.reason,
            "backend {}", if up { "up" } else { "down" });
        let event = HealthEvent {
            service: t.service.clone(),
            backend: t.backend,
            up,
            reason: result.reason,
        };
        if events.send(event).await.is_err() {
            warn!(service = %t.service, backend = %t.backend,
                "health event receiver is gone; checks go on");
        }
    }
}

/// The outcome of one check.
#[derive(Clone, Debug, PartialEq, Eq)]
struct CheckResult {
    ok: bool,
    reason: String,
}

impl CheckResult {
    fn ok(reason: impl fmt::Display) -> Self {
        CheckResult {
            ok: true,
            reason: reason.to_string(),
        }
    }
    fn fail(reason: impl fmt::Display) -> Self {
        CheckResult {
            ok: false,
            reason: reason.to_string(),
        }
    }
}

/// Runs one check, bounded as a whole by the configured timeout.
async fn check(addr: SocketAddr, config: &HealthConfig) -> CheckResult {
    if config.kind == CheckKind::Udp {
        return match tokio::time::timeout(config.timeout(), udp_check(addr, config)).await {
            Ok(result) => result,
            Err(_) => CheckResult::fail(format_args!("no UDP answer in {}ms", config.timeout_ms)),
        };
    }
    let attempt = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| io_reason("connect", &e))?;
        match config.kind {
            CheckKind::Tcp => Ok(CheckResult::ok("connected")),
            CheckKind::Http => http_get(&mut stream, addr, config.http_path()).await,
            CheckKind::Udp => unreachable!("checked above"),
        }
    };
    match tokio::time::timeout(config.timeout(), attempt).await {
        Ok(Ok(result)) | Ok(Err(result)) => result,
        Err(_) => CheckResult::fail(format_args!("timeout after {}ms", config.timeout_ms)),
    }
}

/// Sends the configured datagram from a connected socket and waits for any answer; a
/// connected socket hears the ICMP port unreachable as "refused".
async fn udp_check(addr: SocketAddr, config: &HealthConfig) -> CheckResult {
    let local: SocketAddr = if addr.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let attempt = async {
        let sock = tokio::net::UdpSocket::bind(local)
            .await
            .map_err(|e| io_reason("bind", &e))?;
        sock.connect(addr)
            .await
            .map_err(|e| io_reason("connect", &e))?;
        sock.send(config.udp_payload())
            .await
            .map_err(|e| io_reason("send", &e))?;
        let mut buf = [0u8; 1500];
        let n = sock
            .recv(&mut buf)
            .await
            .map_err(|e| io_reason("answer", &e))?;
        Ok(CheckResult::ok(format_args!("answered ({n} bytes)")))
    };
    match attempt.await {
        Ok(r) | Err(r) => r,
    }
}

/// Sends `GET path` and judges the status line: 2xx and 3xx are healthy.
async fn http_get(
    stream: &mut TcpStream,
    addr: SocketAddr,
    path: &str,
) -> Result<CheckResult, CheckResult> {
    let request = format!(
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: lb-health-check\r\n\
         Connection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| io_reason("send", &e))?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    let line_end = loop {
        if let Some(end) = buf.iter().position(|&b| b == b'\n') {
            break end;
        }
        if buf.len() >= MAX_STATUS_LINE {
            return Err(not_http(&buf));
        }
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| io_reason("read", &e))?;
        if n == 0 {
            return Err(if buf.is_empty() {
                CheckResult::fail("connection closed without an answer")
            } else {
                not_http(&buf)
            });
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let line = &buf[..line_end];
    let code = status_code(line).ok_or_else(|| not_http(line))?;
    let verdict = if (200..400).contains(&code) {
        CheckResult::ok
    } else {
        CheckResult::fail
    };
    Ok(verdict(format_args!("HTTP {code}")))
}

/// The status code of an HTTP/1.x status line ("HTTP/1.1 200 OK").
fn status_code(line: &[u8]) -> Option<u16> {
    let line = std::str::from_utf8(line).ok()?;
    let mut words = line.split_ascii_whitespace();
    if !words.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let code = words.next()?;
    if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    code.parse().ok()
}

fn not_http(answer: &[u8]) -> CheckResult {
    let text = String::from_utf8_lossy(&answer[..answer.len().min(40)]);
    CheckResult::fail(format_args!("not an HTTP answer: {:?}", text.trim_end()))
}

/// Short reasons for the usual network errors, the error text for the rest.
fn io_reason(what: &str, e: &std::io::Error) -> CheckResult {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => CheckResult::fail(format_args!("{what} refused")),
        ConnectionReset => CheckResult::fail("connection reset"),
        ConnectionAborted | BrokenPipe => CheckResult::fail("connection closed"),
        _ => CheckResult::fail(format_args!("{what}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::Ipv4Addr,
        sync::atomic::{AtomicUsize, Ordering},
        time::Instant,
    };

    use tokio::net::TcpListener;

    use super::*;

    const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
    const DEADLINE: Duration = Duration::from_secs(2);

    fn config(kind: CheckKind, rise: u32, fall: u32) -> HealthConfig {
        HealthConfig {
            kind,
            path: (kind == CheckKind::Http).then(|| "/health".into()),
            port: None,
            send: None,
            tunnel: false,
            interval_ms: 20,
            timeout_ms: 50,
            rise,
            fall,
        }
    }

    fn target(port: u16, config: HealthConfig) -> Target {
        Target::new("web", LOCAL, port, config)
    }

    fn state(c: &Checker) -> TargetState {
        c.snapshot().pop().expect("one target")
    }

    async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let start = Instant::now();
        while !cond() {
            assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn next_event(rx: &mut mpsc::Receiver<HealthEvent>) -> HealthEvent {
        tokio::time::timeout(DEADLINE, rx.recv())
            .await
            .expect("a health event in time")
            .expect("the checker is alive")
    }

    /// A listener that accepts and counts connections, then drops them.
    async fn counting_listener(port: u16) -> (u16, Arc<AtomicUsize>, JoinHandle<()>) {
        let l = TcpListener::bind((LOCAL, port)).await.unwrap();
        let port = l.local_addr().unwrap().port();
        let count = Arc::new(AtomicUsize::new(0));
        let c = count.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                drop(s);
            }
        });
        (port, count, task)
    }

    /// An HTTP server answering request n with `script[n]` (the last one forever after);
    /// `None` accepts, reads and never answers. Keeps the requests it got.
    async fn http_server(script: Vec<Option<&'static str>>) -> (u16, Arc<Mutex<Vec<String>>>) {
        let l = TcpListener::bind((LOCAL, 0)).await.unwrap();
        let port = l.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        tokio::spawn(async move {
            let mut n = 0;
            while let Ok((mut s, _)) = l.accept().await {
                let answer = script[n.min(script.len() - 1)];
                n += 1;
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 1024];
                    let len = s.read(&mut buf).await.unwrap_or(0);
                    seen.lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&buf[..len]).into_owned());
                    match answer {
                        Some(a) => {
                            let _ = s.write_all(a.as_bytes()).await;
                        }
                        None => tokio::time::sleep(Duration::from_secs(10)).await,
                    }
                });
            }
        });
        (port, requests)
    }

    const OK: Option<&str> = Some("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
    const UNAVAILABLE: Option<&str> = Some("HTTP/1.0 503 Service Unavailable\r\n\r\n");
    const GARBAGE: Option<&str> = Some("SSH-2.0-OpenSSH_9.2\r\n");
    const SILENT: Option<&str> = None;

    #[test]
    fn rise_and_fall_need_that_many_results_in_a_row() {
        let (rise, fall) = (3, 2);
        // (check passed, transition expected)
        let steps = [
            (false, None),
            (true, None), // resets the failures
            (false, None),
            (false, Some(false)), // the second failure in a row
            (false, None),
            (true, None),
            (true, None),
            (false, None), // resets the successes
            (true, None),
            (true, None),
            (true, Some(true)), // the third success in a row
        ];
        let mut p = Progress::new("web", LOCAL, true);
        for (i, (ok, flip)) in steps.into_iter().enumerate() {
            let r = if ok {
                CheckResult::ok("HTTP 200")
            } else {
                CheckResult::fail("HTTP 503")
            };
            assert_eq!(p.record(&r, rise, fall), flip, "step {i}");
        }
        let s = &p.state;
        assert_eq!((s.up, s.checks, s.failures), (true, 11, 5));
        assert_eq!((s.transitions, s.last_reason.as_str()), (2, "HTTP 200"));
    }

    #[test]
    fn status_lines() {
        assert_eq!(status_code(b"HTTP/1.1 200 OK\r"), Some(200));
        assert_eq!(status_code(b"HTTP/1.0 302"), Some(302));
        assert_eq!(status_code(b"HTTP/1.1 20 OK"), None);
        assert_eq!(status_code(b"HTTP/2 200"), None);
        assert_eq!(status_code(b"SSH-2.0-OpenSSH"), None);
        assert_eq!(status_code(b"\xff\xfe"), None);
    }

    #[tokio::test]
    async fn udp_check_needs_an_answer() {
        // An echo server: the payload comes back.
        let server = tokio::net::UdpSocket::bind((LOCAL, 0)).await.unwrap();
        let port = server.local_addr().unwrap().port();
        let echo = tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            while let Ok((n, from)) = server.recv_from(&mut buf).await {
                assert_eq!(&buf[..n], b"ping");
                let _ = server.send_to(&buf[..n], from).await;
            }
        });
        let (tx, mut rx) = mpsc::channel(16);
        let checker = Checker::new(tx);
        let mut c = config(CheckKind::Udp, 1, 2);
        c.send = Some("ping".into());
        checker.set_targets(vec![target(port, c)]);
        wait_for("two good checks", || state(&checker).checks >= 2).await;
        let s = state(&checker);
        assert!(s.up && s.failures == 0, "{s:?}");
        assert_eq!(s.last_reason, "answered (4 bytes)");
        assert_eq!(s.last_failure, "");

        // Nothing listens any more: the port unreachable makes the check fail.
        echo.abort();
        let _ = echo.await;
        let down = next_event(&mut rx).await;
        assert!(!down.up, "{down:?}");
        assert_eq!(down.reason, "answer refused");
        assert_eq!(state(&checker).last_failure, "answer refused");
    }

    #[tokio::test]
    async fn tcp_check_follows_the_listener() {
        let (port, _, server) = counting_listener(0).await;
        let (tx, mut rx) = mpsc::channel(16);
        let checker = Checker::new(tx);
        checker.set_targets(vec![target(port, config(CheckKind::Tcp, 1, 2))]);
        wait_for("two good checks", || state(&checker).checks >= 2).await;
        let s = state(&checker);
        assert!(s.up && s.failures == 0, "{s:?}");
        assert_eq!(s.last_reason, "connected");

        server.abort();
        let down = next_event(&mut rx).await;
        assert_eq!(
            (down.service.as_str(), down.backend, down.up),
            ("web", LOCAL, false)
        );
        assert_eq!(down.reason, "connect refused");
        let s = state(&checker);
        assert!(!s.up && s.failures >= 2 && s.transitions == 1, "{s:?}");

        let (_, _, _server) = counting_listener(port).await;
        let up = next_event(&mut rx).await;
        assert!(up.up, "{up:?}");
        assert_eq!(state(&checker).transitions, 2);
    }

    #[tokio::test]
    async fn http_check_judges_the_status_line() {
        let cases = [
            (OK, true, "HTTP 200"),
            (UNAVAILABLE, false, "HTTP 503"),
            (
                GARBAGE,
                false,
                "not an HTTP answer: \"SSH-2.0-OpenSSH_9.2\"",
            ),
            (SILENT, false, "timeout after 50ms"),
        ];
        for (answer, up, reason) in cases {
            let (port, requests) = http_server(vec![answer]).await;
            let (tx, mut rx) = mpsc::channel(16);
            let checker = Checker::new(tx);
            checker.set_targets(vec![target(port, config(CheckKind::Http, 1, 1))]);
            if up {
                wait_for("two checks", || state(&checker).checks >= 2).await;
                assert!(rx.try_recv().is_err(), "no transition while healthy");
            } else {
                let e = next_event(&mut rx).await;
                assert!(!e.up);
                assert_eq!(e.reason, reason);
            }
            let s = state(&checker);
            assert_eq!((s.up, s.last_reason.as_str()), (up, reason));
            let request = requests.lock().unwrap()[0].clone();
            assert!(
                request.starts_with("GET /health HTTP/1.0\r\n")
                    && request.contains(&format!("\r\nHost: 127.0.0.1:{port}\r\n"))
                    && request.ends_with("\r\n\r\n"),
                "{request:?}"
            );
        }
    }

    #[tokio::test]
    async fn closed_and_reset_connections_are_failures() {
        // Accepts and closes at once: no status line.
        let (port, _, _server) = counting_listener(0).await;
        let (tx, mut rx) = mpsc::channel(16);
        let checker = Checker::new(tx);
        checker.set_targets(vec![target(port, config(CheckKind::Http, 1, 1))]);
        let e = next_event(&mut rx).await;
        assert!(!e.up);
        assert!(
            ["connection closed without an answer", "connection reset"]
                .contains(&e.reason.as_str()),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn rise_and_fall_counts_are_respected_on_the_wire() {
        // fall = 2, rise = 3: a lone 503 and a lone 200 while down change nothing.
        let script = vec![
            UNAVAILABLE,
            OK,
            UNAVAILABLE,
            UNAVAILABLE,
            OK,
            UNAVAILABLE,
            OK,
            OK,
            OK,
        ];
        let (port, requests) = http_server(script).await;
        let (tx, mut rx) = mpsc::channel(16);
        let checker = Checker::new(tx);
        checker.set_targets(vec![target(port, config(CheckKind::Http, 3, 2))]);
        let down = next_event(&mut rx).await;
        assert!(!down.up && down.reason == "HTTP 503", "{down:?}");
        let up = next_event(&mut rx).await;
        assert!(up.up && up.reason == "HTTP 200", "{up:?}");
        // Checks past the script answer 200: nothing more happens.
        wait_for("a few more checks", || requests.lock().unwrap().len() >= 12).await;
        assert!(rx.try_recv().is_err());
        let s = state(&checker);
        assert_eq!((s.up, s.transitions), (true, 2), "{s:?}");
        assert_eq!(s.failures, 4, "{s:?}");
    }

    #[tokio::test]
    async fn removed_targets_stop_and_unchanged_ones_keep_state() {
        let (port_a, count_a, _a) = counting_listener(0).await;
        let (port_b, count_b, _b) = counting_listener(0).await;
        let (tx, _rx) = mpsc::channel(16);
        let checker = Checker::new(tx);
        let a = Target::new("a", LOCAL, port_a, config(CheckKind::Tcp, 1, 1));
        let b = Target::new("b", LOCAL, port_b, config(CheckKind::Tcp, 1, 1));
        checker.set_targets(vec![a.clone(), b.clone()]);
        wait_for("both checked", || {
            count_a.load(Ordering::SeqCst) >= 2 && count_b.load(Ordering::SeqCst) >= 2
        })
        .await;

        checker.set_targets(vec![a.clone()]);
        let snap = checker.snapshot();
        assert_eq!(snap.len(), 1);
        assert!(snap[0].service == "a" && snap[0].checks >= 2, "{snap:?}");
        tokio::time::sleep(Duration::from_millis(30)).await;
        let stopped_at = count_b.load(Ordering::SeqCst);
        let a_before = count_a.load(Ordering::SeqCst);
        // Five intervals: b would have been checked again had it not stopped.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(count_b.load(Ordering::SeqCst), stopped_at);
        assert!(count_a.load(Ordering::SeqCst) > a_before);

        // A changed check restarts but keeps the counters.
        let checks = state(&checker).checks;
        let mut a2 = a.clone();
        a2.config.interval_ms = 30;
        checker.set_targets(vec![a2]);
        assert!(state(&checker).checks >= checks);

        drop(checker);
        tokio::time::sleep(Duration::from_millis(30)).await;
        let at_drop = count_a.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            count_a.load(Ordering::SeqCst),
            at_drop,
            "drop stops the checks"
        );
    }
}

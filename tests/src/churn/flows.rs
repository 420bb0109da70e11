//! Long-lived TCP connections and connected-UDP sessions that keep talking through the
//! load balancer and record how they end.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt, io,
    io::Write as _,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use lb_common::{
    addr,
    hash::FlowTuple,
    proto::{IPPROTO_TCP, IPPROTO_UDP},
};

use super::UdpSession;
use crate::{Netns, TcpConn};

/// TCP connection or UDP session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Tcp,
    Udp,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Tcp => "TCP",
            Kind::Udp => "UDP",
        })
    }
}

/// Why a flow broke.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Break {
    /// Reset, or closed by the other end.
    Reset,
    /// No answer in time.
    Timeout,
    /// The echo differs from what was sent.
    Mismatch,
    /// A UDP session answered by another server than the one it started with.
    Moved {
        to: String,
    },
    Other(String),
}

impl fmt::Display for Break {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Break::Reset => f.write_str("reset"),
            Break::Timeout => f.write_str("timeout"),
            Break::Mismatch => f.write_str("data mismatch"),
            Break::Moved { to } => write!(f, "moved to {to}"),
            Break::Other(e) => write!(f, "error: {e}"),
        }
    }
}

/// How a flow stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fate {
    Open,
    /// Closed on purpose (`Flows::close_on`), during step `step`.
    Closed {
        step: usize,
    },
    Broken {
        step: usize,
        why: Break,
        /// When the break was seen.
        at: Instant,
    },
}

/// A command run on an LB node.
#[derive(Clone, Debug)]
pub struct Ran {
    /// "lb0", "lb1", ...
    pub node: String,
    /// As an operator would type it: "lb backend drain web 10.1.1.2".
    pub command: String,
    pub output: String,
}

/// One long-lived flow.
#[derive(Clone, Debug)]
pub struct Flow {
    pub kind: Kind,
    /// The client's end (source address and port).
    pub local: SocketAddr,
    pub dst: SocketAddr,
    /// The backend that answered at the start.
    pub server: String,
    /// Exchanges that succeeded.
    pub exchanges: u64,
    pub fate: Fate,
}

impl Flow {
    /// The tuple the LB hashes.
    pub fn tuple(&self) -> FlowTuple {
        FlowTuple {
            src: addr::to_bytes(self.local.ip()),
            dst: addr::to_bytes(self.dst.ip()),
            src_port: self.local.port(),
            dst_port: self.dst.port(),
            proto: match self.kind {
                Kind::Tcp => IPPROTO_TCP,
                Kind::Udp => IPPROTO_UDP,
            },
        }
    }
}

enum Conn {
    Tcp(TcpConn),
    Udp(UdpSession),
}

struct Shared {
    flows: Mutex<Vec<Flow>>,
    stop: AtomicBool,
    step: AtomicUsize,
    /// Servers whose flows the workers close.
    close: Mutex<BTreeSet<String>>,
    exchanges: AtomicU64,
    /// When the flows started talking.
    started: Instant,
    /// Answered exchanges by (whole seconds since `started`, the flow's backend).
    answered: Mutex<BTreeMap<(u64, String), u64>>,
}

/// What to open.
#[derive(Clone, Debug)]
pub struct FlowPlan {
    /// TCP connections to each of these (spread over the clients, in turn).
    pub tcp: Vec<(SocketAddr, usize)>,
    /// UDP sessions to each of these.
    pub udp: Vec<(SocketAddr, usize)>,
    /// Each flow sends one request this often (less often when the machine is busy).
    pub period: Duration,
    /// Worker threads that drive the flows.
    pub workers: usize,
    /// A TCP echo not back within this is a timeout; a UDP request is tried 3 times
    /// with a third of it each.
    pub timeout: Duration,
}

/// Long-lived TCP connections and UDP sessions from the clients through the LB, each
/// exchanging a numbered request every `period` and checking the answer. A flow that
/// fails is not retried: its fate records when and why.
pub struct Flows {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl Flows {
    /// Opens every flow of `plan` (fails if one cannot be opened), then starts talking.
    pub fn open(clients: &[&Netns], plan: &FlowPlan) -> Result<Self> {
        let mut flows = Vec::new();
        let mut conns = Vec::new();
        let mut turn = 0usize;
        let mut next_client = || {
            turn += 1;
            clients[(turn - 1) % clients.len()]
        };
        for &(dst, n) in &plan.tcp {
            for _ in 0..n {
                let c = TcpConn::connect(next_client(), dst, plan.timeout)?;
                flows.push(Flow {
                    kind: Kind::Tcp,
                    local: c.stream().local_addr()?,
                    dst,
                    server: c.server.clone(),
                    exchanges: 0,
                    fate: Fate::Open,
                });
                conns.push(Conn::Tcp(c));
            }
        }
        for &(dst, n) in &plan.udp {
            for _ in 0..n {
                let s = UdpSession::open(next_client(), dst, plan.timeout / 3)?;
                flows.push(Flow {
                    kind: Kind::Udp,
                    local: s.local_addr()?,
                    dst,
                    server: s.server.clone(),
                    exchanges: 0,
                    fate: Fate::Open,
                });
                conns.push(Conn::Udp(s));
            }
        }
        let shared = Arc::new(Shared {
            flows: Mutex::new(flows),
            stop: AtomicBool::new(false),
            step: AtomicUsize::new(0),
            close: Mutex::new(BTreeSet::new()),
            exchanges: AtomicU64::new(0),
            started: Instant::now(),
            answered: Mutex::new(BTreeMap::new()),
        });
        let workers = plan.workers.max(1);
        let mut owned: Vec<Vec<(usize, Conn)>> = (0..workers).map(|_| Vec::new()).collect();
        for (i, c) in conns.into_iter().enumerate() {
            owned[i % workers].push((i, c));
        }
        let workers = owned
            .into_iter()
            .map(|mine| {
                let (shared, period, timeout) = (shared.clone(), plan.period, plan.timeout);
                std::thread::spawn(move || drive(mine, &shared, period, timeout))
            })
            .collect();
        Ok(Self { shared, workers })
    }

    /// Marks the start of step `step`: flows that break from now on count against it.
    pub fn set_step(&self, step: usize) {
        self.shared.step.store(step, Ordering::Relaxed);
    }

    /// A copy of every flow's state.
    pub fn snapshot(&self) -> Vec<Flow> {
        self.shared.flows.lock().expect("not poisoned").clone()
    }

    /// When the flows started talking: second 0 of `answered`.
    pub fn started(&self) -> Instant {
        self.shared.started
    }

    /// Answered exchanges per (second since `started`, backend the flow began on).
    pub fn answered(&self) -> BTreeMap<(u64, String), u64> {
        self.shared.answered.lock().expect("not poisoned").clone()
    }

    /// Successful exchanges so far, all flows together.
    pub fn exchanges(&self) -> u64 {
        self.shared.exchanges.load(Ordering::Relaxed)
    }

    /// Closes, cleanly, the open flows served by `server` and waits until they are
    /// closed (TCP: our FIN, then the server's). Returns how many were closed.
    pub fn close_on(&self, server: &str, timeout: Duration) -> Result<usize> {
        let open = |f: &Flow| f.server == server && f.fate == Fate::Open;
        let want = self.snapshot().iter().filter(|f| open(f)).count();
        self.shared
            .close
            .lock()
            .expect("not poisoned")
            .insert(server.to_owned());
        let deadline = Instant::now() + timeout;
        while self.snapshot().iter().any(open) {
            if Instant::now() > deadline {
                bail!("flows on {server} still open after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(want)
    }

    /// Waits until every open flow has made at least `n` more exchanges than now (so a
    /// change has been exercised by all of them), at most `timeout`.
    pub fn settle(&self, n: u64, timeout: Duration) {
        let base: Vec<(u64, bool)> = self
            .snapshot()
            .iter()
            .map(|f| (f.exchanges, f.fate == Fate::Open))
            .collect();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let now = self.snapshot();
            let done = now.iter().zip(&base).all(|(f, (e, was_open))| {
                !was_open || f.fate != Fate::Open || f.exchanges >= e + n
            });
            if done {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the workers (flows still open are closed by dropping them) and returns the
    /// final states.
    pub fn stop(mut self) -> Vec<Flow> {
        self.halt();
        self.snapshot()
    }

    fn halt(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

impl Drop for Flows {
    fn drop(&mut self) {
        self.halt();
    }
}

fn drive(mut mine: Vec<(usize, Conn)>, shared: &Shared, period: Duration, timeout: Duration) {
    let mut seq = 0u64;
    while !shared.stop.load(Ordering::Relaxed) && !mine.is_empty() {
        let started = Instant::now();
        seq += 1;
        let closing = shared.close.lock().expect("not poisoned").clone();
        let mut i = 0;
        while i < mine.len() {
            if shared.stop.load(Ordering::Relaxed) {
                return;
            }
            let (idx, conn) = &mut mine[i];
            let idx = *idx;
            let server = match conn {
                Conn::Tcp(c) => c.server.clone(),
                Conn::Udp(s) => s.server.clone(),
            };
            if closing.contains(&server) {
                let (_, conn) = mine.swap_remove(i);
                close(conn, timeout);
                let step = shared.step.load(Ordering::Relaxed);
                shared.flows.lock().expect("not poisoned")[idx].fate = Fate::Closed { step };
                continue;
            }
            let data = format!("flow {idx} request {seq} {:0>32}\n", seq);
            let outcome = match conn {
                Conn::Tcp(c) => c.echo(data.as_bytes()).map_err(|e| classify(&e)),
                Conn::Udp(s) => match s.exchange(data.as_bytes(), timeout / 3, 3) {
                    Ok(who) if who == server => Ok(()),
                    Ok(who) => Err(Break::Moved { to: who }),
                    Err(e) => Err(classify(&e)),
                },
            };
            let mut flows = shared.flows.lock().expect("not poisoned");
            match outcome {
                Ok(()) => {
                    flows[idx].exchanges += 1;
                    shared.exchanges.fetch_add(1, Ordering::Relaxed);
                    let second = shared.started.elapsed().as_secs();
                    *shared
                        .answered
                        .lock()
                        .expect("not poisoned")
                        .entry((second, server))
                        .or_default() += 1;
                    i += 1;
                }
                Err(why) => {
                    // The step the break is seen in: an exchange that began before a step's
                    // check and fails after it counts in the next step's.
                    let step = shared.step.load(Ordering::Relaxed);
                    flows[idx].fate = Fate::Broken {
                        step,
                        why,
                        at: Instant::now(),
                    };
                    drop(flows);
                    mine.swap_remove(i);
                }
            }
        }
        if let Some(rest) = period.checked_sub(started.elapsed()) {
            std::thread::sleep(rest);
        }
    }
}

/// Closes a flow the way a client that is done does: TCP half-closes and reads the
/// server's FIN.
fn close(conn: Conn, timeout: Duration) {
    if let Conn::Tcp(c) = conn {
        let mut s = c.stream();
        let _ = s.flush();
        let _ = s.shutdown(std::net::Shutdown::Write);
        let _ = s.set_read_timeout(Some(timeout));
        let mut buf = [0u8; 4096];
        while let Ok(n) = io::Read::read(&mut s, &mut buf) {
            if n == 0 {
                break;
            }
        }
    }
}

fn classify(e: &anyhow::Error) -> Break {
    if let Some(io) = e.chain().find_map(|c| c.downcast_ref::<io::Error>()) {
        return match io.kind() {
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionRefused => Break::Reset,
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Break::Timeout,
            _ => Break::Other(format!("{e:#}")),
        };
    }
    if format!("{e:#}").contains("differs") {
        Break::Mismatch
    } else {
        Break::Other(format!("{e:#}"))
    }
}

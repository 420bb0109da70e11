//! Long-lived traffic while the backend set changes: a lab with LB and backend agents,
//! TCP connections and connected-UDP sessions that keep talking through the load
//! balancer and record how they end, a UDP server that gives every client a connected
//! socket of its own (as QUIC servers do), and a host-side reader of an LB node's live
//! forwarding table that predicts where a flow goes.
//!
//! Used by `tests/e2e_churn.rs` and the `demo` binary.

use std::{
    collections::{btree_map::Entry, BTreeMap, BTreeSet},
    fmt, io,
    io::Write as _,
    mem::size_of,
    net::{IpAddr, SocketAddr, UdpSocket},
    os::fd::FromRawFd,
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use aya::maps::{Array, HashMap, Map, MapData};
use lb_common::{
    addr,
    hash::{bucket_index, flow_hash, FlowTuple},
    maps::{names, Backend, Bucket, NodeConfig, ServiceKey, ServiceValue, BACKEND_PRESENT},
    stats::Reason,
};
use serde_json::{json, Value};

use crate::{
    agent::{node_config, remove_run_dir, Agent},
    Netns, Node, Spec, TcpConn, TcpServer, Topology,
};

/// The port backends answer health checks on.
pub const HEALTH_PORT: u16 = 8080;
/// The TCP services' port (on the IPv4 and the IPv6 VIP).
pub const TCP_PORT: u16 = 80;
/// The UDP service's port (IPv4 VIP).
pub const UDP_PORT: u16 = 443;
/// How often server threads look at their stop flag.
const POLL: Duration = Duration::from_millis(50);

// ---------------------------------------------------------------------------------------
// Connected-UDP server

/// A UDP server that answers like [`UdpServer`](crate::UdpServer) (`<name>\n` followed by
/// the datagram) but serves each client from a socket connected to it, bound to the same
/// address with `SO_REUSEPORT`: the first datagram of a client reaches the unconnected
/// socket, which opens the session; the kernel then delivers the client's datagrams to
/// the connected socket. A backend's XDP program sees that socket, so the session keeps
/// its backend when the table moves.
#[derive(Debug)]
pub struct UdpSessionServer {
    sessions: Arc<AtomicU64>,
    events: Events,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

/// When each client's sessions opened and ended, so a broken flow can be traced.
type Events = Arc<Mutex<Vec<(Instant, SocketAddr, String)>>>;

impl UdpSessionServer {
    /// Binds each of `addrs` (exact addresses, VIPs included: answers must leave from the
    /// address the client sent to) inside `ns`.
    pub fn start(ns: &Netns, name: &str, addrs: &[SocketAddr]) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let sessions = Arc::new(AtomicU64::new(0));
        let events = Events::default();
        let mut threads = Vec::new();
        for &local in addrs {
            let sock = ns.run(|| {
                reuseport_udp(local, None).with_context(|| format!("binding UDP {local}"))
            })?;
            sock.set_read_timeout(Some(POLL))?;
            let (stop, sessions, events, name) = (
                stop.clone(),
                sessions.clone(),
                events.clone(),
                name.to_owned(),
            );
            // The listener's thread lives in the namespace: it makes the session sockets.
            threads.push(
                ns.spawn_thread(move || listen(sock, local, &name, &stop, &sessions, &events))?,
            );
        }
        Ok(Self {
            sessions,
            events,
            stop,
            threads,
        })
    }

    /// What happened to the sessions of client `peer`: (when, what), in order.
    pub fn history(&self, peer: SocketAddr) -> Vec<(Instant, String)> {
        let events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        events
            .iter()
            .filter(|(_, p, _)| *p == peer)
            .map(|(at, _, what)| (*at, what.clone()))
            .collect()
    }

    /// Sessions opened so far.
    pub fn sessions(&self) -> u64 {
        self.sessions.load(Ordering::Relaxed)
    }
}

impl Drop for UdpSessionServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn listen(
    sock: UdpSocket,
    local: SocketAddr,
    name: &str,
    stop: &Arc<AtomicBool>,
    sessions: &AtomicU64,
    events: &Events,
) {
    let prefix = format!("{name}\n").into_bytes();
    let mut buf = vec![0u8; 65536];
    let mut open: BTreeMap<SocketAddr, JoinHandle<()>> = BTreeMap::new();
    while !stop.load(Ordering::Relaxed) {
        let Ok((n, peer)) = sock.recv_from(&mut buf) else {
            continue;
        };
        open.retain(|_, t| !t.is_finished());
        let reply = [&prefix[..], &buf[..n]].concat();
        if open.contains_key(&peer) {
            // Queued before the session socket existed.
            let _ = sock.send_to(&reply, peer);
            note(events, peer, "answered by the listener".into());
            continue;
        }
        let conn = match reuseport_udp(local, Some(peer)) {
            Ok(conn) => conn,
            Err(e) => {
                let _ = sock.send_to(&reply, peer);
                note(events, peer, format!("no session socket: {e}"));
                continue;
            }
        };
        sessions.fetch_add(1, Ordering::Relaxed);
        note(events, peer, "session opened".into());
        let _ = conn.send(&reply);
        let (stop, prefix, events) = (stop.clone(), prefix.clone(), events.clone());
        open.insert(
            peer,
            std::thread::spawn(move || {
                if let Err(e) = serve_session(conn, &prefix, &stop) {
                    note(&events, peer, format!("session ended: {e}"));
                }
            }),
        );
    }
    for (_, t) in open {
        let _ = t.join();
    }
}

/// Records what happened to client `peer`'s session, with the time.
fn note(events: &Events, peer: SocketAddr, what: String) {
    let mut e = events.lock().unwrap_or_else(|e| e.into_inner());
    e.push((Instant::now(), peer, what));
}

/// Echoes on `conn` until stopped; an error other than a timeout ends the session.
/// Answers go to each datagram's sender: datagrams of other clients may have queued on
/// the socket while it was bound but not yet connected.
fn serve_session(conn: UdpSocket, prefix: &[u8], stop: &AtomicBool) -> io::Result<()> {
    conn.set_read_timeout(Some(POLL))?;
    let mut buf = vec![0u8; 65536];
    buf[..prefix.len()].copy_from_slice(prefix);
    while !stop.load(Ordering::Relaxed) {
        match conn.recv_from(&mut buf[prefix.len()..]) {
            Ok((n, from)) => {
                let _ = conn.send_to(&buf[..prefix.len() + n], from);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            // ECONNREFUSED from an ICMP error: the client went away.
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A UDP socket with `SO_REUSEADDR` and `SO_REUSEPORT`, bound to `local` and connected to
/// `peer` when given.
fn reuseport_udp(local: SocketAddr, peer: Option<SocketAddr>) -> io::Result<UdpSocket> {
    let family = if local.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket call; the fd is owned by the UdpSocket right after.
    let fd = unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh, valid socket fd that nothing else owns.
    let sock = unsafe { UdpSocket::from_raw_fd(fd) };
    for opt in [libc::SO_REUSEADDR, libc::SO_REUSEPORT] {
        let one: libc::c_int = 1;
        // SAFETY: a valid fd and an int option of the right size.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&one as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let (storage, len) = sockaddr(local);
    // SAFETY: `storage` holds a sockaddr of `len` bytes of the socket's family.
    if unsafe { libc::bind(fd, (&storage as *const libc::sockaddr_storage).cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if let Some(peer) = peer {
        sock.connect(peer)?;
    }
    Ok(sock)
}

pub(crate) fn sockaddr(a: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match a {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// A client's UDP session: a socket connected to the VIP, one request in flight.
#[derive(Debug)]
pub struct UdpSession {
    /// The name of the server that answered the first datagram.
    pub server: String,
    sock: UdpSocket,
}

impl UdpSession {
    /// Opens a session from `ns` to `dst`: a connected socket, and a first exchange that
    /// names the server.
    pub fn open(ns: &Netns, dst: SocketAddr, timeout: Duration) -> Result<Self> {
        let sock = ns.run(|| {
            let any: SocketAddr = if dst.is_ipv4() {
                "0.0.0.0:0".parse()?
            } else {
                "[::]:0".parse()?
            };
            let s = UdpSocket::bind(any)?;
            s.connect(dst)?;
            Ok(s)
        })?;
        let mut s = Self {
            server: String::new(),
            sock,
        };
        s.server = s.exchange(b"hello", timeout, 3)?;
        Ok(s)
    }

    /// Sends `data` and waits for its echo, resending up to `tries` times (datagrams may
    /// be lost); returns the name of the server that answered. Answers to earlier
    /// requests are skipped.
    pub fn exchange(&mut self, data: &[u8], timeout: Duration, tries: u32) -> Result<String> {
        self.sock.set_read_timeout(Some(timeout))?;
        let mut buf = vec![0u8; data.len() + 256];
        for _ in 0..tries.max(1) {
            self.sock.send(data)?;
            let deadline = Instant::now() + timeout;
            while Instant::now() < deadline {
                let n = match self.sock.recv(&mut buf) {
                    Ok(n) => n,
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) =>
                    {
                        break
                    }
                    Err(e) => return Err(e.into()),
                };
                let reply = &buf[..n];
                let Some(nl) = reply.iter().position(|&b| b == b'\n') else {
                    bail!("malformed answer");
                };
                if &reply[nl + 1..] == data {
                    return Ok(String::from_utf8_lossy(&reply[..nl]).into_owned());
                }
            }
        }
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer after {tries} tries"),
        )
        .into())
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sock.local_addr()
    }
}

// ---------------------------------------------------------------------------------------
// Long-lived flows

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
                Kind::Tcp => 6,
                Kind::Udp => 17,
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

// ---------------------------------------------------------------------------------------
// The live table, read from an LB node's pinned maps

/// A service's live forwarding table on one LB node, in backend addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveTable {
    pub seed: u32,
    pub bits: u32,
    /// (first, second) per bucket.
    pub buckets: Vec<(Option<IpAddr>, Option<IpAddr>)>,
}

fn pinned(pin_dir: &Path, name: &str) -> Result<Map> {
    let path = pin_dir.join("maps").join(name);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    Ok(Map::from_map_data(data)?)
}

impl LiveTable {
    /// Reads the table of (`vip`, `port`, `proto`) from the maps pinned under `pin_dir`.
    pub fn read(pin_dir: &Path, vip: IpAddr, port: u16, proto: u8) -> Result<Self> {
        let node: Array<MapData, NodeConfig> = pinned(pin_dir, names::NODE)?.try_into()?;
        let seed = node.get(&0, 0)?.hash_seed;
        let services: HashMap<MapData, ServiceKey, ServiceValue> =
            pinned(pin_dir, names::SERVICES)?.try_into()?;
        let key = ServiceKey {
            addr: addr::to_bytes(vip),
            port_be: port.to_be(),
            proto,
            _pad: 0,
        };
        let sv = services
            .get(&key, 0)
            .with_context(|| format!("no service {vip}:{port}/{proto} in {}", pin_dir.display()))?;
        let backends: Array<MapData, Backend> = pinned(pin_dir, names::BACKENDS)?.try_into()?;
        let mut slots = BTreeMap::new();
        let mut slot = |i: u32| -> Result<Option<IpAddr>> {
            if i == lb_common::maps::NO_BACKEND {
                return Ok(None);
            }
            if let Some(a) = slots.get(&i) {
                return Ok(*a);
            }
            let b = backends.get(&i, 0)?;
            let a = (b.flags & BACKEND_PRESENT != 0).then(|| addr::from_bytes(b.addr));
            slots.insert(i, a);
            Ok(a)
        };
        let table: Array<MapData, Bucket> = pinned(pin_dir, names::BUCKETS)?.try_into()?;
        let size = 1u32 << sv.table_bits;
        let mut buckets = Vec::with_capacity(size as usize);
        for i in sv.table_offset..sv.table_offset + size {
            let b = table.get(&i, 0)?;
            buckets.push((slot(b.first)?, slot(b.second)?));
        }
        Ok(Self {
            seed,
            bits: sv.table_bits,
            buckets,
        })
    }

    /// The bucket of a flow.
    pub fn bucket(&self, t: &FlowTuple) -> usize {
        bucket_index(flow_hash(self.seed, t), self.bits) as usize
    }

    /// The first and second hop of a flow.
    pub fn hops(&self, t: &FlowTuple) -> (Option<IpAddr>, Option<IpAddr>) {
        self.buckets[self.bucket(t)]
    }

    /// Buckets whose first hop is `a`.
    pub fn owned_by(&self, a: IpAddr) -> usize {
        self.buckets.iter().filter(|(f, _)| *f == Some(a)).count()
    }
}

// ---------------------------------------------------------------------------------------
// The lab

/// A lab's shape.
#[derive(Clone, Debug)]
pub struct LabPlan {
    pub clients: usize,
    pub lbs: usize,
    /// Backend nodes, all running agents and servers.
    pub backends: usize,
    /// Backends in the services at the start (the first ones), with their weights.
    pub weights: Vec<u32>,
    /// Health checks: interval in ms and fall count.
    pub interval_ms: u64,
    pub fall: u32,
    /// Forwarding-table size of the services.
    pub table_bits: u32,
    /// Serve the TCP services on IPv6 too (service `web6`).
    pub ipv6: bool,
    /// Unimog mode: `backends` nodes that are all both LB nodes and backends (`lbs` is
    /// not used); each runs one agent with the services and the servers.
    pub unimog: bool,
}

/// The lab's services: `web` (TCP, IPv4 VIP), `web6` (TCP, IPv6 VIP) when `ipv6`,
/// `quic` (UDP, IPv4 VIP).
pub fn lab_services(topo: &Topology, ipv6: bool) -> Vec<LabService> {
    let mut services = vec![LabService {
        name: "web",
        vip: topo.vip_v4().into(),
        port: TCP_PORT,
        proto: 6,
    }];
    if ipv6 {
        services.push(LabService {
            name: "web6",
            vip: topo.vip_v6().into(),
            port: TCP_PORT,
            proto: 6,
        });
    }
    services.push(LabService {
        name: "quic",
        vip: topo.vip_v4().into(),
        port: UDP_PORT,
        proto: 17,
    });
    services
}

/// The config of `services` with `members` (node, weight) as backends, each checked by
/// a TCP connect to [`HEALTH_PORT`] every `interval_ms`, down after `fall` failures.
pub fn service_configs(
    services: &[LabService],
    members: &[(&Node, u32)],
    (interval_ms, fall): (u64, u32),
    table_bits: u32,
) -> Vec<Value> {
    let health = json!({ "kind": "tcp", "port": HEALTH_PORT, "interval_ms": interval_ms,
                         "timeout_ms": interval_ms / 2, "rise": 2, "fall": fall });
    services
        .iter()
        .map(|s| {
            let backends: Vec<Value> = members
                .iter()
                .map(|&(n, w)| json!({ "address": s.backend_addr(n), "weight": w, "health": health }))
                .collect();
            let proto = if s.proto == 6 { "tcp" } else { "udp" };
            json!({ "name": s.name, "vip": s.vip, "port": s.port, "protocol": proto,
                    "table_bits": table_bits, "backends": backends })
        })
        .collect()
}

/// A node's servers: a TCP echo server on port 80 (every address), a connected-UDP
/// server on port 443 of every VIP, and a health server on port 8080 of its addresses.
/// Each answers with the node's name.
pub fn start_servers(
    node: &Node,
    vips: &[IpAddr],
) -> Result<(TcpServer, UdpSessionServer, TcpServer)> {
    let any: SocketAddr = SocketAddr::new("::".parse()?, TCP_PORT);
    let tcp = TcpServer::start(node, &node.name, &[any])?;
    let udp_addrs: Vec<SocketAddr> = vips.iter().map(|&v| SocketAddr::new(v, UDP_PORT)).collect();
    let udp = UdpSessionServer::start(node, &node.name, &udp_addrs)?;
    let health = TcpServer::start(node, &node.name, &node.sockaddrs(HEALTH_PORT))?;
    Ok((tcp, udp, health))
}

/// A service of the lab.
#[derive(Clone, Debug)]
pub struct LabService {
    pub name: &'static str,
    pub vip: IpAddr,
    pub port: u16,
    pub proto: u8,
}

impl LabService {
    pub fn dst(&self) -> SocketAddr {
        SocketAddr::new(self.vip, self.port)
    }

    /// The backend's address of this service's family.
    pub fn backend_addr(&self, b: &Node) -> IpAddr {
        b.addr(self.vip.is_ipv6())
    }
}

/// LB agents on every LB node (same config, same hash seed), backend agents, TCP echo
/// servers (port 80), connected-UDP servers (port 443) and health servers (port 8080) on
/// every backend. In Unimog mode every node is both: one agent, with the services, and
/// the servers. Services: `web` (TCP, IPv4 VIP), `web6` (TCP, IPv6 VIP) when asked,
/// `quic` (UDP, IPv4 VIP). Dropping it stops everything and removes the namespaces.
pub struct Lab {
    pub lb_agents: Vec<Agent>,
    pub backend_agents: Vec<Agent>,
    pub tcp: Vec<Option<TcpServer>>,
    pub udp: Vec<Option<UdpSessionServer>>,
    pub health: Vec<Option<TcpServer>>,
    pub services: Vec<LabService>,
    pub plan: LabPlan,
    pub topo: Topology,
    pub started: Instant,
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.lb_agents.clear();
        self.backend_agents.clear();
        self.udp.clear();
        self.tcp.clear();
        self.health.clear();
        remove_run_dir(&self.topo.id);
    }
}

impl Lab {
    /// Builds the topology and starts agents and servers.
    pub fn start(plan: LabPlan) -> Result<Self> {
        let started = Instant::now();
        let spec = if plan.unimog {
            Spec::unimog(plan.clients, plan.backends)
        } else {
            Spec::new(plan.clients, plan.lbs, plan.backends)
        };
        let topo = Topology::build(spec)?;
        let services = lab_services(&topo, plan.ipv6);
        let mut lab = Lab {
            lb_agents: Vec::new(),
            backend_agents: Vec::new(),
            tcp: Vec::new(),
            udp: Vec::new(),
            health: Vec::new(),
            services,
            plan,
            topo,
            started,
        };
        for i in 0..lab.servers().len() {
            lab.start_servers(i)?;
        }
        let topo = &lab.topo;
        if !lab.plan.unimog {
            for b in &topo.backends {
                let vips: Vec<IpAddr> = topo.spec.vips.clone();
                let config = json!({ "node": node_config(b), "backend_vips": vips });
                lab.backend_agents.push(Agent::start(&topo.id, b, config)?);
            }
        }
        let services = lab.service_configs(&lab.initial_members());
        for n in &topo.lbs {
            let config = json!({ "node": node_config(n), "services": services });
            lab.lb_agents.push(Agent::start(&topo.id, n, config)?);
        }
        Ok(lab)
    }

    /// The nodes that run servers: the backends, or in Unimog mode every node.
    pub fn servers(&self) -> &[Node] {
        if self.plan.unimog {
            &self.topo.lbs
        } else {
            &self.topo.backends
        }
    }

    /// The agents of the server nodes (in Unimog mode, every node's agent).
    pub fn server_agents(&self) -> &[Agent] {
        if self.plan.unimog {
            &self.lb_agents
        } else {
            &self.backend_agents
        }
    }

    /// Starts server node `i`'s TCP, connected-UDP and health servers.
    fn start_servers(&mut self, i: usize) -> Result<()> {
        let (tcp, udp, health) = start_servers(&self.servers()[i], &self.topo.spec.vips)?;
        if self.tcp.len() <= i {
            self.tcp.resize_with(i + 1, || None);
            self.udp.resize_with(i + 1, || None);
            self.health.resize_with(i + 1, || None);
        }
        self.tcp[i] = Some(tcp);
        self.udp[i] = Some(udp);
        self.health[i] = Some(health);
        Ok(())
    }

    /// Stops server node `backend`'s TCP, UDP and health servers: its flows break and
    /// its checks fail.
    pub fn stop_servers(&mut self, backend: &str) {
        let i = self.backend(backend).index;
        self.tcp[i] = None;
        self.udp[i] = None;
        self.health[i] = None;
    }

    /// The services' members at the start: (server index, weight).
    fn initial_members(&self) -> Vec<(usize, u32)> {
        self.plan.weights.iter().copied().enumerate().collect()
    }

    /// The services' config with `members` (server index, weight) as backends.
    fn service_configs(&self, members: &[(usize, u32)]) -> Vec<Value> {
        let members: Vec<(&Node, u32)> = members
            .iter()
            .map(|&(i, w)| (&self.servers()[i], w))
            .collect();
        let p = &self.plan;
        service_configs(
            &self.services,
            &members,
            (p.interval_ms, p.fall),
            p.table_bits,
        )
    }

    /// Whether every LB node's live table of every service is the same (both hops of
    /// every bucket); otherwise which node and service differ from lb0's.
    pub fn tables_differ(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for svc in &self.services {
            let reference = self.table(0, svc)?;
            for lb in 1..self.lb_agents.len() {
                let t = self.table(lb, svc)?;
                let differ = (0..reference.buckets.len())
                    .filter(|&b| reference.buckets[b] != t.buckets[b])
                    .count();
                if differ > 0 {
                    out.push(format!(
                        "{}: lb{lb} differs from lb0 in {differ} buckets",
                        svc.name
                    ));
                }
            }
        }
        Ok(out)
    }

    /// The server node named `name` (`b0`, ..., or `lb0`, ... in Unimog mode).
    pub fn backend(&self, name: &str) -> &Node {
        self.servers()
            .iter()
            .find(|b| b.name == name)
            .unwrap_or_else(|| panic!("no backend {name}"))
    }

    /// The name of the server node with address `a`.
    pub fn backend_name(&self, a: IpAddr) -> Option<&str> {
        self.servers()
            .iter()
            .find(|b| IpAddr::from(b.v4) == a || IpAddr::from(b.v6) == a)
            .map(|b| b.name.as_str())
    }

    /// The lab's clients' namespaces.
    pub fn clients(&self) -> Vec<&Netns> {
        self.topo.clients.iter().map(|c| &c.ns).collect()
    }

    /// The service of `kind` and family.
    pub fn service(&self, name: &str) -> &LabService {
        self.services
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no service {name}"))
    }

    /// The service a flow belongs to.
    pub fn service_of(&self, f: &Flow) -> &LabService {
        let proto = if f.kind == Kind::Tcp { 6 } else { 17 };
        self.services
            .iter()
            .find(|s| s.dst() == f.dst && s.proto == proto)
            .expect("a flow to a lab service")
    }

    /// Runs `lb <args>` on every LB agent, for every service: `{service}` and `{addr}` in
    /// `args` are replaced by the service's name and the backend's address of its
    /// family. Returns the first LB's output per service.
    pub fn apply(&self, backend: &str, args: &[&str]) -> Result<Vec<String>> {
        Ok(self
            .apply_each(backend, args)?
            .into_iter()
            .filter(|r| r.node == "lb0")
            .map(|r| r.output)
            .collect())
    }

    /// As `apply`, with every command that ran, where, and what it printed, in order.
    pub fn apply_each(&self, backend: &str, args: &[&str]) -> Result<Vec<Ran>> {
        let b = self.backend(backend);
        let mut out = Vec::new();
        for s in &self.services {
            let a = s.backend_addr(b).to_string();
            let args: Vec<String> = args
                .iter()
                .map(|x| x.replace("{service}", s.name).replace("{addr}", &a))
                .collect();
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            for (i, agent) in self.lb_agents.iter().enumerate() {
                out.push(Ran {
                    node: format!("lb{i}"),
                    command: format!("lb {}", args.join(" ")),
                    output: agent.ok(&args)?,
                });
            }
        }
        Ok(out)
    }

    /// The backend path's counters of every backend node that are not zero, one line per
    /// node ("b0: accept_socket 1234, second_hop 56, ...").
    pub fn backend_paths(&self) -> Vec<String> {
        const PATH: [Reason; 8] = [
            Reason::DeliveredLocally,
            Reason::SentOnFromLocal,
            Reason::AcceptSyn,
            Reason::AcceptSocket,
            Reason::AcceptLastHop,
            Reason::SecondHop,
            Reason::ReturnedToFirstHop,
            Reason::AcceptReturned,
        ];
        let on_path = |name: &str| PATH.iter().any(|r| r.name() == name);
        self.server_agents()
            .iter()
            .zip(self.servers())
            .map(|(agent, node)| {
                let counts = agent.status().map(|s| {
                    s["reasons"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|r| on_path(r["reason"].as_str().unwrap_or_default()))
                        .filter(|r| r["packets"].as_u64().unwrap_or(0) > 0)
                        .map(|r| {
                            format!("{} {}", r["reason"].as_str().unwrap_or("?"), r["packets"])
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                });
                format!(
                    "{}: {}",
                    node.name,
                    counts.unwrap_or_else(|e| format!("({e:#})"))
                )
            })
            .collect()
    }

    /// What every backend's UDP server did with client `peer`'s sessions, in order, with
    /// seconds since the lab started.
    pub fn session_history(&self, peer: SocketAddr) -> Vec<String> {
        let mut out: Vec<(Instant, String)> = Vec::new();
        for (b, server) in self.servers().iter().zip(&self.udp) {
            if let Some(server) = server {
                out.extend(
                    server
                        .history(peer)
                        .into_iter()
                        .map(|(at, what)| (at, format!("{}: {what}", b.name))),
                );
            }
        }
        out.sort();
        out.into_iter()
            .map(|(at, what)| format!("{} {what}", self.since(at)))
            .collect()
    }

    /// `at` as seconds since the lab started ("12.345s"), how the diagnostics tell time.
    pub fn since(&self, at: Instant) -> String {
        format!("{:.3}s", (at - self.started).as_secs_f64())
    }

    /// Health verdicts the LB agents logged so far ("lb0: ... backend down"), in order.
    pub fn health_flips(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (i, agent) in self.lb_agents.iter().enumerate() {
            out.extend(
                agent
                    .log()
                    .lines()
                    .filter(|l| l.contains("lb::health: backend "))
                    .map(|l| format!("lb{i}: {l}")),
            );
        }
        out
    }

    /// `lb backend add` for `backend` on every service, with the lab's health check.
    pub fn add_backend(&self, backend: &str, weight: u32) -> Result<Vec<String>> {
        let args = self.add_backend_args(weight);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.apply(backend, &args)
    }

    /// The arguments of `lb backend add` (with `{service}` and `{addr}` for `apply`) that
    /// give a backend the lab's health check.
    pub fn add_backend_args(&self, weight: u32) -> Vec<String> {
        let p = &self.plan;
        [
            "backend",
            "add",
            "{service}",
            "{addr}",
            "--weight",
            &weight.to_string(),
            "--health",
            "tcp",
            "--health-port",
            &HEALTH_PORT.to_string(),
            "--health-interval-ms",
            &p.interval_ms.to_string(),
            "--health-timeout-ms",
            &(p.interval_ms / 2).to_string(),
            "--health-fall",
            &p.fall.to_string(),
        ]
        .map(String::from)
        .to_vec()
    }

    /// Closes `backend`'s health port, so its checks fail.
    pub fn fail_health(&mut self, backend: &str) {
        let i = self.backend(backend).index;
        self.health[i] = None;
    }

    /// Restarts every LB agent (SIGTERM, then a new process with the same file), one after
    /// the other; returns what each logged about its tables at the start.
    pub fn restart_lbs(&mut self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for agent in &mut self.lb_agents {
            agent.terminate()?;
            let logged = agent.log().len();
            agent.spawn()?;
            let log = agent.log();
            out.extend(
                log[logged..]
                    .lines()
                    .filter(|l| l.contains("table rebuilt") || l.contains("running tables"))
                    .map(|l| format!("{}: {}", agent.name, l.split("INFO ").last().unwrap_or(l))),
            );
        }
        Ok(out)
    }

    /// Lines of each of `sizes` bytes echoed through the TCP services (IPv4 and, when the
    /// lab serves it, IPv6) on a new connection each: full-size packets make it through
    /// the encapsulation (path-MTU discovery, MSS clamping). Returns one line per echo.
    pub fn large_echoes(&self, sizes: &[usize], timeout: Duration) -> Result<Vec<String>> {
        let client = &self.topo.clients[0];
        let mut done = Vec::new();
        for svc in self.services.iter().filter(|s| s.proto == 6) {
            let mut conn = TcpConn::connect(client, svc.dst(), timeout)?;
            for &size in sizes {
                let mut line: Vec<u8> = (0..size - 1).map(|i| b'a' + (i % 26) as u8).collect();
                line.push(b'\n');
                let started = Instant::now();
                conn.echo(&line).with_context(|| {
                    format!(
                        "{size}-byte line to {} ({}) via {}\n  backend paths:\n    {}",
                        svc.name,
                        svc.dst(),
                        conn.server,
                        self.backend_paths().join("\n    ")
                    )
                })?;
                done.push(format!(
                    "{size} bytes to {} ({}) on {}: echoed in {:.1?}",
                    svc.name,
                    svc.dst(),
                    conn.server,
                    started.elapsed()
                ));
            }
        }
        Ok(done)
    }

    /// Opens `backend`'s health port again, so its checks pass.
    pub fn restore_health(&mut self, backend: &str) -> Result<()> {
        let b = self.backend(backend);
        let server = TcpServer::start(b, &b.name, &b.sockaddrs(HEALTH_PORT))?;
        let i = b.index;
        self.health[i] = Some(server);
        Ok(())
    }

    /// Waits until every LB agent reports `backend` with health `want` ("up"/"down") in
    /// every service, at most `timeout`.
    pub fn wait_health(&self, backend: &str, want: &str, timeout: Duration) -> Result<Duration> {
        let b = self.backend(backend);
        let started = Instant::now();
        loop {
            let mut all = true;
            for agent in &self.lb_agents {
                let st = agent.status()?;
                for s in st["services"].as_array().into_iter().flatten() {
                    let svc = self.service(s["name"].as_str().unwrap_or_default());
                    let a = svc.backend_addr(b).to_string();
                    for be in s["backends"].as_array().into_iter().flatten() {
                        if be["address"].as_str() == Some(a.as_str()) && be["health"] != want {
                            all = false;
                        }
                    }
                }
            }
            if all {
                return Ok(started.elapsed());
            }
            if started.elapsed() > timeout {
                bail!("{backend} not {want} after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The live table of `service` on LB node `lb`.
    pub fn table(&self, lb: usize, service: &LabService) -> Result<LiveTable> {
        LiveTable::read(
            &self.lb_agents[lb].pin_dir,
            service.vip,
            service.port,
            service.proto,
        )
    }

    /// Flows open, or broken in step `step` or the one before (a break seen after a step's
    /// check counts in that step), that the live tables (of every LB node) do not lead to
    /// their backend: it is neither the first nor the second hop of the flow's bucket.
    /// These are the flows the design cannot keep.
    pub fn stranded(&self, flows: &[Flow], step: usize) -> Result<Vec<(Flow, String)>> {
        let mut tables = BTreeMap::new();
        let mut out = Vec::new();
        let live = |f: &&Flow| match &f.fate {
            Fate::Open => true,
            Fate::Broken { step: s, .. } => *s + 1 >= step,
            Fate::Closed { .. } => false,
        };
        for f in flows.iter().filter(live) {
            let svc = self.service_of(f);
            let backend = svc.backend_addr(self.backend(&f.server));
            for lb in 0..self.lb_agents.len() {
                let key = (lb, svc.name);
                let table = match tables.entry(key) {
                    Entry::Occupied(e) => e.into_mut(),
                    Entry::Vacant(e) => e.insert(self.table(lb, svc)?),
                };
                let (first, second) = table.hops(&f.tuple());
                if first != Some(backend) && second != Some(backend) {
                    let show = |a: Option<IpAddr>| {
                        a.and_then(|a| self.backend_name(a))
                            .unwrap_or("-")
                            .to_owned()
                    };
                    out.push((
                        f.clone(),
                        format!("lb{lb}: hops {} / {}", show(first), show(second)),
                    ));
                }
            }
        }
        Ok(out)
    }
}

/// Open flows per backend name.
pub fn per_server(flows: &[Flow]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for f in flows.iter().filter(|f| f.fate == Fate::Open) {
        *m.entry(f.server.clone()).or_default() += 1;
    }
    m
}

/// Flows broken during step `step`.
pub fn broken_in(flows: &[Flow], step: usize) -> Vec<&Flow> {
    flows
        .iter()
        .filter(|f| matches!(&f.fate, Fate::Broken { step: s, .. } if *s == step))
        .collect()
}

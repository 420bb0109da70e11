//! A UDP server that gives every client a connected socket of its own (as QUIC servers
//! do), and the client side of such a session.

use std::{
    collections::BTreeMap,
    io,
    net::{SocketAddr, UdpSocket},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use socket2::{Domain, Protocol, Socket, Type};

use crate::{traffic::timed_out, Netns};

/// How often server threads look at their stop flag.
const POLL: Duration = Duration::from_millis(50);

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
            Err(e) if timed_out(&e) => {}
            // ECONNREFUSED from an ICMP error: the client went away.
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A UDP socket with `SO_REUSEADDR` and `SO_REUSEPORT`, bound to `local` and connected to
/// `peer` when given.
fn reuseport_udp(local: SocketAddr, peer: Option<SocketAddr>) -> io::Result<UdpSocket> {
    let sock = Socket::new(Domain::for_address(local), Type::DGRAM, Some(Protocol::UDP))?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    sock.bind(&local.into())?;
    if let Some(peer) = peer {
        sock.connect(&peer.into())?;
    }
    Ok(sock.into())
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
                    Err(e) if timed_out(&e) => break,
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

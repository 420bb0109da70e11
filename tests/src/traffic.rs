//! TCP and UDP servers and clients that run inside namespaces, in threads.
//!
//! The protocol says who answered, so tests can see which backend got a flow:
//! - TCP: on accept the server writes `<name>\n`, then echoes everything until EOF.
//! - UDP: each datagram is answered with `<name>\n` followed by the datagram.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use socket2::{Domain, Protocol, Socket, Type};

use crate::Netns;

/// How often server threads look at their stop flag.
const POLL: Duration = Duration::from_millis(50);

/// Sockets bound inside a namespace, each served by a thread of its own (sockets stay
/// in the namespace they were made in, so the threads can run anywhere). Dropping it
/// stops and joins the threads.
#[derive(Debug)]
struct Serving {
    /// Connections accepted (TCP) or datagrams received (UDP).
    count: Arc<AtomicU64>,
    addrs: Vec<SocketAddr>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Serving {
    fn start<S: Send + 'static>(
        ns: &Netns,
        addrs: &[SocketAddr],
        bind: impl Fn(&SocketAddr) -> Result<(S, SocketAddr)> + Sync,
        serve: impl Fn(S, Arc<AtomicBool>, Arc<AtomicU64>) + Clone + Send + 'static,
    ) -> Result<Self> {
        let bound = ns.run(|| addrs.iter().map(&bind).collect::<Result<Vec<_>>>())?;
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let mut local = Vec::new();
        let mut threads = Vec::new();
        for (sock, addr) in bound {
            local.push(addr);
            let (serve, stop, count) = (serve.clone(), stop.clone(), count.clone());
            threads.push(std::thread::spawn(move || serve(sock, stop, count)));
        }
        Ok(Self {
            count,
            addrs: local,
            stop,
            threads,
        })
    }

    fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A TCP server answering with its name then echoing (see the module docs).
#[derive(Debug)]
pub struct TcpServer(Serving);

impl TcpServer {
    /// Listens on each of `addrs` inside `ns` (`[::]:port` takes IPv4 and IPv6 on every
    /// address, the VIPs on `lo` included).
    pub fn start(ns: &Netns, name: &str, addrs: &[SocketAddr]) -> Result<Self> {
        let bind = |a: &SocketAddr| {
            let l = TcpListener::bind(a).with_context(|| format!("binding TCP {a}"))?;
            l.set_nonblocking(true)?;
            let local = l.local_addr()?;
            Ok((l, local))
        };
        let name = name.to_owned();
        let serve =
            move |l, stop, accepted: Arc<AtomicU64>| accept_loop(l, &name, &stop, &accepted);
        Serving::start(ns, addrs, bind, serve).map(Self)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.0.count()
    }

    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.0.addrs
    }
}

fn accept_loop(l: TcpListener, name: &str, stop: &Arc<AtomicBool>, accepted: &AtomicU64) {
    let mut conns = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        match l.accept() {
            Ok((s, _)) => {
                accepted.fetch_add(1, Ordering::Relaxed);
                let (stop, name) = (stop.clone(), name.to_owned());
                conns.push(std::thread::spawn(move || {
                    let _ = serve_conn(s, &name, &stop);
                }));
            }
            Err(_) => std::thread::sleep(POLL),
        }
        conns.retain(|c: &JoinHandle<()>| !c.is_finished());
    }
    for c in conns {
        let _ = c.join();
    }
}

fn serve_conn(mut s: TcpStream, name: &str, stop: &AtomicBool) -> io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(POLL))?;
    s.write_all(format!("{name}\n").as_bytes())?;
    let mut buf = [0u8; 16 * 1024];
    while !stop.load(Ordering::Relaxed) {
        match s.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => s.write_all(&buf[..n])?,
            Err(e) if timed_out(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A UDP server answering each datagram with its name and the datagram.
#[derive(Debug)]
pub struct UdpServer(Serving);

impl UdpServer {
    /// Binds each of `addrs` inside `ns`. Bind the exact addresses (VIPs included, see
    /// [`Topology::backend_sockaddrs`](crate::Topology::backend_sockaddrs)) rather than
    /// a wildcard, so answers leave from the address the client sent to.
    pub fn start(ns: &Netns, name: &str, addrs: &[SocketAddr]) -> Result<Self> {
        let bind = |a: &SocketAddr| {
            let s = UdpSocket::bind(a).with_context(|| format!("binding UDP {a}"))?;
            s.set_read_timeout(Some(POLL))?;
            let local = s.local_addr()?;
            Ok((s, local))
        };
        let prefix = format!("{name}\n").into_bytes();
        let serve = move |s: UdpSocket, stop: Arc<AtomicBool>, received: Arc<AtomicU64>| {
            let mut buf = vec![0u8; 65536];
            buf[..prefix.len()].copy_from_slice(&prefix);
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, from)) = s.recv_from(&mut buf[prefix.len()..]) {
                    received.fetch_add(1, Ordering::Relaxed);
                    let _ = s.send_to(&buf[..prefix.len() + n], from);
                }
            }
        };
        Serving::start(ns, addrs, bind, serve).map(Self)
    }

    /// Datagrams received so far.
    pub fn received(&self) -> u64 {
        self.0.count()
    }

    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.0.addrs
    }
}

/// A TCP connection made from inside a namespace to a [`TcpServer`].
#[derive(Debug)]
pub struct TcpConn {
    /// The name of the server that accepted the connection.
    pub server: String,
    reader: BufReader<TcpStream>,
}

impl TcpConn {
    /// Connects from `ns` to `dst` and reads the server's name.
    pub fn connect(ns: &Netns, dst: SocketAddr, timeout: Duration) -> Result<Self> {
        let stream = ns.run(|| {
            TcpStream::connect_timeout(&dst, timeout)
                .with_context(|| format!("TCP connect to {dst} from {}", ns.name()))
        })?;
        Self::named(stream, dst, timeout)
    }

    /// Connects from `ns` to `dst` from the local address `local` (port included), with
    /// `SO_REUSEADDR`: a new connection on the ports of an earlier one.
    pub fn connect_from(
        ns: &Netns,
        local: SocketAddr,
        dst: SocketAddr,
        timeout: Duration,
    ) -> Result<Self> {
        let stream = ns.run(|| {
            bound_connect(local, dst, timeout)
                .with_context(|| format!("TCP connect to {dst} from {local} in {}", ns.name()))
        })?;
        Self::named(stream, dst, timeout)
    }

    /// Reads the server's name from a new connection.
    fn named(stream: TcpStream, dst: SocketAddr, timeout: Duration) -> Result<Self> {
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let mut reader = BufReader::new(stream);
        let mut server = String::new();
        reader
            .read_line(&mut server)
            .with_context(|| format!("reading the server name from {dst}"))?;
        if !server.ends_with('\n') {
            bail!("{dst} closed before naming itself");
        }
        server.pop();
        Ok(Self { server, reader })
    }

    /// Sends `data` and checks it comes back (the connection still works end to end).
    pub fn echo(&mut self, data: &[u8]) -> Result<()> {
        self.reader.get_mut().write_all(data)?;
        let mut back = vec![0u8; data.len()];
        self.reader
            .read_exact(&mut back)
            .context("reading the echo")?;
        if back != data {
            bail!("echo differs from what was sent");
        }
        Ok(())
    }

    pub fn stream(&self) -> &TcpStream {
        self.reader.get_ref()
    }
}

/// A TCP connection from `local` to `dst`: `SO_REUSEADDR`, bind, then a connect that
/// gives up after `timeout`.
fn bound_connect(local: SocketAddr, dst: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let sock = Socket::new(
        Domain::for_address(local),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    sock.set_reuse_address(true)?;
    sock.bind(&local.into())?;
    sock.connect_timeout(&dst.into(), timeout)?;
    Ok(sock.into())
}

/// A socket call that ended on its timeout (`SO_RCVTIMEO` and `SO_SNDTIMEO` give
/// `WouldBlock`, or `TimedOut`).
pub(crate) fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Connects from `ns` to `dst` and returns the name of the server that answered.
pub fn tcp_request(ns: &Netns, dst: SocketAddr, timeout: Duration) -> Result<String> {
    Ok(TcpConn::connect(ns, dst, timeout)?.server)
}

/// Sends `payload` from `ns` to `dst` from a fresh socket (a new source port, so a new
/// flow) and returns the name of the server that answered.
pub fn udp_request(
    ns: &Netns,
    dst: SocketAddr,
    payload: &[u8],
    timeout: Duration,
) -> Result<String> {
    let sock = ns.run(|| {
        let s = UdpSocket::bind(unspecified_for(dst))?;
        s.connect(dst)?;
        Ok(s)
    })?;
    sock.set_read_timeout(Some(timeout))?;
    sock.send(payload)?;
    let mut buf = vec![0u8; payload.len() + 256];
    let n = sock
        .recv(&mut buf)
        .with_context(|| format!("no UDP answer from {dst} within {timeout:?}"))?;
    let reply = &buf[..n];
    let Some(nl) = reply.iter().position(|&b| b == b'\n') else {
        bail!("malformed answer from {dst}");
    };
    if &reply[nl + 1..] != payload {
        bail!("answer from {dst} does not echo the request");
    }
    Ok(String::from_utf8_lossy(&reply[..nl]).into_owned())
}

/// Sends one datagram to `dst` from each of `flows` fresh sockets (distinct source
/// ports), without waiting for answers.
pub fn udp_send(ns: &Netns, dst: SocketAddr, payload: &[u8], flows: usize) -> Result<()> {
    ns.run(|| {
        for _ in 0..flows {
            let s = UdpSocket::bind(unspecified_for(dst))?;
            s.send_to(payload, dst)
                .with_context(|| format!("sending to {dst}"))?;
        }
        Ok(())
    })
}

fn unspecified_for(dst: SocketAddr) -> SocketAddr {
    match dst {
        SocketAddr::V4(_) => "0.0.0.0:0".parse().expect("valid"),
        SocketAddr::V6(_) => "[::]:0".parse().expect("valid"),
    }
}

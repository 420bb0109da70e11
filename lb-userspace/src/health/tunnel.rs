//! Checks that follow the client's path (`health.tunnel`): the probe reaches the backend
//! GUE-encapsulated, as the load balancer forwards client packets, so a backend that no
//! longer decapsulates (its XDP program gone) fails the check although it still answers
//! direct connections.
//!
//! The inner packet goes from this node's address to the VIP, and the backend answers it
//! directly (server return), to this node:
//! - UDP: the datagram comes from a socket bound to this node's address, which takes the
//!   answer from VIP:port.
//! - TCP (IPv4): a SYN; the SYN-ACK is read from a raw socket (`CAP_NET_RAW`), and a RST
//!   through the tunnel closes the half-open connection on the backend.
//!
//! Either way, an ICMP port unreachable for the GUE port (nothing decapsulates there)
//! fails the check at once with that reason.

use std::{
    io::ErrorKind,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use lb_common::encap::{write_gue, GUE_LEN};

use super::CheckResult;
use crate::config::{CheckKind, HealthConfig};

/// Where a tunnel check's packets go and come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tunnel {
    /// This node's address of the VIP's family: the inner source, where answers come.
    pub node: IpAddr,
    pub gue_port: u16,
    pub vip: IpAddr,
}

/// Runs one check of `backend` for service port `port` through the tunnel, within the
/// configured timeout.
pub async fn check(backend: IpAddr, port: u16, t: &Tunnel, config: &HealthConfig) -> CheckResult {
    let (t, config) = (t.clone(), config.clone());
    let deadline = Instant::now() + config.timeout();
    tokio::task::spawn_blocking(move || {
        let r = match config.kind {
            CheckKind::Udp => udp(backend, port, &t, &config, deadline),
            _ => tcp(backend, port, &t, deadline),
        };
        r.unwrap_or_else(|e| e)
    })
    .await
    .unwrap_or_else(|e| CheckResult::fail(format_args!("tunnel check task: {e}")))
}

/// The GUE header and a hop list with no hop left: the backend must accept the packet.
fn gue(inner: &IpAddr, packet: &[u8]) -> Vec<u8> {
    let mut g = [0u8; GUE_LEN];
    write_gue(&mut g, 0, inner.is_ipv6(), (0, 0), &[0; 16]);
    let mut out = g.to_vec();
    out.extend_from_slice(packet);
    out
}

/// A UDP socket connected to the backend's GUE port.
fn tunnel_socket(backend: IpAddr, gue_port: u16) -> Result<UdpSocket, CheckResult> {
    let any: SocketAddr = match backend {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let s = UdpSocket::bind(any).map_err(|e| fail("tunnel socket", &e))?;
    s.connect((backend, gue_port))
        .map_err(|e| fail("tunnel connect", &e))?;
    s.set_nonblocking(true)
        .map_err(|e| fail("tunnel socket", &e))?;
    Ok(s)
}

/// Whether the tunnel socket heard an ICMP port unreachable (nothing decapsulates).
fn refused(tunnel: &UdpSocket) -> Option<CheckResult> {
    let mut b = [0u8; 1];
    match tunnel.recv(&mut b) {
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => Some(CheckResult::fail(
            "GUE port unreachable: the backend does not decapsulate",
        )),
        _ => None,
    }
}

fn udp(
    backend: IpAddr,
    port: u16,
    t: &Tunnel,
    config: &HealthConfig,
    deadline: Instant,
) -> Result<CheckResult, CheckResult> {
    // Not connected to the VIP: an LB node may route it nowhere (a blackhole, so that
    // VIP packets the program passes go no further), where connect fails with EINVAL.
    // The source of each answer is checked instead.
    let reply = UdpSocket::bind((t.node, 0)).map_err(|e| fail("bind", &e))?;
    let from_vip = SocketAddr::new(t.vip, port);
    let local = reply.local_addr().map_err(|e| fail("bind", &e))?.port();
    let payload = config.udp_payload();
    let builder = match (t.node, t.vip) {
        (IpAddr::V4(s), IpAddr::V4(d)) => PacketBuilder::ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => PacketBuilder::ipv6(s.octets(), d.octets(), 64),
        _ => {
            return Err(CheckResult::fail(
                "node address and VIP of different families",
            ))
        }
    }
    .udp(local, port);
    let mut inner = Vec::with_capacity(builder.size(payload.len()));
    builder
        .write(&mut inner, payload)
        .map_err(|e| CheckResult::fail(format_args!("building the probe: {e}")))?;
    let tunnel = tunnel_socket(backend, t.gue_port)?;
    tunnel
        .send(&gue(&t.vip, &inner))
        .map_err(|e| fail("tunnel send", &e))?;
    reply
        .set_read_timeout(Some(Duration::from_millis(10)))
        .map_err(|e| fail("socket", &e))?;
    let mut buf = [0u8; 1500];
    while Instant::now() < deadline {
        match reply.recv_from(&mut buf) {
            Ok((_, from)) if from != from_vip => {}
            Ok((n, _)) => {
                return Ok(CheckResult::ok(format_args!(
                    "answered through the tunnel ({n} bytes)"
                )))
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return Err(fail("answer through the tunnel", &e)),
        }
        if let Some(r) = refused(&tunnel) {
            return Err(r);
        }
    }
    Err(CheckResult::fail(format_args!(
        "no answer through the tunnel in {}ms",
        config.timeout_ms
    )))
}

fn tcp(
    backend: IpAddr,
    port: u16,
    t: &Tunnel,
    deadline: Instant,
) -> Result<CheckResult, CheckResult> {
    let (IpAddr::V4(node), IpAddr::V4(vip)) = (t.node, t.vip) else {
        return Err(CheckResult::fail("TCP tunnel checks are IPv4 only"));
    };
    // Holds the port, so no connection of this node's own uses it meanwhile.
    let held = TcpListener::bind((node, 0)).map_err(|e| fail("bind", &e))?;
    let local = held.local_addr().map_err(|e| fail("bind", &e))?.port();
    let raw = raw_tcp_socket()?;
    let seq = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.subsec_nanos());
    let segment = |b: etherparse::PacketBuilderStep<etherparse::TcpHeader>| {
        let mut v = Vec::with_capacity(64);
        b.write(&mut v, &[]).map(|_| v)
    };
    let syn = segment(
        PacketBuilder::ipv4(node.octets(), vip.octets(), 64)
            .tcp(local, port, seq, 64240)
            .syn(),
    )
    .map_err(|e| CheckResult::fail(format_args!("building the probe: {e}")))?;
    let tunnel = tunnel_socket(backend, t.gue_port)?;
    tunnel
        .send(&gue(&t.vip, &syn))
        .map_err(|e| fail("tunnel send", &e))?;
    let mut buf = [0u8; 1500];
    let verdict = loop {
        if Instant::now() >= deadline {
            break Err(CheckResult::fail("no SYN-ACK through the tunnel in time"));
        }
        if let Some(r) = refused(&tunnel) {
            break Err(r);
        }
        // SAFETY: reading into a buffer of the given length.
        let n = unsafe { libc::recv(raw.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n <= 0 {
            continue;
        }
        let Ok(p) = SlicedPacket::from_ip(&buf[..n as usize]) else {
            continue;
        };
        let (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Tcp(tcp))) = (p.net, p.transport)
        else {
            continue;
        };
        let h = ip.header();
        if h.source_addr() != vip
            || h.destination_addr() != node
            || tcp.source_port() != port
            || tcp.destination_port() != local
        {
            continue;
        }
        if tcp.rst() {
            break Err(CheckResult::fail("refused (RST) through the tunnel"));
        }
        if tcp.syn() && tcp.ack() && tcp.acknowledgment_number() == seq.wrapping_add(1) {
            break Ok(CheckResult::ok("SYN-ACK through the tunnel"));
        }
    };
    if verdict.is_ok() {
        // Close the backend's half-open connection the way it was opened.
        if let Ok(rst) = segment(
            PacketBuilder::ipv4(node.octets(), vip.octets(), 64)
                .tcp(local, port, seq.wrapping_add(1), 0)
                .rst(),
        ) {
            let _ = tunnel.send(&gue(&t.vip, &rst));
        }
    }
    drop(held);
    verdict
}

/// A raw IPv4 TCP socket that sees every TCP packet this host receives, with a short
/// receive timeout so the loop above can watch the deadline.
fn raw_tcp_socket() -> Result<OwnedFd, CheckResult> {
    // SAFETY: plain socket call; the descriptor is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_TCP,
        )
    };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return Err(if e.kind() == ErrorKind::PermissionDenied {
            CheckResult::fail("TCP tunnel checks need CAP_NET_RAW (a raw socket sees the SYN-ACK)")
        } else {
            fail("raw socket", &e)
        });
    }
    // SAFETY: fd is a new descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 10_000,
    };
    // SAFETY: valid option pointer and length.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    Ok(fd)
}

fn fail(what: &str, e: &std::io::Error) -> CheckResult {
    super::io_reason(what, e)
}

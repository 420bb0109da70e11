//! The environment of the data-plane fixture tests: a namespace with one veth (`fx0`),
//! the node's addresses, routes to the backends' networks through a gateway with a
//! permanent neighbour entry (so `bpf_fib_lookup` gives known answers), the VIPs on `lo`
//! and forwarding on; and one BPF_PROG_TEST_RUN of the program on a frame.
//!
//! Addresses are those of `lb_common::packet::example`: node 10.0.0.1 / fd00::1, gateway
//! 10.0.0.2 / fd00::2, backends' networks 10.1.0.0/16 and fd01::/64, VIPs 192.0.2.10
//! and 2001:db8::10.

use anyhow::{bail, Context, Result};
use aya::programs::{TestRun, TestRunOptions};
use lb::dataplane::Dataplane;
use lb_common::{
    maps::{Bucket, ServiceBackendKey, ServiceKey, ServiceValue, NO_BACKEND},
    packet::example::NODE_MAC,
};

use crate::{link::fmt_mac, topology::PREFIX, Netns};

/// The fixture node's interface.
pub const IF: &str = "fx0";
/// The gateway's MAC: what the program writes as the destination of what it sends.
pub const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// Creates the fixture network in a new namespace named after this process and `tag`
/// (`lbt-<pid>-<tag>`, so `cargo xtask lab down --stale` removes it once the process is
/// gone).
pub fn namespace(tag: &str) -> Result<Netns> {
    let ns = Netns::create(&format!("{PREFIX}{}-{tag}", std::process::id()))?;
    let (node, gw) = (fmt_mac(&NODE_MAC), fmt_mac(&GW_MAC));
    let cmds: Vec<String> = vec![
        format!("link add {IF} address {node} type veth peer name fx1 address {gw}"),
        format!("link set {IF} up"),
        "link set fx1 up".into(),
        "link set lo up".into(),
        format!("addr add 10.0.0.1/24 dev {IF}"),
        format!("addr add fd00::1/64 dev {IF} nodad"),
        format!("neigh add 10.0.0.2 lladdr {gw} dev {IF} nud permanent"),
        format!("neigh add fd00::2 lladdr {gw} dev {IF} nud permanent"),
        "route add 10.1.0.0/16 via 10.0.0.2".into(),
        "-6 route add fd01::/64 via fd00::2".into(),
        // Local ends for the socket-lookup cases.
        "addr add 192.0.2.10/32 dev lo".into(),
        "addr add 2001:db8::10/128 dev lo nodad".into(),
    ];
    for c in cmds {
        let mut argv = vec!["ip".to_string()];
        argv.extend(c.split_whitespace().map(String::from));
        ns.exec(&argv).with_context(|| format!("ip {c}"))?;
    }
    // bpf_fib_lookup answers only for interfaces that forward.
    ns.exec(&[
        "sysctl",
        "-qw",
        "net.ipv4.conf.all.forwarding=1",
        "net.ipv6.conf.all.forwarding=1",
    ])?;
    Ok(ns)
}

/// What one run of the program did with a frame.
pub struct Run {
    /// The XDP action.
    pub verdict: u32,
    /// The frame as the program left it.
    pub output: Vec<u8>,
}

/// Runs the program once on `input` as if it arrived on the interface `ifindex`.
pub fn test_run(dp: &mut Dataplane, ifindex: u32, input: &[u8]) -> Result<Run> {
    // xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&(input.len() as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    let mut out = vec![0u8; 4096];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(input);
    opts.data_out = Some(&mut out);
    opts.ctx_in = Some(&ctx);
    let res = dp.program().test_run(opts).context("BPF_PROG_TEST_RUN")?;
    out.truncate(res.data_size_out as usize);
    Ok(Run {
        verdict: res.return_value,
        output: out,
    })
}

/// Writes `buckets` (a power of two of them) as the table of service `id`, at
/// `id * buckets.len()` in the bucket map, opens the counters of the service and each
/// backend it sends to, and points the service (`addr`, `port`, `proto`) at the table:
/// how the tests set up a data plane without the agent.
pub fn install_service(
    dp: &mut Dataplane,
    (addr, port, proto): ([u8; 16], u16, u8),
    id: u32,
    buckets: &[Bucket],
) -> Result<()> {
    let offset = id * buckets.len() as u32;
    dp.write_table(offset, buckets)?;
    let firsts: std::collections::BTreeSet<u32> = buckets
        .iter()
        .map(|b| b.first)
        .filter(|f| *f != NO_BACKEND)
        .collect();
    for backend in firsts {
        dp.open_service_backend(ServiceBackendKey {
            service: id,
            backend,
        })?;
    }
    let key = ServiceKey {
        addr,
        port_be: port.to_be(),
        proto,
        _pad: 0,
    };
    let value = ServiceValue {
        id,
        table_offset: offset,
        table_bits: buckets.len().trailing_zeros(),
        flags: 0,
    };
    dp.set_service(&key, &value)?;
    Ok(())
}

/// The sequence number of the next segment `s` sends and the acknowledgment it carries,
/// read in TCP repair mode (left again without a window probe).
pub fn next_seq_ack(s: &std::net::TcpStream) -> Result<(u32, u32)> {
    const TCP_REPAIR: libc::c_int = 19;
    const TCP_REPAIR_QUEUE: libc::c_int = 20;
    const TCP_QUEUE_SEQ: libc::c_int = 21;
    const TCP_RECV_QUEUE: libc::c_int = 1;
    const TCP_SEND_QUEUE: libc::c_int = 2;
    const TCP_REPAIR_OFF_NO_WP: libc::c_int = -1;
    use std::os::fd::AsRawFd;
    let fd = s.as_raw_fd();
    let set = |opt, v: libc::c_int| -> Result<()> {
        // SAFETY: a valid socket fd and an int option of the right size.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_TCP,
                opt,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            bail!("setsockopt {opt}: {}", std::io::Error::last_os_error());
        }
        Ok(())
    };
    let get_seq = |queue| -> Result<u32> {
        set(TCP_REPAIR_QUEUE, queue)?;
        let mut v: u32 = 0;
        let mut len = std::mem::size_of::<u32>() as libc::socklen_t;
        // SAFETY: a valid socket fd and a u32 buffer of the length given.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::IPPROTO_TCP,
                TCP_QUEUE_SEQ,
                (&mut v as *mut u32).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            bail!("TCP_QUEUE_SEQ: {}", std::io::Error::last_os_error());
        }
        Ok(v)
    };
    set(TCP_REPAIR, 1)?;
    let seqs = get_seq(TCP_SEND_QUEUE).and_then(|snd| Ok((snd, get_seq(TCP_RECV_QUEUE)?)));
    set(TCP_REPAIR, TCP_REPAIR_OFF_NO_WP)?;
    seqs
}

//! `lab`: a test-bed topology that stays up for manual exploration.
//! `lab up` builds one, `lab down [NAME]` removes it, `lab down --all` removes every
//! test-bed leftover. `cargo xtask lab ...` runs this.
//!
//! `lab up --unimog N` builds N nodes that each both balance and serve, and starts on
//! every one of them `lb agent` and the test bed's servers, in the background; `lab down`
//! stops them.

use std::{
    fs,
    net::IpAddr,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use clap::{Parser, Subcommand};
use lb_common::limits::DEFAULT_TABLE_BITS;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tests::{
    agent::{lb_binary, node_config},
    churn::{lab_services, service_configs, start_servers},
    link::fmt_mac,
    netns,
    topology::PREFIX,
    Node, Role, Spec, Topology, VIP_V4, VIP_V6,
};

/// Where lab records are kept.
const RECORD_DIR: &str = "/run/lb-lab";
/// Where the router's `lb_pass` links are pinned, one directory per lab.
const PIN_DIR: &str = "/sys/fs/bpf/lb-lab";
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

#[derive(Parser)]
#[command(
    name = "lab",
    about = "A network-namespace topology for trying lb by hand"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build a topology that stays up, and print how to enter it.
    Up {
        /// Name of the lab (letters and digits, starting with a letter).
        #[arg(long, default_value = "lab")]
        name: String,
        #[arg(long, default_value_t = 1)]
        clients: usize,
        #[arg(long, default_value_t = 1)]
        lbs: usize,
        #[arg(long, default_value_t = 2)]
        backends: usize,
        /// MTU of every link.
        #[arg(long, default_value_t = 1500)]
        mtu: u32,
        /// A VIP (repeatable); default 10.100.0.1 and fd00:100::1.
        #[arg(long = "vip")]
        vips: Vec<IpAddr>,
        /// Do not attach lb_pass on the router's LB and backend ends (native XDP_TX on
        /// veth then goes nowhere).
        #[arg(long)]
        no_router_pass: bool,
        /// Unimog mode: N nodes (lb0, lb1, ...) that are all both LB nodes and backends
        /// behind the router's ECMP, each running `lb agent` (services web, web6 and quic
        /// with every node as a backend) and TCP and UDP servers on the VIPs; `--lbs` and
        /// `--backends` are not used.
        #[arg(long, value_name = "N")]
        unimog: Option<usize>,
    },
    /// The servers of a Unimog lab node, until SIGTERM (`lab up --unimog` starts one per
    /// node in the background).
    #[command(hide = true)]
    Serve { lab: String, node: usize },
    /// Remove a lab (default `lab`), or with --all every test-bed leftover.
    Down {
        name: Option<String>,
        /// Remove every lbt-* namespace and interface and every lab record, including
        /// those of running tests.
        #[arg(long, conflicts_with = "name")]
        all: bool,
        /// Remove only what test runs that no longer exist left behind (safe while
        /// other tests and labs run).
        #[arg(long, conflicts_with_all = ["name", "all"])]
        stale: bool,
    },
    /// List the labs that are up.
    List,
}

/// What `down` needs to find a lab again.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    name: String,
    spec: Spec,
    namespaces: Vec<String>,
    pin_dir: Option<PathBuf>,
    /// Processes started in the background for the lab (agents, servers).
    #[serde(default)]
    pids: Vec<u32>,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lab: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    ensure!(root, "lab needs root (network namespaces, XDP)");
    match cli.cmd {
        Cmd::Up {
            name,
            clients,
            lbs,
            backends,
            mtu,
            vips,
            no_router_pass,
            unimog,
        } => {
            let vips = if vips.is_empty() {
                vec![VIP_V4.into(), VIP_V6.into()]
            } else {
                vips
            };
            let spec = match unimog {
                Some(n) => Spec::unimog(clients, n),
                None => Spec::new(clients, lbs, backends),
            };
            let spec = spec.mtu(mtu).vips(vips).router_pass(!no_router_pass);
            up(&name, spec)
        }
        Cmd::Serve { lab, node } => serve(&lab, node),
        Cmd::Down { all: true, .. } => down_all(),
        Cmd::Down { stale: true, .. } => report(&tests::sweep_stale()?),
        Cmd::Down { name, .. } => down(name.as_deref().unwrap_or("lab")),
        Cmd::List => list(),
    }
}

fn check_name(name: &str) -> Result<()> {
    // A leading letter keeps lab names apart from test ids (`<pid>-<n>`), and no '-'
    // keeps `lbt-<name>-` from matching another lab's namespaces.
    ensure!(
        name.starts_with(|c: char| c.is_ascii_alphabetic())
            && name.chars().all(|c| c.is_ascii_alphanumeric())
            && name.len() <= 20,
        "lab name {name:?}: letters and digits, starting with a letter, at most 20"
    );
    Ok(())
}

fn record_path(name: &str) -> PathBuf {
    Path::new(RECORD_DIR).join(format!("{name}.json"))
}

fn up(name: &str, spec: Spec) -> Result<()> {
    check_name(name)?;
    let prefix = format!("{PREFIX}{name}-");
    if record_path(name).exists() || netns::list()?.iter().any(|n| n.starts_with(&prefix)) {
        bail!("lab {name} is up already; `cargo xtask lab down {name}` first");
    }
    let mut topo = Topology::build_with_id(name, spec)?;
    let pin_dir = if topo.spec.router_pass {
        ensure_bpffs()?;
        let dir = Path::new(PIN_DIR).join(name);
        topo.pin_router_pass(&dir)?;
        Some(dir)
    } else {
        None
    };
    let mut record = Record {
        name: name.to_owned(),
        spec: topo.spec.clone(),
        namespaces: topo.namespaces(),
        pin_dir,
        pids: Vec::new(),
    };
    fs::create_dir_all(RECORD_DIR)?;
    fs::write(record_path(name), serde_json::to_vec_pretty(&record)?)?;
    if record.spec.lbs_serve {
        if let Err(e) = start_unimog(name, &topo, &mut record) {
            // Nothing of a lab that did not come up stays: processes, files, pins; the
            // namespaces go with `topo`.
            stop(&record.pids);
            let _ = fs::remove_file(record_path(name));
            let _ = remove_dir(&run_dir(name));
            let _ = remove_dir(&Path::new(PIN_DIR).join(name));
            return Err(e);
        }
        fs::write(record_path(name), serde_json::to_vec_pretty(&record)?)?;
    }
    print_lab(&topo, &record);
    topo.keep();
    Ok(())
}

/// The directory of a lab's agent configs, logs and sockets.
fn run_dir(name: &str) -> PathBuf {
    Path::new(RECORD_DIR).join(name)
}

/// Starts every Unimog node's servers (`lab serve`) and agent in the background.
#[expect(
    clippy::zombie_processes,
    reason = "they outlive `lab up`, which exits at once; init reaps them"
)]
fn start_unimog(name: &str, topo: &Topology, record: &mut Record) -> Result<()> {
    let dir = run_dir(name);
    fs::create_dir_all(&dir)?;
    let services = lab_services(topo, true);
    let members: Vec<(&Node, u32)> = topo.lbs.iter().map(|n| (n, 100)).collect();
    let services = service_configs(&services, &members, (1000, 3), DEFAULT_TABLE_BITS);
    let log = |file: String| -> Result<(fs::File, fs::File)> {
        let f = fs::File::create(dir.join(file))?;
        Ok((f.try_clone()?, f))
    };
    for n in &topo.lbs {
        let (out, err) = log(format!("{}-servers.log", n.name))?;
        let child = Command::new(std::env::current_exe()?)
            .args(["serve", name, &n.index.to_string()])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .context("starting the servers")?;
        record.pids.push(child.id());

        let socket = dir.join(format!("{}.sock", n.name));
        let config = json!({
            "node": node_config(n),
            "services": services,
            "agent": {
                "api_socket": socket,
                "pin_dir": Path::new(PIN_DIR).join(name).join(&n.name),
                "metrics": "127.0.0.1:9640",
            },
        });
        let config_path = dir.join(format!("{}.json", n.name));
        fs::write(&config_path, serde_json::to_vec_pretty(&config)?)?;
        let (out, err) = log(format!("{}.log", n.name))?;
        let mut cmd = Command::new(lb_binary());
        cmd.arg("agent")
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        // The guard would kill the agent when dropped: it is to outlive this process.
        let child = n.ns.spawn(&mut cmd)?.into_inner();
        record.pids.push(child.id());
        wait_for_agent(&socket, &dir.join(format!("{}.log", n.name)))?;
    }
    Ok(())
}

/// Waits until the agent behind `socket` answers `lb list`.
fn wait_for_agent(socket: &Path, log: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = Command::new(lb_binary())
            .arg("--socket")
            .arg(socket)
            .arg("list")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the agent at {} did not answer within 30 s; its log:\n{}",
                socket.display(),
                fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `lab serve`: node `index`'s servers in a Unimog lab, until SIGTERM.
fn serve(name: &str, index: usize) -> Result<()> {
    let record = read_record(&record_path(name))?;
    let node = Node::open(name, Role::Lb, index, record.spec.mtu_of(Role::Lb, index))?;
    let _servers = start_servers(&node, &record.spec.vips)?;
    println!("{}: servers up", node.name);
    // SAFETY: an empty signal set, then the calling thread waits for SIGTERM or SIGINT,
    // blocked first so that it is not lost before sigwait.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let mut sig = 0;
        libc::sigwait(&set, &mut sig);
    }
    println!("{}: servers stopping", node.name);
    Ok(())
}

fn print_lab(topo: &Topology, record: &Record) {
    let name = &record.name;
    println!("lab {name} is up: {} namespaces.", record.namespaces.len());
    println!();
    println!(
        "{:<5} {:<16} {:<5} {:<14} {:<16} {:<18} router end",
        "node", "namespace", "if", "IPv4", "IPv6", "MAC"
    );
    println!(
        "{:<5} {:<16} {:<5} {:<14} {:<16} {:<18} forwarding, ECMP by L4",
        "r",
        topo.router.name(),
        "",
        "",
        "",
        ""
    );
    for n in topo.nodes() {
        println!(
            "{:<5} {:<16} {:<5} {:<14} {:<16} {:<18} {} {} {} mtu {}",
            n.name,
            n.ns.name(),
            n.ifname,
            format!("{}/24", n.v4),
            format!("{}/64", n.v6),
            fmt_mac(&n.mac),
            n.router_ifname,
            n.router_v4,
            n.router_v6,
            n.mtu,
        );
    }
    println!();
    let vips: Vec<String> = topo.spec.vips.iter().map(|v| v.to_string()).collect();
    let lbs: Vec<&str> = topo.lbs.iter().map(|n| n.name.as_str()).collect();
    println!(
        "VIPs {} on the {} lo, routed by the router through {}.",
        vips.join(" "),
        if topo.spec.lbs_serve {
            "nodes'"
        } else {
            "backends'"
        },
        if lbs.is_empty() {
            "nothing (no LB nodes)".to_owned()
        } else {
            lbs.join(" ")
        }
    );
    match &record.pin_dir {
        Some(dir) => println!(
            "lb_pass is attached to the router's LB and backend ends (links pinned in {}).",
            dir.display()
        ),
        None => println!("No XDP program on the router's ends."),
    }
    println!();
    let first = topo
        .nodes()
        .next()
        .map_or(topo.router.name(), |n| n.ns.name());
    // nsenter --net enters only the network namespace: an agent started this way pins on
    // the host's bpffs. `ip netns exec` would give it a mount namespace of its own, where
    // its pins die with it (the agent refuses to start there).
    println!("Enter a node:     nsenter --net=/run/netns/{first} bash");
    println!(
        "Run an agent:     nsenter --net=/run/netns/{first} lb agent --config FILE   \
         (not ip netns exec)"
    );
    if topo.spec.lbs_serve {
        let dir = run_dir(name);
        println!();
        println!("Unimog mode: every node runs `lb agent` (config, log and API socket in");
        println!(
            "{}) and servers: TCP echo on port 80, connected UDP on 443, health on 8080.",
            dir.display()
        );
        println!(
            "Services web (TCP {0}:80), web6 (TCP [{1}]:80) and quic (UDP {0}:443) have every node as a backend.",
            topo.vip_v4(),
            topo.vip_v6()
        );
        println!(
            "A node's view:    lb --socket {} list",
            dir.join("lb0.sock").display()
        );
        if let Some(c) = topo.clients.first() {
            println!(
                "Which node serves: nsenter --net=/run/netns/{} bash -c 'exec 3<>/dev/tcp/{}/80; head -1 <&3'",
                c.ns.name(),
                topo.vip_v4()
            );
        }
    }
    println!("Remove the lab:   cargo xtask lab down {name}");
}

fn read_record(path: &Path) -> Result<Record> {
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
}

fn down(name: &str) -> Result<()> {
    check_name(name)?;
    let path = record_path(name);
    let record = path.exists().then(|| read_record(&path)).transpose()?;
    let mut removed = 0;
    if let Some(r) = &record {
        stop(&r.pids);
        for ns in &r.namespaces {
            if Path::new(netns::NETNS_DIR).join(ns).exists() {
                netns::delete(ns)?;
                removed += 1;
            }
        }
    }
    // Whatever else carries the lab's prefix (a record lost, a half-built lab).
    let prefix = format!("{name}-");
    let swept = tests::sweep(|rest| rest.starts_with(&prefix))?;
    removed += swept.namespaces.len();
    let pins = Path::new(PIN_DIR).join(name);
    remove_dir(&pins)?;
    if path.exists() {
        fs::remove_file(&path)?;
    }
    remove_dir(&run_dir(name))?;
    if removed == 0 && record.is_none() {
        println!("no lab {name}");
    } else {
        println!("lab {name} removed ({removed} namespaces)");
    }
    Ok(())
}

fn down_all() -> Result<()> {
    let swept = tests::sweep_all()?;
    for dir in [RECORD_DIR, PIN_DIR] {
        remove_dir(Path::new(dir))?;
    }
    report(&swept)
}

fn report(swept: &tests::Swept) -> Result<()> {
    println!(
        "removed {} namespaces{}",
        swept.namespaces.len(),
        if swept.links.is_empty() {
            String::new()
        } else {
            format!(" and interfaces {}", swept.links.join(" "))
        }
    );
    for n in &swept.namespaces {
        println!("  {n}");
    }
    Ok(())
}

fn list() -> Result<()> {
    let Ok(dir) = fs::read_dir(RECORD_DIR) else {
        println!("no labs");
        return Ok(());
    };
    let mut any = false;
    for e in dir.filter_map(|e| e.ok()) {
        if let Ok(r) = read_record(&e.path()) {
            any = true;
            println!(
                "{}: {} clients, {} LB nodes, {} backends; namespaces {}",
                r.name,
                r.spec.clients,
                r.spec.lbs,
                r.spec.backends,
                r.namespaces.join(" ")
            );
        }
    }
    if !any {
        println!("no labs");
    }
    Ok(())
}

/// Stops the lab's background processes (SIGTERM, then SIGKILL after 5 s).
fn stop(pids: &[u32]) {
    let alive = |pid: u32| Path::new(&format!("/proc/{pid}")).exists();
    for &pid in pids.iter().filter(|&&p| alive(p)) {
        // SAFETY: signalling a process this lab started, by its recorded PID.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|&p| alive(p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    for &pid in pids.iter().filter(|&&p| alive(p)) {
        // SAFETY: as above.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
}

/// Removes a directory tree (pinned links are files in bpffs: removing them detaches).
fn remove_dir(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// Mounts bpffs on /sys/fs/bpf when nothing is mounted there yet.
fn ensure_bpffs() -> Result<()> {
    let path = c"/sys/fs/bpf";
    // SAFETY: zeroed statfs is a valid out buffer; `path` is a C string.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above: a C string and a buffer that outlive the call.
    if unsafe { libc::statfs(path.as_ptr(), &mut st) } == 0 && st.f_type as i64 == BPF_FS_MAGIC {
        return Ok(());
    }
    // SAFETY: plain mount(2) with C strings.
    let ret = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            path.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if ret != 0 {
        return Err(std::io::Error::last_os_error()).context("mounting bpffs on /sys/fs/bpf");
    }
    Ok(())
}

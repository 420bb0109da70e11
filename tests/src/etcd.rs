//! A private etcd for a test: its own data directory under /run/lbt and its own ports on
//! loopback, or on an address of a test namespace (`start_in`: where agents in the test
//! bed's namespaces reach it), stopped (by its PID) and removed when dropped. `restart` keeps the data, as
//! an etcd restarted on its disk would.

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::Netns;

pub struct Etcd {
    dir: PathBuf,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
    /// Where it listens: loopback, or an address in namespace `ns`.
    addr: IpAddr,
    ns: Option<Netns>,
}

/// A port nothing listens on now (the kernel's pick for port 0).
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Etcd {
    /// Starts etcd and waits until it answers.
    pub fn start(tag: &str) -> Result<Self> {
        Etcd::start_at(tag, None, Ipv4Addr::LOCALHOST)
    }

    /// Starts etcd in namespace `ns`, listening on `addr` (one of the namespace's).
    pub fn start_in(tag: &str, ns: &str, addr: Ipv4Addr) -> Result<Self> {
        Etcd::start_at(tag, Some(Netns::open(ns)?), addr)
    }

    fn start_at(tag: &str, ns: Option<Netns>, addr: Ipv4Addr) -> Result<Self> {
        let dir = PathBuf::from("/run/lbt").join(format!("etcd-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let mut e = Etcd {
            dir,
            client_port: free_port()?,
            peer_port: free_port()?,
            child: None,
            addr: addr.into(),
            ns,
        };
        e.spawn()?;
        Ok(e)
    }

    /// The client URL to give agents and stores.
    pub fn endpoint(&self) -> String {
        format!("http://{}:{}", self.addr, self.client_port)
    }

    fn spawn(&mut self) -> Result<()> {
        let peer = format!("http://{}:{}", self.addr, self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("etcd.log"))?;
        let mut cmd = Command::new("etcd");
        cmd.args(["--name", "lbt"])
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .args(["--listen-client-urls", &self.endpoint()])
            .args(["--advertise-client-urls", &self.endpoint()])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("lbt={peer}")])
            .stdout(Stdio::null())
            .stderr(log);
        let child = match &self.ns {
            Some(ns) => ns.spawn(&mut cmd).map(crate::NsChild::into_inner),
            None => cmd.spawn().map_err(Into::into),
        }
        .context("starting etcd (cargo xtask setup installs it)")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.healthy() {
                return Ok(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "etcd exited with {status}: see {}",
                    self.dir.join("etcd.log").display()
                );
            }
            if Instant::now() > deadline {
                bail!("etcd did not answer within 20 s");
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// etcd's `/health` says so.
    fn healthy(&self) -> bool {
        let at = (self.addr, self.client_port);
        let ask = move || -> std::io::Result<String> {
            let mut s = TcpStream::connect_timeout(&at.into(), Duration::from_secs(1))?;
            s.set_read_timeout(Some(Duration::from_secs(1)))?;
            s.write_all(b"GET /health HTTP/1.0\r\n\r\n")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        };
        let answer = match &self.ns {
            Some(ns) => ns.run(|| Ok(ask())).ok(),
            None => Some(ask()),
        };
        answer.is_some_and(|r| r.is_ok_and(|r| r.contains("\"health\":\"true\"")))
    }

    /// Stops etcd (SIGKILL: as a crash would), data kept.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts etcd again on the same data and ports.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

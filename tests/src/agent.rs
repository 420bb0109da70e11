//! `lb agent` processes inside test namespaces, and the `lb` CLI against them.
//!
//! Each agent gets its own API socket and bpffs pin directory; dropping the handle kills
//! the process and removes its pins (which detaches its program).

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::{topology::Node, Netns, NsChild};

/// The `lb` binary, built once per test process (the tests crate cannot name another
/// package's binary, so it asks cargo).
pub fn lb_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("LB_BIN") {
            return PathBuf::from(p);
        }
        let out = Command::new(env!("CARGO"))
            .args([
                "build",
                "--quiet",
                "-p",
                "lb-userspace",
                "--bin",
                "lb",
                "--message-format=json",
            ])
            .stderr(Stdio::inherit())
            .output()
            .expect("running cargo build for the lb binary");
        assert!(out.status.success(), "building the lb binary failed");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|v| v["executable"].as_str().map(PathBuf::from))
            .find(|p| p.file_name().is_some_and(|n| n == "lb"))
            .expect("cargo named no lb executable")
    })
}

/// A running `lb agent`.
pub struct Agent {
    pub name: String,
    pub socket: PathBuf,
    pub pin_dir: PathBuf,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    ns: Netns,
    child: Option<NsChild>,
    /// Run as this user (and group), with only the capabilities the agent documents.
    run_as: Option<u32>,
}

/// The capabilities `lb agent` needs without root (docs/agent.md, "Privileges").
pub const AGENT_CAPS: &str = "+bpf,+net_admin,+perfmon";

/// Where a test's agent files live.
fn run_dir(id: &str) -> PathBuf {
    PathBuf::from("/run/lbt").join(id)
}

impl Agent {
    /// Writes `config` (the file's JSON; `agent` settings are filled in) and starts the
    /// agent in `node`'s namespace. Waits until its API answers.
    pub fn start(topo_id: &str, node: &Node, config: Value) -> Result<Agent> {
        Agent::start_as(topo_id, node, config, None)
    }

    /// As `start`, as user `uid` when given: the pin directory and the config's directory
    /// are made that user's, and the agent runs through `setpriv` with [`AGENT_CAPS`] only.
    pub fn start_as(
        topo_id: &str,
        node: &Node,
        mut config: Value,
        run_as: Option<u32>,
    ) -> Result<Agent> {
        let dir = run_dir(topo_id);
        std::fs::create_dir_all(&dir)?;
        let name = format!("{topo_id}-{}", node.name);
        let socket = dir.join(format!("{}.sock", node.name));
        let pin_dir = PathBuf::from("/sys/fs/bpf").join(&name);
        config["agent"] = json!({
            "api_socket": socket,
            "pin_dir": pin_dir,
            // Loopback is per namespace: every agent can use the same port.
            "metrics": "127.0.0.1:9640",
            "bucket_slots": 1 << 19,
        });
        let config_path = dir.join(format!("{}.json", node.name));
        std::fs::write(&config_path, serde_json::to_vec_pretty(&config)?)?;
        let log_path = dir.join(format!("{}.log", node.name));
        let mut agent = Agent {
            name,
            socket,
            pin_dir,
            config_path,
            log_path,
            ns: Netns::open(node.ns.name())?,
            child: None,
            run_as,
        };
        if let Some(uid) = run_as {
            std::fs::create_dir_all(&agent.pin_dir)?;
            for p in [&agent.pin_dir, &dir, &agent.config_path] {
                std::os::unix::fs::chown(p, Some(uid), Some(uid))?;
            }
        }
        agent.spawn()?;
        Ok(agent)
    }

    /// Starts (again) the agent process with the same files.
    pub fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        let mut cmd = match self.run_as {
            Some(uid) => {
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={uid}"))
                    .arg("--clear-groups")
                    .arg(format!("--inh-caps={AGENT_CAPS}"))
                    .arg(format!("--ambient-caps={AGENT_CAPS}"))
                    .arg(format!("--bounding-set=-all,{AGENT_CAPS}"))
                    .arg(lb_binary());
                c
            }
            None => Command::new(lb_binary()),
        };
        cmd.arg("agent")
            .arg("--config")
            .arg(&self.config_path)
            .env("LB_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.child = Some(self.ns.spawn(&mut cmd)?);
        // Loading the program runs the verifier: seconds alone, far more on a machine
        // busy with builds.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self
                .lb(&["list"])
                .map(|o| o.status.success())
                .unwrap_or(false)
            {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut() {
                if let Some(status) = c.try_wait()? {
                    bail!(
                        "lb agent {} exited with {status}:\n{}",
                        self.name,
                        self.log()
                    );
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "lb agent {} did not answer within 60 s:\n{}",
                    self.name,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the process with SIGKILL (no goodbye: the data plane must keep forwarding).
    pub fn kill(&mut self) -> Result<()> {
        if let Some(c) = self.child.take() {
            let mut c = c.into_inner();
            // Reaped whether or not the kill succeeded (it fails when already exited).
            let killed = c.kill();
            c.wait()?;
            killed?;
        }
        Ok(())
    }

    /// Sends SIGTERM and waits for the process to end.
    pub fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        let c = self.child.take().context("agent not running")?;
        let mut c = c.into_inner();
        // SAFETY: signalling our own child by PID.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        Ok(c.wait()?)
    }

    /// The agent process's PID while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Runs `lb args...` to completion in the agent's network namespace (another
    /// `lb agent`, say); stdin closed, output captured.
    pub fn run_in_ns(&self, args: &[&str]) -> Result<Output> {
        let mut cmd = Command::new(lb_binary());
        cmd.args(args)
            .env("LB_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Ok(self.ns.spawn(&mut cmd)?.into_inner().wait_with_output()?)
    }

    /// Runs `lb --socket <this agent> args...`.
    pub fn lb(&self, args: &[&str]) -> Result<Output> {
        Ok(Command::new(lb_binary())
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()?)
    }

    /// Runs an `lb` command that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> Result<String> {
        let out = self.lb(args)?;
        if !out.status.success() {
            bail!(
                "lb {} failed: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `lb list --json`.
    pub fn status(&self) -> Result<Value> {
        Ok(serde_json::from_str(&self.ok(&["list", "--json"])?)?)
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Rewrites the config file (for reload tests).
    pub fn write_config(&self, config: &Value) -> Result<()> {
        let mut config = config.clone();
        let old: Value = serde_json::from_slice(&std::fs::read(&self.config_path)?)?;
        config["agent"] = old["agent"].clone();
        std::fs::write(&self.config_path, serde_json::to_vec_pretty(&config)?)?;
        Ok(())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.kill();
        // Removing the pins detaches the program and frees the maps.
        let _ = lb::dataplane::Dataplane::unpin_all(&self.pin_dir);
        let _ = std::fs::remove_file(&self.socket);
        if std::thread::panicking() {
            eprintln!("--- log of lb agent {} ---\n{}", self.name, self.log());
        }
    }
}

/// Removes a test's agent directory (configs, logs, sockets).
pub fn remove_run_dir(topo_id: &str) {
    let _ = std::fs::remove_dir_all(run_dir(topo_id));
}

/// The `node` part of an agent config for `node`.
pub fn node_config(node: &Node) -> Value {
    json!({
        "interfaces": [node.ifname],
        "address_v4": node.v4,
        "address_v6": node.v6,
        "hash_seed": 42,
        "flow_hash": "multiply-shift",
    })
}

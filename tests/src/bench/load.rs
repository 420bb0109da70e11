//! The load loop's real experiment (`--suite load`): three backends whose servers run in
//! cgroup v1 CPU cgroups with quotas of 40%, 20% and 10% of a core, behind one LB node
//! whose agent drives their weights by their reports (docs/load.md). A client sends
//! CPU-bound requests at a fixed rate near 60% of their total capacity, each on a new
//! connection (a new flow, so the table's buckets decide where it goes). First the loop
//! is frozen at equal weights, then resumed; the utilisation of each cgroup is read every
//! second from its `cpuacct.usage`, independently of the agents.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::{json, Value};

use crate::{
    agent::{node_config, remove_run_dir, Agent},
    Spec, Topology,
};

/// Each backend's CPU quota, in cores.
pub const QUOTAS: [f64; 3] = [0.4, 0.2, 0.1];
/// CPU time a request costs the server, unless `--load-work-us` says otherwise. Short, so
/// that the 10% backend works enough requests (60 a second) for its 10-second figure to
/// judge the loop rather than the count's noise: with 2 ms requests even weights set
/// right at once failed the settling criterion in a quarter of the simulated runs
/// (`law/tests/queued.rs`).
pub const WORK: Duration = Duration::from_millis(1);
/// The offered load as a fraction of the backends' total capacity.
pub const LOAD: f64 = 0.6;
/// The CFS period of the cgroups: short, so a throttled server waits tens of ms, not 100.
const CFS_PERIOD_US: u64 = 20_000;
/// Seconds of utilisation averaged when judging whether the loop has settled.
const SETTLE_WINDOW: usize = 10;
/// A request not answered within this counts as this late (and failed).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// How long each part runs.
#[derive(Clone, Copy, Debug)]
pub struct Phases {
    /// Loop frozen at equal weights, measured after a warm-up.
    pub warm: Duration,
    pub off: Duration,
    /// Loop running; the last `steady` of it is measured.
    pub on: Duration,
    pub steady: Duration,
}

impl Default for Phases {
    fn default() -> Self {
        Phases {
            warm: Duration::from_secs(5),
            off: Duration::from_secs(30),
            on: Duration::from_secs(90),
            steady: Duration::from_secs(30),
        }
    }
}

/// One backend's figures.
#[derive(Clone, Debug, Serialize)]
pub struct BackendRow {
    pub name: String,
    pub quota: f64,
    /// Mean utilisation (of its quota, %) and p99 latency (ms) with the loop off and, in
    /// the steady part, on.
    pub util_off: f64,
    pub util_on: f64,
    pub p99_ms_off: f64,
    pub p99_ms_on: f64,
    pub requests_off: usize,
    pub requests_on: usize,
    /// Effective weight and buckets owned at the end.
    pub weight_on: u64,
    pub buckets_on: u64,
}

/// The `load` object of the JSON report.
#[derive(Clone, Debug, Serialize)]
pub struct LoadFigures {
    /// Max minus min of the backends' mean utilisation, percentage points.
    pub spread_off: f64,
    pub spread_on: f64,
    /// From resuming the loop until the spread of the 10-second mean utilisation is within
    /// 10 points for good.
    pub settle_s: Option<f64>,
    /// p99 latency over all requests of the part, ms (a failed request counts as the
    /// timeout).
    pub p99_ms_off: f64,
    pub p99_ms_on: f64,
    /// Buckets whose first hop changed from resuming the loop to the end.
    pub buckets_moved: u64,
    pub rate_rps: f64,
    pub work_ms: f64,
    pub failed_off: usize,
    pub failed_on: usize,
    /// Effective-weight changes the agent made in the steady part (0: at rest).
    pub weight_changes_steady: u64,
    pub backends: Vec<BackendRow>,
    /// Per second since the loop was resumed (negative: before): each backend's
    /// utilisation (%), effective weight and buckets.
    pub timeline: Vec<Sample>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    pub t: f64,
    pub util: Vec<f64>,
    pub weight: Vec<u64>,
    pub buckets: Vec<u64>,
    pub changes: u64,
}

/// A CPU cgroup (v1: `cpu` for the quota, `cpuacct` for the usage) and the server
/// process in it; dropping it ends the process and removes the cgroup.
struct Slot {
    name: String,
    server: Option<Child>,
}

const CGROUP_V1: &str = "/sys/fs/cgroup";

impl Slot {
    fn create(name: String, quota: f64) -> Result<Slot> {
        let cpu = Path::new(CGROUP_V1).join("cpu");
        if !cpu.join("cpu.cfs_quota_us").exists() {
            bail!(
                "no cgroup v1 cpu controller at {} (the load suite needs it)",
                cpu.display()
            );
        }
        let slot = Slot { name, server: None };
        for c in ["cpu", "cpuacct"] {
            std::fs::create_dir_all(slot.dir(c))
                .with_context(|| format!("creating {}", slot.dir(c).display()))?;
        }
        std::fs::write(
            slot.dir("cpu").join("cpu.cfs_period_us"),
            CFS_PERIOD_US.to_string(),
        )?;
        let quota_us = (quota * CFS_PERIOD_US as f64).round() as u64;
        std::fs::write(
            slot.dir("cpu").join("cpu.cfs_quota_us"),
            quota_us.to_string(),
        )?;
        Ok(slot)
    }

    fn dir(&self, controller: &str) -> PathBuf {
        Path::new(CGROUP_V1).join(controller).join(&self.name)
    }

    /// Starts the server in `ns` and moves it into the cgroup before it serves.
    fn start(&mut self, ns: &crate::Netns, backend: &str, work: Duration) -> Result<()> {
        let exe = std::env::current_exe()?;
        let mut cmd = Command::new(exe);
        cmd.args(["--cpu-server", backend])
            .arg("--work-us")
            .arg(work.as_micros().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::null());
        // Held by the slot at once: dropping it ends the process, also on an error below.
        let pid = self
            .server
            .insert(ns.spawn(&mut cmd)?.into_inner())
            .id()
            .to_string();
        for c in ["cpu", "cpuacct"] {
            std::fs::write(self.dir(c).join("cgroup.procs"), &pid)
                .with_context(|| format!("moving the server into {}", self.dir(c).display()))?;
        }
        // It serves once told it is in its cgroup.
        self.server
            .as_mut()
            .and_then(|c| c.stdin.as_mut())
            .context("server stdin")?
            .write_all(b"go\n")?;
        Ok(())
    }

    /// CPU time used so far, nanoseconds.
    fn usage_ns(&self) -> Result<u64> {
        let p = self.dir("cpuacct").join("cpuacct.usage");
        let t = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        Ok(t.trim().parse()?)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(mut c) = self.server.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for c in ["cpu", "cpuacct"] {
            let dir = self.dir(c);
            // A cgroup goes once its last task has gone, which takes a moment after the
            // kill.
            for _ in 0..100 {
                if !dir.exists() || std::fs::remove_dir(&dir).is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if dir.exists() {
                eprintln!("bench: could not remove {}", dir.display());
            }
        }
    }
}

/// The server (`bench --cpu-server NAME`), run in a backend's namespace: it waits for a
/// line on stdin (it is in its cgroup then), then serves port 80: each connection in a
/// thread of its own reads a line, spends `work` of CPU time and answers `NAME\n`. The
/// work is done one request at a time (a lock), so an overloaded server queues requests
/// instead of slowing all of them down together; reading and answering never wait for
/// the work of others. A request that waited longer than the client waits is dropped
/// unanswered, as a server with request deadlines does: the client has gone, and its
/// work would only delay the next ones.
pub fn serve(name: &str, work: Duration) -> Result<()> {
    let mut go = String::new();
    std::io::stdin().read_line(&mut go)?;
    let listener = TcpListener::bind("0.0.0.0:80").context("binding port 80")?;
    let cpu = Arc::new(Mutex::new(()));
    let answer = Arc::new(format!("{name}\n"));
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        let (cpu, answer) = (cpu.clone(), answer.clone());
        std::thread::spawn(move || {
            let _ = conn.set_read_timeout(Some(REQUEST_TIMEOUT));
            let mut line = String::new();
            if BufReader::new(&conn).read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let arrived = Instant::now();
            {
                let _one_at_a_time = cpu.lock().unwrap_or_else(|p| p.into_inner());
                if arrived.elapsed() >= REQUEST_TIMEOUT {
                    return;
                }
                spin(work);
            }
            let _ = conn.write_all(answer.as_bytes());
        });
    }
    Ok(())
}

/// Busy for `work` of this thread's CPU time (throttled time does not count).
fn spin(work: Duration) {
    let start = thread_cpu();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    while thread_cpu() - start < work {
        for _ in 0..1000 {
            x = x.rotate_left(7).wrapping_mul(0xbf58_476d_1ce4_e5b9) ^ 0x94d0_49bb;
        }
        std::hint::black_box(x);
    }
}

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// One second of the run: each backend's utilisation (%), effective weight and buckets,
/// the LB's moved buckets and weight changes so far.
struct Tick {
    at: Instant,
    util: Vec<f64>,
    weight: Vec<u64>,
    buckets: Vec<u64>,
    moved: u64,
    changes: u64,
}

/// One request's fate: when it was due, who answered, how long it took from when it was
/// due (an open-loop client: a late start counts).
#[derive(Clone, Debug)]
struct Done {
    due: Instant,
    backend: Option<String>,
    latency: Duration,
}

/// Sends requests at `rate` per second from `ns` to `dst` until `stop`, each on a new
/// connection, recording every one.
fn client(
    ns: &crate::Netns,
    dst: SocketAddr,
    rate: f64,
    until: Instant,
    done: Arc<Mutex<Vec<Done>>>,
) -> Result<std::thread::JoinHandle<()>> {
    ns.spawn_thread(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        rt.block_on(async move {
            let start = tokio::time::Instant::now();
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0u64.. {
                let due = start + Duration::from_secs_f64(i as f64 / rate);
                if due.into_std() >= until {
                    break;
                }
                tokio::time::sleep_until(due).await;
                let done = done.clone();
                tasks.spawn(async move {
                    let r = tokio::time::timeout(REQUEST_TIMEOUT, request(dst)).await;
                    let backend = r.ok().and_then(|r| r.ok());
                    done.lock().expect("not poisoned").push(Done {
                        due: due.into_std(),
                        latency: due.elapsed().min(REQUEST_TIMEOUT),
                        backend,
                    });
                });
                while tasks.try_join_next().is_some() {}
            }
            while tasks.join_next().await.is_some() {}
        });
    })
}

async fn request(dst: SocketAddr) -> std::io::Result<String> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(dst).await?;
    // Closed with a reset, not a FIN: a request given up on would otherwise leave its
    // port in TIME_WAIT for 60 s, and the kernel would skip those ports for new
    // connections. One client address has only ~28k ports, and the ones skipped are those
    // whose flows hashed to the backend that failed them: that backend would then get
    // fewer new flows than its buckets say. Clients of a real VIP are many addresses.
    s.set_zero_linger()?;
    s.write_all(b"work\n").await?;
    let mut line = String::new();
    tokio::io::BufReader::new(s).read_line(&mut line).await?;
    if line.is_empty() {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(line.trim().to_string())
}

/// The LB's view of the service: effective weight and buckets per backend, buckets moved
/// so far and the loop's weight changes.
fn lb_view(lb: &Agent, names: &BTreeMap<String, usize>) -> Result<(Vec<u64>, Vec<u64>, u64, u64)> {
    let s = lb.status()?;
    let svc = &s["services"][0];
    let mut weight = vec![0; names.len()];
    let mut buckets = vec![0; names.len()];
    for b in svc["backends"].as_array().context("backends")? {
        let addr = b["address"].as_str().unwrap_or_default();
        if let Some(&i) = names.get(addr) {
            weight[i] = b["load"]["effective_weight"].as_u64().unwrap_or(0);
            buckets[i] = b["buckets"].as_u64().unwrap_or(0);
        }
    }
    let moved = svc["moved_buckets"].as_u64().unwrap_or(0);
    let changes = s["load"]["changes"].as_u64().unwrap_or(0);
    Ok((weight, buckets, moved, changes))
}

fn p99(mut v: Vec<Duration>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort();
    let i = ((v.len() as f64 * 0.99).ceil() as usize).clamp(1, v.len()) - 1;
    v[i].as_secs_f64() * 1000.0
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// Runs the experiment with requests of `work`; writes the chart to `png`.
pub fn measure(phases: Phases, work: Duration, png: &Path) -> Result<LoadFigures> {
    let topo = Topology::build(Spec::new(1, 1, QUOTAS.len()))?;
    let run_dir = PathBuf::from("/run/lbt").join(&topo.id);
    let result = experiment(&topo, &run_dir, phases, work, png);
    remove_run_dir(&topo.id);
    result
}

fn experiment(
    topo: &Topology,
    run_dir: &Path,
    ph: Phases,
    work: Duration,
    png: &Path,
) -> Result<LoadFigures> {
    std::fs::create_dir_all(run_dir)?;
    let mut slots = Vec::new();
    let mut agents = Vec::new();
    let mut names = BTreeMap::new();
    for (i, (b, q)) in topo.backends.iter().zip(QUOTAS).enumerate() {
        let mut slot = Slot::create(format!("lbbench-{}-{}", topo.id, b.name), q)?;
        slot.start(b, &b.name, work)?;
        let config = json!({ "node": node_config(b), "backend_vips": [topo.vip_v4()],
            // Each report covers one control period (3 s by default).
            "load": { "report": { "source": { "cgroup": slot.name }, "interval_ms": 3000 } } });
        agents.push(Agent::start(&topo.id, b, config)?);
        names.insert(b.v4.to_string(), i);
        slots.push(slot);
    }
    let backends: Vec<Value> = topo
        .backends
        .iter()
        .map(|b| json!({ "address": b.v4, "weight": 100 }))
        .collect();
    let config = json!({
        "node": node_config(&topo.lbs[0]),
        "services": [{ "name": "web", "vip": topo.vip_v4(), "port": 80, "protocol": "tcp",
                       "backends": backends }],
        "load": { "services": ["web"], "frozen": true,
                  "state_file": run_dir.join("lb-load.json") },
    });
    let lb = Agent::start(&topo.id, &topo.lbs[0], config)?;

    let capacity: f64 = QUOTAS.iter().sum::<f64>() / work.as_secs_f64();
    let rate = capacity * LOAD;
    let total = ph.warm + ph.off + ph.on;
    eprintln!(
        "bench: load: {rate:.0} requests/s of {} ms CPU each ({:.0}% of {capacity:.0}/s), \
         {}s frozen then {}s running",
        work.as_secs_f64() * 1000.0,
        LOAD * 100.0,
        (ph.warm + ph.off).as_secs(),
        ph.on.as_secs()
    );
    let start = Instant::now();
    let done = Arc::new(Mutex::new(Vec::new()));
    let dst = SocketAddr::new(topo.vip_v4().into(), 80);
    let client = client(&topo.clients[0], dst, rate, start + total, done.clone())?;

    // Every second: each cgroup's utilisation of its quota and the LB's view.
    let mut samples: Vec<Tick> = Vec::new();
    let mut last: Vec<u64> = slots.iter().map(Slot::usage_ns).collect::<Result<_>>()?;
    let mut last_at = Instant::now();
    let resume_at = start + ph.warm + ph.off;
    let mut resumed = None;
    let mut tick = 1u32;
    while Instant::now() < start + total {
        let next = start + Duration::from_secs(tick.into());
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        tick += 1;
        let now = Instant::now();
        let usage: Vec<u64> = slots.iter().map(Slot::usage_ns).collect::<Result<_>>()?;
        let wall = now.duration_since(last_at).as_secs_f64() * 1e9;
        let util = usage
            .iter()
            .zip(&last)
            .zip(QUOTAS)
            .map(|((u, l), q)| 100.0 * (u - l) as f64 / (wall * q))
            .collect();
        (last, last_at) = (usage, now);
        let (weight, buckets, moved, changes) = lb_view(&lb, &names)?;
        samples.push(Tick {
            at: now,
            util,
            weight,
            buckets,
            moved,
            changes,
        });
        if resumed.is_none() && now >= resume_at {
            lb.ok(&["load", "resume"])?;
            resumed = Some((Instant::now(), moved));
            eprintln!("bench: load: loop resumed");
        }
    }
    let _ = client.join();
    let (resumed, moved_at_resume) = resumed.context("the loop was never resumed")?;
    let done = std::mem::take(&mut *done.lock().expect("not poisoned"));

    // The parts measured: [warm, resume) frozen, the last `steady` running.
    let off = (start + ph.warm, resumed);
    let on = (start + total - ph.steady, start + total);
    let within = |t: Instant, (a, b): (Instant, Instant)| t >= a && t < b;
    let mean = |part: (Instant, Instant), i: usize| {
        let v: Vec<f64> = samples
            .iter()
            .filter(|s| within(s.at, part))
            .map(|s| s.util[i])
            .collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    let lat = |part, backend: Option<&str>| -> Vec<Duration> {
        done.iter()
            .filter(|d| within(d.due, part))
            .filter(|d| backend.is_none() || d.backend.as_deref() == backend)
            .map(|d| d.latency)
            .collect()
    };
    let failed = |part| {
        done.iter()
            .filter(|d| within(d.due, part) && d.backend.is_none())
            .count()
    };
    let end = samples.last().context("no samples")?;
    let rows: Vec<BackendRow> = topo
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| BackendRow {
            name: b.name.clone(),
            quota: QUOTAS[i],
            util_off: round(mean(off, i), 1),
            util_on: round(mean(on, i), 1),
            p99_ms_off: round(p99(lat(off, Some(&b.name))), 1),
            p99_ms_on: round(p99(lat(on, Some(&b.name))), 1),
            requests_off: lat(off, Some(&b.name)).len(),
            requests_on: lat(on, Some(&b.name)).len(),
            weight_on: end.weight[i],
            buckets_on: end.buckets[i],
        })
        .collect();
    let spread = |f: fn(&BackendRow) -> f64| {
        let v: Vec<f64> = rows.iter().map(f).collect();
        v.iter().cloned().fold(f64::MIN, f64::max) - v.iter().cloned().fold(f64::MAX, f64::min)
    };
    // Settled: from the first second after which the spread of the 10-second mean
    // utilisation stays within 10 points. One second of a 10%-of-a-core backend is about
    // 60 requests: its figure alone varies by ±8 points from second to second.
    let window: Vec<(Instant, f64)> = samples
        .windows(SETTLE_WINDOW)
        .map(|w| {
            let m: Vec<f64> = (0..QUOTAS.len())
                .map(|i| w.iter().map(|s| s.util[i]).sum::<f64>() / SETTLE_WINDOW as f64)
                .collect();
            let hi = m.iter().cloned().fold(f64::MIN, f64::max);
            let lo = m.iter().cloned().fold(f64::MAX, f64::min);
            (w[SETTLE_WINDOW - 1].at, hi - lo)
        })
        .collect();
    let settle_s = window
        .iter()
        .rposition(|(t, s)| *t >= resumed && *s > 10.0)
        .map_or_else(
            || window.iter().find(|(t, _)| *t >= resumed).map(|(t, _)| *t),
            |i| window.get(i + 1).map(|(t, _)| *t),
        )
        .map(|t| round(t.duration_since(resumed).as_secs_f64(), 1));
    let changes_at = |t: Instant| {
        samples
            .iter()
            .rev()
            .find(|s| s.at <= t)
            .map_or(0, |s| s.changes)
    };
    let timeline: Vec<Sample> = samples
        .iter()
        .map(|s| Sample {
            t: round(
                s.at.duration_since(start).as_secs_f64()
                    - resumed.duration_since(start).as_secs_f64(),
                1,
            ),
            util: s.util.iter().map(|u| round(*u, 1)).collect(),
            weight: s.weight.clone(),
            buckets: s.buckets.clone(),
            changes: s.changes,
        })
        .collect();
    let figures = LoadFigures {
        spread_off: round(spread(|r| r.util_off), 1),
        spread_on: round(spread(|r| r.util_on), 1),
        settle_s,
        p99_ms_off: round(p99(lat(off, None)), 1),
        p99_ms_on: round(p99(lat(on, None)), 1),
        buckets_moved: end.moved - moved_at_resume,
        rate_rps: round(rate, 1),
        work_ms: work.as_secs_f64() * 1000.0,
        failed_off: failed(off),
        failed_on: failed(on),
        weight_changes_steady: end.changes - changes_at(on.0),
        backends: rows,
        timeline,
    };
    super::load_chart::write(&figures, &names_of(topo), png)?;
    drop(lb);
    drop(agents);
    drop(slots);
    Ok(figures)
}

fn names_of(topo: &Topology) -> Vec<String> {
    topo.backends
        .iter()
        .zip(QUOTAS)
        .map(|(b, q)| format!("{} ({:.0}% of a core)", b.name, q * 100.0))
        .collect()
}

/// The figures for a terminal.
pub fn text(f: &LoadFigures) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "\nLoad loop: {:.0} requests/s of {} ms CPU on new connections, backends in cgroup v1 \
         CPU quotas",
        f.rate_rps, f.work_ms
    );
    let _ = writeln!(
        o,
        "{:<6} {:>6} {:>9} {:>9} {:>10} {:>10} {:>7} {:>8}",
        "backend", "quota", "util off", "util on", "p99 off", "p99 on", "weight", "buckets"
    );
    for b in &f.backends {
        let _ = writeln!(
            o,
            "{:<6} {:>5.0}% {:>8.1}% {:>8.1}% {:>8.1}ms {:>8.1}ms {:>7} {:>8}",
            b.name,
            b.quota * 100.0,
            b.util_off,
            b.util_on,
            b.p99_ms_off,
            b.p99_ms_on,
            b.weight_on,
            b.buckets_on
        );
    }
    let _ = writeln!(
        o,
        "spread off {:.1} points, on {:.1}; settled after {}; p99 off {:.1} ms, on {:.1} ms; \
         {} buckets moved; failed requests off {}, on {}; weight changes in the steady part {}",
        f.spread_off,
        f.spread_on,
        f.settle_s.map_or("never".into(), |s| format!("{s:.0} s")),
        f.p99_ms_off,
        f.p99_ms_on,
        f.buckets_moved,
        f.failed_off,
        f.failed_on,
        f.weight_changes_steady
    );
    o
}

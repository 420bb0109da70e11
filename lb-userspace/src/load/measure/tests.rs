use std::{
    process::{Child, Command, Stdio},
    thread,
    time::Duration,
};

use super::*;

/// A directory removed at the end, also on failure.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("lb-measure-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_file_gives_its_figure_and_bad_text_names_the_file() {
    let dir = TempDir::new("file");
    let path = dir.0.join("load");
    fs::write(&path, "0.63\n").unwrap();
    let mut m = Meter::new(Source::File(path.clone()));
    assert_eq!(m.sample().unwrap(), Some(0.63));
    fs::write(&path, "busy").unwrap();
    let e = m.sample().unwrap_err().to_string();
    assert!(e.contains("load") && e.contains("busy"), "{e}");
}

#[test]
fn the_host_gives_a_fraction_from_the_second_sample() {
    let mut m = Meter::new(Source::Host);
    assert_eq!(m.sample().unwrap(), None);
    // One thread spinning keeps the host busy between the samples.
    let spin = thread::spawn(|| {
        let end = Instant::now() + Duration::from_millis(300);
        while Instant::now() < end {
            std::hint::spin_loop();
        }
    });
    spin.join().unwrap();
    let u = m.sample().unwrap().unwrap();
    assert!(u > 0.0 && u <= 1.0, "{u}");
}

#[test]
fn a_v2_cgroup_is_measured_against_its_quota() {
    let root = TempDir::new("v2");
    let cg = root.0.join("web");
    fs::create_dir_all(&cg).unwrap();
    fs::write(cg.join("cpu.stat"), "usage_usec 1000\nuser_usec 900\n").unwrap();
    fs::write(cg.join("cpu.max"), "20000 100000\n").unwrap();
    let mut m = Meter::with_root(Source::Cgroup("web".into()), &root.0);
    assert_eq!(m.sample().unwrap(), None);
    let t = Instant::now();
    thread::sleep(Duration::from_millis(200));
    // 20 ms of CPU in the ~200 ms since: half of a 0.2-CPU quota, less as time runs on.
    fs::write(cg.join("cpu.stat"), "usage_usec 21000\n").unwrap();
    let u = m.sample().unwrap().unwrap();
    let want = 0.020 / (t.elapsed().as_secs_f64() * 0.2);
    assert!(u <= 0.5 + 1e-9 && u >= want - 0.05, "{u}, about {want}");
    fs::write(cg.join("cpu.max"), "eight 100000\n").unwrap();
    assert!(
        m.sample().is_err(),
        "a quota that does not parse is an error"
    );
}

#[test]
fn a_missing_cgroup_is_named() {
    let root = TempDir::new("none");
    let mut m = Meter::with_root(Source::Cgroup("nosuch".into()), &root.0);
    let e = m.sample().unwrap_err().to_string();
    assert!(e.contains("nosuch"), "{e}");
}

/// A real cgroup v1 pair (cpu for the quota, cpuacct for the usage) with a spinning
/// process in it, removed at the end.
struct V1Group {
    name: String,
    child: Child,
}

impl V1Group {
    fn new(quota_us: i64) -> Option<Self> {
        let base = Path::new("/sys/fs/cgroup");
        if !base.join("cpu/cpu.cfs_quota_us").exists() || !base.join("cpuacct").exists() {
            eprintln!("skipped: no cgroup v1 cpu and cpuacct hierarchies");
            return None;
        }
        let name = format!("lb-measure-{}", std::process::id());
        for h in ["cpu", "cpuacct"] {
            if fs::create_dir(base.join(h).join(&name)).is_err() {
                eprintln!("skipped: cannot create cgroups (not root?)");
                return None;
            }
        }
        let child = Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let g = V1Group { name, child };
        g.set_quota(quota_us);
        for h in ["cpu", "cpuacct"] {
            let procs = base.join(h).join(&g.name).join("cgroup.procs");
            fs::write(procs, g.child.id().to_string()).unwrap();
        }
        Some(g)
    }

    fn set_quota(&self, quota_us: i64) {
        let p = Path::new("/sys/fs/cgroup/cpu").join(&self.name);
        fs::write(p.join("cpu.cfs_period_us"), "100000").unwrap();
        fs::write(p.join("cpu.cfs_quota_us"), quota_us.to_string()).unwrap();
    }
}

impl Drop for V1Group {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for h in ["cpu", "cpuacct"] {
            let _ = fs::remove_dir(Path::new("/sys/fs/cgroup").join(h).join(&self.name));
        }
    }
}

#[test]
fn a_real_v1_cgroup_saturates_its_quota() {
    // 1% of a CPU: a spinner gets that much even on a host busy with other work.
    let Some(g) = V1Group::new(1_000) else {
        return;
    };
    let mut m = Meter::new(Source::Cgroup(g.name.clone()));
    m.sample().unwrap();
    thread::sleep(Duration::from_millis(800));
    let capped = m.sample().unwrap().unwrap();
    assert!(capped > 0.7, "{capped}");
    // Without a quota it is measured against every CPU: one spinner cannot fill two.
    g.set_quota(-1);
    m.sample().unwrap();
    thread::sleep(Duration::from_millis(800));
    let cpus = thread::available_parallelism().unwrap().get() as f64;
    let free = m.sample().unwrap().unwrap();
    assert!(free <= 1.0 / cpus + 0.05, "{free} on {cpus} CPUs");
}

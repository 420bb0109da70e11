//! Loading lb's XDP object, attaching its programs inside namespaces and reading its
//! reason counters.

use std::{fmt, fs, path::Path};

use anyhow::{anyhow, Context, Result};
use aya::{
    maps::PerCpuArray,
    programs::{links::FdLink, xdp::XdpLinkId, Xdp, XdpMode},
    Ebpf, EbpfLoader,
};
use lb_common::{maps::names, stats::Reason};

use crate::Netns;

/// Bucket map entries of an [`XdpProgram`]: room for a few small tables.
pub const BUCKET_SLOTS: u32 = 1 << 12;

/// One load of lb's object (its own set of maps) with one program loaded, attached to
/// any number of interfaces. Dropping it detaches every unpinned attachment.
pub struct XdpProgram {
    /// The loaded object: its maps are this node's maps.
    pub ebpf: Ebpf,
    program: String,
    /// (namespace, interface) of each attachment, for messages and pin names.
    attached: Vec<(String, String)>,
    links: Vec<XdpLinkId>,
}

impl fmt::Debug for XdpProgram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("XdpProgram")
            .field("program", &self.program)
            .field("attached", &self.attached)
            .finish_non_exhaustive()
    }
}

impl XdpProgram {
    /// Loads lb's embedded object and the program `name` (`lb::ebpf::PROGRAM` or
    /// `lb::ebpf::PASS_PROGRAM`) into the kernel, unattached. The bucket map gets
    /// [`BUCKET_SLOTS`] entries rather than the agent's default (arrays are allocated
    /// whole, and every load has its own maps).
    pub fn load(name: &str) -> Result<Self> {
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(names::BUCKETS, BUCKET_SLOTS)
            .load(lb::ebpf::object())
            .context("loading lb's XDP object")?;
        let prog: &mut Xdp = ebpf
            .program_mut(name)
            .with_context(|| format!("no program {name} in lb's object"))?
            .try_into()?;
        prog.load()
            .with_context(|| format!("loading program {name} (verifier)"))?;
        Ok(Self {
            ebpf,
            program: name.to_owned(),
            attached: Vec::new(),
            links: Vec::new(),
        })
    }

    pub fn name(&self) -> &str {
        &self.program
    }

    /// Attaches to `ifname` in `ns`, native mode (`XdpMode::Default` is native on veth).
    /// The name lookup and the attach happen inside the namespace.
    pub fn attach(&mut self, ns: &Netns, ifname: &str) -> Result<()> {
        let Self { ebpf, program, .. } = self;
        let prog: &mut Xdp = ebpf
            .program_mut(program)
            .context("program vanished")?
            .try_into()?;
        let id = attach_in(ns, prog, ifname)?;
        self.links.push(id);
        self.attached
            .push((ns.name().to_owned(), ifname.to_owned()));
        Ok(())
    }

    /// Pins every attachment under `dir` as `<namespace>_<interface>`, so it stays after
    /// this process ends; removing the pin (or the interface) detaches it.
    pub fn pin_links(&mut self, dir: &Path) -> Result<()> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(&self.program)
            .context("program vanished")?
            .try_into()?;
        for (id, (ns, ifname)) in self.links.drain(..).zip(&self.attached) {
            let link = prog.take_link(id)?;
            let fd_link = FdLink::try_from(link).map_err(|e| anyhow!("{ifname} in {ns}: {e}"))?;
            let path = dir.join(format!("{ns}_{ifname}"));
            fd_link
                .pin(&path)
                .with_context(|| format!("pinning {}", path.display()))?;
        }
        Ok(())
    }

    /// The `REASON_STATS` counters, summed over CPUs.
    pub fn reasons(&self) -> Result<ReasonCounts> {
        reason_counts(&self.ebpf)
    }
}

/// Attaches a loaded XDP program (e.g. `lb::dataplane::Dataplane::program()`) to
/// `ifname` in `ns`, native mode (`XdpMode::Default` is native on veth). Interface names
/// resolve in the calling thread's namespace, and so does the attach, hence the thread.
pub fn attach_in(ns: &Netns, prog: &mut Xdp, ifname: &str) -> Result<XdpLinkId> {
    ns.run(|| {
        prog.attach(ifname, XdpMode::Default).map_err(|e| {
            let erange = std::iter::successors(Some(&e as &dyn std::error::Error), |e| e.source())
                .filter_map(|e| e.downcast_ref::<std::io::Error>())
                .any(|e| e.raw_os_error() == Some(libc::ERANGE));
            let err = anyhow::Error::new(e);
            if erange {
                // veth refuses native XDP when a frame may not fit one page.
                err.context("the MTU is too large for native XDP on veth (at most about 3500)")
            } else {
                err
            }
        })
    })
    .with_context(|| format!("attaching XDP to {ifname} in {}", ns.name()))
}

/// Reads `REASON_STATS` of a loaded object, summed over CPUs.
pub fn reason_counts(ebpf: &Ebpf) -> Result<ReasonCounts> {
    let map = ebpf
        .map(names::REASON_STATS)
        .with_context(|| format!("no map {}", names::REASON_STATS))?;
    let stats: PerCpuArray<_, u64> = PerCpuArray::try_from(map)?;
    let mut counts = [0u64; Reason::COUNT];
    for (i, c) in counts.iter_mut().enumerate() {
        *c = stats.get(&(i as u32), 0)?.iter().sum();
    }
    Ok(ReasonCounts(counts))
}

/// Packets per [`Reason`], indexed by its discriminant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ReasonCounts(pub [u64; Reason::COUNT]);

impl ReasonCounts {
    pub fn get(&self, reason: Reason) -> u64 {
        self.0[reason as usize]
    }

    /// Every packet the program saw (each ends in exactly one outcome reason).
    pub fn total(&self) -> u64 {
        Reason::ALL
            .iter()
            .filter(|r| r.is_outcome())
            .map(|r| self.get(*r))
            .sum()
    }

    /// What was counted since `earlier`.
    pub fn since(&self, earlier: &ReasonCounts) -> ReasonCounts {
        let mut d = *self;
        for (a, b) in d.0.iter_mut().zip(earlier.0) {
            *a = a.saturating_sub(b);
        }
        d
    }
}

impl fmt::Display for ReasonCounts {
    /// The non-zero counters, `name=count` separated by spaces.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for r in Reason::ALL {
            let n = self.get(r);
            if n != 0 {
                if !first {
                    f.write_str(" ")?;
                }
                write!(f, "{}={n}", r.name())?;
                first = false;
            }
        }
        if first {
            f.write_str("(none)")?;
        }
        Ok(())
    }
}

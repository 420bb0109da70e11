//! Removing what killed runs left behind: `lbt-*` namespaces (with the processes inside
//! them) and `lbt-*` interfaces in the root namespace.

use std::path::Path;

use anyhow::Result;

use crate::{link, netns, topology::PREFIX};

/// What a sweep removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Swept {
    pub namespaces: Vec<String>,
    pub links: Vec<String>,
}

/// Removes every test-bed namespace and root-namespace interface, running or not.
/// Running tests and labs lose theirs: use it when nothing of lb's runs (`lab down --all`).
pub fn sweep_all() -> Result<Swept> {
    sweep(|_| true)
}

/// Removes the test-bed namespaces whose creating process is gone (the PID in
/// `lbt-<pid>-<n>-*`); labs and running tests are left alone.
pub fn sweep_stale() -> Result<Swept> {
    sweep(|rest| {
        rest.split('-')
            .next()
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    })
}

/// Removes the namespaces and root-namespace interfaces named `lbt-<rest>` for which
/// `matches(rest)` holds.
pub fn sweep(matches: impl Fn(&str) -> bool) -> Result<Swept> {
    let picked = |name: &str| name.strip_prefix(PREFIX).is_some_and(&matches);
    let mut swept = Swept::default();
    let mut errors = Vec::new();
    for name in netns::list()?.into_iter().filter(|n| picked(n)) {
        match netns::delete(&name) {
            Ok(()) => swept.namespaces.push(name),
            Err(e) => errors.push(format!("{name}: {e:#}")),
        }
    }
    // The test bed makes its veths inside its namespaces, so none should be here; this
    // catches anything an older or interrupted run left in the root namespace.
    let links = root_links()?;
    for (name, index) in links.into_iter().filter(|(n, _)| picked(n)) {
        match delete_root_link(index) {
            Ok(()) => swept.links.push(name),
            Err(e) => errors.push(format!("{name}: {e:#}")),
        }
    }
    if !errors.is_empty() {
        anyhow::bail!("sweep left: {}", errors.join("; "));
    }
    Ok(swept)
}

/// Interfaces of the root namespace (the calling process's), with their indexes.
fn root_links() -> Result<Vec<(String, u32)>> {
    on_root(|h| async move {
        let mut out = Vec::new();
        for name in link::names(&h).await? {
            let idx = link::index(&h, &name).await?;
            out.push((name, idx));
        }
        Ok(out)
    })
}

fn delete_root_link(index: u32) -> Result<()> {
    on_root(|h| async move { link::delete(&h, index).await })
}

/// Runs `f` with a netlink handle of the calling thread's namespace, on a runtime of its
/// own in a new thread (which starts in the caller's namespace), so callers inside an
/// async runtime work too.
fn on_root<T, F, Fut>(f: F) -> Result<T>
where
    T: Send,
    F: FnOnce(rtnetlink::Handle) -> Fut + Send,
    Fut: std::future::Future<Output = Result<T>>,
{
    std::thread::scope(|s| {
        s.spawn(|| link::with_netlink(f))
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

//! How `lb list` and `lb plan load` show the load controller to people.

use super::control::{BackendLoad, LoadPlan, LoadStatus};

/// Appended to a backend's `lb list` row: its effective weight and utilisation.
pub fn backend_suffix(l: &BackendLoad) -> String {
    let pct = |u: f64| format!("{:.1}%", u * 100.0);
    let mut s = format!("  effective {}", l.effective_weight);
    match (l.utilisation, l.reported) {
        (Some(u), _) => s.push_str(&format!(" util {}", pct(u))),
        (None, Some(r)) => s.push_str(&format!(" util {} (stale)", pct(r))),
        (None, None) => s.push_str(" util -"),
    }
    if let Some(e) = &l.report_error {
        s.push_str(&format!(" report: {e}"));
    }
    s
}

/// The line under `lb list` that says how the loop runs.
pub fn status_line(l: &LoadStatus) -> String {
    format!(
        "load loop: {}{}, period {} ms, {} periods, {} weight changes\n",
        if l.frozen { "frozen" } else { "running" },
        l.leader
            .as_ref()
            .map_or(String::new(), |n| format!(", leader {n}")),
        l.period_ms,
        l.steps,
        l.changes
    )
}

/// `lb plan load`.
pub fn plan(p: &LoadPlan) -> String {
    let mut out = String::new();
    if p.frozen {
        out.push_str("the load loop is frozen; if resumed, its next step would be:\n");
    }
    if p.services.is_empty() {
        out.push_str("no service follows load (load.services is empty)\n");
    }
    for s in &p.services {
        out.push_str(&crate::api_client::render_plan(&s.plan, false));
        out.push_str("  backend                    configured effective   next  util\n");
        for b in &s.backends {
            out.push_str(&format!(
                "  {:<26} {:>10} {:>9} {:>6}  {}\n",
                b.address,
                b.configured,
                b.effective,
                b.next,
                b.utilisation
                    .map_or("-".into(), |u| format!("{:.1}%", u * 100.0))
            ));
        }
    }
    out
}

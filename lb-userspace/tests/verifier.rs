//! The XDP program passes this kernel's verifier. Needs root (CAP_BPF).

use lb::dataplane::{Dataplane, LoadOptions};

#[test]
fn program_passes_the_verifier() {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP: loading BPF programs needs root");
        return;
    }
    match Dataplane::load(&LoadOptions::default()) {
        Ok(_) => {}
        Err(e) => {
            let mut msg = format!("{e}");
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(&format!("\n  caused by: {s}"));
                src = s.source();
            }
            panic!("{msg}");
        }
    }
}

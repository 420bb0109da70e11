//! Fuzzes lb's host-side packet model (`lb_common::packet`), the mirror of the XDP
//! program's parser and decisions: any bytes as a frame to the example node, configured
//! and not, with the model's invariants checked (`lb_common::packet::check`).
#![no_main]

use lb_common::packet::{check, example, NodeView};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|frame: &[u8]| {
    if let Err(v) = check::invariants(&example::NODE, frame) {
        panic!(
            "{v:?}: {:?}",
            lb_common::packet::classify(&example::NODE, frame)
        );
    }
    let unconfigured = NodeView {
        configured: false,
        ..example::NODE
    };
    if let Err(v) = check::invariants(&unconfigured, frame) {
        panic!("unconfigured: {v:?}");
    }
});

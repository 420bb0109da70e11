//! The XDP object built from lb-ebpf, embedded in the binary.

/// The ELF object holding lb's XDP programs and maps.
pub fn object() -> &'static [u8] {
    aya::include_bytes_aligned!(env!("LB_EBPF_OBJ"))
}

/// The program that handles every packet of a node.
pub const PROGRAM: &str = "lb_xdp";
/// A program that passes everything (benchmark floor, veth peer helper).
pub const PASS_PROGRAM: &str = "lb_pass";
/// A program that sends every frame back out (the live benchmark's floor).
pub const TX_PROGRAM: &str = "lb_tx";
/// A program that drops everything (the live benchmark's sink).
pub const DROP_PROGRAM: &str = "lb_drop";

//! Types and logic shared by the XDP program (`lb-ebpf`) and userspace (`lb-userspace`).
//!
//! Everything here is `no_std` and free of allocation so the same code runs in the kernel
//! and on the host, where it is tested.
#![no_std]
// Inline assembly on BPF (`hash::times5_plus_n`).
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]

pub mod addr;
pub mod encap;
pub mod hash;
pub mod limits;
pub mod maps;
pub mod nexthop_index;
pub mod open_index;
pub mod packet;
pub mod pair_index;
pub mod parse;
pub mod proto;
pub mod service_index;
pub mod stats;
pub mod tcp_window;

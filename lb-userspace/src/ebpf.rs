//! The XDP object built from lb-ebpf, embedded in the binary, with its placeholder calls
//! rewritten for the running kernel.
//!
//! aya cannot emit a kfunc call, so the program makes a helper call of a number no kernel
//! has (`lb_common::tcp_window::CAST_CALL`), and the object is rewritten before it loads:
//! into a call of the `bpf_rdonly_cast` kfunc, which the verifier turns into a register
//! move, or, where the kernel has no such kfunc, into the `bpf_skc_to_tcp_sock` helper.

use std::sync::OnceLock;

use lb_common::tcp_window::{CAST_CALL, SKC_TO_TCP_SOCK_HELPER};
use object::{Object as _, ObjectSection, SectionFlags};

use crate::kernel_btf;

/// The program that handles every packet of a node.
pub const PROGRAM: &str = "lb_xdp";
/// A program that passes everything (benchmark floor, veth peer helper).
pub const PASS_PROGRAM: &str = "lb_pass";
/// A program that sends every frame back out (the live benchmark's floor).
pub const TX_PROGRAM: &str = "lb_tx";
/// A program that drops everything (the live benchmark's sink).
pub const DROP_PROGRAM: &str = "lb_drop";

/// The kfunc the cast becomes where the kernel has it.
const CAST_KFUNC: &str = "bpf_rdonly_cast";

/// A BPF call instruction's opcode (`BPF_JMP | BPF_CALL`), and its source-register value
/// for a kfunc (`BPF_PSEUDO_KFUNC_CALL`).
const CALL: u8 = 0x85;
const PSEUDO_KFUNC_CALL: u8 = 2;

/// The ELF object holding lb's XDP programs and maps, ready for the running kernel.
pub fn object() -> &'static [u8] {
    static OBJECT: OnceLock<Object> = OnceLock::new();
    OBJECT
        .get_or_init(|| {
            let call = cast_call();
            let (obj, n) = Object::with_cast(call);
            tracing::debug!(calls = n, ?call, "placeholder calls rewritten");
            obj
        })
        .bytes()
}

/// The object as built, its placeholder calls rewritten; kept in u64s, as the ELF parser
/// wants its data 8-byte aligned.
pub struct Object {
    words: Vec<u64>,
    len: usize,
}

impl Object {
    /// The built object with its casts made `call`, and how many it rewrote.
    pub fn with_cast(call: Call) -> (Object, usize) {
        let built: &[u8] = aya::include_bytes_aligned!(env!("LB_EBPF_OBJ"));
        let mut obj = Object {
            words: vec![0; built.len().div_ceil(8)],
            len: built.len(),
        };
        let bytes = obj.bytes_mut();
        bytes.copy_from_slice(built);
        let n = rewrite_calls(bytes, CAST_CALL, call);
        (obj, n)
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: u64s viewed as their bytes: same memory, no invalid values.
        let all =
            unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast(), self.words.len() * 8) };
        &all[..self.len]
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, borrowed mutably.
        let all = unsafe {
            std::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast(), self.words.len() * 8)
        };
        &mut all[..self.len]
    }
}

/// What a placeholder call becomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    /// A kfunc, by its BTF id in the kernel's BTF.
    Kfunc(u32),
    /// A helper, by number.
    Helper(i32),
}

/// The cast's call on the running kernel.
fn cast_call() -> Call {
    match kernel_btf::kernel_func_id(CAST_KFUNC) {
        Ok(Some(id)) => Call::Kfunc(id),
        Ok(None) => Call::Helper(SKC_TO_TCP_SOCK_HELPER),
        Err(e) => {
            tracing::debug!(error = %e, "kernel BTF unreadable: the socket cast is a helper call");
            Call::Helper(SKC_TO_TCP_SOCK_HELPER)
        }
    }
}

/// Rewrites every helper call numbered `placeholder` in the executable sections of the
/// ELF object `elf` into `call`; returns how many it rewrote. An object that does not
/// parse is left as it is (the loader reports it).
pub fn rewrite_calls(elf: &mut [u8], placeholder: i32, call: Call) -> usize {
    let Ok(file) = object::File::parse(&*elf) else {
        return 0;
    };
    let ranges: Vec<(u64, u64)> = file
        .sections()
        .filter(|s| {
            matches!(s.flags(), SectionFlags::Elf { sh_flags }
                if sh_flags & u64::from(object::elf::SHF_EXECINSTR) != 0)
        })
        .filter_map(|s| s.file_range())
        .collect();
    let mut n = 0;
    for (start, size) in ranges {
        let section = &mut elf[start as usize..(start + size) as usize];
        for insn in section.chunks_exact_mut(8) {
            // code, registers (dst low nibble, src high), offset (2 bytes), immediate.
            let imm = i32::from_le_bytes([insn[4], insn[5], insn[6], insn[7]]);
            if insn[0] != CALL || insn[1] != 0 || insn[2..4] != [0, 0] || imm != placeholder {
                continue;
            }
            let (src, imm) = match call {
                // Offset 0: the id is in vmlinux's BTF, not a module's.
                Call::Kfunc(id) => (PSEUDO_KFUNC_CALL, id as i32),
                Call::Helper(h) => (0, h),
            };
            insn[1] = src << 4;
            insn[4..8].copy_from_slice(&imm.to_le_bytes());
            n += 1;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use aya::{programs::Xdp, EbpfLoader};

    use super::*;
    use crate::kernel_btf;

    #[test]
    fn every_placeholder_call_is_rewritten_and_nothing_else() {
        let built: &[u8] = aya::include_bytes_aligned!(env!("LB_EBPF_OBJ"));
        let (obj, n) = Object::with_cast(Call::Kfunc(7));
        // The window check is inlined in the backend path and the local first hop's.
        assert!(n >= 2, "{n} placeholder calls");
        let changed = built
            .iter()
            .zip(obj.bytes())
            .filter(|(a, b)| a != b)
            .count();
        assert!(changed <= n * 5, "{changed} bytes changed for {n} calls");
        let mut again = obj.bytes().to_vec();
        assert_eq!(rewrite_calls(&mut again, CAST_CALL, Call::Kfunc(7)), 0);
    }

    #[test]
    fn a_kfunc_call_and_a_helper_call_are_encoded_as_the_kernel_reads_them() {
        let (kfunc, _) = Object::with_cast(Call::Kfunc(0x1234));
        let (helper, _) = Object::with_cast(Call::Helper(137));
        let insn = |o: &Object, i: [u8; 8]| o.bytes().chunks_exact(8).any(|c| c == i);
        assert!(insn(&kfunc, [0x85, 0x20, 0, 0, 0x34, 0x12, 0, 0]));
        assert!(insn(&helper, [0x85, 0x00, 0, 0, 137, 0, 0, 0]));
    }

    /// The verifier accepts the program with either cast (as root, with kernel BTF).
    #[test]
    fn the_program_loads_with_the_kfunc_and_with_the_helper() {
        // SAFETY: geteuid cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        let Ok(layout) = kernel_btf::tcp_sock_layout() else {
            eprintln!("skipped: no kernel BTF");
            return;
        };
        let Ok(Some(kfunc)) = kernel_btf::kernel_func_id(CAST_KFUNC) else {
            eprintln!("skipped: the kernel has no {CAST_KFUNC}");
            return;
        };
        if !root {
            eprintln!("skipped: not root");
            return;
        }
        for call in [Call::Kfunc(kfunc), Call::Helper(SKC_TO_TCP_SOCK_HELPER)] {
            let (obj, _) = Object::with_cast(call);
            let mut ebpf = EbpfLoader::new()
                .override_global(lb_common::tcp_window::LAYOUT_GLOBAL, &layout, true)
                .load(obj.bytes())
                .unwrap_or_else(|e| panic!("{call:?}: {e}"));
            let prog: &mut Xdp = ebpf.program_mut(PROGRAM).unwrap().try_into().unwrap();
            prog.load().unwrap_or_else(|e| panic!("{call:?}: {e}"));
        }
    }
}

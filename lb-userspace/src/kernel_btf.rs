//! Member offsets of kernel structs, read from the kernel's BTF
//! (`/sys/kernel/btf/vmlinux`): the XDP program reads `struct tcp_sock` fields whose place
//! differs between kernels (see `lb_common::tcp_window`).
//!
//! Only what that needs is parsed: the type section is walked to the named struct and
//! its members; the format is the kernel's `Documentation/bpf/btf.rst`.

use lb_common::tcp_window::TcpSockLayout;

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_FUNC: u32 = 12;

/// Why the offsets could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("not BTF, or cut short")]
    Format,
    #[error("type kind {0} is unknown to this parser")]
    UnknownKind(u32),
    #[error("{kind} {name} not found")]
    NotFound { kind: &'static str, name: String },
    #[error("struct {strct} has no byte-aligned member {member}")]
    NoMember { strct: String, member: String },
}

const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

/// The running kernel's BTF.
fn vmlinux() -> Result<Vec<u8>, BtfError> {
    std::fs::read(VMLINUX).map_err(|source| BtfError::Read {
        path: VMLINUX.to_string(),
        source,
    })
}

/// The kernel's `struct tcp_sock`: BTF id and member offsets, from the running kernel's
/// BTF. Without the listener's members the layout still serves the window check.
pub fn tcp_sock_layout() -> Result<TcpSockLayout, BtfError> {
    let data = vmlinux()?;
    let (id, offsets) = member_offsets(&data, "tcp_sock", &TcpSockLayout::FIELDS)?;
    let mut o = [0u32; 6];
    o.copy_from_slice(&offsets);
    let layout = TcpSockLayout::new(id, o);
    let stamp = path_offset(
        &data,
        &[
            ("tcp_sock", "rx_opt"),
            ("tcp_options_received", "ts_recent_stamp"),
        ],
    );
    // `struct sock` is the first member of the first member of the first member.
    let reuseport = path_offset(
        &data,
        &[
            ("tcp_sock", "inet_conn"),
            ("inet_connection_sock", "icsk_inet"),
            ("inet_sock", "sk"),
            ("sock", "sk_reuseport_cb"),
        ],
    );
    let layout = match (stamp, reuseport) {
        (Ok(s), Ok(r)) => layout.with_listener(s, r),
        (Err(e), _) | (_, Err(e)) => {
            tracing::debug!(
                error = %e,
                "no listener layout: every ACK to a listener asks the SYN-cookie helper"
            );
            return Ok(layout);
        }
    };
    Ok(
        match path_offset(&data, &[("sock_reuseport", "synq_overflow_ts")]) {
            Ok(g) => layout.with_group(g),
            Err(e) => {
                tracing::debug!(
                    error = %e,
                    "no reuseport group layout: every ACK to a listener in a group asks the \
                     SYN-cookie helper"
                );
                layout
            }
        },
    )
}

/// The offset of a member reached through nested structs: `(struct, member)` pairs, each
/// member of the struct the pair before it names.
fn path_offset(data: &[u8], path: &[(&str, &str)]) -> Result<u32, BtfError> {
    path.iter().try_fold(0, |at, (strct, member)| {
        let (_, o) = member_offsets(data, strct, &[member])?;
        Ok(at + o[0])
    })
}

/// The BTF id of the kernel function `name` (a kfunc's, for a call of it), if the running
/// kernel has one.
pub fn kernel_func_id(name: &str) -> Result<Option<u32>, BtfError> {
    let data = vmlinux()?;
    match find(&data, KIND_FUNC, name) {
        Ok((id, _)) => Ok(Some(id)),
        Err(BtfError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The BTF blob: little-endian words and the string section.
struct Blob<'a> {
    data: &'a [u8],
    strings: usize,
}

impl<'a> Blob<'a> {
    fn u32_at(&self, o: usize) -> Result<u32, BtfError> {
        let b = self.data.get(o..o + 4).ok_or(BtfError::Format)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn str_at(&self, off: u32) -> Result<&'a [u8], BtfError> {
        let s = self
            .data
            .get(self.strings + off as usize..)
            .ok_or(BtfError::Format)?;
        let end = s.iter().position(|b| *b == 0).ok_or(BtfError::Format)?;
        Ok(&s[..end])
    }

    /// The byte offset of `member` in the struct whose `vlen` members start at `at`;
    /// `None` when it has none of that name or it is a bitfield.
    fn member(
        &self,
        at: usize,
        vlen: usize,
        kind_flag: bool,
        member: &str,
    ) -> Result<Option<u32>, BtfError> {
        for i in 0..vlen {
            let m = at + i * 12;
            if self.str_at(self.u32_at(m)?)? != member.as_bytes() {
                continue;
            }
            let off = self.u32_at(m + 8)?;
            // With the kind flag, the top byte is a bitfield size.
            let (bits, bitfield) = if kind_flag {
                (off & 0x00ff_ffff, off >> 24 != 0)
            } else {
                (off, false)
            };
            return Ok((!bitfield && bits % 8 == 0).then_some(bits / 8));
        }
        Ok(None)
    }
}

/// The BTF id of the struct named `name` in the BTF blob `data`, and the byte offsets
/// of its `members`.
pub fn member_offsets(
    data: &[u8],
    name: &str,
    members: &[&str],
) -> Result<(u32, Vec<u32>), BtfError> {
    let (id, t) = find(data, KIND_STRUCT, name)?;
    let offsets = members
        .iter()
        .map(|m| {
            t.blob
                .member(t.members, t.vlen, t.kind_flag, m)?
                .ok_or_else(|| BtfError::NoMember {
                    strct: name.into(),
                    member: (*m).into(),
                })
        })
        .collect::<Result<_, _>>()?;
    Ok((id, offsets))
}

/// A type found in a BTF blob: where its members start, how many, and its kind flag.
struct Found<'a> {
    blob: Blob<'a>,
    members: usize,
    vlen: usize,
    kind_flag: bool,
}

/// The type of kind `kind` (BTF_KIND_*) named `name` in the BTF blob `data`, and its id.
fn find<'a>(data: &'a [u8], kind: u32, name: &str) -> Result<(u32, Found<'a>), BtfError> {
    let head = Blob { data, strings: 0 };
    let magic = data.get(0..2).ok_or(BtfError::Format)?;
    if u16::from_le_bytes([magic[0], magic[1]]) != MAGIC {
        return Err(BtfError::Format);
    }
    let hdr_len = head.u32_at(4)? as usize;
    let (type_off, type_len) = (head.u32_at(8)? as usize, head.u32_at(12)? as usize);
    let blob = Blob {
        data,
        strings: hdr_len + head.u32_at(16)? as usize,
    };
    let types = hdr_len + type_off;
    let mut at = types;
    // Type ids count from 1 (0 is void), in the order of the type section.
    let mut id = 1;
    while at < types + type_len {
        let name_off = blob.u32_at(at)?;
        let info = blob.u32_at(at + 4)?;
        let k = (info >> 24) & 0x1f;
        let vlen = (info & 0xffff) as usize;
        at += 12;
        if k == kind && blob.str_at(name_off)? == name.as_bytes() {
            let found = Found {
                blob,
                members: at,
                vlen,
                kind_flag: info >> 31 == 1,
            };
            return Ok((id, found));
        }
        at += trailing_len(k, vlen)?;
        id += 1;
    }
    Err(BtfError::NotFound {
        kind: if kind == KIND_FUNC {
            "function"
        } else {
            "struct"
        },
        name: name.into(),
    })
}

/// Bytes that follow a type's 12-byte common part, by kind (BTF_KIND_*).
fn trailing_len(kind: u32, vlen: usize) -> Result<usize, BtfError> {
    Ok(match kind {
        // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG
        2 | 7 | 8 | 9 | 10 | 11 | 12 | 16 | 18 => 0,
        // INT, VAR, DECL_TAG
        1 | 14 | 17 => 4,
        // ARRAY
        3 => 12,
        // STRUCT, UNION, DATASEC, ENUM64
        4 | 5 | 15 | 19 => 12 * vlen,
        // ENUM, FUNC_PROTO
        6 | 13 => 8 * vlen,
        k => return Err(BtfError::UnknownKind(k)),
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn the_running_kernel_has_the_tcp_sock_fields() {
        if !Path::new(VMLINUX).exists() {
            eprintln!("skipped: no kernel BTF");
            return;
        }
        let o = tcp_sock_layout().expect("tcp_sock layout");
        assert!(o.btf_id > 0);
        // `rx_opt` follows `struct inet_connection_sock`, which holds `struct sock`.
        assert!(o.overflow_stamp.is_multiple_of(4) && o.overflow_stamp < 4096);
        assert!(o.reuseport_cb.is_multiple_of(8) && o.reuseport_cb < o.overflow_stamp);
        // After the RCU head (16 bytes) and four 16-bit counts.
        assert!(o.group_overflow_stamp.is_multiple_of(4));
        assert!((24..48).contains(&o.group_overflow_stamp));
        let all = [
            o.rcv_nxt,
            o.rcv_wup,
            o.rcv_wnd,
            o.snd_una,
            o.snd_nxt,
            o.max_window,
        ];
        for (i, a) in all.iter().enumerate() {
            assert!(*a > 0 && *a < 4096 && a % 4 == 0, "{i}: {a}");
            for b in &all[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    #[test]
    fn not_btf_is_refused() {
        assert!(matches!(
            member_offsets(&[0; 32], "tcp_sock", &["rcv_nxt"]),
            Err(BtfError::Format)
        ));
    }
}

#!/usr/bin/env python3
"""Where lb_xdp's time goes, by BPF source line (docs/benchmarks.md, "Where the time goes").

Usage (as root, from the repository): xtask/tools/jit_profile.py CASE [MIN_SAMPLES]

Runs `cargo xtask bench --suite dataplane -- --case CASE` long enough to sample it with
`perf record -a` (cpu-clock: this kind of VM has no PMU), reads the JIT image's
addresses and line table of the lb_xdp program the bench loaded (BPF_OBJ_GET_INFO_BY_FD:
Debian's bpftool cannot dump JIT code without libbfd), and prints the samples that fell
in each JIT-compiled function and in each stretch of code that one source line compiled
to, with the xlated instruction range. cpu-clock samples skid: a stall is often charged
to the instructions just after it (after a call returns, after a slow load).
"""

import bisect
import collections
import ctypes
import os
import re
import struct
import subprocess
import sys
import time

SYS_BPF = 321
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
INFO_LEN = 232  # struct bpf_prog_info up to attach_btf_id

libc = ctypes.CDLL(None, use_errno=True)


def bpf(cmd, attr):
    buf = ctypes.create_string_buffer(attr, 128)
    r = libc.syscall(SYS_BPF, cmd, buf, 128)
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r


def prog_info(fd, req):
    b = ctypes.create_string_buffer(bytes(req), INFO_LEN)
    bpf(BPF_OBJ_GET_INFO_BY_FD, struct.pack("<IIQ", fd, INFO_LEN, ctypes.addressof(b)))
    return b.raw


def jit_layout(prog_id):
    """[(start, len)] of the JIT-compiled functions, [(jit address, xlated index)]."""
    fd = bpf(BPF_PROG_GET_FD_BY_ID, struct.pack("<III", prog_id, 0, 0))
    raw = prog_info(fd, bytearray(INFO_LEN))
    nks, nfl = struct.unpack_from("<II", raw, 104)
    nli, = struct.unpack_from("<I", raw, 148)
    njli, lirs, jlirs = struct.unpack_from("<III", raw, 168)
    ks = ctypes.create_string_buffer(8 * nks)
    fl = ctypes.create_string_buffer(4 * nfl)
    li = ctypes.create_string_buffer(lirs * nli)
    jli = ctypes.create_string_buffer(jlirs * njli)
    req = bytearray(INFO_LEN)
    struct.pack_into("<II", req, 104, nks, nfl)
    struct.pack_into("<QQ", req, 112, ctypes.addressof(ks), ctypes.addressof(fl))
    struct.pack_into("<I", req, 148, nli)
    struct.pack_into("<QQ", req, 152, ctypes.addressof(li), ctypes.addressof(jli))
    struct.pack_into("<III", req, 168, njli, lirs, jlirs)
    prog_info(fd, req)
    os.close(fd)
    funcs = list(zip(struct.unpack(f"<{nks}Q", ks.raw), struct.unpack(f"<{nfl}I", fl.raw)))
    insns = [struct.unpack_from("<I", li.raw, k * lirs)[0] for k in range(nli)]
    lines = sorted(zip(struct.unpack(f"<{njli}Q", jli.raw), insns))
    return funcs, lines


def lb_xdp_ids():
    out = subprocess.run(["bpftool", "prog", "show"], capture_output=True, text=True).stdout
    return [int(m.group(1)) for m in re.finditer(r"^(\d+): xdp\s+name lb_xdp\b", out, re.M)]


def main():
    case = sys.argv[1]
    least = int(sys.argv[2]) if len(sys.argv) > 2 else 50
    bench = ["cargo", "xtask", "bench", "--suite", "dataplane", "--", "--case", case]
    subprocess.run(bench + ["--rounds", "1"], capture_output=True, check=True)
    before = set(lb_xdp_ids())
    run = subprocess.Popen(bench + ["--rounds", "60"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    new = []
    for _ in range(60):
        time.sleep(1)
        new = [i for i in lb_xdp_ids() if i not in before]
        if new:
            break
    if not new:
        sys.exit("the bench loaded no lb_xdp")
    time.sleep(3)
    prog = max(i for i in lb_xdp_ids() if i not in before)
    funcs, lines = jit_layout(prog)
    xlated = subprocess.run(["bpftool", "prog", "dump", "xlated", "id", str(prog)],
                            capture_output=True, text=True).stdout
    data = f"/tmp/jit_profile-{os.getpid()}.data"
    subprocess.run(["perf", "record", "-a", "-q", "-o", data, "--", "sleep", "10"],
                   capture_output=True)
    run.wait()
    ips = subprocess.run(["perf", "script", "-i", data, "-F", "ip", "--comm", "bench"],
                         capture_output=True, text=True).stdout.split()
    os.remove(data)

    names, source, cur, pending = [], {}, "", None
    for line in xlated.splitlines():
        m = re.match(r"\s*(\d+): ", line)
        if m:
            source[int(m.group(1))] = cur
            if pending:
                names.append((int(m.group(1)), pending))
                pending = None
        elif line.startswith(";"):
            cur = line[2:100]
        elif re.match(r"^\S.*\(.*\):$", line):
            pending = line.split("(")[0].split()[-1][:40]
    addrs = [a for a, _ in lines]
    starts = [s for s, _ in names]
    by_line, by_func, total = collections.Counter(), collections.Counter(), 0
    for ip in (int(x, 16) for x in ips):
        total += 1
        if not any(a <= ip < a + n for a, n in funcs):
            continue
        k = bisect.bisect_right(addrs, ip) - 1
        by_line[k] += 1
        insn = lines[k][1]
        by_func[names[bisect.bisect_right(starts, insn) - 1][1]] += 1
    inside = sum(by_func.values())
    print(f"{case}: {total} samples of the bench process, {inside} in lb_xdp's functions")
    for name, n in by_func.most_common():
        print(f"{n:7d} {100 * n / max(inside, 1):5.1f}%  {name}")
    print("\nsamples  xlated insns  source line")
    for k in sorted(by_line, key=lambda k: lines[k][1]):
        if by_line[k] >= least:
            insn = lines[k][1]
            end = lines[k + 1][1] if k + 1 < len(lines) else insn + 1
            print(f"{by_line[k]:7d}  {insn:5d}-{end:<5d}  {source.get(insn, '')}")


if __name__ == "__main__":
    main()

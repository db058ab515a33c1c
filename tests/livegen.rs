//! A bounded packet generator for throughput runs: a three-instruction XDP
//! program that redirects to a veth, run through BPF_PROG_TEST_RUN with
//! BPF_F_TEST_XDP_LIVE_FRAMES, so `count` real frames leave that veth
//! (about 15 Mpps on one CPU here; pktgen is not built into this kernel).

use std::{
    os::fd::{AsRawFd, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{bail, Result};

use crate::testrun::{bpf, insn, load_xdp, BPF_PROG_TEST_RUN};

const BPF_F_TEST_XDP_LIVE_FRAMES: u64 = 1 << 1;
const BPF_FUNC_REDIRECT: i32 = 23;
pub const XDP_DROP: i32 = 1;

/// `return XDP_DROP`: the floor of any dropping XDP program.
pub fn load_xdp_drop() -> Result<OwnedFd> {
    load_xdp(&[insn(0xb7, 0, 0, 0, XDP_DROP), insn(0x95, 0, 0, 0, 0)], "the XDP drop program")
}

/// `return bpf_redirect(ifindex, 0)`.
pub fn load_redirect(ifindex: u32) -> Result<OwnedFd> {
    let insns = [insn(0xb7, 1, 0, 0, ifindex as i32), insn(0xb7, 2, 0, 0, 0), insn(0x85, 0, 0, 0, BPF_FUNC_REDIRECT), insn(0x95, 0, 0, 0, 0)];
    load_xdp(&insns, "the redirect generator")
}

/// Sends `count` copies of `frame` out of the generator's veth. Call it
/// from inside the generator's network namespace (the redirect resolves
/// the ifindex there). Returns the wall time of the run.
pub fn send(generator: &OwnedFd, frame: &[u8], count: u32) -> Result<Duration> {
    let mut attr = [0u64; 20];
    attr[0] = generator.as_raw_fd() as u64;
    attr[1] = frame.len() as u64;
    attr[2] = frame.as_ptr() as u64;
    attr[4] = count as u64;
    attr[8] = BPF_F_TEST_XDP_LIVE_FRAMES;
    attr[9] = 64; // batch size
    let start = Instant::now();
    if bpf(BPF_PROG_TEST_RUN, &mut attr) < 0 {
        bail!("BPF_PROG_TEST_RUN with live frames: {}", std::io::Error::last_os_error());
    }
    Ok(start.elapsed())
}

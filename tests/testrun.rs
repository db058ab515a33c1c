//! BPF_PROG_TEST_RUN driven directly, for timing many repeats of one frame,
//! the empty XDP program every per-packet cost is compared with, and a
//! raw program attached to an interface.

use std::{
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::PathBuf,
    process::Command,
    time::Instant,
};

use anyhow::{bail, Result};

use crate::netns::{run, Netns};

const BPF_PROG_LOAD: libc::c_long = 5;
pub(crate) const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_TYPE_XDP: u32 = 6;

pub(crate) fn bpf(cmd: libc::c_long, attr: &mut [u64; 20]) -> libc::c_long {
    // SAFETY: attr is a zeroed bpf_attr-sized buffer filled for `cmd`.
    unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), std::mem::size_of_val(attr)) }
}

/// One eBPF instruction: opcode, dst/src registers, offset, immediate.
pub(crate) fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    let o = off.to_le_bytes();
    let i = imm.to_le_bytes();
    u64::from_le_bytes([code, dst | (src << 4), o[0], o[1], i[0], i[1], i[2], i[3]])
}

/// Loads hand-written instructions as an XDP program (`what` names it in errors).
pub(crate) fn load_xdp(insns: &[u64], what: &str) -> Result<OwnedFd> {
    let license = b"GPL\0";
    let mut attr = [0u64; 20];
    attr[0] = BPF_PROG_TYPE_XDP as u64 | (insns.len() as u64) << 32;
    attr[1] = insns.as_ptr() as u64;
    attr[2] = license.as_ptr() as u64;
    let fd = bpf(BPF_PROG_LOAD, &mut attr);
    if fd < 0 {
        bail!("loading {what}: {}", std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Pins a program at `path` (for tools such as `ip link set xdp pinned`).
pub fn pin(prog: BorrowedFd<'_>, path: &std::path::Path) -> Result<()> {
    let c = std::ffi::CString::new(path.display().to_string())?;
    let mut attr = [0u64; 20];
    attr[0] = c.as_ptr() as u64;
    attr[1] = prog.as_raw_fd() as u64;
    if bpf(BPF_OBJ_PIN, &mut attr) < 0 {
        bail!("pinning at {}: {}", path.display(), std::io::Error::last_os_error());
    }
    Ok(())
}

/// Opens the object (map, program, link) pinned at `path`.
pub fn obj_get(path: &std::path::Path) -> Result<OwnedFd> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    let mut attr = [0u64; 20];
    attr[0] = c.as_ptr() as u64;
    let fd = bpf(BPF_OBJ_GET, &mut attr);
    if fd < 0 {
        bail!("BPF_OBJ_GET {}: {}", path.display(), std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Loads `r0 = XDP_PASS; exit`: the floor of any XDP program's cost.
pub fn load_empty_xdp() -> Result<OwnedFd> {
    load_xdp(&[insn(0xb7, 0, 0, 0, 2), insn(0x95, 0, 0, 0, 0)], "the empty XDP program")
}

/// One timed BPF_PROG_TEST_RUN.
pub struct Timing {
    pub retval: u32,
    /// The kernel's own figure: whole nanoseconds per run.
    pub kernel_ns: u32,
    /// Wall-clock nanoseconds per run around the syscall: finer grained,
    /// and it includes time the kernel's timer leaves out (preemption).
    pub wall_ns: f64,
}

/// Runs `prog` on `frame` `repeat` times.
pub fn time_run(prog: BorrowedFd<'_>, frame: &[u8], repeat: u32) -> Result<Timing> {
    let mut attr = [0u64; 20];
    attr[0] = prog.as_raw_fd() as u64; // prog_fd, retval
    attr[1] = frame.len() as u64; // data_size_in, data_size_out
    attr[2] = frame.as_ptr() as u64;
    attr[4] = repeat as u64; // repeat, duration
    let start = Instant::now();
    if bpf(BPF_PROG_TEST_RUN, &mut attr) < 0 {
        bail!("BPF_PROG_TEST_RUN: {}", std::io::Error::last_os_error());
    }
    let elapsed = start.elapsed();
    Ok(Timing {
        retval: (attr[0] >> 32) as u32,
        kernel_ns: (attr[4] >> 32) as u32,
        wall_ns: elapsed.as_nanos() as f64 / repeat as f64,
    })
}

/// Pins this thread to the last CPU, so runs are not migrated mid-measure.
pub fn pin_to_last_cpu() -> Result<usize> {
    // SAFETY: sysconf has no preconditions.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize;
    let cpu = cpus - 1;
    // SAFETY: a zeroed cpu_set_t with one bit set, for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!("sched_setaffinity: {}", std::io::Error::last_os_error());
        }
    }
    Ok(cpu)
}

/// A raw XDP program attached to an interface in a namespace (netlink via
/// `ip`, as an operator would), detached on drop.
pub struct XdpLink {
    ns: String,
    iface: String,
}

impl XdpLink {
    pub fn attach(ns: &Netns, iface: &str, prog: &std::os::fd::OwnedFd) -> Result<Self> {
        // `ip link set xdp pinned` needs a pin: pin the program, attach, unpin.
        let path = PathBuf::from(format!("/sys/fs/bpf/sgtest_floor_{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        pin(prog.as_fd(), &path)?;
        let r = run(&["nsenter", &format!("--net=/run/netns/{}", ns.name()), "--", "ip", "link", "set", iface, "xdpdrv", "pinned", &path.display().to_string()]);
        let _ = std::fs::remove_file(&path);
        r?;
        Ok(Self { ns: ns.name().to_owned(), iface: iface.to_owned() })
    }
}

impl Drop for XdpLink {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["-n", &self.ns, "link", "set", &self.iface, "xdpdrv", "off"]).status();
    }
}

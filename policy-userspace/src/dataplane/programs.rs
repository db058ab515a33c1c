//! The three hook programs: loading, pinning, and attaching through
//! links pinned in bpffs, so enforcement outlives the controller and a
//! restart swaps the new program into the old link without a gap.

use std::path::Path;

use aya::{
    programs::{
        links::{FdLink, PinnedLink},
        tc::{self, SchedClassifierLink, TcAttachType},
        xdp::XdpLink,
        Program, SchedClassifier, Xdp, XdpMode,
    },
    Ebpf,
};

use super::{DataplaneError, Hook, Result};

/// A hook's program, as the one type the kernel gave it.
pub(super) enum HookProgram<'a> {
    Xdp(&'a mut Xdp),
    Tc(&'a mut SchedClassifier),
}

impl HookProgram<'_> {
    /// Loads (verifies) it.
    fn load(&mut self) -> std::result::Result<(), aya::programs::ProgramError> {
        match self {
            HookProgram::Xdp(p) => p.load(),
            HookProgram::Tc(p) => p.load(),
        }
    }

    #[cfg(feature = "testing")]
    pub(super) fn fd(&self) -> std::result::Result<&aya::programs::ProgramFd, aya::programs::ProgramError> {
        match self {
            HookProgram::Xdp(p) => p.fd(),
            HookProgram::Tc(p) => p.fd(),
        }
    }

    fn pin(&mut self, path: &Path) -> std::result::Result<(), aya::pin::PinError> {
        match self {
            HookProgram::Xdp(p) => p.pin(path),
            HookProgram::Tc(p) => p.pin(path),
        }
    }

    fn info(&self) -> std::result::Result<aya::programs::ProgramInfo, aya::programs::ProgramError> {
        match self {
            HookProgram::Xdp(p) => p.info(),
            HookProgram::Tc(p) => p.info(),
        }
    }
}

/// The loaded object's programs.
pub struct Programs {
    ebpf: Ebpf,
}

fn pin_error(path: &Path, e: impl std::fmt::Display) -> DataplaneError {
    DataplaneError::Pin { path: path.display().to_string(), message: e.to_string() }
}

/// A link pinned at `path`, as the program type's own link.
fn open_pinned_link<L: TryFrom<FdLink, Error = aya::programs::links::LinkError>>(path: &Path) -> Result<L> {
    let pinned = PinnedLink::from_pin(path).map_err(|e| pin_error(path, e))?;
    L::try_from(FdLink::from(pinned)).map_err(|e| pin_error(path, e))
}

/// Pins a fresh link at `path`, so it outlives this process.
fn pin_link<L>(link: L, path: &Path) -> Result<()>
where
    FdLink: TryFrom<L, Error = aya::programs::links::LinkError>,
{
    let fd = FdLink::try_from(link).map_err(|e| pin_error(path, e))?;
    fd.pin(path).map_err(|e| pin_error(path, e))?;
    Ok(())
}

impl Programs {
    /// Loads (verifies) every hook's program of an object whose maps are
    /// already created.
    pub(super) fn load(ebpf: Ebpf) -> Result<Self> {
        let mut programs = Self { ebpf };
        for hook in Hook::ALL {
            let name = hook.program_name();
            programs.get(hook)?.load().map_err(|source| DataplaneError::Program { name, source })?;
        }
        Ok(programs)
    }

    /// The object, for what else it holds (its maps, to be taken out).
    pub(super) fn object(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    pub(super) fn get(&mut self, hook: Hook) -> Result<HookProgram<'_>> {
        let name = hook.program_name();
        match self.ebpf.program_mut(name) {
            Some(Program::Xdp(p)) if hook == Hook::XdpIngress => Ok(HookProgram::Xdp(p)),
            Some(Program::SchedClassifier(p)) if hook != Hook::XdpIngress => Ok(HookProgram::Tc(p)),
            _ => Err(DataplaneError::MissingProgram(name)),
        }
    }

    /// Pins each program at `dir/prog_NAME` (replacing an older pin).
    pub fn pin(&mut self, dir: &Path) -> Result<()> {
        for hook in Hook::ALL {
            let path = dir.join(format!("prog_{}", hook.program_name()));
            let _ = std::fs::remove_file(&path);
            self.get(hook)?.pin(&path).map_err(|e| pin_error(&path, e))?;
        }
        Ok(())
    }

    /// Attaches `xdp_ingress` to `iface` through a link pinned at `link_pin`,
    /// or, when that pin exists, swaps this program into the pinned link
    /// atomically: packets never go unjudged. Returns whether it adopted.
    pub fn attach_xdp_pinned(&mut self, iface: &str, mode: XdpMode, link_pin: &Path) -> Result<bool> {
        let name = Hook::XdpIngress.program_name();
        let HookProgram::Xdp(program) = self.get(Hook::XdpIngress)? else { return Err(DataplaneError::MissingProgram(name)) };
        if link_pin.exists() {
            let link: XdpLink = open_pinned_link(link_pin)?;
            program.attach_to_link(link).map_err(|source| DataplaneError::Program { name, source })?;
            return Ok(true);
        }
        let id = program.attach(iface, mode).map_err(|source| DataplaneError::Program { name, source })?;
        let link = program.take_link(id).map_err(|source| DataplaneError::Program { name, source })?;
        pin_link(link, link_pin)?;
        Ok(false)
    }

    /// As [`Programs::attach_xdp_pinned`], for a TC hook (a TCX link).
    pub fn attach_tc_pinned(&mut self, hook: Hook, iface: &str, link_pin: &Path) -> Result<bool> {
        let name = hook.program_name();
        let attach_type = tc_attach_type(hook)?;
        let HookProgram::Tc(program) = self.get(hook)? else { return Err(DataplaneError::MissingProgram(name)) };
        if link_pin.exists() {
            let link: SchedClassifierLink = open_pinned_link(link_pin)?;
            program.attach_to_link(link).map_err(|source| DataplaneError::Program { name, source })?;
            return Ok(true);
        }
        let id = program.attach(iface, attach_type).map_err(|source| DataplaneError::Program { name, source })?;
        let link = program.take_link(id).map_err(|source| DataplaneError::Program { name, source })?;
        pin_link(link, link_pin)?;
        Ok(false)
    }

    /// Attaches a hook's program to `iface` for as long as this value
    /// lives (tests and benchmarks; the controller pins its links).
    pub fn attach(&mut self, hook: Hook, iface: &str, mode: XdpMode) -> Result<()> {
        let name = hook.program_name();
        match self.get(hook)? {
            HookProgram::Xdp(p) => p.attach(iface, mode).map(drop),
            HookProgram::Tc(p) => {
                let attach_type = tc_attach_type(hook)?;
                // An existing clsact qdisc is fine.
                let _ = tc::qdisc_add_clsact(iface);
                p.attach(iface, attach_type).map(drop)
            }
        }
        .map_err(|source| DataplaneError::Program { name, source })
    }

    /// The kernel's id of a hook's loaded program (for tools that find its
    /// maps by id, as `smtpguard trace` does).
    pub fn id(&mut self, hook: Hook) -> Result<u32> {
        let name = hook.program_name();
        Ok(self.get(hook)?.info().map_err(|source| DataplaneError::Program { name, source })?.id())
    }

    /// How many instructions the verifier processed for each program.
    pub fn verified_instructions(&mut self) -> Result<Vec<(&'static str, u32)>> {
        Hook::ALL
            .iter()
            .map(|&hook| {
                let name = hook.program_name();
                let info = self.get(hook)?.info().map_err(|source| DataplaneError::Program { name, source })?;
                Ok((name, info.verified_instruction_count().unwrap_or(0)))
            })
            .collect()
    }
}

fn tc_attach_type(hook: Hook) -> Result<TcAttachType> {
    match hook {
        Hook::TcIngress => Ok(TcAttachType::Ingress),
        Hook::TcEgress => Ok(TcAttachType::Egress),
        Hook::XdpIngress => Err(DataplaneError::MissingProgram("xdp is not a TC hook")),
    }
}

/// The interface a pinned XDP or TCX link is attached to: its ifindex,
/// or 0 when the interface is gone (the kernel detached the link).
pub fn pinned_link_ifindex(path: &Path) -> std::io::Result<u32> {
    use std::os::fd::{FromRawFd, OwnedFd};
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    let bpf = |cmd: libc::c_long, attr: &mut [u64; 4]| {
        // SAFETY: `attr` is a zeroed bpf_attr prefix the command reads.
        unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), std::mem::size_of_val(attr)) }
    };
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    let mut attr = [0u64; 4];
    attr[0] = c.as_ptr() as u64;
    let fd = bpf(BPF_OBJ_GET, &mut attr);
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just gave us this fd.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // struct bpf_link_info: type, id, prog_id, then (8-aligned) the
    // union, whose xdp and tcx members start with the ifindex.
    let mut info = [0u32; 16];
    let mut attr = [0u64; 4];
    attr[0] = std::os::fd::AsRawFd::as_raw_fd(&fd) as u64 | ((size_of_val(&info) as u64) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    if bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(info[4])
}

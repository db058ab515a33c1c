//! The bpffs directory that keeps enforcement alive without the controller,
//! and the run directory beside it for the controller's pid.
//!
//! Layout under the pin directory (names without dots, as bpffs wants):
//! one pin per map (`ACL_V6`, `SOURCES`, ...), `prog_<program>`, one
//! link per attachment: `link_xdp_<iface>`, `link_tcegress_<iface>`,
//! `link_tcingress_<iface>`, and the directories `lock_bans` that ban
//! commands lock and `lock_trace` that `smtpguard trace` locks. A running
//! controller holds a lock on the pin directory.

use std::{
    fs::File,
    os::{
        fd::AsRawFd,
        unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt},
    },
    path::PathBuf,
};

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/smtpguard";
pub const DEFAULT_RUN_DIR: &str = "/run/smtpguard";

#[derive(Clone, Debug)]
pub struct Pins {
    pub dir: PathBuf,
    pub run_dir: PathBuf,
}

/// The kinds of attachment, as they appear in link pin names.
pub const LINK_KINDS: [&str; 3] = ["xdp", "tcegress", "tcingress"];

impl Pins {
    pub fn new(dir: impl Into<PathBuf>, run_dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into(), run_dir: run_dir.into() }
    }

    pub fn link(&self, kind: &str, iface: &str) -> PathBuf {
        self.dir.join(format!("link_{kind}_{}", iface.replace('.', "_")))
    }

    /// A directory inside the pins that ban commands lock among themselves.
    pub fn ban_lock_dir(&self) -> PathBuf {
        self.dir.join("lock_bans")
    }

    pub fn pid_file(&self) -> PathBuf {
        self.run_dir.join("controller.pid")
    }

    /// Creates both directories, owner-only.
    pub fn create(&self) -> std::io::Result<()> {
        for d in [&self.dir, &self.run_dir] {
            std::fs::create_dir_all(d)?;
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))?;
        }
        Ok(())
    }

    /// Takes the pin directory for this process: an exclusive `flock` on
    /// the directory, held until the returned guard drops (or the process
    /// dies, even by SIGKILL). A second controller on the same pins is
    /// refused before it changes anything.
    pub fn lock(&self) -> Result<PinLock, LockError> {
        lock_dir(&self.dir)
    }

    pub fn exists(&self) -> bool {
        self.dir.join(policy_common::RUNTIME).exists()
    }

    /// (kind, interface) of every pinned link.
    pub fn links(&self) -> Vec<(String, String)> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return Vec::new() };
        let mut out: Vec<(String, String)> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let rest = name.strip_prefix("link_")?;
                let (kind, iface) = rest.split_once('_')?;
                Some((kind.to_owned(), iface.to_owned()))
            })
            .collect();
        out.sort();
        out
    }

    /// The running controller's pid, if its pid file names a live process.
    pub fn controller_pid(&self) -> Option<i32> {
        let pid: i32 = std::fs::read_to_string(self.pid_file()).ok()?.trim().parse().ok()?;
        // A killed controller nobody reaped yet is a zombie: not running.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
        (state != Some("Z") && state.is_some()).then_some(pid)
    }

    /// Removes every pin (links first, so programs detach) and both directories.
    pub fn remove_all(&self) -> std::io::Result<usize> {
        let mut removed = 0;
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
            paths.sort_by_key(|p| !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("link_")));
            for p in paths {
                if p.is_dir() {
                    std::fs::remove_dir(&p)?;
                } else {
                    std::fs::remove_file(&p)?;
                    removed += 1;
                }
            }
            std::fs::remove_dir(&self.dir)?;
        }
        let _ = std::fs::remove_file(self.pid_file());
        let _ = std::fs::remove_file(self.run_dir.join("bypass.json"));
        let _ = std::fs::remove_dir(&self.run_dir);
        Ok(removed)
    }
}


/// The same lock on any directory (the nftables backend, which has no
/// pins, locks its run directory).
pub fn lock_dir(dir_path: &std::path::Path) -> Result<PinLock, LockError> {
    let io = |source| LockError::Io { dir: dir_path.display().to_string(), source };
    let dir = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC).open(dir_path).map_err(io)?;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(io(e));
        }
        let meta = dir.metadata().map_err(io)?;
        return Err(LockError::Held { dir: dir_path.display().to_string(), pid: flock_holder(meta.dev(), meta.ino()) });
    }
    Ok(PinLock { _dir: dir })
}

/// The pin directory is ours while this lives.
pub struct PinLock {
    _dir: File,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another smtpguard controller{} runs on {dir}; nothing was changed (stop it, or use another --pin-dir)", pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    Held { dir: String, pid: Option<i32> },
    #[error("locking {dir}: {source}")]
    Io { dir: String, source: std::io::Error },
}

/// The pid holding a `flock` on the inode (`dev`, `ino`), from /proc/locks
/// (lines such as `1: FLOCK  ADVISORY  WRITE 4242 00:28:41441 0 EOF`,
/// device numbers in hex).
fn flock_holder(dev: u64, ino: u64) -> Option<i32> {
    let wanted = format!("{:02x}:{:02x}:{ino}", libc::major(dev), libc::minor(dev));
    std::fs::read_to_string("/proc/locks").ok()?.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(1) == Some(&"FLOCK") && f.get(5) == Some(&wanted.as_str())).then(|| f.get(4)?.parse().ok()).flatten()
    })
}

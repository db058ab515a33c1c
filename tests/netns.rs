//! Network namespaces and veth pairs that remove themselves.
//!
//! Everything a test creates hangs off a [`Netns`]: deleting the namespace
//! deletes its interfaces, and the programs attached to them go with them.
//! Drop runs on panic too, so a failing test leaves nothing behind.

use std::{
    fs::File,
    os::fd::AsRawFd,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{bail, Context, Result};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Runs a command, failing with its output when it fails.
pub fn run(args: &[&str]) -> Result<Output> {
    let out = Command::new(args[0]).args(&args[1..]).output().with_context(|| format!("running {args:?}"))?;
    if !out.status.success() {
        bail!("{args:?} failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    Ok(out)
}

pub struct Netns {
    name: String,
}

impl Netns {
    /// A fresh namespace named after `tag`, this process and a counter.
    pub fn new(tag: &str) -> Result<Self> {
        let name = format!("sg-{tag}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        run(&["ip", "netns", "add", &name])?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NAME ARGS...`
    pub fn ip(&self, args: &[&str]) -> Result<Output> {
        let mut full = vec!["ip", "-n", &self.name];
        full.extend_from_slice(args);
        run(&full)
    }

    /// Runs a command inside the namespace (network namespace only, so
    /// bpffs pins stay visible).
    pub fn exec(&self, args: &[&str]) -> Result<Output> {
        let path = format!("--net=/run/netns/{}", self.name);
        let mut full = vec!["nsenter", &path, "--"];
        full.extend_from_slice(args);
        run(&full)
    }

    /// Runs `f` with this thread inside the namespace, then returns.
    /// Sockets created in `f` stay in the namespace.
    pub fn enter<T>(&self, f: impl FnOnce() -> T) -> Result<T> {
        let home = File::open("/proc/thread-self/ns/net").context("opening this thread's netns")?;
        let target = File::open(format!("/run/netns/{}", self.name)).context("opening the test netns")?;
        // SAFETY: setns on valid namespace fds; affects this thread only.
        if unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns into {}: {}", self.name, std::io::Error::last_os_error());
        }
        let out = f();
        // SAFETY: as above, back to where the thread was.
        if unsafe { libc::setns(home.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            panic!("setns back from {}: {}", self.name, std::io::Error::last_os_error());
        }
        Ok(out)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// A veth pair between two namespaces, each end up with its addresses.
pub fn veth_pair(a: &Netns, a_if: &str, a_addrs: &[&str], b: &Netns, b_if: &str, b_addrs: &[&str]) -> Result<()> {
    run(&["ip", "link", "add", a_if, "netns", a.name(), "type", "veth", "peer", "name", b_if, "netns", b.name()])?;
    for (ns, ifname, addrs) in [(a, a_if, a_addrs), (b, b_if, b_addrs)] {
        for addr in addrs {
            if addr.contains(':') {
                ns.ip(&["addr", "add", addr, "dev", ifname, "nodad"])?;
            } else {
                ns.ip(&["addr", "add", addr, "dev", ifname])?;
            }
        }
        ns.ip(&["link", "set", ifname, "up"])?;
    }
    Ok(())
}

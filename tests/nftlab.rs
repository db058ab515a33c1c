//! A namespace whose nftables holds smtpguard's table, with frames sent
//! into it from outside: through `up0` (the uplink, judged by the ingress
//! policy) and `tap0` (a tenant, judged by the egress policy). A frame's
//! fate is read back from the table's named counters.
//!
//! Frames go out of a packet socket on one CPU, each followed by a later
//! IP fragment (the sentinel, counted by every ruleset as a fragment): a
//! veth delivers one CPU's frames in order, so once the sentinel is
//! counted the frame before it has been judged, with no sleep.

use std::{
    collections::HashMap,
    net::IpAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use anyhow::{bail, Context, Result};
use policy_common::{direction, reason, verdict};
use smtpguard::nft::{self, ruleset};

use crate::{netns::{veth_pair, Netns}, packet::TcpFrame};

pub struct NftLab {
    /// The host: its nftables holds the table.
    pub host: Netns,
    /// Where frames come from.
    pub outside: Netns,
    sockets: [OwnedFd; 2],
    /// The counters after the last frame judged.
    last: Option<HashMap<String, u64>>,
}

fn packet_socket(ns: &Netns, ifname: &str) -> Result<OwnedFd> {
    let name = std::ffi::CString::new(ifname)?;
    ns.enter(|| -> Result<OwnedFd> {
        // SAFETY: a valid NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            bail!("no interface {ifname}");
        }
        // SAFETY: plain socket call; the fd is owned below.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: a fresh fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: zeroed sockaddr_ll is valid; the fields set are the ones bind reads.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: sll lives across the call and its size is given.
        if unsafe { libc::bind(fd.as_raw_fd(), &sll as *const _ as *const libc::sockaddr, std::mem::size_of::<libc::sockaddr_ll>() as u32) } != 0 {
            bail!("binding to {ifname}: {}", std::io::Error::last_os_error());
        }
        Ok(fd)
    })?
}

/// Keeps this thread on one CPU, so the frames it sends reach the veth
/// peer's backlog in the order sent.
fn pin_to_one_cpu() -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET writes within it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::CPU_SET(0, &mut set) };
    // SAFETY: set lives across the call; 0 is this thread.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        bail!("sched_setaffinity: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Which way a frame is judged: the direction whose chain sees it.
fn side(dir: u8) -> usize {
    if dir == direction::INGRESS {
        0
    } else {
        1
    }
}

impl NftLab {
    pub fn new(tag: &str) -> Result<Self> {
        pin_to_one_cpu()?;
        let host = Netns::new(&format!("{tag}h"))?;
        let outside = Netns::new(&format!("{tag}o"))?;
        veth_pair(&outside, "wire0", &[], &host, "up0", &[])?;
        veth_pair(&outside, "vm0", &[], &host, "tap0", &[])?;
        // The random mix has segments of up to 3,000 bytes.
        for (ns, ifname) in [(&outside, "wire0"), (&host, "up0"), (&outside, "vm0"), (&host, "tap0")] {
            ns.ip(&["link", "set", ifname, "mtu", "9000"])?;
        }
        let sockets = [packet_socket(&outside, "wire0")?, packet_socket(&outside, "vm0")?];
        Ok(Self { host, outside, sockets, last: None })
    }

    pub fn devices() -> nft::Devices {
        nft::Devices { uplink: Some("up0".into()), tenants: vec!["tap0".into()] }
    }

    /// Loads `commands` into the host's nftables as one transaction.
    pub fn apply(&self, commands: &[ruleset::Command]) -> Result<()> {
        self.host.enter(|| nft::apply(commands))?.context("loading the ruleset")
    }

    /// Loads (or reloads) the compiled policy, as the controller does.
    pub fn load(&mut self, c: &smtpguard::policy::Compiled, sizes: nft::Sizes) -> Result<()> {
        self.last = None;
        Ok(self.host.enter(|| nft::load(c, sizes, &Self::devices()))??)
    }

    pub fn counters(&self) -> Result<HashMap<String, u64>> {
        Ok(self.host.enter(nft::counters)??)
    }

    /// Runs `nft ARGS` in the host namespace; its stdout.
    pub fn nft(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["nft"];
        full.extend_from_slice(args);
        Ok(String::from_utf8(self.host.exec(&full)?.stdout)?)
    }

    fn send_raw(&self, dir: u8, frame: &[u8]) -> Result<()> {
        // SAFETY: frame lives across the call.
        let n = unsafe { libc::send(self.sockets[side(dir)].as_raw_fd(), frame.as_ptr() as *const libc::c_void, frame.len(), 0) };
        if n != frame.len() as isize {
            bail!("sending a frame: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Sends `frame` to be judged by `dir`'s policy and returns the
    /// counters that moved because of it, by name.
    pub fn judge(&mut self, dir: u8, frame: &[u8]) -> Result<HashMap<String, u64>> {
        let before = match self.last.take() {
            Some(c) => c,
            None => self.counters()?,
        };
        self.send_raw(dir, frame)?;
        let sentinel = TcpFrame::new("192.0.2.250".parse::<IpAddr>()?, "192.0.2.251".parse::<IpAddr>()?, 9, 0x10)
            .fragment(100, false)
            .build();
        self.send_raw(dir, &sentinel)?;
        let sentinel_counter = ruleset::counter_name(dir, verdict::PASS, reason::FRAGMENT, None);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let after = self.counters()?;
            let seen = after.get(&sentinel_counter).copied().unwrap_or(0) - before.get(&sentinel_counter).copied().unwrap_or(0);
            if seen >= 1 {
                let mut moved: HashMap<String, u64> =
                    after.iter().filter(|&(k, v)| before.get(k) != Some(v)).map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0))).collect();
                // The sentinel's own count.
                if let Some(n) = moved.get_mut(&sentinel_counter) {
                    *n -= 1;
                    if *n == 0 {
                        moved.remove(&sentinel_counter);
                    }
                }
                self.last = Some(after);
                return Ok(moved);
            }
            if std::time::Instant::now() > deadline {
                bail!("the sentinel frame was not counted within 5 s");
            }
            std::thread::yield_now();
        }
    }
}

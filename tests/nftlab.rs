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
    /// Frames into up0, into tap0, and out of up0 (from the host).
    sockets: [OwnedFd; 3],
    /// The counters after the last frame judged.
    last: Option<HashMap<String, u64>>,
    /// The controller's run, state and log files.
    pub dir: std::path::PathBuf,
    controller: Option<std::process::Child>,
    /// Loads after the first are updates of the last, as the controller's.
    loader: nft::Loader,
}

pub const METRICS_PORT: u16 = 9425;

impl Drop for NftLab {
    fn drop(&mut self) {
        self.kill_controller();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
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
        let sockets = [packet_socket(&outside, "wire0")?, packet_socket(&outside, "vm0")?, packet_socket(&host, "up0")?];
        let dir = std::env::temp_dir().join(format!("smtpguard-{}-{}", host.name(), std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(Self { host, outside, sockets, last: None, dir, controller: None, loader: nft::Loader::default() })
    }

    pub fn devices() -> nft::Devices {
        nft::Devices { uplinks: vec!["up0".into()], tenants: vec!["tap0".into()] }
    }

    /// Loads `commands` into the host's nftables as one transaction.
    pub fn apply(&self, commands: &[ruleset::Command]) -> Result<()> {
        self.host.enter(|| nft::apply(commands))?.context("loading the ruleset")
    }

    /// Loads (or reloads) the compiled policy, as the controller does: the
    /// first whole, each later one as an update of what the last loaded.
    pub fn load(&mut self, c: &smtpguard::policy::Compiled, sizes: nft::Sizes) -> Result<()> {
        self.last = None;
        let loader = &mut self.loader;
        Ok(self.host.enter(|| loader.load(c, sizes, &Self::devices()))??)
    }

    fn state_args(&self) -> Vec<String> {
        let d = |n: &str| self.dir.join(n).display().to_string();
        vec!["--pin-dir".into(), d("pins"), "--run-dir".into(), d("run")]
    }

    /// `smtpguard run --backend nftables` in the host namespace, with up0
    /// as uplink and tap* as tenants; returns once /healthz answers.
    pub fn start_controller(&mut self, policy: &std::path::Path) -> Result<()> {
        let child = std::process::Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.host.name()))
            .arg("--")
            .arg(crate::smtpguard_bin())
            .args(["run", "--backend", "nftables", "--policy"])
            .arg(policy)
            .args(["--uplink", "up0", "--tenant", "tap*", "--metrics-addr", &format!("127.0.0.1:{METRICS_PORT}"), "--events"])
            .arg(self.dir.join("events.jsonl"))
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .args(self.state_args())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("controller.log"))?)
            .spawn()
            .context("starting smtpguard run")?;
        self.controller = Some(child);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            if let Some(Ok(Some(status))) = self.controller.as_mut().map(|c| c.try_wait()) {
                bail!("smtpguard run exited ({status}): {}", self.controller_log());
            }
            if self.http_get("/healthz").is_ok() {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                bail!("smtpguard run did not answer /healthz in 20 s: {}", self.controller_log());
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    pub fn controller_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("controller.log")).unwrap_or_default()
    }

    pub fn events(&self) -> String {
        std::fs::read_to_string(self.dir.join("events.jsonl")).unwrap_or_default()
    }

    /// kill -9: no chance to clean up, as in a crash.
    pub fn kill_controller(&mut self) {
        if let Some(mut c) = self.controller.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The controller's pid, while it runs.
    pub fn controller_pid(&self) -> Option<u32> {
        self.controller.as_ref().map(|c| c.id())
    }

    /// Waits (bounded) for the controller to exit by itself, as after
    /// `smtpguard detach`.
    pub fn wait_controller(&mut self) -> Result<std::process::ExitStatus> {
        let mut c = self.controller.take().context("no controller")?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if let Some(status) = c.try_wait()? {
                return Ok(status);
            }
            if std::time::Instant::now() > deadline {
                let _ = c.kill();
                bail!("the controller did not stop within 10 s");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// An operator command in the host namespace (`smtpguard ARGS --pin-dir ... --run-dir ...`).
    pub fn smtpguard(&self, args: &[&str]) -> Result<String> {
        let out = std::process::Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.host.name()))
            .arg("--")
            .arg(crate::smtpguard_bin())
            .args(args)
            .args(self.state_args())
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            bail!("smtpguard {args:?}: {text}");
        }
        Ok(text)
    }

    pub fn http_get(&self, path: &str) -> Result<String> {
        crate::peers::http_get(&self.host, METRICS_PORT, path)
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

    fn send_raw(&self, socket: usize, frame: &[u8]) -> Result<()> {
        // SAFETY: frame lives across the call.
        let n = unsafe { libc::send(self.sockets[socket].as_raw_fd(), frame.as_ptr() as *const libc::c_void, frame.len(), 0) };
        if n != frame.len() as isize {
            let e = std::io::Error::last_os_error();
            // Sent from the host: a drop at the egress hook is this error.
            if !(socket == 2 && e.raw_os_error() == Some(libc::ENOBUFS)) {
                bail!("sending a frame: {e}");
            }
        }
        Ok(())
    }

    /// Sends `frame` to be judged by `dir`'s policy and returns the
    /// counters that moved because of it, by name.
    pub fn judge(&mut self, dir: u8, frame: &[u8]) -> Result<HashMap<String, u64>> {
        self.judge_via(side(dir), dir, frame)
    }

    /// Sends `frame` out of the host's uplink, as the host's own traffic
    /// (judged by the egress policy at the uplink's egress hook).
    pub fn judge_host_out(&mut self, frame: &[u8]) -> Result<HashMap<String, u64>> {
        self.judge_via(2, direction::EGRESS, frame)
    }

    fn judge_via(&mut self, socket: usize, dir: u8, frame: &[u8]) -> Result<HashMap<String, u64>> {
        let before = match self.last.take() {
            Some(c) => c,
            None => self.counters()?,
        };
        self.send_raw(socket, frame)?;
        let sentinel = TcpFrame::new("192.0.2.250".parse::<IpAddr>()?, "192.0.2.251".parse::<IpAddr>()?, 9, 0x10)
            .fragment(100, false)
            .build();
        self.send_raw(socket, &sentinel)?;
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

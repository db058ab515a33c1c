//! A hosting provider's hypervisor in network namespaces.
//!
//! ```text
//!  tenant (ordinary, runs a mail server) --tap-t--+
//!                                                 hv (forwards; smtpguard: XDP + TC egress
//!  tenant-exempt (ticket-4711) ----------tap-x--+    on up0, TC ingress on tap-t and tap-x)
//!                                                 |
//!                                                up0
//!                                                 |
//!  wan: remote MX, legitimate sender, prober, spammer, a KP/IR source (all on its lo)
//! ```
//!
//! Real software plays every part: `smtp-sink` servers (one per address and
//! port, each message dumped to a file, so deliveries are counted), `swaks`
//! and `smtp-source` clients, `smtpguard run` on the hypervisor. One
//! [`Lab`] owns it all; dropping it (or [`teardown_on_signal`] on Ctrl-C)
//! removes namespaces, processes, pins and files.

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use policy_common::{direction, reason, stats_index, verdict, Counter, PORT_SLOTS};
use socket2::{Domain, Socket, Type};

use crate::netns::{run, veth_pair, Netns};

/// Who is who, in one address family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// The parts of the lab with an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// An ordinary tenant VM; it also runs a mail server on 25.
    Tenant,
    /// A tenant VM with an approved unblock request (`ticket-4711`).
    Exempt,
    /// The remote mail server tenants send to (not a provider relay).
    Mx,
    /// An outside server sending legitimate mail to the tenant.
    Sender,
    /// An outside client probing with VRFY.
    Prober,
    /// An outside spammer flooding the tenant's mail server.
    Spammer,
    /// An outside source in a blocked country (KP for IPv4, IR for IPv6).
    Blocked,
    /// The hypervisor itself, sending out of its uplink.
    Host,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    pub fn addr(self, role: Role) -> &'static str {
        match (self, role) {
            (Family::V4, Role::Tenant) => "198.51.100.66",
            (Family::V4, Role::Exempt) => "198.51.100.5",
            (Family::V4, Role::Mx) => "203.0.113.25",
            (Family::V4, Role::Sender) => "203.0.113.77",
            (Family::V4, Role::Prober) => "203.0.113.78",
            (Family::V4, Role::Spammer) => "203.0.113.66",
            (Family::V4, Role::Blocked) => "175.45.176.10",
            (Family::V4, Role::Host) => "100.64.0.1",
            (Family::V6, Role::Tenant) => "2001:db8:4712::66",
            (Family::V6, Role::Exempt) => "2001:db8:4711::5",
            (Family::V6, Role::Mx) => "2001:db8:25::25",
            (Family::V6, Role::Sender) => "2001:db8:77::77",
            (Family::V6, Role::Prober) => "2001:db8:77::78",
            (Family::V6, Role::Spammer) => "2001:db8:66::66",
            (Family::V6, Role::Blocked) => "2a01:5ec0::10",
            (Family::V6, Role::Host) => "fd00:64::1",
        }
    }

    /// How `smtpguard bans` lists a role's source: IPv4 per address,
    /// IPv6 per /64.
    pub fn ban_entry(self, role: Role) -> String {
        let addr: IpAddr = self.addr(role).parse().expect("lab addresses parse");
        let net = ipnet::IpNet::new(addr, if addr.is_ipv4() { 32 } else { 64 }).expect("valid prefix");
        net.trunc().to_string()
    }

    pub fn label(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

impl Role {
    const WAN: [Role; 5] = [Role::Mx, Role::Sender, Role::Prober, Role::Spammer, Role::Blocked];
}

/// `addr:port` in the notation smtp-sink and smtp-source take.
fn endpoint(addr: &str, port: u16) -> String {
    if addr.contains(':') {
        format!("[{addr}]:{port}")
    } else {
        format!("{addr}:{port}")
    }
}

/// Ports the remote MX listens on: plain SMTP, implicit TLS, submission
/// (smtp-sink speaks plain SMTP on all of them; only the port matters here).
pub const MX_PORTS: [u16; 3] = [25, 465, 587];
pub const METRICS_PORT: u16 = 9425;

/// What has to go when the lab goes, by name only, so a signal handler can
/// do it without the [`Lab`] itself.
#[derive(Default, Clone)]
struct Teardown {
    pids: Vec<u32>,
    namespaces: Vec<String>,
    pin_dir: Option<PathBuf>,
    run_dir: Option<PathBuf>,
    dir: Option<PathBuf>,
}

impl Teardown {
    fn run(&self) {
        for pid in &self.pids {
            // SAFETY: kill has no memory preconditions; a stale pid is ESRCH.
            unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
        }
        if let (Some(pin), Some(run)) = (&self.pin_dir, &self.run_dir) {
            let _ = smtpguard::pins::Pins::new(pin, run).remove_all();
        }
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        if let Some(d) = &self.dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

static ACTIVE: Mutex<Option<Arc<Mutex<Teardown>>>> = Mutex::new(None);
static SIGNALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    SIGNALLED.store(true, Ordering::SeqCst);
}

/// On SIGINT or SIGTERM, tear the lab down and exit with 130. A handler
/// (not a blocked mask) so that child processes keep default signals.
pub fn teardown_on_signal() {
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    std::thread::spawn(|| loop {
        if SIGNALLED.load(Ordering::SeqCst) {
            if let Some(t) = ACTIVE.lock().unwrap().take() {
                eprintln!("\ninterrupted: tearing the lab down");
                t.lock().unwrap().run();
            }
            std::process::exit(130);
        }
        std::thread::sleep(Duration::from_millis(50));
    });
}

/// A server that dumps every message it accepts into `dir`, one file each.
struct Sink {
    child: Child,
    dir: PathBuf,
}

pub struct Lab {
    pub smtpguard: PathBuf,
    /// The geo database the lab's policy uses (see [`real_geo_database`]).
    pub geo_db: PathBuf,
    pub dir: PathBuf,
    pub pin_dir: PathBuf,
    pub run_dir: PathBuf,
    pub events: PathBuf,
    pub hv: Netns,
    pub tenant: Netns,
    pub exempt: Netns,
    pub wan: Netns,
    sinks: Vec<((Role, Family, u16), Sink)>,
    controller: Option<Child>,
    teardown: Arc<Mutex<Teardown>>,
    /// `ebpf` (the default) or `nftables`: what `smtpguard run` enforces with.
    pub backend: &'static str,
    /// More arguments for `smtpguard run` (a `--shadow FILE`, say).
    pub run_args: Vec<String>,
}

impl Lab {
    /// Builds the topology and starts the mail servers; `smtpguard` is not
    /// running yet (see [`Lab::start_controller`]).
    pub fn new(smtpguard: &Path, tag: &str) -> Result<Self> {
        let id = format!("{tag}_{}", std::process::id());
        let dir = std::env::temp_dir().join(format!("sglab-{id}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let teardown = Arc::new(Mutex::new(Teardown {
            pin_dir: Some(PathBuf::from(format!("/sys/fs/bpf/sglab_{id}"))),
            run_dir: Some(dir.join("run")),
            dir: Some(dir.clone()),
            ..Teardown::default()
        }));
        *ACTIVE.lock().unwrap() = Some(teardown.clone());
        let made = |tag: &str| -> Result<Netns> {
            let ns = Netns::new(tag)?;
            teardown.lock().unwrap().namespaces.push(ns.name().to_owned());
            Ok(ns)
        };
        let (hv, tenant, exempt, wan) = (made("hv")?, made("tenant")?, made("exempt")?, made("wan")?);
        let mut lab = Self {
            smtpguard: smtpguard.to_owned(),
            geo_db: geo_database(&dir)?,
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/sglab_{id}")),
            run_dir: dir.join("run"),
            events: dir.join("events.jsonl"),
            dir,
            hv,
            tenant,
            exempt,
            wan,
            sinks: Vec::new(),
            controller: None,
            teardown,
            backend: "ebpf",
            run_args: Vec::new(),
        };
        lab.wire()?;
        lab.start_sinks()?;
        Ok(lab)
    }

    fn wire(&self) -> Result<()> {
        use Family::{V4, V6};
        veth_pair(&self.tenant, "eth0", &["198.51.100.66/29", "2001:db8:4712::66/64"], &self.hv, "tap-t", &["198.51.100.65/29", "2001:db8:4712::1/64"])?;
        veth_pair(&self.exempt, "eth0", &["198.51.100.5/29", "2001:db8:4711::5/64"], &self.hv, "tap-x", &["198.51.100.1/29", "2001:db8:4711::1/64"])?;
        veth_pair(&self.hv, "up0", &["100.64.0.1/30", "fd00:64::1/64"], &self.wan, "wan0", &["100.64.0.2/30", "fd00:64::2/64"])?;
        for (ns, gw4, gw6) in [(&self.tenant, "198.51.100.65", "2001:db8:4712::1"), (&self.exempt, "198.51.100.1", "2001:db8:4711::1")] {
            ns.ip(&["route", "add", "default", "via", gw4])?;
            ns.ip(&["-6", "route", "add", "default", "via", gw6])?;
        }
        self.hv.ip(&["route", "add", "default", "via", "100.64.0.2"])?;
        self.hv.ip(&["-6", "route", "add", "default", "via", "fd00:64::2"])?;
        self.hv.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"])?;
        for role in Role::WAN {
            self.wan.ip(&["addr", "add", &format!("{}/32", V4.addr(role)), "dev", "lo"])?;
            self.wan.ip(&["addr", "add", &format!("{}/128", V6.addr(role)), "dev", "lo"])?;
        }
        // smtp-source has no source-address option: the spammer's address is
        // the default source towards the tenants.
        self.wan.ip(&["route", "add", "198.51.100.0/24", "via", "100.64.0.1", "src", V4.addr(Role::Spammer)])?;
        self.wan.ip(&["-6", "route", "add", "2001:db8:4700::/40", "via", "fd00:64::1", "src", V6.addr(Role::Spammer)])?;
        // Clients retransmit a SYN once (the least Linux allows): a dropped
        // attempt fails after 3 s instead of two minutes.
        for ns in [&self.tenant, &self.exempt, &self.wan] {
            ns.exec(&["sysctl", "-qw", "net.ipv4.tcp_syn_retries=1"])?;
        }
        Ok(())
    }

    fn start_sinks(&mut self) -> Result<()> {
        let mut wanted = vec![];
        for family in Family::ALL {
            wanted.push((Role::Tenant, family, 25));
            for port in MX_PORTS {
                wanted.push((Role::Mx, family, port));
            }
        }
        for (role, family, port) in wanted {
            let dir = self.dir.join(format!("sink-{role:?}-{}-{port}", family.label()));
            std::fs::create_dir_all(&dir)?;
            run(&["chown", "nobody", &dir.display().to_string()])?;
            let ns = if role == Role::Tenant { &self.tenant } else { &self.wan };
            let child = Command::new("nsenter")
                .arg(format!("--net=/run/netns/{}", ns.name()))
                .args(["--", "smtp-sink", "-u", "nobody", "-h", &format!("{role:?}").to_lowercase(), "-d"])
                .arg(format!("{}/m.", dir.display()))
                .arg(endpoint(family.addr(role), port))
                .arg("256")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting smtp-sink (Debian postfix)")?;
            self.teardown.lock().unwrap().pids.push(child.id());
            self.sinks.push(((role, family, port), Sink { child, dir }));
        }
        // Ready when each answers its greeting (bounded: 5 s).
        for ((role, family, port), _) in &self.sinks {
            let ns = if *role == Role::Tenant { &self.tenant } else { &self.wan };
            let addr = family.addr(*role);
            let deadline = Instant::now() + Duration::from_secs(5);
            while greeting(ns, addr, addr, *port).is_err() {
                if Instant::now() > deadline {
                    bail!("smtp-sink on {} did not start", endpoint(addr, *port));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// Messages the server `role` has accepted on `port`. smtp-sink creates
    /// a transaction's file at MAIL FROM and fills it at the final ".":
    /// only filled files are delivered messages.
    pub fn delivered(&self, role: Role, family: Family, port: u16) -> usize {
        let sink = self.sinks.iter().find(|(k, _)| *k == (role, family, port)).map(|(_, s)| &s.dir);
        let Some(entries) = sink.and_then(|d| std::fs::read_dir(d).ok()) else { return 0 };
        entries.flatten().filter(|e| e.metadata().is_ok_and(|m| m.len() > 0)).count()
    }

    /// The namespace a role's clients run in.
    pub fn ns_of(&self, role: Role) -> &Netns {
        match role {
            Role::Tenant => &self.tenant,
            Role::Exempt => &self.exempt,
            Role::Host => &self.hv,
            _ => &self.wan,
        }
    }

    /// Starts `smtpguard run` on the hypervisor (XDP + TC egress on the
    /// uplink, TC ingress on both taps) and waits until it answers.
    pub fn start_controller(&mut self, policy: &Path, xdp_mode: &str) -> Result<()> {
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.hv.name()))
            .arg("--")
            .arg(&self.smtpguard)
            .args(["run", "--policy"])
            .arg(policy)
            .args(["--uplink", "up0", "--tenant", "tap-t", "--tenant", "tap-x", "--xdp-mode", xdp_mode, "--backend", self.backend])
            .args(["--metrics-addr", &format!("127.0.0.1:{METRICS_PORT}"), "--events"])
            .arg(&self.events)
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .args(self.state_args())
            .args(&self.run_args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("controller.log"))?)
            .spawn()
            .context("starting smtpguard run")?;
        self.teardown.lock().unwrap().pids.push(child.id());
        self.controller = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(Ok(Some(status))) = self.controller.as_mut().map(|c| c.try_wait()) {
                bail!("smtpguard run exited ({status}): {}", self.controller_log());
            }
            if self.http_get(METRICS_PORT, "/healthz").is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("smtpguard run did not answer /healthz in 20 s: {}", self.controller_log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn controller_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("controller.log")).unwrap_or_default()
    }

    /// kill -9: no chance to clean up, as in a crash.
    pub fn kill_controller(&mut self) {
        if let Some(mut c) = self.controller.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn state_args(&self) -> Vec<String> {
        vec!["--pin-dir".into(), self.pin_dir.display().to_string(), "--run-dir".into(), self.run_dir.display().to_string()]
    }

    /// Runs an operator command (`smtpguard ARGS --pin-dir ... --run-dir ...`).
    pub fn smtpguard(&self, args: &[&str]) -> Result<String> {
        // nftables is per network namespace: its commands run in the hypervisor's.
        let out = if self.backend == "nftables" {
            Command::new("nsenter").arg(format!("--net=/run/netns/{}", self.hv.name())).arg("--").arg(&self.smtpguard).args(args).args(self.state_args()).output()?
        } else {
            Command::new(&self.smtpguard).args(args).args(self.state_args()).output()?
        };
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            bail!("smtpguard {args:?}: {text}");
        }
        Ok(text)
    }

    /// A GET on the hypervisor's loopback.
    pub fn http_get(&self, port: u16, path: &str) -> Result<String> {
        crate::peers::http_get(&self.hv, port, path)
    }

    /// The datapath's own counters, read from the pinned map.
    pub fn counters(&self) -> Result<Counters> {
        if self.backend == "nftables" {
            let named = self.hv.enter(smtpguard::nft::counters)??;
            let mut cells = vec![Counter::default(); policy_common::STATS_ENTRIES as usize];
            for (name, (dir, v, r, slot)) in smtpguard::nft::ruleset::counter_names() {
                let packets = named.get(&name).copied().unwrap_or(0);
                cells[stats_index(dir, v, r, slot.unwrap_or(policy_common::PORT_SLOT_UNKNOWN)) as usize].packets = packets;
            }
            return Ok(Counters(cells));
        }
        Ok(Counters(smtpguard::dataplane::maps::Maps::open_pinned(&self.pin_dir)?.stats()?))
    }

    /// Waits (at most `within`) for an event line after the first
    /// `after_lines` that contains every one of `needles`.
    pub fn wait_for_event(&self, needles: &[&str], after_lines: usize, within: Duration) -> Result<String> {
        let deadline = Instant::now() + within;
        loop {
            let text = std::fs::read_to_string(&self.events).unwrap_or_default();
            if let Some(line) = text.lines().skip(after_lines).find(|l| needles.iter().all(|n| l.contains(n))) {
                return Ok(line.to_owned());
            }
            if Instant::now() > deadline {
                bail!("no event with {needles:?} within {within:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn event_lines(&self) -> usize {
        std::fs::read_to_string(&self.events).map(|t| t.lines().count()).unwrap_or(0)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.kill_controller();
        for (_, s) in &mut self.sinks {
            let _ = s.child.kill();
            let _ = s.child.wait();
        }
        let teardown = self.teardown.lock().unwrap().clone();
        // Namespaces go with the Netns fields; the rest by name.
        Teardown { namespaces: Vec::new(), ..teardown }.run();
        *ACTIVE.lock().unwrap() = None;
    }
}

/// Per-cell packet counts of `STATS`, summed over CPUs.
#[derive(Clone)]
pub struct Counters(Vec<Counter>);

impl From<Vec<Counter>> for Counters {
    fn from(cells: Vec<Counter>) -> Self {
        Self(cells)
    }
}

impl Counters {
    /// Packets of (direction, verdict, reason) over every port slot.
    pub fn packets(&self, dir: u8, v: u8, r: u8) -> u64 {
        (0..PORT_SLOTS).map(|slot| self.0.get(stats_index(dir, v, r, slot) as usize).map_or(0, |c| c.packets)).sum()
    }

    /// Which (direction, verdict, reason) cells grew since `before`, with how much.
    pub fn moved_since(&self, before: &Counters) -> Vec<(u8, u8, u8, u64)> {
        let mut out = Vec::new();
        for dir in [direction::INGRESS, direction::EGRESS] {
            for v in 0..verdict::COUNT as u8 {
                for r in 0..reason::COUNT as u8 {
                    let d = self.packets(dir, v, r) - before.packets(dir, v, r);
                    if d > 0 {
                        out.push((dir, v, r, d));
                    }
                }
            }
        }
        out
    }
}

/// Connects from `src` to `dst:port` and reads the server's first line.
pub fn greeting(ns: &Netns, src: &str, dst: &str, port: u16) -> Result<String> {
    let mut s = SmtpSession::open(ns, src, dst, port, Duration::from_secs(2))?;
    s.line()
}

/// swaks delivering one message from `src` to `server:port`. `Ok(true)`
/// when the server accepted it.
pub fn swaks(ns: &Netns, src: &str, server: &str, port: u16) -> Result<bool> {
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", ns.name()))
        .args(["--", "timeout", "10", "swaks", "--silent", "2", "--timeout", "4"])
        .args(["--server", server, "--port", &port.to_string(), "--li", src])
        .args(["--from", "sender@lab.test", "--to", "postmaster@lab.test", "--helo", "lab.test"])
        .output()
        .context("running swaks")?;
    Ok(out.status.success())
}

/// One `smtp-source` session (one connection, one message) to `server:port`
/// from the namespace's default source; it exits 0 when it got through.
pub fn smtp_source_once(ns: &Netns, server: &str, port: u16) -> Result<Child> {
    let v6 = if server.contains(':') { "-6" } else { "-4" };
    Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", ns.name()))
        .args(["--", "timeout", "5", "smtp-source", v6, "-m", "1", "-s", "1", "-f", "spam@lab.test", "-t", "postmaster@lab.test"])
        .arg(endpoint(server, port))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("running smtp-source (Debian postfix)")
}

/// What a paced flood did.
pub struct Flood {
    pub attempts: usize,
    pub accepted: usize,
    /// Seconds from the first attempt to each accepted one's start.
    pub accepted_at: Vec<f64>,
    pub seconds: f64,
}

/// `per_minute` smtp-source sessions per minute from the spammer to the
/// tenant's mail server, for at most `max` or until `stop` (asked four
/// times a second) says so.
pub fn flood(lab: &Lab, family: Family, per_minute: u32, max: Duration, mut stop: impl FnMut(&Lab) -> bool) -> Result<Flood> {
    let gap = Duration::from_secs_f64(60.0 / per_minute as f64);
    let start = Instant::now();
    let mut running: Vec<(f64, Child)> = Vec::new();
    let mut f = Flood { attempts: 0, accepted: 0, accepted_at: Vec::new(), seconds: 0.0 };
    let mut next = start;
    let mut next_check = start;
    let reap = |running: &mut Vec<(f64, Child)>, f: &mut Flood, wait: bool| -> Result<()> {
        let mut i = 0;
        while i < running.len() {
            let done = if wait { Some(running[i].1.wait()?) } else { running[i].1.try_wait()? };
            match done {
                Some(status) => {
                    let (at, _) = running.swap_remove(i);
                    if status.success() {
                        f.accepted += 1;
                        f.accepted_at.push(at);
                    }
                }
                None => i += 1,
            }
        }
        Ok(())
    };
    while start.elapsed() < max {
        let now = Instant::now();
        if now >= next_check {
            if stop(lab) {
                break;
            }
            next_check = now + Duration::from_millis(250);
        }
        if now >= next {
            let child = smtp_source_once(&lab.wan, family.addr(Role::Tenant), 25)?;
            running.push((now.duration_since(start).as_secs_f64(), child));
            f.attempts += 1;
            next += gap;
        }
        reap(&mut running, &mut f, false)?;
        std::thread::sleep(Duration::from_millis(5).min(next.saturating_duration_since(Instant::now())));
    }
    f.seconds = start.elapsed().as_secs_f64();
    reap(&mut running, &mut f, true)?;
    f.accepted_at.sort_by(f64::total_cmp);
    Ok(f)
}

/// A hand-driven SMTP session, for what swaks cannot do: a VRFY probe, a
/// session held open across a policy change.
pub struct SmtpSession {
    stream: TcpStream,
    pending: Vec<u8>,
}

impl SmtpSession {
    pub fn open(ns: &Netns, src: &str, dst: &str, port: u16, timeout: Duration) -> Result<Self> {
        let src: IpAddr = src.parse()?;
        let dst: IpAddr = dst.parse()?;
        let stream = ns.enter(|| -> Result<TcpStream> {
            let socket = Socket::new(if src.is_ipv4() { Domain::IPV4 } else { Domain::IPV6 }, Type::STREAM, None)?;
            socket.bind(&SocketAddr::new(src, 0).into())?;
            socket.connect_timeout(&SocketAddr::new(dst, port).into(), timeout)?;
            // Closing sends a reset: no orphaned retransmissions after a test.
            socket.set_linger(Some(Duration::ZERO))?;
            Ok(socket.into())
        })??;
        stream.set_read_timeout(Some(timeout))?;
        Ok(Self { stream, pending: Vec::new() })
    }

    /// The next reply line, or an error (a timeout when nothing came).
    pub fn line(&mut self) -> Result<String> {
        loop {
            if let Some(i) = self.pending.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.pending[..i]).into_owned();
                self.pending.drain(..i + 2);
                return Ok(line);
            }
            let mut buf = [0u8; 512];
            let n = self.stream.read(&mut buf)?;
            if n == 0 {
                bail!("connection closed");
            }
            self.pending.extend_from_slice(&buf[..n]);
        }
    }

    /// The last line of a (possibly multi-line) reply.
    pub fn reply(&mut self) -> Result<String> {
        loop {
            let l = self.line()?;
            if l.as_bytes().get(3) != Some(&b'-') {
                return Ok(l);
            }
        }
    }

    pub fn send(&mut self, command: &str) -> Result<String> {
        self.stream.write_all(format!("{command}\r\n").as_bytes())?;
        self.reply()
    }

    pub fn set_timeout(&mut self, t: Duration) -> Result<()> {
        Ok(self.stream.set_read_timeout(Some(t))?)
    }

    /// Writes `bytes` as they are: no CRLF added, no reply read (pipelined
    /// or partial commands).
    pub fn write_raw(&mut self, bytes: &[u8]) -> Result<()> {
        Ok(self.stream.write_all(bytes)?)
    }

    /// Each write leaves at once as a segment of its own (TCP_NODELAY).
    pub fn set_nodelay(&mut self) -> Result<()> {
        Ok(self.stream.set_nodelay(true)?)
    }

    /// Waits, at most `within`, until the peer has acknowledged every byte
    /// written (SIOCOUTQ is 0): a write after that is a new segment.
    pub fn wait_acked(&self, within: Duration) -> Result<bool> {
        use std::os::fd::AsRawFd;
        let deadline = Instant::now() + within;
        loop {
            let mut queued: libc::c_int = 0;
            // SAFETY: SIOCOUTQ writes one int through the pointer.
            if unsafe { libc::ioctl(self.stream.as_raw_fd(), libc::TIOCOUTQ, &mut queued) } != 0 {
                bail!("SIOCOUTQ: {}", std::io::Error::last_os_error());
            }
            if queued == 0 {
                return Ok(true);
            }
            if Instant::now() > deadline {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The next reply, or `None` when none came within the read timeout
    /// (a stalled session).
    pub fn reply_within_timeout(&mut self) -> Result<Option<String>> {
        match self.reply() {
            Ok(r) => Ok(Some(r)),
            Err(e) if e.downcast_ref::<std::io::Error>().is_some_and(|e| matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Where the real IP-to-country database is: `$SMTPGUARD_GEO_DATABASE`,
/// else beside the repository (`../shared/data`), when it exists.
pub fn real_geo_database() -> Option<PathBuf> {
    let path = std::env::var_os("SMTPGUARD_GEO_DATABASE")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("../shared/data/geo-whois-asn-country.mmdb"));
    path.canonicalize().ok()
}

#[derive(serde::Serialize)]
struct CountryRecord {
    country_code: &'static str,
}

/// The real database, or (said plainly) a stand-in in `dir` that holds
/// only the lab's blocked-country networks, in the real one's layout.
fn geo_database(dir: &Path) -> Result<PathBuf> {
    if let Some(real) = real_geo_database() {
        return Ok(real);
    }
    let path = dir.join("stand-in-country.mmdb");
    eprintln!(
        "NOTE: no real geo database (looked at $SMTPGUARD_GEO_DATABASE, else ../shared/data/geo-whois-asn-country.mmdb; \
         get it with npm pack @ip-location-db/geo-whois-asn-country-mmdb): \
         the lab uses a stand-in with 175.45.176.0/22 as KP and 2a01:5ec0::/29 as IR"
    );
    let mut w = mmdb_writer::Writer::new("country");
    for (net, cc) in [("175.45.176.0/22", "KP"), ("2a01:5ec0::/29", "IR")] {
        w.insert(net.parse::<ipnet::IpNet>()?, &CountryRecord { country_code: cc }).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    }
    std::fs::write(&path, w.to_bytes().map_err(|e| anyhow::anyhow!("{e:?}"))?)?;
    Ok(path)
}

/// The lab's policy: `policies/idc-default.yaml` with the `ingress.geo`
/// block of `policies/geo-fence.yaml` added (over `geo_db`), file paths
/// made absolute, exemptions renewed to a month from today. `mode` overrides the mode; `extra_exemptions` adds
/// exemptions on 25 for tenant CIDRs; `ingress_ban_above` overrides the
/// inbound ban threshold.
pub fn lab_policy(repo: &Path, geo_db: &Path, mode: &str, extra_exemptions: &[&str], ingress_ban_above: Option<i64>) -> Result<String> {
    use yaml_rust2::{yaml::Hash, Yaml, YamlEmitter, YamlLoader};
    let key = |k: &str| Yaml::String(k.to_owned());
    let read = |name: &str| -> Result<Yaml> {
        let text = std::fs::read_to_string(repo.join("policies").join(name)).with_context(|| format!("reading policies/{name}"))?;
        YamlLoader::load_from_str(&text)?.into_iter().next().with_context(|| format!("policies/{name} is empty"))
    };
    fn hash<'y>(y: &'y mut Yaml, k: &str) -> Result<&'y mut Hash> {
        match y {
            Yaml::Hash(h) => match h.get_mut(&Yaml::String(k.to_owned())) {
                Some(Yaml::Hash(inner)) => Ok(inner),
                _ => bail!("{k} is not a mapping"),
            },
            _ => bail!("not a mapping"),
        }
    }
    let policies = repo.join("policies");
    let mut policy = read("idc-default.yaml")?;
    let mut geo = read("geo-fence.yaml")?["ingress"]["geo"].clone();
    let Yaml::Hash(g) = &mut geo else { bail!("geo-fence.yaml: ingress.geo is not a mapping") };
    g.insert(key("database"), Yaml::String(geo_db.display().to_string()));
    let Yaml::Hash(top) = &mut policy else { bail!("idc-default.yaml is not a mapping") };
    top.insert(key("mode"), Yaml::String(mode.to_owned()));
    let ingress = hash(&mut policy, "ingress")?;
    ingress.insert(key("geo"), geo);
    if let Some(Yaml::Array(files)) = ingress.get_mut(&key("deny_files")) {
        for f in files {
            if let Yaml::Hash(f) = f {
                let file = f.get(&key("file")).and_then(|v| v.as_str()).unwrap_or_default().to_owned();
                f.insert(key("file"), Yaml::String(policies.join(file).display().to_string()));
            }
        }
    }
    if let Some(limit) = ingress_ban_above {
        let Some(Yaml::Hash(rate)) = ingress.get_mut(&key("rate_limit")) else { bail!("idc-default.yaml: ingress.rate_limit") };
        rate.insert(key("ban_above_per_minute"), Yaml::Integer(limit));
    }
    let egress = hash(&mut policy, "egress")?;
    let Some(Yaml::Array(list)) = egress.get_mut(&key("exemptions")) else { bail!("idc-default.yaml: egress.exemptions") };
    // The example's tickets carry fixed last days; the lab renews them a
    // month ahead so that the demo keeps showing an exempt tenant.
    let renewed = smtpguard::policy::time::format_date(smtpguard::policy::time::today() + 30);
    for e in list.iter_mut() {
        if let Yaml::Hash(e) = e {
            e.insert(key("until"), Yaml::String(renewed.clone()));
        }
    }
    for (i, cidr) in extra_exemptions.iter().enumerate() {
        let mut e = Hash::new();
        e.insert(key("id"), Yaml::String(format!("ticket-lab-{i}")));
        e.insert(key("cidr"), Yaml::String((*cidr).to_owned()));
        e.insert(key("ports"), Yaml::Array(vec![Yaml::Integer(25)]));
        // A week from today: the lab's own ticket.
        let until = smtpguard::policy::time::format_date(smtpguard::policy::time::today() + 7);
        e.insert(key("until"), Yaml::String(until));
        list.push(Yaml::Hash(e));
    }
    let mut out = String::new();
    YamlEmitter::new(&mut out).dump(&policy)?;
    Ok(out + "\n")
}

/// The workspace root (this crate's parent directory).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_owned()
}

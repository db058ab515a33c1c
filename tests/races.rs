//! Writers of the datapath's shared state racing each other, under traffic:
//! operator commands against a controller's reloads, and manual bans in a
//! source set the datapath keeps writing. Each loop is bounded in
//! iterations and seconds; each checks its invariant after every step.

use std::{
    net::{IpAddr, Ipv4Addr},
    os::fd::AsFd,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use policy_common::{direction, source::source_key_v4};
use smtpguard::{
    clock::ktime_now_ns,
    dataplane::{bans::BanLock, maps::Maps, Capacities, Hook},
};
use smtpguard_tests::{
    fixtures::{base_policy, Harness, TestPins},
    peers::http_get,
    netns::{veth_pair, Netns},
    packet::{TcpFrame, SYN},
    require_root, smtpguard_bin,
    testrun::{obj_get, time_run},
};

const XDP_DROP: u32 = 1;
const SERVER: &str = "192.0.2.2";


/// `smtpguard run` in `ns` on `iface`; killed on drop.
struct Controller {
    child: Child,
}

impl Controller {
    fn start(ns: &Netns, state: &TestPins, policy: &Path, iface: &str, port: u16) -> Result<Self> {
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", ns.name()))
            .arg("--")
            .arg(smtpguard_bin())
            .args(["run", "--policy"])
            .arg(policy)
            .args(["--uplink", iface, "--metrics-addr", &format!("127.0.0.1:{port}"), "--events"])
            .arg(state.pins.run_dir.with_extension("events.jsonl"))
            .args(state.args())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting smtpguard run")?;
        let mut c = Self { child };
        for _ in 0..200 {
            if let Some(status) = c.child.try_wait()? {
                bail!("the controller exited: {status}");
            }
            if http_get(ns, port, "/healthz").is_ok() {
                return Ok(c);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("the controller did not answer /healthz in 10 s")
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The generation the controller says is in force (0 when it does not answer).
fn healthz_generation(ns: &Netns, port: u16) -> u64 {
    http_get(ns, port, "/healthz").ok().and_then(|h| h.split_whitespace().nth(2)?.parse().ok()).unwrap_or(0)
}

/// `smtpguard ban CIDR` and `unban CIDR` (the library calls the binary
/// makes, in a tight loop) race policy reloads (SIGHUP) under traffic.
/// After every step: while a network ban is present the ban flag is set
/// and a SYN from inside the network is dropped; after every reload the
/// active generation is the one the controller flipped to (the standby
/// of the one before). Before each word had one writer, a ban's
/// read-modify-write of RUNTIME could clear the flag the ban had just set
/// or put back the generation a reload had flipped away from.
#[test]
#[ignore = "privileged: needs root, BPF and namespaces; cargo xtask test runs it"]
fn network_bans_racing_reloads_keep_the_ban_flag_and_the_active_generation() {
    require_root();
    const PORT: u16 = 19441;
    const MAX_RELOADS: u64 = 400;
    const MAX_BANS: u64 = 200_000;
    const SECONDS: u64 = 20;
    let client = Netns::new("rcli").unwrap();
    let server = Netns::new("rsrv").unwrap();
    veth_pair(&client, "a0", &["192.0.2.1/24"], &server, "b0", &[&format!("{SERVER}/24")]).unwrap();
    let state = TestPins::new("racenet");
    std::fs::create_dir_all(&state.pins.run_dir).unwrap();
    let policy = state.pins.run_dir.with_extension("policy.yaml");
    std::fs::write(&policy, "version: 1\ningress:\n  default: {25: allow}\n").unwrap();
    let _policy_file = RemoveOnDrop(policy.clone());
    let _events_file = RemoveOnDrop(state.pins.run_dir.with_extension("events.jsonl"));
    let _ctl = Controller::start(&server, &state, &policy, "b0", PORT).unwrap();
    let pid = state.pins.controller_pid().expect("the controller's pid");
    let prog = obj_get(&state.pins.dir.join("prog_xdp_ingress")).unwrap();

    let stop = AtomicBool::new(false);
    let deadline = Instant::now() + Duration::from_secs(SECONDS);
    let (bans, reloaded, sent, violations) = std::thread::scope(|scope| {
        // Traffic from outside any banned network, all through the run.
        let traffic = scope.spawn(|| {
            let frame = TcpFrame::new("198.51.100.7".parse().unwrap(), SERVER.parse().unwrap(), 25, SYN).build();
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) && sent < 200_000_000 && Instant::now() < deadline + Duration::from_secs(10) {
                time_run(prog.as_fd(), &frame, 100).unwrap();
                sent += 100;
            }
            sent
        });
        // Reloads, one at a time: SIGHUP, then wait until the controller
        // reports the next generation, then check the active one.
        let reloads = scope.spawn(|| -> Result<(u64, Vec<String>)> {
            let maps = Maps::open_pinned(&state.pins.dir)?;
            let g0 = healthz_generation(&server, PORT);
            let a0 = maps.runtime().active;
            let mut violations = Vec::new();
            let mut done = 0;
            while done < MAX_RELOADS && Instant::now() < deadline {
                // SAFETY: signalling the controller this test started.
                unsafe { libc::kill(pid, libc::SIGHUP) };
                let want = g0 + done + 1;
                let waiting = Instant::now();
                while healthz_generation(&server, PORT) < want {
                    if waiting.elapsed() > Duration::from_secs(10) {
                        bail!("reload {} not applied in 10 s", done + 1);
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
                done += 1;
                let active = maps.runtime().active;
                let expected = a0 ^ (done as u32 & 1);
                if active != expected {
                    violations.push(format!("after reload {done}: active generation {active}, the controller flipped to {expected}"));
                }
            }
            Ok((done, violations))
        });
        let mut maps = Maps::open_pinned(&state.pins.dir).unwrap();
        let mut violations = Vec::new();
        let mut bans = 0u64;
        while bans < MAX_BANS && Instant::now() < deadline && !reloads.is_finished() {
            let i = bans % 250;
            let net: ipnet::IpNet = format!("10.{i}.0.0/16").parse().unwrap();
            let inside = TcpFrame::new(IpAddr::V4(Ipv4Addr::new(10, i as u8, 1, 2)), SERVER.parse().unwrap(), 25, SYN).build();
            let lock = BanLock::take(&state.pins.ban_lock_dir()).unwrap();
            maps.ban_network(&lock, net, Duration::from_secs(3600)).unwrap();
            drop(lock);
            if maps.runtime().cidr_bans == 0 {
                violations.push(format!("ban {bans}: {net} banned but the ban flag is clear right after the ban"));
            }
            let rc = time_run(prog.as_fd(), &inside, 1).unwrap().retval;
            if rc != XDP_DROP {
                violations.push(format!("ban {bans}: a SYN from inside {net} got {rc}, not a drop"));
            }
            if maps.runtime().cidr_bans == 0 {
                violations.push(format!("ban {bans}: {net} banned but the ban flag is clear before the unban"));
            }
            let lock = BanLock::take(&state.pins.ban_lock_dir()).unwrap();
            assert!(maps.unban_network(&lock, net).unwrap(), "{net} was banned");
            drop(lock);
            bans += 1;
        }
        let (reloaded, reload_violations) = reloads.join().unwrap().unwrap();
        stop.store(true, Ordering::Relaxed);
        let sent = traffic.join().unwrap();
        violations.extend(reload_violations);
        assert!(maps.network_bans().unwrap().is_empty());
        (bans, reloaded, sent, violations)
    });
    let count = |what: &str| violations.iter().filter(|v| v.contains(what)).count();
    eprintln!(
        "{bans} network bans and unbans, {reloaded} reloads, {sent} packets of traffic: {} violations \
         ({} ban flag clear, {} banned SYN passed, {} stale active generation)",
        violations.len(),
        count("flag is clear"),
        count("not a drop"),
        count("active generation")
    );
    assert!(reloaded >= 20 && bans >= 1000, "the race was hardly exercised: {reloaded} reloads, {bans} bans");
    assert!(violations.is_empty(), "{} violations, the first ones:\n{}", violations.len(), violations.iter().take(10).cloned().collect::<Vec<_>>().join("\n"));
}

struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A flood of new sources that all hash into the one 8-way set of a small
/// table keeps auto-banning them while an operator bans and unbans another
/// source of that set in a loop. No auto-ban may be lost: after each ban
/// the datapath starts (and after any manual ban or unban in flight then
/// has finished), the banned source is either still banned or evicted for
/// a newcomer, never tracked and unbanned. Writing the whole set back from
/// userspace lost the bans the datapath made in other ways meanwhile.
#[test]
#[ignore = "privileged: needs root, BPF and namespaces; cargo xtask test runs it"]
fn manual_bans_beside_a_flood_of_auto_bans_in_one_set_lose_none() {
    require_root();
    const SECONDS: u64 = 15;
    const MAX_SOURCES: u32 = 200_000;
    const MAX_OPS: u64 = 2_000_000;
    let state = TestPins::new("raceset");
    let mut h = Harness::load_with(Capacities { sources: 8, ..Capacities::default() }, Some(&state.pins.dir)).unwrap();
    assert_eq!(h.dp.source_sets(), 1, "one set: every source collides");
    let mut policy = base_policy();
    let p = &mut policy.direction[direction::INGRESS as usize];
    p.rate_enabled = 1;
    p.ban_threshold = 2;
    p.ban_base_s = 3600;
    p.ban_max_s = 3600;
    h.set_policy(&policy).unwrap();
    h.route(Hook::XdpIngress, direction::INGRESS, 0).unwrap();
    let manual = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 200));
    let dst: IpAddr = "203.0.113.25".parse().unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    // Odd while a manual ban or unban is in flight.
    let seq = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(SECONDS);
    let operator = {
        let (stop, seq, pins) = (stop.clone(), seq.clone(), state.pins.clone());
        std::thread::spawn(move || -> Result<u64> {
            let mut maps = Maps::open_pinned(&pins.dir)?;
            let mut ops = 0;
            while !stop.load(Ordering::Relaxed) && ops < MAX_OPS && Instant::now() < deadline + Duration::from_secs(5) {
                seq.fetch_add(1, Ordering::SeqCst);
                maps.ban_source(&BanLock::take(&pins.ban_lock_dir())?, manual, Duration::from_secs(7200))?;
                seq.fetch_add(1, Ordering::SeqCst);
                seq.fetch_add(1, Ordering::SeqCst);
                maps.unban_source(&BanLock::take(&pins.ban_lock_dir())?, manual)?;
                seq.fetch_add(1, Ordering::SeqCst);
                ops += 2;
            }
            Ok(ops)
        })
    };
    let (_, drop_code) = Hook::XdpIngress.verdict_codes();
    let (mut banned, mut lost) = (0u32, Vec::new());
    let mut n = 0u32;
    while n < MAX_SOURCES && Instant::now() < deadline {
        n += 1;
        let src = IpAddr::V4(Ipv4Addr::from(0xc612_0000u32 + n));
        let frame = TcpFrame::new(src, dst, 25, SYN).build();
        // Three SYNs start the ban; an eviction by the manual ban restarts the meter.
        let mut dropped = false;
        for _ in 0..20 {
            if h.dp.test_run(Hook::XdpIngress, &frame, 1).unwrap().0 == drop_code {
                dropped = true;
                break;
            }
        }
        assert!(dropped, "{src} was never banned");
        banned += 1;
        // Let a manual ban or unban that was in flight finish.
        let s = seq.load(Ordering::SeqCst);
        let waiting = Instant::now();
        while s % 2 == 1 && seq.load(Ordering::SeqCst) == s && waiting.elapsed() < Duration::from_secs(5) {
            std::hint::spin_loop();
        }
        let key = source_key_v4(match src {
            IpAddr::V4(a) => a.octets(),
            IpAddr::V6(_) => unreachable!(),
        });
        let set = h.dp.source_set(0);
        if let Some(slot) = set.slots.iter().find(|s| s.key == key) {
            if slot.ban_until_ns <= ktime_now_ns() {
                lost.push(format!("{src}: banned by the datapath, now tracked and not banned ({slot:?})"));
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let ops = operator.join().unwrap().unwrap();
    eprintln!("{banned} sources auto-banned beside {ops} manual bans and unbans in the same set: {} bans lost", lost.len());
    assert!(banned >= 1000 && ops >= 100, "the race was hardly exercised: {banned} auto-bans, {ops} manual operations");
    assert!(lost.is_empty(), "{} auto-bans lost, the first ones:\n{}", lost.len(), lost.iter().take(10).cloned().collect::<Vec<_>>().join("\n"));
}

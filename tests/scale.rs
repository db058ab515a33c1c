//! `scale` and `reload`: how smtpguard and the netfilter equivalents grow
//! with the rule count, what loading and swapping a policy costs, and the
//! maps' kernel memory.

use std::{
    net::Ipv4Addr,
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    time::Instant,
};

use anyhow::{bail, Context, Result};
use aya::programs::XdpMode;
use policy_common::{acl4::Capacity, direction, reason, verdict, ACL4_NODES, ACL4_ROOT, ACL4_SLOTS, ACL4_VALUES, ACL_V6};
use smtpguard::{
    dataplane::{acl4_writer, Capacities, Dataplane, Hook},
    policy::Compiled,
};
use smtpguard_tests::{
    fixtures::write_deny_policy as write_policy,
    hvlab::Counters,
    netns::Netns,
    testrun::{load_empty_xdp, time_run},
};

use crate::throughput::{iptables_rules, nft_ruleset, random_cidrs, syn_from, Bed};

pub const SIZES: [usize; 4] = [10, 1_000, 100_000, 1_000_000];
const REPEAT: u32 = 2_000_000;
/// Sources probed per size: each inside a different listed network.
const PROBES: usize = 16;

/// Compile, install and activate: what a reload does until the new policy
/// is in force (the standby copy is brought level afterwards, untimed).
fn apply(dp: &mut Dataplane, path: &Path, number: u64) -> Result<(f64, Compiled)> {
    let start = Instant::now();
    let compiled = crate::compile_file(path)?;
    let target = dp.active_generation() ^ 1;
    dp.install(target, &compiled, number)?;
    dp.activate(target, 0, 0);
    let took = start.elapsed().as_secs_f64();
    dp.install(target ^ 1, &compiled, number)?;
    Ok((took, compiled))
}

/// An address inside `net` (its network address plus one, or itself).
fn inside(net: &ipnet::Ipv4Net) -> Ipv4Addr {
    let base = u32::from(net.network());
    Ipv4Addr::from(if net.prefix_len() < 32 { base | 1 } else { base })
}

pub struct SizeRow {
    pub size: usize,
    pub smtpguard_ns: f64,
    pub floor_ns: f64,
    pub nft_mpps: f64,
    pub iptables_mpps: f64,
    pub load_s: f64,
    pub reload_s: f64,
    pub map_bytes: u64,
    /// smtpguard --backend nftables: Mpps, and the load of the policy (one nft transaction).
    pub sg_nft_mpps: f64,
    pub sg_nft_load_s: f64,
}

fn nft_devices() -> smtpguard::nft::Devices {
    smtpguard::nft::Devices { uplinks: vec!["d0".into()], tenants: Vec::new() }
}

/// Loads `compiled` into the DUT's nftables as `smtpguard run --backend
/// nftables` does; seconds.
fn nft_load(dut: &Netns, compiled: &Compiled) -> Result<f64> {
    let start = Instant::now();
    dut.enter(|| smtpguard::nft::load(compiled, smtpguard::nft::Sizes { sources: 65_536 }, &nft_devices()))??;
    Ok(start.elapsed().as_secs_f64())
}

/// One throughput round of `packets` SYNs from `src` into a DUT set up by
/// `setup` (commands in the DUT namespace); Mpps.
fn netfilter_mpps(src: Ipv4Addr, packets: u32, setup: &dyn Fn(&Netns) -> Result<()>) -> Result<f64> {
    let bed = Bed::new(true)?;
    setup(&bed.dut)?;
    let frame = syn_from(src);
    let generator = bed.generator(&frame)?;
    let took = bed.send(&generator, &frame, packets)?;
    Ok(packets as f64 / took.as_secs_f64() / 1e6)
}

pub fn run_scale(work: &Path, sizes: &[usize]) -> Result<(Vec<SizeRow>, u64)> {
    let floor = load_empty_xdp()?;
    let mut rows = Vec::new();
    for &size in sizes {
        eprintln!("scale: {size} CIDRs");
        let cidrs = random_cidrs(size, 0xc1d2 + size as u64);
        let other = random_cidrs(size, 0x0de7 + size as u64);
        let a = write_policy(&work.join("scale"), &format!("a{size}"), &cidrs, "")?;
        let b = write_policy(&work.join("scale"), &format!("b{size}"), &other, "")?;
        // The IPv4 arrays are reserved at load time: sized, as an operator
        // would, for the larger of the two policies (or the default).
        let room = [&a, &b].iter().try_fold(Capacity::DEFAULT, |room, p| -> Result<Capacity> {
            let need = acl4_writer::needed(&crate::compile_file(p)?.v4);
            let grow = |have: u32, need: u32| have.max(need + need / 8);
            Ok(Capacity { nodes: grow(room.nodes, need.nodes), slots: grow(room.slots, need.slots), values: grow(room.values, need.values) })
        })?;
        let mut dp = Dataplane::load(Capacities { acl4: room, ..Capacities::default() }, None).context("loading the datapath")?;
        let (load_s, compiled) = apply(&mut dp, &a, 1)?;
        let compiled_a = compiled.clone();
        if compiled.entries() == 0 {
            bail!("{size}: the policy compiled to nothing");
        }
        let (reload_s, _) = apply(&mut dp, &b, 2)?;
        // Back to `a` for the per-packet probe.
        apply(&mut dp, &a, 3)?;
        let mut map_bytes = 0;
        for name in [ACL4_ROOT, ACL4_NODES, ACL4_SLOTS, ACL4_VALUES, ACL_V6] {
            map_bytes += dp.map_memlock(name)?;
        }
        let (used, _) = dp.acl4_usage()?;
        eprintln!("  IPv4 arrays use {} nodes, {} slots, {} values (both generations); reserved per generation {room:?}", used.nodes, used.slots, used.values);

        let fd = dp.program_fd(Hook::XdpIngress)?;
        let (_, drop_code) = Hook::XdpIngress.verdict_codes();
        let (mut ns, mut floor_ns) = (0.0, 0.0);
        for i in 0..PROBES {
            let frame = syn_from(inside(&cidrs[(i * 7919) % size]));
            let t = time_run(std::os::fd::AsFd::as_fd(&fd), &frame, REPEAT)?;
            if t.retval != drop_code {
                bail!("{size}: a listed source was not dropped (verdict {})", t.retval);
            }
            ns += t.wall_ns / PROBES as f64;
            floor_ns += time_run(std::os::fd::AsFd::as_fd(&floor), &frame, REPEAT)?.wall_ns / PROBES as f64;
        }
        drop(dp);

        let src = inside(&cidrs[0]);
        let nft_file = work.join(format!("scale-{size}.nft"));
        std::fs::write(&nft_file, nft_ruleset("netdev", &cidrs, false))?;
        let started = Instant::now();
        let nft_mpps = netfilter_mpps(src, 2_000_000, &|dut| dut.exec(&["nft", "-f", &nft_file.display().to_string()]).map(drop))?;
        eprintln!("  nft netdev: {nft_mpps:.2} Mpps (setup and run {:.1} s)", started.elapsed().as_secs_f64());
        let iptables_mpps = netfilter_mpps(src, 2_000_000, &|dut| iptables_rules(dut, work, &cidrs, false))?;
        let sg_nft_load = std::cell::Cell::new(0.0);
        let sg_nft_mpps = netfilter_mpps(src, 2_000_000, &|dut| {
            sg_nft_load.set(nft_load(dut, &compiled_a)?);
            Ok(())
        })?;
        let sg_nft_load_s = sg_nft_load.get();
        eprintln!("  smtpguard nftables: {sg_nft_mpps:.2} Mpps, loaded in {sg_nft_load_s:.3} s");
        eprintln!("  smtpguard {ns:.2} ns/pkt (floor {floor_ns:.2}), load {load_s:.3} s, reload {reload_s:.3} s, {map_bytes} map bytes; iptables {iptables_mpps:.2} Mpps");
        rows.push(SizeRow { size, smtpguard_ns: ns, floor_ns, nft_mpps, iptables_mpps, load_s, reload_s, map_bytes, sg_nft_mpps, sg_nft_load_s });
    }
    let dp = Dataplane::load(Capacities { sources: 1_000_000, ..Capacities::default() }, None)?;
    let sources = dp.map_memlock(policy_common::SOURCES)?;
    Ok((rows, sources))
}

pub struct Reload {
    pub one_rule_ms: f64,
    pub full_swap_ms: f64,
    pub misjudged: u64,
    pub judged: u64,
    pub entries: usize,
}

/// A 100,000-CIDR policy under a flood from one source S: a one-rule edit
/// (deny S) and back, then a whole-policy swap to another 100,000 CIDRs
/// (with S allowed by rule). Every packet of S must be judged by the old or
/// the new policy: drop deny_acl, pass default_allow or pass allow_acl.
pub fn run_reload(work: &Path) -> Result<Reload> {
    const ROUNDS: usize = 5;
    let dir = work.join("reload");
    let cidrs = random_cidrs(100_000, 0xa11);
    let other = random_cidrs(100_000, 0xb22);
    let s = crate::throughput::CLEAN_SOURCE;
    let base = write_policy(&dir, "base", &cidrs, "")?;
    let one = write_policy(&dir, "one", &cidrs, &format!("  deny: [{{id: one-rule, cidr: {s}/32}}]\n"))?;
    let swap = write_policy(&dir, "swap", &other, &format!("  allow: [{{id: swapped, cidr: {s}/32}}]\n"))?;

    let bed = Bed::new(false)?;
    // Frames addressed to another host: what a policy passes, the stack
    // discards unanswered, so the flood costs the same under either policy.
    bed.dut.ip(&["link", "set", "d0", "address", "02:00:00:00:00:03"])?;
    let mut dp = Dataplane::load(Capacities::default(), None)?;
    let (_, compiled) = apply(&mut dp, &base, 1)?;
    bed.dut.enter(|| dp.attach_unpinned(Hook::XdpIngress, "d0", XdpMode::Driver))??;
    let frame = syn_from(s);
    let generator = bed.generator(&frame)?;

    let before = Counters::from(dp.stats()?);
    let stop = AtomicBool::new(false);
    let mut number = 2;
    let (mut one_rule, mut full) = (Vec::new(), Vec::new());
    // The flood runs until the changes are done, within its packet budget.
    let sent = std::thread::scope(|scope| -> Result<u64> {
        let flood = scope.spawn(|| -> Result<u64> {
            let mut sent = 0u64;
            // At most 2,000 chunks of 100,000 (about 15 s at full speed).
            for _ in 0..2_000 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                bed.send(&generator, &frame, 100_000)?;
                sent += 100_000;
            }
            Ok(sent)
        });
        let changes = (|| -> Result<()> {
            for _ in 0..ROUNDS {
                for (path, whole) in [(&one, false), (&base, false), (&swap, true), (&base, true)] {
                    let (took, _) = apply(&mut dp, path, number)?;
                    if whole { &mut full } else { &mut one_rule }.push(took * 1000.0);
                    number += 1;
                }
            }
            Ok(())
        })();
        stop.store(true, Ordering::SeqCst);
        let sent = flood.join().map_err(|_| anyhow::anyhow!("the flood thread panicked"))?;
        changes?;
        sent
    })?;
    let after = Counters::from(dp.stats()?);
    let mut judged = 0;
    let mut expected = 0;
    for v in 0..verdict::COUNT as u8 {
        for r in 0..reason::COUNT as u8 {
            let n = after.packets(direction::INGRESS, v, r) - before.packets(direction::INGRESS, v, r);
            judged += n;
            if matches!((v, r), (verdict::DROP, reason::DENY_ACL) | (verdict::PASS, reason::DEFAULT_ALLOW) | (verdict::PASS, reason::ALLOW_ACL)) {
                expected += n;
            }
        }
    }
    if judged < sent / 2 {
        bail!("only {judged} of {sent} flood packets were judged");
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok(Reload { one_rule_ms: median(one_rule), full_swap_ms: median(full), misjudged: judged - expected, judged, entries: compiled.entries() })
}

/// Kernel memory in use: MemTotal - MemAvailable, bytes.
fn kernel_used() -> Result<i64> {
    let text = std::fs::read_to_string("/proc/meminfo")?;
    let field = |name: &str| -> Result<i64> {
        let line = text.lines().find(|l| l.starts_with(name)).with_context(|| format!("{name} in /proc/meminfo"))?;
        Ok(line.split_whitespace().nth(1).context("a number")?.parse::<i64>()? * 1024)
    };
    Ok(field("MemTotal:")? - field("MemAvailable:")?)
}

pub struct NftGeo {
    pub networks: usize,
    pub elements: usize,
    pub load_s: f64,
    pub kernel_bytes: i64,
}

/// The whole real geo database into nftables: a geo-fence that lets one
/// country through (`allow_only: [US]`) puts every other network of the
/// database in the peer map. Load time, and the kernel memory it takes
/// (MemAvailable before and after, the table deleted between rounds).
pub fn run_nft_geo(work: &Path) -> Result<NftGeo> {
    let dir = work.join("nftgeo");
    std::fs::create_dir_all(&dir)?;
    let db = crate::geo_database()?;
    let path = dir.join("policy.yaml");
    std::fs::write(
        &path,
        format!("version: 1\nports: {{25: smtp}}\ningress:\n  default: {{25: allow}}\n  geo: {{database: {}, field: country_code, allow_only: [US], unknown: deny}}\negress:\n  default: {{25: deny}}\n", db.display()),
    )?;
    let compiled = crate::compile_file(&path)?;
    let elements = smtpguard::nft::ruleset::render(&compiled, &nft_devices())
        .iter()
        .filter_map(|c| c.pointer("/add/element/elem").and_then(|e| e.as_array()).map(Vec::len))
        .sum();
    let (mut loads, mut bytes) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let bed = Bed::new(true)?;
        let before = kernel_used()?;
        loads.push(nft_load(&bed.dut, &compiled)?);
        bytes.push(kernel_used()? - before);
        bed.dut.exec(&["nft", "delete", "table", "netdev", "smtpguard"])?;
    }
    loads.sort_by(f64::total_cmp);
    bytes.sort();
    Ok(NftGeo { networks: compiled.geo.networks_read, elements, load_s: loads[1], kernel_bytes: bytes[1] })
}

pub struct NftReload {
    pub entries: usize,
    pub one_rule_ms: f64,
    pub full_swap_ms: f64,
}

/// The nftables backend's reloads of a 100,000-CIDR policy: a one-rule
/// edit and back, and a swap to another 100,000 (each one transaction).
pub fn run_nft_reload(work: &Path) -> Result<NftReload> {
    const ROUNDS: usize = 5;
    let dir = work.join("nftreload");
    let cidrs = random_cidrs(100_000, 0xa11);
    let other = random_cidrs(100_000, 0xb22);
    let s = crate::throughput::CLEAN_SOURCE;
    let base = crate::compile_file(&write_policy(&dir, "base", &cidrs, "")?)?;
    let one = crate::compile_file(&write_policy(&dir, "one", &cidrs, &format!("  deny: [{{id: one-rule, cidr: {s}/32}}]\n"))?)?;
    let swap = crate::compile_file(&write_policy(&dir, "swap", &other, &format!("  allow: [{{id: swapped, cidr: {s}/32}}]\n"))?)?;
    let bed = Bed::new(true)?;
    // As the controller reloads: each load an update of the last.
    let mut loader = smtpguard::nft::Loader::default();
    let sizes = smtpguard::nft::Sizes { sources: 65_536 };
    bed.dut.enter(|| loader.load(&base, sizes, &nft_devices()))??;
    let (mut one_rule, mut full) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        for (c, whole) in [(&one, false), (&base, false), (&swap, true), (&base, true)] {
            let start = Instant::now();
            bed.dut.enter(|| loader.load(c, sizes, &nft_devices()))??;
            let took = start.elapsed().as_secs_f64();
            if whole { &mut full } else { &mut one_rule }.push(took * 1000.0);
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok(NftReload { entries: base.entries(), one_rule_ms: median(one_rule), full_swap_ms: median(full) })
}

//! smtpguard-bench: benchmarks that need root and the real kernel.
//! Run through `cargo xtask bench NAME [--json]`.
//!
//! `datapath`: ns per packet of `xdp_ingress` via BPF_PROG_TEST_RUN
//! (10,000,000 repeats, CPU pinned) for each way a packet can leave,
//! measured beside an empty XDP program in the same run. Each case runs
//! in rounds interleaved with the floor; the median ratio is reported.

use std::net::{IpAddr, Ipv4Addr};

use anyhow::{bail, Context, Result};
use policy_common::{direction, side, source::SourceSlot};
use smtpguard::dataplane::{ktime_now_ns, Hook};
use smtpguard_tests::{
    fixtures::{base_policy, ends, entry, entry_all_ports, seed, Harness, BLOCKED_COUNTRY, OPEN_COUNTRY},
    packet::{TcpFrame, SYN},
    testrun::{load_empty_xdp, pin_to_last_cpu, time_run},
};

const REPEAT: u32 = 10_000_000;
const ROUNDS: usize = 3;
/// Background deny entries, so lookups walk a populated trie.
const BACKGROUND_ACL: u32 = 10_000;

struct Case {
    name: &'static str,
    what: &'static str,
    frame: Vec<u8>,
    drops: bool,
    setup: Box<dyn Fn(&mut Harness, &mut policy_common::PolicyConfig) -> Result<()>>,
}

fn cases() -> Vec<Case> {
    let ing = ends(direction::INGRESS, false);
    let syn = TcpFrame::new(ing.src, ing.dst, 25, SYN).build();
    let inp = direction::INGRESS as usize;
    vec![
        Case { name: "non_tcp", what: "UDP to port 25", frame: TcpFrame::new(ing.src, ing.dst, 25, 0).protocol(17).build(), drops: false, setup: Box::new(|_, _| Ok(())) },
        Case { name: "tcp80", what: "TCP SYN to port 80", frame: TcpFrame::new(ing.src, ing.dst, 80, SYN).build(), drops: false, setup: Box::new(|_, _| Ok(())) },
        Case {
            name: "allow_acl",
            what: "SYN to 25, allow ACL",
            frame: syn.clone(),
            drops: false,
            setup: Box::new(move |h, _| h.add_acl(direction::INGRESS, side::PEER, ing.src, 32, entry_all_ports(11, 0, 0)).map_err(Into::into)),
        },
        Case {
            name: "deny_acl",
            what: "SYN to 25, deny ACL",
            frame: syn.clone(),
            drops: true,
            setup: Box::new(move |h, _| h.add_acl(direction::INGRESS, side::PEER, ing.src, 24, entry(0, 0, 22, 0)).map_err(Into::into)),
        },
        Case {
            name: "banned",
            what: "SYN to 25, banned source",
            frame: syn.clone(),
            drops: true,
            setup: Box::new(move |h, _| h.seed_source(ing.src, seed::banned_for(3600)).map_err(Into::into)),
        },
        Case {
            name: "geo_drop",
            what: "SYN to 25, blocked country",
            frame: syn.clone(),
            drops: true,
            setup: Box::new(move |h, p| {
                p.direction[inp].geo_enabled = 1;
                h.add_acl(direction::INGRESS, side::PEER, ing.src, 24, entry(0, 0, 0, BLOCKED_COUNTRY)).map_err(Into::into)
            }),
        },
        Case {
            name: "rate_limited",
            what: "SYN to 25, empty bucket",
            frame: syn.clone(),
            drops: true,
            setup: Box::new(move |h, p| {
                let d = &mut p.direction[inp];
                d.rate_enabled = 1;
                // Metered but never banned, so every repeat takes the same path.
                d.ban_threshold = u32::MAX;
                // An hour of backlog: the bucket stays empty for the whole run.
                let slot = SourceSlot { admit_tat_ns: ktime_now_ns() + 3_600_000_000_000, ..SourceSlot::default() };
                h.seed_source(ing.src, slot).map_err(Into::into)
            }),
        },
        Case {
            name: "full_pass",
            what: "SYN to 25 through every step",
            frame: syn,
            drops: false,
            setup: Box::new(move |h, p| {
                let d = &mut p.direction[inp];
                d.rate_enabled = 1;
                d.geo_enabled = 1;
                d.ban_threshold = u32::MAX;
                // A token for every repeat: the SYN passes each step and is metered.
                d.rate_interval_ns = 1;
                d.rate_tolerance_ns = u64::MAX / 2;
                h.add_acl(direction::INGRESS, side::PEER, ing.src, 24, entry(0, 0, 0, OPEN_COUNTRY))?;
                h.add_acl(direction::INGRESS, side::LOCAL, ing.dst, 24, entry(2, 11, 0, 0))?;
                Ok(())
            }),
        },
    ]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

struct Row {
    name: &'static str,
    what: &'static str,
    verdict: &'static str,
    ns: f64,
    kernel_ns: f64,
    ratio: f64,
}

fn datapath(json: bool) -> Result<()> {
    let cpu = pin_to_last_cpu()?;
    let floor_prog = load_empty_xdp()?;
    let mut h = Harness::load().context("loading the datapath (needs root)")?;
    // Background entries in other networks, present for every case.
    let mut background = Vec::new();
    for i in 0..BACKGROUND_ACL {
        let addr = IpAddr::V4(Ipv4Addr::from(0x0a00_0000u32 + (i << 8)));
        background.push(addr);
    }
    let probe = TcpFrame::new(ends(0, false).src, ends(0, false).dst, 25, SYN).build();
    let mut rows = Vec::new();
    let (mut floors, mut floor_kernel) = (Vec::new(), Vec::new());
    let only = std::env::args().skip_while(|a| a != "--only").nth(1);
    for case in cases().into_iter().filter(|c| only.as_deref().is_none_or(|o| o == c.name)) {
        h.reset()?;
        for addr in &background {
            h.add_acl(direction::INGRESS, side::PEER, *addr, 24, entry(0, 0, 33, 0))?;
        }
        let mut policy = base_policy();
        (case.setup)(&mut h, &mut policy)?;
        h.set_policy(&policy)?;
        let fd = h.dp.program_fd(Hook::XdpIngress)?;
        let (pass, drop) = Hook::XdpIngress.verdict_codes();
        let expected = if case.drops { drop } else { pass };
        let rc = time_run(fd, &case.frame, 1)?.retval;
        if rc != expected {
            bail!("{}: verdict {rc}, expected {expected}", case.name);
        }
        let (mut ns, mut kernel, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            let floor = time_run(floor_prog.as_fd_borrowed(), &probe, REPEAT)?;
            let t = time_run(fd, &case.frame, REPEAT)?;
            if t.retval != expected {
                bail!("{}: verdict changed to {} during the run", case.name, t.retval);
            }
            floors.push(floor.wall_ns);
            floor_kernel.push(floor.kernel_ns as f64);
            ns.push(t.wall_ns);
            kernel.push(t.kernel_ns as f64);
            ratios.push(t.wall_ns / floor.wall_ns);
        }
        rows.push(Row {
            name: case.name,
            what: case.what,
            verdict: if case.drops { "drop" } else { "pass" },
            ns: median(ns),
            kernel_ns: median(kernel),
            ratio: median(ratios),
        });
    }
    h.reset()?;
    let floor_ns = median(floors);
    let floor_kernel_ns = median(floor_kernel);

    let non_smtp_ok = rows.iter().filter(|r| r.name == "non_tcp" || r.name == "tcp80").all(|r| r.ratio <= 1.25);
    let pipeline_ok = rows.iter().all(|r| r.ratio <= 3.0);
    if json {
        let cases: serde_json::Map<String, serde_json::Value> = rows
            .iter()
            .map(|r| {
                let v = serde_json::json!({"ns": round2(r.ns), "kernel_ns": r.kernel_ns, "ratio": round2(r.ratio), "verdict": r.verdict});
                (r.name.to_owned(), v)
            })
            .collect();
        println!("{}", serde_json::json!({"floor_ns": round2(floor_ns), "floor_kernel_ns": floor_kernel_ns, "cases": cases}));
    } else {
        println!("xdp_ingress per packet, BPF_PROG_TEST_RUN x {REPEAT}, CPU {cpu}, median of {ROUNDS} rounds,");
        println!("{BACKGROUND_ACL} background ACL entries. ns/pkt: wall clock around the run; kernel: the");
        println!("kernel's whole-ns figure; ratio: ns/pkt over the empty XDP program's, same round.\n");
        println!("{:<14} {:<32} {:>7} {:>8} {:>7} {:>7}", "case", "packet", "verdict", "ns/pkt", "kernel", "ratio");
        println!("{:<14} {:<32} {:>7} {:>8.2} {:>7} {:>7.2}", "floor", "empty XDP program", "pass", floor_ns, floor_kernel_ns, 1.0);
        for r in &rows {
            println!("{:<14} {:<32} {:>7} {:>8.2} {:>7} {:>7.2}", r.name, r.what, r.verdict, r.ns, r.kernel_ns, r.ratio);
        }
        println!();
        println!("target non-SMTP <= 1.25x: {}", if non_smtp_ok { "met" } else { "MISSED" });
        println!("target whole pipeline <= 3x: {}", if pipeline_ok { "met" } else { "MISSED" });
    }
    if !(non_smtp_ok && pipeline_ok) {
        bail!("a datapath target was missed");
    }
    Ok(())
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

trait AsBorrowed {
    fn as_fd_borrowed(&self) -> std::os::fd::BorrowedFd<'_>;
}

impl AsBorrowed for std::os::fd::OwnedFd {
    fn as_fd_borrowed(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(self)
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let json = args.iter().any(|a| a == "--json");
    match args.first().map(String::as_str) {
        Some("datapath") => datapath(json),
        other => bail!("usage: smtpguard-bench datapath [--json] (got {other:?})"),
    }
}

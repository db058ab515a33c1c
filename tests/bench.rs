//! smtpguard-bench: benchmarks that need root and the real kernel.
//! Run through `cargo xtask bench NAME [--json]`.
//!
//! `datapath`: ns per packet of `xdp_ingress` via BPF_PROG_TEST_RUN
//! (10,000,000 repeats, CPU pinned) for each way a packet can leave,
//! measured beside an empty XDP program in the same run. Each case runs
//! in rounds interleaved with the floor; the median ratio is reported.
//! Every case runs with the flow trace off; the `trace_*` cases repeat
//! `deny_acl` with a trace on (`smtpguard trace`).

mod endpoint;
mod fleetbench;
mod interfaces;
mod report;
mod reportbench;
mod scale;
mod throughput;

use std::net::{IpAddr, Ipv4Addr};

use anyhow::{bail, Context, Result};
use policy_common::{direction, side, source::SourceSlot, trace::TraceSelector};
use smtpguard::{
    clock::ktime_now_ns,
    dataplane::{Capacities, Dataplane, Hook},
    dataplane::trace::{attach_loggers, TraceSwitch},
};
use smtpguard_tests::{
    fixtures::{base_policy, ends, entry, entry_all_ports, seed, Harness, BLOCKED_COUNTRY, OPEN_COUNTRY},
    packet::{TcpFrame, ACK, PSH, SYN},
    testrun::{load_empty_xdp, pin_to_last_cpu, time_run},
};

const REPEAT: u32 = 10_000_000;
const ROUNDS: usize = 3;
/// Background deny entries, so lookups walk a populated trie.
const BACKGROUND_ACL: u32 = 10_000;

type Setup = Box<dyn Fn(&mut Harness, &mut policy_common::PolicyConfig) -> Result<()>>;

struct Case {
    name: &'static str,
    what: &'static str,
    frame: Vec<u8>,
    drops: bool,
    setup: Setup,
    trace: Trace,
}

/// The flow trace during a case.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Trace {
    /// Off: the selector's one word is read and found zero.
    Off,
    /// On for another address: the flow is compared and not traced.
    Other,
    /// On for the flow's source, the log ring read between short runs:
    /// each packet writes its line.
    Match,
    /// On for the flow's source, nobody reading: once the ring is full
    /// each packet builds its line and finds no room.
    MatchFull,
}

/// Lines per timed run of [`Trace::Match`]: fewer than aya-log's ring
/// (128 KiB) holds of them, so none is lost.
const TRACE_LINES_PER_RUN: u32 = 200;
/// Runs of [`Trace::Match`]; the row is their median.
const TRACE_RUNS: usize = 200;

fn cases() -> Vec<Case> {
    let ing = ends(direction::INGRESS, false);
    let syn = TcpFrame::new(ing.src, ing.dst, 25, SYN).build();
    let inp = direction::INGRESS as usize;
    vec![
        Case { name: "non_tcp", what: "UDP to port 25", frame: TcpFrame::new(ing.src, ing.dst, 25, 0).protocol(17).build(), drops: false, setup: Box::new(|_, _| Ok(())), trace: Trace::Off },
        Case { name: "tcp80", what: "TCP SYN to port 80", frame: TcpFrame::new(ing.src, ing.dst, 80, SYN).build(), drops: false, setup: Box::new(|_, _| Ok(())), trace: Trace::Off },
        Case {
            name: "allow_acl",
            what: "SYN to 25, allow ACL",
            frame: syn.clone(),
            drops: false,
            setup: Box::new(move |h, _| h.add_acl(direction::INGRESS, side::PEER, ing.src, 32, entry_all_ports(11, 0, 0)).map_err(Into::into)),
            trace: Trace::Off,
        },
        Case {
            name: "deny_acl",
            what: "SYN to 25, deny ACL",
            frame: syn.clone(),
            drops: true,
            setup: Box::new(move |h, _| h.add_acl(direction::INGRESS, side::PEER, ing.src, 24, entry(0, 0, 22, 0)).map_err(Into::into)),
            trace: Trace::Off,
        },
        Case {
            name: "shadow_same",
            what: "SYN, deny ACL, shadow agrees",
            frame: syn.clone(),
            drops: true,
            setup: Box::new(move |h, _| {
                h.add_acl(direction::INGRESS, side::PEER, ing.src, 24, entry(0, 0, 22, 0))?;
                h.set_shadow(&format!("version: 1\ningress:\n  default: {{25: allow}}\n  deny: [{{id: d, cidr: {}/24}}]\n", ing.src.to_string().rsplit_once('.').map(|(a, _)| format!("{a}.0")).unwrap_or_default()))
            }),
            trace: Trace::Off,
        },
        Case {
            name: "shadow_differs",
            what: "SYN, deny ACL, shadow differs",
            frame: syn.clone(),
            drops: true,
            setup: Box::new(move |h, _| {
                h.add_acl(direction::INGRESS, side::PEER, ing.src, 24, entry(0, 0, 22, 0))?;
                h.set_shadow("version: 1\ningress:\n  default: {25: allow}\n")
            }),
            trace: Trace::Off,
        },
        Case {
            name: "trace_on_other",
            what: "SYN, deny ACL, trace on other",
            frame: syn.clone(),
            drops: true,
            setup: Box::new(move |h, _| h.add_acl(direction::INGRESS, side::PEER, ing.src, 24, entry(0, 0, 22, 0)).map_err(Into::into)),
            trace: Trace::Other,
        },
        Case {
            name: "trace_on_match",
            what: "SYN, deny ACL, traced, written",
            frame: syn.clone(),
            drops: true,
            setup: Box::new(move |h, _| h.add_acl(direction::INGRESS, side::PEER, ing.src, 24, entry(0, 0, 22, 0)).map_err(Into::into)),
            trace: Trace::Match,
        },
        Case {
            name: "trace_on_full",
            what: "SYN, deny ACL, traced, ring full",
            frame: syn.clone(),
            drops: true,
            setup: Box::new(move |h, _| h.add_acl(direction::INGRESS, side::PEER, ing.src, 24, entry(0, 0, 22, 0)).map_err(Into::into)),
            trace: Trace::MatchFull,
        },
        Case {
            name: "banned",
            what: "SYN to 25, banned source",
            frame: syn.clone(),
            drops: true,
            setup: Box::new(move |h, _| h.seed_source(ing.src, seed::banned_for(3600)).map_err(Into::into)),
            trace: Trace::Off,
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
            trace: Trace::Off,
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
            trace: Trace::Off,
        },
        // The command filter on 25 (the base policy blocks VRFY and EXPN):
        // a full-size segment without a command, one with a command on its
        // third line, and a short command segment.
        Case {
            name: "payload_1448",
            what: "1448-byte body segment to 25, no command (scanned whole)",
            frame: TcpFrame::new(ing.src, ing.dst, 25, ACK | PSH).payload(&body_segment(1448)).build(),
            drops: false,
            setup: Box::new(|_, _| Ok(())),
            trace: Trace::Off,
        },
        Case {
            name: "command_line3",
            what: "EHLO, NOOP, then VRFY in one segment to 25",
            frame: TcpFrame::new(ing.src, ing.dst, 25, ACK | PSH).payload(b"EHLO client.example\r\nNOOP\r\nVRFY root\r\n").build(),
            drops: true,
            setup: Box::new(|_, _| Ok(())),
            trace: Trace::Off,
        },
        Case {
            name: "command_short",
            what: "NOOP segment to 25, stream followed",
            frame: TcpFrame::new(ing.src, ing.dst, 25, ACK | PSH).payload(b"NOOP\r\n").build(),
            drops: false,
            setup: Box::new(|_, _| Ok(())),
            trace: Trace::Off,
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
            trace: Trace::Off,
        },
    ]
}

/// Mail body text: lines of 72 characters, as a message body is sent.
fn body_segment(len: usize) -> Vec<u8> {
    let line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod\r\n";
    line.iter().copied().cycle().take(len).collect()
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
        let prefixes: Vec<_> = background.iter().map(|a| (*a, 24)).collect();
        h.add_acls(direction::INGRESS, side::PEER, &prefixes, entry(0, 0, 33, 0))?;
        let mut policy = base_policy();
        (case.setup)(&mut h, &mut policy)?;
        h.set_policy(&policy)?;
        // Off unless the case says otherwise (and off again when it drops).
        let program_id = h.dp.programs().id(Hook::XdpIngress)?;
        let trace = TraceSwitch::open(&[program_id])?;
        let lines = CountLines::default();
        let mut ring = attach_loggers(&[program_id], lines.clone())?;
        // What an earlier case left (a full ring).
        lines.drain(&mut ring);
        let hour = ktime_now_ns() + 3_600_000_000_000;
        match case.trace {
            Trace::Off => {}
            Trace::Other => trace.set(&TraceSelector::new(TRACE_OTHER.into(), 0, hour)),
            Trace::Match | Trace::MatchFull => trace.set(&TraceSelector::new(ends(0, false).src, 0, hour)),
        }
        let fd = h.dp.program_fd(Hook::XdpIngress)?;
        let (pass, drop) = Hook::XdpIngress.verdict_codes();
        let expected = if case.drops { drop } else { pass };
        let rc = time_run(std::os::fd::AsFd::as_fd(&fd), &case.frame, 1)?.retval;
        if rc != expected {
            bail!("{}: verdict {rc}, expected {expected}", case.name);
        }
        let written = lines.drain(&mut ring);
        let want = u64::from(matches!(case.trace, Trace::Match | Trace::MatchFull));
        if written != want {
            bail!("{}: {written} trace line(s) for one packet, expected {want}", case.name);
        }
        let (row, floor) = if case.trace == Trace::Match {
            timed_trace_rounds(floor_prog.as_fd_borrowed(), &probe, std::os::fd::AsFd::as_fd(&fd), &case.frame, expected, (&lines, &mut ring), case.name, case.what)?
        } else {
            timed_rounds(floor_prog.as_fd_borrowed(), &probe, std::os::fd::AsFd::as_fd(&fd), &case.frame, expected, case.name, case.what)?
        };
        floors.extend(floor.iter().map(|f| f.0));
        floor_kernel.extend(floor.iter().map(|f| f.1));
        rows.push(row);
    }
    h.reset()?;
    drop(h);
    let flow_memory = smtp_flow_memory()?;
    // The same measure of a real filter that only matches the port.
    let reference = if only.is_none() { Some(xdp_filter_reference(floor_prog.as_fd_borrowed(), &probe)?) } else { None };
    let floor_ns = median(floors);
    let floor_kernel_ns = median(floor_kernel);

    let non_smtp_ok = rows.iter().filter(|r| r.name == "non_tcp" || r.name == "tcp80").all(|r| r.ratio <= 1.25);
    // Tracing a flow is a diagnosis, and a shadow a roll-out's measurement,
    // not the pipeline: their rows are beside the target.
    let pipeline_ok = rows.iter().filter(|r| !r.name.starts_with("trace_") && !r.name.starts_with("shadow_")).all(|r| r.ratio <= 3.0);
    if json {
        let cases: serde_json::Map<String, serde_json::Value> = rows
            .iter()
            .map(|r| {
                let v = serde_json::json!({"ns": round2(r.ns), "kernel_ns": r.kernel_ns, "ratio": round2(r.ratio), "verdict": r.verdict});
                (r.name.to_owned(), v)
            })
            .collect();
        let reference = reference.as_ref().map(|r| serde_json::json!({"xdp_filter": {"ns": round2(r.ns), "kernel_ns": r.kernel_ns, "ratio": round2(r.ratio), "verdict": r.verdict}}));
        let flows: Vec<_> = flow_memory.iter().map(|(n, bytes)| serde_json::json!({"flows": n, "bytes": bytes})).collect();
        println!("{}", serde_json::json!({"floor_ns": round2(floor_ns), "floor_kernel_ns": floor_kernel_ns, "cases": cases, "reference": reference, "smtp_flows_memory": flows}));
    } else {
        println!("xdp_ingress per packet, BPF_PROG_TEST_RUN x {REPEAT}, CPU {cpu}, median of {ROUNDS} rounds,");
        println!("{BACKGROUND_ACL} background ACL entries. ns/pkt: wall clock around the run; kernel: the");
        println!("kernel's whole-ns figure; ratio: ns/pkt over the empty XDP program's, same round.\n");
        println!("{:<14} {:<32} {:>7} {:>8} {:>7} {:>7}", "case", "packet", "verdict", "ns/pkt", "kernel", "ratio");
        println!("{:<14} {:<32} {:>7} {:>8.2} {:>7} {:>7.2}", "floor", "empty XDP program", "pass", floor_ns, floor_kernel_ns, 1.0);
        for r in &rows {
            println!("{:<14} {:<32} {:>7} {:>8.2} {:>7} {:>7.2}", r.name, r.what, r.verdict, r.ns, r.kernel_ns, r.ratio);
        }
        if let Some(r) = &reference {
            println!("{:<14} {:<32} {:>7} {:>8.2} {:>7} {:>7.2}", r.name, r.what, r.verdict, r.ns, r.kernel_ns, r.ratio);
        }
        let row = |name: &str| rows.iter().find(|r| r.name == name);
        if let (Some(off), Some(other), Some(hit), Some(full)) = (row("deny_acl"), row("trace_on_other"), row("trace_on_match"), row("trace_on_full")) {
            println!("\nflow trace (every other case runs with it off), over deny_acl: on for another address {:+.2} ns/pkt;", other.ns - off.ns);
            println!("on for this flow {:+.2} once the log ring is full, and {:+.0} (kernel figures) a line written: runs of", full.ns - off.ns, hit.kernel_ns - off.kernel_ns);
            println!("{TRACE_LINES_PER_RUN} with the ring read between them, whose wall clock is mostly the syscall's.");
        }
        if let (Some(off), Some(same), Some(differs)) = (row("deny_acl"), row("shadow_same"), row("shadow_differs")) {
            println!("\nshadow policy, over deny_acl: {:+.2} ns/pkt when the candidate agrees (its one trie lookup),", same.ns - off.ns);
            println!("{:+.2} when it differs (the lookup, the difference and source counters); none loaded: one shift of a word", differs.ns - off.ns);
            println!("every packet loads anyway (every other case).");
        }
        println!();
        for (n, bytes) in &flow_memory {
            println!("SMTP_FLOWS (command filter state) for {n} flows: {:.1} MB kernel memory, {:.0} bytes a flow", *bytes as f64 / 1e6, *bytes as f64 / *n as f64);
        }
        println!("target non-SMTP <= 1.25x: {}", if non_smtp_ok { "met" } else { "MISSED" });
        println!("target whole pipeline <= 3x: {}", if pipeline_ok { "met" } else { "MISSED" });
    }
    if !(non_smtp_ok && pipeline_ok) {
        bail!("a datapath target was missed");
    }
    Ok(())
}

/// Kernel memory (memlock) of the command filter's flow table at the
/// default size and at a million flows: the LRU map preallocates.
fn smtp_flow_memory() -> Result<Vec<(u32, u64)>> {
    [policy_common::DEFAULT_SMTP_FLOWS_CAPACITY, 1_000_000]
        .into_iter()
        .map(|n| {
            let dp = Dataplane::load(Capacities { smtp_flows: n, ..Capacities::default() }, None)?;
            Ok((n, dp.map_memlock(policy_common::SMTP_FLOWS)?))
        })
        .collect()
}

/// xdp-tools' xdp-filter dropping the probe SYN to port 25, timed as the
/// cases are (it matches the port only: no ACL, no bans, no rate, no geo).
fn xdp_filter_reference(floor: std::os::fd::BorrowedFd<'_>, frame: &[u8]) -> Result<Row> {
    let bed = throughput::Bed::new(false)?;
    throughput::with_xdp_filter(&bed, || {
        let info = aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .filter(|p| p.name_as_str().is_some_and(|n| n.starts_with("xdpfilt")))
            .max_by_key(|p| p.id())
            .context("xdp-filter's program is not loaded")?;
        let fd = info.fd()?;
        let (_, drop) = Hook::XdpIngress.verdict_codes();
        let fd = std::os::fd::AsFd::as_fd(&fd);
        Ok(timed_rounds(floor, frame, fd, frame, drop, "xdp_filter", "reference: xdp-filter, port 25 only")?.0)
    })
}

/// Another address than any case's flow, for the trace that matches none.
const TRACE_OTHER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 200);

/// Counts the trace lines aya-log reads.
#[derive(Clone, Default)]
struct CountLines(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl log::Log for CountLines {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, _: &log::Record<'_>) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    fn flush(&self) {}
}

impl CountLines {
    /// Reads what the ring holds: the lines written since the last drain.
    fn drain(&self, ring: &mut [aya_log::EbpfLogger<CountLines>]) -> u64 {
        ring.iter_mut().for_each(|l| l.flush());
        self.0.swap(0, std::sync::atomic::Ordering::Relaxed)
    }
}

/// [`timed_rounds`] for a traced flow whose lines are read: `TRACE_RUNS`
/// runs of `TRACE_LINES_PER_RUN` packets, the ring read between them and
/// every line counted. A run this short costs the syscall tens of
/// microseconds a packet of wall clock (XDP test-run setup, ticks), so the
/// row's ns/pkt is the kernel's figure (its timer around the program runs
/// alone), median over the runs; the ratio is over the floor's ns/pkt in
/// a full-length run beside it.
#[expect(clippy::too_many_arguments, reason = "timed_rounds' arguments and the ring")]
fn timed_trace_rounds(
    floor: std::os::fd::BorrowedFd<'_>,
    probe: &[u8],
    prog: std::os::fd::BorrowedFd<'_>,
    frame: &[u8],
    expected: u32,
    (lines, ring): (&CountLines, &mut [aya_log::EbpfLogger<CountLines>]),
    name: &'static str,
    what: &'static str,
) -> Result<(Row, Vec<(f64, f64)>)> {
    let full = time_run(floor, probe, REPEAT)?;
    let mut kernel = Vec::new();
    for _ in 0..TRACE_RUNS {
        lines.drain(ring);
        let t = time_run(prog, frame, TRACE_LINES_PER_RUN)?;
        if t.retval != expected {
            bail!("{name}: verdict changed to {} during the run (expected {expected})", t.retval);
        }
        let written = lines.drain(ring);
        if written != u64::from(TRACE_LINES_PER_RUN) {
            bail!("{name}: {written} trace lines read of {TRACE_LINES_PER_RUN} packets");
        }
        kernel.push(t.kernel_ns as f64);
    }
    let ns = median(kernel);
    let (pass, _) = Hook::XdpIngress.verdict_codes();
    let verdict = if expected == pass { "pass" } else { "drop" };
    Ok((Row { name, what, verdict, ns, kernel_ns: ns, ratio: ns / full.wall_ns }, vec![(full.wall_ns, full.kernel_ns as f64)]))
}

/// `ROUNDS` runs of `prog` on `frame`, each beside the floor program on
/// `probe`, as a row of medians; and each round's floor (wall, kernel ns).
/// Every run must return `expected`.
fn timed_rounds(
    floor: std::os::fd::BorrowedFd<'_>,
    probe: &[u8],
    prog: std::os::fd::BorrowedFd<'_>,
    frame: &[u8],
    expected: u32,
    name: &'static str,
    what: &'static str,
) -> Result<(Row, Vec<(f64, f64)>)> {
    let (mut ns, mut kernel, mut ratios, mut floors) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let f = time_run(floor, probe, REPEAT)?;
        let t = time_run(prog, frame, REPEAT)?;
        if t.retval != expected {
            bail!("{name}: verdict changed to {} during the run (expected {expected})", t.retval);
        }
        floors.push((f.wall_ns, f.kernel_ns as f64));
        ns.push(t.wall_ns);
        kernel.push(t.kernel_ns as f64);
        ratios.push(t.wall_ns / f.wall_ns);
    }
    let (pass, _) = Hook::XdpIngress.verdict_codes();
    let verdict = if expected == pass { "pass" } else { "drop" };
    Ok((Row { name, what, verdict, ns: median(ns), kernel_ns: median(kernel), ratio: median(ratios) }, floors))
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

/// Validate and compile a policy file `runs` times; the median time and the result.
fn time_compile(path: &std::path::Path, runs: usize) -> Result<(f64, smtpguard::policy::Compiled)> {
    let mut times = Vec::new();
    let mut last = None;
    for _ in 0..runs {
        let start = std::time::Instant::now();
        let (compiled, diags) = smtpguard::policy::load_and_compile(path, &Default::default());
        let Some((_, c)) = compiled else { bail!("{} is not valid:\n{diags}", path.display()) };
        times.push(start.elapsed().as_secs_f64() * 1000.0);
        last = Some(c);
    }
    Ok((median(times), last.expect("at least one run")))
}

/// `compile`: validate and compile the IDC default, a policy of 100,000
/// CIDRs from list files, and a geo-fence over the whole real database.
fn compile(json: bool) -> Result<()> {
    const RUNS: usize = 3;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("workspace root")?;
    let work = Work::new("compile")?;
    let dir = &work.0;
    // 100,000 distinct random networks of mixed lengths, in two list files.
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut seen = std::collections::HashSet::new();
    let mut lists = [String::new(), String::new()];
    while seen.len() < 100_000 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let len = [16u8, 20, 22, 24, 24, 24, 28, 32][(rng >> 60) as usize % 8];
        let net = ipnet::Ipv4Net::new(Ipv4Addr::from((rng >> 16) as u32), len)?.trunc();
        if seen.insert(net) {
            lists[seen.len() % 2] += &format!("{net} ; listing {}\n", seen.len());
        }
    }
    std::fs::write(dir.join("a.txt"), &lists[0])?;
    std::fs::write(dir.join("b.txt"), &lists[1])?;
    let cidr_policy = dir.join("cidr-100k.yaml");
    std::fs::write(&cidr_policy, "version: 1\ningress:\n  deny_files: [a.txt, b.txt]\n")?;

    let (idc_ms, idc) = time_compile(&root.join("policies/idc-default.yaml"), RUNS)?;
    let (cidr_ms, cidr) = time_compile(&cidr_policy, RUNS)?;
    let db = geo_database()?;
    let geo_policy = dir.join("geo-full.yaml");
    std::fs::write(
        &geo_policy,
        format!("version: 1\ningress:\n  geo: {{database: {}, field: country_code, allow_only: [US]}}\n", db.display()),
    )?;
    let (geo_ms, geo) = time_compile(&geo_policy, RUNS)?;
    let geo_ok = geo_ms < 2000.0;
    if json {
        println!(
            "{}",
            serde_json::json!({"idc_default_ms": round2(idc_ms), "cidr_100k_ms": round2(cidr_ms), "geo_full_ms": round2(geo_ms), "geo_entries": geo.entries()})
        );
    } else {
        println!("validate + compile, release build, median of {RUNS} runs\n");
        println!("{:<40} {:>10} {:>12}", "policy", "ms", "entries");
        println!("{:<40} {:>10.2} {:>12}", "policies/idc-default.yaml", idc_ms, idc.entries());
        println!("{:<40} {:>10.2} {:>12}", "100,000 CIDRs from 2 list files", cidr_ms, cidr.entries());
        println!(
            "{:<40} {:>10.2} {:>12}   ({} networks read, {} kept after merging)",
            "geo allow-only over the whole real DB", geo_ms, geo.entries(), geo.geo.networks_read, geo.geo.networks_kept
        );
        println!("\ntarget whole real database < 2 s: {}", if geo_ok { "met" } else { "MISSED" });
    }
    if !geo_ok {
        bail!("the compile target was missed");
    }
    Ok(())
}

/// The real IP-to-country database (`$SMTPGUARD_GEO_DATABASE`, else
/// beside the repository); the benchmarks need the real one.
fn geo_database() -> Result<std::path::PathBuf> {
    smtpguard_tests::hvlab::real_geo_database()
        .context("the real geo database: set SMTPGUARD_GEO_DATABASE or put it at ../shared/data (see its README)")
}

/// Compiled as a reload compiles it (`load_for_reload`).
fn compile_file(path: &std::path::Path) -> Result<smtpguard::policy::Compiled> {
    let (compiled, diags) = smtpguard::policy::load_for_reload(path, &Default::default());
    let Some((_, c)) = compiled else { bail!("{} is not valid:\n{diags}", path.display()) };
    Ok(c)
}

/// Scratch space for generated policies and rule sets, removed on drop.
struct Work(std::path::PathBuf);

impl Work {
    fn new(name: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("smtpguard-bench-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `throughput`: Mpps of each mode and its ratio to the floor.
fn throughput(json: bool) -> Result<()> {
    let work = Work::new("throughput")?;
    let only = std::env::args().skip_while(|a| a != "--only").nth(1);
    eprintln!("throughput: {} SYNs to port 25 per round, median of 3 rounds, fresh namespaces per mode", throughput::PACKETS);
    let modes = throughput::run_all(&work.0, only.as_deref())?;
    let floor = modes.iter().find(|m| m.name == "floor").map(|m| m.mpps);
    let ratio = |m: &throughput::Mode| floor.map(|f| m.mpps / f);
    let get = |name: &str| modes.iter().find(|m| m.name == name);
    let xdp_min = ["smtpguard_xdp_acl", "smtpguard_xdp_rate"].iter().filter_map(|n| get(n)).map(|m| m.mpps).reduce(f64::min);
    let floor_ok = match (xdp_min, floor) {
        (Some(x), Some(f)) => x >= 0.85 * f,
        _ => false,
    };
    let nft_ok = match (xdp_min, get("nft_netdev")) {
        (Some(x), Some(n)) => x >= 3.5 * n.mpps,
        _ => false,
    };
    // The nftables backend's whole policy against the hand-written rules.
    let backend_ratio = match (get("smtpguard_nftables"), get("nft_netdev")) {
        (Some(b), Some(n)) => Some(b.mpps / n.mpps),
        _ => None,
    };
    let backend_ok = backend_ratio.is_some_and(|r| r >= 0.95);
    if json {
        let obj: serde_json::Map<String, serde_json::Value> = modes
            .iter()
            .map(|m| (m.name.to_owned(), serde_json::json!({"mpps": round2(m.mpps), "ratio_to_floor": ratio(m).map(round2), "dropped_share": round2(m.dropped)})))
            .collect();
        println!("{}", serde_json::json!({"packets_per_round": throughput::PACKETS, "modes": obj, "nftables_backend_to_hand_written": backend_ratio.map(round2)}));
    } else {
        println!("SYN flood to port 25 over a veth pair, {} frames per round, median of 3; generator:", throughput::PACKETS);
        println!("XDP redirect under BPF_PROG_TEST_RUN live frames, same CPU as the receiver.");
        println!("Realistic policy: {} deny CIDRs, the whole real geo database, rate limits.\n", throughput::ACL_ENTRIES);
        println!("{:<20} {:>7} {:>9} {:>8}  what", "mode", "Mpps", "vs floor", "dropped");
        for m in &modes {
            let r = ratio(m).map(|r| format!("{r:.2}x")).unwrap_or_default();
            println!("{:<20} {:>7.2} {:>9} {:>7.1}%  {}", m.name, m.mpps, r, m.dropped * 100.0, m.what);
        }
        println!();
        println!("target smtpguard XDP >= 0.85x the floor: {}", if floor_ok { "met" } else { "MISSED" });
        println!("target smtpguard XDP >= 3.5x nftables netdev ingress: {}", if nft_ok { "met" } else { "MISSED" });
        println!(
            "target smtpguard --backend nftables (whole policy) >= 0.95x the hand-written nftables rules: {} ({})",
            if backend_ok { "met" } else { "MISSED" },
            backend_ratio.map(|r| format!("{r:.2}x")).unwrap_or_else(|| "not run".into())
        );
    }
    if only.is_none() && !(floor_ok && nft_ok && backend_ok) {
        bail!("a throughput target was missed");
    }
    Ok(())
}

/// `scale`: per-packet cost, netfilter throughput, load, reload and map
/// memory for 10 to 1,000,000 CIDRs.
fn scale(json: bool) -> Result<()> {
    let work = Work::new("scale")?;
    let sizes: Vec<usize> = match std::env::args().skip_while(|a| a != "--sizes").nth(1) {
        Some(list) => list.split(',').map(|s| s.parse()).collect::<Result<_, _>>().context("--sizes 10,1000")?,
        None => scale::SIZES.to_vec(),
    };
    let (rows, sources_bytes) = scale::run_scale(&work.0, &sizes)?;
    let cost = |n: usize| rows.iter().find(|r| r.size == n).map(|r| r.smtpguard_ns);
    let growth = match (cost(10), cost(1_000_000)) {
        (Some(a), Some(b)) => Some(b / a),
        _ => None,
    };
    let load_1m = rows.iter().find(|r| r.size == 1_000_000).map(|r| r.load_s);
    let geo = scale::run_nft_geo(&work.0)?;
    // The nftables backend's whole policy against the hand-written rules, per size.
    let nft_ratio = rows.iter().map(|r| r.sg_nft_mpps / r.nft_mpps).fold(f64::INFINITY, f64::min);
    let nft_ratio_ok = nft_ratio >= 0.95;
    let geo_ok = geo.load_s < 5.0;
    let growth_ok = growth.is_some_and(|g| g <= 1.3);
    let load_ok = load_1m.is_some_and(|l| l < 2.0);
    let sources_ok = sources_bytes <= 64 << 20;
    if json {
        let sizes: serde_json::Map<String, serde_json::Value> = rows
            .iter()
            .map(|r| {
                let v = serde_json::json!({"smtpguard_ns": round2(r.smtpguard_ns), "floor_ns": round2(r.floor_ns), "nft_mpps": round2(r.nft_mpps),
                    "iptables_mpps": round2(r.iptables_mpps), "load_s": (r.load_s * 1000.0).round() / 1000.0, "reload_s": (r.reload_s * 1000.0).round() / 1000.0, "map_bytes": r.map_bytes,
                    "smtpguard_nftables_mpps": round2(r.sg_nft_mpps), "smtpguard_nftables_load_s": (r.sg_nft_load_s * 1000.0).round() / 1000.0});
                (r.size.to_string(), v)
            })
            .collect();
        println!("{}", serde_json::json!({"sizes": sizes, "tracked_sources_1m_bytes": sources_bytes,
            "nftables_geo": {"networks": geo.networks, "elements": geo.elements, "load_s": (geo.load_s * 1000.0).round() / 1000.0, "kernel_bytes": geo.kernel_bytes},
            "smtpguard_nftables_to_hand_written_min": round2(nft_ratio)}));
    } else {
        println!("random IPv4 deny CIDRs (/8../32, weighted to /16../24). smtpguard: xdp_ingress via BPF_PROG_TEST_RUN,");
        println!("a listed source, mean over 16 sources x 2,000,000 repeats; netfilter: Mpps on veth (one round of 2M);");
        println!("load: compile + install + activate; reload: the same for another set of that size; map bytes: memlock.\n");
        println!(
            "{:>9} {:>10} {:>9} {:>9} {:>10} {:>8} {:>9} {:>12} {:>12} {:>10}",
            "CIDRs", "sg ns/pkt", "floor ns", "nft Mpps", "ipt Mpps", "load s", "reload s", "map bytes", "sg-nft Mpps", "sg-nft load"
        );
        for r in &rows {
            println!(
                "{:>9} {:>10.2} {:>9.2} {:>9.2} {:>10.2} {:>8.3} {:>9.3} {:>12} {:>12.2} {:>9.3}s",
                r.size, r.smtpguard_ns, r.floor_ns, r.nft_mpps, r.iptables_mpps, r.load_s, r.reload_s, r.map_bytes, r.sg_nft_mpps, r.sg_nft_load_s
            );
        }
        println!("(sg-nft: smtpguard --backend nftables, the same policy loaded as one nft transaction; nft: the hand-written interval set)");
        println!(
            "\nnftables backend, the whole real geo database (allow_only: [US]): {} networks read, {} set and map elements, loaded in {:.2} s, \
             {:.1} MiB of kernel memory (MemAvailable, median of 3)",
            geo.networks,
            geo.elements,
            geo.load_s,
            geo.kernel_bytes as f64 / (1 << 20) as f64
        );
        println!("\n1,000,000 tracked sources (SOURCES, capacity 1,000,000): {sources_bytes} bytes ({:.1} MiB)", sources_bytes as f64 / (1 << 20) as f64);
        println!("target cost at 1M <= 1.3x cost at 10: {} ({})", if growth_ok { "met" } else { "MISSED" }, growth.map(|g| format!("{g:.2}x")).unwrap_or("not measured".into()));
        println!("target load of 1,000,000 entries < 2 s: {}", if load_ok { "met" } else { "MISSED" });
        println!("target 1,000,000 sources <= 64 MiB: {}", if sources_ok { "met" } else { "MISSED" });
        println!("target smtpguard --backend nftables >= 0.95x the hand-written nftables at every size: {} (lowest {nft_ratio:.2}x)", if nft_ratio_ok { "met" } else { "MISSED" });
        println!("target the whole geo database into nftables < 5 s: {}", if geo_ok { "met" } else { "MISSED" });
    }
    if sizes == scale::SIZES && !(growth_ok && load_ok && sources_ok && nft_ratio_ok && geo_ok) {
        bail!("a scale target was missed");
    }
    Ok(())
}

/// `reload`: a one-rule edit and a whole swap of a 100,000-entry policy
/// under a flood, with every flood packet's verdict checked.
fn reload(json: bool) -> Result<()> {
    let work = Work::new("reload")?;
    let r = scale::run_reload(&work.0)?;
    let n = scale::run_nft_reload(&work.0)?;
    let nft_ok = n.one_rule_ms < 100.0;
    let ok = r.one_rule_ms < 50.0 && r.misjudged == 0 && nft_ok;
    if json {
        println!(
            "{}",
            serde_json::json!({"one_rule_ms": round2(r.one_rule_ms), "full_swap_ms": round2(r.full_swap_ms), "misjudged": r.misjudged, "judged": r.judged,
                "nftables": {"entries": n.entries, "one_rule_ms": round2(n.one_rule_ms), "full_swap_ms": round2(n.full_swap_ms)}})
        );
    } else {
        println!("policy of {} entries (100,000 random deny CIDRs); median of 5 of each change; each time is", r.entries);
        println!("compile (as a reload does: no warnings) + build of the standby generation's IPv4 arrays,");
        println!("written whole through mmap (IPv6: what differs, batched) + flip. The RCU grace period follows");
        println!("the flip, before the old generation is brought level.\n");
        println!("one-rule edit (deny one /32, and back)   {:>8.2} ms", r.one_rule_ms);
        println!("whole-policy swap (another 100,000)      {:>8.2} ms", r.full_swap_ms);
        println!("flood packets judged during the changes  {:>8}", r.judged);
        println!("judged by neither old nor new policy     {:>8}", r.misjudged);
        println!("\ntarget one-rule change < 50 ms with 0 misjudged: {}", if r.one_rule_ms < 50.0 && r.misjudged == 0 { "met" } else { "MISSED" });
        println!("\nnftables backend, the same {} entries; each time is one `nft -j -f` transaction (policy sets and", n.entries);
        println!("maps flushed and refilled, chains rewritten; bans, meters and counters kept), compile excluded:");
        println!("one-rule edit (deny one /32, and back)   {:>8.2} ms", n.one_rule_ms);
        println!("whole-policy swap (another 100,000)      {:>8.2} ms", n.full_swap_ms);
        println!("target one-rule reload on 100,000 entries < 100 ms: {}", if nft_ok { "met" } else { "MISSED" });
    }
    if !ok {
        bail!("the reload target was missed");
    }
    Ok(())
}

/// `metrics`: the HTTP endpoint with a full source table, against the
/// targets of issue 11: p99 scrape < 20 ms at 20 scrapers, /healthz
/// < 10 ms with 20 idle connections, < 100 ms during a hostile reload.
fn metrics(json: bool) -> Result<()> {
    let f = endpoint::run()?;
    let ok_scrape = f.concurrent.p99 < 20.0;
    let ok_idle = f.health_idle.p99 < 10.0;
    let ok_reload = f.health_reload.max < 100.0;
    let ratio = f.concurrent.p99 / f.single.p50;
    if json {
        println!(
            "{}",
            serde_json::json!({"sources": f.sources, "scrape_bytes": f.scrape_bytes, "single": f.single.json(), "concurrent_20": f.concurrent.json(),
                "health_20_idle": f.health_idle.json(), "health_during_hostile_reload": f.health_reload.json(), "hostile_reload_ms": round2(f.reload_ms),
                "p99_20_over_p50_1": round2(ratio)})
        );
    } else {
        println!("smtpguard run (release) on a veth pair, source table full: {} sources; exposition {} bytes
", f.sources, f.scrape_bytes);
        println!("{:<48} {:>9} {:>9} {:>9} {:>7}", "", "p50 ms", "p99 ms", "max ms", "n");
        for (what, l) in [
            ("/metrics, one scraper", f.single),
            ("/metrics, 20 scrapers at once", f.concurrent),
            ("/healthz, 20 idle connections open", f.health_idle),
            ("/healthz during a hostile reload (8 MiB list)", f.health_reload),
        ] {
            println!("{what:<48} {:>9.2} {:>9.2} {:>9.2} {:>7}", l.p50, l.p99, l.max, l.count);
        }
        println!("
the hostile reload took {:.0} ms to be rejected; the old policy stayed", f.reload_ms);
        println!("p99 with 20 scrapers / p50 with one: {ratio:.2}x");
        println!("target p99 scrape < 20 ms at 20 scrapers: {}", if ok_scrape { "met" } else { "MISSED" });
        println!("target /healthz < 10 ms with 20 idle connections (p99): {}", if ok_idle { "met" } else { "MISSED" });
        println!("target /healthz < 100 ms during a rejected reload (max): {}", if ok_reload { "met" } else { "MISSED" });
    }
    if !(ok_scrape && ok_idle && ok_reload) {
        bail!("a metrics endpoint target was missed");
    }
    Ok(())
}

/// `interfaces`: how soon a new tenant interface is enforced (200 taps
/// created and deleted one after another) and what 500 of them cost the
/// controller beside 1 (issue 14).
fn interfaces(json: bool) -> Result<()> {
    let started = std::time::Instant::now();
    eprintln!("interfaces: {} taps created and deleted under the controller, then its cost with 1 and {} taps", interfaces::TAPS, interfaces::MANY);
    let a = interfaces::attach()?;
    let costs = [interfaces::cost(1)?, interfaces::cost(interfaces::MANY)?];
    let (one, many) = (&costs[0], &costs[1]);
    let seconds = started.elapsed().as_secs_f64();
    // The "enforced within a second" of the interface's creation.
    let attach_ok = a.judged.p99 < interfaces::ATTACH_P99_MS && a.unjudged == 0;
    let startup_ok = many.startup_s < interfaces::START_UP_S;
    let rss_ok = many.rss_bytes < interfaces::RSS_BYTES;
    let pins_ok = a.pins_left == 0;
    let ratio = |f: fn(&interfaces::Cost) -> f64| f(many) / f(one);
    let mb = |b: u64| b as f64 / 1e6;
    if json {
        let cost = |c: &interfaces::Cost| {
            serde_json::json!({"startup_s": round3(c.startup_s), "uplink_attached_s": round3(c.uplink_attached_s), "last_tap_attached_s": round3(c.last_tap_attached_s),
                "rss_bytes": c.rss_bytes, "rss_maps_bytes": c.rss_maps_bytes, "rss_anon_bytes": c.rss_anon_bytes, "peak_bytes": c.peak_bytes, "reload_ms": round2(c.reload_ms),
                "reload_event_ms": round2(c.reload_event_ms), "metrics_ms": round2(c.metrics_ms), "metrics_bytes": c.metrics_bytes,
                "tenant_maps_bytes": c.tenant_maps_bytes, "all_maps_bytes": c.all_maps_bytes})
        };
        println!(
            "{}",
            serde_json::json!({
                "attach": {"taps": a.taps, "probe_timeout_ms": interfaces::PROBE_TIMEOUT.as_millis() as u64, "created": a.created.json(), "ready": a.ready.json(), "ready_alone": a.ready_alone.json(),
                    "attached": a.attached.json(), "judged": a.judged.json(), "deleted": a.deleted.json(), "pin_gone": a.pin_gone.json(), "tcx_attach": a.tcx_attach.json(),
                    "slowest_attach": {"tap": a.slowest_attach.0, "ms": round2(a.slowest_attach.1)}, "unjudged": a.unjudged,
                    "taps_answered": a.taps_answered, "answered": a.answered, "resolution_ms": a.resolution_ms.map(round3), "lost": a.lost,
                    "taps_lost": a.taps_lost, "pins_left": a.pins_left, "seconds": round2(a.seconds)},
                "cost": {"1": cost(one), interfaces::MANY.to_string(): cost(many)},
                "ms_per_tap_at_start": round2((many.last_tap_attached_s - many.uplink_attached_s) / f64::from(interfaces::MANY) * 1e3),
                "ratios": {"startup": round2(ratio(|c| c.startup_s)), "rss": round2(ratio(|c| c.rss_bytes as f64)), "reload": round2(ratio(|c| c.reload_ms)),
                    "metrics_ms": round2(ratio(|c| c.metrics_ms))},
                "seconds": round2(seconds)
            })
        );
    } else {
        println!("smtpguard run --uplink b0 --tenant 'tap*' (release) on a hypervisor in namespaces: each tap a veth pair,");
        println!("tapN on the hypervisor, vmN in a namespace of VMs; the policy denies port 25 to tenants.\n");
        println!("attach: {} taps created and deleted one after another; ms from t0, just before `ip link add`", a.taps);
        println!("{:<64} {:>8} {:>8} {:>8} {:>5}", "", "p50", "p99", "max", "n");
        for (what, l) in [
            ("veth pair created (ip link add returned)", a.created),
            ("both ends addressed and up (2 more ip runs): path ready", a.ready),
            ("controller attached (its \"attached to tapN\" log line)", a.attached),
            ("first judged packet (first dropped probe)", a.judged),
            ("deleted (ip link del returned), from the deletion", a.deleted),
            ("link pin gone, from the deletion", a.pin_gone),
        ] {
            println!("{what:<64} {:>8.2} {:>8.2} {:>8.2} {:>5}", l.p50, l.p99, l.max, l.count);
        }
        for (what, l) in [("the same set-up with no controller running (before it starts)", a.ready_alone), ("kernel's part: tc_ingress attached (TCX) + pinned, in-process", a.tcx_attach)] {
            println!("{what:<64} {:>8.2} {:>8.2} {:>8.2} {:>5}", l.p50, l.p99, l.max, l.count);
        }
        println!("slowest attach: tap{} at {:.2} ms", a.slowest_attach.0, a.slowest_attach.1);
        println!("\nprobes: TCP connects from vmN to tapN:25, each given {} ms; an answered one was not judged.", interfaces::PROBE_TIMEOUT.as_millis());
        match a.resolution_ms {
            Some(r) => println!("{} probe(s) answered before the first judged one, on {} tap(s); resolution (longest such probe) {r:.3} ms", a.answered, a.taps_answered),
            None => println!("no probe was answered: on every tap the first packet that could cross was judged (the attach beat the set-up)"),
        }
        println!("a probe is judged when it times out and TENANT_STATS counts a drop on its tap; {} more after each confirm it.", interfaces::CONFIRMATIONS);
        println!("{} probe(s) on {} tap(s) timed out uncounted (lost by the kernel as the link came up); {} tap(s) never judged within {} s",
            a.lost, a.taps_lost, a.unjudged, interfaces::JUDGED_WITHIN.as_secs());
        println!("\ncontroller cost, started with 1 and with {} taps present", interfaces::MANY);
        println!("{:<58} {:>10} {:>10} {:>7}", "", "1 tap", format!("{} taps", interfaces::MANY), "ratio");
        let row = |what: &str, f: fn(&interfaces::Cost) -> f64, prec: usize| {
            println!("{what:<58} {:>10.prec$} {:>10.prec$} {:>6.2}x", f(one), f(many), f(many) / f(one));
        };
        row("start-up s (spawn to /healthz 200, all attached)", |c| c.startup_s, 3);
        row("  spawn to the uplink attached (load, verify, policy) s", |c| c.uplink_attached_s, 3);
        row("  spawn to the last tap attached s", |c| c.last_tap_attached_s, 3);
        row("VmRSS after start MB", |c| c.rss_bytes as f64 / 1e6, 1);
        row("  of which mmapped BPF maps MB (kernel memory)", |c| c.rss_maps_bytes as f64 / 1e6, 1);
        row("  of which RssAnon MB (heap)", |c| c.rss_anon_bytes as f64 / 1e6, 1);
        row("VmHWM at the end MB", |c| c.peak_bytes as f64 / 1e6, 1);
        row("reload ms (SIGHUP to the next generation on /healthz)", |c| c.reload_ms, 2);
        row("reload ms (the controller's policy_reload event)", |c| c.reload_event_ms, 2);
        row("/metrics GET ms", |c| c.metrics_ms, 2);
        row("/metrics bytes", |c| c.metrics_bytes as f64, 0);
        let per_tap = (many.last_tap_attached_s - many.uplink_attached_s) / f64::from(interfaces::MANY) * 1e3;
        println!("{} taps attached in {:.3} s after the uplink: {per_tap:.1} ms a tap", interfaces::MANY, many.last_tap_attached_s - many.uplink_attached_s);
        println!("\nkernel memory (memlock), reserved at load whatever the taps: tenant maps {:.1} MB, all maps {:.1} MB",
            mb(many.tenant_maps_bytes), mb(many.all_maps_bytes));
        println!("run time {seconds:.0} s (attach part {:.0} s)\n", a.seconds);
        println!("target first judged packet p99 < {} ms, every tap judged: {} ({:.2} ms)", interfaces::ATTACH_P99_MS, if attach_ok { "met" } else { "MISSED" }, a.judged.p99);
        println!("target {} taps start-up < {} s: {} ({:.2} s)", interfaces::MANY, interfaces::START_UP_S, if startup_ok { "met" } else { "MISSED" }, many.startup_s);
        println!("target {} taps VmRSS < {} MB: {} ({:.1} MB)", interfaces::MANY, interfaces::RSS_BYTES / 1_000_000, if rss_ok { "met" } else { "MISSED" }, mb(many.rss_bytes));
        println!("check every deleted tap's link pin gone within {} s: {}", interfaces::PIN_GONE_WITHIN.as_secs(), if pins_ok { "met" } else { "MISSED" });
    }
    if !(attach_ok && startup_ok && rss_ok && pins_ok) {
        bail!("an interfaces target was missed");
    }
    Ok(())
}

/// `fleet`: bans shared through etcd (issue 16): propagation of datapath
/// bans across three hosts, the rate a host publishes its bans at, and
/// 100,000 fleet bans installed into one host at start and by its watch.
fn fleet(json: bool) -> Result<()> {
    use fleetbench::{INSTALLED, INSTALL_S, PROPAGATION_AIM_MS, PROPAGATION_P99_MS, PUBLISHED, SOURCES};
    eprintln!("fleet: 3 hosts and etcd (3 members, then 1) in namespaces; {SOURCES} datapath bans, {PUBLISHED} published at once, 2 x {INSTALLED} installed");
    let f = fleetbench::run()?;
    let (p, publ, restart, watch) = (&f.propagation, &f.publish, &f.restart, &f.watch);
    let propagated_ok = fleetbench::propagated(p) && fleetbench::propagated(&f.propagation_3);
    let published_ok = fleetbench::published(&f);
    let restart_ok = fleetbench::installed(restart);
    let watch_ok = fleetbench::installed(watch);
    let p3 = &f.propagation_3;
    let aim = p.samples.p99 < PROPAGATION_AIM_MS && p3.samples.p99 < PROPAGATION_AIM_MS;
    let opt = |x: Option<f64>| x.map(round3);
    let install = |i: &fleetbench::InstallRun| {
        serde_json::json!({"bans": i.bans, "write_s": round3(i.write_s), "healthz_s": opt(i.healthz_s), "session_s": opt(i.session_s), "first_s": round3(i.first_s),
            "all_s": opt(i.all_s), "missing": i.missing, "rate_per_s": i.rate().round(), "histogram_mean_ms": i.histogram_mean_ms.map(round2)})
    };
    if json {
        let hosts: serde_json::Map<String, serde_json::Value> = p.hosts.iter()
            .map(|h| (h.host.clone(), serde_json::json!({"count": h.count, "mean_ms": round2(h.mean_ms), "within_200ms": round3(h.within_200ms)})))
            .collect();
        let etcd = |e: &fleetbench::EtcdCost| serde_json::json!({"keys": e.keys, "rss_bytes": e.rss_bytes, "db_bytes": e.db_bytes, "db_in_use_bytes": e.db_in_use_bytes});
        println!(
            "{}",
            serde_json::json!({
                "hosts": 3, "etcd_members": 1,
                "propagation": {"bans": p.bans, "samples": p.samples.json(), "to_etcd": p.to_etcd.json(), "from_etcd": p.from_etcd.json(), "flood": p.flood.json(),
                    "missing": p.missing, "connects": p.connects, "host_histograms": hosts, "seconds": round2(p.seconds)},
                "propagation_3_members": {"bans": p3.bans, "samples": p3.samples.json(), "to_etcd": p3.to_etcd.json(), "from_etcd": p3.from_etcd.json(),
                    "flood": p3.flood.json(), "missing": p3.missing, "connects": p3.connects, "seconds": round2(p3.seconds)},
                "publish": {"bans": publ.bans, "local_ms": round2(publ.local_ms), "etcd_first_ms": round2(publ.etcd_first_ms), "etcd_all_ms": publ.etcd_all_ms.map(round2),
                    "etcd_rate_per_s": publ.etcd_rate().round(), "peer_first_ms": round2(publ.peer_first_ms), "peer_all_ms": publ.peer_all_ms.map(round2),
                    "peer_rate_per_s": publ.peer_rate().round(), "peer_gauge_ms": publ.peer_gauge_ms.map(round2), "published_ok": publ.published_ok, "peer_gauge": publ.peer_gauge},
                "costs": {"scan_ms": round3(f.costs.scan_ms), "ways": f.costs.ways, "grace_ms": round3(f.costs.grace_ms)},
                "install": {"at_start": install(restart), "watch": install(watch)},
                "etcd": {"after_propagation": etcd(&f.etcd[0]), "after_publish": etcd(&f.etcd[1]), "end": etcd(&f.etcd[2])},
                "seconds": round2(f.seconds)
            })
        );
    } else {
        println!("3 hosts (release smtpguard run, each in namespaces of its own with its own pins) and etcd 3.4 on tmpfs.\n");
        println!("propagation: {} sources, each flooded with new connections until its host's datapath banned it,", p.bans);
        println!("round-robin over the 3 hosts; ms from the ban seen on its origin (source tables read every ms)");
        println!("{:<56} {:>24} {:>24}", "", "1 etcd member", "3 etcd members");
        println!("{:<56} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>5}", "", "p50", "p99", "max", "p50", "p99", "max", "n");
        for (what, l, l3) in [
            ("banned on another host (2 samples a ban)", p.samples, p3.samples),
            ("  of which: the key in etcd (origin's event, scan, put)", p.to_etcd, p3.to_etcd),
            ("  of which: from etcd to banned there (watch, install)", p.from_etcd, p3.from_etcd),
            ("the flood: first connection to the origin's ban", p.flood, p3.flood),
        ] {
            println!("{what:<56} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>5}", l.p50, l.p99, l.max, l3.p50, l3.p99, l3.max, l.count);
        }
        println!("samples missing (not banned on a host within {} s): {} and {} of {}; connections {} and {}", fleetbench::PROPAGATED_WITHIN.as_secs(), p.missing, p3.missing, 2 * p.bans, p.connects, p3.connects);
        for h in &p.hosts {
            println!("host {}'s smtpguard_fleet_ban_propagation_seconds (origin's scan to install here; 1 member): {} installs, mean {:.2} ms, {:.1}% within 0.2 s",
                h.host, h.count, h.mean_ms, h.within_200ms * 1e2);
        }
        println!("\npublish: {} bans put at once into host a's source table as its datapath would ({:.1} ms), ms from then:", publ.bans, publ.local_ms);
        let all = |x: Option<f64>| x.map(|v| format!("{v:.1}")).unwrap_or_else(|| "never".into());
        println!("{:<40} {:>10} {:>10} {:>12}", "", "first", "all", "bans/s");
        println!("{:<40} {:>10.1} {:>10} {:>12.0}", "in etcd (a published them)", publ.etcd_first_ms, all(publ.etcd_all_ms), publ.etcd_rate());
        println!("{:<40} {:>10.1} {:>10} {:>12.0}", "in host b's table (b installed them)", publ.peer_first_ms, all(publ.peer_all_ms), publ.peer_rate());
        println!("{:<40} {:>10} {:>10}", "on b's smtpguard_fleet_bans gauge", "", all(publ.peer_gauge_ms));
        println!("a's published_total{{ok}} grew by {}; b's smtpguard_fleet_bans gauge by {}", publ.published_ok, publ.peer_gauge);
        println!("the fleet thread's costs (host a's pins, in-process, median of 5): a scan of the whole source table ({} ways) {:.2} ms;", f.costs.ways, f.costs.scan_ms);
        println!("an RCU grace period (membarrier, once per batch of installs that claims ways) {:.2} ms", f.costs.grace_ms);
        println!("\ninstall: {INSTALLED} fleet bans into host c (hosts a and b stopped); s", );
        println!("{:<48} {:>8} {:>9} {:>9} {:>9} {:>10} {:>8}", "", "write", "healthz", "first", "all", "bans/s", "missing");
        let s = |x: Option<f64>| x.map(|v| format!("{v:.3}")).unwrap_or_else(|| "-".into());
        println!("{:<48} {:>8.3} {:>9} {:>9.3} {:>9} {:>10.0} {:>8}", "at start (written, then c spawned; from spawn)", restart.write_s, s(restart.healthz_s), restart.first_s, s(restart.all_s), restart.rate(), restart.missing);
        println!("{:<48} {:>8.3} {:>9} {:>9.3} {:>9} {:>10.0} {:>8}", "watch (written while c runs; from first put)", watch.write_s, "-", watch.first_s, s(watch.all_s), watch.rate(), watch.missing);
        if let Some(sess) = restart.session_s {
            println!("c's fleet session logged \"connected\" (after its full read and install) {sess:.3} s after the spawn");
        }
        if let Some(m) = watch.histogram_mean_ms {
            println!("c's propagation histogram over the watched installs: mean {m:.1} ms from each transaction's write");
        }
        println!("\netcd member: {:>12} {:>12} {:>12}", "keys", "VmRSS MB", "db MB (in use)");
        for (what, e) in [("after propagation", f.etcd[0]), ("after publish", f.etcd[1]), ("end", f.etcd[2])] {
            println!("{what:<18} {:>12} {:>12.1} {:>7.1} ({:.1})", e.keys, e.rss_bytes as f64 / 1e6, e.db_bytes as f64 / 1e6, e.db_in_use_bytes as f64 / 1e6);
        }
        println!("run time {:.0} s\n", f.seconds);
        let m = |ok: bool| if ok { "met" } else { "MISSED" };
        println!("target propagation p99 < {PROPAGATION_P99_MS:.0} ms, every ban on every host: {} ({:.1} ms and {:.1} ms with 3 members, {} missing)",
            m(propagated_ok), p.samples.p99, p3.samples.p99, p.missing + p3.missing);
        println!("aim propagation p99 < {PROPAGATION_AIM_MS:.0} ms: {} ({:.1} ms, {:.1} ms)", if aim { "met" } else { "not met" }, p.samples.p99, p3.samples.p99);
        println!("check all {PUBLISHED} published bans in etcd and on b within 30 s: {}", m(published_ok));
        println!("target {INSTALLED} fleet bans installed at start < {INSTALL_S:.0} s: {} ({})", m(restart_ok), s(restart.all_s));
        println!("target {INSTALLED} fleet bans installed by the watch < {INSTALL_S:.0} s: {} ({})", m(watch_ok), s(watch.all_s));
    }
    if !(propagated_ok && published_ok && restart_ok && watch_ok) {
        bail!("a fleet target was missed");
    }
    Ok(())
}

/// `incident-report`: `smtpguard report` on ~100 MB and ~1 GB of
/// synthetic events (tests/reportbench.rs): throughput and peak RSS.
fn incident_report(json: bool) -> Result<()> {
    let work = Work::new("incident-report")?;
    let smtpguard = smtpguard_tests::smtpguard_bin();
    let mut runs = Vec::new();
    for bytes in reportbench::SIZES {
        eprintln!("incident-report: writing ~{} MB of events, then smtpguard report on it", bytes / 1_000_000);
        runs.push(reportbench::run(&smtpguard, &work.0, bytes)?);
    }
    let bound_ok = runs.iter().all(|r| r.peak_rss_bytes < reportbench::RSS_BOUND);
    let flat = runs[1].peak_rss_bytes as f64 / runs[0].peak_rss_bytes as f64;
    if json {
        let run = |r: &reportbench::Run| {
            serde_json::json!({"bytes": r.truth.bytes, "lines": r.truth.lines, "seconds": round3(r.seconds), "mb_per_s": round2(r.mb_per_s()),
                "lines_per_s": r.lines_per_s().round(), "peak_rss_bytes": r.peak_rss_bytes, "generate_s": round2(r.generate_s)})
        };
        println!("{}", serde_json::json!({"runs": runs.iter().map(run).collect::<Vec<_>>(), "rss_ratio": round2(flat), "rss_bound_bytes": reportbench::RSS_BOUND}));
    } else {
        println!("smtpguard report --format json (release) on synthetic event files: ~2 million distinct sources at 1 GB, 5 heavy hitters,");
        println!("tenant drops, bans, reloads, suspects, unknown kinds, garbage; the file in the page cache (just written).\n");
        println!("{:<28} {:>14} {:>14}", "", "~100 MB", "~1 GB");
        let row = |what: &str, f: &dyn Fn(&reportbench::Run) -> String| println!("{what:<28} {:>14} {:>14}", f(&runs[0]), f(&runs[1]));
        row("file bytes", &|r| r.truth.bytes.to_string());
        row("lines", &|r| r.truth.lines.to_string());
        row("wall time s", &|r| format!("{:.2}", r.seconds));
        row("throughput MB/s", &|r| format!("{:.0}", r.mb_per_s()));
        row("lines/s", &|r| format!("{:.0}", r.lines_per_s()));
        row("peak RSS MiB (ru_maxrss)", &|r| format!("{:.1}", r.peak_rss_bytes as f64 / f64::from(1u32 << 20)));
        row("sources table exact", &|r| r.sources_exact.to_string());
        row("(generating the file s)", &|r| format!("{:.1}", r.generate_s));
        println!("\npeak RSS at 1 GB / at 100 MB: {flat:.2}x");
        println!("check heavy hitters, the compromised tenant and the top ban with exact counts; lines read and skipped: met");
        println!("target peak RSS < {} MiB at both sizes: {}", reportbench::RSS_BOUND >> 20, if bound_ok { "met" } else { "MISSED" });
    }
    if !bound_ok {
        bail!("smtpguard report went over {} MiB", reportbench::RSS_BOUND >> 20);
    }
    Ok(())
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let json = args.iter().any(|a| a == "--json");
    match args.first().map(String::as_str) {
        Some("datapath") => datapath(json),
        Some("compile") => compile(json),
        Some("throughput") => throughput(json),
        Some("scale") => scale(json),
        Some("reload") => reload(json),
        Some("metrics") => metrics(json),
        Some("interfaces") => interfaces(json),
        Some("fleet") => fleet(json),
        Some("incident-report") => incident_report(json),
        Some("render") => match (args.get(1), args.get(2)) {
            (Some(json_dir), Some(docs)) => report::render(std::path::Path::new(json_dir), std::path::Path::new(docs)),
            _ => bail!("usage: smtpguard-bench render JSON_DIR DOCS_DIR"),
        },
        other => bail!("usage: smtpguard-bench datapath|compile|throughput|scale|reload|metrics|interfaces|fleet|incident-report [--json] (got {other:?})"),
    }
}

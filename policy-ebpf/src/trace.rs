//! Flow tracing: one aya-log line describing the decision about each
//! packet of a chosen address, for `smtpguard trace`.
//!
//! Off by default, and then the whole cost is in [`offer`], called once
//! on the pipeline's exit for a parsed TCP segment: one load of the
//! selector's `until_ns` word and a branch. With a selector set, a flow is
//! compared with it (address on either side, family, port); only a
//! matching flow reads the clock (the selector's expiry, which the
//! datapath honours, so a trace whose command was killed stops by itself)
//! and writes a line.
//!
//! The line is written by [`trace_emit`], a global function verified once
//! on its own from a per-CPU job, as the command filter's scan is: the
//! aya-log record builder (a reserve of one of several sizes, a copy per
//! field) inlined at the exit would be walked once per path of the
//! pipeline that reaches it.

use core::net::{Ipv4Addr, Ipv6Addr};

use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::{Array, PerCpuArray},
};
use aya_log_ebpf::debug;
use policy_common::trace::{addr_pair, trace_word, TraceSelector};

use crate::{atomic::Word, decide::now_ns, parse::Flow};

/// Key 0: the selector. Mmapable: `smtpguard trace` stores its words
/// atomically through the mapping. Reader: [`offer`], word by word.
#[map]
static TRACE: Array<TraceSelector> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// A traced decision, as [`trace_emit`] writes it.
#[repr(C, align(8))]
pub struct TraceJob {
    src: [u32; 4],
    dst: [u32; 4],
    sport: u16,
    dport: u16,
    hook: u8,
    direction: u8,
    verdict: u8,
    reason: u8,
    rule: u32,
    country: u32,
    payload_len: u32,
    v6: u8,
    syn: u8,
    reset: u8,
    pad: u8,
}

/// Key 0: the decision being traced. Writer and reader: this module.
#[map]
static TRACE_BUF: PerCpuArray<TraceJob> = PerCpuArray::with_max_entries(1, 0);

/// What the pipeline decided about a packet, for its trace line.
pub struct Decision {
    pub hook: usize,
    pub direction: u8,
    /// `policy_common::verdict`, after monitor mode.
    pub verdict: u8,
    pub reason: u8,
    pub rule: u32,
    pub country: u32,
    /// The dropped segment is answered with a reset.
    pub reset: bool,
}

/// The selector word at byte `OFF`.
#[inline(always)]
fn word<const OFF: usize>(selector: *mut u8) -> u64 {
    // SAFETY: `selector` is the live `TRACE` value, `trace_word::COUNT`
    // aligned words written only by atomic stores; offsets are in bounds.
    unsafe { Word::<OFF>::new(selector) }.load()
}

/// Traces the decision about `flow` if the selector is on and matches it.
#[inline(always)]
pub fn offer(flow: &Flow, decision: &Decision) {
    let Some(selector) = TRACE.get_ptr_mut(0) else { return };
    let selector = selector.cast::<u8>();
    let until = word::<{ 8 * trace_word::UNTIL }>(selector);
    if until == 0 {
        return;
    }
    let addr = (word::<{ 8 * trace_word::ADDR_LO }>(selector), word::<{ 8 * trace_word::ADDR_HI }>(selector));
    let rest = word::<{ 8 * trace_word::MATCH }>(selector);
    let (port, v6) = (rest as u16, (rest >> 16) as u8);
    let hit = v6 == flow.seg.v6 as u8
        && (addr_pair(&flow.src) == addr || addr_pair(&flow.dst) == addr)
        && (port == 0 || port == flow.seg.sport || port == flow.seg.dport);
    if !hit || now_ns() >= until {
        return;
    }
    let Some(j) = TRACE_BUF.get_ptr_mut(0) else { return };
    // SAFETY: per-CPU value, no concurrent user.
    unsafe {
        (*j).src = flow.src;
        (*j).dst = flow.dst;
        (*j).sport = flow.seg.sport;
        (*j).dport = flow.seg.dport;
        (*j).hook = decision.hook as u8;
        (*j).direction = decision.direction;
        (*j).verdict = decision.verdict;
        (*j).reason = decision.reason;
        (*j).rule = decision.rule;
        (*j).country = decision.country;
        (*j).payload_len = flow.payload_len;
        (*j).v6 = flow.seg.v6 as u8;
        (*j).syn = flow.syn as u8;
        (*j).reset = decision.reset as u8;
    }
    trace_emit();
}

/// The job's address words as IPv6 bytes.
#[inline(always)]
fn v6_octets(words: &[u32; 4]) -> [u8; 16] {
    let mut o = [0u8; 16];
    o[..4].copy_from_slice(&words[0].to_ne_bytes());
    o[4..8].copy_from_slice(&words[1].to_ne_bytes());
    o[8..12].copy_from_slice(&words[2].to_ne_bytes());
    o[12..].copy_from_slice(&words[3].to_ne_bytes());
    o
}

/// Writes the job's line to aya-log's ring (`AYA_LOGS`). Numbers only:
/// `smtpguard trace` names the hook, direction, verdict and reason. A
/// global function: verified once, on its own.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn trace_emit() -> u32 {
    let Some(j) = TRACE_BUF.get_ptr(0) else { return 0 };
    // SAFETY: per-CPU value, no concurrent user; written by `offer`.
    let j = unsafe { &*j };
    // One statement per family: an `IpAddr` would leave the other
    // variant's bytes undefined, which LLVM spills and the verifier refuses.
    if j.v6 != 0 {
        let (src, dst) = (Ipv6Addr::from(v6_octets(&j.src)), Ipv6Addr::from(v6_octets(&j.dst)));
        debug!(
            &(),
            "hook={} dir={} src={:i} sport={} dst={:i} dport={} syn={} len={} verdict={} reason={} rule={} country={} reset={}",
            j.hook,
            j.direction,
            src,
            j.sport,
            dst,
            j.dport,
            j.syn,
            j.payload_len,
            j.verdict,
            j.reason,
            j.rule,
            j.country,
            j.reset
        );
    } else {
        let (src, dst) = (Ipv4Addr::from(j.src[0].to_ne_bytes()), Ipv4Addr::from(j.dst[0].to_ne_bytes()));
        debug!(
            &(),
            "hook={} dir={} src={:i} sport={} dst={:i} dport={} syn={} len={} verdict={} reason={} rule={} country={} reset={}",
            j.hook,
            j.direction,
            src,
            j.sport,
            dst,
            j.dport,
            j.syn,
            j.payload_len,
            j.verdict,
            j.reason,
            j.rule,
            j.country,
            j.reset
        );
    }
    0
}

//! The shadow policy (`smtpguard run --shadow`): a candidate judged beside
//! the enforced policy on every packet the latter guards, deciding
//! nothing. Where its decision differs, the packet is counted by
//! (direction, port, both decisions, the candidate's rule), by source, and
//! sampled as an event. The judgement is a global function over a per-CPU
//! job, verified once on its own, and it writes no state the pipeline
//! keeps: bans, rate meters and the command filter's streams are the
//! enforced policy's, which the candidate reads as they are (see
//! docs/operations.md, "Shadow policy", for what that means).

use aya_ebpf::{
    macros::map,
    maps::{LruPerCpuHashMap, PerCpuArray, PerCpuHashMap},
};
use policy_common::{
    event_kind, profile, reason, shadow_total, verdict, Event, ShadowKey, ShadowSource, SHADOW_DIFFS_CAPACITY, SHADOW_SOURCES_CAPACITY,
};

use crate::{acl, config, decide::now_ns, events, parse::Flow};

/// Packets judged differently, by [`ShadowKey`]. Writer: this module;
/// reader: `smtpguard shadow`, metrics; cleared by the controller when
/// the shadow is replaced.
#[map]
static SHADOW_DIFFS: PerCpuHashMap<ShadowKey, u64> = PerCpuHashMap::with_max_entries(SHADOW_DIFFS_CAPACITY, 0);

/// Differences by peer address; an LRU, so the most recently seen are kept.
#[map]
static SHADOW_SOURCES: LruPerCpuHashMap<ShadowSource, u64> = LruPerCpuHashMap::with_max_entries(SHADOW_SOURCES_CAPACITY, 0);

/// `shadow_total` cells.
#[map]
static SHADOW_TOTALS: PerCpuArray<u64> = PerCpuArray::with_max_entries(shadow_total::COUNT, 0);

/// A packet handed to the shadow's judgement.
#[repr(C)]
pub struct ShadowJob {
    src: [u32; 4],
    dst: [u32; 4],
    sport: u16,
    dport: u16,
    v6: u8,
    direction: u8,
    /// The shadow generation.
    generation: u8,
    /// The enforced policy's port slot, verdict (before monitor mode) and reason.
    port_slot: u8,
    verdict: u8,
    reason: u8,
    _pad: [u8; 2],
    rule: u32,
    /// Built here rather than on the stack: the caller's frame is large.
    key: ShadowKey,
    source: ShadowSource,
    event: Event,
}

#[map]
static SHADOW_BUF: PerCpuArray<ShadowJob> = PerCpuArray::with_max_entries(1, 0);

/// Offers a judged packet to the shadow `generation`.
#[inline(always)]
pub fn offer(flow: &Flow, generation: u32, direction: u8, verdict: u8, reason: u8, rule: u32) {
    let Some(j) = SHADOW_BUF.get_ptr_mut(0) else { return };
    // SAFETY: per-CPU value, no concurrent user.
    unsafe {
        (*j).src = flow.src;
        (*j).dst = flow.dst;
        (*j).sport = flow.seg.sport;
        (*j).dport = flow.seg.dport;
        (*j).v6 = flow.seg.v6 as u8;
        (*j).direction = direction;
        (*j).generation = generation as u8;
        (*j).port_slot = flow.port_slot as u8;
        (*j).verdict = verdict;
        (*j).reason = reason;
        (*j).rule = rule;
    }
    shadow_judge_job();
}

#[inline(always)]
fn bump(cell: u32) {
    if let Some(c) = SHADOW_TOTALS.get_ptr_mut(cell) {
        // SAFETY: per-CPU cell.
        unsafe { *c += 1 }
    }
}

/// The candidate's (verdict, reason, rule) for the job.
#[inline(always)]
fn decide(j: &ShadowJob) -> (u8, u8, u32) {
    let Some(policy) = config::policy(j.generation as u32) else { return (verdict::PASS, reason::COUNT as u8, 0) };
    let Some(dp) = policy.direction.get(j.direction as usize & 1) else { return (verdict::PASS, reason::COUNT as u8, 0) };
    let Some(slot) = dp.port_slot(j.dport) else { return (verdict::PASS, reason::COUNT as u8, 0) };
    let acl = acl::lookup_shadow(j.v6 != 0, &j.src, &j.dst, j.generation, j.direction, dp.acl_sides, slot);
    if acl.allow_rule != 0 {
        return (verdict::PASS, reason::ALLOW_ACL, acl.allow_rule);
    }
    // The host's bans: where the enforced policy found the source banned.
    if j.reason == reason::BANNED {
        return (verdict::DROP, reason::BANNED, 0);
    }
    if acl.deny_rule != 0 {
        return (verdict::DROP, reason::DENY_ACL, acl.deny_rule);
    }
    if dp.geo_enabled != 0 && dp.geo_drops(acl.country) {
        return (verdict::DROP, reason::GEO, 0);
    }
    // The rate meter and the command filter are the enforced policy's: the
    // candidate follows their findings where it has them on too.
    let rate = j.reason == reason::RATE_LIMITED || j.reason == reason::RATE_BAN;
    if rate && dp.rate_enabled != 0 {
        return (verdict::DROP, j.reason, 0);
    }
    let filtered = j.reason == reason::SMTP_COMMAND || j.reason == reason::SMTP_OUT_OF_ORDER || j.reason == reason::FRAGMENT;
    if filtered && dp.smtp_block != 0 && *dp.profile.get(slot).unwrap_or(&profile::OTHER) == profile::SMTP {
        return (verdict::DROP, j.reason, 0);
    }
    if *dp.default_verdict.get(slot).unwrap_or(&verdict::PASS) == verdict::DROP {
        (verdict::DROP, reason::DEFAULT_DENY, 0)
    } else {
        (verdict::PASS, reason::DEFAULT_ALLOW, 0)
    }
}

/// The job's judgement. A global function: verified once, on its own.
#[unsafe(no_mangle)]
#[inline(never)]
#[expect(clippy::needless_borrows_for_generic_args, reason = "keys passed where they lie in the job, not copied to a stack shared with the caller's frame")]
pub extern "C" fn shadow_judge_job() -> u32 {
    let Some(j) = SHADOW_BUF.get_ptr_mut(0) else { return 0 };
    // SAFETY: per-CPU value, no concurrent user; written by `offer`.
    let j = unsafe { &mut *j };
    bump(shadow_total::JUDGED + (j.direction as u32 & 1));
    let (v, r, rule) = decide(j);
    if v == j.verdict && r == j.reason {
        return 0;
    }
    j.key = ShadowKey {
        direction: j.direction,
        port_slot: j.port_slot,
        verdict: j.verdict,
        reason: j.reason,
        shadow_verdict: v,
        shadow_reason: r,
        _pad: [0; 2],
        shadow_rule: rule,
    };
    match SHADOW_DIFFS.get_ptr_mut(&j.key) {
        // SAFETY: this CPU's value.
        Some(c) => unsafe { *c += 1 },
        None => {
            if SHADOW_DIFFS.insert(&j.key, &1, 0).is_err() {
                bump(shadow_total::UNKEYED);
            }
        }
    }
    let peer = if j.direction == policy_common::direction::INGRESS { j.src } else { j.dst };
    j.source = ShadowSource { addr: peer, family: if j.v6 != 0 { 6 } else { 4 }, _pad: [0; 3] };
    match SHADOW_SOURCES.get_ptr_mut(&j.source) {
        // SAFETY: this CPU's value.
        Some(c) => unsafe { *c += 1 },
        None => {
            let _ = SHADOW_SOURCES.insert(&j.source, &1, 0);
        }
    }
    let Some(runtime) = config::runtime() else { return 1 };
    let now = now_ns();
    if events::sample_drop(runtime, now) {
        j.event = Event {
            ktime_ns: now,
            kind: event_kind::SHADOW_DIFF,
            direction: j.direction,
            verdict: j.verdict,
            reason: j.reason,
            family: if j.v6 != 0 { 6 } else { 4 },
            port_slot: j.port_slot,
            sport: j.sport,
            dport: j.dport,
            _pad0: [0; 2],
            rule: j.rule,
            count: rule,
            duration_s: v as u32 | (r as u32) << 8,
            strikes: 0,
            country: 0,
            ifindex: 0,
            src: j.src,
            dst: j.dst,
        };
        events::emit(&j.event);
    }
    1
}

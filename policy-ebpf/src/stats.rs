//! Counters, recorded once per counted packet on the single exit path.

use aya_ebpf::{macros::map, maps::PerCpuArray};

use crate::opaque::opaque;
use policy_common::{
    claim_kind, geo_index, rule_hits_index, RULE_HITS_ENTRIES, stats_index, Counter, GEO_DROPS_ENTRIES, STATS_BANS_AUTO, STATS_BANS_ESCALATED, STATS_CLAIMS,
    STATS_ENTRIES, STATS_EVENTS_LOST, STATS_RESETS, STATS_SCAN_TRUNCATED, STATS_SMTP_FLOW_MISSES,
};

/// Key: `stats_index(direction, verdict, reason, port slot)`, plus the
/// events-lost, ban-origin and source-claim cells. Writer: datapath. Reader: controller (sums CPUs).
#[map]
static STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(STATS_ENTRIES, 0);

/// Key: `geo_index(direction, verdict, country)`: drops and would-drops by country.
#[map]
static GEO_DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(GEO_DROPS_ENTRIES, 0);

/// Key: `rule_hits_index(generation, rule id)`: packets each ACL rule
/// decided (allowed or denied), per generation so that a rule id always
/// names the rule of the generation that counted it. Writer: datapath.
/// Reader: controller (folds a generation's counts when it is replaced,
/// then zeroes them), `smtpguard status --rules`.
#[map]
static RULE_HITS: PerCpuArray<u64> = PerCpuArray::with_max_entries(RULE_HITS_ENTRIES, 0);

/// The index goes through `opaque`: the verifier tracks constant array
/// keys exactly, which would make the direction, port slot and reason
/// exact values for the whole pipeline before this call, multiplying
/// its states.
#[inline(always)]
pub fn record(direction: u8, verdict: u8, reason: u8, port_slot: usize, bytes: u32) {
    let index = opaque(stats_index(direction, verdict, reason, port_slot) as u64) as u32;
    if let Some(c) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU cell; programs do not migrate while running.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes as u64;
        }
    }
}

/// Counts a packet the ACL rule `rule` of `generation` decided.
#[inline(always)]
pub fn record_rule_hit(generation: u32, rule: u32) {
    if let Some(c) = RULE_HITS.get_ptr_mut(opaque(rule_hits_index(generation, rule) as u64) as u32) {
        // SAFETY: as in `record`.
        unsafe { *c += 1 }
    }
}

#[inline(always)]
pub fn record_geo_drop(direction: u8, verdict: u8, country: u32) {
    if let Some(c) = GEO_DROPS.get_ptr_mut(opaque(geo_index(direction, verdict, country) as u64) as u32) {
        // SAFETY: as in `record`.
        unsafe { *c += 1 }
    }
}

/// Counts a ban the rate meter started.
#[inline(always)]
pub fn record_ban(escalated: bool) {
    let cell = if escalated { STATS_BANS_ESCALATED } else { STATS_BANS_AUTO };
    if let Some(c) = STATS.get_ptr_mut(cell) {
        // SAFETY: as in `record`.
        unsafe { (*c).packets += 1 }
    }
}

/// Counts a new source given a way in `SOURCES`, by what the way held.
#[inline(always)]
pub fn record_claim(kind: u8) {
    let cell = STATS_CLAIMS + (kind as u32 % claim_kind::COUNT as u32);
    if let Some(c) = STATS.get_ptr_mut(cell) {
        // SAFETY: as in `record`.
        unsafe { (*c).packets += 1 }
    }
}

#[inline(always)]
pub fn record_event_lost() {
    if let Some(c) = STATS.get_ptr_mut(STATS_EVENTS_LOST) {
        // SAFETY: as in `record`.
        unsafe { (*c).packets += 1 }
    }
}

/// Counts a payload segment longer than the command scanner reads.
#[inline(always)]
pub fn record_scan_truncated() {
    if let Some(c) = STATS.get_ptr_mut(STATS_SCAN_TRUNCATED) {
        // SAFETY: as in `record`.
        unsafe { (*c).packets += 1 }
    }
}

/// Counts a payload segment whose flow had no entry in `SMTP_FLOWS`.
#[inline(always)]
pub fn record_smtp_flow_miss() {
    if let Some(c) = STATS.get_ptr_mut(STATS_SMTP_FLOW_MISSES) {
        // SAFETY: as in `record`.
        unsafe { (*c).packets += 1 }
    }
}

/// Counts a reset sent for a dropped segment of an open connection.
#[inline(always)]
pub fn record_reset(direction: u8) {
    if let Some(c) = STATS.get_ptr_mut(STATS_RESETS + (direction as u32 & 1)) {
        // SAFETY: as in `record`.
        unsafe { (*c).packets += 1 }
    }
}

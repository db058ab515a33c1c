//! Tenant interfaces (see `policy_common::tenant`): which interfaces are
//! tenants', what each one sends on guarded ports, and sources behind
//! them that keep hitting the deny. Only `tc_ingress` on a tenant
//! interface counts here; the accounting is a global function over a
//! per-CPU job, verified once on its own.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray},
};
use policy_common::{
    event_kind,
    tenant::{self, SourceKey, SourceState},
    verdict, DirectionPolicy, Event, TENANT_IFACES_CAPACITY, TENANT_SOURCES_CAPACITY, TENANT_STATS_ENTRIES,
};

use crate::{decide::now_ns, events, parse::Flow};

/// Key: ifindex of a tenant interface; value: its slot. Writer:
/// controller, as interfaces come and go.
#[map]
static TENANT_IFACES: HashMap<u32, u32> = HashMap::with_max_entries(TENANT_IFACES_CAPACITY, 0);

/// Key: `tenant::cell(slot, verdict, reason)`. Writer: this module
/// (the controller zeroes a slot before giving it again).
#[map]
static TENANT_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(TENANT_STATS_ENTRIES, 0);

/// Blocked new connections per source behind a tenant interface.
/// Writer: this module. Reader: controller.
#[map]
static TENANT_SOURCES: LruHashMap<SourceKey, SourceState> = LruHashMap::with_max_entries(TENANT_SOURCES_CAPACITY, 0);

#[repr(C, align(8))]
pub struct TenantJob {
    key: SourceKey,
    dst: [u32; 4],
    sport: u16,
    dport: u16,
    direction: u8,
    verdict: u8,
    reason: u8,
    /// A new connection the policy blocked (or would block).
    blocked_syn: u8,
    port_slot: u8,
    pad: [u8; 3],
    threshold: u32,
    window_s: u32,
}

/// Key 0: the packet being accounted. Writer and reader: this module.
#[map]
static TENANT_BUF: PerCpuArray<TenantJob> = PerCpuArray::with_max_entries(1, 0);

/// Did a packet that arrived on `ifindex` pass a tenant hook already?
#[inline(always)]
pub fn judged_on_arrival(ifindex: u32) -> bool {
    // SAFETY: the value is only tested for presence.
    ifindex != 0 && unsafe { TENANT_IFACES.get(ifindex) }.is_some()
}

/// Counts a packet `tc_ingress` judged on `ifindex` (`v` after monitor
/// mode), and a blocked new connection against its source.
#[inline(always)]
pub fn record(ifindex: u32, dir: u8, v: u8, reason: u8, flow: Option<&Flow>, dp: &DirectionPolicy) {
    let Some(j) = TENANT_BUF.get_ptr_mut(0) else { return };
    // SAFETY: per-CPU value, no concurrent user.
    unsafe {
        (*j).key.ifindex = ifindex;
        (*j).direction = dir;
        (*j).verdict = v;
        (*j).reason = reason;
        (*j).blocked_syn = 0;
        if let Some(flow) = flow {
            (*j).key.src = flow.src;
            (*j).key.v6 = flow.seg.v6 as u8;
            (*j).dst = flow.dst;
            (*j).sport = flow.seg.sport;
            (*j).dport = flow.seg.dport;
            (*j).port_slot = flow.port_slot as u8;
            (*j).blocked_syn = (flow.syn && v != verdict::PASS && dp.suspect_blocked != 0) as u8;
            (*j).threshold = dp.suspect_blocked;
            (*j).window_s = dp.suspect_window_s;
        }
    }
    tenant_record_job();
}

/// The job's accounting. A global function: verified once, on its own.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn tenant_record_job() -> u32 {
    let Some(j) = TENANT_BUF.get_ptr(0) else { return 0 };
    // SAFETY: per-CPU value, no concurrent user; written by `record`.
    let j = unsafe { &*j };
    // SAFETY: a plain value read.
    let Some(slot) = (unsafe { TENANT_IFACES.get(j.key.ifindex) }).copied() else { return 0 };
    if slot == 0 || slot > TENANT_IFACES_CAPACITY {
        return 0;
    }
    if let Some(c) = TENANT_STATS.get_ptr_mut(tenant::cell(slot, j.verdict % verdict::COUNT as u8, j.reason % policy_common::reason::COUNT as u8)) {
        // SAFETY: per-CPU cell.
        unsafe { *c += 1 }
    }
    if j.blocked_syn == 0 {
        return 0;
    }
    let now = now_ns();
    let entry = TENANT_SOURCES.get_ptr_mut(j.key);
    // SAFETY: an LRU value of the map's type; CPUs racing on one source
    // can lose a count, which delays a report by one connection.
    let stored = entry.map(|e| unsafe { *e });
    let (state, report) = tenant::on_blocked(stored, (now / 1_000_000_000) as u32, j.threshold, j.window_s);
    match entry {
        // SAFETY: as above.
        Some(e) => unsafe { *e = state },
        None => {
            let _ = TENANT_SOURCES.insert(j.key, state, 0);
        }
    }
    if report {
        events::emit(&Event {
            ktime_ns: now,
            kind: event_kind::TENANT_SUSPECT,
            direction: j.direction,
            verdict: j.verdict,
            reason: j.reason,
            family: if j.key.v6 != 0 { 6 } else { 4 },
            port_slot: j.port_slot,
            sport: j.sport,
            dport: j.dport,
            _pad0: [0; 2],
            rule: 0,
            count: state.blocked,
            duration_s: j.window_s,
            strikes: 0,
            country: 0,
            src: j.key.src,
            dst: j.dst,
            ifindex: j.key.ifindex,
        });
    }
    0
}

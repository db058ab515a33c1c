//! The event ring buffer. Bans are always offered; sampled drops and
//! rate-limit trips pass a per-CPU token bucket first, so a flood cannot
//! turn into an event storm.

use aya_ebpf::{
    helpers::bpf_get_prandom_u32,
    macros::map,
    maps::{PerCpuArray, RingBuf},
};
use policy_common::{Event, EventBudget, EVENTS_BYTES};

use crate::{config::RuntimeView, parse::Flow, stats};

/// Writer: datapath. Reader: controller.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

/// Key 0: this CPU's token bucket for sampled events.
#[map]
static EVENT_BUDGET: PerCpuArray<EventBudget> = PerCpuArray::with_max_entries(1, 0);

const NS_PER_S: u64 = 1_000_000_000;

/// Builds an event about `flow`; callers fill in what is specific.
#[inline(always)]
pub fn about(flow: &Flow, kind: u8, now_ns: u64, direction: u8) -> Event {
    Event {
        ktime_ns: now_ns,
        kind,
        direction,
        verdict: 0,
        reason: 0,
        family: if flow.seg.v6 { 6 } else { 4 },
        port_slot: flow.port_slot as u8,
        sport: flow.seg.sport,
        dport: flow.seg.dport,
        _pad0: [0; 2],
        rule: 0,
        count: 0,
        duration_s: 0,
        strikes: 0,
        country: 0,
        src: flow.src,
        dst: flow.dst,
        ifindex: 0,
    }
}

#[inline(always)]
pub fn emit(event: &Event) {
    if EVENTS.output::<Event>(event, 0).is_err() {
        stats::record_event_lost();
    }
}

/// Spends a token of this CPU's event budget.
#[inline(always)]
pub fn take_budget(runtime: RuntimeView, now_ns: u64) -> bool {
    let rate = runtime.events_per_second() as u64;
    let Some(b) = EVENT_BUDGET.get_ptr_mut(0) else { return false };
    // SAFETY: per-CPU value; programs do not migrate while running.
    let b = unsafe { &mut *b };
    let cap = rate * NS_PER_S;
    // Capping the gap at a second keeps the product in 64 bits (no __multi3).
    let elapsed = now_ns.saturating_sub(b.last_ns);
    let refill = if elapsed > NS_PER_S { NS_PER_S } else { elapsed } * rate;
    b.last_ns = now_ns;
    let tokens = b.tokens.saturating_add(refill);
    b.tokens = if tokens > cap { cap } else { tokens };
    if b.tokens < NS_PER_S {
        return false;
    }
    b.tokens -= NS_PER_S;
    true
}

/// One drop in `drop_sample_one_in` is offered to the budget.
#[inline(always)]
pub fn sample_drop(runtime: RuntimeView, now_ns: u64) -> bool {
    let one_in = runtime.drop_sample_one_in();
    one_in != 0 && unsafe { bpf_get_prandom_u32() } % one_in == 0 && take_budget(runtime, now_ns)
}

//! The decision pipeline for TCP to a guarded port, in the documented
//! order: allow ACL, ban table, deny ACL, geo-fence, new-connection rate,
//! fragments and the SMTP command filter, default action. Every counted packet leaves
//! through [`finish`], which applies monitor mode, records counters and
//! picks, for a dropped segment of an open connection, a reset.

use core::mem::MaybeUninit;

use aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns;
use policy_common::{
    event_kind, hook, mode, profile, reason, verdict, DirectionPolicy, PORT_SLOT_UNKNOWN,
};

use crate::{
    acl,
    config::{self, RuntimeView},
    events,
    frame::Frame,
    parse::{self, outcome, Flow, Ports, Segment, PULL_LEN},
    reset, smtp,
    tenants,
    sources::{self, BanCheck, SynOutcome},
    stats, trace,
};

/// What the hook does with the frame (the counters say why, in
/// `policy_common::verdict` and `reason`).
pub enum Exit {
    Pass,
    Drop,
    /// Drop, and answer the sender with a reset (`reset::prepare` has
    /// noted the segment).
    Reset,
}

/// What the pipeline decided, before monitor mode: a
/// `policy_common::verdict` (`PASS` or `DROP`) and why.
struct Decision {
    verdict: u8,
    reason: u8,
    rule: u32,
    country: u32,
}

impl Decision {
    #[inline(always)]
    const fn new(verdict: u8, reason: u8) -> Self {
        Self { verdict, reason, rule: 0, country: 0 }
    }
}

/// The kernel clock the datapath keeps time by. The coarse clock (tick
/// resolution) costs a few loads; rates and bans need no more precision.
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Where parsing stopped, once the packet is known to concern us: an
/// [`outcome`] and the port slot when known. The flow, when parsed, is
/// written into the caller's.
struct Parsed {
    outcome: u8,
    port_slot: usize,
}

/// `None`: TCP to a port this direction does not guard.
#[inline(always)]
fn parse<F: Frame>(frame: &F, ports: Ports, dp: &DirectionPolicy, flow: &mut MaybeUninit<Flow>) -> Option<Parsed> {
    if ports.outcome != outcome::TCP {
        return Some(Parsed { outcome: ports.outcome, port_slot: PORT_SLOT_UNKNOWN });
    }
    let port_slot = dp.port_slot(ports.seg.dport)?;
    let outcome = parse::rest(frame, ports.seg, port_slot, flow);
    Some(Parsed { outcome, port_slot })
}

/// [`parse`] for a frame [`parse::plain`] answered with `port`.
#[inline(always)]
fn parse_plain<F: Frame>(frame: &F, port: u16, dp: &DirectionPolicy, flow: &mut MaybeUninit<Flow>) -> Option<Parsed> {
    let port_slot = dp.port_slot(port)?;
    let outcome = parse::plain_flow(frame, port_slot, flow);
    if outcome == outcome::SHORT {
        return parse(frame, parse::ports(frame), dp, flow);
    }
    Some(Parsed { outcome, port_slot })
}

#[inline(always)]
pub fn judge<F: Frame>(frame: &F, hook: usize) -> Exit {
    // Non-TCP leaves before any map is touched, TCP to a port no policy
    // guards after one word of configuration; the common frame takes a
    // shortcut to both exits.
    let plain = parse::plain(frame);
    if plain == parse::plain::NOT_TCP {
        return Exit::Pass;
    }
    // Its own lookup, so nothing of it has to live on past this exit.
    if plain < parse::plain::NOT_TCP && !config::runtime().is_some_and(|r| r.may_guard(plain as u16)) {
        return Exit::Pass;
    }
    let Some(runtime) = config::runtime() else { return Exit::Pass };
    let plain_port = plain < parse::plain::NOT_TCP;
    // A plain frame's port passed the filter above; its headers are read
    // once the port is known to be guarded.
    let ports = if plain_port { Ports { outcome: outcome::TCP, seg: Segment::NONE } } else { parse::ports(frame) };
    if ports.outcome == outcome::NOT_TCP {
        return Exit::Pass;
    }
    if !plain_port && ports.outcome == outcome::TCP && !runtime.may_guard(ports.seg.dport) {
        return Exit::Pass;
    }
    // Forwarded from a tenant interface: judged (and counted) there.
    if hook == hook::TC_EGRESS && tenants::judged_on_arrival(frame.arrived_on()) {
        return Exit::Pass;
    }
    // Read the generation once: every later step must use this value, or a
    // flip in between would judge the packet by two policies at once.
    let generation = runtime.active();
    let Some(policy) = config::policy(generation) else { return Exit::Pass };
    let dir = runtime.hook_direction(hook);
    let Some(dp) = policy.direction.get(dir as usize) else { return Exit::Pass };

    // Written by the parse only for TCP, and read only then.
    let mut flow = MaybeUninit::<Flow>::uninit();
    let parsed = if plain_port { parse_plain(frame, plain as u16, dp, &mut flow) } else { parse(frame, ports, dp, &mut flow) };
    let Some(mut parsed) = parsed else { return Exit::Pass };
    if parsed.outcome == outcome::SHORT && frame.pull(PULL_LEN) {
        let Some(again) = parse(frame, parse::ports(frame), dp, &mut flow) else { return Exit::Pass };
        parsed = again;
    }
    let bytes = frame.wire_len();
    let port_slot = parsed.port_slot;
    match parsed.outcome {
        outcome::TCP => {
            // SAFETY: the TCP outcome is only returned after the flow was written.
            let flow = unsafe { flow.assume_init_ref() };
            let decision = pipeline(frame, runtime, generation, dp, dir, flow);
            // No shadow: the check is a shift of a word already loaded.
            let shadow = runtime.shadow();
            if shadow != 0 {
                crate::shadow::offer(flow, shadow, dir, decision.verdict, decision.reason, decision.rule);
            }
            finish(frame, runtime, dp, hook, dir, Some(flow), port_slot, bytes, decision)
        }
        outcome::FRAGMENT => {
            finish(frame, runtime, dp, hook, dir, None, port_slot, bytes, Decision::new(verdict::PASS, reason::FRAGMENT))
        }
        // Malformed, or still short after a pull: the frame ends inside its headers.
        _ => finish(frame, runtime, dp, hook, dir, None, port_slot, bytes, Decision::new(dp.malformed_verdict, reason::MALFORMED)),
    }
}

#[inline(always)]
fn pipeline<F: Frame>(frame: &F, runtime: RuntimeView, generation: u32, dp: &DirectionPolicy, dir: u8, flow: &Flow) -> Decision {
    let acl = acl::lookup(flow, generation as u8, dir, dp.acl_sides);
    if acl.allow_rule != 0 {
        stats::record_rule_hit(generation, acl.allow_rule);
        return Decision { rule: acl.allow_rule, ..Decision::new(verdict::PASS, reason::ALLOW_ACL) };
    }

    let now_ns = now_ns();
    let mut source = sources::locate(flow, runtime.source_sets());
    if runtime.cidr_bans() && sources::network_banned(flow, now_ns) {
        return Decision::new(verdict::DROP, reason::BANNED);
    }
    match sources::check_ban(&source, now_ns) {
        BanCheck::Banned => return Decision::new(verdict::DROP, reason::BANNED),
        BanCheck::Expired => events::emit(&events::about(flow, event_kind::BAN_EXPIRED, now_ns, dir)),
        BanCheck::Clear => {}
    }

    if acl.deny_rule != 0 {
        stats::record_rule_hit(generation, acl.deny_rule);
        return Decision { rule: acl.deny_rule, country: acl.country, ..Decision::new(verdict::DROP, reason::DENY_ACL) };
    }

    if dp.geo_enabled != 0 && dp.geo_drops(acl.country) {
        return Decision { country: acl.country, ..Decision::new(verdict::DROP, reason::GEO) };
    }

    if dp.rate_enabled != 0 && flow.syn {
        match sources::on_syn(&mut source, dp, now_ns) {
            SynOutcome::Admitted => {}
            SynOutcome::Limited { trip } => {
                if trip && events::take_budget(runtime, now_ns) {
                    let mut e = events::about(flow, event_kind::RATE_TRIP, now_ns, dir);
                    e.reason = reason::RATE_LIMITED;
                    e.verdict = drop_verdict(dp);
                    events::emit(&e);
                }
                return Decision::new(verdict::DROP, reason::RATE_LIMITED);
            }
            SynOutcome::BanStarted { count, duration_s, strikes } => {
                stats::record_ban(strikes > 1);
                let mut e = events::about(flow, event_kind::BAN_ADDED, now_ns, dir);
                e.reason = reason::RATE_BAN;
                e.verdict = drop_verdict(dp);
                e.count = count;
                e.duration_s = duration_s;
                e.strikes = strikes as u16;
                events::emit(&e);
                return Decision::new(verdict::DROP, reason::RATE_BAN);
            }
            SynOutcome::Banned => return Decision::new(verdict::DROP, reason::BANNED),
        }
    }

    let slot_profile = *dp.profile.get(flow.port_slot).unwrap_or(&profile::OTHER);
    let default_verdict = *dp.default_verdict.get(flow.port_slot).unwrap_or(&verdict::PASS);
    // The command filter cannot read a fragmented segment: its later
    // fragments carry no ports. Dropping the first keeps the host from
    // reassembling any of it. (Where the default drops, it says why.)
    if slot_profile == profile::SMTP
        && dp.smtp_block != 0
        && flow.seg.first_fragment
        && dp.fragment_verdict == verdict::DROP
        && default_verdict != verdict::DROP
    {
        return Decision::new(verdict::DROP, reason::FRAGMENT);
    }
    if slot_profile == profile::SMTP && dp.smtp_block != 0 {
        let why = smtp::judge(frame, flow, dp.smtp_block, monitoring(dp));
        if why != smtp::CLEAN {
            return Decision::new(verdict::DROP, why as u8);
        }
    }

    if default_verdict == verdict::DROP {
        Decision::new(verdict::DROP, reason::DEFAULT_DENY)
    } else {
        Decision::new(verdict::PASS, reason::DEFAULT_ALLOW)
    }
}

/// Monitor mode: the direction's, or every direction's while bypassed.
#[inline(always)]
fn monitoring(dp: &DirectionPolicy) -> bool {
    dp.mode == mode::MONITOR || config::bypassed()
}

#[inline(always)]
fn drop_verdict(dp: &DirectionPolicy) -> u8 {
    if monitoring(dp) {
        verdict::WOULD_DROP
    } else {
        verdict::DROP
    }
}

/// The one exit for counted packets. A parsed segment's decision is
/// offered to the flow trace (one word's load while tracing is off); on
/// a tenant interface the packet is counted per interface.
#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "inlined: the pipeline's state, passed as it is")]
fn finish<F: Frame>(
    frame: &F,
    runtime: RuntimeView,
    dp: &DirectionPolicy,
    hook: usize,
    dir: u8,
    flow: Option<&Flow>,
    port_slot: usize,
    bytes: u32,
    decision: Decision,
) -> Exit {
    let v = if decision.verdict == verdict::DROP { drop_verdict(dp) } else { verdict::PASS };
    let out = settle(runtime, dp, dir, flow, port_slot, bytes, &decision, v);
    // Only a tenant interface's hook counts per interface.
    if hook == hook::TC_INGRESS {
        tenants::record(frame.ifindex(), dir, v, decision.reason, flow, dp);
    }
    if let Some(flow) = flow {
        let decision = trace::Decision {
            hook,
            direction: dir,
            verdict: v,
            reason: decision.reason,
            rule: decision.rule,
            country: decision.country,
            reset: matches!(out, Exit::Reset),
        };
        trace::offer(flow, &decision);
    }
    out
}

/// Monitor mode, counters, sampled events and the reset: the verdict `v`
/// (after monitor mode) as the hook returns it.
#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "inlined: the pipeline's state, passed as it is")]
fn settle(
    runtime: RuntimeView,
    dp: &DirectionPolicy,
    dir: u8,
    flow: Option<&Flow>,
    port_slot: usize,
    bytes: u32,
    decision: &Decision,
    v: u8,
) -> Exit {
    stats::record(dir, v, decision.reason, port_slot, bytes);
    if v == verdict::PASS {
        return Exit::Pass;
    }
    if decision.reason == reason::GEO {
        stats::record_geo_drop(dir, v, decision.country);
    }
    if let Some(flow) = flow {
        if runtime.drop_sample_one_in() != 0 {
            let now_ns = now_ns();
            if events::sample_drop(runtime, now_ns) {
                let mut e = events::about(flow, event_kind::DROP_SAMPLE, now_ns, dir);
                e.verdict = v;
                e.reason = decision.reason;
                e.rule = decision.rule;
                e.country = decision.country as u16;
                events::emit(&e);
            }
        }
    }
    if v != verdict::DROP {
        return Exit::Pass;
    }
    // A segment of an open connection the policy now denies.
    if let Some(flow) = flow {
        if !flow.syn && dp.established_reset != 0 && policy_common::reset_worthy(decision.reason) {
            reset::prepare(flow, dir);
            return Exit::Reset;
        }
    }
    Exit::Drop
}

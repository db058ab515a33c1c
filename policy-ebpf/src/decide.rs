//! The decision pipeline for TCP to a guarded port, in the documented
//! order: allow ACL, ban table, deny ACL, geo-fence, new-connection rate,
//! fragments and the SMTP command filter, default action. Every counted packet leaves
//! through [`finish`], which applies monitor mode, records counters and
//! picks, for a dropped segment of an open connection, a reset.

use core::mem::MaybeUninit;

use aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns;
use policy_common::{
    action, event_kind, hook, mode, profile, reason, verdict, DirectionPolicy, PORT_SLOT_UNKNOWN,
};

use crate::{
    acl,
    config::{self, RuntimeView},
    events,
    frame::Frame,
    parse::{self, outcome, Flow, Ports, Segment, PULL_LEN},
    reset, smtp,
    sources::{self, BanCheck, SynOutcome},
    stats, trace,
};

pub enum Verdict {
    Pass,
    Drop,
    /// Drop, and answer the sender with a reset (`reset::prepare` has
    /// noted the segment).
    Reset,
}

/// What the pipeline decided, before monitor mode.
struct Outcome {
    action: u8,
    reason: u8,
    rule: u32,
    country: u32,
}

impl Outcome {
    #[inline(always)]
    const fn new(action: u8, reason: u8) -> Self {
        Self { action, reason, rule: 0, country: 0 }
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
pub fn judge<F: Frame>(frame: &F, hook: usize) -> Verdict {
    // Non-TCP leaves before any map is touched, TCP to a port no policy
    // guards after one word of configuration; the common frame takes a
    // shortcut to both exits.
    let plain = parse::plain(frame);
    if plain == parse::plain::NOT_TCP {
        return Verdict::Pass;
    }
    // Its own lookup, so nothing of it has to live on past this exit.
    if plain < parse::plain::NOT_TCP && !config::runtime().is_some_and(|r| r.may_guard(plain as u16)) {
        return Verdict::Pass;
    }
    let Some(runtime) = config::runtime() else { return Verdict::Pass };
    let plain_port = plain < parse::plain::NOT_TCP;
    // A plain frame's port passed the filter above; its headers are read
    // once the port is known to be guarded.
    let ports = if plain_port { Ports { outcome: outcome::TCP, seg: Segment::NONE } } else { parse::ports(frame) };
    if ports.outcome == outcome::NOT_TCP {
        return Verdict::Pass;
    }
    if !plain_port && ports.outcome == outcome::TCP && !runtime.may_guard(ports.seg.dport) {
        return Verdict::Pass;
    }
    // Forwarded from a tenant interface: judged (and counted) there.
    if hook == hook::TC_EGRESS && config::judged_on_arrival(frame.arrived_on()) {
        return Verdict::Pass;
    }
    // Read the generation once: every later step must use this value, or a
    // flip in between would judge the packet by two policies at once.
    let generation = runtime.active();
    let Some(policy) = config::policy(generation) else { return Verdict::Pass };
    let dir = runtime.hook_direction(hook);
    let Some(dp) = policy.direction.get(dir as usize) else { return Verdict::Pass };

    // Written by the parse only for TCP, and read only then.
    let mut flow = MaybeUninit::<Flow>::uninit();
    let parsed = if plain_port { parse_plain(frame, plain as u16, dp, &mut flow) } else { parse(frame, ports, dp, &mut flow) };
    let Some(mut parsed) = parsed else { return Verdict::Pass };
    if parsed.outcome == outcome::SHORT && frame.pull(PULL_LEN) {
        let Some(again) = parse(frame, parse::ports(frame), dp, &mut flow) else { return Verdict::Pass };
        parsed = again;
    }
    let bytes = frame.wire_len();
    let port_slot = parsed.port_slot;
    match parsed.outcome {
        outcome::TCP => {
            // SAFETY: the TCP outcome is only returned after the flow was written.
            let flow = unsafe { flow.assume_init_ref() };
            let outcome = pipeline(frame, runtime, generation, dp, dir, flow);
            finish(runtime, dp, hook, dir, Some(flow), port_slot, bytes, outcome)
        }
        outcome::FRAGMENT => {
            finish(runtime, dp, hook, dir, None, port_slot, bytes, Outcome::new(action::PASS, reason::FRAGMENT))
        }
        // Malformed, or still short after a pull: the frame ends inside its headers.
        _ => finish(runtime, dp, hook, dir, None, port_slot, bytes, Outcome::new(dp.malformed_action, reason::MALFORMED)),
    }
}

#[inline(always)]
fn pipeline<F: Frame>(frame: &F, runtime: RuntimeView, generation: u32, dp: &DirectionPolicy, dir: u8, flow: &Flow) -> Outcome {
    let acl = acl::lookup(flow, generation as u8, dir, dp.acl_sides);
    if acl.allow_rule != 0 {
        return Outcome { rule: acl.allow_rule, ..Outcome::new(action::PASS, reason::ALLOW_ACL) };
    }

    let now_ns = now_ns();
    let mut source = sources::locate(flow, runtime.source_sets());
    if runtime.cidr_bans() && sources::network_banned(flow, now_ns) {
        return Outcome::new(action::DROP, reason::BANNED);
    }
    match sources::check_ban(&source, now_ns) {
        BanCheck::Banned => return Outcome::new(action::DROP, reason::BANNED),
        BanCheck::Expired => events::emit(&events::about(flow, event_kind::BAN_EXPIRED, now_ns, dir)),
        BanCheck::Clear => {}
    }

    if acl.deny_rule != 0 {
        return Outcome { rule: acl.deny_rule, country: acl.country, ..Outcome::new(action::DROP, reason::DENY_ACL) };
    }

    if dp.geo_enabled != 0 && dp.geo_drops(acl.country) {
        return Outcome { country: acl.country, ..Outcome::new(action::DROP, reason::GEO) };
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
                return Outcome::new(action::DROP, reason::RATE_LIMITED);
            }
            SynOutcome::BanStarted { count, duration_s, strikes } => {
                stats::record_ban(strikes > 1);
                let mut e = events::about(flow, event_kind::BAN_ADDED, now_ns, dir);
                e.reason = reason::RATE_BAN;
                e.verdict = drop_verdict(dp);
                e.count = count;
                e.duration_s = duration_s;
                e.strikes = strikes;
                events::emit(&e);
                return Outcome::new(action::DROP, reason::RATE_BAN);
            }
            SynOutcome::Banned => return Outcome::new(action::DROP, reason::BANNED),
        }
    }

    let slot_profile = *dp.profile.get(flow.port_slot).unwrap_or(&profile::OTHER);
    let default_action = *dp.default_action.get(flow.port_slot).unwrap_or(&action::PASS);
    // The command filter cannot read a fragmented segment: its later
    // fragments carry no ports. Dropping the first keeps the host from
    // reassembling any of it. (Where the default drops, it says why.)
    if slot_profile == profile::SMTP
        && dp.smtp_block != 0
        && flow.seg.first_fragment
        && dp.smtp_fragment_action == action::DROP
        && default_action != action::DROP
    {
        return Outcome::new(action::DROP, reason::FRAGMENT);
    }
    if slot_profile == profile::SMTP && dp.smtp_block != 0 {
        let why = smtp::judge(frame, flow, dp.smtp_block, dp.mode == mode::MONITOR);
        if why != smtp::CLEAN {
            return Outcome::new(action::DROP, why as u8);
        }
    }

    if default_action == action::DROP {
        Outcome::new(action::DROP, reason::DEFAULT_DENY)
    } else {
        Outcome::new(action::PASS, reason::DEFAULT_ALLOW)
    }
}

#[inline(always)]
fn drop_verdict(dp: &DirectionPolicy) -> u8 {
    if dp.mode == mode::MONITOR {
        verdict::WOULD_DROP
    } else {
        verdict::DROP
    }
}

/// The one exit for counted packets. A parsed segment's decision is
/// offered to the flow trace (one word's load while tracing is off).
#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "inlined: the pipeline's state, passed as it is")]
fn finish(
    runtime: RuntimeView,
    dp: &DirectionPolicy,
    hook: usize,
    dir: u8,
    flow: Option<&Flow>,
    port_slot: usize,
    bytes: u32,
    outcome: Outcome,
) -> Verdict {
    let v = if outcome.action == action::DROP { drop_verdict(dp) } else { verdict::PASS };
    let out = settle(runtime, dp, dir, flow, port_slot, bytes, &outcome, v);
    if let Some(flow) = flow {
        let decision = trace::Decision {
            hook,
            direction: dir,
            verdict: v,
            reason: outcome.reason,
            rule: outcome.rule,
            country: outcome.country,
            reset: matches!(out, Verdict::Reset),
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
    outcome: &Outcome,
    v: u8,
) -> Verdict {
    stats::record(dir, v, outcome.reason, port_slot, bytes);
    if v == verdict::PASS {
        return Verdict::Pass;
    }
    if outcome.reason == reason::GEO {
        stats::record_geo_drop(dir, v, outcome.country);
    }
    if let Some(flow) = flow {
        if runtime.drop_sample_one_in() != 0 {
            let now_ns = now_ns();
            if events::sample_drop(runtime, now_ns) {
                let mut e = events::about(flow, event_kind::DROP_SAMPLE, now_ns, dir);
                e.verdict = v;
                e.reason = outcome.reason;
                e.rule = outcome.rule;
                e.country = outcome.country;
                events::emit(&e);
            }
        }
    }
    if v != verdict::DROP {
        return Verdict::Pass;
    }
    // A segment of an open connection the policy now denies.
    if let Some(flow) = flow {
        if !flow.syn && dp.established_reset != 0 && policy_common::reset_worthy(outcome.reason) {
            reset::prepare(flow, dir);
            return Verdict::Reset;
        }
    }
    Verdict::Drop
}

//! Kernel verdict tests: every case of one table runs through `xdp_ingress`,
//! `tc_ingress` and `tc_egress` with BPF_PROG_TEST_RUN, in IPv4 and IPv6,
//! with no VLAN tag, one 802.1Q tag and an 802.1ad + 802.1Q pair. Each case
//! sets up map contents and states the verdict, the one counter cell that
//! must move (or none) and, where it matters, what the maps hold after.

use std::net::IpAddr;

use policy_common::{
    direction, event_kind, geo_index, mode, reason, side, smtp_command,
    smtp_flow::{self, SmtpFlowKey, SmtpFlowState},
    smtp_scan,
    source::{ban_origin, slot_flag, SlotInfo, SourceSlot},
    stats_index, verdict, DirectionPolicy, PolicyConfig, PORT_SLOT_UNKNOWN,
};
use smtpguard::{clock::ktime_now_ns, dataplane::Hook};
use smtpguard_tests::{
    fixtures::{self, base_policy, ends, entry, entry_all_ports, seed, Harness, NS_PER_S},
    packet::{arp_frame, read_tcp, Ext, ReadTcp, TcpFrame, ACK, FIN, PSH, RST, SYN, TPID_8021AD, TPID_8021Q},
    require_root,
};

/// What the counters must show after the packet.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Expect {
    /// Not SMTP: passes and no counter moves.
    Uncounted,
    Counted { verdict: u8, reason: u8, slot: usize },
    /// Dropped for `reason` and answered with a reset to the sender.
    Reset { reason: u8, slot: usize },
}

const fn counted(verdict: u8, reason: u8, slot: usize) -> Expect {
    Expect::Counted { verdict, reason, slot }
}

type Setup = Box<dyn Fn(&mut Harness, &mut PolicyConfig) -> anyhow::Result<()>>;
type Check = Box<dyn Fn(&mut Harness) -> anyhow::Result<()>>;

struct Case {
    name: String,
    dir: u8,
    frame: Vec<u8>,
    setup: Setup,
    expect: Expect,
    after: Option<Check>,
}

fn no_setup() -> Setup {
    Box::new(|_, _| Ok(()))
}

fn dp_mut(p: &mut PolicyConfig, dir: u8) -> &mut DirectionPolicy {
    &mut p.direction[dir as usize]
}

/// The L2 variants every family-specific case runs in.
fn l2_variants() -> [(&'static str, Vec<(u16, u16)>); 3] {
    [("untagged", vec![]), ("802.1Q", vec![(TPID_8021Q, 100)]), ("QinQ", vec![(TPID_8021AD, 10), (TPID_8021Q, 100)])]
}

struct Variant {
    v6: bool,
    vlans: Vec<(u16, u16)>,
    label: String,
}

impl Variant {
    fn frame(&self, dir: u8, dport: u16, flags: u8) -> TcpFrame {
        let e = ends(dir, self.v6);
        let mut f = TcpFrame::new(e.src, e.dst, dport, flags);
        f.vlans = self.vlans.clone();
        f
    }
}

/// Cases that only depend on the pipeline, repeated in every variant.
fn pipeline_cases(v: &Variant) -> Vec<Case> {
    use direction::{EGRESS as EG, INGRESS as IN};
    let syn = |dir, port| v.frame(dir, port, SYN).build();
    let data = |dir, port, payload: &[u8]| v.frame(dir, port, ACK | PSH).payload(payload).build();
    let ing = ends(IN, v.v6);
    let eg = ends(EG, v.v6);
    let host_len = if v.v6 { 128 } else { 32 };
    let net_len = if v.v6 { 48 } else { 24 };
    let mut cases = Vec::new();
    let mut add = |name: &str, dir: u8, frame: Vec<u8>, setup: Setup, expect: Expect, after: Option<Check>| {
        cases.push(Case { name: format!("{name} [{}]", v.label), dir, frame, setup, expect, after });
    };

    add("UDP to port 25 is not ours", IN, v.frame(IN, 25, 0).protocol(17).build(), no_setup(), Expect::Uncounted, None);
    add("TCP to port 80 is not ours", IN, syn(IN, 80), no_setup(), Expect::Uncounted, None);
    // 281 & 255 == 25: past the port filter, the policy itself says no.
    add("TCP to port 281 is not ours either", IN, syn(IN, 281), no_setup(), Expect::Uncounted, None);
    add("reply from a server's port 25 is not ours", IN, v.frame(IN, 40_000, ACK).sport(25).build(), no_setup(), Expect::Uncounted, None);
    add(
        "unguarded policy lets port 25 through uncounted",
        EG,
        syn(EG, 25),
        Box::new(|_, p| {
            p.direction[EG as usize] = fixtures::unguarded();
            Ok(())
        }),
        Expect::Uncounted,
        None,
    );
    add("ingress SYN to 25 takes the default allow", IN, syn(IN, 25), no_setup(), counted(verdict::PASS, reason::DEFAULT_ALLOW, 0), None);
    add("egress SYN to 25 takes the default deny", EG, syn(EG, 25), no_setup(), counted(verdict::DROP, reason::DEFAULT_DENY, 0), None);
    add("egress SYN to 465 takes the default allow", EG, syn(EG, 465), no_setup(), counted(verdict::PASS, reason::DEFAULT_ALLOW, 1), None);
    add("egress SYN to 587 takes the default allow", EG, syn(EG, 587), no_setup(), counted(verdict::PASS, reason::DEFAULT_ALLOW, 2), None);
    add("egress data to 25 takes the default deny", EG, data(EG, 25, b"MAIL FROM:<a@b>\r\n"), no_setup(), counted(verdict::DROP, reason::DEFAULT_DENY, 0), None);

    add(
        "peer allow beats a ban and a deny on the same prefix",
        IN,
        syn(IN, 25),
        Box::new(move |h, _| {
            h.add_acl(IN, side::PEER, ing.src, net_len, entry_all_ports(11, 22, fixtures::BLOCKED_COUNTRY))?;
            h.seed_source(ing.src, seed::banned_for(600))?;
            Ok(())
        }),
        counted(verdict::PASS, reason::ALLOW_ACL, 0),
        None,
    );
    add(
        "local allow (tenant exemption) beats the egress default deny",
        EG,
        syn(EG, 25),
        Box::new(move |h, _| h.add_acl(EG, side::LOCAL, eg.src, host_len, entry(0, 11, 0, 0)).map_err(Into::into)),
        counted(verdict::PASS, reason::ALLOW_ACL, 0),
        None,
    );
    add(
        "peer allow (approved relay) beats the egress default deny",
        EG,
        syn(EG, 25),
        Box::new(move |h, _| h.add_acl(EG, side::PEER, eg.dst, host_len, entry(0, 11, 0, 0)).map_err(Into::into)),
        counted(verdict::PASS, reason::ALLOW_ACL, 0),
        None,
    );
    add(
        "an allow for port 587 does not open port 25",
        EG,
        syn(EG, 25),
        Box::new(move |h, _| h.add_acl(EG, side::LOCAL, eg.src, host_len, entry(2, 11, 0, 0)).map_err(Into::into)),
        counted(verdict::DROP, reason::DEFAULT_DENY, 0),
        None,
    );
    add(
        "a longer allow inside a denied network wins",
        IN,
        syn(IN, 25),
        Box::new(move |h, _| {
            h.add_acl(IN, side::PEER, ing.src, net_len, entry_all_ports(0, 22, 0))?;
            h.add_acl(IN, side::PEER, ing.src, host_len, entry_all_ports(11, 22, 0))?;
            Ok(())
        }),
        counted(verdict::PASS, reason::ALLOW_ACL, 0),
        None,
    );
    add(
        "a banned source is dropped",
        IN,
        syn(IN, 25),
        Box::new(move |h, _| h.seed_source(ing.src, seed::banned_for(600)).map_err(Into::into)),
        counted(verdict::DROP, reason::BANNED, 0),
        None,
    );
    add(
        "a banned source's established traffic is dropped too",
        IN,
        data(IN, 25, b"DATA\r\n"),
        Box::new(move |h, _| h.seed_source(ing.src, seed::banned_for(600)).map_err(Into::into)),
        counted(verdict::DROP, reason::BANNED, 0),
        None,
    );
    add(
        "an expired ban no longer applies and is cleared",
        IN,
        syn(IN, 25),
        Box::new(move |h, _| h.seed_source(ing.src, seed::ban_expired()).map_err(Into::into)),
        counted(verdict::PASS, reason::DEFAULT_ALLOW, 0),
        Some(Box::new(move |h| {
            let slot = h.source(ing.src)?.ok_or_else(|| anyhow::anyhow!("slot vanished"))?;
            anyhow::ensure!(slot.ban_until_ns == 0, "ban not cleared: {slot:?}");
            let events = h.dp.drain_events()?;
            anyhow::ensure!(events.iter().any(|e| e.kind == event_kind::BAN_EXPIRED), "no ban-expired event: {events:?}");
            Ok(())
        })),
    );
    add(
        "peer deny drops",
        IN,
        syn(IN, 25),
        Box::new(move |h, _| h.add_acl(IN, side::PEER, ing.src, net_len, entry(0, 0, 22, 0)).map_err(Into::into)),
        counted(verdict::DROP, reason::DENY_ACL, 0),
        None,
    );
    add(
        "local deny drops a tenant on 587",
        EG,
        syn(EG, 587),
        Box::new(move |h, _| h.add_acl(EG, side::LOCAL, eg.src, net_len, entry(2, 0, 22, 0)).map_err(Into::into)),
        counted(verdict::DROP, reason::DENY_ACL, 2),
        None,
    );
    add(
        "a deny for another port does not apply",
        IN,
        syn(IN, 25),
        Box::new(move |h, _| h.add_acl(IN, side::PEER, ing.src, net_len, entry(2, 0, 22, 0)).map_err(Into::into)),
        counted(verdict::PASS, reason::DEFAULT_ALLOW, 0),
        None,
    );
    let geo = move |country: u32, enabled: bool| -> Setup {
        Box::new(move |h, p| {
            dp_mut(p, IN).geo_enabled = enabled as u8;
            h.add_acl(IN, side::PEER, ing.src, net_len, entry(0, 0, 0, country)).map_err(Into::into)
        })
    };
    add("a blocked country is dropped", IN, syn(IN, 25), geo(fixtures::BLOCKED_COUNTRY, true), counted(verdict::DROP, reason::GEO, 0), None);
    add("an open country passes", IN, syn(IN, 25), geo(fixtures::OPEN_COUNTRY, true), counted(verdict::PASS, reason::DEFAULT_ALLOW, 0), None);
    add("geo off lets a blocked country pass", IN, syn(IN, 25), geo(fixtures::BLOCKED_COUNTRY, false), counted(verdict::PASS, reason::DEFAULT_ALLOW, 0), None);

    let rate_on = |p: &mut PolicyConfig| dp_mut(p, IN).rate_enabled = 1;
    add(
        "a new source's first SYN takes a token",
        IN,
        syn(IN, 25),
        Box::new(move |_, p| {
            rate_on(p);
            Ok(())
        }),
        counted(verdict::PASS, reason::DEFAULT_ALLOW, 0),
        Some(Box::new(move |h| {
            let slot = h.source(ing.src)?.ok_or_else(|| anyhow::anyhow!("source not tracked"))?;
            let now = ktime_now_ns();
            anyhow::ensure!(slot.admit_tat_ns > now - NS_PER_S && slot.admit_tat_ns <= now + NS_PER_S, "bucket not charged: {slot:?}");
            Ok(())
        })),
    );
    add(
        "a SYN finding the bucket empty is dropped and trips once",
        IN,
        syn(IN, 25),
        Box::new(move |h, p| {
            rate_on(p);
            h.seed_source(ing.src, seed::bucket_empty(&p.direction[IN as usize])).map_err(Into::into)
        }),
        counted(verdict::DROP, reason::RATE_LIMITED, 0),
        Some(Box::new(move |h| {
            let slot = h.source(ing.src)?.ok_or_else(|| anyhow::anyhow!("source not tracked"))?;
            anyhow::ensure!(SlotInfo::unpack(slot.info).flags & slot_flag::LIMITED != 0, "limited flag not set");
            let trips = h.dp.drain_events()?.iter().filter(|e| e.kind == event_kind::RATE_TRIP).count();
            anyhow::ensure!(trips == 1, "{trips} rate-trip events");
            Ok(())
        })),
    );
    add(
        "time refills the bucket",
        IN,
        syn(IN, 25),
        Box::new(move |h, p| {
            rate_on(p);
            h.seed_source(ing.src, seed::bucket_refilled(&p.direction[IN as usize])).map_err(Into::into)
        }),
        counted(verdict::PASS, reason::DEFAULT_ALLOW, 0),
        None,
    );
    add(
        "established traffic of a throttled source is not throttled",
        IN,
        data(IN, 25, b"RCPT TO:<a@b>\r\n"),
        Box::new(move |h, p| {
            rate_on(p);
            h.seed_source(ing.src, seed::bucket_empty(&p.direction[IN as usize])).map_err(Into::into)
        }),
        counted(verdict::PASS, reason::DEFAULT_ALLOW, 0),
        None,
    );
    add(
        "the SYN over the ban threshold bans the source",
        IN,
        syn(IN, 25),
        Box::new(move |h, p| {
            rate_on(p);
            h.seed_source(ing.src, seed::meter_at(fixtures::BAN_THRESHOLD as u16, 0)).map_err(Into::into)
        }),
        counted(verdict::DROP, reason::RATE_BAN, 0),
        Some(Box::new(move |h| check_ban(h, ing.src, 1, fixtures::BAN_BASE_S, ban_origin::AUTO))),
    );
    add(
        "a repeat offender's ban escalates",
        IN,
        syn(IN, 25),
        Box::new(move |h, p| {
            rate_on(p);
            h.seed_source(ing.src, seed::meter_at(fixtures::BAN_THRESHOLD as u16, 2)).map_err(Into::into)
        }),
        counted(verdict::DROP, reason::RATE_BAN, 0),
        Some(Box::new(move |h| check_ban(h, ing.src, 3, fixtures::BAN_BASE_S * 4, ban_origin::ESCALATED))),
    );
    add(
        "at the ban threshold a SYN still passes",
        IN,
        syn(IN, 25),
        Box::new(move |h, p| {
            rate_on(p);
            h.seed_source(ing.src, seed::meter_at(fixtures::BAN_THRESHOLD as u16 - 1, 0)).map_err(Into::into)
        }),
        counted(verdict::PASS, reason::DEFAULT_ALLOW, 0),
        None,
    );
    add(
        "rate limits apply to egress sources too",
        EG,
        syn(EG, 587),
        Box::new(move |h, p| {
            dp_mut(p, EG).rate_enabled = 1;
            h.seed_source(eg.src, seed::bucket_empty(&p.direction[EG as usize])).map_err(Into::into)
        }),
        counted(verdict::DROP, reason::RATE_LIMITED, 2),
        None,
    );

    add("VRFY is dropped on 25", IN, data(IN, 25, b"VRFY root\r\n"), no_setup(), counted(verdict::DROP, reason::SMTP_COMMAND, 0), None);
    add("vrfy in lower case is dropped", IN, data(IN, 25, b"vrfy root\r\n"), no_setup(), counted(verdict::DROP, reason::SMTP_COMMAND, 0), None);
    add("EXPN is dropped", IN, data(IN, 25, b"EXPN staff\r\n"), no_setup(), counted(verdict::DROP, reason::SMTP_COMMAND, 0), None);
    add("a bare 4-byte EXPN is dropped", IN, data(IN, 25, b"EXPN"), no_setup(), counted(verdict::DROP, reason::SMTP_COMMAND, 0), None);
    add("VRFYX is no command", IN, data(IN, 25, b"VRFYX\r\n"), no_setup(), counted(verdict::PASS, reason::DEFAULT_ALLOW, 0), None);
    // Every line of a segment is a command line (issue 12).
    let cmd_drop = || counted(verdict::DROP, reason::SMTP_COMMAND, 0);
    let cmd_pass = || counted(verdict::PASS, reason::DEFAULT_ALLOW, 0);
    add("VRFY pipelined after EHLO is dropped", IN, data(IN, 25, b"EHLO x\r\nVRFY root\r\n"), no_setup(), cmd_drop(), None);
    add("EXPN after a bare LF is dropped", IN, data(IN, 25, b"NOOP\nexpn staff\n"), no_setup(), cmd_drop(), None);
    add("EXPN after a bare CR is dropped", IN, data(IN, 25, b"NOOP\rEXPN staff"), no_setup(), cmd_drop(), None);
    add("VRFY after a leading space is dropped", IN, data(IN, 25, b" VRFY root\r\n"), no_setup(), cmd_drop(), None);
    add("VRFY after tabs and spaces on line 3 is dropped", IN, data(IN, 25, b"EHLO x\r\nNOOP\r\n\t  vRfY root\r\n"), no_setup(), cmd_drop(), None);
    add("VRFY ending the segment after a line break is dropped", IN, data(IN, 25, b"NOOP\r\nVRFY"), no_setup(), cmd_drop(), None);
    add("EXPN followed by a colon is dropped", IN, data(IN, 25, b"EXPN:staff\r\n"), no_setup(), cmd_drop(), None);
    let long_tail: Vec<u8> = [vec![b'x'; 400], b"\r\nVRFY root\r\n".to_vec()].concat();
    add("VRFY on a line starting at byte 407 is dropped", IN, data(IN, 25, &[b"NOOP ".as_slice(), &long_tail].concat()), no_setup(), cmd_drop(), None);
    add("a body line mentioning vrfy mid-line passes", IN, data(IN, 25, b"Subject: hi\r\nplease vrfy root\r\n"), no_setup(), cmd_pass(), None);
    add("VRFY inside an address passes", IN, data(IN, 25, b"RCPT TO:<vrfy@example.org>\r\n"), no_setup(), cmd_pass(), None);
    add("V RFY is no command", IN, data(IN, 25, b"V RFY root\r\n"), no_setup(), cmd_pass(), None);
    add("a segment ending in VRF passes", IN, data(IN, 25, b"NOOP\r\nVRF"), no_setup(), cmd_pass(), None);
    add("MAIL FROM passes", IN, data(IN, 25, b"MAIL FROM:<a@example.org>\r\n"), no_setup(), counted(verdict::PASS, reason::DEFAULT_ALLOW, 0), None);
    add("VRFY on submission (587) is not filtered", IN, data(IN, 587, b"VRFY root\r\n"), no_setup(), counted(verdict::PASS, reason::DEFAULT_ALLOW, 2), None);
    add(
        "only the listed commands are blocked",
        IN,
        data(IN, 25, b"EXPN staff\r\n"),
        Box::new(|_, p| {
            dp_mut(p, IN).smtp_block = smtp_command::VRFY;
            Ok(())
        }),
        counted(verdict::PASS, reason::DEFAULT_ALLOW, 0),
        None,
    );

    let monitor = |dir: u8| move |p: &mut PolicyConfig| dp_mut(p, dir).mode = mode::MONITOR;

    // Open connections the policy now denies get a reset (issue 12).
    let resets = |dir: u8| move |p: &mut PolicyConfig| dp_mut(p, dir).established_reset = 1;
    let seg = |dir, flags, payload: &[u8]| v.frame(dir, 25, flags).seq(7_000).payload(payload).build();
    add(
        "egress: a data segment the default denies gets a reset",
        EG,
        seg(EG, ACK | PSH, b"MAIL FROM:<a@b>\r\n"),
        Box::new(move |_, p| {
            resets(EG)(p);
            Ok(())
        }),
        Expect::Reset { reason: reason::DEFAULT_DENY, slot: 0 },
        None,
    );
    add(
        "a banned source's data segment gets a reset",
        IN,
        seg(IN, ACK | PSH, b"RCPT TO:<a@b>\r\n"),
        Box::new(move |h, p| {
            resets(IN)(p);
            h.seed_source(ing.src, seed::banned_for(600)).map_err(Into::into)
        }),
        Expect::Reset { reason: reason::BANNED, slot: 0 },
        None,
    );
    add(
        "a FIN a deny rule drops is acknowledged in its reset",
        IN,
        seg(IN, ACK | FIN, b"QUIT\r\n"),
        Box::new(move |h, p| {
            resets(IN)(p);
            h.add_acl(IN, side::PEER, ing.src, net_len, entry(0, 0, 22, 0)).map_err(Into::into)
        }),
        Expect::Reset { reason: reason::DENY_ACL, slot: 0 },
        None,
    );
    add(
        "a bare ACK from a blocked country gets a reset",
        IN,
        seg(IN, ACK, b""),
        Box::new(move |h, p| {
            resets(IN)(p);
            dp_mut(p, IN).geo_enabled = 1;
            h.add_acl(IN, side::PEER, ing.src, net_len, entry(0, 0, 0, fixtures::BLOCKED_COUNTRY)).map_err(Into::into)
        }),
        Expect::Reset { reason: reason::GEO, slot: 0 },
        None,
    );
    add(
        "monitor: an open connection the policy denies is not reset",
        EG,
        seg(EG, ACK | PSH, b"DATA\r\n"),
        Box::new(move |_, p| {
            resets(EG)(p);
            monitor(EG)(p);
            Ok(())
        }),
        counted(verdict::WOULD_DROP, reason::DEFAULT_DENY, 0),
        None,
    );
    for (name, flags) in [("a SYN the policy denies gets no reset", SYN), ("a RST the policy denies gets none back", RST | ACK), ("a segment without ACK gets no reset", PSH)] {
        add(
            name,
            EG,
            seg(EG, flags, b""),
            Box::new(move |_, p| {
                resets(EG)(p);
                Ok(())
            }),
            counted(verdict::DROP, reason::DEFAULT_DENY, 0),
            None,
        );
    }
    add(
        "a dropped VRFY gets no reset (the prober waits)",
        IN,
        seg(IN, ACK | PSH, b"VRFY root\r\n"),
        Box::new(move |_, p| {
            resets(IN)(p);
            Ok(())
        }),
        counted(verdict::DROP, reason::SMTP_COMMAND, 0),
        None,
    );
    add(
        "monitor: a deny only counts",
        IN,
        syn(IN, 25),
        Box::new(move |h, p| {
            monitor(IN)(p);
            h.add_acl(IN, side::PEER, ing.src, net_len, entry(0, 0, 22, 0)).map_err(Into::into)
        }),
        counted(verdict::WOULD_DROP, reason::DENY_ACL, 0),
        None,
    );
    add(
        "monitor: the egress default deny only counts",
        EG,
        syn(EG, 25),
        Box::new(move |_, p| {
            monitor(EG)(p);
            Ok(())
        }),
        counted(verdict::WOULD_DROP, reason::DEFAULT_DENY, 0),
        None,
    );
    add(
        "monitor: a ban only counts",
        IN,
        syn(IN, 25),
        Box::new(move |h, p| {
            monitor(IN)(p);
            h.seed_source(ing.src, seed::banned_for(600)).map_err(Into::into)
        }),
        counted(verdict::WOULD_DROP, reason::BANNED, 0),
        None,
    );
    add(
        "monitor: the rate limit only counts",
        IN,
        syn(IN, 25),
        Box::new(move |h, p| {
            monitor(IN)(p);
            rate_on(p);
            h.seed_source(ing.src, seed::bucket_empty(&p.direction[IN as usize])).map_err(Into::into)
        }),
        counted(verdict::WOULD_DROP, reason::RATE_LIMITED, 0),
        None,
    );
    add(
        "monitor: a would-be ban is recorded",
        IN,
        syn(IN, 25),
        Box::new(move |h, p| {
            monitor(IN)(p);
            rate_on(p);
            h.seed_source(ing.src, seed::meter_at(fixtures::BAN_THRESHOLD as u16, 0)).map_err(Into::into)
        }),
        counted(verdict::WOULD_DROP, reason::RATE_BAN, 0),
        Some(Box::new(move |h| check_ban(h, ing.src, 1, fixtures::BAN_BASE_S, ban_origin::AUTO))),
    );
    add(
        "monitor: a blocked country only counts",
        IN,
        syn(IN, 25),
        Box::new(move |h, p| {
            monitor(IN)(p);
            dp_mut(p, IN).geo_enabled = 1;
            h.add_acl(IN, side::PEER, ing.src, net_len, entry(0, 0, 0, fixtures::BLOCKED_COUNTRY)).map_err(Into::into)
        }),
        counted(verdict::WOULD_DROP, reason::GEO, 0),
        None,
    );
    add(
        "monitor: VRFY only counts",
        IN,
        data(IN, 25, b"VRFY root\r\n"),
        Box::new(move |_, p| {
            monitor(IN)(p);
            Ok(())
        }),
        counted(verdict::WOULD_DROP, reason::SMTP_COMMAND, 0),
        None,
    );

    // Fragments: the first carries the TCP header and is judged; later ones have no ports.
    add("a first fragment is judged", EG, v.frame(EG, 25, SYN).fragment(0, true).build(), no_setup(), counted(verdict::DROP, reason::DEFAULT_DENY, 0), None);
    add(
        "a later fragment passes, counted as a fragment",
        EG,
        v.frame(EG, 25, SYN).fragment(185, false).build(),
        no_setup(),
        counted(verdict::PASS, reason::FRAGMENT, PORT_SLOT_UNKNOWN),
        None,
    );
    // Fragments on a command-filtered port (issue 12): a first fragment is
    // judged like a whole segment, then dropped unless the policy allows
    // fragments there; one too short for the TCP flags is a new connection.
    let first_frag = || v.frame(IN, 25, ACK | PSH).payload(b"NOOP\r\n").fragment(0, true).build();
    add("a first fragment to 25 is dropped while commands are filtered", IN, first_frag(), no_setup(), counted(verdict::DROP, reason::FRAGMENT, 0), None);
    add(
        "a first fragment to 25 passes when the policy allows fragments",
        IN,
        first_frag(),
        Box::new(|_, p| {
            dp_mut(p, IN).fragment_verdict = verdict::PASS;
            Ok(())
        }),
        counted(verdict::PASS, reason::DEFAULT_ALLOW, 0),
        None,
    );
    add(
        "monitor: a first fragment to 25 only counts",
        IN,
        first_frag(),
        Box::new(move |_, p| {
            monitor(IN)(p);
            Ok(())
        }),
        counted(verdict::WOULD_DROP, reason::FRAGMENT, 0),
        None,
    );
    add("a first fragment's VRFY in sight is dropped as a command when fragments are allowed", IN, v.frame(IN, 25, ACK | PSH).payload(b"VRFY root\r\n").fragment(0, true).build(), Box::new(|_, p| {
            dp_mut(p, IN).fragment_verdict = verdict::PASS;
            Ok(())
        }), counted(verdict::DROP, reason::SMTP_COMMAND, 0), None);
    add("a first fragment to 587 is not command-filtered", IN, v.frame(IN, 587, ACK | PSH).payload(b"VRFY root\r\n").fragment(0, true).build(), no_setup(), counted(verdict::PASS, reason::DEFAULT_ALLOW, 2), None);
    let eight_byte_first = |dir: u8| {
        let t = v.frame(dir, 25, SYN).fragment(0, true);
        let (l3, l4) = (t.l2_len(), t.l4_offset());
        let mut f = t.build();
        f.truncate(l4 + 8);
        let ip_len = if v.v6 { l4 + 8 - l3 - 40 } else { l4 + 8 - l3 };
        let at = if v.v6 { l3 + 4 } else { l3 + 2 };
        f[at..at + 2].copy_from_slice(&(ip_len as u16).to_be_bytes());
        f
    };
    let malformed_allowed = || -> Setup {
        Box::new(|_, p| {
            dp_mut(p, EG).malformed_verdict = verdict::PASS;
            Ok(())
        })
    };
    add("an 8-byte first fragment is judged by the policy, not as malformed", EG, eight_byte_first(EG), malformed_allowed(), counted(verdict::DROP, reason::DEFAULT_DENY, 0), None);
    add(
        "an 8-byte first fragment from a denied source is dropped as denied",
        IN,
        eight_byte_first(IN),
        Box::new(move |h, p| {
            dp_mut(p, IN).malformed_verdict = verdict::PASS;
            dp_mut(p, IN).fragment_verdict = verdict::PASS;
            h.add_acl(IN, side::PEER, ing.src, host_len, entry_all_ports(0, 22, 0)).map_err(Into::into)
        }),
        counted(verdict::DROP, reason::DENY_ACL, 0),
        None,
    );
    add(
        "an 8-byte first fragment is a new connection for the rate limit",
        IN,
        eight_byte_first(IN),
        Box::new(move |h, p| {
            dp_mut(p, IN).fragment_verdict = verdict::PASS;
            rate_on(p);
            h.seed_source(ing.src, seed::bucket_empty(&p.direction[IN as usize])).map_err(Into::into)
        }),
        counted(verdict::DROP, reason::RATE_LIMITED, 0),
        None,
    );
    let mut long_ip = data(IN, 25, b"NOOP\r\n");
    let l3 = v.frame(IN, 25, ACK).l2_len();
    let at = if v.v6 { l3 + 4 } else { l3 + 2 };
    let claimed = u16::from_be_bytes([long_ip[at], long_ip[at + 1]]) + 100;
    long_ip[at..at + 2].copy_from_slice(&claimed.to_be_bytes());
    add("an IP length past the frame's end is malformed", IN, long_ip, no_setup(), counted(verdict::DROP, reason::MALFORMED, 0), None);
    if v.v6 {
        add(
            "a later IPv6 fragment whose next header is an extension is counted as a fragment",
            EG,
            v.frame(EG, 25, SYN).protocol(60).fragment(185, false).build(),
            no_setup(),
            counted(verdict::PASS, reason::FRAGMENT, PORT_SLOT_UNKNOWN),
            None,
        );
    }
    add("a later UDP fragment is not ours", EG, v.frame(EG, 25, 0).protocol(17).fragment(185, false).build(), no_setup(), Expect::Uncounted, None);

    // Malformed TCP to a guarded port: the action is configuration.
    let mut bad_doff = syn(EG, 25);
    let l4 = v.frame(EG, 25, SYN).l4_offset();
    bad_doff[l4 + 12] = 4 << 4;
    add("a TCP data offset below 5 is malformed", EG, bad_doff.clone(), no_setup(), counted(verdict::DROP, reason::MALFORMED, 0), None);
    add(
        "malformed packets pass when the policy says so",
        EG,
        bad_doff,
        Box::new(|_, p| {
            dp_mut(p, EG).malformed_verdict = verdict::PASS;
            Ok(())
        }),
        counted(verdict::PASS, reason::MALFORMED, 0),
        None,
    );
    add(
        "monitor: a malformed packet only counts",
        EG,
        {
            let mut f = syn(EG, 25);
            f[l4 + 12] = 2 << 4;
            f
        },
        Box::new(move |_, p| {
            monitor(EG)(p);
            Ok(())
        }),
        counted(verdict::WOULD_DROP, reason::MALFORMED, 0),
        None,
    );
    cases
}

/// A frame cut at `len` bytes.
fn cut(frame: &[u8], len: usize) -> Vec<u8> {
    frame[..len].to_vec()
}

/// Truncations at every header boundary and inside every header.
fn truncation_cases(v: &Variant) -> Vec<Case> {
    let dir = direction::EGRESS;
    let f = v.frame(dir, 25, SYN);
    let full = f.build();
    let l2 = f.l2_len();
    let l4 = f.l4_offset();
    let mut lengths = vec![14];
    if !v.vlans.is_empty() {
        lengths.extend([16, l2]);
    }
    lengths.extend([l2 + 1, l2 + 9, l2 + 19, l4 - 1, l4, l4 + 2]);
    let mut cases: Vec<Case> = lengths
        .into_iter()
        .filter(|&n| n >= 14 && n < l4 + 4)
        .map(|n| Case {
            name: format!("cut at {n} bytes, before the ports [{}]", v.label),
            dir,
            frame: cut(&full, n),
            setup: no_setup(),
            expect: counted(verdict::DROP, reason::MALFORMED, PORT_SLOT_UNKNOWN),
            after: None,
        })
        .collect();
    for n in [l4 + 4, l4 + 12, l4 + 19] {
        cases.push(Case {
            name: format!("cut at {n} bytes, inside TCP after the ports [{}]", v.label),
            dir,
            frame: cut(&full, n),
            setup: no_setup(),
            expect: counted(verdict::DROP, reason::MALFORMED, 0),
            after: None,
        });
    }
    cases.push(Case {
        name: format!("cut inside TCP, malformed action pass [{}]", v.label),
        dir,
        frame: cut(&full, l4 + 10),
        setup: Box::new(|_, p| {
            dp_mut(p, direction::EGRESS).malformed_verdict = verdict::PASS;
            Ok(())
        }),
        expect: counted(verdict::PASS, reason::MALFORMED, 0),
        after: None,
    });
    cases
}

/// Where the flow entry must stand after a case: `None`, no entry.
fn expect_flow(key: SmtpFlowKey, want: Option<SmtpFlowState>) -> Option<Check> {
    Some(Box::new(move |h: &mut Harness| {
        let have = h.dp.smtp_flow(&key)?;
        anyhow::ensure!(have == want, "flow entry {have:?}, expected {want:?}");
        Ok(())
    }))
}

/// The entry the datapath keeps after passing `bytes` at `start` as a
/// stream's first data (the shared rules, `smtp_flow::judge`).
fn after_first(start: u32, bytes: &[u8]) -> SmtpFlowState {
    let (why, next) = smtp_flow::judge(None, start, bytes, BOTH_COMMANDS, false, false);
    assert_eq!(why, smtp_flow::CLEAN, "{bytes:?} is clean");
    next.expect("a clean first segment makes an entry")
}

const BOTH_COMMANDS: u8 = smtp_command::VRFY | smtp_command::EXPN;

/// The command filter across segments of one client stream (issue 12):
/// each case seeds the stream's `SMTP_FLOWS` entry as earlier segments
/// would have left it, sends the next segment and checks the entry after.
fn flow_cases(v: &Variant) -> Vec<Case> {
    use direction::INGRESS as IN;
    const S: u32 = 5_000;
    let e = ends(IN, v.v6);
    let key = SmtpFlowKey::of(e.src, e.dst, 40_000, 25);
    let at = |seq: u32, payload: &[u8]| v.frame(IN, 25, ACK | PSH).seq(seq).payload(payload).build();
    let seeded = |state: SmtpFlowState| -> Setup { Box::new(move |h, _| h.dp.set_smtp_flow(&key, &state).map_err(Into::into)) };
    let cmd_drop = || counted(verdict::DROP, reason::SMTP_COMMAND, 0);
    let pass = || counted(verdict::PASS, reason::DEFAULT_ALLOW, 0);
    let line_start = |next: u32| SmtpFlowState { next, states: smtp_scan::AT_LINE_START, pad: 0 };
    let mut cases = Vec::new();
    let mut add = |name: &str, frame: Vec<u8>, setup: Setup, expect: Expect, after: Option<Check>| {
        cases.push(Case { name: format!("{name} [{}]", v.label), dir: IN, frame, setup, expect, after });
    };

    let first = b"EHLO x\r\nVR";
    add("a stream's first data makes its entry", at(S, first), no_setup(), pass(), expect_flow(key, Some(after_first(S, first))));
    let vr = after_first(S - 2, b"VR");
    add("a VRFY completed in the next segment is dropped and moves nothing", at(S, b"FY root\r\n"), seeded(vr), cmd_drop(), expect_flow(key, Some(vr)));
    let e_ = after_first(S - 7, b"NOOP\r\nE");
    add("an EXPN split after its first letter is dropped", at(S, b"XPN staff\r\n"), seeded(e_), cmd_drop(), expect_flow(key, Some(e_)));
    let blank = after_first(S - 3, b"\r\n ");
    add("a VRFY after a blank that ended the last segment is dropped", at(S, b"vrfy root\r\n"), seeded(blank), cmd_drop(), None);
    let no = after_first(S - 10, b"EHLO x\r\nNO");
    add(
        "a continuation that completes no command passes and moves the entry on",
        at(S, b"OP\r\n"),
        seeded(no),
        pass(),
        expect_flow(key, Some(SmtpFlowState { next: S + 4, ..line_start(0) })),
    );
    add("a segment past a gap is held back", at(S, b"NOOP\r\n"), seeded(line_start(S - 10)), counted(verdict::DROP, reason::SMTP_OUT_OF_ORDER, 0), expect_flow(key, Some(line_start(S - 10))));
    add(
        "monitor: a segment past a gap only counts and resynchronises at its end",
        at(S, b"NOOP\r\n"),
        Box::new(move |h, p| {
            dp_mut(p, IN).mode = mode::MONITOR;
            h.dp.set_smtp_flow(&key, &line_start(S - 10)).map_err(Into::into)
        }),
        counted(verdict::WOULD_DROP, reason::SMTP_OUT_OF_ORDER, 0),
        expect_flow(key, Some(SmtpFlowState { next: S + 6, states: smtp_scan::LINE_OR_START, pad: 0 })),
    );
    let ahead = after_first(S, first);
    add("a retransmission of seen bytes is judged alone and moves nothing", at(S, b"EHLO x\r\n"), seeded(ahead), pass(), expect_flow(key, Some(ahead)));
    add("a retransmitted VRFY is still dropped", at(S, b"VRFY root\r\n"), seeded(line_start(S + 20)), cmd_drop(), None);
    let host_has_vr = after_first(S, b"VR");
    add("an overlapping segment is read from where the host stands", at(S, b"xxFY root\r\n"), seeded(host_has_vr), cmd_drop(), None);
    let wrap = after_first(u32::MAX - 1, b"VR");
    add("a VRFY split across the sequence-number wrap is dropped", at(0, b"FY root\r\n"), seeded(wrap), cmd_drop(), None);
    add(
        "a first fragment makes no entry",
        v.frame(IN, 25, ACK | PSH).seq(S).payload(first).fragment(0, true).build(),
        Box::new(|_, p| {
            dp_mut(p, IN).fragment_verdict = verdict::PASS;
            Ok(())
        }),
        pass(),
        expect_flow(key, None),
    );
    add("a SYN makes no entry", v.frame(IN, 25, SYN).seq(S - 1).build(), no_setup(), pass(), expect_flow(key, None));
    // Documented limit: with its entry evicted, a stream starts over at a
    // line start (counted in smtpguard_smtp_flows_total).
    add("without an entry a continuation is read from a line start", at(S, b"FY root\r\n"), no_setup(), pass(), None);
    cases
}

/// Family-specific header cases.
fn header_cases(v: &Variant) -> Vec<Case> {
    let dir = direction::EGRESS;
    let judged = counted(verdict::DROP, reason::DEFAULT_DENY, 0);
    let mut cases = Vec::new();
    // A reset is made only of plain headers: with IPv4 options or IPv6
    // extension headers, an open connection's denied segment is dropped.
    let data = v.frame(dir, 25, ACK | PSH).payload(b"NOOP\r\n");
    let odd_headers = if v.v6 { data.ext(Ext::DestOpts) } else { data.ipv4_options(&[0x01; 4]) };
    cases.push(Case {
        name: format!("a denied segment with IP options or extension headers gets no reset [{}]", v.label),
        dir,
        frame: odd_headers.build(),
        setup: Box::new(|_, p| {
            dp_mut(p, direction::EGRESS).established_reset = 1;
            Ok(())
        }),
        expect: judged,
        after: None,
    });
    let mut add = |name: &str, frame: Vec<u8>, expect: Expect| {
        cases.push(Case { name: format!("{name} [{}]", v.label), dir, frame, setup: no_setup(), expect, after: None });
    };
    if v.v6 {
        let f = v.frame(dir, 25, SYN);
        add("hop-by-hop header is skipped", f.clone().ext(Ext::HopByHop).build(), judged);
        add(
            "hop-by-hop, destination options and routing headers are skipped",
            f.clone().ext(Ext::HopByHop).ext(Ext::DestOpts).ext(Ext::Routing).build(),
            judged,
        );
        add("extension headers then a first fragment are judged", f.clone().ext(Ext::HopByHop).ext(Ext::DestOpts).fragment(0, true).build(), judged);
        add(
            "extension headers then a later fragment count as a fragment",
            f.clone().ext(Ext::HopByHop).fragment(100, true).build(),
            counted(verdict::PASS, reason::FRAGMENT, PORT_SLOT_UNKNOWN),
        );
        let mut six = f.clone();
        for _ in 0..6 {
            six = six.ext(Ext::DestOpts);
        }
        add("six extension headers (the limit) are walked", six.clone().build(), judged);
        add("seven extension headers exceed the limit", six.ext(Ext::DestOpts).build(), counted(verdict::DROP, reason::MALFORMED, PORT_SLOT_UNKNOWN));
        let mut bad_version = f.build();
        bad_version[f.l2_len()] = 0x40;
        add("an IPv6 ethertype with version 4 is malformed", bad_version, counted(verdict::DROP, reason::MALFORMED, PORT_SLOT_UNKNOWN));
    } else {
        let f = v.frame(dir, 25, SYN);
        // Option bytes that would read as port 80 if the IHL were ignored.
        add("IPv4 options (IHL 6) are skipped", f.clone().ipv4_options(&[0x01, 0x01, 0x00, 0x50]).build(), judged);
        add("IPv4 options (IHL 8) are skipped", f.clone().ipv4_options(&[0x01; 12]).build(), judged);
        add("IPv4 options (IHL 15, the maximum) are skipped", f.clone().ipv4_options(&[0x01; 40]).build(), judged);
        let mut short_ihl = f.build();
        short_ihl[f.l2_len()] = 0x44;
        add("an IHL below 5 is malformed", short_ihl, counted(verdict::DROP, reason::MALFORMED, PORT_SLOT_UNKNOWN));
        let mut bad_version = f.build();
        bad_version[f.l2_len()] = 0x65;
        add("an IPv4 ethertype with version 6 is malformed", bad_version, counted(verdict::DROP, reason::MALFORMED, PORT_SLOT_UNKNOWN));
    }
    cases
}

/// Cases outside the variant grid.
fn other_cases() -> Vec<Case> {
    let dir = direction::EGRESS;
    let e = ends(dir, false);
    vec![
        Case { name: "ARP is not ours".into(), dir, frame: arp_frame(), setup: no_setup(), expect: Expect::Uncounted, after: None },
        Case {
            name: "three VLAN tags exceed the limit".into(),
            dir,
            frame: TcpFrame::new(e.src, e.dst, 25, SYN).vlan(TPID_8021AD, 1).vlan(TPID_8021Q, 2).vlan(TPID_8021Q, 3).build(),
            setup: no_setup(),
            expect: counted(verdict::DROP, reason::MALFORMED, PORT_SLOT_UNKNOWN),
            after: None,
        },
        Case {
            name: "sampled drops reach the event stream".into(),
            dir,
            frame: TcpFrame::new(e.src, e.dst, 25, SYN).build(),
            setup: Box::new(|_, _| Ok(())),
            expect: counted(verdict::DROP, reason::DEFAULT_DENY, 0),
            after: Some(Box::new(|h| {
                let events = h.dp.drain_events()?;
                anyhow::ensure!(
                    events.iter().any(|e| e.kind == event_kind::DROP_SAMPLE && e.reason == reason::DEFAULT_DENY && e.dport == 25),
                    "no drop sample: {events:?}"
                );
                Ok(())
            })),
        },
    ]
}

fn check_ban(h: &mut Harness, addr: IpAddr, strikes: u16, duration_s: u32, origin: u8) -> anyhow::Result<()> {
    let slot: SourceSlot = h.source(addr)?.ok_or_else(|| anyhow::anyhow!("source not tracked"))?;
    let info = SlotInfo::unpack(slot.info);
    let now = ktime_now_ns();
    let expected_until = now + duration_s as u64 * NS_PER_S;
    anyhow::ensure!(
        slot.ban_until_ns > expected_until - 5 * NS_PER_S && slot.ban_until_ns <= expected_until,
        "ban until {} s from now, expected {duration_s}",
        (slot.ban_until_ns as i64 - now as i64) / NS_PER_S as i64
    );
    anyhow::ensure!(info.strikes == strikes && info.origin == origin, "slot info {info:?}");
    let events = h.dp.drain_events()?;
    let ban = events.iter().find(|e| e.kind == event_kind::BAN_ADDED).ok_or_else(|| anyhow::anyhow!("no ban event in {events:?}"))?;
    anyhow::ensure!(
        ban.count == fixtures::BAN_THRESHOLD + 1 && ban.duration_s == duration_s && ban.strikes == strikes,
        "ban event {ban:?}"
    );
    Ok(())
}

/// Cases in the table, as README.md states them ("one table of N cases"):
/// a case that goes missing, or one added without saying so, fails the
/// tests below instead of passing silently.
const CASES: usize = 704;

fn all_cases() -> Vec<Case> {
    let mut cases = other_cases();
    for v6 in [false, true] {
        for (label, vlans) in l2_variants() {
            let v = Variant { v6, vlans, label: format!("{}, {label}", if v6 { "IPv6" } else { "IPv4" }) };
            cases.extend(pipeline_cases(&v));
            cases.extend(header_cases(&v));
            cases.extend(flow_cases(&v));
            cases.extend(truncation_cases(&v));
        }
    }
    cases
}

/// The kernel's skb test harness refuses an untagged IP frame shorter than
/// its IP header (EINVAL) before any program runs; XDP runs those frames.
fn skb_harness_refuses(frame: &[u8]) -> bool {
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    (ethertype == 0x0800 && frame.len() < 14 + 20) || (ethertype == 0x86dd && frame.len() < 14 + 40)
}

enum Ran {
    Judged,
    RefusedByHarness,
}

fn run_case(h: &mut Harness, hook: Hook, case: &Case) -> anyhow::Result<Ran> {
    h.reset()?;
    if hook != Hook::XdpIngress && skb_harness_refuses(&case.frame) {
        return match h.dp.test_run(hook, &case.frame, 1) {
            Err(e) if format!("{e:?}").contains("Invalid argument") => Ok(Ran::RefusedByHarness),
            other => anyhow::bail!("expected the skb test harness to refuse this frame, got {other:?}"),
        };
    }
    let sample = if case.name.starts_with("sampled drops") { 1 } else { 0 };
    h.route(hook, case.dir, sample)?;
    let mut policy = base_policy();
    (case.setup)(h, &mut policy)?;
    h.set_policy(&policy)?;
    let (before, geo_before) = h.counters()?;
    let (rc, out) = h.dp.test_run_out(hook, &case.frame)?;
    let (after, geo_after) = h.counters()?;
    let resets = |s: &[policy_common::Counter]| s[policy_common::STATS_RESETS as usize + case.dir as usize].packets;
    let want_resets = u64::from(matches!(case.expect, Expect::Reset { .. }));
    anyhow::ensure!(resets(&after) - resets(&before) == want_resets, "resets counted {}, expected {want_resets}", resets(&after) - resets(&before));
    if let Expect::Reset { .. } = case.expect {
        check_reset(&case.frame, &out)?;
    }
    // A started ban is counted once, by origin.
    let bans = |s: &[policy_common::Counter], cell: u32| s[cell as usize].packets;
    let started = (
        bans(&after, policy_common::STATS_BANS_AUTO) - bans(&before, policy_common::STATS_BANS_AUTO),
        bans(&after, policy_common::STATS_BANS_ESCALATED) - bans(&before, policy_common::STATS_BANS_ESCALATED),
    );
    let expected_started = match case.expect {
        Expect::Counted { reason: reason::RATE_BAN, .. } if case.name.contains("escalates") => (0, 1),
        Expect::Counted { reason: reason::RATE_BAN, .. } => (1, 0),
        _ => (0, 0),
    };
    anyhow::ensure!(started == expected_started, "bans started (auto, escalated) {started:?}, expected {expected_started:?}");

    let (pass_code, drop_code) = hook.verdict_codes();
    let expected_rc = match case.expect {
        Expect::Counted { verdict: verdict::DROP, .. } => drop_code,
        Expect::Reset { .. } => hook.reset_code(),
        _ => pass_code,
    };
    anyhow::ensure!(rc == expected_rc, "returned {rc:#x}, expected {expected_rc:#x}");

    let expected_cell = match case.expect {
        Expect::Uncounted => None,
        Expect::Counted { verdict, reason, slot } => Some(stats_index(case.dir, verdict, reason, slot) as usize),
        Expect::Reset { reason, slot } => Some(stats_index(case.dir, verdict::DROP, reason, slot) as usize),
    };
    // Verdict cells and events-lost; the ban-origin cells follow the ban checks.
    let checked = policy_common::STATS_EVENTS_LOST as usize + 1;
    for (i, (b, a)) in before.iter().zip(&after).enumerate().take(checked) {
        let (packets, bytes) = (a.packets - b.packets, a.bytes - b.bytes);
        let (want_packets, want_bytes) = if Some(i) == expected_cell { (1, case.frame.len() as u64) } else { (0, 0) };
        anyhow::ensure!(
            packets == want_packets && bytes == want_bytes,
            "counter {} moved by {packets} packets / {bytes} bytes, expected {want_packets} / {want_bytes}",
            describe_cell(i)
        );
    }
    let geo_cell = match case.expect {
        Expect::Counted { verdict, reason: reason::GEO, .. } if verdict != verdict::PASS => {
            Some(geo_index(case.dir, verdict, fixtures::BLOCKED_COUNTRY) as usize)
        }
        Expect::Reset { reason: reason::GEO, .. } => Some(geo_index(case.dir, verdict::DROP, fixtures::BLOCKED_COUNTRY) as usize),
        _ => None,
    };
    for (i, (b, a)) in geo_before.iter().zip(&geo_after).enumerate() {
        let want = u64::from(Some(i) == geo_cell);
        anyhow::ensure!(a - b == want, "geo counter {i} moved by {}, expected {want}", a - b);
    }
    if let Some(after) = &case.after {
        after(h)?;
    }
    Ok(Ran::Judged)
}

/// `out` is the reset a stack accepts for the segment `input`: same VLAN
/// tags, ends swapped, RST+ACK with the segment's acknowledgment as its
/// sequence number, acknowledging all the segment carried, valid
/// checksums, nothing after the TCP header.
fn check_reset(input: &[u8], out: &[u8]) -> anyhow::Result<()> {
    let i = read_tcp(input).ok_or_else(|| anyhow::anyhow!("the case's frame does not parse"))?;
    let o = read_tcp(out).ok_or_else(|| anyhow::anyhow!("the reset does not parse: {out:02x?}"))?;
    let consumed = i.payload_len as u32 + u32::from(i.flags & FIN != 0);
    let want = ReadTcp {
        dst_mac: i.src_mac,
        src_mac: i.dst_mac,
        vlans: i.vlans.clone(),
        src: i.dst,
        dst: i.src,
        ttl: 64,
        sport: i.dport,
        dport: i.sport,
        seq: i.ack,
        ack: i.seq.wrapping_add(consumed),
        flags: RST | ACK,
        window: 0,
        payload_len: 0,
        ip_checksum_ok: true,
        tcp_checksum_ok: true,
        trailer: 0,
    };
    anyhow::ensure!(o == want, "reset {o:?}, expected {want:?}");
    Ok(())
}

fn describe_cell(i: usize) -> String {
    use policy_common::{reason::COUNT as R, verdict::COUNT as V, PORT_SLOTS as P};
    if i >= direction::COUNT * V * R * P {
        return "events_lost".into();
    }
    let slot = i % P;
    let reason = (i / P) % R;
    let verdict = (i / P / R) % V;
    let dir = i / P / R / V;
    format!(
        "{}/{}/{}/slot{slot}",
        direction::NAMES[dir],
        policy_common::verdict::NAMES[verdict],
        policy_common::reason::NAMES[reason]
    )
}

#[test]
#[ignore = "privileged: needs root, BPF and namespaces; cargo xtask test runs it"]
fn verdict_table_through_every_hook() {
    require_root();
    let mut h = Harness::load().expect("loading the datapath");
    let cases = all_cases();
    assert_eq!(cases.len(), CASES, "cases in the table");
    let mut failures = Vec::new();
    let (mut judged, mut refused) = (0, 0);
    for hook in Hook::ALL {
        for case in &cases {
            match run_case(&mut h, hook, case) {
                Ok(Ran::Judged) => judged += 1,
                Ok(Ran::RefusedByHarness) => refused += 1,
                Err(e) => failures.push(format!("{:?}: {}: {e:#}", hook, case.name)),
            }
        }
    }
    h.reset().expect("reset");
    eprintln!(
        "{} cases x {} hooks: {judged} judged as expected, {refused} short frames refused by the kernel's skb \
         test harness (run through XDP instead), {} failed",
        cases.len(),
        Hook::ALL.len(),
        failures.len()
    );
    assert!(failures.is_empty(), "failures:\n{}", failures.join("\n"));
    assert_eq!(judged + refused, CASES * Hook::ALL.len(), "every case ran through every hook");
}

/// Needs no kernel: the table and the README agree on its size.
#[test]
fn the_table_holds_the_cases_the_readme_states() {
    assert_eq!(all_cases().len(), CASES, "cases in the table; update CASES and README.md together");
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).expect("README.md");
    assert!(readme.contains(&format!("one table of {CASES} cases")), "README.md must say the verdict table has {CASES} cases");
}

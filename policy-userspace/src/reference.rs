//! A userspace model of the datapath's decision, for `explain` and for the
//! differential test that holds the kernel to it. It reads the compiled
//! policy exactly as the programs read the maps.

use std::{collections::HashMap, net::IpAddr};

use policy_common::{
    direction, mode, profile, reason, side,
    smtp_flow::{self, SmtpFlowKey, SmtpFlowState},
    verdict, AclEntry, DirectionPolicy,
};

use crate::policy::Compiled;

/// Where a packet stands in IP fragmentation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Fragment {
    /// Not fragmented.
    #[default]
    Whole,
    /// The first fragment: ports and headers in sight, the rest later.
    First,
    /// A later fragment: no ports.
    Later,
}

/// A packet as `explain` describes it.
#[derive(Clone, Debug)]
pub struct Packet {
    pub direction: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    /// SYN without ACK.
    pub syn: bool,
    pub payload: Vec<u8>,
    /// Sequence number of the first payload byte.
    pub seq: u32,
    pub fragment: Fragment,
}

impl Packet {
    /// A whole segment from port 40000, the first of its stream (as
    /// `explain` assumes).
    pub fn new(direction: u8, src: IpAddr, dst: IpAddr, dport: u16, syn: bool, payload: Vec<u8>) -> Self {
        Self { direction, src, dst, sport: 40_000, dport, syn, payload, seq: 1, fragment: Fragment::Whole }
    }

    /// The command filter's key for the packet's client stream.
    pub fn flow_key(&self) -> SmtpFlowKey {
        SmtpFlowKey::of(self.src, self.dst, self.sport, self.dport)
    }
}

/// What the per-source state says; `explain` assumes a fresh source.
#[derive(Clone, Copy, Debug, Default)]
pub struct SourceState {
    pub banned: bool,
    pub bucket_empty: bool,
    pub over_ban_threshold: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// [`verdict`]; `None` when the packet is not ours (not counted).
    pub counted: Option<(u8, u8)>,
    /// `None`: not guarded, or no ports in sight (a later fragment).
    pub port_slot: Option<usize>,
    pub rule: u32,
    pub country: u32,
    /// The stream's `SMTP_FLOWS` entry after the packet (`None`: as it was).
    pub flow: Option<SmtpFlowState>,
    /// The drop is answered with a TCP reset (an open connection's
    /// segment the policy denies; plain headers, ACK set).
    pub reset: bool,
}

impl Decision {
    pub fn passes(&self) -> bool {
        !matches!(self.counted, Some((verdict::DROP, _)))
    }
}

/// The compiled ACL indexed for longest-prefix lookups.
pub struct AclIndex {
    entries: HashMap<(u8, bool, u8, u128), AclEntry>,
    /// Prefix lengths present per (scope, v6), longest first.
    lengths: HashMap<(u8, bool), Vec<u8>>,
}

fn bits(addr: IpAddr) -> (bool, u128) {
    match addr {
        IpAddr::V4(a) => (false, (u32::from(a) as u128) << 96),
        IpAddr::V6(a) => (true, u128::from(a)),
    }
}

fn masked(addr: u128, len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        addr & (!0u128 << (128 - len as u32))
    }
}

impl AclIndex {
    pub fn new(c: &Compiled) -> Self {
        Self::of_entries(&c.v4, &c.v6)
    }

    pub fn of_entries(v4: &[(u8, ipnet::Ipv4Net, AclEntry)], v6: &[(u8, ipnet::Ipv6Net, AclEntry)]) -> Self {
        let mut entries = HashMap::new();
        let mut lengths: HashMap<(u8, bool), Vec<u8>> = HashMap::new();
        for (scope, net, e) in v4 {
            let a = (u32::from(net.network()) as u128) << 96;
            entries.insert((*scope, false, net.prefix_len(), a), *e);
            lengths.entry((*scope, false)).or_default().push(net.prefix_len());
        }
        for (scope, net, e) in v6 {
            entries.insert((*scope, true, net.prefix_len(), u128::from(net.network())), *e);
            lengths.entry((*scope, true)).or_default().push(net.prefix_len());
        }
        for l in lengths.values_mut() {
            l.sort_unstable_by(|a, b| b.cmp(a));
            l.dedup();
        }
        Self { entries, lengths }
    }

    pub fn lookup(&self, scope: u8, addr: IpAddr) -> Option<&AclEntry> {
        let (v6, a) = bits(addr);
        let lens = self.lengths.get(&(scope, v6))?;
        lens.iter().find_map(|len| self.entries.get(&(scope, v6, *len, masked(a, *len))))
    }
}

/// The datapath's decision on `p`, from a source in `state` and a client
/// stream whose `SMTP_FLOWS` entry is `flow`.
pub fn decide(c: &Compiled, acl: &AclIndex, p: &Packet, state: SourceState, flow: Option<SmtpFlowState>) -> Decision {
    let dp: &DirectionPolicy = &c.config.direction[p.direction as usize];
    let mut d = Decision { counted: None, port_slot: None, rule: 0, country: 0, flow: None, reset: false };
    if p.fragment == Fragment::Later {
        // No ports to judge: counted, and passed for the host to reassemble
        // (its first fragment was judged).
        d.counted = Some((verdict::PASS, reason::FRAGMENT));
        return d;
    }
    let Some(slot) = dp.port_slot(p.dport) else { return d };
    d.port_slot = Some(slot);
    let finish = |mut d: Decision, act: u8, why: u8| {
        let v = if act == verdict::DROP {
            if dp.mode == mode::MONITOR {
                verdict::WOULD_DROP
            } else {
                verdict::DROP
            }
        } else {
            verdict::PASS
        };
        d.counted = Some((v, why));
        // An IPv6 fragment has an extension header: no reset is made of it.
        let plain_headers = !(p.src.is_ipv6() && p.fragment != Fragment::Whole);
        d.reset = v == verdict::DROP && !p.syn && plain_headers && dp.established_reset != 0 && policy_common::reset_worthy(why);
        d
    };
    let (peer, local) = if p.direction == direction::INGRESS { (p.src, p.dst) } else { (p.dst, p.src) };
    let (mut allow, mut deny, mut country) = (0, 0, 0);
    if dp.acl_sides & side::PEER_BIT != 0 {
        if let Some(e) = acl.lookup(policy_common::acl_scope(p.direction, side::PEER), peer) {
            (allow, deny, country) = (e.allow_rule[slot], e.deny_rule[slot], e.country);
        }
    }
    if dp.acl_sides & side::LOCAL_BIT != 0 && allow == 0 {
        if let Some(e) = acl.lookup(policy_common::acl_scope(p.direction, side::LOCAL), local) {
            allow = e.allow_rule[slot];
            if deny == 0 {
                deny = e.deny_rule[slot];
            }
        }
    }
    if allow != 0 {
        d.rule = allow;
        return finish(d, verdict::PASS, reason::ALLOW_ACL);
    }
    if state.banned {
        return finish(d, verdict::DROP, reason::BANNED);
    }
    if deny != 0 {
        d.rule = deny;
        d.country = country;
        return finish(d, verdict::DROP, reason::DENY_ACL);
    }
    if dp.geo_enabled != 0 && dp.geo_drops(country) {
        d.country = country;
        return finish(d, verdict::DROP, reason::GEO);
    }
    if dp.rate_enabled != 0 && p.syn {
        if dp.ban_threshold != 0 && state.over_ban_threshold {
            return finish(d, verdict::DROP, reason::RATE_BAN);
        }
        if dp.rate_interval_ns != 0 && state.bucket_empty {
            return finish(d, verdict::DROP, reason::RATE_LIMITED);
        }
    }
    let filtered = dp.profile[slot] == profile::SMTP && dp.smtp_block != 0;
    let first_fragment = p.fragment == Fragment::First;
    if filtered && first_fragment && dp.fragment_verdict == verdict::DROP && dp.default_verdict[slot] != verdict::DROP {
        return finish(d, verdict::DROP, reason::FRAGMENT);
    }
    if filtered {
        let monitor = dp.mode == mode::MONITOR;
        let (why, next) = smtp_flow::judge(flow, p.seq, &p.payload, dp.smtp_block, monitor, first_fragment);
        d.flow = next;
        if why != smtp_flow::CLEAN {
            return finish(d, verdict::DROP, why as u8);
        }
    }
    if dp.default_verdict[slot] == verdict::DROP {
        finish(d, verdict::DROP, reason::DEFAULT_DENY)
    } else {
        finish(d, verdict::PASS, reason::DEFAULT_ALLOW)
    }
}

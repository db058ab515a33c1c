//! A userspace model of the datapath's decision, for `explain` and for the
//! differential test that holds the kernel to it. It reads the compiled
//! policy exactly as the programs read the maps.

use std::{collections::HashMap, net::IpAddr};

use policy_common::{
    action, direction, mode, profile, reason, side, smtp_scan, verdict, AclEntry, DirectionPolicy,
};

use crate::policy::Compiled;

/// A packet as `explain` describes it.
#[derive(Clone, Debug)]
pub struct Packet {
    pub direction: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub dport: u16,
    /// SYN without ACK.
    pub syn: bool,
    pub payload: Vec<u8>,
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
    pub port_slot: Option<usize>,
    pub rule: u32,
    pub country: u32,
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
        let mut entries = HashMap::new();
        let mut lengths: HashMap<(u8, bool), Vec<u8>> = HashMap::new();
        for (scope, net, e) in &c.v4 {
            let a = (u32::from(net.network()) as u128) << 96;
            entries.insert((*scope, false, net.prefix_len(), a), *e);
            lengths.entry((*scope, false)).or_default().push(net.prefix_len());
        }
        for (scope, net, e) in &c.v6 {
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

pub fn decide(c: &Compiled, acl: &AclIndex, p: &Packet, state: SourceState) -> Decision {
    let dp: &DirectionPolicy = &c.config.direction[p.direction as usize];
    let mut d = Decision { counted: None, port_slot: None, rule: 0, country: 0 };
    let Some(slot) = dp.port_slot(p.dport) else { return d };
    d.port_slot = Some(slot);
    let finish = |mut d: Decision, act: u8, why: u8| {
        let v = if act == action::DROP {
            if dp.mode == mode::MONITOR {
                verdict::WOULD_DROP
            } else {
                verdict::DROP
            }
        } else {
            verdict::PASS
        };
        d.counted = Some((v, why));
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
        return finish(d, action::PASS, reason::ALLOW_ACL);
    }
    if state.banned {
        return finish(d, action::DROP, reason::BANNED);
    }
    if deny != 0 {
        d.rule = deny;
        d.country = country;
        return finish(d, action::DROP, reason::DENY_ACL);
    }
    if dp.geo_enabled != 0 && dp.geo_drops(country) {
        d.country = country;
        return finish(d, action::DROP, reason::GEO);
    }
    if dp.rate_enabled != 0 && p.syn {
        if dp.ban_threshold != 0 && state.over_ban_threshold {
            return finish(d, action::DROP, reason::RATE_BAN);
        }
        if dp.rate_interval_ns != 0 && state.bucket_empty {
            return finish(d, action::DROP, reason::RATE_LIMITED);
        }
    }
    if dp.profile[slot] == profile::SMTP && dp.smtp_block != 0 {
        let scanned = &p.payload[..p.payload.len().min(smtp_scan::SCAN_BYTES)];
        if smtp_scan::scan(dp.smtp_block, smtp_scan::AT_LINE_START, scanned).blocked {
            return finish(d, action::DROP, reason::SMTP_COMMAND);
        }
    }
    if dp.default_action[slot] == action::DROP {
        finish(d, action::DROP, reason::DEFAULT_DENY)
    } else {
        finish(d, action::PASS, reason::DEFAULT_ALLOW)
    }
}

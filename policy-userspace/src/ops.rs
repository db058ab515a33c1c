//! Operator commands that work on the pinned state, with or without a
//! running controller: status, bans, ban, unban, detach.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use aya::maps::{Array, Map, MapData, PerCpuArray};
use policy_common::{
    direction, reason,
    source::{ban_origin, source_key_v4, source_key_v6, source_set, SlotInfo, SourceSet, SourceSlot, WAYS},
    stats_index, verdict, Counter, PolicyConfig, Runtime, PORT_SLOTS,
};

use crate::{dataplane::ktime_now_ns, pins::Pins};

/// Network bans as `bans` lists them.
pub fn network_ban_rows(bans: &[(ipnet::IpNet, u64)]) -> Vec<Ban> {
    let now = ktime_now_ns();
    bans.iter()
        .map(|(net, until)| Ban { source: net.to_string(), remaining_s: until.saturating_sub(now) / 1_000_000_000, strikes: 1, origin: "manual" })
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error("nothing is attached: no smtpguard state pinned at {0} (start `smtpguard run` first)")]
    NotAttached(String),
    #[error("opening pinned map {path}: {message}")]
    Map { path: String, message: String },
    #[error("{0}")]
    Invalid(String),
}

type Result<T> = std::result::Result<T, OpsError>;

/// The widest networks `smtpguard ban` takes without `--force`: an IPv4 /8
/// (16 million addresses) and an IPv6 /32 (a large provider's allocation).
/// `0.0.0.0/0` or `::/0` would drop all port-25 traffic of the family.
pub const MIN_BAN_PREFIX_V4: u8 = 8;
pub const MIN_BAN_PREFIX_V6: u8 = 32;

/// Refuses a network ban wider than [`MIN_BAN_PREFIX_V4`]/[`MIN_BAN_PREFIX_V6`]
/// unless `force`.
pub fn check_network_ban(net: ipnet::IpNet, force: bool) -> Result<()> {
    let limit = match net {
        ipnet::IpNet::V4(_) => MIN_BAN_PREFIX_V4,
        ipnet::IpNet::V6(_) => MIN_BAN_PREFIX_V6,
    };
    if net.prefix_len() < limit && !force {
        return Err(OpsError::Invalid(format!(
            "{net} is wider than a /{limit}, the widest network `ban` takes: it would drop port 25 from every source in it{}; \
             give --force if that is what you want (nothing was changed)",
            if net.prefix_len() == 0 { " (all of them)" } else { "" }
        )));
    }
    Ok(())
}

/// The coarse-clock time `duration` from now, refused when it does not fit.
fn until_from_now(duration: Duration) -> Result<u64> {
    u64::try_from(duration.as_nanos())
        .ok()
        .and_then(|d| ktime_now_ns().checked_add(d))
        .ok_or_else(|| OpsError::Invalid(format!("a ban of {} s does not fit the clock (nothing was changed)", duration.as_secs())))
}

/// The pinned maps the operator commands use.
pub struct PinnedMaps {
    pins: Pins,
    runtime: Array<MapData, Runtime>,
    policy: Array<MapData, PolicyConfig>,
    stats: PerCpuArray<MapData, Counter>,
    sources: Array<MapData, SourceSet>,
    /// The same map again, for batch reads.
    sources_bulk: MapData,
}

fn open(pins: &Pins, name: &str) -> Result<MapData> {
    let path = pins.dir.join(name);
    MapData::from_pin(&path).map_err(|e| OpsError::Map { path: path.display().to_string(), message: e.to_string() })
}

fn typed<T>(r: std::result::Result<T, aya::maps::MapError>, name: &str) -> Result<T> {
    r.map_err(|e| OpsError::Map { path: name.to_owned(), message: e.to_string() })
}

impl PinnedMaps {
    pub fn open(pins: &Pins) -> Result<Self> {
        if !pins.exists() {
            return Err(OpsError::NotAttached(pins.dir.display().to_string()));
        }
        Ok(Self {
            pins: pins.clone(),
            runtime: typed(Array::try_from(Map::Array(open(pins, policy_common::RUNTIME)?)), policy_common::RUNTIME)?,
            policy: typed(Array::try_from(Map::Array(open(pins, policy_common::POLICY)?)), policy_common::POLICY)?,
            stats: typed(PerCpuArray::try_from(Map::PerCpuArray(open(pins, policy_common::STATS)?)), policy_common::STATS)?,
            sources: typed(Array::try_from(Map::Array(open(pins, policy_common::SOURCES)?)), policy_common::SOURCES)?,
            sources_bulk: open(pins, policy_common::SOURCES)?,
        })
    }

    pub fn runtime(&self) -> Result<Runtime> {
        typed(self.runtime.get(&0, 0), policy_common::RUNTIME)
    }

    pub fn policy(&self, generation: u32) -> Result<PolicyConfig> {
        typed(self.policy.get(&generation, 0), policy_common::POLICY)
    }

    pub fn stats(&self) -> Result<Vec<Counter>> {
        (0..self.stats.len())
            .map(|i| {
                let v = typed(self.stats.get(&i, 0), policy_common::STATS)?;
                Ok(v.iter().fold(Counter::default(), |s, c| s + *c))
            })
            .collect()
    }

    /// Every tracked source slot.
    pub fn sources(&self) -> Result<Vec<SourceSlot>> {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&std::os::fd::AsFd::as_fd(self.sources_bulk.fd()));
        crate::dataplane::tracked_sources(fd, self.sources.len())
            .map_err(|e| OpsError::Map { path: policy_common::SOURCES.to_owned(), message: e.to_string() })
    }

    fn source_key(addr: IpAddr) -> u64 {
        match addr {
            IpAddr::V4(a) => source_key_v4(a.octets()),
            IpAddr::V6(a) => source_key_v6(a.octets()),
        }
    }

    /// Bans `addr` until `duration` from now (a manual ban).
    pub fn ban(&mut self, addr: IpAddr, duration: Duration) -> Result<()> {
        let key = Self::source_key(addr);
        let sets = self.runtime()?.source_sets;
        let index = source_set(key, sets);
        let mut set = typed(self.sources.get(&index, 0), policy_common::SOURCES)?;
        let now = ktime_now_ns();
        let way = set
            .slots
            .iter()
            .position(|s| s.key == key)
            .or_else(|| set.slots.iter().position(|s| s.key == 0))
            .or_else(|| (0..WAYS).filter(|w| set.slots[*w].ban_until_ns <= now).min_by_key(|w| SlotInfo::unpack(set.slots[*w].info).last_seen_s))
            .unwrap_or(0);
        let slot = &mut set.slots[way];
        if slot.key != key {
            *slot = SourceSlot { key, ..SourceSlot::default() };
        }
        let mut info = SlotInfo::unpack(slot.info);
        info.strikes = info.strikes.saturating_add(1);
        info.origin = ban_origin::MANUAL;
        info.last_seen_s = (now / 1_000_000_000) as u32;
        slot.info = info.pack();
        slot.ban_until_ns = until_from_now(duration)?;
        typed(self.sources.set(index, set, 0), policy_common::SOURCES)?;
        // Counted on the first CPU's cell; readers sum all CPUs.
        let cell = policy_common::STATS_BANS_MANUAL;
        let mut values: Vec<Counter> = typed(self.stats.get(&cell, 0), policy_common::STATS)?.iter().copied().collect();
        values[0].packets += 1;
        let values = aya::maps::PerCpuValues::try_from(values).map_err(|e| OpsError::Invalid(e.to_string()))?;
        typed(self.stats.set(cell, values, 0), policy_common::STATS)
    }

    /// Bans a whole network (every source in it) until `duration` from now.
    pub fn ban_network(&mut self, net: ipnet::IpNet, duration: Duration) -> Result<()> {
        let until = until_from_now(duration)?;
        self.network_trie_op(net, Some(until))?;
        let mut rt = self.runtime()?;
        rt.cidr_bans = 1;
        typed(self.runtime.set(0, rt, 0), policy_common::RUNTIME)
    }

    /// Lifts a network ban; returns whether there was one.
    pub fn unban_network(&mut self, net: ipnet::IpNet) -> Result<bool> {
        let removed = self.network_trie_op(net, None)?;
        if self.network_bans()?.is_empty() {
            let mut rt = self.runtime()?;
            rt.cidr_bans = 0;
            typed(self.runtime.set(0, rt, 0), policy_common::RUNTIME)?;
        }
        Ok(removed)
    }

    /// Inserts (`Some(until)`) or removes a network ban.
    fn network_trie_op(&mut self, net: ipnet::IpNet, until: Option<u64>) -> Result<bool> {
        use aya::maps::lpm_trie::{Key, LpmTrie};
        match net {
            ipnet::IpNet::V4(n) => {
                let mut trie: LpmTrie<MapData, [u32; 1], u64> =
                    typed(LpmTrie::try_from(Map::LpmTrie(open(&self.pins, policy_common::BAN_V4)?)), policy_common::BAN_V4)?;
                let key = Key::new(n.prefix_len() as u32, [u32::from_ne_bytes(n.network().octets())]);
                match until {
                    Some(u) => typed(trie.insert(&key, u, 0), policy_common::BAN_V4).map(|_| true),
                    None => Ok(trie.remove(&key).is_ok()),
                }
            }
            ipnet::IpNet::V6(n) => {
                let mut trie: LpmTrie<MapData, [u32; 4], u64> =
                    typed(LpmTrie::try_from(Map::LpmTrie(open(&self.pins, policy_common::BAN_V6)?)), policy_common::BAN_V6)?;
                let o = n.network().octets();
                let words = [0, 1, 2, 3].map(|i| u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]));
                let key = Key::new(n.prefix_len() as u32, words);
                match until {
                    Some(u) => typed(trie.insert(&key, u, 0), policy_common::BAN_V6).map(|_| true),
                    None => Ok(trie.remove(&key).is_ok()),
                }
            }
        }
    }

    /// Active network bans: (network, until ns).
    pub fn network_bans(&self) -> Result<Vec<(ipnet::IpNet, u64)>> {
        use aya::maps::lpm_trie::LpmTrie;
        let now = ktime_now_ns();
        let mut out = Vec::new();
        let v4: LpmTrie<MapData, [u32; 1], u64> =
            typed(LpmTrie::try_from(Map::LpmTrie(open(&self.pins, policy_common::BAN_V4)?)), policy_common::BAN_V4)?;
        for item in v4.iter() {
            let (k, until) = typed(item, policy_common::BAN_V4)?;
            let addr = Ipv4Addr::from(k.data()[0].to_ne_bytes());
            if until > now {
                out.push((ipnet::IpNet::V4(ipnet::Ipv4Net::new(addr, k.prefix_len() as u8).map_err(|e| OpsError::Invalid(e.to_string()))?), until));
            }
        }
        let v6: LpmTrie<MapData, [u32; 4], u64> =
            typed(LpmTrie::try_from(Map::LpmTrie(open(&self.pins, policy_common::BAN_V6)?)), policy_common::BAN_V6)?;
        for item in v6.iter() {
            let (k, until) = typed(item, policy_common::BAN_V6)?;
            let addr = Ipv6Addr::from(policy_common::words_to_octets(&k.data()));
            if until > now {
                out.push((ipnet::IpNet::V6(ipnet::Ipv6Net::new(addr, k.prefix_len() as u8).map_err(|e| OpsError::Invalid(e.to_string()))?), until));
            }
        }
        Ok(out)
    }

    /// Lifts a ban; returns whether there was one.
    pub fn unban(&mut self, addr: IpAddr) -> Result<bool> {
        let key = Self::source_key(addr);
        let index = source_set(key, self.runtime()?.source_sets);
        let mut set = typed(self.sources.get(&index, 0), policy_common::SOURCES)?;
        let now = ktime_now_ns();
        let Some(slot) = set.slots.iter_mut().find(|s| s.key == key && s.ban_until_ns > now) else { return Ok(false) };
        slot.ban_until_ns = 0;
        typed(self.sources.set(index, set, 0), policy_common::SOURCES)?;
        Ok(true)
    }
}

/// The address a source key stands for (IPv6: the /64).
pub fn key_addr(key: u64) -> (IpAddr, u8) {
    if key >> 32 == 0xffff_ffff {
        (IpAddr::V4(Ipv4Addr::from(key as u32)), 32)
    } else {
        (IpAddr::V6(Ipv6Addr::from((key as u128) << 64)), 64)
    }
}

/// A ban as `bans` lists it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Ban {
    pub source: String,
    pub remaining_s: u64,
    pub strikes: u16,
    pub origin: &'static str,
}

pub fn origin_name(origin: u8) -> &'static str {
    match origin {
        ban_origin::AUTO => "auto",
        ban_origin::ESCALATED => "escalated",
        ban_origin::MANUAL => "manual",
        _ => "none",
    }
}

pub fn active_bans(slots: &[SourceSlot]) -> Vec<Ban> {
    let now = ktime_now_ns();
    let mut bans: Vec<Ban> = slots
        .iter()
        .filter(|s| s.ban_until_ns > now)
        .map(|s| {
            let (addr, len) = key_addr(s.key);
            let info = SlotInfo::unpack(s.info);
            Ban { source: format!("{addr}/{len}"), remaining_s: (s.ban_until_ns - now) / 1_000_000_000, strikes: info.strikes, origin: origin_name(info.origin) }
        })
        .collect();
    bans.sort_by_key(|b| std::cmp::Reverse(b.remaining_s));
    bans
}

/// `smtpguard status`.
pub fn status(pins: &Pins) -> Result<String> {
    let maps = PinnedMaps::open(pins)?;
    let rt = maps.runtime()?;
    let policy = maps.policy(rt.active)?;
    let stats = maps.stats()?;
    let mut out = format!("policy generation {} (slot {})\n", policy.generation, rt.active);
    out += &format!("controller: {}\n", pins.controller_pid().map(|p| format!("running, pid {p}")).unwrap_or_else(|| "not running (enforcement continues from the pins)".into()));
    out += "attached:\n";
    for (kind, iface) in pins.links() {
        out += &format!("  {kind:<10} {iface}\n");
    }
    out += "counters (packets, bytes):\n";
    for dir in [direction::INGRESS, direction::EGRESS] {
        for v in 0..verdict::COUNT as u8 {
            for r in 0..reason::COUNT as u8 {
                let (mut p, mut b) = (0, 0);
                for slot in 0..PORT_SLOTS {
                    let c = stats[stats_index(dir, v, r, slot) as usize];
                    p += c.packets;
                    b += c.bytes;
                }
                if p > 0 {
                    out += &format!(
                        "  {:<8} {:<10} {:<14} {p:>12} {b:>14}\n",
                        direction::NAMES[dir as usize],
                        verdict::NAMES[v as usize],
                        reason::NAMES[r as usize]
                    );
                }
            }
        }
    }
    let bans = active_bans(&maps.sources()?);
    out += &format!("active bans: {}\n", bans.len());
    Ok(out)
}

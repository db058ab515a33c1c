//! Operator commands that work on the pinned state, with or without a
//! running controller: status, bans, ban, unban, detach.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd, AsRawFd},
    time::Duration,
};

use aya::maps::{Array, Map, MapData, PerCpuArray};
use policy_common::{
    claim_kind, direction, reason,
    source::{ban_origin, source_key_v4, source_key_v6, SlotInfo, SourceSlot},
    stats_index, verdict, Counter, PolicyConfig, Runtime, PORT_SLOTS, STATS_CLAIMS,
};

use crate::{
    dataplane::{check_pinned_maps, ktime_now_ns, IncompatiblePins},
    pins::Pins,
    runtime::RuntimeWords,
    sources::{Contended, SourceTable},
};

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
    #[error(transparent)]
    Incompatible(#[from] IncompatiblePins),
    #[error(transparent)]
    Contended(#[from] Contended),
    #[error("locking {path} (another `smtpguard ban` holds it?): {source}")]
    Lock { path: String, source: std::io::Error },
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
    runtime: RuntimeWords,
    policy: Array<MapData, PolicyConfig>,
    stats: PerCpuArray<MapData, Counter>,
    sources: SourceTable,
}

fn open(pins: &Pins, name: &str) -> Result<MapData> {
    let path = pins.dir.join(name);
    MapData::from_pin(&path).map_err(|e| OpsError::Map { path: path.display().to_string(), message: e.to_string() })
}

fn typed<T>(r: std::result::Result<T, aya::maps::MapError>, name: &str) -> Result<T> {
    r.map_err(|e| OpsError::Map { path: name.to_owned(), message: e.to_string() })
}

fn mapped<T>(r: std::io::Result<T>, pins: &Pins, name: &str) -> Result<T> {
    r.map_err(|e| OpsError::Map { path: pins.dir.join(name).display().to_string(), message: format!("mapping it: {e}") })
}

/// `flock` on the pin directory's ban-lock directory, held by the commands
/// that write bans: they serialise among themselves (the network-ban flag
/// is recomputed from the tries' contents under it; the manual-ban counter
/// is a read-modify-write). Not the pin directory itself: a running
/// controller holds that one. Released on drop.
struct BanLock(std::fs::File);

impl BanLock {
    fn take(pins: &Pins) -> Result<Self> {
        let path = pins.ban_lock_dir();
        let lock_error = |source| OpsError::Lock { path: path.display().to_string(), source };
        match std::fs::create_dir(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(lock_error(e)),
            _ => {}
        }
        let dir = std::fs::File::open(&path).map_err(lock_error)?;
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(dir.as_fd().as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(lock_error(std::io::Error::last_os_error()));
        }
        Ok(Self(dir))
    }
}

impl Drop for BanLock {
    fn drop(&mut self) {
        // SAFETY: as in `take`; closing the file would release it too.
        unsafe { libc::flock(self.0.as_fd().as_raw_fd(), libc::LOCK_UN) };
    }
}

impl PinnedMaps {
    pub fn open(pins: &Pins) -> Result<Self> {
        if !pins.exists() {
            return Err(OpsError::NotAttached(pins.dir.display().to_string()));
        }
        check_pinned_maps(&pins.dir)?;
        let runtime = open(pins, policy_common::RUNTIME)?;
        let runtime = mapped(RuntimeWords::open(runtime.fd().as_fd()), pins, policy_common::RUNTIME)?;
        let sources = open(pins, policy_common::SOURCES)?;
        let sets = typed(sources.info(), policy_common::SOURCES)?.max_entries();
        let sources = mapped(SourceTable::open(sources.fd().as_fd(), sets), pins, policy_common::SOURCES)?;
        Ok(Self {
            pins: pins.clone(),
            runtime,
            policy: typed(Array::try_from(Map::Array(open(pins, policy_common::POLICY)?)), policy_common::POLICY)?,
            stats: typed(PerCpuArray::try_from(Map::PerCpuArray(open(pins, policy_common::STATS)?)), policy_common::STATS)?,
            sources,
        })
    }

    /// The runtime settings, each word read atomically.
    pub fn runtime(&self) -> Result<Runtime> {
        Ok(self.runtime.read())
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

    /// The mapped source table.
    pub fn source_table(&self) -> &SourceTable {
        &self.sources
    }

    /// Every tracked source slot.
    pub fn sources(&self) -> Result<Vec<SourceSlot>> {
        Ok(self.sources.slots())
    }

    fn source_key(addr: IpAddr) -> u64 {
        match addr {
            IpAddr::V4(a) => source_key_v4(a.octets()),
            IpAddr::V6(a) => source_key_v6(a.octets()),
        }
    }

    /// Bans `addr` until `duration` from now (a manual ban). Only the
    /// source's own way is written, with the datapath's protocol (see
    /// [`SourceTable::ban`]): the datapath's updates of the other ways of
    /// the set stand.
    pub fn ban(&mut self, addr: IpAddr, duration: Duration) -> Result<()> {
        let until = until_from_now(duration)?;
        let _lock = BanLock::take(&self.pins)?;
        self.sources.ban(Self::source_key(addr), until, ktime_now_ns)?;
        // Counted on the first CPU's cell; readers sum all CPUs. The
        // datapath never writes this cell, and bans hold the lock.
        let cell = policy_common::STATS_BANS_MANUAL;
        let mut values: Vec<Counter> = typed(self.stats.get(&cell, 0), policy_common::STATS)?.iter().copied().collect();
        values[0].packets += 1;
        let values = aya::maps::PerCpuValues::try_from(values).map_err(|e| OpsError::Invalid(e.to_string()))?;
        typed(self.stats.set(cell, values, 0), policy_common::STATS)
    }

    /// Bans a whole network (every source in it) until `duration` from now.
    pub fn ban_network(&mut self, net: ipnet::IpNet, duration: Duration) -> Result<()> {
        let until = until_from_now(duration)?;
        let _lock = BanLock::take(&self.pins)?;
        self.network_trie_op(net, Some(until))?;
        self.update_network_ban_flag()
    }

    /// Lifts a network ban; returns whether there was one.
    pub fn unban_network(&mut self, net: ipnet::IpNet) -> Result<bool> {
        let _lock = BanLock::take(&self.pins)?;
        let removed = self.network_trie_op(net, None)?;
        self.update_network_ban_flag()?;
        Ok(removed)
    }

    /// Sets `RUNTIME.cidr_bans` from what the tries hold (the commands
    /// holding the ban lock are its only writers, so the flag is set
    /// whenever a ban is in a trie).
    fn update_network_ban_flag(&mut self) -> Result<()> {
        let any = !self.network_bans()?.is_empty();
        self.runtime.set_cidr_bans(any);
        Ok(())
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

    /// Lifts a ban; returns whether there was one. Writes only the
    /// source's ban word ([`SourceTable::unban`]).
    pub fn unban(&mut self, addr: IpAddr) -> Result<bool> {
        let _lock = BanLock::take(&self.pins)?;
        Ok(self.sources.unban(Self::source_key(addr), ktime_now_ns)?)
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
    let table = maps.source_table().snapshot(ktime_now_ns());
    out += &format!("source table: {} of {} ways tracked\n", table.tracked, table.capacity);
    let claims = source_claims(&stats);
    let kinds = |range: std::ops::Range<usize>| -> String {
        range.map(|k| format!("{} {}", claim_kind::NAMES[k], claims[k])).collect::<Vec<_>>().join(", ")
    };
    out += &format!(
        "new sources tracked: {} (free way: {}; evicted: {})\n",
        claims.iter().sum::<u64>(),
        claims[claim_kind::FREE as usize],
        kinds(claim_kind::STALE as usize..claim_kind::COUNT)
    );
    out += &format!("active bans: {}\n", table.banned.iter().sum::<u64>());
    Ok(out)
}

/// The datapath's claims of a way for a new source, by [`claim_kind`],
/// from the summed `STATS` cells.
pub fn source_claims(stats: &[Counter]) -> [u64; claim_kind::COUNT] {
    std::array::from_fn(|k| stats.get(STATS_CLAIMS as usize + k).map_or(0, |c| c.packets))
}

//! Manual bans, as `smtpguard ban`/`unban` make them: a source's own way
//! in `SOURCES` (with the datapath's protocol, see [`SourceTable`]), or a
//! network in `BAN_V4`/`BAN_V6` with the `RUNTIME` flag that makes the
//! datapath look there. Writers serialise on a lock of their own.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd, AsRawFd},
    path::Path,
    time::Duration,
};

use aya::maps::lpm_trie::Key;
use policy_common::source::{ban_origin, source_key_v4, source_key_v6};

#[cfg(doc)]
use super::source_table::SourceTable;
use super::{maps::Maps, source_table::BanWay, DataplaneError, Result};
use crate::clock::ktime_now_ns;

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
        return Err(DataplaneError::Refused(format!(
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
        .ok_or_else(|| DataplaneError::Refused(format!("a ban of {} s does not fit the clock (nothing was changed)", duration.as_secs())))
}

/// `flock` on a directory of its own, held by the commands that write
/// bans: they serialise among themselves (the network-ban flag is
/// recomputed from the tries' contents under it; the manual-ban counter
/// is a read-modify-write). Released on drop.
pub struct BanLock(std::fs::File);

impl BanLock {
    /// Takes the lock on `dir` (created if missing): not the pin directory
    /// itself, which a running controller holds.
    pub fn take(dir: &Path) -> Result<Self> {
        let lock_error = |source| DataplaneError::Lock { path: dir.display().to_string(), source };
        match std::fs::create_dir(dir) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(lock_error(e)),
            _ => {}
        }
        let file = std::fs::File::open(dir).map_err(lock_error)?;
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(file.as_fd().as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(lock_error(std::io::Error::last_os_error()));
        }
        Ok(Self(file))
    }
}

impl Drop for BanLock {
    fn drop(&mut self) {
        // SAFETY: as in `take`; closing the file would release it too.
        unsafe { libc::flock(self.0.as_fd().as_raw_fd(), libc::LOCK_UN) };
    }
}

/// The source table's key of an address (IPv6: its /64).
pub fn source_key(addr: IpAddr) -> u64 {
    match addr {
        IpAddr::V4(a) => source_key_v4(a.octets()),
        IpAddr::V6(a) => source_key_v6(a.octets()),
    }
}

/// The address a source key stands for, and its prefix length (IPv6: the /64).
pub fn key_addr(key: u64) -> (IpAddr, u8) {
    if key >> 32 == 0xffff_ffff {
        (IpAddr::V4(Ipv4Addr::from(key as u32)), 32)
    } else {
        (IpAddr::V6(Ipv6Addr::from((key as u128) << 64)), 64)
    }
}

fn map_error(name: &'static str) -> impl Fn(aya::maps::MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
}

impl Maps {
    /// Bans `addr` until `duration` from now (a manual ban), under `lock`.
    /// Only the source's own way is written, with the datapath's protocol:
    /// the datapath's updates of the other ways of the set stand.
    pub fn ban_source(&mut self, _lock: &BanLock, addr: IpAddr, duration: Duration) -> Result<BanWay> {
        let until = until_from_now(duration)?;
        let way = self.source_table().ban(source_key(addr), until, ban_origin::MANUAL, ktime_now_ns)?;
        // Counted on the first CPU's cell; readers sum all CPUs. The
        // datapath never writes this cell, and bans hold the lock.
        self.count_on_first_cpu(policy_common::STATS_BANS_MANUAL)?;
        Ok(way)
    }

    /// Quarantines a tenant suspect: bans `addr` on every guarded port for
    /// `duration`, origin quarantine (the controller, on `tenant_suspect`).
    pub fn quarantine_source(&mut self, _lock: &BanLock, addr: IpAddr, duration: Duration) -> Result<BanWay> {
        let until = until_from_now(duration)?;
        Ok(self.source_table().ban(source_key(addr), until, ban_origin::QUARANTINE, ktime_now_ns)?)
    }

    /// Lifts a source's ban; returns whether there was one. Writes only
    /// the source's ban word.
    pub fn unban_source(&mut self, _lock: &BanLock, addr: IpAddr) -> Result<bool> {
        Ok(self.source_table().unban(source_key(addr), ktime_now_ns)?)
    }

    /// Bans a whole network (every source in it) until `duration` from now.
    pub fn ban_network(&mut self, _lock: &BanLock, net: ipnet::IpNet, duration: Duration) -> Result<()> {
        let until = until_from_now(duration)?;
        self.network_trie_op(net, Some(until))?;
        self.update_network_ban_flag()
    }

    /// Installs a network ban made elsewhere (the fleet's): until
    /// `until_ns`, or longer where a longer one is in force.
    pub fn install_network_ban(&mut self, _lock: &BanLock, net: ipnet::IpNet, until_ns: u64) -> Result<()> {
        if self.network_ban_until(net)?.is_some_and(|u| u >= until_ns) {
            return Ok(());
        }
        self.network_trie_op(net, Some(until_ns))?;
        self.update_network_ban_flag()
    }

    /// Lifts a network ban if it ends by `until_ns` (lifted elsewhere: a
    /// longer one made here since stands); returns whether it did.
    pub fn unban_network_ending_by(&mut self, lock: &BanLock, net: ipnet::IpNet, until_ns: u64) -> Result<bool> {
        match self.network_ban_until(net)? {
            Some(u) if u <= until_ns => self.unban_network(lock, net),
            _ => Ok(false),
        }
    }

    /// The end of the ban of exactly `net`, if one is in the trie.
    pub fn network_ban_until(&self, net: ipnet::IpNet) -> Result<Option<u64>> {
        Ok(self.network_bans_all()?.into_iter().find(|(n, _)| *n == net).map(|(_, u)| u))
    }

    /// Lifts a network ban; returns whether there was one.
    pub fn unban_network(&mut self, _lock: &BanLock, net: ipnet::IpNet) -> Result<bool> {
        let removed = self.network_trie_op(net, None)?;
        self.update_network_ban_flag()?;
        Ok(removed)
    }

    /// Sets `RUNTIME.cidr_bans` from what the tries hold (the commands
    /// holding the ban lock are its only writers, so the flag is set
    /// whenever a ban is in a trie).
    fn update_network_ban_flag(&mut self) -> Result<()> {
        let any = !self.network_bans()?.is_empty();
        self.runtime_words().set_cidr_bans(any);
        Ok(())
    }

    /// Inserts (`Some(until)`) or removes a network ban.
    fn network_trie_op(&mut self, net: ipnet::IpNet, until: Option<u64>) -> Result<bool> {
        match net {
            ipnet::IpNet::V4(n) => {
                let key = Key::new(n.prefix_len() as u32, [u32::from_ne_bytes(n.network().octets())]);
                match until {
                    Some(u) => self.ban_v4.insert(&key, u, 0).map(|_| true).map_err(map_error(policy_common::BAN_V4)),
                    None => Ok(self.ban_v4.remove(&key).is_ok()),
                }
            }
            ipnet::IpNet::V6(n) => {
                let o = n.network().octets();
                let words = [0, 1, 2, 3].map(|i| u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]));
                let key = Key::new(n.prefix_len() as u32, words);
                match until {
                    Some(u) => self.ban_v6.insert(&key, u, 0).map(|_| true).map_err(map_error(policy_common::BAN_V6)),
                    None => Ok(self.ban_v6.remove(&key).is_ok()),
                }
            }
        }
    }

    /// Network bans in force: (network, until ns).
    pub fn network_bans(&self) -> Result<Vec<(ipnet::IpNet, u64)>> {
        let now = ktime_now_ns();
        Ok(self.network_bans_all()?.into_iter().filter(|(_, until)| *until > now).collect())
    }

    /// Removes network bans that ended (the datapath ignores them, but
    /// they hold room in the tries); returns how many.
    pub fn prune_network_bans(&mut self, _lock: &BanLock) -> Result<usize> {
        let now = ktime_now_ns();
        let ended: Vec<_> = self.network_bans_all()?.into_iter().filter(|(_, u)| *u <= now).collect();
        for (net, _) in &ended {
            self.network_trie_op(*net, None)?;
        }
        if !ended.is_empty() {
            self.update_network_ban_flag()?;
        }
        Ok(ended.len())
    }

    /// Every network ban in the tries, ended or not.
    fn network_bans_all(&self) -> Result<Vec<(ipnet::IpNet, u64)>> {
        let mut out = Vec::new();
        for item in self.ban_v4.iter() {
            let (k, until) = item.map_err(map_error(policy_common::BAN_V4))?;
            let net = ipnet::Ipv4Net::new(Ipv4Addr::from(k.data()[0].to_ne_bytes()), k.prefix_len() as u8).map_err(|e| DataplaneError::Refused(e.to_string()))?;
            out.push((ipnet::IpNet::V4(net), until));
        }
        for item in self.ban_v6.iter() {
            let (k, until) = item.map_err(map_error(policy_common::BAN_V6))?;
            let addr = Ipv6Addr::from(policy_common::words_to_octets(&k.data()));
            let net = ipnet::Ipv6Net::new(addr, k.prefix_len() as u8).map_err(|e| DataplaneError::Refused(e.to_string()))?;
            out.push((ipnet::IpNet::V6(net), until));
        }
        Ok(out)
    }
}

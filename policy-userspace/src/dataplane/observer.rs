//! A read-only view of the datapath's counters and tables that other
//! threads own: the metrics server reads through it while the control loop
//! keeps the [`Dataplane`](crate::dataplane::Dataplane). It holds its own
//! duplicates of the map fds (and a share of the source table's mapping),
//! so it is `Send + Sync`.

use std::{
    os::fd::{AsFd, AsRawFd, OwnedFd},
    sync::Arc,
};

use policy_common::{Counter, GEO_DROPS_ENTRIES, STATS_ENTRIES};

use super::{batch, source_table::SourceTable};

pub struct Observer {
    pub(super) stats: OwnedFd,
    pub(super) geo_drops: OwnedFd,
    /// The mapped source table (shared with the dataplane).
    pub(super) sources: Arc<SourceTable>,
    pub(super) bypass: Arc<super::bypass::BypassSwitch>,
    pub(super) ban_v4: OwnedFd,
    pub(super) ban_v6: OwnedFd,
    pub(super) tenant_ifaces: OwnedFd,
    pub(super) tenant_stats: OwnedFd,
    pub(super) tenant_sources: OwnedFd,
    pub(super) rule_hits: OwnedFd,
    pub(super) shadow_diffs: OwnedFd,
    pub(super) shadow_totals: OwnedFd,
    /// The kernel's possible CPUs: per-CPU values come in this many.
    pub(super) cpus: usize,
    /// Client streams `SMTP_FLOWS` holds, as the map was made.
    pub(super) smtp_flow_capacity: u32,
}

impl Observer {
    /// Every `STATS` cell, summed over CPUs.
    pub fn stats(&self) -> std::io::Result<Vec<Counter>> {
        batch::per_cpu_sums(self.stats.as_raw_fd(), STATS_ENTRIES, self.cpus)
    }

    /// The hits of each rule id of kernel generation `generation`.
    pub fn rule_hits(&self, generation: u32) -> std::io::Result<Vec<u64>> {
        let all = batch::per_cpu_sums(self.rule_hits.as_raw_fd(), policy_common::RULE_HITS_ENTRIES, self.cpus)?;
        Ok(super::maps::rule_cells(&all, generation))
    }

    /// The `shadow_total` cells, summed over CPUs.
    pub fn shadow_totals(&self) -> std::io::Result<Vec<u64>> {
        batch::per_cpu_sums(self.shadow_totals.as_raw_fd(), policy_common::shadow_total::COUNT, self.cpus)
    }

    /// Every shadow difference, summed over CPUs.
    pub fn shadow_diffs(&self) -> std::io::Result<Vec<(policy_common::ShadowKey, u64)>> {
        use aya::maps::{Map, MapData, PerCpuHashMap};
        let data = MapData::from_fd(self.shadow_diffs.try_clone()?).map_err(std::io::Error::other)?;
        let map: PerCpuHashMap<MapData, policy_common::ShadowKey, u64> = PerCpuHashMap::try_from(Map::PerCpuHashMap(data)).map_err(std::io::Error::other)?;
        map.iter().map(|r| r.map(|(k, v)| (k, v.iter().sum())).map_err(std::io::Error::other)).collect()
    }

    /// Every `GEO_DROPS` cell, summed over CPUs.
    pub fn geo_drops(&self) -> std::io::Result<Vec<u64>> {
        batch::per_cpu_sums(self.geo_drops.as_raw_fd(), GEO_DROPS_ENTRIES, self.cpus)
    }

    /// The source table, read through its mapping.
    pub fn sources(&self) -> &SourceTable {
        &self.sources
    }

    /// Since when enforcement is bypassed (`smtpguard bypass on`).
    pub fn bypass_since(&self) -> Option<u64> {
        self.bypass.since()
    }

    /// Manual network bans stored, IPv4 and IPv6 (expired ones included).
    pub fn network_ban_counts(&self) -> std::io::Result<(u64, u64)> {
        Ok((count_keys(&self.ban_v4, 4)?, count_keys(&self.ban_v6, 16)?))
    }

    /// Another view of the same maps (fresh fds), for another thread.
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(Self {
            stats: self.stats.try_clone()?,
            geo_drops: self.geo_drops.try_clone()?,
            sources: self.sources.clone(),
            bypass: self.bypass.clone(),
            ban_v4: self.ban_v4.try_clone()?,
            ban_v6: self.ban_v6.try_clone()?,
            tenant_ifaces: self.tenant_ifaces.try_clone()?,
            tenant_stats: self.tenant_stats.try_clone()?,
            tenant_sources: self.tenant_sources.try_clone()?,
            rule_hits: self.rule_hits.try_clone()?,
            shadow_diffs: self.shadow_diffs.try_clone()?,
            shadow_totals: self.shadow_totals.try_clone()?,
            cpus: self.cpus,
            smtp_flow_capacity: self.smtp_flow_capacity,
        })
    }

    /// (ifindex, slot) of every tenant interface.
    pub fn tenant_slots(&self) -> std::io::Result<Vec<(u32, u32)>> {
        super::tenants::read_slots(self.tenant_ifaces.as_fd())
    }

    /// Every `TENANT_STATS` cell, summed over CPUs.
    pub fn tenant_stats(&self) -> std::io::Result<Vec<u64>> {
        super::tenants::read_stats(self.tenant_stats.as_fd(), self.cpus)
    }

    /// Every source behind a tenant interface the datapath tracks.
    pub fn tenant_sources(&self) -> std::io::Result<Vec<super::tenants::TenantSource>> {
        super::tenants::read_sources(self.tenant_sources.as_fd())
    }

    /// Client streams the command filter can follow.
    pub fn smtp_flow_capacity(&self) -> u64 {
        self.smtp_flow_capacity as u64
    }

    /// Sources the table can hold.
    pub fn source_capacity(&self) -> u64 {
        self.sources.sets() as u64 * policy_common::source::WAYS as u64
    }
}

/// Keys in the LPM trie behind `fd` (address of `addr_len` bytes), walked
/// with BPF_MAP_GET_NEXT_KEY.
fn count_keys(fd: &OwnedFd, addr_len: usize) -> std::io::Result<u64> {
    const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
    // An LPM key: a u32 prefix length, then the address.
    let mut key = [0u8; 20];
    let mut next = [0u8; 20];
    let mut count = 0;
    let mut first = true;
    loop {
        // bpf_attr: map_fd, pad, key, next_key.
        let mut attr = [0u64; 4];
        attr[0] = fd.as_raw_fd() as u64;
        attr[1] = if first { 0 } else { key.as_ptr() as u64 };
        attr[2] = next.as_mut_ptr() as u64;
        // SAFETY: both buffers hold a whole key of this trie (4 + addr_len <= 20 bytes).
        let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_GET_NEXT_KEY, attr.as_mut_ptr(), std::mem::size_of_val(&attr)) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::ENOENT) { Ok(count) } else { Err(e) };
        }
        count += 1;
        key[..4 + addr_len].copy_from_slice(&next[..4 + addr_len]);
        first = false;
    }
}

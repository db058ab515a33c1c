//! Tenant interfaces in the maps: which interface holds which slot of
//! `TENANT_STATS` (`TENANT_IFACES`), what each slot counted, and the
//! sources behind them that keep hitting the deny (`TENANT_SOURCES`; the
//! rules are `policy_common::tenant`). Read by the metrics thread, by
//! `smtpguard tenants` from the pins, and written by the controller as
//! interfaces come and go.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, BorrowedFd},
};

use aya::maps::{HashMap, Map, MapData, PerCpuArray, PerCpuValues};
use policy_common::{
    tenant::{self, SourceKey, SourceState},
    TENANT_STATS_ENTRIES,
};

use super::{batch, maps::Maps, DataplaneError, Result};
use crate::clock::ktime_now_ns;

/// A source behind a tenant interface, as `TENANT_SOURCES` holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TenantSource {
    pub ifindex: u32,
    pub addr: IpAddr,
    pub state: SourceState,
}

impl TenantSource {
    /// In a reported episode whose last blocked connection is at most
    /// `window_s` old.
    pub fn suspect_now(&self, window_s: u32) -> bool {
        let now_s = (ktime_now_ns() / 1_000_000_000) as u32;
        self.state.reported != 0 && now_s.wrapping_sub(self.state.last_s) <= window_s.max(1)
    }
}

fn io(name: &'static str) -> impl Fn(aya::maps::MapError) -> std::io::Error {
    move |e| std::io::Error::other(format!("{name}: {e}"))
}

fn map_of(fd: BorrowedFd<'_>, name: &'static str) -> std::io::Result<MapData> {
    MapData::from_fd(fd.try_clone_to_owned()?).map_err(io(name))
}

/// (ifindex, slot) of every tenant interface.
pub fn read_slots(ifaces: BorrowedFd<'_>) -> std::io::Result<Vec<(u32, u32)>> {
    let name = policy_common::TENANT_IFACES;
    let map: HashMap<MapData, u32, u32> = HashMap::try_from(Map::HashMap(map_of(ifaces, name)?)).map_err(io(name))?;
    map.iter().map(|r| r.map_err(io(name))).collect()
}

/// Every `TENANT_STATS` cell, summed over CPUs (index `tenant::cell`).
pub fn read_stats(stats: BorrowedFd<'_>, cpus: usize) -> std::io::Result<Vec<u64>> {
    batch::per_cpu_sums(stats.as_raw_fd(), TENANT_STATS_ENTRIES, cpus)
}

/// Every source `TENANT_SOURCES` holds.
pub fn read_sources(sources: BorrowedFd<'_>) -> std::io::Result<Vec<TenantSource>> {
    let name = policy_common::TENANT_SOURCES;
    let map: HashMap<MapData, SourceKey, SourceState> = HashMap::try_from(Map::LruHashMap(map_of(sources, name)?)).map_err(io(name))?;
    let mut out = Vec::new();
    for r in map.iter() {
        // An entry evicted between the key walk and its lookup is skipped.
        let Ok((key, state)) = r else { continue };
        out.push(TenantSource { ifindex: key.ifindex, addr: key_addr(&key), state });
    }
    Ok(out)
}

fn key_addr(key: &SourceKey) -> IpAddr {
    let o = policy_common::words_to_octets(&key.src);
    if key.v6 != 0 {
        IpAddr::V6(Ipv6Addr::from(o))
    } else {
        IpAddr::V4(Ipv4Addr::new(o[0], o[1], o[2], o[3]))
    }
}

/// A slot's cells: `(verdict, reason, packets)` that are not zero.
pub fn slot_cells(stats: &[u64], slot: u32) -> impl Iterator<Item = (u8, u8, u64)> + '_ {
    (0..policy_common::verdict::COUNT as u8).flat_map(move |v| {
        (0..policy_common::reason::COUNT as u8).filter_map(move |r| {
            let n = stats.get(tenant::cell(slot, v, r) as usize).copied().unwrap_or(0);
            (n > 0).then_some((v, r, n))
        })
    })
}

impl Maps {
    /// Makes `ifindex` a tenant interface counted at `slot`, after zeroing
    /// what the slot counted for an earlier interface.
    pub fn assign_tenant(&mut self, ifindex: u32, slot: u32) -> Result<()> {
        let name = policy_common::TENANT_STATS;
        let mut stats: PerCpuArray<MapData, u64> =
            PerCpuArray::try_from(Map::PerCpuArray(MapData::from_fd(self.dup_fd(name)?).map_err(map_error(name))?)).map_err(map_error(name))?;
        for cell in tenant::cell(slot, 0, 0)..tenant::cell(slot + 1, 0, 0) {
            let zeroes = PerCpuValues::try_from(vec![0u64; self.cpus()]).map_err(|e| DataplaneError::Refused(e.to_string()))?;
            stats.set(cell, zeroes, 0).map_err(map_error(name))?;
        }
        self.tenant_ifaces().insert(ifindex, slot, 0).map_err(map_error(policy_common::TENANT_IFACES))
    }

    /// Forgets a tenant interface (gone, or no longer wanted).
    pub fn release_tenant(&mut self, ifindex: u32) -> Result<()> {
        match self.tenant_ifaces().remove(&ifindex) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(DataplaneError::Map { name: policy_common::TENANT_IFACES, source }),
        }
    }

    /// (ifindex, slot) of every tenant interface.
    pub fn tenant_slots(&self) -> Result<Vec<(u32, u32)>> {
        let fd = self.dup_fd(policy_common::TENANT_IFACES)?;
        read_slots(std::os::fd::AsFd::as_fd(&fd)).map_err(|source| DataplaneError::Batch { name: policy_common::TENANT_IFACES, source })
    }

    /// Every `TENANT_STATS` cell, summed over CPUs.
    pub fn tenant_stats(&self) -> Result<Vec<u64>> {
        let fd = self.dup_fd(policy_common::TENANT_STATS)?;
        read_stats(std::os::fd::AsFd::as_fd(&fd), self.cpus()).map_err(|source| DataplaneError::Batch { name: policy_common::TENANT_STATS, source })
    }

    /// Every source behind a tenant interface the datapath tracks.
    pub fn tenant_sources(&self) -> Result<Vec<TenantSource>> {
        let fd = self.dup_fd(policy_common::TENANT_SOURCES)?;
        read_sources(std::os::fd::AsFd::as_fd(&fd)).map_err(|source| DataplaneError::Batch { name: policy_common::TENANT_SOURCES, source })
    }
}

fn map_error(name: &'static str) -> impl Fn(aya::maps::MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
}

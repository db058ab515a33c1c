//! Every map of the datapath as one typed layer. The controller gets it
//! from the object it loaded ([`Maps::take`]); operator commands open the
//! same maps from the pins of a running datapath ([`Maps::open_pinned`]).
//! Nothing else holds a map handle: other modules call these methods.

use std::{
    os::fd::{AsFd, AsRawFd, OwnedFd},
    path::Path,
    sync::Arc,
};

use aya::{
    maps::{lpm_trie::LpmTrie, Array, HashMap, IterableMap, Map, MapData, PerCpuHashMap, RingBuf},
    Ebpf,
};
use policy_common::{
    smtp_flow::{SmtpFlowKey, SmtpFlowState},
    AclEntry, AclKeyV6, Counter, Event, PolicyConfig, Runtime, ShadowKey, ShadowSource, GEO_DROPS_ENTRIES, STATS_ENTRIES,
};

use super::{
    acl4_writer, batch, bypass::BypassSwitch, check_pinned_maps, observer::Observer, runtime_words::RuntimeWords, source_table::SourceTable, DataplaneError,
    Result,
};

pub struct Maps {
    runtime: RuntimeWords,
    bypass: Arc<BypassSwitch>,
    policy: Array<MapData, PolicyConfig>,
    acl_v6: LpmTrie<MapData, AclKeyV6, AclEntry>,
    /// The IPv4 ACL arrays, mapped for writing (only where the maps were
    /// loaded: operator commands have no use for them).
    acl4: Option<acl4_writer::Arrays>,
    sources: Arc<SourceTable>,
    pub(super) ban_v4: LpmTrie<MapData, [u32; 1], u64>,
    pub(super) ban_v6: LpmTrie<MapData, [u32; 4], u64>,
    tenant_ifaces: HashMap<MapData, u32, u32>,
    shadow_diffs: PerCpuHashMap<MapData, ShadowKey, u64>,
    shadow_sources: PerCpuHashMap<MapData, ShadowSource, u64>,
    smtp_flows: HashMap<MapData, SmtpFlowKey, SmtpFlowState>,
    /// Only where the maps were loaded: draining belongs to the controller.
    events: Option<RingBuf<MapData>>,
    /// The kernel's possible CPUs: per-CPU values come in this many.
    cpus: usize,
    /// A duplicate fd of every map, for what the typed handles do not
    /// offer: batch reads, memlock, the observer's own fds.
    fds: Vec<(&'static str, OwnedFd)>,
}

/// Every entry of a per-CPU hash map, its values summed over CPUs.
fn per_cpu_entries<K: aya::Pod>(map: &PerCpuHashMap<MapData, K, u64>, name: &'static str) -> Result<Vec<(K, u64)>> {
    map.iter().map(|r| r.map(|(k, v)| (k, v.iter().sum())).map_err(map_error(name))).collect()
}

/// One generation's share of every `RULE_HITS` cell.
pub(super) fn rule_cells(all: &[u64], generation: u32) -> Vec<u64> {
    let first = policy_common::rule_hits_index(generation, 0) as usize;
    all.get(first..first + policy_common::RULE_SLOTS as usize).map(<[u64]>::to_vec).unwrap_or_default()
}

fn map_error(name: &'static str) -> impl Fn(aya::maps::MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
}

/// Where the maps come from: the loaded object, or pins.
enum Source<'a> {
    Object(&'a mut Ebpf),
    Pins(&'a Path),
}

impl Source<'_> {
    /// The map, and a duplicate of its fd kept in `fds`.
    fn take_kept(&mut self, name: &'static str, fds: &mut Vec<(&'static str, OwnedFd)>) -> Result<Map> {
        let map = self.take(name)?;
        let data = match &map {
            Map::Array(d)
            | Map::PerCpuArray(d)
            | Map::LpmTrie(d)
            | Map::HashMap(d)
            | Map::LruHashMap(d)
            | Map::PerCpuHashMap(d)
            | Map::PerCpuLruHashMap(d)
            | Map::RingBuf(d) => d,
            _ => return Err(DataplaneError::MissingMap(name)),
        };
        let fd = data.fd().as_fd().try_clone_to_owned().map_err(|e| DataplaneError::Pin { path: name.into(), message: e.to_string() })?;
        fds.push((name, fd));
        Ok(map)
    }

    fn take(&mut self, name: &'static str) -> Result<Map> {
        match self {
            Source::Object(ebpf) => ebpf.take_map(name).ok_or(DataplaneError::MissingMap(name)),
            Source::Pins(dir) => {
                let path = dir.join(name);
                let data = MapData::from_pin(&path).map_err(|e| DataplaneError::Pin { path: path.display().to_string(), message: e.to_string() })?;
                // The type is checked by the typed handle made from it.
                let info = data.info().map_err(map_error(name))?;
                Ok(match info.map_type().map_err(map_error(name))? {
                    aya::maps::MapType::Array => Map::Array(data),
                    aya::maps::MapType::PerCpuArray => Map::PerCpuArray(data),
                    aya::maps::MapType::LpmTrie => Map::LpmTrie(data),
                    aya::maps::MapType::Hash => Map::HashMap(data),
                    aya::maps::MapType::LruHash => Map::LruHashMap(data),
                    aya::maps::MapType::PerCpuHash => Map::PerCpuHashMap(data),
                    aya::maps::MapType::LruPerCpuHash => Map::PerCpuLruHashMap(data),
                    aya::maps::MapType::RingBuf => Map::RingBuf(data),
                    _ => return Err(DataplaneError::MissingMap(name)),
                })
            }
        }
    }

    fn data(&mut self, name: &'static str, fds: &mut Vec<(&'static str, OwnedFd)>) -> Result<MapData> {
        match self.take_kept(name, fds)? {
            Map::Array(d) | Map::PerCpuArray(d) | Map::LpmTrie(d) | Map::HashMap(d) | Map::LruHashMap(d) | Map::RingBuf(d) => Ok(d),
            _ => Err(DataplaneError::MissingMap(name)),
        }
    }
}

impl Maps {
    /// Takes every map out of a freshly loaded object.
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<Self> {
        let mut source = Source::Object(ebpf);
        let mut fds = Vec::new();
        let acl4 = Some(map_acl4(&mut source, &mut fds)?);
        let events = RingBuf::try_from(source.take(policy_common::EVENTS)?).map_err(map_error(policy_common::EVENTS))?;
        Self::from_source(source, acl4, Some(events), fds)
    }

    /// Opens the maps a running (or detached-but-pinned) datapath keeps
    /// under `dir`, refusing pins of another build.
    pub fn open_pinned(dir: &Path) -> Result<Self> {
        match super::upgrade::pinned_layout(dir) {
            Some(v) if v != policy_common::LAYOUT_VERSION => {
                // An older layout whose unchanged maps are not as this build
                // wants them: another build's, not an upgrade it can make.
                if v < policy_common::LAYOUT_VERSION {
                    check_pinned_maps(dir, super::upgrade::changed_since(v))?;
                }
                return Err(DataplaneError::Refused(format!(
                    "the maps pinned in {} have layout {v}; this build reads layout {}. `smtpguard run` of this build \
                     upgrades them (docs/upgrade.md)",
                    dir.display(),
                    policy_common::LAYOUT_VERSION
                )))
            }
            _ => {}
        }
        check_pinned_maps(dir, &[])?;
        Self::from_source(Source::Pins(dir), None, None, Vec::new())
    }

    fn from_source(
        mut source: Source<'_>,
        acl4: Option<acl4_writer::Arrays>,
        events: Option<RingBuf<MapData>>,
        mut fds: Vec<(&'static str, OwnedFd)>,
    ) -> Result<Self> {
        use policy_common as pc;
        let runtime = source.data(pc::RUNTIME, &mut fds)?;
        let words = RuntimeWords::open(runtime.fd().as_fd()).map_err(|source| DataplaneError::Mmap { name: pc::RUNTIME, source })?;
        let bypass = source.data(pc::BYPASS, &mut fds)?;
        let bypass = BypassSwitch::open(bypass.fd().as_fd()).map_err(|source| DataplaneError::Mmap { name: pc::BYPASS, source })?;
        let sources = source.data(pc::SOURCES, &mut fds)?;
        let sets = sources.info().map_err(map_error(pc::SOURCES))?.max_entries();
        let table = SourceTable::open(sources.fd().as_fd(), sets).map_err(|source| DataplaneError::Mmap { name: pc::SOURCES, source })?;
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| DataplaneError::Pin { path: what.into(), message: e.to_string() })?;
        Ok(Self {
            runtime: words,
            bypass: Arc::new(bypass),
            policy: Array::try_from(source.take_kept(pc::POLICY, &mut fds)?).map_err(map_error(pc::POLICY))?,
            acl_v6: LpmTrie::try_from(source.take_kept(pc::ACL_V6, &mut fds)?).map_err(map_error(pc::ACL_V6))?,
            acl4,
            sources: Arc::new(table),
            ban_v4: LpmTrie::try_from(source.take_kept(pc::BAN_V4, &mut fds)?).map_err(map_error(pc::BAN_V4))?,
            ban_v6: LpmTrie::try_from(source.take_kept(pc::BAN_V6, &mut fds)?).map_err(map_error(pc::BAN_V6))?,
            tenant_ifaces: HashMap::try_from(source.take_kept(pc::TENANT_IFACES, &mut fds)?).map_err(map_error(pc::TENANT_IFACES))?,
            shadow_diffs: PerCpuHashMap::try_from(source.take_kept(pc::SHADOW_DIFFS, &mut fds)?).map_err(map_error(pc::SHADOW_DIFFS))?,
            shadow_sources: PerCpuHashMap::try_from(source.take_kept(pc::SHADOW_SOURCES, &mut fds)?).map_err(map_error(pc::SHADOW_SOURCES))?,
            smtp_flows: HashMap::try_from(source.take_kept(pc::SMTP_FLOWS, &mut fds)?).map_err(map_error(pc::SMTP_FLOWS))?,
            events,
            cpus,
            fds: {
                // Used only through their fds: kept alive by the duplicates.
                for name in [pc::STATS, pc::RULE_HITS, pc::SHADOW_TOTALS, pc::GEO_DROPS, pc::TENANT_STATS, pc::TENANT_SOURCES] {
                    source.take_kept(name, &mut fds)?;
                }
                fds
            },
        })
    }

    /// The runtime settings, each word read atomically.
    pub fn runtime(&self) -> Runtime {
        self.runtime.read()
    }

    /// The fail-open switch.
    pub fn bypass(&self) -> &BypassSwitch {
        &self.bypass
    }

    /// The mapped `RUNTIME` words, for their writers.
    pub(super) fn runtime_words(&self) -> &RuntimeWords {
        &self.runtime
    }

    pub fn policy(&self, generation: u32) -> Result<PolicyConfig> {
        self.policy.get(&(generation & 1), 0).map_err(map_error(policy_common::POLICY))
    }

    /// Writes one generation's settings. The port filter is widened to
    /// this policy's ports first, so no packet to them skips the pipeline.
    pub(super) fn set_policy(&mut self, generation: u32, policy: &PolicyConfig) -> Result<()> {
        let other = self.policy(generation ^ 1)?;
        let mut filter = [0; policy_common::PORT_FILTER_WORDS];
        for p in [policy, &other] {
            for (word, bits) in filter.iter_mut().zip(policy_common::port_filter(p)) {
                *word |= bits;
            }
        }
        self.runtime.set_port_filter(filter);
        self.policy.set(generation & 1, policy, 0).map_err(map_error(policy_common::POLICY))
    }

    /// A shadow generation's settings (`policy_common::SHADOW_GENERATIONS`).
    pub fn shadow_policy(&self, generation: u32) -> Result<PolicyConfig> {
        self.policy.get(&generation, 0).map_err(map_error(policy_common::POLICY))
    }

    pub(super) fn set_shadow_policy(&mut self, generation: u32, policy: &PolicyConfig) -> Result<()> {
        self.policy.set(generation, policy, 0).map_err(map_error(policy_common::POLICY))
    }

    /// Every shadow difference counted, summed over CPUs.
    pub fn shadow_diffs(&self) -> Result<Vec<(ShadowKey, u64)>> {
        per_cpu_entries(&self.shadow_diffs, policy_common::SHADOW_DIFFS)
    }

    /// Differences by source address, summed over CPUs.
    pub fn shadow_sources(&self) -> Result<Vec<(ShadowSource, u64)>> {
        per_cpu_entries(&self.shadow_sources, policy_common::SHADOW_SOURCES)
    }

    /// The `shadow_total` cells, summed over CPUs.
    pub fn shadow_totals(&self) -> Result<Vec<u64>> {
        let name = policy_common::SHADOW_TOTALS;
        batch::per_cpu_sums(self.fd(name), policy_common::shadow_total::COUNT, self.cpus).map_err(|source| DataplaneError::Batch { name, source })
    }

    /// Starts the shadow's counters afresh (no packet may judge by the
    /// candidate they counted for any more).
    pub(super) fn clear_shadow_counts(&mut self) -> Result<()> {
        let keys: Vec<ShadowKey> = self.shadow_diffs.keys().filter_map(|k| k.ok()).collect();
        for k in keys {
            let _ = self.shadow_diffs.remove(&k);
        }
        let sources: Vec<ShadowSource> = self.shadow_sources.keys().filter_map(|k| k.ok()).collect();
        for k in sources {
            let _ = self.shadow_sources.remove(&k);
        }
        let name = policy_common::SHADOW_TOTALS;
        let n = policy_common::shadow_total::COUNT;
        let key_bytes: Vec<u8> = (0..n).flat_map(|k| k.to_ne_bytes()).collect();
        let zeros = vec![0u8; n as usize * self.cpus * 8];
        batch::update(self.fd(name), &key_bytes, &zeros, n as usize).map_err(|source| DataplaneError::Batch { name, source })
    }

    pub(super) fn acl_v6(&mut self) -> &mut LpmTrie<MapData, AclKeyV6, AclEntry> {
        &mut self.acl_v6
    }

    pub(super) fn acl_v6_fd(&self) -> std::os::fd::RawFd {
        self.fd(policy_common::ACL_V6)
    }

    /// This layer's duplicate fd of a map (every map has one).
    fn fd(&self, name: &'static str) -> std::os::fd::RawFd {
        self.fds.iter().find(|(n, _)| *n == name).map_or(-1, |(_, fd)| fd.as_raw_fd())
    }

    pub(super) fn dup_fd(&self, name: &'static str) -> Result<OwnedFd> {
        let fd = self.fds.iter().find(|(n, _)| *n == name).ok_or(DataplaneError::MissingMap(name))?;
        fd.1.try_clone().map_err(|e| DataplaneError::Pin { path: name.into(), message: e.to_string() })
    }

    /// The IPv4 ACL arrays (loaded maps only).
    pub(super) fn acl4(&mut self) -> Result<&mut acl4_writer::Arrays> {
        self.acl4.as_mut().ok_or(DataplaneError::MissingMap(policy_common::ACL4_ROOT))
    }

    pub(super) fn acl4_ref(&self) -> Result<&acl4_writer::Arrays> {
        self.acl4.as_ref().ok_or(DataplaneError::MissingMap(policy_common::ACL4_ROOT))
    }

    /// The mapped source table.
    pub fn source_table(&self) -> &Arc<SourceTable> {
        &self.sources
    }

    /// The hits of each rule id of kernel generation `generation` (0 or
    /// 1), summed over CPUs; cell 0 holds those of ids past the cap.
    pub fn rule_hits(&self, generation: u32) -> Result<Vec<u64>> {
        let name = policy_common::RULE_HITS;
        let all: Vec<u64> = batch::per_cpu_sums(self.fd(name), policy_common::RULE_HITS_ENTRIES, self.cpus).map_err(|source| DataplaneError::Batch { name, source })?;
        Ok(rule_cells(&all, generation))
    }

    /// Zeroes generation `generation`'s hit counters (no packet may be
    /// counting into them: it is not active, and a grace period passed).
    pub(super) fn zero_rule_hits(&self, generation: u32) -> Result<()> {
        let name = policy_common::RULE_HITS;
        let first = policy_common::rule_hits_index(generation, 0);
        let keys: Vec<u32> = (first..first + policy_common::RULE_SLOTS).collect();
        let values = vec![0u64; keys.len() * self.cpus];
        let bytes = |v: &[u64]| v.iter().flat_map(|x| x.to_ne_bytes()).collect::<Vec<u8>>();
        let key_bytes: Vec<u8> = keys.iter().flat_map(|k| k.to_ne_bytes()).collect();
        batch::update(self.fd(name), &key_bytes, &bytes(&values), keys.len()).map_err(|source| DataplaneError::Batch { name, source })
    }

    /// Every `STATS` cell, summed over CPUs.
    pub fn stats(&self) -> Result<Vec<Counter>> {
        let name = policy_common::STATS;
        batch::per_cpu_sums(self.fd(name), STATS_ENTRIES, self.cpus).map_err(|source| DataplaneError::Batch { name, source })
    }

    /// Every `GEO_DROPS` cell, summed over CPUs.
    pub fn geo_drops(&self) -> Result<Vec<u64>> {
        let name = policy_common::GEO_DROPS;
        batch::per_cpu_sums(self.fd(name), GEO_DROPS_ENTRIES, self.cpus).map_err(|source| DataplaneError::Batch { name, source })
    }

    /// `STATS` as a typed handle of its own (a duplicate fd).
    pub(super) fn stats_map(&self) -> Result<aya::maps::PerCpuArray<MapData, Counter>> {
        let name = policy_common::STATS;
        let data = MapData::from_fd(self.dup_fd(name)?).map_err(map_error(name))?;
        aya::maps::PerCpuArray::try_from(Map::PerCpuArray(data)).map_err(map_error(name))
    }

    /// Adds one to CPU 0's share of a `STATS` cell the datapath never
    /// writes (the manual-ban counter); the caller serialises its writers.
    pub(super) fn count_on_first_cpu(&mut self, cell: u32) -> Result<()> {
        let name = policy_common::STATS;
        let map = Map::PerCpuArray(MapData::from_fd(self.dup_fd(name)?).map_err(map_error(name))?);
        let mut stats: aya::maps::PerCpuArray<MapData, Counter> = aya::maps::PerCpuArray::try_from(map).map_err(map_error(name))?;
        let mut values: Vec<Counter> = stats.get(&cell, 0).map_err(map_error(name))?.iter().copied().collect();
        values[0].packets += 1;
        let values = aya::maps::PerCpuValues::try_from(values).map_err(|e| DataplaneError::Pin { path: name.into(), message: e.to_string() })?;
        stats.set(cell, values, 0).map_err(map_error(name))
    }

    pub(super) fn tenant_ifaces(&mut self) -> &mut HashMap<MapData, u32, u32> {
        &mut self.tenant_ifaces
    }

    /// The kernel's possible CPUs.
    pub(super) fn cpus(&self) -> usize {
        self.cpus
    }

    #[cfg(feature = "testing")]
    pub(super) fn smtp_flows(&mut self) -> &mut HashMap<MapData, SmtpFlowKey, SmtpFlowState> {
        &mut self.smtp_flows
    }

    /// Events waiting in the ring buffer (loaded maps only).
    pub fn drain_events(&mut self) -> Result<Vec<Event>> {
        let ring = self.events.as_mut().ok_or(DataplaneError::MissingMap(policy_common::EVENTS))?;
        let mut out = Vec::new();
        while let Some(item) = ring.next() {
            if item.len() != size_of::<Event>() {
                return Err(DataplaneError::BadEvent(item.len()));
            }
            // SAFETY: length checked; Event is plain old data, read unaligned.
            out.push(unsafe { std::ptr::read_unaligned(item.as_ptr() as *const Event) });
        }
        Ok(out)
    }

    /// A duplicate of the ring buffer's fd, to wait on for events.
    pub fn events_fd(&self) -> Result<OwnedFd> {
        let ring = self.events.as_ref().ok_or(DataplaneError::MissingMap(policy_common::EVENTS))?;
        // SAFETY: the ring buffer's fd is open for as long as self is.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(ring.as_raw_fd()) };
        fd.try_clone_to_owned().map_err(|e| DataplaneError::Pin { path: "EVENTS".into(), message: e.to_string() })
    }

    /// A read-only view of the counters and tables for another thread,
    /// with fds of its own.
    pub fn observer(&self) -> Result<Observer> {
        use policy_common as pc;
        Ok(Observer {
            stats: self.dup_fd(pc::STATS)?,
            geo_drops: self.dup_fd(pc::GEO_DROPS)?,
            sources: self.sources.clone(),
            bypass: self.bypass.clone(),
            ban_v4: self.dup_fd(pc::BAN_V4)?,
            ban_v6: self.dup_fd(pc::BAN_V6)?,
            tenant_ifaces: self.dup_fd(pc::TENANT_IFACES)?,
            tenant_stats: self.dup_fd(pc::TENANT_STATS)?,
            tenant_sources: self.dup_fd(pc::TENANT_SOURCES)?,
            rule_hits: self.dup_fd(pc::RULE_HITS)?,
            shadow_diffs: self.dup_fd(pc::SHADOW_DIFFS)?,
            shadow_totals: self.dup_fd(pc::SHADOW_TOTALS)?,
            cpus: self.cpus,
            smtp_flow_capacity: self.smtp_flows.map().info().map_err(map_error(pc::SMTP_FLOWS))?.max_entries(),
        })
    }

    /// Kernel memory charged to a map (its fdinfo `memlock`), in bytes.
    pub fn memlock(&self, name: &'static str) -> Result<u64> {
        if !self.fds.iter().any(|(n, _)| *n == name) {
            return Err(DataplaneError::MissingMap(name));
        }
        fdinfo_memlock(self.fd(name))
    }
}

fn fdinfo_memlock(fd: std::os::fd::RawFd) -> Result<u64> {
    let path = format!("/proc/self/fdinfo/{fd}");
    let info = std::fs::read_to_string(&path).map_err(|e| DataplaneError::Pin { path, message: e.to_string() })?;
    Ok(info.lines().find_map(|l| l.strip_prefix("memlock:")?.trim().parse().ok()).unwrap_or(0))
}

/// Maps the IPv4 ACL arrays; their room is what the maps were made with.
fn map_acl4(source: &mut Source<'_>, fds: &mut Vec<(&'static str, OwnedFd)>) -> Result<acl4_writer::Arrays> {
    let mut map = |name: &'static str, per_value: u32, stride: usize| -> Result<(acl4_writer::Mapped, u32)> {
        let data = source.data(name, fds)?;
        let entries = data.info().map_err(map_error(name))?.max_entries();
        let mapped = acl4_writer::Mapped::new(data.fd().as_fd(), entries * per_value, stride).map_err(|source| DataplaneError::Mmap { name, source })?;
        Ok((mapped, entries))
    };
    let chunk = policy_common::acl4::SLOT_CHUNK as u32;
    let generations = policy_common::GENERATIONS;
    let (root, _) = map(policy_common::ACL4_ROOT, chunk, 4)?;
    let (nodes, node_entries) = map(policy_common::ACL4_NODES, 1, size_of::<policy_common::acl4::AclNode>())?;
    let (slots, slot_chunks) = map(policy_common::ACL4_SLOTS, chunk, 4)?;
    let (values, value_entries) = map(policy_common::ACL4_VALUES, 1, size_of::<AclEntry>().next_multiple_of(8))?;
    let capacity = policy_common::acl4::Capacity {
        nodes: node_entries / generations,
        slots: slot_chunks * chunk / generations,
        values: value_entries / generations,
    };
    Ok(acl4_writer::Arrays { root, nodes, slots, values, capacity })
}

//! The loaded datapath: one type that owns the eBPF object and every map,
//! and offers typed operations on them. Nothing else touches a map handle.

use std::{
    net::IpAddr,
    os::fd::{AsFd, AsRawFd},
    sync::Arc,
    time::Duration,
};

use ipnet::IpNet;

use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, Map, MapData, RingBuf},
    programs::{
        links::{FdLink, PinnedLink},
        tc::{self, SchedClassifierLink, TcAttachType},
        xdp::XdpLink,
        Program, SchedClassifier, TestRun, TestRunOptions, Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use policy_common::{
    direction, hook,
    source::{sets_for, SourceSet},
    smtp_flow::{SmtpFlowKey, SmtpFlowState},
    AclEntry, AclKeyV6, Counter, Event, PolicyConfig, Runtime, ACL_KEY_HEADER_BITS, DEFAULT_SMTP_FLOWS_CAPACITY,
    DEFAULT_SOURCE_CAPACITY,
};

use crate::{acl4, observe::Observer, runtime::RuntimeWords, sources::SourceTable, EBPF_OBJECT};

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program { name: &'static str, source: aya::programs::ProgramError },
    #[error("map {name}: {source}")]
    Map { name: &'static str, source: aya::maps::MapError },
    #[error("map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error("program {0} is missing from the object")]
    MissingProgram(&'static str),
    #[error("attaching to {iface}: {source}")]
    Tc { iface: String, source: aya::programs::tc::TcError },
    #[error("event of {0} bytes does not match the event layout")]
    BadEvent(usize),
    #[error("pin {path}: {message}")]
    Pin { path: String, message: String },
    #[error("batch write to {name}: {source}")]
    Batch { name: &'static str, source: std::io::Error },
    #[error("mapping {name}: {source}")]
    Mmap { name: &'static str, source: std::io::Error },
    #[error(transparent)]
    Acl4Capacity(#[from] acl4::CapacityError),
    #[error(transparent)]
    Incompatible(#[from] IncompatiblePins),
}

/// Maps pinned by another smtpguard build, which this one cannot use.
#[derive(Debug, thiserror::Error)]
#[error(
    "the maps pinned in {dir} were made by another smtpguard build: {what}. Run `smtpguard detach` (it removes \
     the pins, and with them bans, rate buckets and counters), then start `smtpguard run` again"
)]
pub struct IncompatiblePins {
    pub dir: String,
    pub what: String,
}

/// Refuses maps pinned in `dir` whose layout differs from this build's
/// object (key or value size, or flags such as `BPF_F_MMAPABLE`): the
/// kernel would load the programs against them, and the mismatch would
/// show later as a cryptic verifier or mmap error. Maps not pinned there
/// are fine; sizes set at load time (max entries) may differ.
pub fn check_pinned_maps(dir: &std::path::Path) -> Result<(), IncompatiblePins> {
    let incompatible = |what: String| IncompatiblePins { dir: dir.display().to_string(), what };
    let object = aya_obj::Object::parse(EBPF_OBJECT).map_err(|e| incompatible(format!("this build's object does not parse ({e})")))?;
    for name in policy_common::ALL_MAPS {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let Some(want) = object.maps.get(name) else { continue };
        let pinned = aya::maps::MapInfo::from_pin(&path).map_err(|e| incompatible(format!("{name} cannot be read ({e})")))?;
        let (have, want) = ((pinned.key_size(), pinned.value_size(), pinned.map_flags()), (want.key_size(), want.value_size(), want.map_flags()));
        if have != want {
            return Err(incompatible(format!(
                "{name} has key size {}, value size {} and flags {:#x}, this build wants {}, {} and {:#x}",
                have.0, have.1, have.2, want.0, want.1, want.2
            )));
        }
    }
    Ok(())
}

fn pin_error(path: &std::path::Path, e: impl std::fmt::Display) -> DataplaneError {
    DataplaneError::Pin { path: path.display().to_string(), message: e.to_string() }
}

/// A link pinned at `path`, as the program type's own link.
fn open_pinned_link<L: TryFrom<FdLink, Error = aya::programs::links::LinkError>>(path: &std::path::Path) -> Result<L> {
    let pinned = PinnedLink::from_pin(path).map_err(|e| pin_error(path, e))?;
    L::try_from(FdLink::from(pinned)).map_err(|e| pin_error(path, e))
}

/// Pins a fresh link at `path`, so it outlives this process.
fn pin_link<L>(link: L, path: &std::path::Path) -> Result<()>
where
    FdLink: TryFrom<L, Error = aya::programs::links::LinkError>,
{
    let fd = FdLink::try_from(link).map_err(|e| pin_error(path, e))?;
    fd.pin(path).map_err(|e| pin_error(path, e))?;
    Ok(())
}

/// Waits until every CPU has left any program run that began before the
/// call (an RCU grace period), via membarrier(MEMBARRIER_CMD_GLOBAL).
/// After a generation flip, that is when the old generation is unused.
pub fn rcu_grace_period() {
    const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
    // SAFETY: membarrier takes no pointers.
    let rc = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if rc != 0 {
        // Kernels with nohz_full refuse it; program runs last microseconds.
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

type Result<T, E = DataplaneError> = std::result::Result<T, E>;

/// Settings fixed when the object is loaded.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Sources `SOURCES` holds (rate buckets and bans).
    pub source_capacity: u32,
    /// Pin every map here (reusing maps already pinned there), so state
    /// outlives this process. `None`: maps live as long as the process.
    pub pin_dir: Option<std::path::PathBuf>,
    /// Room per generation in the IPv4 ACL arrays (maps pinned earlier
    /// keep the room they were made with).
    pub acl4_capacity: policy_common::acl4::Capacity,
    /// Client streams `SMTP_FLOWS` follows for the command filter (a map
    /// pinned earlier keeps its size).
    pub smtp_flow_capacity: u32,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            source_capacity: DEFAULT_SOURCE_CAPACITY,
            pin_dir: None,
            acl4_capacity: policy_common::acl4::Capacity::DEFAULT,
            smtp_flow_capacity: DEFAULT_SMTP_FLOWS_CAPACITY,
        }
    }
}

/// The hook programs, by the names in policy-common.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    XdpIngress,
    TcIngress,
    TcEgress,
}

impl Hook {
    pub const ALL: [Hook; 3] = [Hook::XdpIngress, Hook::TcIngress, Hook::TcEgress];

    pub const fn program_name(self) -> &'static str {
        match self {
            Hook::XdpIngress => policy_common::PROG_XDP_INGRESS,
            Hook::TcIngress => policy_common::PROG_TC_INGRESS,
            Hook::TcEgress => policy_common::PROG_TC_EGRESS,
        }
    }

    pub const fn index(self) -> usize {
        match self {
            Hook::XdpIngress => hook::XDP_INGRESS,
            Hook::TcIngress => hook::TC_INGRESS,
            Hook::TcEgress => hook::TC_EGRESS,
        }
    }

    /// The program's return value when it answers with a reset: `XDP_TX`,
    /// `TC_ACT_REDIRECT`.
    pub const fn reset_code(self) -> u32 {
        match self {
            Hook::XdpIngress => 3,
            Hook::TcIngress | Hook::TcEgress => 7,
        }
    }

    /// The program's return value for a pass and for a drop.
    pub const fn verdict_codes(self) -> (u32, u32) {
        match self {
            Hook::XdpIngress => (2, 1),
            // TC_ACT_UNSPEC (-1) and TC_ACT_SHOT.
            Hook::TcIngress | Hook::TcEgress => (u32::MAX, 2),
        }
    }
}

/// The hooks' default directions: the uplink's XDP judges arriving mail by
/// the ingress policy; TC judges what leaves the uplink and what tenants
/// send by the egress policy.
pub const DEFAULT_HOOK_DIRECTION: [u8; hook::COUNT] =
    [direction::INGRESS, direction::EGRESS, direction::EGRESS];

/// An ACL prefix: a family-specific address and a CIDR prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AclPrefix {
    pub generation: u8,
    pub scope: u8,
    pub addr: IpAddr,
    pub prefix_len: u8,
}

pub struct Dataplane {
    ebpf: Ebpf,
    events: RingBuf<MapData>,
    /// Fds of the counters and source table, for reads and for [`Dataplane::observer`].
    observer: Observer,
    source_sets: u32,
    /// `RUNTIME`, mapped: the controller's words.
    runtime: RuntimeWords,
    /// `SOURCES`, mapped.
    sources: Arc<SourceTable>,
    /// The IPv4 ACL arrays, mapped for writing.
    acl4: acl4::Arrays,
    /// What each generation's IPv4 arrays use.
    acl4_used: [policy_common::acl4::Capacity; 2],
    /// What each generation's IPv4 arrays were built from.
    installed_v4: [Acl4Contents; 2],
    /// What each generation holds in the IPv6 trie.
    installed_v6: [AclContents; 2],
    /// A flip happened since the last RCU grace period: the generation
    /// flipped away from may still be read by packets in flight.
    grace_pending: bool,
}

/// (scope, IPv4 prefix, entry), in no particular order.
type Acl4Contents = Vec<(u8, ipnet::Ipv4Net, AclEntry)>;
/// (scope, prefix) and entry, sorted by key: one generation's share of
/// the IPv6 trie. Sorted so that two of them diff in one merge pass.
type AclContents = Vec<(AclKey, AclEntry)>;
/// (scope, prefix): where an entry sits in a generation.
type AclKey = (u8, IpNet);

impl Dataplane {
    /// Loads and verifies the programs and creates the maps. Nothing is
    /// attached yet; the runtime starts with an empty policy.
    pub fn load(options: LoadOptions) -> Result<Self> {
        let source_sets = sets_for(options.source_capacity);
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(policy_common::SOURCES, source_sets);
        loader.map_max_entries(policy_common::SMTP_FLOWS, options.smtp_flow_capacity.max(1));
        let room = options.acl4_capacity;
        let generations = policy_common::GENERATIONS;
        loader.map_max_entries(policy_common::ACL4_NODES, generations * room.nodes);
        loader.map_max_entries(policy_common::ACL4_SLOTS, room.slot_chunks());
        loader.map_max_entries(policy_common::ACL4_VALUES, generations * room.values);
        let pin_paths: Vec<(&str, std::path::PathBuf)> = match &options.pin_dir {
            Some(dir) => policy_common::ALL_MAPS.iter().map(|m| (*m, dir.join(m))).collect(),
            None => Vec::new(),
        };
        let adopted = pin_paths.iter().any(|(_, p)| p.exists());
        if let Some(dir) = options.pin_dir.as_deref().filter(|_| adopted) {
            check_pinned_maps(dir)?;
        }
        for (name, path) in &pin_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        for name in policy_common::ALL_PROGRAMS {
            let program = ebpf.program_mut(name).ok_or(DataplaneError::MissingProgram(name))?;
            let loaded = match program {
                Program::Xdp(p) => p.load(),
                Program::SchedClassifier(p) => p.load(),
                _ => return Err(DataplaneError::MissingProgram(name)),
            };
            loaded.map_err(|source| DataplaneError::Program { name, source })?;
        }
        let events = take_map(&mut ebpf, policy_common::EVENTS)?;
        let events = RingBuf::try_from(events)
            .map_err(|source| DataplaneError::Map { name: policy_common::EVENTS, source })?;
        let acl4 = map_acl4(&ebpf)?;
        let (runtime, sources) = map_shared(&ebpf)?;
        let sources = Arc::new(sources);
        let observer = make_observer(&ebpf, sources.clone())?;
        let mut dataplane = Self { ebpf, events, observer, source_sets, runtime, sources, acl4, acl4_used: [policy_common::acl4::Capacity { nodes: 0, slots: 0, values: 0 }; 2], installed_v4: [Vec::new(), Vec::new()], installed_v6: [AclContents::new(), AclContents::new()], grace_pending: false };
        if adopted {
            // Pinned state from an earlier run: keep the active generation
            // as it is; what the inactive one holds is found by reading it.
            let rt = dataplane.runtime()?;
            dataplane.source_sets = rt.source_sets;
            let inactive = (rt.active ^ 1) as usize;
            for generation in [inactive, rt.active as usize] {
                dataplane.installed_v4[generation] = dataplane.acl4_contents(generation as u8);
                dataplane.installed_v6[generation] = dataplane.acl6_contents(generation as u8)?;
            }
        } else {
            dataplane.set_runtime(Runtime { source_sets, hook_direction: DEFAULT_HOOK_DIRECTION, ..Runtime::default() })?;
        }
        Ok(dataplane)
    }

    pub fn source_sets(&self) -> u32 {
        self.source_sets
    }

    fn array<T: aya::Pod>(&mut self, name: &'static str) -> Result<Array<&mut MapData, T>> {
        let map = self.ebpf.map_mut(name).ok_or(DataplaneError::MissingMap(name))?;
        Array::try_from(map).map_err(|source| DataplaneError::Map { name, source })
    }

    /// The runtime settings, each word read atomically.
    pub fn runtime(&mut self) -> Result<Runtime> {
        Ok(self.runtime.read())
    }

    /// Writes every runtime word the controller owns: all but the
    /// network-ban flag (`cidr_bans`), whose only writer is `smtpguard
    /// ban`/`unban` ([`crate::ops`]). For the first settings and for tests;
    /// the controller otherwise writes single words ([`Dataplane::activate`]).
    pub fn set_runtime(&mut self, runtime: Runtime) -> Result<()> {
        self.runtime.write_controller_words(&runtime);
        Ok(())
    }

    /// The mapped source table, for readers on other threads (metrics).
    pub fn source_table(&self) -> Arc<SourceTable> {
        self.sources.clone()
    }

    pub fn policy(&mut self, generation: u32) -> Result<PolicyConfig> {
        let name = policy_common::POLICY;
        self.array::<PolicyConfig>(name)?
            .get(&generation, 0)
            .map_err(|source| DataplaneError::Map { name, source })
    }

    /// Writes one generation's settings. The port filter is widened to
    /// this policy's ports first, so no packet to them skips the pipeline.
    pub fn set_policy(&mut self, generation: u32, policy: &PolicyConfig) -> Result<()> {
        let other = self.policy(generation ^ 1)?;
        self.set_port_filter(&[policy, &other])?;
        let name = policy_common::POLICY;
        self.array::<PolicyConfig>(name)?
            .set(generation, policy, 0)
            .map_err(|source| DataplaneError::Map { name, source })
    }

    fn set_port_filter(&mut self, policies: &[&PolicyConfig]) -> Result<()> {
        let mut filter = [0; policy_common::PORT_FILTER_WORDS];
        for policy in policies {
            for (word, bits) in filter.iter_mut().zip(policy_common::port_filter(policy)) {
                *word |= bits;
            }
        }
        self.runtime.set_port_filter(filter);
        Ok(())
    }

    /// Fills `generation` with a compiled policy, replacing what it held:
    /// only entries that differ are written, in batches, so a one-rule
    /// edit of a large policy costs a few syscalls. Packets do not see it
    /// until [`Dataplane::activate`].
    pub fn install(&mut self, generation: u32, compiled: &crate::policy::Compiled, number: u64) -> Result<()> {
        let gen = generation as usize & 1;
        if self.grace_pending {
            rcu_grace_period();
            self.grace_pending = false;
        }
        // Built before anything is written: a policy that does not fit
        // leaves the generation as it was.
        let tables = acl4::build(&compiled.v4, gen as u32, &self.acl4.capacity)?;
        let mut wanted: AclContents = compiled.v6.iter().map(|(s, n, e)| ((*s, IpNet::V6(*n)), *e)).collect();
        wanted.sort_unstable_by_key(|(k, _)| *k);
        let old = std::mem::take(&mut self.installed_v6[gen]);
        let (stale, changed) = diff(&old, &wanted);
        if let Err(e) = self.write_acl_v6(gen as u8, &stale, &changed) {
            // Part of it may be written: learn what the trie holds now.
            self.installed_v6[gen] = self.acl6_contents(gen as u8).unwrap_or_default();
            return Err(e);
        }
        self.installed_v6[gen] = wanted;
        self.write_acl4(gen as u32, &tables);
        self.installed_v4[gen] = compiled.v4.clone();
        let mut config = compiled.config;
        config.generation = number;
        self.set_policy(gen as u32, &config)
    }

    /// Deletes `stale` and writes `changed` in `generation` of `ACL_V6`.
    fn write_acl_v6(&mut self, generation: u8, stale: &[(u8, IpNet)], changed: &[((u8, IpNet), AclEntry)]) -> Result<()> {
        let key_bytes = |scope: u8, net: &IpNet, out: &mut Vec<u8>| {
            let IpNet::V6(n) = net else { return };
            let bits = ACL_KEY_HEADER_BITS + n.prefix_len() as u32;
            out.extend_from_slice(crate::batch::bytes_of(&Key::new(bits, AclKeyV6::new(generation, scope, n.network().octets()))));
        };
        let (mut del, mut up, mut val) = (Vec::new(), Vec::new(), Vec::new());
        for (scope, net) in stale {
            key_bytes(*scope, net, &mut del);
        }
        for ((scope, net), entry) in changed {
            key_bytes(*scope, net, &mut up);
            val.extend_from_slice(crate::batch::bytes_of(entry));
        }
        let name = policy_common::ACL_V6;
        let key_size = std::mem::size_of::<Key<AclKeyV6>>();
        let fd = self.map_fd(name)?;
        crate::batch::delete(fd, &del, del.len() / key_size).map_err(|source| DataplaneError::Batch { name, source })?;
        crate::batch::update(fd, &up, &val, val.len() / std::mem::size_of::<AclEntry>()).map_err(|source| DataplaneError::Batch { name, source })
    }

    /// Rebuilds `generation`'s IPv4 arrays from what it is said to hold.
    fn rewrite_acl4(&mut self, generation: u8) -> Result<()> {
        let tables = acl4::build(&self.installed_v4[generation as usize & 1], generation as u32, &self.acl4.capacity)?;
        self.write_acl4(generation as u32, &tables);
        Ok(())
    }

    fn write_acl4(&mut self, generation: u32, tables: &acl4::Tables) {
        self.acl4.write(generation, tables);
        self.acl4_used[generation as usize & 1] =
            policy_common::acl4::Capacity { nodes: tables.nodes.len() as u32, slots: tables.slots.len() as u32, values: tables.values.len() as u32 };
    }

    /// Kernel memory charged to a map (its fdinfo `memlock`), in bytes.
    pub fn map_memlock(&self, name: &'static str) -> Result<u64> {
        let fd = self.map_fd(name)?;
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))
            .map_err(|e| DataplaneError::Pin { path: format!("/proc/self/fdinfo/{fd}"), message: e.to_string() })?;
        Ok(info.lines().find_map(|l| l.strip_prefix("memlock:")?.trim().parse().ok()).unwrap_or(0))
    }

    fn map_fd(&self, name: &'static str) -> Result<std::os::fd::RawFd> {
        let map = self.ebpf.map(name).ok_or(DataplaneError::MissingMap(name))?;
        let data = match map {
            Map::LpmTrie(d) | Map::Array(d) | Map::HashMap(d) | Map::LruHashMap(d) | Map::PerCpuArray(d) => d,
            _ => return Err(DataplaneError::MissingMap(name)),
        };
        Ok(data.fd().as_fd().as_raw_fd())
    }

    /// Makes packets judge by `generation`, with the event settings given:
    /// every packet that starts from now on is judged by it. The other
    /// generation is not written again before an RCU grace period has let
    /// the packets still reading it finish (see [`Dataplane::install`]).
    /// Writes only the controller's words, one atomic store each.
    pub fn activate(&mut self, generation: u32, drop_sample_one_in: u32, events_per_second: u32) -> Result<()> {
        self.runtime.set_events(drop_sample_one_in, events_per_second);
        self.runtime.set_active(generation & 1);
        self.grace_pending = true;
        Ok(())
    }

    /// Makes `ifindexes` the tenant interfaces, replacing any earlier set
    /// (interfaces of a previous run may be gone, their numbers reused).
    pub fn set_tenant_ifaces(&mut self, ifindexes: &[u32]) -> Result<()> {
        let name = policy_common::TENANT_IFACES;
        let map = self.ebpf.map_mut(name).ok_or(DataplaneError::MissingMap(name))?;
        let mut set: HashMap<_, u32, u32> = HashMap::try_from(map).map_err(|source| DataplaneError::Map { name, source })?;
        let old: Vec<u32> = set.keys().filter_map(|k| k.ok()).filter(|k| !ifindexes.contains(k)).collect();
        for k in old {
            set.remove(&k).map_err(|source| DataplaneError::Map { name, source })?;
        }
        for &k in ifindexes {
            set.insert(k, 1, 0).map_err(|source| DataplaneError::Map { name, source })?;
        }
        Ok(())
    }

    /// Elements of the IPv4 ACL arrays both generations use (counting the
    /// reserved value 0 of each), and their room.
    pub fn acl4_usage(&self) -> (policy_common::acl4::Capacity, policy_common::acl4::Capacity) {
        let used = self.acl4_used.iter().fold(policy_common::acl4::Capacity { nodes: 0, slots: 0, values: 0 }, |sum, u| policy_common::acl4::Capacity {
            nodes: sum.nodes + u.nodes,
            slots: sum.slots + u.slots,
            values: sum.values + u.values,
        });
        let room = self.acl4.capacity;
        let generations = policy_common::GENERATIONS;
        (used, policy_common::acl4::Capacity { nodes: room.nodes * generations, slots: room.slots * generations, values: room.values * generations })
    }

    /// ACL entries installed, IPv4 and IPv6, both generations.
    pub fn acl_entry_counts(&self) -> (usize, usize) {
        (self.installed_v4.iter().map(Vec::len).sum(), self.installed_v6.iter().map(Vec::len).sum())
    }

    /// The generation packets are judged by now.
    pub fn active_generation(&mut self) -> Result<u32> {
        Ok(self.runtime()?.active)
    }

    /// What `generation`'s IPv4 arrays hold, read back.
    fn acl4_contents(&self, generation: u8) -> Acl4Contents {
        (0..policy_common::ACL_SCOPES as u8)
            .flat_map(|scope| acl4::read_back(&self.acl4, generation as u32, scope).into_iter().map(move |(n, e)| (scope, n, e)))
            .collect()
    }

    /// Every IPv6 ACL entry stored for `generation`, read from the trie.
    fn acl6_contents(&mut self, generation: u8) -> Result<AclContents> {
        let mut out = AclContents::new();
        let mut insert = |k, e| out.push((k, e));
        let name = policy_common::ACL_V6;
        for item in self.trie_v6()?.iter() {
            let (key, entry) = item.map_err(|source| DataplaneError::Map { name, source })?;
            let data = key.data();
            if data.generation == generation {
                let addr = std::net::Ipv6Addr::from(policy_common::words_to_octets(&data.addr));
                let net = IpNet::new(IpAddr::V6(addr), (key.prefix_len() - ACL_KEY_HEADER_BITS) as u8).expect("stored prefix length");
                insert((data.scope, net), entry);
            }
        }
        out.sort_unstable_by_key(|(k, _)| *k);
        Ok(out)
    }

    /// Pins each program at `dir/prog_NAME` (replacing an older pin).
    pub fn pin_programs(&mut self, dir: &std::path::Path) -> Result<()> {
        for hook in Hook::ALL {
            let name = hook.program_name();
            let path = dir.join(format!("prog_{name}"));
            let _ = std::fs::remove_file(&path);
            let pinned = match self.ebpf.program_mut(name) {
                Some(Program::Xdp(p)) => p.pin(&path),
                Some(Program::SchedClassifier(p)) => p.pin(&path),
                _ => return Err(DataplaneError::MissingProgram(name)),
            };
            pinned.map_err(|e| DataplaneError::Pin { path: path.display().to_string(), message: e.to_string() })?;
        }
        Ok(())
    }

    /// Attaches `xdp_ingress` to `iface` through a link pinned at `link_pin`,
    /// or, when that pin exists, swaps this program into the pinned link
    /// atomically: packets never go unjudged. Returns whether it adopted.
    pub fn attach_xdp_pinned(&mut self, iface: &str, mode: XdpMode, link_pin: &std::path::Path) -> Result<bool> {
        let name = policy_common::PROG_XDP_INGRESS;
        let program: &mut Xdp = match self.ebpf.program_mut(name) {
            Some(Program::Xdp(p)) => p,
            _ => return Err(DataplaneError::MissingProgram(name)),
        };
        if link_pin.exists() {
            let link: XdpLink = open_pinned_link(link_pin)?;
            program.attach_to_link(link).map_err(|source| DataplaneError::Program { name, source })?;
            return Ok(true);
        }
        let id = program.attach(iface, mode).map_err(|source| DataplaneError::Program { name, source })?;
        let link = program.take_link(id).map_err(|source| DataplaneError::Program { name, source })?;
        pin_link(link, link_pin)?;
        Ok(false)
    }

    /// As [`Dataplane::attach_xdp_pinned`], for a TC hook (a TCX link).
    pub fn attach_tc_pinned(&mut self, hook: Hook, iface: &str, link_pin: &std::path::Path) -> Result<bool> {
        let attach_type = match hook {
            Hook::TcIngress => TcAttachType::Ingress,
            Hook::TcEgress => TcAttachType::Egress,
            Hook::XdpIngress => return Err(DataplaneError::MissingProgram("xdp is not a TC hook")),
        };
        let name = hook.program_name();
        let program: &mut SchedClassifier = match self.ebpf.program_mut(name) {
            Some(Program::SchedClassifier(p)) => p,
            _ => return Err(DataplaneError::MissingProgram(name)),
        };
        if link_pin.exists() {
            let link: SchedClassifierLink = open_pinned_link(link_pin)?;
            program.attach_to_link(link).map_err(|source| DataplaneError::Program { name, source })?;
            return Ok(true);
        }
        let id = program.attach(iface, attach_type).map_err(|source| DataplaneError::Program { name, source })?;
        let link = program.take_link(id).map_err(|source| DataplaneError::Program { name, source })?;
        pin_link(link, link_pin)?;
        Ok(false)
    }

    /// Writes one ACL entry into a generation (tests and benchmarks; the
    /// controller installs whole policies).
    pub fn insert_acl(&mut self, prefix: AclPrefix, entry: &AclEntry) -> Result<()> {
        self.edit_acls(&[(prefix, Some(*entry))])
    }

    pub fn remove_acl(&mut self, prefix: AclPrefix) -> Result<()> {
        self.edit_acls(&[(prefix, None)])
    }

    /// Writes (`Some`) or removes (`None`) ACL entries; the IPv4 arrays of
    /// each generation touched are rebuilt once.
    pub fn edit_acls(&mut self, edits: &[(AclPrefix, Option<AclEntry>)]) -> Result<()> {
        // The last edit of a prefix wins.
        let mut v4_edits: [std::collections::HashMap<(u8, ipnet::Ipv4Net), Option<AclEntry>>; 2] = Default::default();
        for (prefix, entry) in edits {
            let net = IpNet::new(prefix.addr, prefix.prefix_len).expect("prefix length fits the family").trunc();
            let generation = prefix.generation as usize & 1;
            if let IpNet::V4(n) = net {
                v4_edits[generation].insert((prefix.scope, n), *entry);
                continue;
            }
            let key = (prefix.scope, net);
            let contents = &mut self.installed_v6[generation];
            match (contents.binary_search_by_key(&key, |(k, _)| *k), entry) {
                (Ok(i), Some(e)) => contents[i].1 = *e,
                (Err(i), Some(e)) => contents.insert(i, (key, *e)),
                (Ok(i), None) => {
                    contents.remove(i);
                }
                (Err(_), None) => {}
            }
            let IpNet::V6(n) = net else { continue };
            let key = Key::new(ACL_KEY_HEADER_BITS + n.prefix_len() as u32, AclKeyV6::new(prefix.generation, prefix.scope, n.network().octets()));
            let mut trie = self.trie_v6()?;
            match entry {
                Some(e) => trie.insert(&key, e, 0),
                None => trie.remove(&key),
            }
            .map_err(|source| DataplaneError::Map { name: policy_common::ACL_V6, source })?;
        }
        for (generation, changes) in v4_edits.into_iter().enumerate() {
            if changes.is_empty() {
                continue;
            }
            let contents = &mut self.installed_v4[generation];
            contents.retain(|(scope, net, _)| !changes.contains_key(&(*scope, *net)));
            contents.extend(changes.into_iter().filter_map(|((scope, net), e)| Some((scope, net, e?))));
            self.rewrite_acl4(generation as u8)?;
        }
        Ok(())
    }

    fn trie_v6(&mut self) -> Result<LpmTrie<&mut MapData, AclKeyV6, AclEntry>> {
        let name = policy_common::ACL_V6;
        let map = self.ebpf.map_mut(name).ok_or(DataplaneError::MissingMap(name))?;
        LpmTrie::try_from(map).map_err(|source| DataplaneError::Map { name, source })
    }

    /// One set of the source table, read word by word from the mapping.
    pub fn source_set(&mut self, index: u32) -> Result<SourceSet> {
        Ok(self.sources.read_set(index % self.sources.sets()))
    }

    /// Overwrites one set whole (tests and benchmarks seeding state; beside
    /// traffic this would undo the datapath's updates, see [`SourceTable`]).
    pub fn set_source_set(&mut self, index: u32, set: &SourceSet) -> Result<()> {
        self.sources.write_set(index % self.sources.sets(), set);
        Ok(())
    }

    fn smtp_flows(&mut self) -> Result<HashMap<&mut MapData, SmtpFlowKey, SmtpFlowState>> {
        let name = policy_common::SMTP_FLOWS;
        let map = self.ebpf.map_mut(name).ok_or(DataplaneError::MissingMap(name))?;
        HashMap::try_from(map).map_err(|source| DataplaneError::Map { name, source })
    }

    /// Where the command filter has a client stream (tests).
    pub fn smtp_flow(&mut self, key: &SmtpFlowKey) -> Result<Option<SmtpFlowState>> {
        match self.smtp_flows()?.get(key, 0) {
            Ok(state) => Ok(Some(state)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(DataplaneError::Map { name: policy_common::SMTP_FLOWS, source }),
        }
    }

    /// Puts a client stream where a test wants it.
    pub fn set_smtp_flow(&mut self, key: &SmtpFlowKey, state: &SmtpFlowState) -> Result<()> {
        self.smtp_flows()?.insert(key, state, 0).map_err(|source| DataplaneError::Map { name: policy_common::SMTP_FLOWS, source })
    }

    /// Forgets every client stream (tests: each case starts with none).
    pub fn clear_smtp_flows(&mut self) -> Result<()> {
        let mut flows = self.smtp_flows()?;
        let keys: Vec<SmtpFlowKey> = flows.keys().filter_map(|k| k.ok()).collect();
        for key in keys {
            let _ = flows.remove(&key);
        }
        Ok(())
    }

    /// Every `STATS` cell, summed over CPUs.
    pub fn stats(&self) -> Result<Vec<Counter>> {
        let name = policy_common::STATS;
        self.observer.stats().map_err(|source| DataplaneError::Batch { name, source })
    }

    /// Every `GEO_DROPS` cell, summed over CPUs.
    pub fn geo_drops(&self) -> Result<Vec<u64>> {
        let name = policy_common::GEO_DROPS;
        self.observer.geo_drops().map_err(|source| DataplaneError::Batch { name, source })
    }

    /// A read-only view of the counters and the source table for another
    /// thread, with fds of its own.
    pub fn observer(&self) -> Result<Observer> {
        self.observer.try_clone().map_err(|e| DataplaneError::Pin { path: "observer".into(), message: e.to_string() })
    }

    /// A duplicate of the ring buffer's fd, to wait on for events.
    pub fn events_fd(&self) -> Result<std::os::fd::OwnedFd> {
        use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
        // SAFETY: the ring buffer's fd is open for as long as self is.
        let fd = unsafe { BorrowedFd::borrow_raw(self.events.as_raw_fd()) };
        fd.as_fd().try_clone_to_owned().map_err(|e| DataplaneError::Pin { path: "EVENTS".into(), message: e.to_string() })
    }

    /// Events waiting in the ring buffer.
    pub fn drain_events(&mut self) -> Result<Vec<Event>> {
        let mut out = Vec::new();
        while let Some(item) = self.events.next() {
            if item.len() != size_of::<Event>() {
                return Err(DataplaneError::BadEvent(item.len()));
            }
            // SAFETY: length checked; Event is plain old data, read unaligned.
            out.push(unsafe { std::ptr::read_unaligned(item.as_ptr() as *const Event) });
        }
        Ok(out)
    }

    /// Runs a hook's program on `frame` `repeat` times (BPF_PROG_TEST_RUN).
    pub fn test_run(&mut self, hook: Hook, frame: &[u8], repeat: u32) -> Result<(u32, Duration)> {
        let name = hook.program_name();
        let opts = TestRunOptions { data_in: Some(frame), repeat, ..TestRunOptions::new() };
        let result = match self.ebpf.program_mut(name) {
            Some(Program::Xdp(p)) => p.test_run(opts),
            Some(Program::SchedClassifier(p)) => p.test_run(opts),
            _ => return Err(DataplaneError::MissingProgram(name)),
        }
        .map_err(|source| DataplaneError::Program { name, source })?;
        Ok((result.return_value, result.duration))
    }

    /// Runs a hook's program once on `frame`: its return value and the
    /// frame as the program left it (a reset it rewrote the frame into).
    pub fn test_run_out(&mut self, hook: Hook, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        let name = hook.program_name();
        // Room for the frame and the headroom a program may have grown into.
        let mut out = vec![0u8; frame.len() + 256];
        let opts = TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), repeat: 1, ..TestRunOptions::new() };
        let result = match self.ebpf.program_mut(name) {
            Some(Program::Xdp(p)) => p.test_run(opts),
            Some(Program::SchedClassifier(p)) => p.test_run(opts),
            _ => return Err(DataplaneError::MissingProgram(name)),
        }
        .map_err(|source| DataplaneError::Program { name, source })?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value, out))
    }

    /// The loaded program of a hook, for callers that drive BPF_PROG_TEST_RUN
    /// themselves (benchmarks timing many repeats).
    pub fn program_fd(&self, hook: Hook) -> Result<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        let name = hook.program_name();
        let fd = match self.ebpf.program(name) {
            Some(Program::Xdp(p)) => p.fd(),
            Some(Program::SchedClassifier(p)) => p.fd(),
            _ => return Err(DataplaneError::MissingProgram(name)),
        }
        .map_err(|source| DataplaneError::Program { name, source })?;
        Ok(fd.as_fd())
    }

    /// The kernel's id of a hook's loaded program (for tools that find its
    /// maps by id, as `smtpguard trace` does from the pinned programs).
    pub fn program_id(&self, hook: Hook) -> Result<u32> {
        let name = hook.program_name();
        let info = match self.ebpf.program(name) {
            Some(Program::Xdp(p)) => p.info(),
            Some(Program::SchedClassifier(p)) => p.info(),
            _ => return Err(DataplaneError::MissingProgram(name)),
        }
        .map_err(|source| DataplaneError::Program { name, source })?;
        Ok(info.id())
    }

    /// How many instructions the verifier processed for each program.
    pub fn verified_instructions(&self) -> Result<Vec<(&'static str, u32)>> {
        Hook::ALL
            .iter()
            .map(|hook| {
                let name = hook.program_name();
                let info = match self.ebpf.program(name) {
                    Some(Program::Xdp(p)) => p.info(),
                    Some(Program::SchedClassifier(p)) => p.info(),
                    _ => return Err(DataplaneError::MissingProgram(name)),
                }
                .map_err(|source| DataplaneError::Program { name, source })?;
                Ok((name, info.verified_instruction_count().unwrap_or(0)))
            })
            .collect()
    }

    /// Attaches `xdp_ingress` to an interface.
    pub fn attach_xdp(&mut self, iface: &str, mode: XdpMode) -> Result<()> {
        let name = policy_common::PROG_XDP_INGRESS;
        let program: &mut Xdp = match self.ebpf.program_mut(name) {
            Some(Program::Xdp(p)) => p,
            _ => return Err(DataplaneError::MissingProgram(name)),
        };
        program.attach(iface, mode).map_err(|source| DataplaneError::Program { name, source })?;
        Ok(())
    }

    /// Attaches a TC hook's program to an interface's clsact qdisc.
    pub fn attach_tc(&mut self, hook: Hook, iface: &str) -> Result<()> {
        let attach_type = match hook {
            Hook::TcIngress => TcAttachType::Ingress,
            Hook::TcEgress => TcAttachType::Egress,
            Hook::XdpIngress => return Err(DataplaneError::MissingProgram("xdp is not a TC hook")),
        };
        // An existing clsact qdisc is fine.
        let _ = tc::qdisc_add_clsact(iface);
        let name = hook.program_name();
        let program: &mut SchedClassifier = match self.ebpf.program_mut(name) {
            Some(Program::SchedClassifier(p)) => p,
            _ => return Err(DataplaneError::MissingProgram(name)),
        };
        program
            .attach(iface, attach_type)
            .map_err(|source| DataplaneError::Program { name, source })?;
        Ok(())
    }
}

/// Maps the IPv4 ACL arrays; their room is what the maps were made with.
fn map_acl4(ebpf: &Ebpf) -> Result<acl4::Arrays> {
    let map = |name: &'static str, per_value: u32, stride: usize| -> Result<(acl4::Mapped, u32)> {
        let data = match ebpf.map(name) {
            Some(Map::Array(d)) => d,
            _ => return Err(DataplaneError::MissingMap(name)),
        };
        let entries = data.info().map_err(|source| DataplaneError::Map { name, source })?.max_entries();
        let mapped = acl4::Mapped::new(data.fd().as_fd(), entries * per_value, stride).map_err(|source| DataplaneError::Mmap { name, source })?;
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
    Ok(acl4::Arrays { root, nodes, slots, values, capacity })
}

fn make_observer(ebpf: &Ebpf, sources: Arc<SourceTable>) -> Result<Observer> {
    let dup = |name: &'static str| -> Result<std::os::fd::OwnedFd> {
        let data = match ebpf.map(name) {
            Some(Map::Array(d) | Map::PerCpuArray(d) | Map::LpmTrie(d)) => d,
            _ => return Err(DataplaneError::MissingMap(name)),
        };
        data.fd().as_fd().try_clone_to_owned().map_err(|e| DataplaneError::Pin { path: name.into(), message: e.to_string() })
    };
    let cpus = aya::util::nr_cpus().map_err(|(what, e)| DataplaneError::Pin { path: what.into(), message: e.to_string() })?;
    let name = policy_common::SMTP_FLOWS;
    let smtp_flow_capacity = match ebpf.map(name) {
        Some(Map::LruHashMap(d)) => d.info().map_err(|source| DataplaneError::Map { name, source })?.max_entries(),
        _ => return Err(DataplaneError::MissingMap(name)),
    };
    Ok(Observer {
        stats: dup(policy_common::STATS)?,
        geo_drops: dup(policy_common::GEO_DROPS)?,
        sources,
        ban_v4: dup(policy_common::BAN_V4)?,
        ban_v6: dup(policy_common::BAN_V6)?,
        cpus,
        smtp_flow_capacity,
    })
}

/// Maps `RUNTIME` and `SOURCES`, the arrays the datapath and userspace
/// both write word by word.
fn map_shared(ebpf: &Ebpf) -> Result<(RuntimeWords, SourceTable)> {
    let data = |name: &'static str| -> Result<&MapData> {
        match ebpf.map(name) {
            Some(Map::Array(d)) => Ok(d),
            _ => Err(DataplaneError::MissingMap(name)),
        }
    };
    let name = policy_common::RUNTIME;
    let runtime = RuntimeWords::open(data(name)?.fd().as_fd()).map_err(|source| DataplaneError::Mmap { name, source })?;
    let name = policy_common::SOURCES;
    let sources = data(name)?;
    let sets = sources.info().map_err(|source| DataplaneError::Map { name, source })?.max_entries();
    let sources = SourceTable::open(sources.fd().as_fd(), sets).map_err(|source| DataplaneError::Mmap { name, source })?;
    Ok((runtime, sources))
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<Map> {
    ebpf.take_map(name).ok_or(DataplaneError::MissingMap(name))
}

/// The datapath's clock (`bpf_ktime_get_coarse_ns`), for time-dependent map state.
pub fn ktime_now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// What turns `old` into `new` (both sorted by key): keys to delete, and
/// entries to write (new or changed).
fn diff(old: &AclContents, new: &AclContents) -> (Vec<AclKey>, AclContents) {
    let (mut stale, mut changed) = (Vec::new(), Vec::new());
    let (mut i, mut j) = (0, 0);
    while i < old.len() || j < new.len() {
        match (old.get(i), new.get(j)) {
            (Some(o), Some(n)) if o.0 == n.0 => {
                if o.1 != n.1 {
                    changed.push(*n);
                }
                i += 1;
                j += 1;
            }
            (Some(o), Some(n)) if o.0 < n.0 => {
                stale.push(o.0);
                i += 1;
            }
            (Some(o), None) => {
                stale.push(o.0);
                i += 1;
            }
            (_, Some(n)) => {
                changed.push(*n);
                j += 1;
            }
            (None, None) => break,
        }
    }
    (stale, changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(rule: u32) -> AclEntry {
        AclEntry { deny_rule: [rule; policy_common::MAX_PORTS], ..AclEntry::default() }
    }

    #[test]
    fn diff_deletes_what_went_and_writes_what_is_new_or_changed() {
        let k = |s: &str| (0u8, s.parse::<IpNet>().unwrap());
        let old = vec![(k("10.0.0.0/8"), e(1)), (k("10.1.0.0/16"), e(2)), (k("192.0.2.0/24"), e(3))];
        let new = vec![(k("10.0.0.0/8"), e(1)), (k("10.1.0.0/16"), e(5)), (k("172.16.0.0/12"), e(4))];
        let (stale, changed) = diff(&old, &new);
        assert_eq!(stale, vec![k("192.0.2.0/24")]);
        assert_eq!(changed, vec![(k("10.1.0.0/16"), e(5)), (k("172.16.0.0/12"), e(4))]);
        assert_eq!(diff(&new, &new), (vec![], vec![]));
        assert_eq!(diff(&vec![], &new).1.len(), 3);
        assert_eq!(diff(&old, &vec![]).0.len(), 3);
    }
}

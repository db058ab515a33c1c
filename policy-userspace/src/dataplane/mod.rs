//! The loaded datapath, in rooms with one job each:
//!
//! - [`load`]: loading and verifying the object, sizing its maps, adopting
//!   the pins of an earlier run (and refusing those of another build);
//! - [`maps`]: every map as one typed layer, over the loaded object or
//!   over the pins (operator commands);
//! - [`generations`]: the policy swap protocol, whole;
//! - [`programs`]: the hook programs, pinned and attached through links;
//! - [`bans`]: manual bans of sources and networks, as operators make them;
//! - [`bypass`]: the fail-open switch;
//! - [`shadow`]: the shadow policy's generations;
//! - what the maps are made of: [`acl4_writer`] (the IPv4 ACL arrays),
//!   [`source_table`] and [`runtime_words`] (the mmapable arrays shared
//!   word by word with the datapath), [`batch`] (batched syscalls);
//! - [`observer`]: a read-only view for the metrics thread;
//! - [`trace`]: flow tracing's selector and log ring, found from the pins;
//! - `testing` (feature `testing`): what tests and benchmarks need beyond.

pub mod acl4_writer;
pub mod bans;
mod batch;
pub mod bypass;
pub mod generations;
mod load;
pub mod maps;
pub mod observer;
pub mod programs;
pub mod runtime_words;
pub mod shadow;
mod shared_words;
pub mod source_table;
pub mod tenants;
pub mod trace;
pub mod upgrade;
#[cfg(feature = "testing")]
pub mod testing;

use aya::programs::XdpMode;
use policy_common::{acl4::Capacity, direction, hook, Event, Runtime};

pub use self::{
    generations::rcu_grace_period,
    load::{check_pinned_maps, Capacities, IncompatiblePins},
};
use self::{generations::Generations, maps::Maps, observer::Observer, programs::Programs};
use crate::policy::Compiled;

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
    #[error("event of {0} bytes does not match the event layout")]
    BadEvent(usize),
    #[error("pin {path}: {message}")]
    Pin { path: String, message: String },
    #[error("batch write to {name}: {source}")]
    Batch { name: &'static str, source: std::io::Error },
    #[error("mapping {name}: {source}")]
    Mmap { name: &'static str, source: std::io::Error },
    #[error(transparent)]
    Acl4Capacity(#[from] acl4_writer::CapacityError),
    #[error(transparent)]
    Incompatible(#[from] IncompatiblePins),
    #[error(transparent)]
    Contended(#[from] source_table::Contended),
    #[error("{0}")]
    Refused(String),
    #[error("locking {path} (another `smtpguard ban` holds it?): {source}")]
    Lock { path: String, source: std::io::Error },
}

type Result<T, E = DataplaneError> = std::result::Result<T, E>;

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
pub const DEFAULT_HOOK_DIRECTION: [u8; hook::COUNT] = [direction::INGRESS, direction::EGRESS, direction::EGRESS];

/// The loaded datapath: its programs, its maps and what each policy
/// generation holds.
pub struct Dataplane {
    programs: Programs,
    maps: Maps,
    generations: Generations,
    shadow: shadow::Shadow,
    /// Pins of an older layout being upgraded (see [`upgrade`]).
    upgrade: Option<upgrade::Upgrade>,
}

impl Dataplane {
    /// Completes an upgrade of older pins, once the new programs are in
    /// every link: carries over what the old maps held. `None`: there was
    /// none.
    pub fn finish_upgrade(&mut self) -> Result<Option<upgrade::UpgradeReport>> {
        self.upgrade.take().map(|u| u.finish(&mut self.maps)).transpose()
    }

    /// Makes `compiled` the policy in force (see [`Generations::swap`]);
    /// returns the generation slot now active.
    pub fn swap(&mut self, compiled: &Compiled, number: u64) -> Result<u32> {
        self.generations.swap(&mut self.maps, compiled, number)
    }

    /// Fills one generation without making it active (see
    /// [`Generations::install`]); [`Dataplane::swap`] is the whole protocol.
    pub fn install(&mut self, generation: u32, compiled: &Compiled, number: u64) -> Result<()> {
        self.generations.install(&mut self.maps, generation, compiled, number)
    }

    /// Flips packets to `generation` (see [`Generations::activate`]).
    pub fn activate(&mut self, generation: u32, drop_sample_one_in: u32, events_per_second: u32) {
        self.generations.activate(&self.maps, generation, drop_sample_one_in, events_per_second)
    }

    /// Makes `compiled` the shadow policy (see [`shadow::Shadow::install`]).
    pub fn install_shadow(&mut self, compiled: &Compiled, number: u64) -> Result<u32> {
        self.shadow.install(&mut self.maps, compiled, number)
    }

    /// Starts the shadow's difference counts afresh (their port slots are
    /// the enforced policy's, which a reload may have renumbered).
    pub fn restart_shadow_counts(&mut self) -> Result<()> {
        self.maps.clear_shadow_counts()
    }

    /// Removes the shadow policy, if one is loaded.
    pub fn remove_shadow(&mut self) -> Result<()> {
        self.shadow.remove(&mut self.maps)
    }

    /// Zeroes kernel generation `generation`'s rule hits (it must be idle).
    pub fn zero_rule_hits(&mut self, generation: u32) -> Result<()> {
        self.maps.zero_rule_hits(generation)
    }

    /// The generation packets are judged by now.
    pub fn active_generation(&self) -> u32 {
        self.maps.runtime().active
    }

    /// The runtime settings, each word read atomically.
    pub fn runtime(&self) -> Runtime {
        self.maps.runtime()
    }

    pub fn maps(&self) -> &Maps {
        &self.maps
    }

    pub fn maps_mut(&mut self) -> &mut Maps {
        &mut self.maps
    }

    pub fn programs(&mut self) -> &mut Programs {
        &mut self.programs
    }

    /// Pins the programs and attaches `xdp_ingress` through a pinned link
    /// (see [`Programs::attach_xdp_pinned`]).
    pub fn attach_xdp_pinned(&mut self, iface: &str, mode: XdpMode, link_pin: &std::path::Path) -> Result<bool> {
        self.programs.attach_xdp_pinned(iface, mode, link_pin)
    }

    pub fn attach_tc_pinned(&mut self, hook: Hook, iface: &str, link_pin: &std::path::Path) -> Result<bool> {
        self.programs.attach_tc_pinned(hook, iface, link_pin)
    }

    /// Elements of the IPv4 ACL arrays both generations use, and their room.
    pub fn acl4_usage(&self) -> Result<(Capacity, Capacity)> {
        self.generations.acl4_usage(&self.maps)
    }

    /// ACL entries installed, IPv4 and IPv6, both generations.
    pub fn acl_entry_counts(&self) -> (usize, usize) {
        self.generations.entry_counts()
    }

    pub fn drain_events(&mut self) -> Result<Vec<Event>> {
        self.maps.drain_events()
    }

    pub fn events_fd(&self) -> Result<std::os::fd::OwnedFd> {
        self.maps.events_fd()
    }

    pub fn observer(&self) -> Result<Observer> {
        self.maps.observer()
    }
}

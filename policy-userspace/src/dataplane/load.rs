//! Loading the object: maps sized as the operator asked, or adopted from
//! the pins of an earlier run (a restart keeps bans, buckets, counters and
//! both policy generations), programs verified.

use std::path::Path;

use aya::EbpfLoader;
use policy_common::{source::sets_for, Runtime, DEFAULT_SMTP_FLOWS_CAPACITY, DEFAULT_SOURCE_CAPACITY};

use super::{generations::Generations, maps::Maps, shadow::Shadow, programs::Programs, upgrade, Dataplane, Result, DEFAULT_HOOK_DIRECTION};
use crate::EBPF_OBJECT;

/// How large the maps sized at load time are made (maps adopted from pins
/// keep the size they were made with).
#[derive(Clone, Copy, Debug)]
pub struct Capacities {
    /// Sources `SOURCES` holds (rate buckets and bans).
    pub sources: u32,
    /// Room per generation in the IPv4 ACL arrays.
    pub acl4: policy_common::acl4::Capacity,
    /// Client streams `SMTP_FLOWS` follows for the command filter.
    pub smtp_flows: u32,
}

impl Default for Capacities {
    fn default() -> Self {
        Self { sources: DEFAULT_SOURCE_CAPACITY, acl4: policy_common::acl4::Capacity::DEFAULT, smtp_flows: DEFAULT_SMTP_FLOWS_CAPACITY }
    }
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
/// are fine; sizes set at load time (max entries) may differ. Maps named
/// in `changed` (those an upgrade from the pinned layout makes afresh) are
/// not compared.
pub fn check_pinned_maps(dir: &Path, changed: &[&str]) -> Result<(), IncompatiblePins> {
    let incompatible = |what: String| IncompatiblePins { dir: dir.display().to_string(), what };
    let object = aya_obj::Object::parse(EBPF_OBJECT).map_err(|e| incompatible(format!("this build's object does not parse ({e})")))?;
    for name in policy_common::ALL_MAPS {
        let path = dir.join(name);
        if !path.exists() || changed.contains(&name) {
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

impl Dataplane {
    /// Loads and verifies the programs and creates the maps (pinned in
    /// `pin_dir`, reusing maps already pinned there, when given; else they
    /// live as long as this value). Nothing is attached yet; fresh maps
    /// start with an empty policy.
    pub fn load(capacities: Capacities, pin_dir: Option<&Path>) -> Result<Self> {
        let source_sets = sets_for(capacities.sources);
        let room = capacities.acl4;
        let generations = policy_common::GENERATIONS;
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(policy_common::SOURCES, source_sets)
            .map_max_entries(policy_common::SMTP_FLOWS, capacities.smtp_flows.max(1))
            .map_max_entries(policy_common::ACL4_NODES, generations * room.nodes)
            .map_max_entries(policy_common::ACL4_SLOTS, room.slot_chunks())
            .map_max_entries(policy_common::ACL4_VALUES, generations * room.values);
        // Pins of an older layout: the maps that changed move aside first.
        let upgrade = pin_dir.map(upgrade::prepare).transpose()?.flatten();
        let adopted = pin_dir.is_some_and(|dir| policy_common::ALL_MAPS.iter().any(|m| dir.join(m).exists()));
        if let Some(dir) = pin_dir {
            if adopted {
                check_pinned_maps(dir, &[])?;
            }
            for name in policy_common::ALL_MAPS {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        // Programs are verified while the object still holds every map's
        // fd (they name maps by fd); the maps are taken out afterwards.
        let mut programs = Programs::load(loader.load(EBPF_OBJECT)?)?;
        let mut maps = Maps::take(programs.object())?;
        let (generations, shadow) = if adopted {
            // Pinned state from an earlier run: the active generation stays
            // as it is; what each holds is found by reading it.
            (Generations::adopt(&mut maps)?, Shadow::adopt(&mut maps)?)
        } else {
            maps.runtime_words().write_controller_words(&Runtime { source_sets, hook_direction: DEFAULT_HOOK_DIRECTION, ..Runtime::default() });
            if let Some(dir) = pin_dir {
                upgrade::mark_current(dir)?;
            }
            (Generations::empty(), Shadow::empty())
        };
        Ok(Self { programs, maps, generations, shadow, upgrade })
    }
}

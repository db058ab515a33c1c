//! Pinned state across upgrades. The pin directory records the layout of
//! its maps (a directory `layout_N`, `policy_common::LAYOUT_VERSION`; none
//! is layout 1, the builds before it was recorded). A build adopts pins of
//! its own layout; pins of an older layout it knows are upgraded in place:
//!
//! - maps whose layout did not change are adopted as they are (bans and
//!   buckets in `SOURCES`, network bans, per-country drops, the ACL arrays);
//! - maps whose layout changed are moved aside (`vN_<MAP>`), the new build
//!   creates them afresh, and what they held that is worth keeping is
//!   carried over (counters, renumbered) once the new programs have
//!   replaced the old in every link, so nothing the old programs still
//!   counted is lost; then the old maps go.
//!
//! Pins of a newer layout, or of an older one it does not know, are never
//! read as its own: the start is refused, naming both layouts and the way
//! out (docs/upgrade.md).

use std::path::{Path, PathBuf};

use aya::maps::{Map, MapData, PerCpuArray, PerCpuValues};
use policy_common::{Counter, LAYOUT_VERSION, STATS_ENTRIES};

use super::{maps::Maps, DataplaneError, Result};

/// The marker of a pin directory's layout.
fn marker(dir: &Path, version: u32) -> PathBuf {
    dir.join(format!("layout_{version}"))
}

/// The layout of the maps pinned in `dir`; `None` when nothing is pinned.
pub fn pinned_layout(dir: &Path) -> Option<u32> {
    let entries: Vec<String> = std::fs::read_dir(dir).ok()?.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    if let Some(v) = entries.iter().find_map(|n| n.strip_prefix("layout_")?.parse().ok()) {
        return Some(v);
    }
    entries.iter().any(|n| n == policy_common::RUNTIME).then_some(1)
}

/// Records that `dir` holds this build's layout.
pub fn mark_current(dir: &Path) -> Result<()> {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.filter_map(|e| e.ok()) {
            if e.file_name().to_string_lossy().starts_with("layout_") {
                let _ = std::fs::remove_dir(e.path());
            }
        }
    }
    match std::fs::create_dir(marker(dir, LAYOUT_VERSION)) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(pin_error(dir, e)),
        _ => Ok(()),
    }
}

fn pin_error(path: &Path, e: impl std::fmt::Display) -> DataplaneError {
    DataplaneError::Pin { path: path.display().to_string(), message: e.to_string() }
}

/// Maps of layout 1 whose layout changed in layout 2. `STATS` (a reason
/// and counters were added) is carried over, renumbered. Made afresh:
/// `POLICY` (the direction settings grew; the controller installs its
/// policy anyway), `SCAN_BUF` (a per-CPU scratch buffer, now with the
/// segment's stream) and `TENANT_IFACES` (its values are slots now; the
/// controller registers the tenant interfaces again).
const CHANGED_IN_2: [&str; 4] = [policy_common::POLICY, policy_common::STATS, policy_common::SCAN_BUF, policy_common::TENANT_IFACES];

/// Maps of layout 2 whose layout changed in layout 3: `POLICY` (two more
/// entries, the shadow policy's generations; the controller installs its
/// policy anyway). The maps layout 3 added (`BYPASS`, `RULE_HITS`, the
/// shadow's) the loader creates where they are missing.
const CHANGED_IN_3: [&str; 1] = [policy_common::POLICY];

/// The maps an upgrade from layout `from` makes afresh; every other map
/// pinned there must already have this build's shape.
pub fn changed_since(from: u32) -> &'static [&'static str] {
    match from {
        // POLICY is among those of layout 2 already.
        1 => &CHANGED_IN_2,
        2 => &CHANGED_IN_3,
        _ => &[],
    }
}

/// The layouts this build upgrades from.
const UPGRADES_FROM: [u32; 2] = [1, 2];

/// An upgrade under way: the old maps moved aside, to be carried over.
pub struct Upgrade {
    dir: PathBuf,
    from: u32,
    moved: Vec<(&'static str, PathBuf)>,
}

/// What an upgrade did, for the log.
pub struct UpgradeReport {
    pub from: u32,
    pub carried: Vec<String>,
}

/// Gets pins of an older layout ready for this build's loader, or refuses
/// pins it cannot read. `None`: nothing to upgrade (nothing pinned, or this
/// layout already).
pub fn prepare(dir: &Path) -> Result<Option<Upgrade>> {
    let Some(from) = pinned_layout(dir) else { return Ok(None) };
    if from == LAYOUT_VERSION {
        return Ok(None);
    }
    if !UPGRADES_FROM.contains(&from) {
        return Err(DataplaneError::Refused(format!(
            "the maps pinned in {} have layout {from}, and this smtpguard build reads layout {LAYOUT_VERSION}{}. Nothing was \
             changed and the pins keep enforcing. Run the smtpguard that made them, or `smtpguard detach` (it removes the \
             pins, and with them bans and counters) and start again (docs/upgrade.md)",
            dir.display(),
            if from > LAYOUT_VERSION { " (they are newer)" } else { " and cannot upgrade that one" }
        )));
    }
    // Checked before anything moves, so a refusal leaves the pins as found.
    super::check_pinned_maps(dir, changed_since(from))?;
    let mut moved = Vec::new();
    for &name in changed_since(from) {
        let (old, aside) = (dir.join(name), dir.join(format!("v{from}_{name}")));
        if aside.exists() {
            // An upgrade that stopped half-way: the maps aside are the old
            // ones; what is pinned under the name is the attempt's, dropped.
            if old.exists() {
                std::fs::remove_file(&old).map_err(|e| pin_error(&old, e))?;
            }
            moved.push((name, aside));
        } else if old.exists() {
            std::fs::rename(&old, &aside).map_err(|e| pin_error(&old, e))?;
            moved.push((name, aside));
        }
    }
    Ok(Some(Upgrade { dir: dir.to_owned(), from, moved }))
}

impl Upgrade {
    /// Carries over what the old maps held (call once the new programs
    /// have replaced the old in every link), removes them and records the
    /// new layout.
    pub fn finish(self, maps: &mut Maps) -> Result<UpgradeReport> {
        let mut carried = Vec::new();
        for (name, aside) in &self.moved {
            if *name == policy_common::STATS {
                let n = carry_stats_v1(aside, maps)?;
                carried.push(format!("{n} counters"));
            }
            std::fs::remove_file(aside).map_err(|e| pin_error(aside, e))?;
        }
        mark_current(&self.dir)?;
        Ok(UpgradeReport { from: self.from, carried })
    }
}

/// Where each layout-1 `STATS` cell is now: the verdict cells had 11
/// reasons (`smtp_out_of_order` came after them), then events lost, bans
/// by origin, source claims by kind and scans cut short, in that order.
pub fn stats_v1_to_current(old: u32) -> Option<u32> {
    use policy_common::{claim_kind, direction, reason, stats_index, verdict, PORT_SLOTS, STATS_CLAIMS, STATS_EVENTS_LOST};
    const REASONS_V1: usize = 11;
    let cells = (direction::COUNT * verdict::COUNT * REASONS_V1 * PORT_SLOTS) as u32;
    if old < cells {
        let i = old as usize;
        let (slot, r, v, d) = (i % PORT_SLOTS, (i / PORT_SLOTS) % REASONS_V1, (i / PORT_SLOTS / REASONS_V1) % verdict::COUNT, i / PORT_SLOTS / REASONS_V1 / verdict::COUNT);
        debug_assert!(r < reason::COUNT);
        return Some(stats_index(d as u8, v as u8, r as u8, slot));
    }
    // Events lost, bans (auto, escalated, manual), claims, scans cut short:
    // in the same order after the verdict cells now.
    let rest = old - cells;
    debug_assert_eq!(STATS_CLAIMS, STATS_EVENTS_LOST + 4);
    (rest < 4 + claim_kind::COUNT as u32 + 1).then_some(STATS_EVENTS_LOST + rest)
}

/// Adds the old `STATS` counters (every CPU's share) to the new map's.
fn carry_stats_v1(path: &Path, maps: &mut Maps) -> Result<usize> {
    let name = policy_common::STATS;
    let map_error = |source| DataplaneError::Map { name, source };
    let old = MapData::from_pin(path).map_err(|e| pin_error(path, e))?;
    let entries = old.info().map_err(map_error)?.max_entries();
    let old: PerCpuArray<MapData, Counter> = PerCpuArray::try_from(Map::PerCpuArray(old)).map_err(map_error)?;
    let mut new = maps.stats_map()?;
    let mut carried = 0;
    for i in 0..entries {
        let Some(to) = stats_v1_to_current(i).filter(|t| *t < STATS_ENTRIES) else { continue };
        let before = old.get(&i, 0).map_err(map_error)?;
        if before.iter().all(|c| c.packets == 0) {
            continue;
        }
        let now = new.get(&to, 0).map_err(map_error)?;
        let sum: Vec<Counter> = now.iter().zip(before.iter()).map(|(a, b)| *a + *b).collect();
        let sum = PerCpuValues::try_from(sum).map_err(|e| DataplaneError::Refused(e.to_string()))?;
        new.set(to, sum, 0).map_err(map_error)?;
        carried += 1;
    }
    Ok(carried)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_1_counters_keep_their_meaning() {
        use policy_common::{reason, stats_index, verdict, StatsCell, STATS_BANS_MANUAL, STATS_CLAIMS, STATS_SCAN_TRUNCATED};
        // The last verdict cell of layout 1: egress, would_drop, default_deny, slot 4.
        let last_v1 = 2 * 3 * 11 * 5 - 1;
        let c = StatsCell::of(stats_v1_to_current(last_v1).unwrap());
        assert_eq!((c.direction, c.verdict, c.reason, c.port_slot), (1, verdict::WOULD_DROP, reason::DEFAULT_DENY, 4));
        assert_eq!(stats_v1_to_current(0), Some(stats_index(0, 0, 0, 0)));
        // Then events lost, bans, claims, scans cut short.
        assert_eq!(stats_v1_to_current(last_v1 + 4), Some(STATS_BANS_MANUAL));
        assert_eq!(stats_v1_to_current(last_v1 + 5), Some(STATS_CLAIMS));
        assert_eq!(stats_v1_to_current(last_v1 + 9), Some(STATS_SCAN_TRUNCATED));
        assert_eq!(stats_v1_to_current(last_v1 + 10), None);
    }
}

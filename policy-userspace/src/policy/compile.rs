//! The compiler: a validated policy and its geo databases in, the exact
//! map entries and configuration the datapath loads out. No kernel here.
//!
//! Allow, deny and geo fold into one trie per family and (direction, side)
//! scope. For every prefix the longest match would find, the entry says
//! per port slot which rule allows and which denies, and the country.
//! Because an allow beats any deny, a deny or country under an allow is
//! dropped; an entry that would say exactly what its parent says is not
//! emitted at all.

use std::{
    collections::{BTreeMap, HashMap},
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    sync::Arc,
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use policy_common::{verdict, 
    acl_scope, direction, side, smtp_command, AclEntry, DirectionPolicy, PolicyConfig, MAX_COUNTRIES, MAX_PORTS,
    PORT_UNUSED,
};

use super::{
    geo::GeoTable,
    model::{Direction, EventSettings, GeoField, Origin, Policy, RuleKind},
};

/// What a rule id in the datapath refers to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleInfo {
    /// Shared with the policy: every line of a list has the list's id.
    pub id: Arc<str>,
    pub kind: RuleKind,
    pub net: IpNet,
    pub origin: Origin,
}

/// What a rule id in the datapath names: one rule id of the policy, an
/// inline rule or a list file with all its lines. Hits are counted per
/// rule id, so their number is bounded by the policy, not by its networks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleSlot {
    pub id: Arc<str>,
    pub kind: RuleKind,
    /// An exemption's last day (days since the epoch).
    pub until: Option<i64>,
    /// Networks it holds (a list's lines).
    pub networks: usize,
    /// The direction it is written in (a list used in both: the first).
    pub direction: u8,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GeoStats {
    /// Networks read from the databases.
    pub networks_read: usize,
    /// Networks the policy needs, after merging adjacent ones of one country.
    pub networks_kept: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Compiled {
    /// Generation 0; the loader sets the real one.
    pub config: PolicyConfig,
    pub v4: Vec<(u8, Ipv4Net, AclEntry)>,
    pub v6: Vec<(u8, Ipv6Net, AclEntry)>,
    /// Rule id `n` in the datapath is `rule_slots[n - 1]`.
    pub rule_slots: Vec<RuleSlot>,
    /// Every network of every rule in force, in policy order (where
    /// `explain` finds the line that matched).
    pub rules: Vec<RuleInfo>,
    /// Country index `n` is `countries[n - 1]`.
    pub countries: Vec<String>,
    pub geo: GeoStats,
    pub events: EventSettings,
    /// The first day an exemption in force ends after, or a monitored
    /// direction starts to enforce (a recompile is due then).
    pub next_expiry: Option<i64>,
    /// By direction: the day a monitored direction starts to enforce,
    /// while it is ahead.
    pub enforce_from: [Option<i64>; policy_common::direction::COUNT],
    /// How long a tenant suspect is quarantined (banned on every guarded
    /// port); 0: reported only. The controller applies it.
    pub quarantine_s: u32,
}

impl Compiled {
    /// The rule a datapath rule id names.
    pub fn rule_slot(&self, id: u32) -> Option<&RuleSlot> {
        id.checked_sub(1).and_then(|i| self.rule_slots.get(i as usize))
    }

    /// The most specific network of rule `id` holding `addr`: the line
    /// that matched.
    pub fn matching_network(&self, id: u32, addr: std::net::IpAddr) -> Option<&RuleInfo> {
        let slot = self.rule_slot(id)?;
        self.rules.iter().filter(|r| r.id == slot.id && r.net.contains(&addr)).max_by_key(|r| r.net.prefix_len())
    }

    pub fn country(&self, index: u32) -> Option<&str> {
        index.checked_sub(1).and_then(|i| self.countries.get(i as usize)).map(String::as_str)
    }

    pub fn entries(&self) -> usize {
        self.v4.len() + self.v6.len()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("the geo databases hold {0} countries; the datapath indexes at most {max}", max = MAX_COUNTRIES - 1)]
    TooManyCountries(usize),
}

/// Geo tables by (database path, record field).
pub type GeoTables = HashMap<(PathBuf, GeoField), Arc<GeoTable>>;

/// The geo databases the policy read while it was validated.
pub fn geo_tables(policy: &Policy) -> GeoTables {
    let mut tables = GeoTables::new();
    for d in [&policy.ingress, &policy.egress] {
        if let Some(g) = &d.geo {
            tables.insert((g.database.clone(), g.field), g.table.clone());
        }
    }
    tables
}

/// Compiles with the policy's own geo databases.
pub fn compile(policy: &Policy, today: i64) -> Result<Compiled, CompileError> {
    compile_with(policy, today, &geo_tables(policy))
}

/// What can sit at one prefix of a scope.
#[derive(Clone, Copy)]
enum Item {
    Rule { allow: bool, mask: u8, rule: u32 },
    Country(u32),
}

/// A prefix of either family as (address bits, length), left-aligned in 128 bits.
type Prefix = (u128, u8);

fn v4_prefix(n: Ipv4Net) -> Prefix {
    ((u32::from(n.network()) as u128) << 96, n.prefix_len())
}

fn v6_prefix(n: Ipv6Net) -> Prefix {
    (u128::from(n.network()), n.prefix_len())
}

fn contains(outer: Prefix, inner: Prefix) -> bool {
    outer.1 <= inner.1 && (outer.1 == 0 || (outer.0 ^ inner.0) >> (128 - outer.1 as u32) == 0)
}

/// The entry that decides, with what cannot matter cleared: a deny where
/// an allow applies, and the country when every guarded port is allowed.
fn canonical(mut e: AclEntry, slots: usize) -> AclEntry {
    for s in 0..MAX_PORTS {
        if e.allow_rule[s] != 0 {
            e.deny_rule[s] = 0;
        }
    }
    if (0..slots).all(|s| e.allow_rule[s] != 0) {
        e.country = 0;
    }
    e
}

/// Folds one scope's items into entries, parents before children.
fn fold(mut items: Vec<(Prefix, Item)>, slots: usize) -> Vec<(Prefix, AclEntry)> {
    items.sort_by_key(|(p, _)| *p);
    let mut out = Vec::new();
    let mut stack: Vec<(Prefix, AclEntry)> = Vec::new();
    let mut i = 0;
    while i < items.len() {
        let prefix = items[i].0;
        while stack.last().is_some_and(|(p, _)| !contains(*p, prefix)) {
            stack.pop();
        }
        let parent = stack.last().map(|(_, e)| *e).unwrap_or_default();
        let mut e = parent;
        let (mut set_allow, mut set_deny, mut set_country) = (0u8, 0u8, false);
        while i < items.len() && items[i].0 == prefix {
            match items[i].1 {
                Item::Rule { allow, mask, rule } => {
                    for s in 0..MAX_PORTS {
                        if mask & (1 << s) == 0 {
                            continue;
                        }
                        let (cells, set) = if allow { (&mut e.allow_rule, &mut set_allow) } else { (&mut e.deny_rule, &mut set_deny) };
                        // The first rule written for a prefix names it.
                        if *set & (1 << s) == 0 {
                            cells[s] = rule;
                            *set |= 1 << s;
                        }
                    }
                }
                Item::Country(c) => {
                    if !set_country {
                        e.country = c;
                        set_country = true;
                    }
                }
            }
            i += 1;
        }
        let e = canonical(e, slots);
        if e != canonical(parent, slots) {
            out.push((prefix, e));
        }
        stack.push((prefix, e));
    }
    out
}

/// Merges adjacent networks of one country into their common parent, as
/// long as there are siblings to merge. Input in address order.
fn merge_siblings(nets: impl Iterator<Item = (Prefix, u32)>) -> Vec<(Prefix, u32)> {
    let mut out: Vec<(Prefix, u32)> = Vec::new();
    for (p, c) in nets {
        out.push((p, c));
        while out.len() >= 2 {
            let (b, cb) = out[out.len() - 1];
            let (a, ca) = out[out.len() - 2];
            let len = a.1;
            if ca != cb || len != b.1 || len == 0 {
                break;
            }
            // Siblings: identical but for the last bit of the prefix.
            let bit = 1u128 << (128 - len as u32);
            if a.0 & bit != 0 || b.0 != a.0 | bit {
                break;
            }
            out.truncate(out.len() - 2);
            out.push(((a.0, len - 1), ca));
        }
    }
    out
}

pub fn compile_with(policy: &Policy, today: i64, tables: &GeoTables) -> Result<Compiled, CompileError> {
    // One country index space for all databases: sorted codes, 0 = none.
    let mut codes: Vec<String> = tables.values().flat_map(|t| t.codes.iter().cloned()).collect();
    codes.sort();
    codes.dedup();
    if codes.len() >= MAX_COUNTRIES {
        return Err(CompileError::TooManyCountries(codes.len()));
    }
    let index_of: HashMap<&str, u32> = codes.iter().enumerate().map(|(i, c)| (c.as_str(), i as u32 + 1)).collect();

    let slots = policy.ports.len();
    let mut rules: Vec<RuleInfo> = Vec::new();
    let mut rule_slots: Vec<RuleSlot> = Vec::new();
    // An id names one rule slot per kind: an allow and a deny never share
    // one (a list file used both ways).
    let mut slot_of: HashMap<(Arc<str>, RuleKind), u32> = HashMap::new();
    let mut next_expiry: Option<i64> = None;
    let mut geo_stats = GeoStats::default();
    let mut scoped: BTreeMap<(u8, bool), Vec<(Prefix, Item)>> = BTreeMap::new();
    let mut config = PolicyConfig::EMPTY;
    let mut enforce_from = [None; policy_common::direction::COUNT];

    for (dir, d) in [(direction::INGRESS, &policy.ingress), (direction::EGRESS, &policy.egress)] {
        rules.reserve(d.network_count());
        for r in d.networks() {
            if let Some(until) = r.until {
                if until < today {
                    continue;
                }
                next_expiry = Some(next_expiry.map_or(until + 1, |n: i64| n.min(until + 1)));
            }
            rules.push(RuleInfo { id: r.id.clone(), kind: r.kind, net: r.net, origin: Origin { file: r.file.clone(), pos: r.pos } });
            let slot = *slot_of.entry((r.id.clone(), r.kind)).or_insert_with(|| {
                rule_slots.push(RuleSlot { id: r.id.clone(), kind: r.kind, until: r.until, networks: 0, direction: dir });
                rule_slots.len() as u32
            });
            rule_slots[slot as usize - 1].networks += 1;
            let item = Item::Rule { allow: r.kind.is_allow(), mask: r.port_mask, rule: slot };
            let scope = acl_scope(dir, r.side);
            match r.net {
                IpNet::V4(n) => scoped.entry((scope, false)).or_default().push((v4_prefix(n), item)),
                IpNet::V6(n) => scoped.entry((scope, true)).or_default().push((v6_prefix(n), item)),
            }
        }
        let mut geo_drop = [0u64; MAX_COUNTRIES / 64];
        if let Some(g) = &d.geo {
            let table = &tables[&(g.database.clone(), g.field)];
            geo_stats.networks_read += table.networks_read;
            let listed: Vec<u32> = g.countries.iter().filter_map(|c| index_of.get(c.as_str()).copied()).collect();
            let drops = |c: u32| if g.allow_only { !listed.contains(&c) } else { listed.contains(&c) };
            for c in 1..=codes.len() as u32 {
                if drops(c) {
                    geo_drop[c as usize / 64] |= 1 << (c % 64);
                }
            }
            if g.unknown == verdict::DROP {
                geo_drop[0] |= 1;
            }
            // A network matters when its packets are dropped (they count by
            // country) or when addresses of no country are dropped (it must
            // then be there to pass).
            let unknown_drops = g.unknown == verdict::DROP;
            let keep = |c: u32| drops(c) || unknown_drops;
            let scope = acl_scope(dir, side::PEER);
            let v4 = merge_siblings(
                table.v4.iter().map(|(n, c)| (v4_prefix(*n), index_of[table.codes[*c as usize].as_str()])).filter(|(_, c)| keep(*c)),
            );
            let v6 = merge_siblings(
                table.v6.iter().map(|(n, c)| (v6_prefix(*n), index_of[table.codes[*c as usize].as_str()])).filter(|(_, c)| keep(*c)),
            );
            geo_stats.networks_kept += v4.len() + v6.len();
            scoped.entry((scope, false)).or_default().extend(v4.into_iter().map(|(p, c)| (p, Item::Country(c))));
            scoped.entry((scope, true)).or_default().extend(v6.into_iter().map(|(p, c)| (p, Item::Country(c))));
        }
        config.direction[dir as usize] = direction_config(policy, d, geo_drop);
        if d.mode == policy_common::mode::MONITOR {
            match d.enforce_from {
                Some(day) if day <= today => config.direction[dir as usize].mode = policy_common::mode::ENFORCE,
                Some(day) => {
                    enforce_from[dir as usize] = Some(day);
                    // Compiled again that day, as for an exemption's end.
                    next_expiry = Some(next_expiry.map_or(day, |n: i64| n.min(day)));
                }
                None => {}
            }
        }
    }

    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for ((scope, is_v6), items) in scoped {
        let entries = fold(items, slots);
        if !entries.is_empty() {
            let dir = scope >> 1;
            config.direction[dir as usize].acl_sides |= 1 << (scope & 1);
        }
        for ((addr, len), e) in entries {
            if is_v6 {
                v6.push((scope, Ipv6Net::new(Ipv6Addr::from(addr), len).expect("valid length"), e));
            } else {
                v4.push((scope, Ipv4Net::new(Ipv4Addr::from((addr >> 96) as u32), len).expect("valid length"), e));
            }
        }
    }
    let quarantine_s = policy.egress.tenant_suspect.map_or(0, |t| t.quarantine_s);
    Ok(Compiled { config, v4, v6, rule_slots, rules, countries: codes, geo: geo_stats, events: policy.events, next_expiry, enforce_from, quarantine_s })
}

fn direction_config(policy: &Policy, d: &Direction, geo_drop: [u64; MAX_COUNTRIES / 64]) -> DirectionPolicy {
    let mut p = DirectionPolicy::EMPTY;
    for (slot, g) in policy.ports.iter().enumerate() {
        p.ports[slot] = g.port as u32;
        p.profile[slot] = g.profile;
        p.default_verdict[slot] = d.defaults[slot];
    }
    for slot in policy.ports.len()..MAX_PORTS {
        p.ports[slot] = PORT_UNUSED;
    }
    p.mode = d.mode;
    p.malformed_verdict = d.malformed;
    p.smtp_block = d.smtp_block & (smtp_command::VRFY | smtp_command::EXPN);
    p.fragment_verdict = d.smtp_fragments;
    p.established_reset = d.established_reset as u8;
    if let Some(t) = d.tenant_suspect {
        p.suspect_blocked = t.blocked;
        p.suspect_window_s = t.window_s;
    }
    if let Some(r) = &d.rate_limit {
        p.rate_enabled = 1;
        p.rate_interval_ns = 60_000_000_000 / r.new_per_minute as u64;
        p.rate_tolerance_ns = (r.burst as u64 - 1) * p.rate_interval_ns;
        p.ban_threshold = r.ban_above_per_minute;
        p.ban_base_s = r.ban_s;
        p.ban_factor = r.escalate_factor;
        p.ban_max_s = r.escalate_max_s;
    }
    if d.geo.is_some() {
        p.geo_enabled = 1;
        p.geo_drop = geo_drop;
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_monitored_direction_enforces_from_its_day_on() {
        let dir = std::env::temp_dir().join(format!("sg-enforce-from-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("p.yaml");
        std::fs::write(&file, "version: 1\nmode: monitor\nenforce_from: 2027-01-15\ningress:\n  default: {25: allow}\negress:\n  mode: enforce\n  default: {25: deny}\n").unwrap();
        let (policy, diags) = crate::policy::parse::load_file(&file, &crate::policy::ReadOptions::default());
        let policy = policy.unwrap_or_else(|| panic!("{diags}"));
        let _ = std::fs::remove_dir_all(&dir);
        let day = crate::policy::time::parse_date("2027-01-15").unwrap();
        let before = compile(&policy, day - 1).unwrap();
        assert_eq!(before.config.direction[0].mode, policy_common::mode::MONITOR);
        assert_eq!(before.enforce_from, [Some(day), None], "egress enforces already");
        assert_eq!(before.next_expiry, Some(day), "compiled again that day");
        let on = compile(&policy, day).unwrap();
        assert_eq!(on.config.direction[0].mode, policy_common::mode::ENFORCE);
        assert_eq!(on.enforce_from, [None, None]);
    }

    #[test]
    fn list_files_are_rules_by_their_path_and_kind() {
        let dir = std::env::temp_dir().join(format!("sg-list-rules-{}", std::process::id()));
        for sub in ["a", "b"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
            std::fs::write(dir.join(sub).join("same.txt"), format!("10.0.{}.0/24\n", sub.len() + sub.as_bytes()[0] as usize % 8)).unwrap();
        }
        let file = dir.join("p.yaml");
        std::fs::write(&file, "version: 1\ningress:\n  allow_files: [a/same.txt]\n  deny_files: [b/same.txt]\negress:\n  deny_files: [a/same.txt]\n").unwrap();
        let (policy, diags) = crate::policy::parse::load_file(&file, &crate::policy::ReadOptions::default());
        let policy = policy.unwrap_or_else(|| panic!("{diags}"));
        let _ = std::fs::remove_dir_all(&dir);
        let c = compile(&policy, 20_000).unwrap();
        let slots: Vec<(String, &str)> = c.rule_slots.iter().map(|s| (s.id.to_string(), s.kind.name())).collect();
        // Two files of one name are two rules; one file allowing in one
        // direction and denying in the other is two rules as well.
        assert_eq!(slots, vec![("file:a/same.txt".into(), "allow"), ("file:b/same.txt".into(), "deny"), ("file:a/same.txt".into(), "deny")]);
    }
}

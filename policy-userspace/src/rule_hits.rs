//! Per-rule hit counts. The datapath counts the packets each ACL rule id
//! decided, per kernel generation (`RULE_HITS`); a rule id names a rule of
//! the policy written into that generation. When a reload replaces a
//! generation, its final counts are folded, by rule id, into the base of
//! the new policy's rules (rules gone with the reload are let go: the
//! series are the rules in force), and then zeroed. The book of the rules
//! in force, with those bases, is kept in the run directory, so `smtpguard
//! status --rules` and a restarted controller name the counts alike.

use std::{collections::HashMap, path::Path};

use policy_common::direction;
use serde::{Deserialize, Serialize};

use crate::policy::{time, Compiled};

/// The rules in force and what they counted before their generation.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RuleBook {
    /// The policy generation number.
    pub generation: u64,
    /// The kernel generation (0 or 1) counting them.
    pub kernel_generation: u32,
    /// Rule id `n` is `rules[n - 1]`.
    pub rules: Vec<RuleRow>,
    /// Hits of rule ids past the datapath's cap (`RULE_SLOTS`), before.
    pub beyond_cap_base: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RuleRow {
    pub id: String,
    /// `allow`, `deny` or `exemption`.
    pub kind: String,
    pub direction: String,
    /// An exemption's last day.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    /// Networks it holds (a list file's lines).
    pub networks: usize,
    /// Hits counted by generations before this one.
    pub base: u64,
}

const FILE: &str = "rules.json";

impl RuleBook {
    /// The book of `compiled`, counted by `kernel_generation`, carrying
    /// over what `before` counted (its book and its generation's final
    /// counts) for the rule ids still in force.
    pub fn of(compiled: &Compiled, generation: u64, kernel_generation: u32, before: Option<(&RuleBook, &[u64])>) -> Self {
        // A rule is its id and kind (one id may allow and deny: a list file used both ways).
        let mut carried: HashMap<(&str, &str), u64> = HashMap::new();
        let mut beyond_cap_base = 0;
        if let Some((book, counts)) = before {
            for (i, row) in book.rules.iter().enumerate() {
                *carried.entry((row.id.as_str(), row.kind.as_str())).or_default() += row.base + hits_of(counts, i as u32 + 1);
            }
            beyond_cap_base = book.beyond_cap_base + counts.first().copied().unwrap_or(0);
        }
        let rules = compiled
            .rule_slots
            .iter()
            .map(|s| RuleRow {
                id: s.id.to_string(),
                kind: s.kind.name().to_owned(),
                direction: direction::NAMES.get(s.direction as usize).copied().unwrap_or("unknown").to_owned(),
                until: s.until.map(time::format_date),
                networks: s.networks,
                base: carried.get(&(&*s.id, s.kind.name())).copied().unwrap_or(0),
            })
            .collect();
        Self { generation, kernel_generation, rules, beyond_cap_base }
    }

    /// Each rule in force with its hits in all: `counts` are its kernel
    /// generation's now.
    pub fn totals<'a>(&'a self, counts: &'a [u64]) -> impl Iterator<Item = (&'a RuleRow, u64)> + 'a {
        self.rules.iter().enumerate().map(move |(i, row)| (row, row.base + hits_of(counts, i as u32 + 1)))
    }

    /// Hits of rule ids past the cap, in all.
    pub fn beyond_cap(&self, counts: &[u64]) -> u64 {
        self.beyond_cap_base + counts.first().copied().unwrap_or(0)
    }

    pub fn write(&self, run_dir: &Path) -> std::io::Result<()> {
        crate::files::replace(&run_dir.join(FILE), &serde_json::to_vec(self).map_err(std::io::Error::other)?)
    }

    pub fn read(run_dir: &Path) -> Option<Self> {
        serde_json::from_slice(&std::fs::read(run_dir.join(FILE)).ok()?).ok()
    }
}

/// Rule id `rule`'s cell (ids past the cap count in cell 0, not theirs).
fn hits_of(counts: &[u64], rule: u32) -> u64 {
    if rule < policy_common::RULE_SLOTS {
        counts.get(rule as usize).copied().unwrap_or(0)
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{load_and_compile, ReadOptions};

    fn compiled(text: &str) -> Compiled {
        let dir = std::env::temp_dir().join(format!("sg-rulebook-{}-{}", std::process::id(), text.len()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("p.yaml"), text).unwrap();
        let (c, d) = load_and_compile(&dir.join("p.yaml"), &ReadOptions::default());
        let _ = std::fs::remove_dir_all(&dir);
        c.unwrap_or_else(|| panic!("{d:?}")).1
    }

    #[test]
    fn hits_carry_over_by_rule_id_across_generations_and_rules_gone_are_let_go() {
        let one = compiled("version: 1\ningress:\n  default: {25: allow}\n  deny: [{id: a, cidr: 192.0.2.0/24}, {id: b, cidr: 198.51.100.0/24}]\n");
        let book = RuleBook::of(&one, 1, 1, None);
        assert_eq!(book.rules.iter().map(|r| (r.id.as_str(), r.base)).collect::<Vec<_>>(), [("a", 0), ("b", 0)]);
        // Generation 1 counted 5 for a, 7 for b; the next policy drops b,
        // adds c before a (so a's id moves).
        let mut counts = vec![0u64; policy_common::RULE_SLOTS as usize];
        counts[1] = 5;
        counts[2] = 7;
        let two = compiled("version: 1\ningress:\n  default: {25: allow}\n  deny: [{id: c, cidr: 203.0.113.0/24}, {id: a, cidr: 192.0.2.0/24}]\n");
        let next = RuleBook::of(&two, 2, 0, Some((&book, &counts)));
        let mut now = vec![0u64; policy_common::RULE_SLOTS as usize];
        now[2] = 1;
        let totals: Vec<(&str, u64)> = next.totals(&now).map(|(r, n)| (r.id.as_str(), n)).collect();
        assert_eq!(totals, [("c", 0), ("a", 6)]);
    }
}

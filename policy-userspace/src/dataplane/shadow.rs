//! The shadow policy's generations (`policy_common::SHADOW_GENERATIONS`):
//! a candidate kept beside the enforced policy, judged on every packet it
//! guards, deciding nothing. Its ACL lives in the `ACL_V6` trie only (IPv4
//! as IPv4-mapped prefixes in scopes of their own, `SHADOW_V4_SCOPE`), so a host without a shadow spends no memory
//! on one. A reload of the shadow fills its standby generation and flips
//! the shadow byte of `RUNTIME`; its difference counters start afresh
//! with each candidate, since rule ids name the candidate's rules (the
//! shadow judges nothing for the grace period that clears them: a gap in
//! a measurement, never a count of one candidate under another's rules).

use ipnet::{IpNet, Ipv6Net};
use policy_common::{SHADOW_GENERATIONS, SHADOW_V4_SCOPE};

use super::{
    generations::{acl6_contents, diff, rcu_grace_period, write_acl_v6, AclContents},
    maps::Maps,
    Result,
};
use crate::policy::Compiled;

/// What each shadow generation holds, as last written or read back.
pub struct Shadow {
    installed: [AclContents; 2],
}

/// An IPv4 prefix as the IPv4-mapped IPv6 prefix the trie holds.
fn mapped(n: ipnet::Ipv4Net) -> IpNet {
    IpNet::V6(Ipv6Net::new(n.network().to_ipv6_mapped(), 96 + n.prefix_len()).expect("at most 128 bits"))
}

impl Shadow {
    /// Nothing installed (fresh maps).
    pub fn empty() -> Self {
        Self { installed: [Vec::new(), Vec::new()] }
    }

    /// What the maps hold for the shadow generations (pins of an earlier run).
    pub fn adopt(maps: &mut Maps) -> Result<Self> {
        Ok(Self { installed: [acl6_contents(maps, SHADOW_GENERATIONS[0] as u8)?, acl6_contents(maps, SHADOW_GENERATIONS[1] as u8)?] })
    }

    /// Makes `compiled` the shadow (number `number`): the candidate before
    /// stops judging, its counters go once no packet judges by it, then
    /// the standby generation is filled and flipped to, so every count is
    /// the new candidate's. Returns the generation.
    pub fn install(&mut self, maps: &mut Maps, compiled: &Compiled, number: u64) -> Result<u32> {
        let active = maps.runtime().shadow as u32;
        if active != 0 {
            maps.runtime_words().set_shadow(0);
            rcu_grace_period();
        }
        let installed = self.fill_standby(maps, compiled, number, active);
        if installed.is_err() && active != 0 {
            // The candidate before judges on (its counts start again).
            maps.runtime_words().set_shadow(active);
        }
        installed
    }

    fn fill_standby(&mut self, maps: &mut Maps, compiled: &Compiled, number: u64, active: u32) -> Result<u32> {
        maps.clear_shadow_counts()?;
        let standby = if active == SHADOW_GENERATIONS[0] { SHADOW_GENERATIONS[1] } else { SHADOW_GENERATIONS[0] };
        let slot = (standby - SHADOW_GENERATIONS[0]) as usize;
        let mut wanted: AclContents = compiled.v4.iter().map(|(s, n, e)| ((*s | SHADOW_V4_SCOPE, mapped(*n)), *e)).chain(compiled.v6.iter().map(|(s, n, e)| ((*s, IpNet::V6(*n)), *e))).collect();
        wanted.sort_unstable_by_key(|(k, _)| *k);
        let (stale, changed) = diff(&self.installed[slot], &wanted);
        if let Err(e) = write_acl_v6(maps, standby as u8, &stale, &changed) {
            self.installed[slot] = acl6_contents(maps, standby as u8).unwrap_or_default();
            return Err(e);
        }
        self.installed[slot] = wanted;
        let mut config = compiled.config;
        config.generation = number;
        maps.set_shadow_policy(standby, &config)?;
        maps.runtime_words().set_shadow(standby);
        Ok(standby)
    }

    /// No shadow any more: the flag cleared, then (no packet judging by it)
    /// its entries and counters removed.
    pub fn remove(&mut self, maps: &mut Maps) -> Result<()> {
        maps.runtime_words().set_shadow(0);
        rcu_grace_period();
        for (slot, g) in SHADOW_GENERATIONS.iter().enumerate() {
            let keys: Vec<_> = std::mem::take(&mut self.installed[slot]).into_iter().map(|(k, _)| k).collect();
            write_acl_v6(maps, *g as u8, &keys, &[])?;
        }
        maps.clear_shadow_counts()
    }
}

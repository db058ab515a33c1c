//! The policy swap protocol, whole. Two generations of every policy map
//! live side by side; packets read the one `RUNTIME.active` names.
//! [`Generations::swap`] fills the standby generation (only entries that
//! differ from what it holds), flips `active` with one store, and, after
//! an RCU grace period lets the packets still reading the old generation
//! finish, brings the now idle one level with the new policy so the next
//! edit is again a small diff. A policy that does not fit changes nothing.

use ipnet::IpNet;
use policy_common::{acl4::Capacity, AclEntry, AclKeyV6, ACL_KEY_HEADER_BITS};

use super::{acl4_writer, batch, maps::Maps, DataplaneError, Result};
use crate::policy::Compiled;

/// (scope, IPv4 prefix, entry), in no particular order.
type Acl4Contents = Vec<(u8, ipnet::Ipv4Net, AclEntry)>;
/// (scope, prefix) and entry, sorted by key: one generation's share of
/// the IPv6 trie. Sorted so that two of them diff in one merge pass.
pub(super) type AclContents = Vec<(AclKey, AclEntry)>;
/// (scope, prefix): where an entry sits in a generation.
pub(super) type AclKey = (u8, IpNet);
/// (generation, scope, prefix) and the entry to write there, or `None`
/// to remove it.
pub type AclEdit = ((u8, u8, IpNet), Option<AclEntry>);

/// What each generation holds, as last written or read back.
pub struct Generations {
    installed_v4: [Acl4Contents; 2],
    installed_v6: [AclContents; 2],
    /// Elements of the IPv4 arrays each generation uses.
    acl4_used: [Capacity; 2],
    /// A flip happened since the last RCU grace period: the generation
    /// flipped away from may still be read by packets in flight.
    grace_pending: bool,
}

/// Waits until every CPU has left any program run that began before the
/// call (an RCU grace period), via membarrier(MEMBARRIER_CMD_GLOBAL).
/// After a flip, that is when the old generation is unused.
pub fn rcu_grace_period() {
    const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
    // SAFETY: membarrier takes no pointers.
    let rc = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if rc != 0 {
        // Kernels with nohz_full refuse it; program runs last microseconds.
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

const EMPTY: Capacity = Capacity { nodes: 0, slots: 0, values: 0 };

impl Generations {
    /// Nothing installed yet (fresh maps).
    pub fn empty() -> Self {
        Self { installed_v4: [Vec::new(), Vec::new()], installed_v6: [Vec::new(), Vec::new()], acl4_used: [EMPTY; 2], grace_pending: false }
    }

    /// What pinned maps of an earlier run hold, read back.
    pub fn adopt(maps: &mut Maps) -> Result<Self> {
        let mut g = Self::empty();
        for generation in 0..2u8 {
            g.installed_v4[generation as usize] = acl4_contents(maps, generation)?;
            g.installed_v6[generation as usize] = acl6_contents(maps, generation)?;
        }
        Ok(g)
    }

    /// Makes `compiled` the policy packets are judged by: installed into
    /// the standby generation, flipped to, and copied into the generation
    /// flipped away from once no packet reads it. Returns the generation
    /// now active. `number` is the policy's generation number.
    pub fn swap(&mut self, maps: &mut Maps, compiled: &Compiled, number: u64) -> Result<u32> {
        let standby = maps.runtime().active ^ 1;
        self.install(maps, standby, compiled, number)?;
        self.activate(maps, standby, compiled.events.drop_sample_one_in, compiled.events.per_second);
        // The new policy is in force; a failure here only costs the next
        // reload a bigger diff.
        if let Err(e) = self.install(maps, standby ^ 1, compiled, number) {
            tracing::warn!("updating the standby generation failed ({e}); the next reload rewrites it");
        }
        Ok(standby)
    }

    /// Fills `generation` with a compiled policy, replacing what it held:
    /// only entries that differ are written, in batches, so a one-rule
    /// edit of a large policy costs a few syscalls. Packets do not see it
    /// until [`Generations::activate`].
    pub fn install(&mut self, maps: &mut Maps, generation: u32, compiled: &Compiled, number: u64) -> Result<()> {
        let gen = generation as usize & 1;
        if self.grace_pending {
            rcu_grace_period();
            self.grace_pending = false;
        }
        // Built before anything is written: a policy that does not fit
        // leaves the generation as it was.
        let tables = acl4_writer::build(&compiled.v4, gen as u32, &maps.acl4_ref()?.capacity)?;
        let mut wanted: AclContents = compiled.v6.iter().map(|(s, n, e)| ((*s, IpNet::V6(*n)), *e)).collect();
        wanted.sort_unstable_by_key(|(k, _)| *k);
        let old = std::mem::take(&mut self.installed_v6[gen]);
        let (stale, changed) = diff(&old, &wanted);
        if let Err(e) = write_acl_v6(maps, gen as u8, &stale, &changed) {
            // Part of it may be written: learn what the trie holds now.
            self.installed_v6[gen] = acl6_contents(maps, gen as u8).unwrap_or_default();
            return Err(e);
        }
        self.installed_v6[gen] = wanted;
        self.write_acl4(maps, gen as u32, &tables)?;
        self.installed_v4[gen] = compiled.v4.clone();
        let mut config = compiled.config;
        config.generation = number;
        maps.set_policy(gen as u32, &config)
    }

    /// Makes packets judge by `generation`, with the event settings given:
    /// every packet that starts from now on is judged by it. The other
    /// generation is not written again before an RCU grace period has let
    /// the packets still reading it finish. Writes only the controller's
    /// words, one atomic store each.
    pub fn activate(&mut self, maps: &Maps, generation: u32, drop_sample_one_in: u32, events_per_second: u32) {
        let words = maps.runtime_words();
        words.set_events(drop_sample_one_in, events_per_second);
        words.set_active(generation & 1);
        self.grace_pending = true;
    }

    /// Writes (`Some`) or removes (`None`) ACL entries of one generation
    /// each, the IPv4 arrays of each generation touched rebuilt once
    /// (tests and benchmarks seeding single entries).
    pub fn edit(&mut self, maps: &mut Maps, edits: &[AclEdit]) -> Result<()> {
        // The last edit of a prefix wins.
        let mut v4_edits: [std::collections::HashMap<(u8, ipnet::Ipv4Net), Option<AclEntry>>; 2] = Default::default();
        for ((generation, scope, net), entry) in edits {
            let generation = *generation as usize & 1;
            let net = net.trunc();
            match net {
                IpNet::V4(n) => {
                    v4_edits[generation].insert((*scope, n), *entry);
                }
                IpNet::V6(n) => {
                    let key = (*scope, net);
                    let contents = &mut self.installed_v6[generation];
                    match (contents.binary_search_by_key(&key, |(k, _)| *k), entry) {
                        (Ok(i), Some(e)) => contents[i].1 = *e,
                        (Err(i), Some(e)) => contents.insert(i, (key, *e)),
                        (Ok(i), None) => {
                            contents.remove(i);
                        }
                        (Err(_), None) => {}
                    }
                    let key = aya::maps::lpm_trie::Key::new(ACL_KEY_HEADER_BITS + n.prefix_len() as u32, AclKeyV6::new(generation as u8, *scope, n.network().octets()));
                    let trie = maps.acl_v6();
                    match entry {
                        Some(e) => trie.insert(&key, e, 0),
                        None => trie.remove(&key),
                    }
                    .map_err(|source| DataplaneError::Map { name: policy_common::ACL_V6, source })?;
                }
            }
        }
        for (generation, changes) in v4_edits.into_iter().enumerate() {
            if changes.is_empty() {
                continue;
            }
            let contents = &mut self.installed_v4[generation];
            contents.retain(|(scope, net, _)| !changes.contains_key(&(*scope, *net)));
            contents.extend(changes.into_iter().filter_map(|((scope, net), e)| Some((scope, net, e?))));
            let tables = acl4_writer::build(&self.installed_v4[generation], generation as u32, &maps.acl4_ref()?.capacity)?;
            self.write_acl4(maps, generation as u32, &tables)?;
        }
        Ok(())
    }

    fn write_acl4(&mut self, maps: &mut Maps, generation: u32, tables: &acl4_writer::Tables) -> Result<()> {
        maps.acl4()?.write(generation, tables);
        self.acl4_used[generation as usize & 1] = Capacity { nodes: tables.nodes.len() as u32, slots: tables.slots.len() as u32, values: tables.values.len() as u32 };
        Ok(())
    }

    /// Elements of the IPv4 ACL arrays both generations use (counting the
    /// reserved value 0 of each), and their room.
    pub fn acl4_usage(&self, maps: &Maps) -> Result<(Capacity, Capacity)> {
        let used = self.acl4_used.iter().fold(EMPTY, |sum, u| Capacity { nodes: sum.nodes + u.nodes, slots: sum.slots + u.slots, values: sum.values + u.values });
        let room = maps.acl4_ref()?.capacity;
        let n = policy_common::GENERATIONS;
        Ok((used, Capacity { nodes: room.nodes * n, slots: room.slots * n, values: room.values * n }))
    }

    /// ACL entries installed, IPv4 and IPv6, both generations.
    pub fn entry_counts(&self) -> (usize, usize) {
        (self.installed_v4.iter().map(Vec::len).sum(), self.installed_v6.iter().map(Vec::len).sum())
    }
}

/// Deletes `stale` and writes `changed` in `generation` of `ACL_V6`.
pub(super) fn write_acl_v6(maps: &Maps, generation: u8, stale: &[AclKey], changed: &[(AclKey, AclEntry)]) -> Result<()> {
    use aya::maps::lpm_trie::Key;
    let key_bytes = |scope: u8, net: &IpNet, out: &mut Vec<u8>| {
        let IpNet::V6(n) = net else { return };
        let bits = ACL_KEY_HEADER_BITS + n.prefix_len() as u32;
        out.extend_from_slice(batch::bytes_of(&Key::new(bits, AclKeyV6::new(generation, scope, n.network().octets()))));
    };
    let (mut del, mut up, mut val) = (Vec::new(), Vec::new(), Vec::new());
    for (scope, net) in stale {
        key_bytes(*scope, net, &mut del);
    }
    for ((scope, net), entry) in changed {
        key_bytes(*scope, net, &mut up);
        val.extend_from_slice(batch::bytes_of(entry));
    }
    let name = policy_common::ACL_V6;
    let key_size = size_of::<Key<AclKeyV6>>();
    let fd = maps.acl_v6_fd();
    batch::delete(fd, &del, del.len() / key_size).map_err(|source| DataplaneError::Batch { name, source })?;
    batch::update(fd, &up, &val, val.len() / size_of::<AclEntry>()).map_err(|source| DataplaneError::Batch { name, source })
}

/// What `generation`'s IPv4 arrays hold, read back.
fn acl4_contents(maps: &Maps, generation: u8) -> Result<Acl4Contents> {
    let arrays = maps.acl4_ref()?;
    Ok((0..policy_common::ACL_SCOPES as u8)
        .flat_map(|scope| acl4_writer::read_back(arrays, generation as u32, scope).into_iter().map(move |(n, e)| (scope, n, e)))
        .collect())
}

/// Every IPv6 ACL entry stored for `generation`, read from the trie.
pub(super) fn acl6_contents(maps: &mut Maps, generation: u8) -> Result<AclContents> {
    let mut out = AclContents::new();
    for item in maps.acl_v6().iter() {
        let (key, entry) = item.map_err(|source| DataplaneError::Map { name: policy_common::ACL_V6, source })?;
        let data = key.data();
        if data.generation == generation {
            let addr = std::net::Ipv6Addr::from(policy_common::words_to_octets(&data.addr));
            let net = IpNet::new(std::net::IpAddr::V6(addr), (key.prefix_len() - ACL_KEY_HEADER_BITS) as u8).expect("stored prefix length");
            out.push(((data.scope, net), entry));
        }
    }
    out.sort_unstable_by_key(|(k, _)| *k);
    Ok(out)
}

/// What turns `old` into `new` (both sorted by key): keys to delete, and
/// entries to write (new or changed).
pub(super) fn diff(old: &AclContents, new: &AclContents) -> (Vec<AclKey>, AclContents) {
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

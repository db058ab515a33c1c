//! A loaded datapath with a base policy, and helpers to seed ACL entries
//! and per-source state the way a case or a benchmark needs them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use policy_common::{verdict, 
    acl_scope, direction, mode, profile, side, smtp_command,
    source::{source_key_v4, source_key_v6, source_set, SlotInfo, SourceSet, SourceSlot, Window},
    AclEntry, Counter, DirectionPolicy, PolicyConfig, MAX_PORTS, PORT_UNUSED,
};
use smtpguard::{
    clock::ktime_now_ns,
    dataplane::{testing::AclPrefix, Capacities, Dataplane, DataplaneError, Hook},
};

pub const NS_PER_S: u64 = 1_000_000_000;

/// Guarded ports of the base policy, by slot.
pub const PORTS: [u16; MAX_PORTS] = [25, 465, 587, 2525];
pub const RATE_PER_MINUTE: u64 = 60;
pub const RATE_BURST: u64 = 20;
pub const BAN_THRESHOLD: u32 = 100;
pub const BAN_BASE_S: u32 = 900;
pub const BAN_FACTOR: u32 = 2;
pub const BAN_MAX_S: u32 = 86_400;
/// Country index the base policy blocks when geo is on.
pub const BLOCKED_COUNTRY: u32 = 7;
pub const OPEN_COUNTRY: u32 = 8;

/// A policy file `dir/name.yaml` denying `cidrs` on ingress port 25 from
/// the list file `dir/name.txt`, plus `extra_yaml` under `ingress:`.
pub fn write_deny_policy(dir: &std::path::Path, name: &str, cidrs: &[ipnet::Ipv4Net], extra_yaml: &str) -> std::io::Result<std::path::PathBuf> {
    std::fs::create_dir_all(dir)?;
    let list: String = cidrs.iter().map(|c| format!("{c}\n")).collect();
    std::fs::write(dir.join(format!("{name}.txt")), &list)?;
    let path = dir.join(format!("{name}.yaml"));
    // A million CIDRs are about 15 MB, over the default limit of 8 MiB.
    let limits = if list.len() > 8 << 20 { format!("limits: {{list_file_bytes: {}}}\n", list.len().next_power_of_two()) } else { String::new() };
    std::fs::write(&path, format!("version: 1\n{limits}ports: {{25: smtp}}\ningress:\n  default: {{25: allow}}\n  deny_files: [{name}.txt]\n{extra_yaml}"))?;
    Ok(path)
}

/// The two ends of a test flow in one direction and family.
#[derive(Clone, Copy, Debug)]
pub struct Ends {
    pub src: IpAddr,
    pub dst: IpAddr,
}

/// Ingress: an outside client (peer, source) to a tenant server (local).
/// Egress: a tenant (local, source) to a remote server (peer).
pub fn ends(dir: u8, v6: bool) -> Ends {
    let (src, dst): (IpAddr, IpAddr) = match (dir, v6) {
        (direction::INGRESS, false) => (Ipv4Addr::new(198, 51, 100, 7).into(), Ipv4Addr::new(203, 0, 113, 25).into()),
        (direction::INGRESS, true) => ("2001:db8:100::7".parse::<Ipv6Addr>().unwrap().into(), "2001:db8:25::25".parse::<Ipv6Addr>().unwrap().into()),
        (_, false) => (Ipv4Addr::new(192, 0, 2, 10).into(), Ipv4Addr::new(203, 0, 113, 80).into()),
        (_, true) => ("2001:db8:a::10".parse::<Ipv6Addr>().unwrap().into(), "2001:db8:80::80".parse::<Ipv6Addr>().unwrap().into()),
    };
    Ends { src, dst }
}

/// Base direction policy: ports 25 (smtp), 465, 587, 2525; ingress passes
/// by default, egress denies 25; malformed packets dropped; VRFY and EXPN
/// blocked; geo-fence and rate limit configured but switched off.
pub fn base_direction(dir: u8) -> DirectionPolicy {
    let mut p = DirectionPolicy::EMPTY;
    for (i, port) in PORTS.iter().enumerate() {
        p.ports[i] = *port as u32;
    }
    p.profile = [profile::SMTP, profile::SMTPS, profile::SUBMISSION, profile::OTHER];
    p.default_verdict =
        if dir == direction::EGRESS { [verdict::DROP, verdict::PASS, verdict::PASS, verdict::PASS] } else { [verdict::PASS; MAX_PORTS] };
    p.mode = mode::ENFORCE;
    p.malformed_verdict = verdict::DROP;
    p.acl_sides = side::PEER_BIT | side::LOCAL_BIT;
    p.smtp_block = smtp_command::VRFY | smtp_command::EXPN;
    p.rate_interval_ns = 60 * NS_PER_S / RATE_PER_MINUTE;
    p.rate_tolerance_ns = (RATE_BURST - 1) * p.rate_interval_ns;
    p.ban_threshold = BAN_THRESHOLD;
    p.ban_base_s = BAN_BASE_S;
    p.ban_factor = BAN_FACTOR;
    p.ban_max_s = BAN_MAX_S;
    p.geo_drop[(BLOCKED_COUNTRY / 64) as usize] |= 1 << (BLOCKED_COUNTRY % 64);
    p
}

pub fn base_policy() -> PolicyConfig {
    PolicyConfig { generation: 1, direction: [base_direction(direction::INGRESS), base_direction(direction::EGRESS)] }
}

/// Guards nothing: `ports` all unused.
pub fn unguarded() -> DirectionPolicy {
    DirectionPolicy { ports: [PORT_UNUSED; MAX_PORTS], ..DirectionPolicy::EMPTY }
}

/// An ACL entry for one port slot.
pub fn entry(slot: usize, allow_rule: u32, deny_rule: u32, country: u32) -> AclEntry {
    let mut e = AclEntry { country, ..AclEntry::default() };
    e.allow_rule[slot] = allow_rule;
    e.deny_rule[slot] = deny_rule;
    e
}

/// An ACL entry for every port slot.
pub fn entry_all_ports(allow_rule: u32, deny_rule: u32, country: u32) -> AclEntry {
    AclEntry { allow_rule: [allow_rule; MAX_PORTS], deny_rule: [deny_rule; MAX_PORTS], country }
}

/// The source key the datapath uses for an address.
pub fn source_key(addr: IpAddr) -> u64 {
    match addr {
        IpAddr::V4(a) => source_key_v4(a.octets()),
        IpAddr::V6(a) => source_key_v6(a.octets()),
    }
}

/// The datapath under test plus what was seeded into it, so each case
/// starts from a clean state.
pub struct Harness {
    pub dp: Dataplane,
    acl: Vec<AclPrefix>,
    sets: Vec<u32>,
}

impl Harness {
    pub fn load() -> Result<Self, DataplaneError> {
        Self::load_with(Capacities::default(), None)
    }

    /// [`Harness::load`] with map sizes of the test's choosing (a small
    /// source table), and pins.
    pub fn load_with(capacities: Capacities, pin_dir: Option<&std::path::Path>) -> Result<Self, DataplaneError> {
        let dp = Dataplane::load(capacities, pin_dir)?;
        let mut h = Self { dp, acl: Vec::new(), sets: Vec::new() };
        h.set_policy(&base_policy())?;
        Ok(h)
    }

    pub fn set_policy(&mut self, policy: &PolicyConfig) -> Result<(), DataplaneError> {
        let generation = self.dp.runtime().active;
        self.dp.set_policy(generation, policy)
    }

    /// Makes `hook` judge by `dir`, with events uncapped enough for tests.
    pub fn route(&mut self, hook: Hook, dir: u8, drop_sample_one_in: u32) -> Result<(), DataplaneError> {
        let mut rt = self.dp.runtime();
        rt.hook_direction[hook.index()] = dir;
        rt.drop_sample_one_in = drop_sample_one_in;
        rt.events_per_second = 1_000;
        self.dp.set_runtime(rt);
        Ok(())
    }

    pub fn add_acl(&mut self, dir: u8, acl_side: u8, addr: IpAddr, prefix_len: u8, e: AclEntry) -> Result<(), DataplaneError> {
        self.add_acls(dir, acl_side, &[(addr, prefix_len)], e)
    }

    /// Many prefixes with the same meaning, written at once.
    pub fn add_acls(&mut self, dir: u8, acl_side: u8, prefixes: &[(IpAddr, u8)], e: AclEntry) -> Result<(), DataplaneError> {
        let entries: Vec<_> = prefixes.iter().map(|&(addr, len)| (addr, len, e)).collect();
        self.add_acl_entries(dir, acl_side, &entries)
    }

    /// Many prefixes, each with its own meaning, written at once.
    pub fn add_acl_entries(&mut self, dir: u8, acl_side: u8, entries: &[(IpAddr, u8, AclEntry)]) -> Result<(), DataplaneError> {
        let generation = self.dp.runtime().active as u8;
        let edits: Vec<_> = entries
            .iter()
            .map(|&(addr, prefix_len, e)| (AclPrefix { generation, scope: acl_scope(dir, acl_side), addr, prefix_len }, Some(e)))
            .collect();
        self.dp.edit_acls(&edits)?;
        self.acl.extend(edits.iter().map(|(p, _)| *p));
        Ok(())
    }

    fn set_index(&self, addr: IpAddr) -> u32 {
        source_set(source_key(addr), self.dp.source_sets())
    }

    /// Puts `slot` (with the key of `addr`) into the source's set.
    pub fn seed_source(&mut self, addr: IpAddr, mut slot: SourceSlot) -> Result<(), DataplaneError> {
        let index = self.set_index(addr);
        let mut set = self.dp.source_set(index);
        slot.key = source_key(addr);
        let way = set.slots.iter().position(|s| s.key == 0 || s.key == slot.key).unwrap_or(0);
        set.slots[way] = slot;
        self.dp.set_source_set(index, &set);
        self.sets.push(index);
        Ok(())
    }

    /// The source's slot, if the datapath tracks it.
    pub fn source(&mut self, addr: IpAddr) -> Result<Option<SourceSlot>, DataplaneError> {
        let index = self.set_index(addr);
        let key = source_key(addr);
        self.sets.push(index);
        Ok(self.dp.source_set(index).slots.iter().find(|s| s.key == key).copied())
    }

    /// Forgets a source: the datapath sees it as new again.
    pub fn clear_source(&mut self, addr: IpAddr) -> Result<(), DataplaneError> {
        let index = self.set_index(addr);
        self.dp.set_source_set(index, &SourceSet::default());
        Ok(())
    }

    /// Removes every seeded entry and resets the policy.
    pub fn reset(&mut self) -> Result<(), DataplaneError> {
        let removals: Vec<_> = std::mem::take(&mut self.acl).into_iter().map(|p| (p, None)).collect();
        self.dp.edit_acls(&removals)?;
        for index in std::mem::take(&mut self.sets) {
            self.dp.set_source_set(index, &SourceSet::default());
        }
        self.dp.clear_smtp_flows()?;
        if self.dp.runtime().shadow != 0 {
            self.dp.remove_shadow()?;
        }
        self.set_policy(&base_policy())?;
        self.dp.drain_events()?;
        Ok(())
    }

    /// Loads the policy `yaml` as the shadow (a candidate judged beside).
    pub fn set_shadow(&mut self, yaml: &str) -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(format!("sg-shadow-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let file = dir.join("candidate.yaml");
        std::fs::write(&file, yaml)?;
        let (loaded, diags) = smtpguard::policy::load_and_compile(&file, &smtpguard::policy::ReadOptions::default());
        let _ = std::fs::remove_dir_all(&dir);
        let (_, compiled) = loaded.ok_or_else(|| anyhow::anyhow!("the shadow policy: {diags}"))?;
        self.dp.install_shadow(&compiled, 1)?;
        Ok(())
    }

    pub fn counters(&mut self) -> Result<(Vec<Counter>, Vec<u64>), DataplaneError> {
        Ok((self.dp.stats()?, self.dp.geo_drops()?))
    }
}

/// Ready-made source states, relative to the kernel clock now.
pub mod seed {
    use super::*;

    pub fn banned_for(seconds: u64) -> SourceSlot {
        let now = ktime_now_ns();
        SourceSlot {
            ban_until_ns: now + seconds * NS_PER_S,
            info: SlotInfo { strikes: 1, origin: 1, flags: 0, last_seen_s: (now / NS_PER_S) as u32 }.pack(),
            ..SourceSlot::default()
        }
    }

    pub fn ban_expired() -> SourceSlot {
        let now = ktime_now_ns();
        SourceSlot { ban_until_ns: now - NS_PER_S, info: SlotInfo { strikes: 1, ..SlotInfo::default() }.pack(), ..SourceSlot::default() }
    }

    /// The bucket is empty: the next token is a whole interval away.
    pub fn bucket_empty(policy: &DirectionPolicy) -> SourceSlot {
        let now = ktime_now_ns();
        SourceSlot { admit_tat_ns: now + policy.rate_tolerance_ns + policy.rate_interval_ns, ..SourceSlot::default() }
    }

    /// The bucket was empty two intervals ago; time has refilled a token.
    pub fn bucket_refilled(policy: &DirectionPolicy) -> SourceSlot {
        let now = ktime_now_ns();
        SourceSlot { admit_tat_ns: now + policy.rate_tolerance_ns - policy.rate_interval_ns, ..SourceSlot::default() }
    }

    /// `count` SYNs so far in the current minute, after `strikes` bans.
    pub fn meter_at(count: u16, strikes: u16) -> SourceSlot {
        let now_s = (ktime_now_ns() / NS_PER_S) as u32;
        SourceSlot {
            window: Window { start_s: now_s, previous: 0, current: count }.pack(),
            info: SlotInfo { strikes, ..SlotInfo::default() }.pack(),
            ..SourceSlot::default()
        }
    }
}

/// The pin and run directories of one test (`/sys/fs/bpf/sgtest_<tag>_<pid>`
/// and a temporary directory), made empty and removed on drop, also when
/// the test fails.
pub struct TestPins {
    pub pins: smtpguard::pins::Pins,
}

impl TestPins {
    pub fn new(tag: &str) -> Self {
        let id = format!("{tag}_{}", std::process::id());
        let pins = smtpguard::pins::Pins::new(format!("/sys/fs/bpf/sgtest_{id}"), std::env::temp_dir().join(format!("sgtest-{id}")));
        let _ = pins.remove_all();
        pins.create().expect("creating the pin and run directories");
        Self { pins }
    }

    /// `--pin-dir DIR --run-dir DIR`, for the `smtpguard` binary.
    pub fn args(&self) -> Vec<String> {
        vec!["--pin-dir".into(), self.pins.dir.display().to_string(), "--run-dir".into(), self.pins.run_dir.display().to_string()]
    }

    /// Runs an operator command of the `smtpguard` binary on these pins:
    /// its exit code and its output (stdout, then stderr).
    pub fn cmd(&self, args: &[&str]) -> (i32, String) {
        let out = std::process::Command::new(crate::smtpguard_bin()).args(args).args(self.args()).output().expect("running smtpguard");
        (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
    }
}

impl Drop for TestPins {
    fn drop(&mut self) {
        let _ = self.pins.remove_all();
    }
}

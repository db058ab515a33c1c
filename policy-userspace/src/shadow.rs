//! The shadow policy, controller side: the candidate `run --shadow FILE`
//! names, compiled and installed beside the enforced policy
//! ([`crate::dataplane::shadow`]), its record in the run directory
//! (`shadow.json`: what names its rule ids and ports for `smtpguard
//! shadow` and the metrics), and the report `smtpguard shadow` prints.

use std::{collections::HashMap, net::IpAddr, path::{Path, PathBuf}};

use anyhow::bail;
use policy_common::{direction, reason, shadow_total, verdict, ShadowKey};
use serde::{Deserialize, Serialize};

use crate::{nft, pins::Pins, policy::{Compiled, Policy}};

/// A candidate loaded into the shadow generations.
pub struct Loaded {
    pub policy: Policy,
    pub compiled: Compiled,
    pub record: std::sync::Arc<ShadowRecord>,
}

/// What names the shadow's counters: `run_dir/shadow.json`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ShadowRecord {
    pub file: PathBuf,
    pub sha256: String,
    /// The candidate's number (each reload of it counts one up).
    pub number: u64,
    /// Its generation (2 or 3).
    pub generation: u32,
    /// When it was loaded: its counters start there.
    pub loaded_at: String,
    /// Rule id `n` is `rules[n - 1]`.
    pub rules: Vec<String>,
    /// Ports of the enforced policy, by slot (the counters' port slots).
    pub ports: Vec<u16>,
}

const FILE: &str = "shadow.json";

impl ShadowRecord {
    pub fn new(file: &Path, loaded: (&Policy, &Compiled), number: u64, generation: u32, ports: Vec<u16>) -> Self {
        Self {
            file: file.to_path_buf(),
            sha256: loaded.0.sha256.clone(),
            number,
            generation,
            loaded_at: crate::clock::now_rfc3339(),
            rules: loaded.1.rule_slots.iter().map(|s| s.id.to_string()).collect(),
            ports,
        }
    }

    pub fn rule(&self, id: u32) -> &str {
        id.checked_sub(1).and_then(|i| self.rules.get(i as usize)).map_or("-", String::as_str)
    }

    pub fn port(&self, slot: u8) -> String {
        self.ports.get(slot as usize).map_or_else(|| "unknown".into(), u16::to_string)
    }

    pub fn write(&self, run_dir: &Path) -> std::io::Result<()> {
        crate::files::replace(&run_dir.join(FILE), &serde_json::to_vec(self).map_err(std::io::Error::other)?)
    }

    pub fn read(run_dir: &Path) -> Option<Self> {
        serde_json::from_slice(&std::fs::read(run_dir.join(FILE)).ok()?).ok()
    }

    pub fn remove(run_dir: &Path) {
        let _ = std::fs::remove_file(run_dir.join(FILE));
    }
}

/// A decision as the report names it: `drop/deny_acl`.
pub fn decision(v: u8, r: u8) -> String {
    let r = if r as usize == reason::COUNT { "not_guarded" } else { reason::NAMES.get(r as usize).copied().unwrap_or("?") };
    format!("{}/{r}", verdict::NAMES.get(v as usize).copied().unwrap_or("?"))
}

#[derive(Serialize)]
struct Row {
    direction: &'static str,
    port: String,
    current: String,
    candidate: String,
    candidate_rule: String,
    packets: u64,
}

#[derive(Serialize)]
struct Report {
    candidate: PathBuf,
    sha256: String,
    since: String,
    judged: [u64; 2],
    differences: u64,
    /// Packets the candidate would drop that pass now, and the reverse.
    newly_dropped: u64,
    newly_passed: u64,
    unkeyed: u64,
    by_decision: Vec<Row>,
    top_rules: Vec<(String, u64)>,
    top_sources: Vec<(IpAddr, u64)>,
}

/// `smtpguard shadow [--json] [--top N]`.
pub fn report(pins: &Pins, json: bool, top: usize) -> anyhow::Result<()> {
    if nft::commands::enforces(pins) {
        bail!("shadow policies need the eBPF datapath; this host enforces through nftables");
    }
    let maps = crate::commands::state::open_maps(pins)?;
    let active = maps.runtime().shadow as u32;
    let record = ShadowRecord::read(&pins.run_dir).filter(|r| r.generation == active && active != 0);
    let Some(record) = record else {
        bail!("no shadow policy is loaded (smtpguard run --shadow FILE loads one)");
    };
    let totals = maps.shadow_totals()?;
    let mut diffs = maps.shadow_diffs()?;
    diffs.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    let is_drop = |v: u8| v != verdict::PASS;
    let (mut newly_dropped, mut newly_passed) = (0, 0);
    let mut rules: HashMap<String, u64> = HashMap::new();
    for (k, n) in &diffs {
        match (is_drop(k.verdict), is_drop(k.shadow_verdict)) {
            (false, true) => newly_dropped += n,
            (true, false) => newly_passed += n,
            _ => {}
        }
        *rules.entry(record.rule(k.shadow_rule).to_owned()).or_default() += n;
    }
    let mut top_rules: Vec<(String, u64)> = rules.into_iter().collect();
    top_rules.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    top_rules.truncate(top);
    let mut sources = maps.shadow_sources()?;
    sources.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    let top_sources: Vec<(IpAddr, u64)> = sources.iter().take(top).map(|(s, n)| (source_addr(s), *n)).collect();
    let row = |k: &ShadowKey, n: u64| Row {
        direction: direction::NAMES.get(k.direction as usize).copied().unwrap_or("?"),
        port: record.port(k.port_slot),
        current: decision(k.verdict, k.reason),
        candidate: decision(k.shadow_verdict, k.shadow_reason),
        candidate_rule: record.rule(k.shadow_rule).to_owned(),
        packets: n,
    };
    let r = Report {
        candidate: record.file.clone(),
        sha256: record.sha256.clone(),
        since: record.loaded_at.clone(),
        judged: [totals.first().copied().unwrap_or(0), totals.get(1).copied().unwrap_or(0)],
        differences: diffs.iter().map(|(_, n)| n).sum::<u64>() + totals.get(shadow_total::UNKEYED as usize).copied().unwrap_or(0),
        newly_dropped,
        newly_passed,
        unkeyed: totals.get(shadow_total::UNKEYED as usize).copied().unwrap_or(0),
        by_decision: diffs.iter().map(|(k, n)| row(k, *n)).collect(),
        top_rules,
        top_sources,
    };
    if json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    let mut out = format!("shadow policy {} (sha256 {}), counting since {}\n", r.candidate.display(), &r.sha256[..12.min(r.sha256.len())], r.since);
    out += &format!("judged by both: ingress {}, egress {}\n", r.judged[0], r.judged[1]);
    out += &format!("decided differently: {} packets ({} would be dropped that pass now, {} would pass that are dropped now)\n", r.differences, r.newly_dropped, r.newly_passed);
    if r.unkeyed > 0 {
        out += &format!("  ({} of them not broken down: the difference table was full)\n", r.unkeyed);
    }
    out += &format!("  {:<8} {:<6} {:<24} {:<24} {:<24} {:>12}\n", "dir", "port", "now", "candidate", "candidate rule", "packets");
    for row in &r.by_decision {
        out += &format!("  {:<8} {:<6} {:<24} {:<24} {:<24} {:>12}\n", row.direction, row.port, row.current, row.candidate, row.candidate_rule, row.packets);
    }
    out += "top candidate rules:\n";
    for (rule, n) in &r.top_rules {
        out += &format!("  {rule:<32} {n:>12}\n");
    }
    out += "top sources:\n";
    for (addr, n) in &r.top_sources {
        out += &format!("  {addr:<40} {n:>12}\n");
    }
    print!("{out}");
    Ok(())
}

fn source_addr(s: &policy_common::ShadowSource) -> IpAddr {
    let octets = policy_common::words_to_octets(&s.addr);
    if s.family == 6 {
        IpAddr::from(octets)
    } else {
        IpAddr::from([octets[0], octets[1], octets[2], octets[3]])
    }
}

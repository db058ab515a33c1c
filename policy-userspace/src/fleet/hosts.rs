//! Each host's record in the fleet (`PREFIX/hosts/<id>`, on the host's
//! lease, so a dead host disappears) and `smtpguard fleet status`.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use etcd_client::GetOptions;
use serde::{Deserialize, Serialize};

use super::{bundle, record::hosts_prefix, settings::Connection};

/// What the controller has in force, as the fleet's thread reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostPolicy {
    /// `fleet` or `file`.
    pub source: String,
    /// The fleet revision in force, when `source` is `fleet`.
    pub revision: Option<i64>,
    pub file: String,
    pub sha256: String,
    pub generation: u64,
    /// Per direction: `ingress enforce, egress monitor`.
    pub mode: String,
    /// Why the last fleet revision offered was not applied (cleared when
    /// one is).
    pub last_error: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    pub host: String,
    pub version: String,
    pub updated: String,
    pub policy: HostPolicy,
    /// Bans in force here, any origin.
    pub bans: u64,
    /// Of them, made on other hosts.
    pub fleet_bans: u64,
    /// Fleet bans refused, by why.
    pub refused: BTreeMap<String, u64>,
    pub last_refusal: Option<String>,
}

/// `smtpguard fleet status`: the hosts, the revision each runs, and which failed.
pub async fn status(c: &Connection, json: bool) -> Result<bool> {
    let mut client = c.connect().await?;
    let pointer = bundle::pointer(&mut client, &c.prefix).await?;
    let resp = client.get(hosts_prefix(&c.prefix), Some(GetOptions::new().with_prefix())).await.context("reading the host records")?;
    let mut hosts: Vec<HostRecord> = Vec::new();
    let mut unreadable = Vec::new();
    for kv in resp.kvs() {
        match serde_json::from_slice::<HostRecord>(kv.value()) {
            Ok(h) => hosts.push(h),
            Err(e) => unreadable.push(format!("{}: {e}", kv.key_str().unwrap_or("?"))),
        }
    }
    hosts.sort_by(|a, b| a.host.cmp(&b.host));
    let current = pointer.as_ref().map(|(rev, _)| *rev);
    let behind = |h: &HostRecord| current.is_some_and(|r| h.policy.revision != Some(r) && h.policy.source == "fleet");
    let failed: Vec<&HostRecord> = hosts.iter().filter(|h| h.policy.last_error.is_some()).collect();
    if json {
        let out = serde_json::json!({
            "prefix": c.prefix,
            "policy": pointer.as_ref().map(|(rev, p)| serde_json::json!({"revision": rev, "pointer": p})),
            "hosts": hosts,
            "unreadable": unreadable,
        });
        println!("{out}");
        return Ok(failed.is_empty());
    }
    match &pointer {
        Some((rev, p)) => println!(
            "fleet {} at {}: policy revision {rev}, pushed by {} at {} (sha256 {}){}",
            c.prefix,
            c.endpoints.join(","),
            p.pushed_by,
            p.pushed_at,
            &p.sha256[..12.min(p.sha256.len())],
            p.comment.as_deref().map(|c| format!(": {c}")).unwrap_or_default()
        ),
        None => println!("fleet {} at {}: no fleet policy pushed", c.prefix, c.endpoints.join(",")),
    }
    println!("{:<20} {:<14} {:>5} {:<28} {:>7} {:>7} {:>8}  last error", "host", "policy", "gen", "mode", "bans", "fleet", "refused");
    for h in &hosts {
        let policy = match (h.policy.source.as_str(), h.policy.revision) {
            ("fleet", Some(r)) => format!("rev {r}{}", if behind(h) { " (behind)" } else { "" }),
            ("fleet", None) => "fleet (none)".to_owned(),
            _ => "local file".to_owned(),
        };
        let refused: u64 = h.refused.values().sum();
        let error = h.policy.last_error.clone().or_else(|| h.last_refusal.clone()).unwrap_or_else(|| "-".into());
        println!("{:<20} {:<14} {:>5} {:<28} {:>7} {:>7} {:>8}  {}", h.host, policy, h.policy.generation, h.policy.mode, h.bans, h.fleet_bans, refused, error);
    }
    for u in &unreadable {
        println!("unreadable host record {u}");
    }
    let on_current = hosts.iter().filter(|h| current.is_some() && h.policy.revision == current).count();
    println!(
        "{} host(s){}; {} with an error{}",
        hosts.len(),
        current.map(|r| format!(", {on_current} on revision {r}")).unwrap_or_default(),
        failed.len(),
        if failed.is_empty() { String::new() } else { format!(" ({})", failed.iter().map(|h| h.host.as_str()).collect::<Vec<_>>().join(", ")) }
    );
    Ok(failed.is_empty())
}

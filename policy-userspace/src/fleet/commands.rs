//! The fleet's side of the operator commands: `fleet push`, `fleet
//! status`, and what `ban`, `unban` and `bans` do in a fleet (the
//! connection `run` recorded in the run directory).

use std::{collections::HashMap, path::Path, time::Duration};

use anyhow::{bail, Context, Result};
use etcd_client::{Client, GetOptions, PutOptions, Txn, TxnOp};
use ipnet::IpNet;

use super::{
    bundle::{self, Bundle},
    hosts,
    record::{self, BanRecord, Tombstone},
    settings::Connection,
};
use crate::{clock, policy::ReadOptions};

fn block_on<T>(f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(f)
}

fn wall_ms() -> u64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as u64
}

/// `smtpguard fleet push`: validates the policy as `check` does, then
/// makes it the fleet's if the fleet's is still the one read (or
/// `expect`). Returns false (exit 1) when nothing was pushed.
pub fn push(c: &Connection, policy_file: &Path, options: &ReadOptions, expect: Option<i64>, comment: Option<String>) -> Result<bool> {
    let bundle = match Bundle::build(policy_file, options) {
        Ok((bundle, diags)) => {
            let warnings = diags.to_string();
            if !warnings.trim().is_empty() {
                eprint!("{warnings}");
            }
            bundle
        }
        Err(diags) => {
            eprint!("{diags}");
            eprintln!("{}: not valid; nothing was pushed", policy_file.display());
            return Ok(false);
        }
    };
    let pushed_by = format!("{}@{}", std::env::var("SUDO_USER").or_else(|_| std::env::var("USER")).unwrap_or_else(|_| "root".into()), hostname());
    block_on(async {
        let mut client = c.connect().await?;
        let read = bundle::pointer(&mut client, &c.prefix).await?.map(|(rev, _)| rev).unwrap_or(0);
        if let Some(want) = expect {
            if want != read {
                eprintln!("the fleet's policy is at revision {read}, not {want}; nothing was pushed");
                return Ok(false);
            }
        }
        match bundle::push(&mut client, &c.prefix, &bundle, read, &pushed_by, comment).await? {
            Ok(p) => {
                println!(
                    "pushed revision {} of {} ({} file(s), {} bytes, sha256 {}); hosts apply it as they see it: `smtpguard fleet status` shows which did",
                    p.revision,
                    c.prefix,
                    p.files,
                    p.pointer.bytes,
                    &p.pointer.sha256[..12]
                );
                Ok(true)
            }
            Err(now) => {
                eprintln!("the fleet's policy changed while this push ran (revision {read} is now {now}); nothing was pushed: review the new one and push again");
                Ok(false)
            }
        }
    })
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_owned()).unwrap_or_else(|_| "?".into())
}

/// `smtpguard fleet status`; false when a host failed to apply the policy.
pub fn status(c: &Connection, json: bool) -> Result<bool> {
    block_on(hosts::status(c, json))
}

/// How long a command waits for etcd.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(8);

async fn connect(c: &Connection) -> Result<Client> {
    tokio::time::timeout(COMMAND_TIMEOUT, c.connect()).await.map_err(|_| anyhow::anyhow!("etcd at {} did not answer", c.endpoints.join(",")))?
}

/// Lifts the ban of `net` fleet-wide: deletes it and leaves a tombstone
/// for hosts that are away now. Returns whether the fleet held it.
pub fn unban(c: &Connection, host_id: &str, net: IpNet, local_until_ms: Option<u64>) -> Result<bool> {
    block_on(async {
        let mut client = connect(c).await?;
        tokio::time::timeout(COMMAND_TIMEOUT, async {
            let key = record::ban_key(&c.prefix, net);
            let held = client.get(key.clone(), None).await?;
            let fleet_until = held.kvs().first().and_then(|kv| serde_json::from_slice::<BanRecord>(kv.value()).ok()).map(|r| r.until_ms);
            let now = wall_ms();
            let until_ms = fleet_until.into_iter().chain(local_until_ms).max().unwrap_or(now).max(now + 60_000);
            let tombstone = Tombstone { by_host: host_id.to_owned(), at_ms: now, until_ms };
            let lease = client.lease_grant(((until_ms - now) / 1000 + 1) as i64, None).await?.id();
            let txn = Txn::new().and_then([
                TxnOp::delete(key, None),
                TxnOp::put(record::unban_key(&c.prefix, net), serde_json::to_vec(&tombstone)?, Some(PutOptions::new().with_lease(lease))),
            ]);
            client.txn(txn).await?;
            Ok::<_, anyhow::Error>(fleet_until.is_some())
        })
        .await
        .map_err(|_| anyhow::anyhow!("etcd did not answer in {} s", COMMAND_TIMEOUT.as_secs()))?
    })
}

/// Sends a manual ban made on this host to the fleet at once (the
/// controller's scan would within a second, without the reason).
pub fn publish_manual(c: &Connection, host_id: &str, net: IpNet, until_ms: u64, reason: Option<&str>) -> Result<()> {
    block_on(async {
        let mut client = connect(c).await?;
        tokio::time::timeout(COMMAND_TIMEOUT, async {
            let now = wall_ms();
            let record = BanRecord {
                origin_host: host_id.to_owned(),
                origin: "manual".into(),
                reason: reason.map(str::to_owned).unwrap_or_else(|| format!("banned by an operator on {host_id}")),
                strikes: 1,
                until: time::OffsetDateTime::from_unix_timestamp_nanos(until_ms as i128 * 1_000_000).map(clock::rfc3339).unwrap_or_default(),
                until_ms,
                started_ms: now,
            };
            let lease = client.lease_grant((until_ms.saturating_sub(now) / 1000 + 1) as i64, None).await?.id();
            client.put(record::ban_key(&c.prefix, net), serde_json::to_vec(&record)?, Some(PutOptions::new().with_lease(lease))).await?;
            Ok::<_, anyhow::Error>(())
        })
        .await
        .map_err(|_| anyhow::anyhow!("etcd did not answer in {} s", COMMAND_TIMEOUT.as_secs()))?
    })
}

/// The fleet's bans, for `bans` to say where each came from.
pub fn fleet_bans(c: &Connection) -> Result<HashMap<IpNet, BanRecord>> {
    block_on(async {
        let mut client = connect(c).await?;
        let resp = tokio::time::timeout(COMMAND_TIMEOUT, client.get(record::bans_prefix(&c.prefix), Some(GetOptions::new().with_prefix())))
            .await
            .map_err(|_| anyhow::anyhow!("etcd did not answer"))?
            .context("reading the fleet's bans")?;
        let trust = super::settings::Trust { min_prefix_v4: 0, min_prefix_v6: 0, max_bans: u32::MAX };
        Ok(resp.kvs().iter().filter_map(|kv| record::parse_ban(kv.key_str().ok()?, kv.value(), &c.prefix, &trust).ok()).collect())
    })
}

/// A network as the fleet keys it, from what an operator typed.
pub fn fleet_net(source: &str) -> Result<IpNet> {
    if let Ok(a) = source.parse() {
        return Ok(record::source_net(a));
    }
    match source.parse::<IpNet>() {
        Ok(n) if n.trunc() == n => Ok(n),
        Ok(n) => bail!("{source}: host bits set (the network is {})", n.trunc()),
        Err(_) => bail!("{source}: neither an address nor a network"),
    }
}

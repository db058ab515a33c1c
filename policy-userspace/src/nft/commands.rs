//! The operator commands where nftables enforces: `status`, `bans`,
//! `ban`, `unban` and `detach` act on the table instead of the pins.

use std::{net::IpAddr, time::Duration};

use anyhow::{bail, Context};

use super::{bans, controller::BACKEND_FILE, ruleset};
use crate::pins::Pins;

/// Whether the controller of `pins` runs (or ran) the nftables backend.
pub fn enforces(pins: &Pins) -> bool {
    std::fs::read_to_string(pins.run_dir.join(BACKEND_FILE)).is_ok_and(|b| b.trim() == "nftables")
}

fn require_table() -> anyhow::Result<()> {
    if !super::table_exists() {
        bail!("nothing is enforced through nftables: there is no table netdev {} (start `smtpguard run --backend nftables` first)", ruleset::TABLE);
    }
    Ok(())
}

pub fn status(pins: &Pins) -> anyhow::Result<()> {
    require_table()?;
    let mut out = format!("backend: nftables (table netdev {})\n", ruleset::TABLE);
    out += &format!("controller: {}\n", pins.controller_pid().map(|p| format!("running, pid {p}")).unwrap_or_else(|| "not running (enforcement continues in nftables)".into()));
    out += "judging:\n";
    for chain in super::base_chains()? {
        out += &format!("  {chain}\n");
    }
    let counters = super::counters()?;
    out += "counters (packets):\n";
    let mut totals: std::collections::BTreeMap<String, u64> = Default::default();
    for (name, (dir, v, why, _)) in ruleset::counter_names() {
        let n = counters.get(&name).copied().unwrap_or(0);
        if n > 0 {
            let key = format!("{} {} {}", policy_common::direction::NAMES[dir as usize], policy_common::verdict::NAMES[v as usize], policy_common::reason::NAMES[why as usize]);
            *totals.entry(key).or_default() += n;
        }
    }
    for (k, n) in totals {
        out += &format!("  {k:<40} {n}\n");
    }
    let bans = bans::list_bans()?;
    out += &format!("bans: {} in force\n", bans.len());
    print!("{out}");
    Ok(())
}

pub fn bans(json: bool) -> anyhow::Result<()> {
    require_table()?;
    let all = bans::list_bans()?;
    if json {
        let rows: Vec<serde_json::Value> = all
            .iter()
            .map(|b| {
                let strikes = match b.origin {
                    bans::Origin::Auto { strikes } => strikes,
                    _ => 1,
                };
                serde_json::json!({ "source": b.net.to_string(), "remaining_s": b.expires_s, "origin": b.origin.name(), "strikes": strikes })
            })
            .collect();
        println!("{}", serde_json::to_string(&rows)?);
        return Ok(());
    }
    println!("{:<45} {:>10} {:<10}", "source", "remaining", "origin");
    for b in &all {
        println!("{:<45} {:>9}s {:<10}", b.net.to_string(), b.expires_s, b.origin.name());
    }
    println!("{} active", all.len());
    Ok(())
}

/// A ban of `net` (a source as /32 or /128, or a network).
pub fn ban(net: ipnet::IpNet, duration: Duration, reason: Option<&str>) -> anyhow::Result<()> {
    require_table()?;
    bans::ban(net, duration.as_secs(), &bans::Origin::Manual { reason: reason.map(str::to_owned) }).context("adding the ban to nftables")?;
    Ok(())
}

pub fn unban(net: ipnet::IpNet, shown: &str) -> anyhow::Result<()> {
    require_table()?;
    if !bans::unban(net).context("lifting the ban in nftables")? {
        bail!("{shown} is not banned");
    }
    println!("{shown}: ban lifted");
    Ok(())
}

/// A source as the ban sets hold it: an IPv4 /32, an IPv6 /64.
pub fn source_net(addr: IpAddr) -> ipnet::IpNet {
    let len = if addr.is_ipv4() { 32 } else { 64 };
    ipnet::IpNet::new(addr, len).expect("a valid length").trunc()
}

/// Stops the controller and deletes the table: nothing else in nftables
/// is touched.
pub fn detach(pins: &Pins) -> anyhow::Result<()> {
    crate::commands::state::stop_controller(pins);
    if !super::table_exists() {
        bail!("nothing is enforced through nftables: there is no table netdev {}", ruleset::TABLE);
    }
    super::delete_table().context("deleting the table")?;
    let _ = std::fs::remove_file(pins.run_dir.join(BACKEND_FILE));
    let _ = std::fs::remove_file(super::controller::strikes_file(&pins.run_dir));
    let _ = std::fs::remove_file(pins.pid_file());
    println!("deleted table netdev {}; smtpguard no longer judges any packet", ruleset::TABLE);
    Ok(())
}

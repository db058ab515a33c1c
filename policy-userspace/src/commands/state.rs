//! The commands about the pinned state, with or without a running
//! controller: `status`, `bans`, `ban`, `unban`, `reload`, `detach`.

use std::{net::IpAddr, time::Duration};

use anyhow::{bail, Context};
use policy_common::{claim_kind, direction, reason, source::SlotInfo, verdict, StatsCell, STATS_CLAIMS};
use serde::Serialize;

use crate::{
    clock::{self, ktime_now_ns},
    dataplane::{
        bans::{self, check_network_ban, BanLock},
        maps::Maps,
        programs::pinned_link_ifindex,
        tenants::slot_cells,
    },
    events::Event,
    fleet::{self, settings::Connection},
    nft,
    pins::Pins,
    policy::time,
};

/// The maps of the datapath pinned under `pins`, or an error that says
/// nothing is attached.
pub(crate) fn open_maps(pins: &Pins) -> anyhow::Result<Maps> {
    if !pins.exists() {
        bail!("nothing is attached: no smtpguard state pinned at {} (start `smtpguard run` first)", pins.dir.display());
    }
    Ok(Maps::open_pinned(&pins.dir)?)
}

/// Stops a running controller (SIGTERM), waiting a bounded time for it to go.
pub fn stop_controller(pins: &Pins) {
    if let Some(pid) = pins.controller_pid() {
        // SAFETY: sending a signal to a pid we read.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        for _ in 0..100 {
            // SAFETY: signal 0 probes the process.
            if unsafe { libc::kill(pid, 0) } != 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

pub fn reload(pins: &Pins) -> anyhow::Result<()> {
    let pid = pins.controller_pid().ok_or_else(|| anyhow::anyhow!("no controller is running (no live pid in {})", pins.pid_file().display()))?;
    // SAFETY: sending a signal to a pid we read.
    if unsafe { libc::kill(pid, libc::SIGHUP) } != 0 {
        bail!("signalling pid {pid}: {}", std::io::Error::last_os_error());
    }
    println!("asked controller {pid} to reload");
    Ok(())
}

/// `smtpguard status`.
pub fn status(pins: &Pins) -> anyhow::Result<()> {
    if nft::commands::enforces(pins) {
        return nft::commands::status(pins);
    }
    let maps = open_maps(pins)?;
    let rt = maps.runtime();
    let policy = maps.policy(rt.active)?;
    let stats = maps.stats()?;
    let mut out = String::new();
    if let Some(since) = maps.bypass().since() {
        let note = super::recovery::BypassNote::read(pins, since);
        out += &format!(
            "ENFORCEMENT BYPASSED since {}{}{}: drops pass as would_drop until `smtpguard bypass off`\n",
            clock::rfc3339_of_unix(since),
            note.as_ref().map(|n| format!(" by {}", n.by)).unwrap_or_default(),
            note.and_then(|n| n.reason).map(|r| format!(" ({r})")).unwrap_or_default()
        );
    }
    out += &format!("policy generation {} (slot {})\n", policy.generation, rt.active);
    out += &format!("controller: {}\n", pins.controller_pid().map(|p| format!("running, pid {p}")).unwrap_or_else(|| "not running (enforcement continues from the pins)".into()));
    out += "attached:\n";
    for (kind, iface) in pins.links() {
        let state = match pinned_link_ifindex(&pins.dir.join(format!("link_{kind}_{iface}"))) {
            Ok(0) => "stale: its interface is gone (the next start of `smtpguard run` replaces it)".to_owned(),
            Ok(ifindex) => format!("attached (ifindex {ifindex})"),
            Err(e) => format!("unreadable ({e})"),
        };
        out += &format!("  {kind:<10} {iface:<16} {state}\n");
    }
    out += "counters (packets, bytes):\n";
    // Summed over port slots.
    let mut rows: std::collections::BTreeMap<(u8, u8, u8), (u64, u64)> = Default::default();
    for cell in StatsCell::all() {
        let c = stats[cell.index as usize];
        if c.packets > 0 {
            let row = rows.entry((cell.direction, cell.verdict, cell.reason)).or_default();
            row.0 += c.packets;
            row.1 += c.bytes;
        }
    }
    for ((d, v, r), (p, b)) in rows {
        out += &format!("  {:<8} {:<10} {:<14} {p:>12} {b:>14}\n", direction::NAMES[d as usize], verdict::NAMES[v as usize], reason::NAMES[r as usize]);
    }
    let table = maps.source_table().snapshot(ktime_now_ns());
    out += &format!("source table: {} of {} ways tracked\n", table.tracked, table.capacity);
    let claims = source_claims(&stats);
    let kinds = |range: std::ops::Range<usize>| -> String { range.map(|k| format!("{} {}", claim_kind::NAMES[k], claims[k])).collect::<Vec<_>>().join(", ") };
    out += &format!(
        "new sources tracked: {} (free way: {}; evicted: {})\n",
        claims.iter().sum::<u64>(),
        claims[claim_kind::FREE as usize],
        kinds(claim_kind::STALE as usize..claim_kind::COUNT)
    );
    out += &format!("active bans: {}\n", table.banned.iter().sum::<u64>());
    print!("{out}");
    Ok(())
}

/// `smtpguard status --rules`: each rule of the policy in force with the
/// packets it decided (since the controller started; rules kept across
/// reloads keep their count), the rules nothing hit, and exemptions.
pub fn rules(pins: &Pins) -> anyhow::Result<()> {
    if nft::commands::enforces(pins) {
        bail!("per-rule hit counts come from the eBPF datapath; this host enforces through nftables");
    }
    let maps = open_maps(pins)?;
    let rt = maps.runtime();
    let policy = maps.policy(rt.active)?;
    let book = crate::rule_hits::RuleBook::read(&pins.run_dir)
        .filter(|b| b.kernel_generation == rt.active && b.generation == policy.generation)
        .ok_or_else(|| anyhow::anyhow!("the rules of policy generation {} are not recorded in {} (the controller writes them as it applies a policy)", policy.generation, pins.run_dir.display()))?;
    let counts = maps.rule_hits(rt.active)?;
    let today = time::today();
    let mut out = format!("rules of policy generation {} (packets each decided):
", policy.generation);
    out += &format!("  {:<32} {:<10} {:<8} {:>9} {:>14}  note
", "rule", "kind", "dir", "networks", "hits");
    let mut dead = 0;
    for (row, hits) in book.totals(&counts) {
        let mut note = String::new();
        if hits == 0 {
            dead += 1;
            note = "never hit".into();
        }
        if let Some(until) = &row.until {
            let left = time::parse_date(until).map(|d| d - today);
            note = match (left, hits) {
                (Some(days), 0) => format!("exemption until {until} ({days} days left), unused"),
                (Some(days), _) => format!("exemption until {until} ({days} days left), still used"),
                _ => format!("exemption until {until}"),
            };
        }
        out += &format!("  {:<32} {:<10} {:<8} {:>9} {:>14}  {note}
", row.id, row.kind, row.direction, row.networks, hits);
    }
    let beyond = book.beyond_cap(&counts);
    if beyond > 0 {
        out += &format!("  {:<32} {:<10} {:<8} {:>9} {:>14}  rule ids past the first {}
", "_beyond_cap", "acl", "any", "-", beyond, policy_common::RULE_SLOTS - 1);
    }
    let stats = maps.stats()?;
    for (d, name) in direction::NAMES.iter().enumerate() {
        if policy.direction[d].rate_enabled == 0 {
            continue;
        }
        let n: u64 = StatsCell::all()
            .filter(|c| c.direction as usize == d && c.verdict != verdict::PASS && matches!(c.reason, reason::RATE_LIMITED | reason::RATE_BAN))
            .map(|c| stats[c.index as usize].packets)
            .sum();
        out += &format!("  {:<32} {:<10} {:<8} {:>9} {:>14}
", format!("{name}.rate_limit"), "rate_limit", name, "-", n);
    }
    out += &format!("{} rules, {dead} never hit
", book.rules.len());
    print!("{out}");
    Ok(())
}

/// The datapath's claims of a way for a new source, by [`claim_kind`],
/// from the summed `STATS` cells.
pub fn source_claims(stats: &[policy_common::Counter]) -> [u64; claim_kind::COUNT] {
    std::array::from_fn(|k| stats.get(STATS_CLAIMS as usize + k).map_or(0, |c| c.packets))
}

/// A ban as `bans` lists it.
#[derive(Clone, Debug, Serialize)]
pub struct Ban {
    pub source: String,
    pub remaining_s: u64,
    pub strikes: u16,
    pub origin: &'static str,
    /// In a fleet: the host that made it, and how (auto, escalated, manual).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
}

pub fn origin_name(origin: u8) -> &'static str {
    use policy_common::source::ban_origin;
    match origin {
        ban_origin::AUTO => "auto",
        ban_origin::ESCALATED => "escalated",
        ban_origin::MANUAL => "manual",
        ban_origin::QUARANTINE => "quarantine",
        ban_origin::FLEET => "fleet",
        _ => "none",
    }
}

/// Bans in force: sources from the table, longest first, then networks.
fn active_bans(maps: &Maps) -> anyhow::Result<Vec<Ban>> {
    let now = ktime_now_ns();
    let mut out: Vec<Ban> = maps
        .source_table()
        .slots()
        .iter()
        .filter(|s| s.ban_until_ns > now)
        .map(|s| {
            let (addr, len) = bans::key_addr(s.key);
            let info = SlotInfo::unpack(s.info);
            Ban {
                source: format!("{addr}/{len}"),
                remaining_s: (s.ban_until_ns - now) / 1_000_000_000,
                strikes: info.strikes,
                origin: origin_name(info.origin),
                from: None,
            }
        })
        .collect();
    out.sort_by_key(|b| std::cmp::Reverse(b.remaining_s));
    out.extend(maps.network_bans()?.into_iter().map(|(net, until)| Ban {
        source: net.to_string(),
        remaining_s: until.saturating_sub(now) / 1_000_000_000,
        strikes: 1,
        origin: "manual",
        from: None,
    }));
    Ok(out)
}

/// In a fleet, says where each ban came from (the fleet's own record of it).
fn annotate(pins: &Pins, bans: &mut [Ban]) {
    let Some((c, host)) = Connection::recorded(&pins.run_dir) else { return };
    match fleet::commands::fleet_bans(&c) {
        Ok(records) => {
            for b in bans.iter_mut() {
                let Ok(net) = b.source.parse::<ipnet::IpNet>() else { continue };
                if let Some(r) = records.get(&net) {
                    b.from = Some(format!("{} ({})", r.origin_host, r.origin));
                    if r.origin_host != host && !crate::fleet::record::is_source(net) {
                        b.origin = "fleet";
                    }
                }
            }
        }
        Err(e) => eprintln!("(the fleet's etcd cannot be read, so where fleet bans came from is not shown: {e:#})"),
    }
}

pub fn bans(pins: &Pins, json: bool) -> anyhow::Result<()> {
    if nft::commands::enforces(pins) {
        return nft::commands::bans(json);
    }
    let mut bans = active_bans(&open_maps(pins)?)?;
    annotate(pins, &mut bans);
    if json {
        println!("{}", serde_json::to_string(&bans)?);
    } else {
        println!("{:<45} {:>10} {:>8} {:<10} from", "source", "remaining", "strikes", "origin");
        for b in &bans {
            println!("{:<45} {:>9}s {:>8} {:<10} {}", b.source, b.remaining_s, b.strikes, b.origin, b.from.as_deref().unwrap_or("-"));
        }
        println!("{} active", bans.len());
    }
    Ok(())
}

/// What a ban names: one source (an address; an IPv4 /32 or IPv6 /64 CIDR
/// is the same thing) or a network of sources.
enum BanTarget {
    Source(IpAddr),
    Network(ipnet::IpNet),
}

fn ban_target(s: &str) -> anyhow::Result<BanTarget> {
    if let Ok(a) = s.parse::<IpAddr>() {
        return Ok(BanTarget::Source(a));
    }
    let net = crate::policy::parse::parse_cidr(s).map_err(|e| anyhow::anyhow!(e))?;
    Ok(match net {
        ipnet::IpNet::V4(n) if n.prefix_len() == 32 => BanTarget::Source(IpAddr::V4(n.addr())),
        ipnet::IpNet::V6(n) if n.prefix_len() == 64 => BanTarget::Source(IpAddr::V6(n.network())),
        net => BanTarget::Network(net),
    })
}

/// `smtpguard ban`. `duration` comes from [`time::parse_ban_duration`];
/// a network wider than the limits of [`check_network_ban`] takes
/// `force`. Every refusal leaves the pinned state as it was.
pub fn ban(pins: &Pins, source: &str, duration: Duration, force: bool, reason: Option<&str>) -> anyhow::Result<()> {
    let target = ban_target(source)?;
    if duration.is_zero() || duration.as_secs() > time::MAX_MANUAL_BAN_S {
        bail!("a manual ban lasts from 1s to 365d");
    }
    if let BanTarget::Network(net) = target {
        check_network_ban(net, force)?;
    }
    if nft::commands::enforces(pins) {
        let (shown, net) = match target {
            BanTarget::Source(addr) => (addr.to_string(), nft::commands::source_net(addr)),
            BanTarget::Network(net) => (net.to_string(), net),
        };
        nft::commands::ban(net, duration, reason)?;
        let event = Event::ManualBan { time: clock::now_rfc3339(), source: shown, duration_s: duration.as_secs(), reason: reason.map(str::to_owned) };
        println!("{}", event.to_line());
        return Ok(());
    }
    let mut maps = open_maps(pins)?;
    let lock = BanLock::take(&pins.ban_lock_dir())?;
    let (source, net) = match target {
        BanTarget::Source(addr) => {
            maps.ban_source(&lock, addr, duration)?;
            (addr.to_string(), crate::fleet::record::source_net(addr))
        }
        BanTarget::Network(net) => {
            maps.ban_network(&lock, net, duration)?;
            (net.to_string(), net)
        }
    };
    drop(lock);
    // In a fleet, every host drops it too; the controller would send it
    // within a second anyway, without the reason.
    if let Some((c, host)) = Connection::recorded(&pins.run_dir) {
        let until_ms = (time_now_ms() + duration.as_millis() as u64).min(u64::MAX / 2);
        match fleet::commands::publish_manual(&c, &host, net, until_ms, reason) {
            Ok(()) => eprintln!("{net}: banned fleet-wide"),
            Err(e) => eprintln!("{net}: banned here; the fleet gets it once its etcd answers ({e:#})"),
        }
    }
    let event = Event::ManualBan { time: clock::now_rfc3339(), source, duration_s: duration.as_secs(), reason: reason.map(str::to_owned) };
    println!("{}", event.to_line());
    Ok(())
}

pub fn unban(pins: &Pins, source: &str) -> anyhow::Result<()> {
    let target = ban_target(source)?;
    if nft::commands::enforces(pins) {
        let net = match target {
            BanTarget::Source(addr) => nft::commands::source_net(addr),
            BanTarget::Network(net) => net,
        };
        return nft::commands::unban(net, source);
    }
    let mut maps = open_maps(pins)?;
    let lock = BanLock::take(&pins.ban_lock_dir())?;
    let (net, local_until_ms) = match target {
        BanTarget::Source(addr) => {
            let key = bans::source_key(addr);
            let until = maps.source_table().slots().into_iter().find(|s| s.key == key).map(|s| s.ban_until_ns).filter(|u| *u > ktime_now_ns());
            (crate::fleet::record::source_net(addr), until)
        }
        BanTarget::Network(net) => (net, maps.network_bans()?.into_iter().find(|(n, _)| *n == net).map(|(_, u)| u)),
    };
    let lifted = match target {
        BanTarget::Source(addr) => maps.unban_source(&lock, addr)?,
        BanTarget::Network(net) => maps.unban_network(&lock, net)?,
    };
    drop(lock);
    let Some((c, host)) = Connection::recorded(&pins.run_dir) else {
        if !lifted {
            bail!("{source} is not banned");
        }
        println!("{source}: ban lifted");
        return Ok(());
    };
    // In a fleet: lifted on every host, and on those away now when they return.
    let local_until_ms = local_until_ms.map(|u| time_now_ms() + u.saturating_sub(ktime_now_ns()) / 1_000_000);
    match fleet::commands::unban(&c, &host, net, local_until_ms) {
        Ok(held) if lifted || held => {
            println!("{source}: ban lifted here and fleet-wide");
            Ok(())
        }
        Ok(_) => bail!("{source} is not banned, here or in the fleet (a tombstone was left anyway)"),
        Err(e) => bail!(
            "{source}: {}; the fleet's etcd did not take the unban ({e:#}), so other hosts keep it: run this again once etcd answers",
            if lifted { "ban lifted here" } else { "not banned here" }
        ),
    }
}

fn time_now_ms() -> u64 {
    (::time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as u64
}

pub fn detach(pins: &Pins) -> anyhow::Result<()> {
    if nft::commands::enforces(pins) {
        return nft::commands::detach(pins);
    }
    // Its links close with it.
    stop_controller(pins);
    if !pins.dir.exists() {
        bail!("nothing is attached: {} does not exist", pins.dir.display());
    }
    let removed = pins.remove_all().with_context(|| format!("removing {}", pins.dir.display()))?;
    println!("removed {removed} pins from {}; smtpguard no longer judges any packet", pins.dir.display());
    Ok(())
}

/// A tenant interface as `smtpguard tenants` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct TenantRow {
    pub interface: String,
    pub ifindex: u32,
    /// Packets to guarded ports the policy passed.
    pub passed: u64,
    /// Packets dropped, or that would be in monitor mode.
    pub blocked: u64,
    /// Sources behind it in a suspect episode now.
    pub suspects: Vec<SuspectRow>,
}

#[derive(Clone, Debug, Serialize)]
pub struct SuspectRow {
    pub source: IpAddr,
    /// Blocked new connections in the current window.
    pub blocked: u32,
    /// Seconds since the last one.
    pub last_s_ago: u32,
}

/// The name of a tenant interface: from its link pin (which names it,
/// and whose link knows its ifindex), else as this network namespace
/// names it.
fn tenant_name(pins: &Pins, ifindex: u32) -> String {
    pins.links()
        .into_iter()
        .filter(|(kind, _)| kind == "tcingress")
        .find(|(kind, iface)| pinned_link_ifindex(&pins.dir.join(format!("link_{kind}_{iface}"))).is_ok_and(|i| i == ifindex))
        .map(|(_, iface)| iface)
        .unwrap_or_else(|| ifname(ifindex))
}

/// The name of an interface in this network namespace.
fn ifname(ifindex: u32) -> String {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer holds IF_NAMESIZE bytes, as the call requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return format!("ifindex {ifindex}");
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into `buf`.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned()
}

/// `smtpguard tenants`: what each tenant interface sent to guarded ports,
/// and its suspects (sources over the policy's `tenant_suspect`).
pub fn tenants(pins: &Pins, json: bool) -> anyhow::Result<()> {
    if nft::commands::enforces(pins) {
        bail!("per-tenant counters and suspects come from the eBPF backend; this host enforces through nftables (docs/nftables.md)");
    }
    let maps = open_maps(pins)?;
    let policy = maps.policy(maps.runtime().active)?;
    let window_s = policy.direction[direction::EGRESS as usize].suspect_window_s;
    let stats = maps.tenant_stats()?;
    let sources = maps.tenant_sources()?;
    let now_s = (ktime_now_ns() / 1_000_000_000) as u32;
    let mut rows: Vec<TenantRow> = maps
        .tenant_slots()?
        .into_iter()
        .map(|(ifindex, slot)| {
            let (mut passed, mut blocked) = (0, 0);
            for (v, _, n) in slot_cells(&stats, slot) {
                if v == verdict::PASS {
                    passed += n;
                } else {
                    blocked += n;
                }
            }
            let suspects = sources
                .iter()
                .filter(|s| s.ifindex == ifindex && window_s != 0 && s.suspect_now(window_s))
                .map(|s| SuspectRow { source: s.addr, blocked: s.state.blocked, last_s_ago: now_s.wrapping_sub(s.state.last_s) })
                .collect();
            TenantRow { interface: tenant_name(pins, ifindex), ifindex, passed, blocked, suspects }
        })
        .collect();
    rows.sort_by(|a, b| b.blocked.cmp(&a.blocked).then_with(|| a.interface.cmp(&b.interface)));
    if json {
        println!("{}", serde_json::to_string(&rows)?);
        return Ok(());
    }
    println!("{:<16} {:>8} {:>12} {:>12}  suspects", "interface", "ifindex", "passed", "blocked");
    for r in &rows {
        let suspects: Vec<String> = r.suspects.iter().map(|s| format!("{} ({} blocked, {} s ago)", s.source, s.blocked, s.last_s_ago)).collect();
        println!("{:<16} {:>8} {:>12} {:>12}  {}", r.interface, r.ifindex, r.passed, r.blocked, if suspects.is_empty() { "-".to_owned() } else { suspects.join(", ") });
    }
    let n: usize = rows.iter().map(|r| r.suspects.len()).sum();
    println!("{} tenant interface(s), {n} suspect(s){}", rows.len(), if window_s == 0 { " (the policy has no tenant_suspect)" } else { "" });
    Ok(())
}

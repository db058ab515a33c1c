//! What the `smtpguard` subcommands do; `main.rs` only parses arguments.

use std::{io::Write, net::IpAddr, path::Path, process::ExitCode};

use policy_common::{direction, reason, verdict};

use crate::{
    model::{self, AclIndex, Packet, SourceState},
    policy::{self, analyze, time, Compiled, Diagnostics, LoadOptions, Policy},
};

/// Loads, validates, analyzes and compiles a policy: everything `check` does.
pub fn load_and_compile(path: &Path, options: &LoadOptions) -> (Option<(Policy, Compiled)>, Diagnostics) {
    load(path, options, true)
}

/// What a reload needs: the policy validated and compiled, errors only.
/// The controller logs no warnings on reload, so the analysis is skipped.
pub fn compile_for_reload(path: &Path, options: &LoadOptions) -> (Option<(Policy, Compiled)>, Diagnostics) {
    load(path, options, false)
}

fn load(path: &Path, options: &LoadOptions, with_warnings: bool) -> (Option<(Policy, Compiled)>, Diagnostics) {
    let (policy, mut diags) = policy::load_file(path, options);
    let Some(policy) = policy else { return (None, diags) };
    let today = options.today.unwrap_or_else(time::today);
    let compiled = if with_warnings {
        // The analysis only adds warnings: it runs beside the compiler.
        std::thread::scope(|s| {
            let compiling = s.spawn(|| policy::compile(&policy, today));
            analyze::warnings(&policy, &mut diags);
            compiling.join().expect("the compiler does not panic")
        })
    } else {
        policy::compile(&policy, today)
    };
    match compiled {
        Ok(c) => (Some((policy, c)), diags),
        Err(e) => {
            diags.error(path, Default::default(), "", e.to_string());
            (None, diags)
        }
    }
}

/// The kept diagnostics in file order, then a count of the rest per file.
fn print_diagnostics(diags: &Diagnostics) {
    let mut err = std::io::stderr().lock();
    let mut items: Vec<_> = diags.items.iter().collect();
    items.sort_by(|a, b| (&a.file, a.pos.line, a.pos.col).cmp(&(&b.file, b.pos.line, b.pos.col)));
    for d in items {
        let _ = writeln!(err, "{d}");
    }
    for s in diags.summaries() {
        let _ = writeln!(err, "{s}");
    }
}

pub fn check(path: &Path, options: &LoadOptions) -> ExitCode {
    let (compiled, diags) = load_and_compile(path, options);
    print_diagnostics(&diags);
    let Some((policy, c)) = compiled else {
        eprintln!("{}: {} error(s); the policy is not valid", path.display(), diags.error_count());
        return ExitCode::FAILURE;
    };
    let rules = policy.ingress.network_count() + policy.egress.network_count();
    println!(
        "{}: valid, {} warning(s): {} ports, {rules} rules, {} ACL entries ({} IPv4, {} IPv6){}",
        path.display(),
        diags.warning_count(),
        policy.ports.len(),
        c.entries(),
        c.v4.len(),
        c.v6.len(),
        if c.geo.networks_read > 0 {
            format!(", geo: {} networks read, {} kept after merging", c.geo.networks_read, c.geo.networks_kept)
        } else {
            String::new()
        }
    );
    ExitCode::SUCCESS
}

pub fn schema() -> ExitCode {
    println!("{}", serde_json::to_string_pretty(&policy::schema::schema()).expect("schema serializes"));
    ExitCode::SUCCESS
}

pub struct ExplainArgs {
    pub direction: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub dport: u16,
    pub syn: bool,
    pub payload: Option<String>,
    pub json: bool,
}

pub fn explain(path: &Path, options: &LoadOptions, args: ExplainArgs) -> ExitCode {
    let (compiled, diags) = load_and_compile(path, options);
    if compiled.is_none() {
        print_diagnostics(&diags);
        return ExitCode::FAILURE;
    }
    let (_, c) = compiled.expect("checked above");
    if args.src.is_ipv4() != args.dst.is_ipv4() {
        eprintln!("--src and --dst must be the same address family");
        return ExitCode::FAILURE;
    }
    let payload = args.payload.clone().map(|p| p.replace("\\r", "\r").replace("\\n", "\n")).unwrap_or_default();
    let packet = Packet::new(args.direction, args.src, args.dst, args.dport, args.syn, payload.into_bytes());
    // A fresh source and the stream's first segment.
    let d = model::decide(&c, &AclIndex::new(&c), &packet, SourceState::default(), None);
    let rule = c.rule(d.rule);
    let (verdict_name, reason_name) = match d.counted {
        Some((v, r)) => (verdict::NAMES[v as usize], reason::NAMES[r as usize]),
        None => ("pass", "not_guarded"),
    };
    if args.json {
        let out = serde_json::json!({
            "direction": direction::NAMES[args.direction as usize],
            "verdict": verdict_name,
            "reason": reason_name,
            "rule": rule.map(|r| &*r.id),
            "rule_origin": rule.map(|r| format!("{}:{}", r.origin.file.display(), r.origin.pos.line)),
            "country": c.country(d.country),
            "reset": d.reset,
            "port": args.dport,
            "assumes": "source not banned, tokens available, under the ban threshold",
        });
        println!("{out}");
    } else {
        println!("verdict: {verdict_name}");
        println!("reason:  {reason_name}");
        if let Some(r) = rule {
            println!("rule:    {} ({} {}, {}:{})", r.id, r.kind.name(), r.net, r.origin.file.display(), r.origin.pos.line);
        }
        if let Some(code) = c.country(d.country) {
            println!("country: {code}");
        }
        if d.reset {
            println!("reset:   the sender gets a TCP reset (a segment of an open connection; `established: reset`)");
        }
        if d.counted.is_none() {
            println!("(port {} is not guarded in this direction: the datapath lets it through uncounted)", args.dport);
        }
        println!("(assuming the source is not banned, has tokens and is under the ban threshold)");
    }
    ExitCode::SUCCESS
}

/// Prints an error chain and turns it into the exit code.
pub fn report(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("smtpguard: {e:#}");
            ExitCode::FAILURE
        }
    }
}

pub fn reload(pins: &crate::pins::Pins) -> anyhow::Result<()> {
    let pid = pins.controller_pid().ok_or_else(|| anyhow::anyhow!("no controller is running (no live pid in {})", pins.pid_file().display()))?;
    // SAFETY: sending a signal to a pid we read.
    if unsafe { libc::kill(pid, libc::SIGHUP) } != 0 {
        anyhow::bail!("signalling pid {pid}: {}", std::io::Error::last_os_error());
    }
    println!("asked controller {pid} to reload");
    Ok(())
}

pub fn status(pins: &crate::pins::Pins) -> anyhow::Result<()> {
    print!("{}", crate::ops::status(pins)?);
    Ok(())
}

pub fn bans(pins: &crate::pins::Pins, json: bool) -> anyhow::Result<()> {
    let maps = crate::ops::PinnedMaps::open(pins)?;
    let mut bans = crate::ops::active_bans(&maps.sources()?);
    bans.extend(crate::ops::network_ban_rows(&maps.network_bans()?));
    if json {
        println!("{}", serde_json::to_string(&bans)?);
    } else {
        println!("{:<45} {:>10} {:>8} {:<10}", "source", "remaining", "strikes", "origin");
        for b in &bans {
            println!("{:<45} {:>9}s {:>8} {:<10}", b.source, b.remaining_s, b.strikes, b.origin);
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
/// a network wider than the limits of [`crate::ops::check_network_ban`]
/// takes `force`. Every refusal leaves the pinned state as it was.
pub fn ban(pins: &crate::pins::Pins, source: &str, duration: std::time::Duration, force: bool, reason: Option<&str>) -> anyhow::Result<()> {
    let target = ban_target(source)?;
    if duration.is_zero() || duration.as_secs() > time::MAX_MANUAL_BAN_S {
        anyhow::bail!("a manual ban lasts from 1s to 365d");
    }
    if let BanTarget::Network(net) = target {
        crate::ops::check_network_ban(net, force)?;
    }
    let mut maps = crate::ops::PinnedMaps::open(pins)?;
    let src = match target {
        BanTarget::Source(addr) => {
            maps.ban(addr, duration)?;
            addr.to_string()
        }
        BanTarget::Network(net) => {
            maps.ban_network(net, duration)?;
            net.to_string()
        }
    };
    let line = serde_json::json!({"time": crate::events::rfc3339(crate::events::now_unix_ns()), "event": "ban_added", "origin": "manual",
        "src": src, "duration_s": duration.as_secs(), "reason": reason});
    println!("{line}");
    Ok(())
}

pub fn unban(pins: &crate::pins::Pins, source: &str) -> anyhow::Result<()> {
    let mut maps = crate::ops::PinnedMaps::open(pins)?;
    let lifted = match ban_target(source)? {
        BanTarget::Source(addr) => maps.unban(addr)?,
        BanTarget::Network(net) => maps.unban_network(net)?,
    };
    if lifted {
        println!("{source}: ban lifted");
        Ok(())
    } else {
        anyhow::bail!("{source} is not banned")
    }
}

pub fn detach(pins: &crate::pins::Pins) -> anyhow::Result<()> {
    if let Some(pid) = pins.controller_pid() {
        // SAFETY: sending a signal to a pid we read.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        // Its links close with it; wait for it to go (bounded).
        for _ in 0..100 {
            // SAFETY: signal 0 probes the process.
            if unsafe { libc::kill(pid, 0) } != 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
    if !pins.dir.exists() {
        anyhow::bail!("nothing is attached: {} does not exist", pins.dir.display());
    }
    let removed = pins.remove_all()?;
    println!("removed {removed} pins from {}; smtpguard no longer judges any packet", pins.dir.display());
    Ok(())
}

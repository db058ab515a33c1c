//! `cargo xtask demo`: smtpguard on a hypervisor lab, with the embedded
//! default policy (policies/idc-default.yaml plus the geo-fence example),
//! a scripted scenario in enforce and then monitor mode, a table of what
//! happened and why, the metrics, and a clean teardown. Exits 1 when any
//! step did not behave as described.

use std::{path::PathBuf, time::Instant};

use anyhow::{bail, Context, Result};
use smtpguard_tests::{
    hvlab::{lab_policy, repo_root, teardown_on_signal, Family, Lab, Role, METRICS_PORT},
    scenario::{would_drops, Scenario},
};

fn main() {
    if let Err(e) = demo() {
        eprintln!("demo failed: {e:#}");
        std::process::exit(1);
    }
}

fn smtpguard_bin() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe.parent().context("binary directory")?.join("smtpguard");
    if !bin.exists() {
        bail!("{} is missing: run `cargo xtask demo`, which builds it", bin.display());
    }
    Ok(bin)
}

fn demo() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo creates network namespaces and loads BPF programs: run it as root");
    }
    let started = Instant::now();
    teardown_on_signal();
    let repo = repo_root();
    // `smtpguard-demo --backend nftables` (cargo xtask demo --backend nftables).
    let args: Vec<String> = std::env::args().collect();
    let backend = match args.iter().position(|a| a == "--backend").and_then(|i| args.get(i + 1)).map(String::as_str) {
        None | Some("ebpf") => "ebpf",
        Some("nftables") => "nftables",
        Some(other) => bail!("--backend {other}: ebpf or nftables"),
    };
    eprintln!("building the lab: two tenants, a hypervisor, an uplink to the internet (network namespaces)");
    let mut lab = Lab::new(&smtpguard_bin()?, "demo")?;
    lab.backend = backend;
    let policy = lab.dir.join("policy.yaml");
    std::fs::write(&policy, lab_policy(&repo, &lab.geo_db, "enforce", &[], None)?)?;
    eprintln!("starting smtpguard run --backend {backend}: policies/idc-default.yaml + ingress.geo of policies/geo-fence.yaml (real database)");
    lab.start_controller(&policy, "native")?;

    let mut enforce = Scenario::new(&lab, false, true, 2, true);
    for family in Family::ALL {
        enforce.run_family(family)?;
    }
    enforce.run_flood(Family::V4)?;
    let bans = lab.smtpguard(&["bans"])?;

    eprintln!("switching the policy to monitor mode (smtpguard reload) and lifting the spammer's ban");
    let events = lab.event_lines();
    // nftables' ban threshold is a token bucket (docs/nftables.md, difference
    // 2): with nothing dropped the monitor flood stays within 100 a minute's
    // bucket for its 50 s, so the demo shows the ban at 50 a minute there.
    let monitor_ban_above = (backend == "nftables").then_some(50);
    if monitor_ban_above.is_some() {
        eprintln!("(nftables: the monitor-mode ban threshold is 50 a minute; see docs/nftables.md, difference 2)");
    }
    std::fs::write(&policy, lab_policy(&repo, &lab.geo_db, "monitor", &[], monitor_ban_above)?)?;
    lab.smtpguard(&["reload"])?;
    lab.wait_for_event(&["\"policy_reload\"", "\"result\":\"ok\""], events, std::time::Duration::from_secs(10))?;
    lab.smtpguard(&["unban", Family::V4.addr(Role::Spammer)])?;
    let before_monitor = lab.counters()?;
    let mut monitor = Scenario::new(&lab, true, true, 1, true);
    monitor.run_family(Family::V4)?;
    monitor.run_flood(Family::V4)?;
    let would = would_drops(&lab.counters()?) - would_drops(&before_monitor);

    println!("\n== enforce mode (policies/idc-default.yaml + geo-fence), backend {backend} ==");
    print!("{}", enforce.table());
    println!("\n`smtpguard bans` after the flood:\n{bans}");
    println!("== monitor mode (same policy, mode: monitor) ==");
    print!("{}", monitor.table());
    println!("monitor mode passed everything; it counted {would} packets it would have dropped\n");
    println!("== smtpguard_ metrics (non-zero packet counters, bans, reloads) ==");
    let metrics = lab.http_get(METRICS_PORT, "/metrics")?;
    for line in metrics.lines() {
        let relevant = ["smtpguard_packets_total", "smtpguard_active_bans", "smtpguard_reloads_total", "smtpguard_geo_drops_total", "smtpguard_bans_total"]
            .iter()
            .any(|m| line.starts_with(m));
        if relevant && !line.ends_with(" 0") {
            println!("{line}");
        }
    }
    let failures: Vec<String> = enforce.failures().into_iter().chain(monitor.failures()).collect();
    drop(lab);
    println!("\nlab removed; demo took {:.0} s", started.elapsed().as_secs_f64());
    if !failures.is_empty() {
        bail!("{} step(s) did not behave as described:\n  {}", failures.len(), failures.join("\n  "));
    }
    println!("every step behaved as described");
    Ok(())
}

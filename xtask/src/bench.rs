//! Benchmarks run the release `smtpguard-bench` binary (it needs root and
//! the embedded datapath, which xtask itself must not depend on).

use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::Subcommand;

#[derive(Subcommand, Clone)]
pub enum Which {
    /// ns per packet via BPF_PROG_TEST_RUN, as ratios to an empty XDP program.
    Datapath {
        #[arg(long)]
        json: bool,
    },
    /// Time to validate and compile: the IDC default, 100,000 CIDRs, the whole real geo database.
    Compile {
        #[arg(long)]
        json: bool,
    },
    /// Drop rate of a SYN flood on veth: smtpguard beside an XDP floor, xdp-filter, nftables, iptables.
    Throughput {
        #[arg(long)]
        json: bool,
    },
    /// Cost, load and reload time and memory for 10 to 1,000,000 CIDRs, beside nftables and iptables.
    Scale {
        #[arg(long)]
        json: bool,
    },
    /// A one-rule change and a whole swap of a 100,000-entry policy under traffic.
    Reload {
        #[arg(long)]
        json: bool,
    },
    /// The metrics endpoint with a full source table: 1 and 20 scrapers, /healthz beside idle clients and a hostile reload.
    Metrics {
        #[arg(long)]
        json: bool,
    },
    /// Tenant interfaces: attach latency of 200 taps created and deleted under the controller; its cost with 1 and 500.
    Interfaces {
        #[arg(long)]
        json: bool,
    },
    /// The fleet through a real etcd: ban propagation across 3 hosts, a host's publish rate, 100,000 fleet bans installed into one host.
    Fleet {
        #[arg(long)]
        json: bool,
    },
    /// `smtpguard report` on ~100 MB and ~1 GB of synthetic events (2 million sources): throughput and peak RSS.
    IncidentReport {
        #[arg(long)]
        json: bool,
    },
    /// Run every benchmark and rewrite docs/benchmarks.md and its charts from their JSON.
    Report,
}

const ALL: [&str; 8] = ["datapath", "compile", "throughput", "scale", "reload", "metrics", "interfaces", "fleet"];

pub fn run(which: Which) -> Result<()> {
    let (name, json) = match which {
        Which::Report => return report(),
        Which::Datapath { json } => ("datapath", json),
        Which::Compile { json } => ("compile", json),
        Which::Throughput { json } => ("throughput", json),
        Which::Scale { json } => ("scale", json),
        Which::Reload { json } => ("reload", json),
        Which::Metrics { json } => ("metrics", json),
        Which::Interfaces { json } => ("interfaces", json),
        Which::Fleet { json } => ("fleet", json),
        Which::IncidentReport { json } => ("incident-report", json),
    };
    build()?;
    let mut cmd = Command::new(bench_bin()?);
    cmd.arg(name).env("SMTPGUARD_GEO_DATABASE", crate::setup::geo_database()?);
    if json {
        cmd.arg("--json");
    }
    let st = cmd.status().context("running smtpguard-bench")?;
    if !st.success() {
        bail!("benchmark {name} failed ({st})");
    }
    Ok(())
}

fn build() -> Result<()> {
    let build = Command::new("cargo")
        .args(["build", "--release", "--quiet", "--bin", "smtpguard", "--bin", "smtpguard-bench"])
        .status()
        .context("building smtpguard-bench")?;
    if !build.success() {
        bail!("building smtpguard-bench failed");
    }
    Ok(())
}

fn bench_bin() -> Result<std::path::PathBuf> {
    Ok(crate::setup::target_dir().join("release/smtpguard-bench"))
}

/// Every benchmark with `--json` into docs/bench/NAME.json (a missed
/// target still yields its JSON), then the page and charts from them.
fn report() -> Result<()> {
    build()?;
    let dir = crate::setup::workspace_root().join("docs/bench");
    std::fs::create_dir_all(&dir)?;
    for name in ALL {
        eprintln!("bench report: {name}");
        let out = Command::new(bench_bin()?).args([name, "--json"]).env("SMTPGUARD_GEO_DATABASE", crate::setup::geo_database()?).stderr(std::process::Stdio::inherit()).output().with_context(|| format!("running {name}"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let json = text.lines().rev().find(|l| l.starts_with('{')).with_context(|| format!("{name} printed no JSON ({})", out.status))?;
        std::fs::write(dir.join(format!("{name}.json")), format!("{json}\n"))?;
    }
    let st = Command::new(bench_bin()?).arg("render").arg(&dir).arg(crate::setup::workspace_root().join("docs")).status()?;
    if !st.success() {
        bail!("rendering docs/benchmarks.md failed");
    }
    eprintln!("wrote docs/benchmarks.md and docs/bench/");
    Ok(())
}

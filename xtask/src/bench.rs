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
}

pub fn run(which: Which) -> Result<()> {
    let (name, json) = match which {
        Which::Datapath { json } => ("datapath", json),
        Which::Compile { json } => ("compile", json),
        Which::Throughput { json } => ("throughput", json),
    };
    let build = Command::new("cargo")
        .args(["build", "--release", "--quiet", "-p", "smtpguard-tests", "--bin", "smtpguard-bench"])
        .status()
        .context("building smtpguard-bench")?;
    if !build.success() {
        bail!("building smtpguard-bench failed");
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("workspace root")?;
    let target = std::env::var_os("CARGO_TARGET_DIR").map(Into::into).unwrap_or_else(|| root.join("target"));
    let mut cmd = Command::new(target.join("release/smtpguard-bench"));
    cmd.arg(name);
    if json {
        cmd.arg("--json");
    }
    let st = cmd.status().context("running smtpguard-bench")?;
    if !st.success() {
        bail!("benchmark {name} failed ({st})");
    }
    Ok(())
}

//! `cargo xtask`: the demo, tool setup, the test suite, benchmarks, the Debian package.
mod bench;
mod package;
mod setup;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "smtpguard's development tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Set up, build, and run smtpguard on a hypervisor lab with the default policy (as root).
    Demo {
        /// What enforces: ebpf (XDP and TC programs) or nftables (docs/nftables.md).
        #[arg(long, default_value = "ebpf", value_parser = ["ebpf", "nftables"])]
        backend: String,
    },
    /// Install what building and testing need (idempotent, fast when done).
    Setup,
    /// Run setup and clippy, then every test: unit, policy, kernel verdict, attach (as root).
    Test {
        /// Extra arguments for `cargo test` (for example a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Clippy over the userspace crates and, for its own target, the eBPF crate.
    Clippy,
    /// Build the Debian package (target/debian/smtpguard_*.deb): binary, unit, config, man pages, completions, docs.
    Package,
    /// Run a benchmark; prints ratios measured side by side in one run.
    Bench {
        #[command(subcommand)]
        which: bench::Which,
    },
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Demo { backend } => {
            setup::run()?;
            setup::demo(&backend)
        }
        Task::Setup => setup::run(),
        Task::Test { args } => {
            setup::run()?;
            setup::clippy()?;
            setup::test(&args)
        }
        Task::Clippy => {
            setup::run()?;
            setup::clippy()
        }
        Task::Package => {
            let deb = package::build()?;
            println!("{}", deb.display());
            Ok(())
        }
        Task::Bench { which } => {
            setup::run()?;
            bench::run(which)
        }
    }
}

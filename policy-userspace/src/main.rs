//! `smtpguard`: argument parsing only; the work is in the library.

use std::{net::IpAddr, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand, ValueEnum};
use smtpguard::{
    commands::{self, ExplainArgs},
    policy::LoadOptions,
};

/// Port-25 firewall policy engine for hypervisor hosts.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Direction {
    Ingress,
    Egress,
}

#[derive(clap::Args)]
struct PolicyArgs {
    /// The policy file (YAML).
    file: PathBuf,
    /// Use this MaxMind database for every geo-fence instead of the paths in the file.
    #[arg(long)]
    geo_database: Option<PathBuf>,
}

impl PolicyArgs {
    fn options(&self) -> LoadOptions {
        LoadOptions { geo_database: self.geo_database.clone(), today: None }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Validate a policy: exit 0 when valid (warnings printed), 1 with every error listed.
    ///
    /// Example: smtpguard check /etc/smtpguard/policy.yaml
    Check(PolicyArgs),
    /// Print the JSON Schema of the policy language, for editors.
    Schema,
    /// Say what the datapath would do with a packet, and which rule decided.
    ///
    /// Example: smtpguard explain policy.yaml --direction egress --src 192.0.2.10 --dst 203.0.113.5 --dport 25 --syn
    Explain {
        #[command(flatten)]
        policy: PolicyArgs,
        #[arg(long, value_enum)]
        direction: Direction,
        #[arg(long)]
        src: IpAddr,
        #[arg(long)]
        dst: IpAddr,
        #[arg(long)]
        dport: u16,
        /// The packet is a SYN without ACK (a new connection).
        #[arg(long)]
        syn: bool,
        /// Payload text (\r and \n are understood), for the SMTP command filter.
        #[arg(long)]
        payload: Option<String>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Check(p) => commands::check(&p.file, &p.options()),
        Command::Schema => commands::schema(),
        Command::Explain { policy, direction, src, dst, dport, syn, payload, json } => {
            let direction = match direction {
                Direction::Ingress => policy_common::direction::INGRESS,
                Direction::Egress => policy_common::direction::EGRESS,
            };
            commands::explain(&policy.file, &policy.options(), ExplainArgs { direction, src, dst, dport, syn, payload, json })
        }
    }
}

//! `smtpguard`: argument parsing only; the work is in the library.

use std::{
    net::IpAddr,
    path::PathBuf,
    process::ExitCode,
};

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use smtpguard::{
    commands::{self, ExplainArgs},
    nft::Backend,
    fleet::settings::FleetSettings,
    settings::Settings,
    pins::{Pins, DEFAULT_PIN_DIR, DEFAULT_RUN_DIR},
    policy::{
        input::{self, Limits},
        time, ReadOptions,
    },
};

/// Port-25 firewall policy engine for hypervisor hosts.
///
/// An eBPF datapath (XDP on the uplink, TC on the uplink's egress and on tenant interfaces) drops or
/// rate-limits SMTP as a YAML policy says: CIDR allow and deny lists, per-source new-connection rates with
/// automatic bans, manual bans, geo-fences, and VRFY/EXPN on plaintext port 25. `smtpguard run` enforces
/// a policy; the other commands check a policy or work on the pinned state. Enforcement lives in pins
/// under /sys/fs/bpf/smtpguard and outlasts the controller until `smtpguard detach`.
#[derive(Parser)]
#[command(name = "smtpguard", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OnOff {
    On,
    Off,
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
    #[command(flatten)]
    limits: LimitArgs,
}

impl PolicyArgs {
    fn options(&self) -> ReadOptions {
        ReadOptions { geo_database: self.geo_database.clone(), today: None, limits: self.limits.limits(), files_dir: None }
    }
}

/// How much is read from the files a policy names, in place of the
/// defaults. A policy's own `limits` section overrides these.
#[derive(clap::Args)]
struct LimitArgs {
    /// Largest list file read, such as 256MiB (default 8MiB; the policy's `limits.list_file_bytes` overrides it).
    #[arg(long, value_name = "SIZE", value_parser = input::parse_size)]
    max_list_bytes: Option<u64>,
    /// Largest geo database read (default 128MiB; `limits.geo_database_bytes` overrides it).
    #[arg(long, value_name = "SIZE", value_parser = input::parse_size)]
    max_geo_bytes: Option<u64>,
    /// Most networks read from a geo database (default 4000000; `limits.geo_networks` overrides it).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    max_geo_networks: Option<u64>,
}

impl LimitArgs {
    fn limits(&self) -> Limits {
        let d = Limits::default();
        Limits {
            list_file_bytes: self.max_list_bytes.unwrap_or(d.list_file_bytes),
            geo_database_bytes: self.max_geo_bytes.unwrap_or(d.geo_database_bytes),
            geo_networks: self.max_geo_networks.unwrap_or(d.geo_networks),
        }
    }
}

#[derive(clap::Args)]
struct PinArgs {
    /// bpffs directory holding the pinned programs, links and maps.
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// Directory for the controller's pid file.
    #[arg(long, default_value = DEFAULT_RUN_DIR)]
    run_dir: PathBuf,
}

impl PinArgs {
    fn pins(&self) -> Pins {
        Pins::new(&self.pin_dir, &self.run_dir)
    }
}

#[derive(Subcommand)]
#[expect(clippy::large_enum_variant, reason = "parsed once per process")]
enum Command {
    /// Enforce a policy: attach to the interfaces, serve metrics, stream events.
    ///
    /// Example: smtpguard run --policy /etc/smtpguard/policy.yaml --uplink eth0 --tenant 'tap*'
    ///
    /// Example: smtpguard run --config /etc/smtpguard/smtpguard.toml
    Run {
        /// Settings from this TOML file (the same names as the flags, such as
        /// `policy = "/etc/smtpguard/policy.yaml"` and `tenant = ["tap*"]`); flags override it.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        #[command(flatten)]
        settings: Settings,
    },
    /// Tenant interfaces: what each sent to guarded ports, and its suspects (sources that keep hitting the deny).
    Tenants {
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        pins: PinArgs,
    },
    /// Ask the running controller to reload its policy (SIGHUP).
    Reload(PinArgs),
    /// Counters, policy generation and attached interfaces, from the pinned state.
    Status {
        /// The rules of the policy in force with the packets each decided: dead rules, and exemptions still used.
        #[arg(long)]
        rules: bool,
        #[command(flatten)]
        pins: PinArgs,
    },
    /// List active bans.
    Bans {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        pins: PinArgs,
    },
    /// Ban a source address (an IPv6 source is its /64) or a network for a while.
    ///
    /// Example: smtpguard ban 198.51.100.7 --for 1h --reason "spam run"
    Ban {
        /// An address, or a network in CIDR notation (host bits zero).
        source: String,
        /// How long: a number and s, m, h or d (30s, 15m, 2h, 7d); from 1s to 365d.
        #[arg(long = "for", value_name = "DURATION", allow_hyphen_values = true, value_parser = time::parse_ban_duration)]
        duration: std::time::Duration,
        /// Ban a network wider than an IPv4 /8 or an IPv6 /32 (refused without it: 0.0.0.0/0 drops all port-25 traffic).
        #[arg(long)]
        force: bool,
        /// Why, for the `ban_added` line printed.
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        pins: PinArgs,
    },
    /// Lift a ban.
    Unban {
        source: String,
        #[command(flatten)]
        pins: PinArgs,
    },
    /// Stop the controller if it runs, and remove every program, link and pin.
    Detach(PinArgs),
    /// The shadow policy (run --shadow FILE): where it would have decided differently from the policy in force.
    ///
    /// Differences by direction, port, both decisions and the candidate's rule, the candidate's rules and the
    /// sources they concern most, since the candidate was loaded.
    Shadow {
        /// One JSON object instead of tables.
        #[arg(long)]
        json: bool,
        /// Rows of the top rules and sources.
        #[arg(long, default_value_t = 10)]
        top: usize,
        #[command(flatten)]
        pins: PinArgs,
    },
    /// Make the shadow policy the enforced one: the candidate as it was judged is swapped in (one atomic step) and
    /// written where --policy points (the file replaced is kept as .before-promote).
    Promote(PinArgs),
    /// Put a known-good policy back: its policy and list files are restored where they were read and the controller applies them in one atomic reload.
    ///
    /// The controller keeps the last 5 policies it applied (with their list files and SHA-256) in its state directory.
    ///
    /// Example: smtpguard rollback            (the newest known-good policy that differs from the one in force)
    ///
    /// Example: smtpguard rollback --to 41   (snapshot #41 of --list)
    Rollback {
        /// The known-good policy to put back, by its number in --list (numbers only grow, across reboots too).
        #[arg(long, value_name = "NUMBER")]
        to: Option<u64>,
        /// List the known-good policies kept instead.
        #[arg(long)]
        list: bool,
        /// The controller's state directory.
        #[arg(long, default_value = smtpguard::settings::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        #[command(flatten)]
        pins: PinArgs,
    },
    /// Fail open: switch enforcement off (every direction judges as in monitor mode, drops pass and are counted as would_drop) or back on.
    ///
    /// One map write, in force for the next packet; it outlasts controller restarts until turned off.
    ///
    /// Example: smtpguard bypass on --reason "INC-1234: policy 42 blocks the relay"
    Bypass {
        #[arg(value_enum)]
        state: Option<OnOff>,
        /// Why, for the `bypass` event and `smtpguard status`.
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        pins: PinArgs,
    },
    /// Print the datapath's decision about every packet from or to an address, as it happens.
    ///
    /// Example: smtpguard trace 198.51.100.7 --port 25 --for 5m
    Trace {
        /// The address whose flows are traced (source or destination).
        addr: IpAddr,
        /// Only flows with this source or destination port.
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
        port: Option<u16>,
        /// How long: a number and s, m or h (30s, 15m, 2h); at most 24h. Tracing stops then even if this command is killed.
        #[arg(long = "for", value_name = "DURATION", default_value = "60s", allow_hyphen_values = true, value_parser = smtpguard::commands::trace::parse_trace_duration)]
        duration: std::time::Duration,
        #[command(flatten)]
        pins: PinArgs,
    },
    /// The fleet (etcd): push the policy every host follows, see which host runs which.
    Fleet {
        #[command(subcommand)]
        command: FleetCommand,
    },
    /// Validate a policy: exit 0 when valid (warnings printed), 1 with every error listed.
    ///
    /// Example: smtpguard check /etc/smtpguard/policy.yaml
    Check {
        #[command(flatten)]
        policy: PolicyArgs,
        /// Also name, as warnings at their fields, what this backend enforces only approximately.
        #[arg(long, value_enum, default_value = "ebpf")]
        backend: Backend,
    },
    /// Print the ruleset a policy becomes in a backend, for review (nftables only).
    ///
    /// Example: smtpguard render --backend nftables policy.yaml --uplink eth0 --tenant tap0
    Render {
        #[command(flatten)]
        policy: PolicyArgs,
        #[arg(long, value_enum)]
        backend: Backend,
        /// An uplink whose base chains are shown (repeat for more).
        #[arg(long = "uplink")]
        uplinks: Vec<String>,
        /// A tenant interface whose base chain is shown (repeat for more).
        #[arg(long = "tenant")]
        tenants: Vec<String>,
        /// `nft`: the ruleset as `nft list` prints it (parsed by nft in a
        /// private network namespace); `json`: the nftables JSON commands loaded.
        #[arg(long, value_enum, default_value = "nft")]
        format: RenderFormat,
    },
    /// Print the JSON Schema of the policy language, for editors (or, with --events, of event lines).
    Schema {
        /// The schema of the event stream's JSON lines instead.
        #[arg(long)]
        events: bool,
    },
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
    /// Summarise the event stream for an incident ticket: period, timeline, notable events, top sources, bans, countries, tenants, reloads.
    ///
    /// Counts in ranked tables are exact unless the report says otherwise (bounded memory: 4096 counters a table).
    ///
    /// Example: smtpguard report --events /var/log/smtpguard/events.jsonl.1 --events /var/log/smtpguard/events.jsonl --since 24h
    Report {
        /// An event file (JSON lines as `run --events` writes them), `-` for stdin; repeat for a rotated set.
        #[arg(long = "events", value_name = "FILE", required = true)]
        events: Vec<PathBuf>,
        /// Only events from then on: a duration back from now (30m, 4h, 3d), an RFC 3339 time or a date.
        #[arg(long, value_name = "WHEN", value_parser = smtpguard::report::parse_since)]
        since: Option<smtpguard::report::Since>,
        /// `md` (Markdown, for a ticket) or `json` (one object).
        #[arg(long, value_enum, default_value = "md")]
        format: smtpguard::report::Format,
        /// Rows in each ranked table (sources, bans, countries, tenants).
        #[arg(long, value_name = "N", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=4096))]
        top: u32,
    },
    /// Write the man pages and shell completions generated from these definitions into DIR (for packaging).
    #[command(hide = true)]
    GenerateAssets {
        /// Where: DIR/man/*.1 and DIR/completions/.
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum FleetCommand {
    /// Validate a policy as `check` does, then make it the fleet's: every host run with --fleet-policy applies it.
    ///
    /// Example: smtpguard fleet push /etc/smtpguard/policy.yaml --fleet-etcd http://etcd1:2379 --comment "allow 587"
    Push {
        /// The policy file (YAML); the list files it names go with it, geo databases stay each host's own.
        policy: PathBuf,
        /// Read the list files the policy names from this directory (default: the policy file's).
        #[arg(long, value_name = "DIR")]
        lists: Option<PathBuf>,
        /// Validate geo-fences against this MaxMind database instead of the paths in the file.
        #[arg(long)]
        geo_database: Option<PathBuf>,
        /// Push only if the fleet's policy is still this revision (the one you reviewed).
        #[arg(long, value_name = "REVISION")]
        expect_revision: Option<i64>,
        /// A note kept with the revision (shown by `fleet status`).
        #[arg(long)]
        comment: Option<String>,
        #[command(flatten)]
        limits: LimitArgs,
        #[command(flatten)]
        fleet: FleetArgs,
    },
    /// The hosts of the fleet: the policy revision each runs, its mode and bans, and which failed to apply it.
    Status {
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        fleet: FleetArgs,
    },
}

/// Where the fleet is: flags, over a config file's `[fleet]`.
#[derive(clap::Args)]
struct FleetArgs {
    /// Read the `[fleet]` settings from this config file (flags override it).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: FleetSettings,
}

impl FleetArgs {
    fn connection(self) -> anyhow::Result<smtpguard::fleet::settings::Connection> {
        let file = self.config.as_deref().map(Settings::load).transpose()?.map(|s| s.fleet).unwrap_or_default();
        self.settings.over(file).connection()
    }
}

/// Exit 0 when `ok`, 1 when not, 2 with the error printed.
fn verdict(r: anyhow::Result<bool>) -> ExitCode {
    match r {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("smtpguard: {e:#}");
            ExitCode::from(2)
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum RenderFormat {
    Nft,
    Json,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Run { config, settings } => {
            let settings = match config.as_deref().map(Settings::load).transpose() {
                Ok(file) => settings.over(file.unwrap_or_default()),
                Err(e) => return commands::report(Err(e)),
            };
            smtpguard::logging::init(&settings.logging());
            commands::report(settings.resolve().and_then(smtpguard::controller::run))
        }
        Command::Reload(p) => commands::report(commands::reload(&p.pins())),
        Command::Tenants { json, pins } => commands::report(commands::tenants(&pins.pins(), json)),
        Command::Status { rules: false, pins } => commands::report(commands::status(&pins.pins())),
        Command::Status { rules: true, pins } => commands::report(commands::state::rules(&pins.pins())),
        Command::Bans { json, pins } => commands::report(commands::bans(&pins.pins(), json)),
        Command::Ban { source, duration, force, reason, pins } => {
            commands::report(commands::ban(&pins.pins(), &source, duration, force, reason.as_deref()))
        }
        Command::Unban { source, pins } => commands::report(commands::unban(&pins.pins(), &source)),
        Command::Detach(p) => commands::report(commands::detach(&p.pins())),
        Command::Shadow { json, top, pins } => commands::report(smtpguard::shadow::report(&pins.pins(), json, top)),
        Command::Promote(pins) => commands::report(commands::recovery::promote(&pins.pins())),
        Command::Rollback { to, list, state_dir, pins } => commands::report(commands::recovery::rollback(&pins.pins(), &state_dir, to, list)),
        Command::Bypass { state, reason, pins } => {
            commands::report(commands::recovery::bypass(&pins.pins(), state.map(|s| s == OnOff::On), reason.as_deref()))
        }
        Command::Trace { addr, port, duration, pins } => commands::report(smtpguard::commands::trace::run(&pins.pins(), addr, port, duration)),
        Command::Check { policy, backend } => commands::check(&policy.file, &policy.options(), backend),
        Command::Render { policy, backend, uplinks, tenants, format } => {
            let devices = smtpguard::nft::Devices { uplinks, tenants };
            commands::policy::render(&policy.file, &policy.options(), backend, &devices, format == RenderFormat::Json)
        }
        Command::Fleet { command: FleetCommand::Push { policy, lists, geo_database, expect_revision, comment, limits, fleet } } => {
            let options = ReadOptions { geo_database, today: None, limits: limits.limits(), files_dir: lists };
            verdict(fleet.connection().and_then(|c| smtpguard::fleet::commands::push(&c, &policy, &options, expect_revision, comment)))
        }
        Command::Fleet { command: FleetCommand::Status { json, fleet } } => {
            verdict(fleet.connection().and_then(|c| smtpguard::fleet::commands::status(&c, json)))
        }
        Command::Schema { events } => commands::schema(events),
        Command::Explain { policy, direction, src, dst, dport, syn, payload, json } => {
            let direction = match direction {
                Direction::Ingress => policy_common::direction::INGRESS,
                Direction::Egress => policy_common::direction::EGRESS,
            };
            commands::explain(&policy.file, &policy.options(), ExplainArgs { direction, src, dst, dport, syn, payload, json })
        }
        Command::Report { events, since, format, top } => {
            let options = smtpguard::report::Options { files: events, since, format, top: top as usize };
            commands::report(smtpguard::report::run(&options).map_err(Into::into))
        }
        Command::GenerateAssets { dir } => commands::report(commands::assets::generate(Cli::command(), &dir).map(|written| {
            for path in written {
                println!("{}", path.display());
            }
        })),
    }
}

//! The settings of `smtpguard run`: the flags, over a config file
//! (`--config /etc/smtpguard/smtpguard.toml`, the same names in TOML),
//! over the defaults. One struct is both the flags (clap) and the file
//! (serde), so the two never drift apart.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::{
    controller::{RunOptions, XdpModeChoice},
    dataplane::Capacities,
    logging::{LogFormat, LogSettings},
    fleet::{bundle::PolicyCache, settings::FleetSettings},
    pins::{Pins, DEFAULT_PIN_DIR, DEFAULT_RUN_DIR},
    policy::{input, ReadOptions},
};

/// What `run` may be told, on the command line or in the config file.
/// Every field is optional: unset in both, the default applies.
#[derive(clap::Args, Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct Settings {
    /// The policy file; reloaded on SIGHUP, on `smtpguard reload` and when it or a file it names changes.
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// A candidate policy judged beside --policy on every guarded packet, deciding nothing: where it would decide
    /// differently is counted (`smtpguard shadow`, smtpguard_shadow_differences_total) and sampled as events;
    /// `smtpguard promote` makes it the enforced policy. Reloaded like --policy.
    #[arg(long, value_name = "FILE")]
    pub shadow: Option<PathBuf>,
    /// Host uplink (a name, or a glob pattern): XDP judges arriving mail by the ingress policy, TC egress what
    /// leaves by the egress policy. A named uplink must exist at start (unless --wait-for-uplinks); if it goes,
    /// that is logged, sent as an event and shown by smtpguard_interface_attached 0 until it returns.
    #[arg(long)]
    #[serde(default)]
    pub uplink: Vec<String>,
    /// Tenant-facing interface (host side of a tap/veth), or a glob pattern such as 'tap*': TC ingress judges
    /// what the VM sends by the egress policy. Interfaces that match are attached as they appear and detached
    /// as they go.
    #[arg(long)]
    #[serde(default)]
    pub tenant: Vec<String>,
    /// Start even when a named uplink is not there yet (at boot, before the network is up): it is attached
    /// when it appears, and reported missing until then.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub wait_for_uplinks: Option<bool>,
    /// XDP mode: auto (native, falling back to generic with a warning), native or generic. Default auto.
    #[arg(long, value_enum)]
    pub xdp_mode: Option<XdpModeChoice>,
    /// What enforces the policy: ebpf (XDP and TC programs) or nftables (one table of netdev chains,
    /// for hosts that cannot attach eBPF; docs/nftables.md). Default ebpf.
    #[arg(long, value_enum)]
    pub backend: Option<crate::nft::Backend>,
    /// Where /metrics and /healthz are served. Default 127.0.0.1:9425.
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    /// Append events (JSON lines) to this file instead of stdout.
    #[arg(long)]
    pub events: Option<PathBuf>,
    /// Sources the rate and ban table holds.
    #[arg(long)]
    pub source_capacity: Option<u32>,
    /// Client streams on plaintext 25 the command filter follows across segments (about 100 bytes each).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub smtp_flows: Option<u32>,
    /// IPv4 ACL room per generation: nodes (48 bytes each), one per /16 or /24 with more specific prefixes.
    #[arg(long)]
    pub acl4_nodes: Option<u32>,
    /// IPv4 ACL room: run slots (4 bytes each).
    #[arg(long)]
    pub acl4_slots: Option<u32>,
    /// IPv4 ACL room: distinct prefix meanings (40 bytes each).
    #[arg(long)]
    pub acl4_values: Option<u32>,
    /// Use this MaxMind database for every geo-fence instead of the paths in the file.
    #[arg(long)]
    pub geo_database: Option<PathBuf>,
    /// Largest list file read, such as 256MiB (default 8MiB; the policy's `limits.list_file_bytes` overrides it).
    #[arg(long, value_name = "SIZE", value_parser = input::parse_size)]
    #[serde(default, deserialize_with = "size")]
    pub max_list_bytes: Option<u64>,
    /// Largest geo database read (default 128MiB; `limits.geo_database_bytes` overrides it).
    #[arg(long, value_name = "SIZE", value_parser = input::parse_size)]
    #[serde(default, deserialize_with = "size")]
    pub max_geo_bytes: Option<u64>,
    /// Most networks read from a geo database (default 4000000; `limits.geo_networks` overrides it).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_geo_networks: Option<u64>,
    /// bpffs directory holding the pinned programs, links and maps. Default /sys/fs/bpf/smtpguard.
    #[arg(long)]
    pub pin_dir: Option<PathBuf>,
    /// Directory for the controller's pid file. Default /run/smtpguard.
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Log filter: error, warn, info (default), debug, trace, or per module (smtpguard::controller=debug).
    /// RUST_LOG or SMTPGUARD_LOG set it too; this wins.
    #[arg(long)]
    pub log_level: Option<String>,
    /// Log lines as plain text (default; for a terminal or the journal) or one JSON object each.
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Directory for state kept across restarts (the fleet policy revisions fetched, the one applied last).
    /// Default /var/lib/smtpguard.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// The fleet (the `[fleet]` table in the config file).
    #[command(flatten)]
    #[serde(default)]
    pub fleet: FleetSettings,
}

pub const DEFAULT_STATE_DIR: &str = "/var/lib/smtpguard";

/// A size in the config file: a number of bytes, or a string such as "64MiB".
fn size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    match Option::<Size>::deserialize(d)? {
        None => Ok(None),
        Some(Size::Bytes(n)) => Ok(Some(n)),
        Some(Size::Text(s)) => input::parse_size(&s).map(Some).map_err(serde::de::Error::custom),
    }
}

impl Settings {
    /// The settings a config file holds. Errors name the file and, for
    /// TOML mistakes, the line and column.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading the config file {}", path.display()))?;
        let file: Settings = toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        // Paths in the file are relative to the file.
        let dir = path.parent().unwrap_or(Path::new("."));
        let rel = |p: Option<PathBuf>| p.map(|p| if p.is_relative() { dir.join(p) } else { p });
        Ok(Settings {
            policy: rel(file.policy.clone()),
            shadow: rel(file.shadow.clone()),
            events: rel(file.events.clone()),
            geo_database: rel(file.geo_database.clone()),
            state_dir: rel(file.state_dir.clone()),
            fleet: file.fleet.clone().relative_to(dir),
            ..file
        })
    }

    /// These settings where set, `base` where not (lists: these when any).
    pub fn over(self, base: Settings) -> Settings {
        let list = |a: Vec<String>, b: Vec<String>| if a.is_empty() { b } else { a };
        Settings {
            policy: self.policy.or(base.policy),
            shadow: self.shadow.or(base.shadow),
            uplink: list(self.uplink, base.uplink),
            tenant: list(self.tenant, base.tenant),
            wait_for_uplinks: self.wait_for_uplinks.or(base.wait_for_uplinks),
            xdp_mode: self.xdp_mode.or(base.xdp_mode),
            backend: self.backend.or(base.backend),
            metrics_addr: self.metrics_addr.or(base.metrics_addr),
            events: self.events.or(base.events),
            source_capacity: self.source_capacity.or(base.source_capacity),
            smtp_flows: self.smtp_flows.or(base.smtp_flows),
            acl4_nodes: self.acl4_nodes.or(base.acl4_nodes),
            acl4_slots: self.acl4_slots.or(base.acl4_slots),
            acl4_values: self.acl4_values.or(base.acl4_values),
            geo_database: self.geo_database.or(base.geo_database),
            max_list_bytes: self.max_list_bytes.or(base.max_list_bytes),
            max_geo_bytes: self.max_geo_bytes.or(base.max_geo_bytes),
            max_geo_networks: self.max_geo_networks.or(base.max_geo_networks),
            pin_dir: self.pin_dir.or(base.pin_dir),
            run_dir: self.run_dir.or(base.run_dir),
            log_level: self.log_level.or(base.log_level),
            log_format: self.log_format.or(base.log_format),
            state_dir: self.state_dir.or(base.state_dir),
            fleet: self.fleet.over(base.fleet),
        }
    }

    /// How the controller logs.
    pub fn logging(&self) -> LogSettings {
        LogSettings { level: self.log_level.clone(), format: self.log_format.unwrap_or_default() }
    }

    /// What `run` does, with the defaults filled in.
    pub fn resolve(self) -> Result<RunOptions> {
        let fleet = self.fleet.resolve()?;
        let state_dir = self.state_dir.clone().unwrap_or_else(|| DEFAULT_STATE_DIR.into());
        // Following the fleet, a host starts with what it applied last.
        let applied = fleet.as_ref().filter(|f| f.follow_policy).and_then(|_| PolicyCache::new(&state_dir).applied());
        let start_revision = applied.as_ref().map(|(rev, _)| *rev);
        let Some(policy) = applied.map(|(_, file)| file).or(self.policy) else {
            if fleet.as_ref().is_some_and(|f| f.follow_policy) {
                bail!(
                    "no fleet policy was applied on this host yet ({} holds none) and no --policy to enforce until one is",
                    state_dir.display()
                );
            }
            bail!("no policy: give --policy FILE, or `policy = \"...\"` in the config file")
        };
        if self.smtp_flows == Some(0) {
            bail!("smtp_flows: at least 1");
        }
        let d = input::Limits::default();
        let room = policy_common::acl4::Capacity::DEFAULT;
        Ok(RunOptions {
            policy,
            shadow: self.shadow,
            start_revision,
            fleet,
            state_dir,
            uplinks: self.uplink,
            tenants: self.tenant,
            wait_for_uplinks: self.wait_for_uplinks.unwrap_or(false),
            xdp_mode: self.xdp_mode.unwrap_or(XdpModeChoice::Auto),
            backend: self.backend.unwrap_or_default(),
            metrics_addr: self.metrics_addr.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9425))),
            pins: Pins::new(self.pin_dir.unwrap_or_else(|| DEFAULT_PIN_DIR.into()), self.run_dir.unwrap_or_else(|| DEFAULT_RUN_DIR.into())),
            events: self.events,
            policy_options: ReadOptions {
                geo_database: self.geo_database,
                today: None,
                limits: input::Limits {
                    list_file_bytes: self.max_list_bytes.unwrap_or(d.list_file_bytes),
                    geo_database_bytes: self.max_geo_bytes.unwrap_or(d.geo_database_bytes),
                    geo_networks: self.max_geo_networks.unwrap_or(d.geo_networks),
                },
                files_dir: None,
            },
            capacities: Capacities {
                sources: self.source_capacity.unwrap_or(policy_common::DEFAULT_SOURCE_CAPACITY),
                acl4: policy_common::acl4::Capacity {
                    nodes: self.acl4_nodes.unwrap_or(room.nodes),
                    slots: self.acl4_slots.unwrap_or(room.slots),
                    values: self.acl4_values.unwrap_or(room.values),
                },
                smtp_flows: self.smtp_flows.unwrap_or(policy_common::DEFAULT_SMTP_FLOWS_CAPACITY),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file_which_overrides_the_defaults() {
        let file: Settings = toml::from_str(
            "policy = \"/etc/smtpguard/policy.yaml\"\nuplink = [\"eth0\"]\ntenant = [\"tap*\", \"vnet*\"]\nmetrics_addr = \"0.0.0.0:9425\"\nmax_list_bytes = \"64MiB\"\nsmtp_flows = 1000\n",
        )
        .unwrap();
        let flags = Settings { tenant: vec!["vm*".into()], smtp_flows: Some(5), ..Settings::default() };
        let o = flags.over(file).resolve().unwrap();
        assert_eq!(o.policy, PathBuf::from("/etc/smtpguard/policy.yaml"));
        assert_eq!((o.uplinks, o.tenants), (vec!["eth0".to_owned()], vec!["vm*".to_owned()]));
        assert_eq!(o.metrics_addr, "0.0.0.0:9425".parse().unwrap());
        assert_eq!(o.capacities.smtp_flows, 5);
        assert_eq!(o.policy_options.limits.list_file_bytes, 64 << 20);
        assert_eq!(o.pins.dir, PathBuf::from(DEFAULT_PIN_DIR));
    }

    #[test]
    fn a_mistake_in_the_file_names_its_line() {
        let err = toml::from_str::<Settings>("policy = \"p.yaml\"\nuplinks = [\"eth0\"]\n").unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains("uplinks"), "{err}");
        assert!(Settings::default().resolve().unwrap_err().to_string().contains("no policy"));
    }
}

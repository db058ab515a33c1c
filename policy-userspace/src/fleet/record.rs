//! The fleet's keys and values, and the rules a host applies before it
//! trusts one: a value that does not parse, a network wider than the
//! host's minimum prefix or a ban already over is refused, counted and
//! reported, never installed.
//!
//! ```text
//! PREFIX/bans/<network>     BanRecord, on a lease that ends with the ban
//! PREFIX/unbans/<network>   Tombstone, on a lease: lifted fleet-wide
//! PREFIX/hosts/<host>       HostRecord, on the host's lease
//! PREFIX/policy             the policy pointer (fleet::bundle)
//! PREFIX/policy-blobs/<sha256>/<n>   the policy bundle, in chunks
//! ```

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::settings::Trust;

pub fn bans_prefix(prefix: &str) -> String {
    format!("{prefix}/bans/")
}

pub fn unbans_prefix(prefix: &str) -> String {
    format!("{prefix}/unbans/")
}

pub fn hosts_prefix(prefix: &str) -> String {
    format!("{prefix}/hosts/")
}

pub fn ban_key(prefix: &str, net: IpNet) -> String {
    format!("{prefix}/bans/{net}")
}

pub fn unban_key(prefix: &str, net: IpNet) -> String {
    format!("{prefix}/unbans/{net}")
}

/// The network a ban names as the datapath holds it: an IPv4 address is
/// its /32, an IPv6 address its /64 (a source is a /64 there).
pub fn source_net(addr: IpAddr) -> IpNet {
    match addr {
        IpAddr::V4(a) => IpNet::new(IpAddr::V4(a), 32).expect("valid prefix"),
        IpAddr::V6(a) => IpNet::new(IpAddr::V6(a), 64).expect("valid prefix").trunc(),
    }
}

/// Whether the datapath holds a ban of `net` in its source table (one
/// source) rather than in a network trie.
pub fn is_source(net: IpNet) -> bool {
    matches!(net, IpNet::V4(n) if n.prefix_len() == 32) || matches!(net, IpNet::V6(n) if n.prefix_len() == 64)
}

/// A ban as the fleet shares it: the value of `PREFIX/bans/<network>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BanRecord {
    /// The host whose datapath or operator made it.
    pub origin_host: String,
    /// auto, escalated or manual.
    pub origin: String,
    pub reason: String,
    /// Bans of the source so far, fleet-wide, this one included.
    pub strikes: u16,
    /// When it ends, for people (RFC 3339) ...
    pub until: String,
    /// ... and for hosts: Unix milliseconds.
    pub until_ms: u64,
    /// When the origin host saw it begin (Unix milliseconds): the
    /// propagation delay is measured from here.
    pub started_ms: u64,
}

pub const ORIGINS: [&str; 3] = ["auto", "escalated", "manual"];

/// The value of `PREFIX/unbans/<network>`: the ban was lifted fleet-wide.
/// Any ban of the network ending by `until_ms` is lifted where it is
/// found, even by a host that was away when it happened.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tombstone {
    pub by_host: String,
    pub at_ms: u64,
    pub until_ms: u64,
}

/// Why a fleet ban was not installed. Each is counted
/// (`smtpguard_fleet_bans_received_total{result}`) and shown in `fleet status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The key is no network, or the value no ban record.
    Unparsable(String),
    /// Wider than the host's minimum prefix.
    TooWide { net: IpNet, min: u8 },
    /// The host holds `--fleet-max-bans` fleet bans already.
    OverCap { cap: u32 },
}

impl Refusal {
    /// The `result` label.
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::Unparsable(_) => "unparsable",
            Refusal::TooWide { .. } => "too_wide",
            Refusal::OverCap { .. } => "over_cap",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Unparsable(why) => write!(f, "{why}"),
            Refusal::TooWide { net, min } => write!(f, "{net} is wider than the /{min} this host accepts from the fleet"),
            Refusal::OverCap { cap } => write!(f, "this host holds its --fleet-max-bans {cap} fleet bans already"),
        }
    }
}

/// A network ban key's network: canonical text (host bits zero), so one
/// network has one key.
pub fn parse_key_net(key: &str, prefix: &str) -> Result<IpNet, Refusal> {
    let text = key.strip_prefix(prefix).ok_or_else(|| Refusal::Unparsable(format!("not under {prefix}")))?;
    let net: IpNet = text.parse().map_err(|_| Refusal::Unparsable(format!("{text:?} is no network (such as 198.51.100.7/32)")))?;
    if net.trunc() != net || net.to_string() != text {
        return Err(Refusal::Unparsable(format!("{text:?} is not in canonical form ({} would be)", net.trunc())));
    }
    Ok(net)
}

/// A fleet ban, checked against `trust`: the network and its record.
pub fn parse_ban(key: &str, value: &[u8], prefix: &str, trust: &Trust) -> Result<(IpNet, BanRecord), Refusal> {
    let net = parse_key_net(key, &bans_prefix(prefix))?;
    let record: BanRecord = serde_json::from_slice(value).map_err(|e| Refusal::Unparsable(format!("the value is no ban record: {e}")))?;
    if !ORIGINS.contains(&record.origin.as_str()) {
        return Err(Refusal::Unparsable(format!("origin {:?} is none of {}", record.origin, ORIGINS.join(", "))));
    }
    if record.strikes == 0 || record.origin_host.is_empty() {
        return Err(Refusal::Unparsable("strikes 0 or no origin_host".into()));
    }
    let min = match net {
        IpNet::V4(_) => trust.min_prefix_v4,
        IpNet::V6(_) => trust.min_prefix_v6,
    };
    if net.prefix_len() < min {
        return Err(Refusal::TooWide { net, min });
    }
    Ok((net, record))
}

pub fn parse_tombstone(key: &str, value: &[u8], prefix: &str) -> Result<(IpNet, Tombstone), Refusal> {
    let net = parse_key_net(key, &unbans_prefix(prefix))?;
    let t: Tombstone = serde_json::from_slice(value).map_err(|e| Refusal::Unparsable(format!("the value is no unban record: {e}")))?;
    Ok((net, t))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Vec<u8> {
        serde_json::to_vec(&BanRecord {
            origin_host: "a".into(),
            origin: "auto".into(),
            reason: "r".into(),
            strikes: 1,
            until: "x".into(),
            until_ms: 1,
            started_ms: 0,
        })
        .unwrap()
    }

    #[test]
    fn a_ban_is_refused_unless_its_key_is_a_canonical_network_no_wider_than_trusted() {
        let t = Trust::default();
        let ok = parse_ban("/sg/bans/198.51.100.7/32", &record(), "/sg", &t).unwrap();
        assert_eq!(ok.0, "198.51.100.7/32".parse::<IpNet>().unwrap());
        assert!(parse_ban("/sg/bans/2001:db8::/64", &record(), "/sg", &t).is_ok());
        let refused = |k: &str, v: &[u8]| parse_ban(k, v, "/sg", &t).unwrap_err();
        assert_eq!(refused("/sg/bans/0.0.0.0/0", &record()).label(), "too_wide");
        assert_eq!(refused("/sg/bans/10.0.0.0/8", &record()).label(), "too_wide");
        assert_eq!(refused("/sg/bans/2001::/16", &record()).label(), "too_wide");
        assert_eq!(refused("/sg/bans/198.51.100.7/24", &record()).label(), "unparsable", "host bits set");
        assert_eq!(refused("/sg/bans/198.51.100.7", &record()).label(), "unparsable", "no prefix");
        assert_eq!(refused("/sg/bans/2001:DB8::/64", &record()).label(), "unparsable", "not canonical");
        assert_eq!(refused("/sg/bans/198.51.100.7/32", b"{").label(), "unparsable");
        assert_eq!(refused("/sg/bans/198.51.100.7/32", br#"{"origin_host":"a"}"#).label(), "unparsable");
        let mut v: serde_json::Value = serde_json::from_slice(&record()).unwrap();
        v["origin"] = "fleet".into();
        assert_eq!(refused("/sg/bans/198.51.100.7/32", &serde_json::to_vec(&v).unwrap()).label(), "unparsable");
        let wide = Trust { min_prefix_v4: 8, ..t };
        assert!(parse_ban("/sg/bans/10.0.0.0/8", &record(), "/sg", &wide).is_ok());
    }

    #[test]
    fn sources_are_v4_32s_and_v6_64s() {
        assert_eq!(source_net("2001:db8::7".parse().unwrap()).to_string(), "2001:db8::/64");
        assert!(is_source(source_net("198.51.100.7".parse().unwrap())));
        assert!(!is_source("2001:db8::/128".parse().unwrap()));
    }
}

//! A validated policy: what the YAML said, with every reference resolved
//! and every value checked.

use std::path::PathBuf;

use ipnet::IpNet;
use policy_common::{action, mode, profile, side};

use super::yaml::Pos;

#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    pub file: PathBuf,
    /// Guarded ports in slot order.
    pub ports: Vec<GuardedPort>,
    pub ingress: Direction,
    pub egress: Direction,
    pub events: EventSettings,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuardedPort {
    pub port: u16,
    /// [`profile`] value.
    pub profile: u8,
}

pub const PROFILES: [(&str, u8); 4] =
    [("smtp", profile::SMTP), ("smtps", profile::SMTPS), ("submission", profile::SUBMISSION), ("other", profile::OTHER)];

#[derive(Clone, Debug, PartialEq)]
pub struct Direction {
    /// [`mode`] value.
    pub mode: u8,
    /// [`action`] per port, in slot order.
    pub defaults: Vec<u8>,
    pub rules: Vec<Rule>,
    pub rate_limit: Option<RateLimit>,
    pub geo: Option<Geo>,
    /// `smtp_command` bits.
    pub smtp_block: u8,
    /// [`action`] for malformed packets.
    pub malformed: u8,
}

impl Direction {
    pub fn empty(ports: usize) -> Self {
        Self {
            mode: mode::ENFORCE,
            defaults: vec![action::PASS; ports],
            rules: Vec::new(),
            rate_limit: None,
            geo: None,
            smtp_block: 0,
            malformed: action::DROP,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleKind {
    Allow,
    Deny,
    /// An allow with an expiry date.
    Exemption,
}

impl RuleKind {
    pub fn is_allow(self) -> bool {
        !matches!(self, RuleKind::Deny)
    }

    pub fn name(self) -> &'static str {
        match self {
            RuleKind::Allow => "allow",
            RuleKind::Deny => "deny",
            RuleKind::Exemption => "exemption",
        }
    }
}

/// Where a rule was written: the policy file or a list file, and the line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub file: PathBuf,
    pub pos: Pos,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    /// The rule's id: its own, the list's id for a list line, or a
    /// generated `direction.kind[index]`.
    pub id: String,
    pub kind: RuleKind,
    pub net: IpNet,
    /// [`side`] value.
    pub side: u8,
    /// Bit per port slot the rule applies to.
    pub port_mask: u8,
    /// Exemptions: last day (UTC) the rule applies, as days since 1970-01-01.
    pub until: Option<i64>,
    pub comment: Option<String>,
    pub origin: Origin,
}

impl Rule {
    pub fn side_name(&self) -> &'static str {
        if self.side == side::LOCAL {
            "local"
        } else {
            "peer"
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    pub new_per_minute: u32,
    pub burst: u32,
    /// 0: never ban.
    pub ban_above_per_minute: u32,
    pub ban_s: u32,
    pub escalate_factor: u32,
    pub escalate_max_s: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GeoField {
    /// GeoLite2/GeoIP2: `country.iso_code`.
    CountryIsoCode,
    /// ip-location-db and similar: a top-level `country_code`.
    CountryCode,
}

impl GeoField {
    pub const NAMES: [&str; 2] = ["country.iso_code", "country_code"];

    pub fn name(self) -> &'static str {
        match self {
            GeoField::CountryIsoCode => Self::NAMES[0],
            GeoField::CountryCode => Self::NAMES[1],
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Geo {
    pub database: PathBuf,
    pub field: GeoField,
    /// Upper-case ISO 3166-1 alpha-2 codes.
    pub countries: Vec<String>,
    /// `true`: only `countries` pass; `false`: `countries` are dropped.
    pub allow_only: bool,
    /// [`action`] for addresses the database has no country for.
    pub unknown: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventSettings {
    /// One drop in this many is offered to the event stream; 0: none.
    pub drop_sample_one_in: u32,
    /// Cap per CPU and second on sampled drops and rate trips.
    pub per_second: u32,
}

impl Default for EventSettings {
    fn default() -> Self {
        Self { drop_sample_one_in: 100, per_second: 50 }
    }
}

//! A validated policy: what the YAML said, with every reference resolved
//! and every value checked.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use ipnet::IpNet;
use policy_common::{verdict, mode, profile, side};

use super::{geo::GeoTable, lists::List, yaml::Pos};

#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    pub file: PathBuf,
    /// SHA-256 of the policy file's bytes as read.
    pub sha256: String,
    /// Guarded ports in slot order.
    pub ports: Vec<GuardedPort>,
    pub ingress: Direction,
    pub egress: Direction,
    pub events: EventSettings,
}

impl Policy {
    /// The policy file and every file it read: list files and geo databases.
    pub fn input_files(&self) -> Vec<PathBuf> {
        let mut files = vec![self.file.clone()];
        for d in [&self.ingress, &self.egress] {
            files.extend(d.lists.iter().map(|l| l.file.to_path_buf()));
            if let Some(g) = &d.geo {
                files.push(g.database.clone());
            }
        }
        files.sort();
        files.dedup();
        files
    }
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
    /// In monitor mode: the day (since the epoch, UTC) it starts to
    /// enforce, for a transition scheduled ahead.
    pub enforce_from: Option<i64>,
    /// [`verdict`] (`PASS` or `DROP`) per port, in slot order.
    pub defaults: Vec<u8>,
    /// Rules written in the policy.
    pub rules: Vec<Rule>,
    /// List files, each with all its networks.
    pub lists: Vec<ListRules>,
    pub rate_limit: Option<RateLimit>,
    pub geo: Option<Geo>,
    /// `smtp_command` bits.
    pub smtp_block: u8,
    /// [`verdict`] (`PASS` or `DROP`) for IP fragments to an `smtp` port while commands are blocked.
    pub smtp_fragments: u8,
    /// [`verdict`] (`PASS` or `DROP`) for malformed packets.
    pub malformed: u8,
    /// A dropped segment of an open connection gets a TCP reset (`established: reset`).
    pub established_reset: bool,
    /// Sources behind tenant interfaces that keep hitting the deny (egress only).
    pub tenant_suspect: Option<TenantSuspect>,
}

impl Direction {
    pub fn empty(ports: usize) -> Self {
        Self {
            mode: mode::ENFORCE,
            enforce_from: None,
            defaults: vec![verdict::PASS; ports],
            rules: Vec::new(),
            lists: Vec::new(),
            rate_limit: None,
            geo: None,
            smtp_block: 0,
            smtp_fragments: verdict::DROP,
            malformed: verdict::DROP,
            established_reset: true,
            tenant_suspect: None,
        }
    }

    /// Every network the direction's rules and list files name, the
    /// policy's rules first, then each list in order.
    pub fn networks(&self) -> impl Iterator<Item = RuleRef<'_>> {
        let rules = self.rules.iter().map(|r| RuleRef {
            id: &r.id,
            kind: r.kind,
            net: r.net,
            side: r.side,
            port_mask: r.port_mask,
            until: r.until,
            file: &r.origin.file,
            pos: r.origin.pos,
        });
        let lists = self.lists.iter().flat_map(|l| {
            l.list.nets.iter().map(move |&(net, line)| RuleRef {
                id: &l.id,
                kind: l.kind,
                net,
                side: l.side,
                port_mask: l.port_mask,
                until: None,
                file: &l.file,
                pos: Pos { line: line as usize, col: 1 },
            })
        });
        rules.chain(lists)
    }

    /// Rules plus list-file networks.
    pub fn network_count(&self) -> usize {
        self.rules.len() + self.lists.iter().map(|l| l.list.nets.len()).sum::<usize>()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
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
/// The file is shared by every rule written in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub file: Arc<Path>,
    pub pos: Pos,
}

/// A rule written in the policy.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    /// The rule's id: its own or a generated `direction.kind[index]`.
    pub id: Arc<str>,
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

/// A list file named in the policy: its networks are held once, shared
/// by the rules that use the file and by the next reload if it is
/// unchanged, instead of as one [`Rule`] each (a 64 MiB list has four
/// million lines).
#[derive(Clone, Debug, PartialEq)]
pub struct ListRules {
    /// The list's id, `file:PATH` (as written in the policy) unless given.
    pub id: Arc<str>,
    pub kind: RuleKind,
    pub side: u8,
    pub port_mask: u8,
    pub file: Arc<Path>,
    pub list: Arc<List>,
}

/// One network of a rule or of a list line, with what applies to it.
#[derive(Clone, Copy, Debug)]
pub struct RuleRef<'a> {
    pub id: &'a Arc<str>,
    pub kind: RuleKind,
    pub net: IpNet,
    pub side: u8,
    pub port_mask: u8,
    pub until: Option<i64>,
    pub file: &'a Arc<Path>,
    pub pos: Pos,
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

/// `tenant_suspect`: report a source behind a tenant interface whose
/// blocked new connections go over `blocked` in `window_s`, and, when
/// `quarantine_s` is set, ban it on every guarded port that long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TenantSuspect {
    pub blocked: u32,
    pub window_s: u32,
    /// 0: report only.
    pub quarantine_s: u32,
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
    /// The database's networks, read once while validating.
    pub table: Arc<GeoTable>,
    /// Upper-case ISO 3166-1 alpha-2 codes.
    pub countries: Vec<String>,
    /// `true`: only `countries` pass; `false`: `countries` are dropped.
    pub allow_only: bool,
    /// [`verdict`] (`PASS` or `DROP`) for addresses the database has no country for.
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

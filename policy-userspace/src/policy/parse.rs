//! From the YAML tree to a validated [`Policy`], collecting every error
//! rather than stopping at the first.

use std::{
    collections::HashMap,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use ipnet::IpNet;
use policy_common::{verdict, mode, side, smtp_command, MAX_PORTS};

use super::{
    countries,
    diag::{Diagnostics, Severity},
    geo::{self, GeoTable},
    input::{self, InputKind, Limits},
    lists::ListReader,
    model::{Direction, EventSettings, Geo, GeoField, GuardedPort, ListRules, Origin, Policy, RateLimit, Rule, RuleKind, TenantSuspect, PROFILES},
    time,
    yaml::{self, is_null, Kind, Node, Pos},
};

const TOP_FIELDS: &[&str] = &["version", "mode", "enforce_from", "ports", "events", "limits", "ingress", "egress"];
const LIMITS_FIELDS: &[&str] = &["list_file_bytes", "geo_database_bytes", "geo_networks"];
/// The largest value a `limits` field accepts: 1 TiB, or a trillion networks.
const MAX_LIMIT: u64 = 1 << 40;
const DIRECTION_FIELDS: &[&str] = &[
    "mode",
    "enforce_from",
    "default",
    "allow",
    "deny",
    "exemptions",
    "allow_files",
    "deny_files",
    "rate_limit",
    "geo",
    "smtp_commands",
    "malformed",
    "established",
    "tenant_suspect",
];
const SUSPECT_FIELDS: &[&str] = &["blocked", "window", "quarantine"];
const RULE_FIELDS: &[&str] = &["id", "cidr", "side", "ports", "comment"];
const EXEMPTION_FIELDS: &[&str] = &["id", "cidr", "side", "ports", "until", "comment"];
const LIST_FIELDS: &[&str] = &["id", "file", "side", "ports", "comment"];
const RATE_FIELDS: &[&str] = &["new_per_minute", "burst", "ban_above_per_minute", "ban", "escalate"];
const ESCALATE_FIELDS: &[&str] = &["factor", "max"];
const GEO_FIELDS: &[&str] = &["database", "field", "block", "allow_only", "unknown"];
const EVENTS_FIELDS: &[&str] = &["drop_sample_one_in", "per_second"];
const SMTP_FIELDS: &[&str] = &["block", "fragments"];
/// The window counts of the ban meter are 16-bit.
const MAX_BAN_THRESHOLD: i64 = 65_535;

/// Options that come from the command line rather than the file.
#[derive(Clone, Debug, Default)]
pub struct ReadOptions {
    /// Replaces every geo `database` path (for machines that keep it elsewhere).
    pub geo_database: Option<PathBuf>,
    /// The day exemptions are judged against; default today (UTC).
    pub today: Option<i64>,
    /// How much is read from list files and geo databases: the defaults,
    /// or what the command line says. A policy's `limits` overrides these.
    pub limits: Limits,
    /// Relative file paths in the policy (lists) are read from here
    /// instead of the policy file's directory (`fleet push --lists DIR`).
    pub files_dir: Option<PathBuf>,
}

struct Walker<'a> {
    file: &'a Path,
    /// The same, shared by the origin of every rule written in it.
    shared_file: Arc<Path>,
    dir: PathBuf,
    diags: &'a mut Diagnostics,
    options: &'a ReadOptions,
    today: i64,
    /// Explicit ids and where they were first defined.
    ids: HashMap<String, Pos>,
    limits: Limits,
    lists: ListReader,
    /// Databases read so far, by path and record field.
    geo_tables: HashMap<(PathBuf, GeoField), Arc<GeoTable>>,
}

/// Reads and validates a policy file. Warnings are in the diagnostics
/// either way; the policy comes back only when there is no error.
pub fn load_file(path: &Path, options: &ReadOptions) -> (Option<Policy>, Diagnostics) {
    let mut diags = Diagnostics::default();
    let bytes = match input::read_bounded(path, input::POLICY_FILE_BYTES, InputKind::Policy) {
        Ok(b) => b,
        Err(e) => {
            diags.error(path, Pos { line: 0, col: 0 }, "", format!("cannot read the policy: {e}"));
            return (None, diags);
        }
    };
    let text = match String::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
            let line = valid.iter().filter(|b| **b == b'\n').count() + 1;
            let col = valid.len() - valid.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1) + 1;
            diags.error(path, Pos { line, col }, "", "not UTF-8 text; a policy is UTF-8 YAML");
            return (None, diags);
        }
    };
    let policy = load_str(path, &text, options, &mut diags);
    (policy.filter(|_| !diags.has_errors()), diags)
}

/// Validates policy `text` as if read from `path`.
pub fn load_str(path: &Path, text: &str, options: &ReadOptions, diags: &mut Diagnostics) -> Option<Policy> {
    let sha256 = crate::controller::sha256_hex(text.as_bytes());
    let root = match yaml::parse(text) {
        Ok(r) => r,
        Err(e) => {
            diags.error(path, e.pos, "", format!("YAML syntax: {}", e.message));
            return None;
        }
    };
    let dir = options.files_dir.clone().unwrap_or_else(|| path.parent().map(Path::to_path_buf).unwrap_or_default());
    let mut w = Walker {
        file: path,
        shared_file: Arc::from(path),
        dir,
        diags,
        options,
        today: options.today.unwrap_or_else(time::today),
        ids: HashMap::new(),
        limits: options.limits,
        lists: ListReader::default(),
        geo_tables: HashMap::new(),
    };
    let policy = w.policy(&root).map(|p| Policy { sha256, ..p });
    if w.diags.has_errors() {
        None
    } else {
        w.lists.commit();
        policy
    }
}

impl Walker<'_> {
    fn error(&mut self, pos: Pos, field: &str, message: impl Into<String>) {
        self.diags.error(self.file, pos, field, message);
    }

    fn warning(&mut self, pos: Pos, field: &str, message: impl Into<String>) {
        self.diags.warning(self.file, pos, field, message);
    }

    /// The entries of a mapping, after reporting unknown and repeated keys.
    fn fields<'n>(&mut self, node: &'n Node, field: &str, allowed: &[&str]) -> Vec<(&'n str, Pos, &'n Node)> {
        let Kind::Map(entries) = &node.kind else {
            if !matches!(&node.kind, Kind::Scalar(s, false) if is_null(s)) {
                self.error(node.pos, field, format!("expected a mapping with fields {}, found {}", allowed.join(", "), node.type_name()));
            }
            return Vec::new();
        };
        let mut seen: HashMap<&str, Pos> = HashMap::new();
        let mut out = Vec::new();
        for (key, kpos, value) in entries {
            let path = join(field, key);
            if !allowed.contains(&key.as_str()) {
                self.error(*kpos, &path, format!("unknown field; valid fields here: {}", allowed.join(", ")));
                continue;
            }
            if let Some(first) = seen.insert(key, *kpos) {
                self.error(*kpos, &path, format!("repeated field (first at line {})", first.line));
                continue;
            }
            out.push((key.as_str(), *kpos, value));
        }
        out
    }

    fn scalar<'n>(&mut self, node: &'n Node, field: &str, expected: &str) -> Option<&'n str> {
        match &node.kind {
            Kind::Scalar(s, quoted) if *quoted || !is_null(s) => Some(s),
            _ => {
                self.error(node.pos, field, format!("expected {expected}, found {}", node.type_name()));
                None
            }
        }
    }

    fn int(&mut self, node: &Node, field: &str, min: i64, max: i64) -> Option<i64> {
        let s = self.scalar(node, field, &format!("an integer from {min} to {max}"))?;
        match s.parse::<i64>() {
            Ok(v) if (min..=max).contains(&v) => Some(v),
            Ok(v) => {
                self.error(node.pos, field, format!("{v} is out of range; expected {min} to {max}"));
                None
            }
            Err(_) => {
                self.error(node.pos, field, format!("`{s}` is not an integer; expected {min} to {max}"));
                None
            }
        }
    }

    fn one_of(&mut self, node: &Node, field: &str, choices: &[&str]) -> Option<usize> {
        let s = self.scalar(node, field, &format!("one of {}", choices.join(", ")))?;
        let found = choices.iter().position(|c| c.eq_ignore_ascii_case(s));
        if found.is_none() {
            self.error(node.pos, field, format!("`{s}` is not valid; expected one of {}", choices.join(", ")));
        }
        found
    }

    fn list<'n>(&mut self, node: &'n Node, field: &str) -> &'n [Node] {
        match &node.kind {
            Kind::Seq(items) => items,
            Kind::Scalar(s, false) if is_null(s) => &[],
            _ => {
                self.error(node.pos, field, format!("expected a list, found {}", node.type_name()));
                &[]
            }
        }
    }

    fn action(&mut self, node: &Node, field: &str) -> Option<u8> {
        self.one_of(node, field, &["allow", "deny"]).map(|i| if i == 0 { verdict::PASS } else { verdict::DROP })
    }

    /// The day a monitored direction starts to enforce.
    fn enforce_from(&mut self, node: &Node, field: &str) -> Option<i64> {
        match self.scalar(node, field, "a date YYYY-MM-DD").map(time::parse_date) {
            Some(Some(day)) => {
                if day <= self.today {
                    self.warning(node.pos, field, format!("{} is past: the direction enforces already", time::format_date(day)));
                }
                Some(day)
            }
            Some(None) => {
                self.error(node.pos, field, "not a date; write YYYY-MM-DD, such as 2027-01-15 (the switch is at 00:00 UTC)");
                None
            }
            None => None,
        }
    }

    fn mode(&mut self, node: &Node, field: &str) -> Option<u8> {
        self.one_of(node, field, &["enforce", "monitor"]).map(|i| if i == 0 { mode::ENFORCE } else { mode::MONITOR })
    }

    fn duration(&mut self, node: &Node, field: &str, min: u64, max: u64) -> Option<u32> {
        let s = self.scalar(node, field, "a duration such as 30s, 15m, 2h or 7d")?;
        match time::parse_duration(s) {
            Some(v) if (min..=max).contains(&v) => Some(v as u32),
            Some(v) => {
                self.error(node.pos, field, format!("{v} s is out of range; expected {min} s to {max} s"));
                None
            }
            None => {
                self.error(node.pos, field, format!("`{s}` is not a duration; write a number and s, m, h or d (15m)"));
                None
            }
        }
    }

    fn policy(&mut self, root: &Node) -> Option<Policy> {
        let fields = self.fields(root, "", TOP_FIELDS);
        let get = |name: &str| fields.iter().find(|(k, ..)| *k == name).map(|(_, p, n)| (*p, *n));
        match get("version") {
            None => self.error(Pos { line: 1, col: 1 }, "version", "missing; this reader understands `version: 1`"),
            Some((_, n)) => {
                if let Some(v) = self.int(n, "version", 0, i64::MAX) {
                    if v != 1 {
                        self.error(n.pos, "version", format!("version {v} is not supported; this reader understands 1"));
                    }
                }
            }
        }
        // Before anything is read that they bound.
        if let Some((_, n)) = get("limits") {
            self.limits(n);
        }
        let global_mode = get("mode").and_then(|(_, n)| self.mode(n, "mode")).unwrap_or(mode::ENFORCE);
        let ports = match get("ports") {
            Some((_, n)) => self.ports(n),
            None => vec![GuardedPort { port: 25, profile: policy_common::profile::SMTP }],
        };
        let events = get("events").map(|(_, n)| self.events(n)).unwrap_or_default();
        let mut ingress = Direction::empty(ports.len());
        let mut egress = Direction::empty(ports.len());
        let global_from = get("enforce_from").and_then(|(_, n)| self.enforce_from(n, "enforce_from"));
        ingress.mode = global_mode;
        egress.mode = global_mode;
        ingress.enforce_from = global_from;
        egress.enforce_from = global_from;
        if let Some((_, n)) = get("ingress") {
            self.direction(n, "ingress", &ports, &mut ingress);
        }
        if let Some((_, n)) = get("egress") {
            self.direction(n, "egress", &ports, &mut egress);
        }
        Some(Policy { file: self.file.to_path_buf(), sha256: String::new(), ports, ingress, egress, events })
    }

    fn limits(&mut self, node: &Node) {
        for (key, _, value) in self.fields(node, "limits", LIMITS_FIELDS) {
            let field = join("limits", key);
            match key {
                "geo_networks" => {
                    if let Some(v) = self.int(value, &field, 1, MAX_LIMIT as i64) {
                        self.limits.geo_networks = v as u64;
                    }
                }
                _ => {
                    let Some(v) = self.size(value, &field) else { continue };
                    if key == "list_file_bytes" {
                        self.limits.list_file_bytes = v;
                    } else {
                        self.limits.geo_database_bytes = v;
                    }
                }
            }
        }
    }

    fn size(&mut self, node: &Node, field: &str) -> Option<u64> {
        let s = self.scalar(node, field, "a size such as 64MiB")?;
        match input::parse_size(s) {
            Ok(v) if (1..=MAX_LIMIT).contains(&v) => Some(v),
            Ok(_) => {
                self.error(node.pos, field, format!("`{s}` is out of range; expected 1 byte to {}", input::Size(MAX_LIMIT)));
                None
            }
            Err(msg) => {
                self.error(node.pos, field, msg);
                None
            }
        }
    }

    fn ports(&mut self, node: &Node) -> Vec<GuardedPort> {
        let profiles: Vec<&str> = PROFILES.iter().map(|(n, _)| *n).collect();
        let Kind::Map(entries) = &node.kind else {
            self.error(node.pos, "ports", format!("expected a mapping of port to profile ({}), such as {{25: smtp}}", profiles.join(", ")));
            return Vec::new();
        };
        let mut out: Vec<GuardedPort> = Vec::new();
        for (key, kpos, value) in entries {
            let field = format!("ports.{key}");
            let port = match key.parse::<u16>() {
                Ok(p) if p > 0 => p,
                _ => {
                    self.error(*kpos, &field, format!("`{key}` is not a TCP port (1 to 65535)"));
                    continue;
                }
            };
            let Some(i) = self.one_of(value, &field, &profiles) else { continue };
            if out.iter().any(|g| g.port == port) {
                self.error(*kpos, &field, "port listed twice");
                continue;
            }
            out.push(GuardedPort { port, profile: PROFILES[i].1 });
        }
        if out.is_empty() {
            self.error(node.pos, "ports", "guard at least one port, such as {25: smtp}");
        }
        if out.len() > MAX_PORTS {
            self.error(node.pos, "ports", format!("{} ports listed; the datapath guards at most {MAX_PORTS}", out.len()));
            out.truncate(MAX_PORTS);
        }
        out
    }

    fn events(&mut self, node: &Node) -> EventSettings {
        let mut e = EventSettings::default();
        for (key, _, value) in self.fields(node, "events", EVENTS_FIELDS) {
            let field = join("events", key);
            match key {
                "drop_sample_one_in" => {
                    if let Some(v) = self.int(value, &field, 0, 1_000_000) {
                        e.drop_sample_one_in = v as u32;
                    }
                }
                _ => {
                    if let Some(v) = self.int(value, &field, 0, 1_000_000) {
                        e.per_second = v as u32;
                    }
                }
            }
        }
        e
    }

    fn direction(&mut self, node: &Node, name: &str, ports: &[GuardedPort], d: &mut Direction) {
        for (key, _, value) in self.fields(node, name, DIRECTION_FIELDS) {
            let field = join(name, key);
            match key {
                "mode" => {
                    if let Some(m) = self.mode(value, &field) {
                        d.mode = m;
                    }
                }
                "enforce_from" => {
                    if let Some(day) = self.enforce_from(value, &field) {
                        d.enforce_from = Some(day);
                    }
                }
                "default" => self.defaults(value, &field, ports, d),
                "allow" | "deny" | "exemptions" => {
                    let kind = match key {
                        "allow" => RuleKind::Allow,
                        "deny" => RuleKind::Deny,
                        _ => RuleKind::Exemption,
                    };
                    for (i, item) in self.list(value, &field).iter().enumerate() {
                        let item_field = format!("{field}[{i}]");
                        if let Some(rule) = self.rule(item, &item_field, name, kind, i, ports) {
                            d.rules.push(rule);
                        }
                    }
                }
                "allow_files" | "deny_files" => {
                    let kind = if key == "allow_files" { RuleKind::Allow } else { RuleKind::Deny };
                    for (i, item) in self.list(value, &field).iter().enumerate() {
                        let item_field = format!("{field}[{i}]");
                        self.list_file(item, &item_field, kind, ports, &mut d.lists);
                    }
                }
                "rate_limit" => d.rate_limit = self.rate_limit(value, &field),
                "tenant_suspect" => {
                    if name == "egress" {
                        d.tenant_suspect = self.tenant_suspect(value, &field);
                    } else {
                        self.error(value.pos, &field, "only the egress policy judges what tenants send (tenant interfaces); move it under egress");
                    }
                }
                "geo" => d.geo = self.geo(value, &field),
                "smtp_commands" => self.smtp_commands(value, &field, d),
                "established" => {
                    if let Some(i) = self.one_of(value, &field, &["reset", "drop"]) {
                        d.established_reset = i == 0;
                    }
                }
                _ => {
                    if let Some(a) = self.action(value, &field) {
                        d.malformed = a;
                    }
                }
            }
        }
    }

    fn defaults(&mut self, node: &Node, field: &str, ports: &[GuardedPort], d: &mut Direction) {
        let Kind::Map(entries) = &node.kind else {
            self.error(node.pos, field, "expected a mapping of port to allow or deny, such as {25: deny}");
            return;
        };
        for (key, kpos, value) in entries {
            let f = format!("{field}.{key}");
            let slot = key.parse::<u16>().ok().and_then(|p| ports.iter().position(|g| g.port == p));
            match slot {
                Some(slot) => {
                    if let Some(a) = self.action(value, &f) {
                        d.defaults[slot] = a;
                    }
                }
                None => {
                    let guarded: Vec<String> = ports.iter().map(|g| g.port.to_string()).collect();
                    self.error(*kpos, &f, format!("`{key}` is not a guarded port; guarded: {}", guarded.join(", ")));
                }
            }
        }
    }

    fn port_mask(&mut self, node: Option<&Node>, field: &str, ports: &[GuardedPort]) -> Option<u8> {
        let Some(node) = node else { return Some(((1u16 << ports.len()) - 1) as u8) };
        let guarded: Vec<String> = ports.iter().map(|g| g.port.to_string()).collect();
        let mut mask = 0u8;
        let mut ok = true;
        for (i, item) in self.list(node, field).iter().enumerate() {
            let f = format!("{field}[{i}]");
            let Some(p) = self.int(item, &f, 1, 65_535) else {
                ok = false;
                continue;
            };
            match ports.iter().position(|g| g.port as i64 == p) {
                Some(slot) => mask |= 1 << slot,
                None => {
                    self.error(item.pos, &f, format!("port {p} is not guarded; guarded: {}", guarded.join(", ")));
                    ok = false;
                }
            }
        }
        if mask == 0 && ok {
            self.error(node.pos, field, "an empty port list would make the rule apply nowhere; leave `ports` out for all ports");
            return None;
        }
        ok.then_some(mask)
    }

    fn side(&mut self, node: Option<&Node>, field: &str, default: u8) -> Option<u8> {
        match node {
            None => Some(default),
            Some(n) => self.one_of(n, field, &["peer", "local"]).map(|i| if i == 0 { side::PEER } else { side::LOCAL }),
        }
    }

    fn cidr(&mut self, node: &Node, field: &str) -> Option<IpNet> {
        let s = self.scalar(node, field, "a CIDR such as 192.0.2.0/24 or 2001:db8::/32")?;
        match parse_cidr(s) {
            Ok(net) => Some(net),
            Err(msg) => {
                self.error(node.pos, field, msg);
                None
            }
        }
    }

    fn claim_id(&mut self, id: &str, pos: Pos, field: &str) -> bool {
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:/".contains(c)) {
            self.error(pos, field, format!("`{id}` is not a valid id; use letters, digits and - _ . : /"));
            return false;
        }
        if let Some(first) = self.ids.get(id) {
            let first = *first;
            self.error(pos, field, format!("duplicate id `{id}` (first used at line {}, column {})", first.line, first.col));
            return false;
        }
        self.ids.insert(id.to_owned(), pos);
        true
    }

    fn rule(&mut self, node: &Node, field: &str, direction: &str, kind: RuleKind, index: usize, ports: &[GuardedPort]) -> Option<Rule> {
        let default_side = if kind == RuleKind::Exemption { side::LOCAL } else { side::PEER };
        let origin = Origin { file: self.shared_file.clone(), pos: node.pos };
        let generated = format!("{direction}.{}[{index}]", if kind == RuleKind::Exemption { "exemptions" } else { kind.name() });
        if let Kind::Scalar(..) = node.kind {
            if kind == RuleKind::Exemption {
                self.error(node.pos, field, "an exemption needs at least `cidr` and `until`, such as {id: ticket-1, cidr: 198.51.100.0/28, until: 2027-03-31}");
                return None;
            }
            let net = self.cidr(node, field)?;
            return Some(Rule {
                id: generated.into(),
                kind,
                net,
                side: default_side,
                port_mask: ((1u16 << ports.len()) - 1) as u8,
                until: None,
                comment: None,
                origin,
            });
        }
        let allowed = if kind == RuleKind::Exemption { EXEMPTION_FIELDS } else { RULE_FIELDS };
        let fields = self.fields(node, field, allowed);
        let get = |name: &str| fields.iter().find(|(k, ..)| *k == name).map(|(_, _, n)| *n);
        let mut ok = true;
        let id = match get("id") {
            Some(n) => match self.scalar(n, &join(field, "id"), "an id") {
                Some(id) if self.claim_id(id, n.pos, &join(field, "id")) => id.to_owned(),
                _ => {
                    ok = false;
                    generated
                }
            },
            None => generated,
        };
        let net = match get("cidr") {
            Some(n) => self.cidr(n, &join(field, "cidr")),
            None => {
                if !fields.is_empty() || matches!(node.kind, Kind::Map(_)) {
                    self.error(node.pos, &join(field, "cidr"), "missing; every rule needs a `cidr`");
                }
                None
            }
        };
        let side = self.side(get("side"), &join(field, "side"), default_side);
        let port_mask = self.port_mask(get("ports"), &join(field, "ports"), ports);
        let comment = match get("comment") {
            Some(n) => self.scalar(n, &join(field, "comment"), "text").map(str::to_owned),
            None => None,
        };
        let mut until = None;
        if kind == RuleKind::Exemption {
            match get("until") {
                None => {
                    self.error(node.pos, &join(field, "until"), "missing; an exemption needs its last day, such as 2027-03-31");
                    ok = false;
                }
                Some(n) => match self.scalar(n, &join(field, "until"), "a date YYYY-MM-DD").map(time::parse_date) {
                    Some(Some(day)) => {
                        if day < self.today {
                            self.warning(n.pos, &join(field, "until"), format!("exemption `{id}` expired on {}; it no longer applies", time::format_date(day)));
                        }
                        until = Some(day);
                    }
                    Some(None) => {
                        self.error(n.pos, &join(field, "until"), "not a date; write YYYY-MM-DD, such as 2027-03-31");
                        ok = false;
                    }
                    None => ok = false,
                },
            }
        }
        let (net, side, port_mask) = (net?, side?, port_mask?);
        ok.then_some(Rule { id: id.into(), kind, net, side, port_mask, until, comment, origin })
    }

    fn list_file(&mut self, node: &Node, field: &str, kind: RuleKind, ports: &[GuardedPort], lists: &mut Vec<ListRules>) {
        let (path_node, id, side, port_mask) = match &node.kind {
            Kind::Scalar(..) => (node, None, Some(side::PEER), self.port_mask(None, field, ports)),
            _ => {
                let fields = self.fields(node, field, LIST_FIELDS);
                let get = |name: &str| fields.iter().find(|(k, ..)| *k == name).map(|(_, _, n)| *n);
                let Some(file) = get("file") else {
                    self.error(node.pos, &join(field, "file"), "missing; name the list file");
                    return;
                };
                let id = match get("id") {
                    Some(n) => match self.scalar(n, &join(field, "id"), "an id") {
                        Some(id) if self.claim_id(id, n.pos, &join(field, "id")) => Some(id.to_owned()),
                        _ => return,
                    },
                    None => None,
                };
                let side = self.side(get("side"), &join(field, "side"), side::PEER);
                let mask = self.port_mask(get("ports"), &join(field, "ports"), ports);
                (file, id, side, mask)
            }
        };
        let file_field = if matches!(node.kind, Kind::Scalar(..)) { field.to_owned() } else { join(field, "file") };
        let Some(raw) = self.scalar(path_node, &file_field, "a file path") else { return };
        let path = self.dir.join(raw);
        let (Some(side), Some(port_mask)) = (side, port_mask) else { return };
        // The path as written: two files of one name in different folders
        // are two rules.
        let id = id.unwrap_or_else(|| format!("file:{raw}"));
        match self.lists.read(&path, self.limits.list_file_bytes) {
            Err(e) => self.error(path_node.pos, &file_field, format!("cannot read list file: {e}")),
            Ok(list) => {
                for e in &list.errors {
                    self.diags.error(&path, Pos { line: e.line, col: e.col }, "", e.message.clone());
                }
                self.diags.count_more(Severity::Error, &path, list.more_errors);
                lists.push(ListRules { id: id.into(), kind, side, port_mask, file: Arc::from(path), list });
            }
        }
    }

    fn rate_limit(&mut self, node: &Node, field: &str) -> Option<RateLimit> {
        let fields = self.fields(node, field, RATE_FIELDS);
        let get = |name: &str| fields.iter().find(|(k, ..)| *k == name).map(|(_, _, n)| *n);
        let Some(rate_node) = get("new_per_minute") else {
            self.error(node.pos, &join(field, "new_per_minute"), "missing; the classic figure is 60");
            return None;
        };
        let rate = self.int(rate_node, &join(field, "new_per_minute"), 1, 60_000);
        let burst = match get("burst") {
            Some(n) => self.int(n, &join(field, "burst"), 1, 10_000),
            None => rate.map(|r| r.clamp(1, 20)),
        };
        let ban_above = match get("ban_above_per_minute") {
            Some(n) => self.int(n, &join(field, "ban_above_per_minute"), 1, MAX_BAN_THRESHOLD),
            None => Some(0),
        };
        let ban_s = match get("ban") {
            Some(n) => self.duration(n, &join(field, "ban"), 1, 30 * 86_400),
            None => Some(900),
        };
        let (mut factor, mut max_s) = (Some(1), ban_s);
        if let Some(esc) = get("escalate") {
            let ef = self.fields(esc, &join(field, "escalate"), ESCALATE_FIELDS);
            for (key, _, value) in ef {
                let f = join(&join(field, "escalate"), key);
                if key == "factor" {
                    factor = self.int(value, &f, 1, 16).map(|v| v as u32);
                } else {
                    max_s = self.duration(value, &f, 1, 365 * 86_400);
                }
            }
        }
        let (rate, burst, ban_above, ban_s, factor, max_s) = (rate?, burst?, ban_above?, ban_s?, factor?, max_s?);
        if ban_above != 0 && ban_above <= rate {
            if let Some(n) = get("ban_above_per_minute") {
                self.warning(n.pos, &join(field, "ban_above_per_minute"), format!("{ban_above}/min is not above the admitted rate of {rate}/min: sources are banned before the bucket limits them"));
            }
        }
        if max_s < ban_s {
            self.error(esc_pos(get("escalate"), node.pos), &join(field, "escalate.max"), "shorter than the first ban");
            return None;
        }
        Some(RateLimit {
            new_per_minute: rate as u32,
            burst: burst as u32,
            ban_above_per_minute: ban_above as u32,
            ban_s,
            escalate_factor: factor,
            escalate_max_s: max_s,
        })
    }

    fn geo(&mut self, node: &Node, field: &str) -> Option<Geo> {
        let fields = self.fields(node, field, GEO_FIELDS);
        let get = |name: &str| fields.iter().find(|(k, ..)| *k == name).map(|(_, _, n)| *n);
        let database = match (&self.options.geo_database, get("database")) {
            (Some(over), _) => Some(over.clone()),
            (None, Some(n)) => self.scalar(n, &join(field, "database"), "a path to a MaxMind database").map(|s| self.dir.join(s)),
            (None, None) => {
                self.error(node.pos, &join(field, "database"), "missing; name a MaxMind DB file (.mmdb)");
                None
            }
        };
        let geo_field = match get("field") {
            Some(n) => self.one_of(n, &join(field, "field"), &GeoField::NAMES).map(|i| if i == 0 { GeoField::CountryIsoCode } else { GeoField::CountryCode }),
            None => Some(GeoField::CountryIsoCode),
        };
        let table = match (&database, geo_field) {
            (Some(db), Some(f)) => {
                let pos = get("database").map(|n| n.pos).unwrap_or(node.pos);
                self.geo_table(db, f, pos, &join(field, "database"))
            }
            _ => None,
        };
        let (list_node, allow_only) = match (get("block"), get("allow_only")) {
            (Some(b), None) => (Some(b), false),
            (None, Some(a)) => (Some(a), true),
            (Some(_), Some(a)) => {
                self.error(a.pos, &join(field, "allow_only"), "give either `block` or `allow_only`, not both");
                (None, true)
            }
            (None, None) => {
                self.error(node.pos, field, "give `block: [country codes]` or `allow_only: [country codes]`");
                (None, false)
            }
        };
        let list_field = join(field, if allow_only { "allow_only" } else { "block" });
        let mut countries = Vec::new();
        let mut ok = list_node.is_some();
        if let Some(list) = list_node {
            for (i, item) in self.list(list, &list_field).iter().enumerate() {
                let f = format!("{list_field}[{i}]");
                match self.scalar(item, &f, "a two-letter country code") {
                    Some(code) if countries::is_known(&code.to_ascii_uppercase()) => countries.push(code.to_ascii_uppercase()),
                    Some(code) => {
                        self.error(item.pos, &f, format!("`{code}` is not an ISO 3166-1 alpha-2 country code (such as US, DE, CN)"));
                        ok = false;
                    }
                    None => ok = false,
                }
            }
        }
        let unknown = match get("unknown") {
            Some(n) => self.action(n, &join(field, "unknown")),
            None => Some(if allow_only { verdict::DROP } else { verdict::PASS }),
        };
        let (database, field_kind, unknown, table) = (database?, geo_field?, unknown?, table?);
        ok.then_some(Geo { database, field: field_kind, table, countries, allow_only, unknown })
    }

    /// A database read once per load, whichever directions use it.
    fn geo_table(&mut self, db: &Path, field: GeoField, pos: Pos, field_name: &str) -> Option<Arc<GeoTable>> {
        let key = (db.to_path_buf(), field);
        if let Some(t) = self.geo_tables.get(&key) {
            return Some(t.clone());
        }
        match geo::read(db, field, &self.limits) {
            Ok(t) => {
                let t = Arc::new(t);
                self.geo_tables.insert(key, t.clone());
                Some(t)
            }
            Err(e) => {
                self.error(pos, field_name, e.to_string());
                None
            }
        }
    }

    fn tenant_suspect(&mut self, node: &Node, field: &str) -> Option<TenantSuspect> {
        let fields = self.fields(node, field, SUSPECT_FIELDS);
        let get = |name: &str| fields.iter().find(|(k, ..)| *k == name).map(|(_, _, n)| *n);
        let blocked = match get("blocked") {
            Some(n) => self.int(n, &join(field, "blocked"), 1, 1_000_000),
            None => Some(50),
        };
        let window_s = match get("window") {
            Some(n) => self.duration(n, &join(field, "window"), 10, 86_400),
            None => Some(300),
        };
        let quarantine_s = match get("quarantine") {
            Some(n) => self.duration(n, &join(field, "quarantine"), 1, 30 * 86_400),
            None => Some(0),
        };
        Some(TenantSuspect { blocked: blocked? as u32, window_s: window_s?, quarantine_s: quarantine_s? })
    }

    fn smtp_commands(&mut self, node: &Node, field: &str, d: &mut Direction) {
        let mut bits = 0;
        for (key, _, value) in self.fields(node, field, SMTP_FIELDS) {
            let f = join(field, key);
            if key == "fragments" {
                if let Some(a) = self.action(value, &f) {
                    d.smtp_fragments = a;
                }
                continue;
            }
            for (i, item) in self.list(value, &f).iter().enumerate() {
                match self.one_of(item, &format!("{f}[{i}]"), &["VRFY", "EXPN"]) {
                    Some(0) => bits |= smtp_command::VRFY,
                    Some(_) => bits |= smtp_command::EXPN,
                    None => {}
                }
            }
        }
        d.smtp_block = bits;
    }
}

fn esc_pos(node: Option<&Node>, fallback: Pos) -> Pos {
    node.map(|n| n.pos).unwrap_or(fallback)
}

fn join(a: &str, b: &str) -> String {
    if a.is_empty() {
        b.to_owned()
    } else {
        format!("{a}.{b}")
    }
}

/// A CIDR or a single address; host bits must be clear.
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let net = match s.parse::<IpNet>() {
        Ok(n) => n,
        Err(_) => match s.parse::<IpAddr>() {
            Ok(a) => IpNet::from(a),
            Err(_) => return Err(format!("`{}` is not a CIDR; expected such as 192.0.2.0/24 or 2001:db8::/32", Quoted(s))),
        },
    };
    if net.network() != net.addr() {
        return Err(format!("`{s}` has host bits set; did you mean {}?", net.trunc()));
    }
    Ok(net)
}

/// Text from the input, cut short in messages: a list line can be
/// megabytes long.
struct Quoted<'a>(&'a str);

impl std::fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const SHOWN: usize = 60;
        match self.0.char_indices().nth(SHOWN) {
            Some((end, _)) => write!(f, "{}…", &self.0[..end]),
            None => f.write_str(self.0),
        }
    }
}

//! Each line of the event stream read once into bounded tables
//! ([`Summary`]), then the report's content ([`Report`], serde): what the
//! Markdown and the JSON forms both show.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use ipnet::IpNet;
use serde::Serialize;

use super::{
    heavy::SpaceSaving,
    line::{parse_time_ms, Fields},
    timeline::{Column, Earliest, Timeline},
};

/// Counters in each ranked table (sources, tenants, countries, bans): the
/// counts are exact while no more distinct keys come.
pub const TABLE_CAPACITY: usize = 4096;
/// Events kept in full in each list (notable events, suspects, reloads,
/// manual bans): the earliest; the rest are counted.
pub const LIST_LIMIT: usize = 200;
/// Unknown event kinds counted by name; further ones together.
const MAX_UNKNOWN_KINDS: usize = 64;
/// Reason and country names told apart (all tables together); further
/// ones count as `(other)`.
const MAX_LABELS: usize = 1024;
/// Reasons or countries kept per row; further ones count as `(other)`.
const MAX_PER_ROW: usize = 16;
/// Errors of a rejected reload kept.
const MAX_RELOAD_ERRORS: usize = 5;
/// Characters of an unknown event's line shown as its summary.
const RAW_SUMMARY_CHARS: usize = 240;
const OTHER_KINDS: &str = "(other kinds)";

/// The event kinds this version reads (`events::Event`'s tags); any other
/// kind is counted by name and listed with the notable events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    BanAdded,
    BanExpired,
    RateLimitTrip,
    DropSample,
    ManualBan,
    TenantSuspect,
    InterfaceAttached,
    InterfaceDetached,
    UplinkMissing,
    StalePin,
    Bypass,
    Rollback,
    ShadowDifference,
    PolicyReload,
    EnforceScheduled,
}

impl Kind {
    const ALL: [Kind; 15] = [
        Kind::BanAdded,
        Kind::BanExpired,
        Kind::RateLimitTrip,
        Kind::DropSample,
        Kind::ManualBan,
        Kind::TenantSuspect,
        Kind::InterfaceAttached,
        Kind::InterfaceDetached,
        Kind::UplinkMissing,
        Kind::StalePin,
        Kind::Bypass,
        Kind::Rollback,
        Kind::ShadowDifference,
        Kind::PolicyReload,
        Kind::EnforceScheduled,
    ];

    fn name(self) -> &'static str {
        match self {
            Kind::BanAdded => "ban_added",
            Kind::BanExpired => "ban_expired",
            Kind::RateLimitTrip => "rate_limit_trip",
            Kind::DropSample => "drop_sample",
            Kind::ManualBan => "manual_ban",
            Kind::TenantSuspect => "tenant_suspect",
            Kind::InterfaceAttached => "interface_attached",
            Kind::InterfaceDetached => "interface_detached",
            Kind::UplinkMissing => "uplink_missing",
            Kind::StalePin => "stale_pin",
            Kind::Bypass => "bypass",
            Kind::Rollback => "rollback",
            Kind::ShadowDifference => "shadow_difference",
            Kind::PolicyReload => "policy_reload",
            Kind::EnforceScheduled => "enforce_scheduled",
        }
    }

    fn of(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// Reason and country names, interned: rows hold small numbers.
struct Labels {
    names: Vec<Box<str>>,
    ids: HashMap<Box<str>, u16>,
}

/// The label of names past [`MAX_LABELS`] and [`MAX_PER_ROW`].
const OTHER: u16 = 0;

impl Labels {
    fn new() -> Self {
        Self { names: vec!["(other)".into()], ids: HashMap::new() }
    }

    fn id(&mut self, name: &str) -> u16 {
        if let Some(&id) = self.ids.get(name) {
            return id;
        }
        if self.names.len() >= MAX_LABELS {
            return OTHER;
        }
        let id = self.names.len() as u16;
        self.names.push(name.into());
        self.ids.insert(name.into(), id);
        id
    }

    fn name(&self, id: u16) -> &str {
        &self.names[id as usize]
    }
}

/// Counts per label, at most [`MAX_PER_ROW`] labels (and `(other)`).
#[derive(Default)]
struct LabelCounts(Vec<(u16, u64)>);

impl LabelCounts {
    fn add(&mut self, id: u16) {
        let id = if self.0.len() >= MAX_PER_ROW && !self.0.iter().any(|(l, _)| *l == id) { OTHER } else { id };
        match self.0.iter_mut().find(|(l, _)| *l == id) {
            Some((_, n)) => *n += 1,
            None => self.0.push((id, 1)),
        }
    }

    fn named(&self, labels: &Labels) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for (id, n) in &self.0 {
            *out.entry(labels.name(*id).to_owned()).or_insert(0) += n;
        }
        out
    }
}

/// What a ranked source's counter holds besides its count.
#[derive(Default)]
struct Tally {
    reasons: LabelCounts,
    countries: LabelCounts,
}

/// What a banned source's counter holds.
#[derive(Default)]
struct BanTally {
    added: u64,
    manual: u64,
    expired: u64,
    escalations: u64,
    max_strikes: u64,
    longest_s: u64,
    first_ms: Option<i64>,
    last_ms: Option<i64>,
}

/// The whole stream, read line by line into bounded state.
pub struct Summary {
    since_ms: Option<i64>,
    period: Period,
    first_ms: Option<i64>,
    last_ms: Option<i64>,
    kinds: [u64; Kind::ALL.len()],
    unknown: BTreeMap<String, u64>,
    timeline: Timeline,
    notable: Earliest<Notable>,
    /// Reason and country names, each their own room: junk reasons never
    /// push real countries out.
    reason_labels: Labels,
    country_labels: Labels,
    drops: Drops,
    sources: SpaceSaving<IpAddr, Tally>,
    tenants: SpaceSaving<IpAddr, Tally>,
    countries: SpaceSaving<u16, ()>,
    bans: SpaceSaving<IpNet, BanTally>,
    ban_totals: BanTotals,
    manual_bans: Earliest<ManualBan>,
    suspects: Earliest<Suspect>,
    reloads: Earliest<Reload>,
    reloads_ok: u64,
    reloads_rejected: u64,
}

impl Summary {
    /// A summary of events at or after `since_ms` (ms since 1970), or of all.
    pub fn new(since_ms: Option<i64>) -> Self {
        Self {
            since_ms,
            period: Period::default(),
            first_ms: None,
            last_ms: None,
            kinds: [0; Kind::ALL.len()],
            unknown: BTreeMap::new(),
            timeline: Timeline::default(),
            notable: Earliest::new(LIST_LIMIT),
            reason_labels: Labels::new(),
            country_labels: Labels::new(),
            drops: Drops::default(),
            sources: SpaceSaving::new(TABLE_CAPACITY),
            tenants: SpaceSaving::new(TABLE_CAPACITY),
            countries: SpaceSaving::new(TABLE_CAPACITY),
            bans: SpaceSaving::new(TABLE_CAPACITY),
            ban_totals: BanTotals::default(),
            manual_bans: Earliest::new(LIST_LIMIT),
            suspects: Earliest::new(LIST_LIMIT),
            reloads: Earliest::new(LIST_LIMIT),
            reloads_ok: 0,
            reloads_rejected: 0,
        }
    }

    /// A line cut off at [`super::line::MAX_LINE`].
    pub fn too_long(&mut self) {
        self.period.lines_read += 1;
        self.period.skipped.too_long += 1;
    }

    /// One line (without its newline).
    pub fn line(&mut self, bytes: &[u8]) {
        self.period.lines_read += 1;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            self.period.blank_lines += 1;
            return;
        }
        match serde_json::from_slice::<Fields>(bytes) {
            Ok(f) => self.fields(&f, bytes),
            Err(_) => self.lenient(bytes),
        }
    }

    /// A line the typed read refused: an unknown kind whose fields have
    /// other types than the known kinds' (counted by kind), or garbage.
    fn lenient(&mut self, bytes: &[u8]) {
        let value: Option<serde_json::Value> = serde_json::from_slice(bytes).ok();
        // Clipped as the typed read clips it.
        let kind = value.as_ref().and_then(|v| v.get("event")).and_then(|k| k.as_str()).map(|k| crate::report::line::Text::clipped(std::borrow::Cow::Borrowed(k)));
        match kind.as_deref() {
            Some(kind) if Kind::of(kind).is_none() => {
                let time = value.as_ref().and_then(|v| v.get("time")).and_then(|t| t.as_str()).unwrap_or_default();
                if let Some(ms) = self.admit(time) {
                    self.unknown_kind(kind, ms, bytes);
                }
            }
            _ => self.period.skipped.unparsable += 1,
        }
    }

    /// The time of an event if it is to be counted: a readable time at or
    /// after `--since`. Counts it as read, or as skipped.
    fn admit(&mut self, time: &str) -> Option<i64> {
        let Some(ms) = parse_time_ms(time) else {
            self.period.skipped.undated += 1;
            return None;
        };
        if self.since_ms.is_some_and(|since| ms < since) {
            self.period.skipped.before_since += 1;
            return None;
        }
        self.period.events += 1;
        self.first_ms = Some(self.first_ms.map_or(ms, |f| f.min(ms)));
        self.last_ms = Some(self.last_ms.map_or(ms, |l| l.max(ms)));
        Some(ms)
    }

    fn fields(&mut self, f: &Fields, bytes: &[u8]) {
        let time = f.time.as_deref().unwrap_or_default();
        let Some(ms) = self.admit(time) else { return };
        let Some(kind) = Kind::of(&f.event) else {
            self.unknown_kind(&f.event, ms, bytes);
            return;
        };
        self.kinds[Kind::ALL.iter().position(|k| *k == kind).unwrap_or(0)] += 1;
        let column = match kind {
            Kind::DropSample => self.drop_sample(f),
            Kind::BanAdded => self.ban_added(f, ms),
            Kind::BanExpired => self.ban_expired(f, ms),
            Kind::RateLimitTrip => {
                self.ban_totals.rate_trips += 1;
                Column::RateTrip
            }
            Kind::ManualBan => self.manual_ban(f, ms),
            Kind::TenantSuspect => self.tenant_suspect(f, ms),
            Kind::PolicyReload => self.policy_reload(f, ms),
            Kind::UplinkMissing => {
                let interface = f.interface.as_deref().unwrap_or("?").to_owned();
                self.notable.offer(ms, || Notable::new(ms, kind.name(), format!("uplink {interface} is missing: mail arriving on it is not judged until it is back")));
                Column::Other
            }
            Kind::Bypass => {
                let summary = bypass_summary(f);
                self.notable.offer(ms, || Notable::new(ms, kind.name(), summary));
                Column::Other
            }
            Kind::Rollback => {
                let by = f.by.as_deref().unwrap_or("?");
                let summary = match (&f.error, f.to_generation) {
                    (Some(e), _) => format!("rollback by {by} refused, nothing changed: {}", e.0),
                    (None, to) => format!(
                        "rollback by {by} to the policy of generation {}{}: {} file(s) restored",
                        to.map_or_else(|| "?".into(), |g| g.to_string()),
                        f.known_good.map_or_else(String::new, |n| format!(" (known-good #{n})")),
                        f.restored.len()
                    ),
                };
                self.notable.offer(ms, || Notable::new(ms, kind.name(), summary));
                Column::Other
            }
            Kind::EnforceScheduled => {
                let summary = format!(
                    "{} leaves monitor mode and enforces from {} ({} h ahead)",
                    f.direction.as_deref().unwrap_or("?"),
                    f.enforce_from.as_deref().unwrap_or("?"),
                    f.hours_left.map_or_else(|| "?".into(), |h| format!("{h:.1}"))
                );
                self.notable.offer(ms, || Notable::new(ms, kind.name(), summary));
                Column::Other
            }
            // Sampled packets of a candidate under test: counted by kind
            // (and in the timeline), `smtpguard shadow` has the breakdown.
            Kind::ShadowDifference | Kind::InterfaceAttached | Kind::InterfaceDetached | Kind::StalePin => Column::Other,
        };
        self.timeline.count(ms, column);
    }

    fn unknown_kind(&mut self, kind: &str, ms: i64, bytes: &[u8]) {
        let known = self.unknown.len() < MAX_UNKNOWN_KINDS || self.unknown.contains_key(kind);
        *self.unknown.entry(if known { kind } else { OTHER_KINDS }.to_owned()).or_insert(0) += 1;
        self.timeline.count(ms, Column::Other);
        self.notable.offer(ms, || {
            let raw = String::from_utf8_lossy(bytes);
            let mut summary: String = raw.chars().take(RAW_SUMMARY_CHARS).collect();
            if summary.len() < raw.len() {
                summary.push('…');
            }
            Notable::new(ms, kind, summary)
        });
    }

    fn drop_sample(&mut self, f: &Fields) -> Column {
        self.drops.samples += 1;
        match f.verdict.as_deref() {
            Some("drop") => self.drops.dropped += 1,
            Some("would_drop") => self.drops.would_drop += 1,
            _ => {
                self.drops.other_verdicts += 1;
                return Column::Other;
            }
        }
        let reason = self.reason_labels.id(f.reason.as_deref().unwrap_or("(none)"));
        let country = f.country.as_deref().map(|c| self.country_labels.id(c));
        match country {
            Some(c) => {
                self.countries.add(&c);
            }
            None => self.drops.no_country += 1,
        }
        let Some(src) = f.src.as_deref().and_then(|s| s.parse::<IpAddr>().ok()) else {
            self.drops.no_source += 1;
            return Column::Drop;
        };
        let table = if f.direction.as_deref() == Some("egress") { &mut self.tenants } else { &mut self.sources };
        let tally = table.add(&src);
        tally.reasons.add(reason);
        if let Some(c) = country {
            tally.countries.add(c);
        }
        Column::Drop
    }

    fn ban_added(&mut self, f: &Fields, ms: i64) -> Column {
        let strikes = f.strikes.unwrap_or(1);
        let duration = f.duration_s.unwrap_or(0);
        self.ban_totals.added += 1;
        if strikes > 1 {
            self.ban_totals.escalations += 1;
        }
        let src = f.src.as_deref().unwrap_or("?");
        if let Ok(addr) = src.parse::<IpAddr>() {
            let b = self.bans.add(&IpNet::from(addr));
            b.added += 1;
            b.max_strikes = b.max_strikes.max(strikes);
            b.longest_s = b.longest_s.max(duration);
            if strikes > 1 {
                b.escalations += 1;
            }
            b.seen(ms);
        }
        if strikes > 1 {
            let count = f.count.unwrap_or(0);
            let summary = format!("{src} banned again, strike {strikes}: {} ({count} new connections in the minute)", duration_text(duration));
            self.notable.offer(ms, || Notable::new(ms, Kind::BanAdded.name(), summary));
        }
        Column::Ban
    }

    fn ban_expired(&mut self, f: &Fields, ms: i64) -> Column {
        self.ban_totals.expired += 1;
        if let Some(addr) = f.src.as_deref().and_then(|s| s.parse::<IpAddr>().ok()) {
            let b = self.bans.add(&IpNet::from(addr));
            b.expired += 1;
            b.seen(ms);
        }
        Column::Other
    }

    fn manual_ban(&mut self, f: &Fields, ms: i64) -> Column {
        self.ban_totals.manual += 1;
        let source = f.source.as_deref().unwrap_or("?");
        let duration = f.duration_s.unwrap_or(0);
        let net = source.parse::<IpNet>().ok().or_else(|| source.parse::<IpAddr>().ok().map(IpNet::from));
        if let Some(net) = net {
            let b = self.bans.add(&net);
            b.manual += 1;
            b.longest_s = b.longest_s.max(duration);
            b.seen(ms);
        }
        let reason = f.reason.as_deref().map(str::to_owned);
        let summary = format!("{source} banned by an operator for {}{}", duration_text(duration), reason.as_ref().map(|r| format!(": {r}")).unwrap_or_default());
        self.notable.offer(ms, || Notable::new(ms, Kind::ManualBan.name(), summary));
        self.manual_bans.offer(ms, || ManualBan { time: time_text(ms), source: source.to_owned(), duration_s: duration, reason });
        Column::Ban
    }

    fn tenant_suspect(&mut self, f: &Fields, ms: i64) -> Column {
        let s = Suspect {
            time: time_text(ms),
            interface: f.interface.as_deref().unwrap_or("?").to_owned(),
            src: f.src.as_deref().unwrap_or("?").to_owned(),
            blocked: f.blocked.unwrap_or(0),
            window_s: f.window_s.unwrap_or(0),
            quarantine_s: f.quarantine_s.unwrap_or(0),
        };
        let quarantine = if s.quarantine_s > 0 { format!("quarantined for {}", duration_text(s.quarantine_s)) } else { "reported only".to_owned() };
        let summary = format!("{} on {}: {} blocked in {}; {quarantine}", s.src, s.interface, s.blocked, duration_text(s.window_s));
        self.notable.offer(ms, || Notable::new(ms, Kind::TenantSuspect.name(), summary));
        self.suspects.offer(ms, || s);
        Column::Suspect
    }

    fn policy_reload(&mut self, f: &Fields, ms: i64) -> Column {
        let result = f.result.as_deref().unwrap_or("?");
        // Only what says so was applied; a result this version does not
        // know is listed, not counted as applied.
        match result {
            "ok" => self.reloads_ok += 1,
            "rejected" => self.reloads_rejected += 1,
            _ => {}
        }
        let r = Reload {
            time: time_text(ms),
            result: result.to_owned(),
            trigger: f.trigger.as_deref().unwrap_or("?").to_owned(),
            generation: f.generation.unwrap_or(0),
            entries: f.entries,
            policy: f.policy.as_deref().map(str::to_owned),
            sha256: f.sha256.as_deref().map(str::to_owned),
            changed_by: f.changed_by.as_deref().map(str::to_owned),
            // A few errors say what went wrong; the rest are counted.
            errors: f.errors.iter().take(MAX_RELOAD_ERRORS).map(|e| e.to_string()).collect(),
            more_errors: f.more_errors.unwrap_or(0).saturating_add(f.errors.len().saturating_sub(MAX_RELOAD_ERRORS) as u64),
        };
        let mut summary = format!("{} ({}), generation {}", r.result, r.trigger, r.generation);
        if let Some(p) = &r.policy {
            summary += &format!(", {p}");
        }
        if let Some(sha) = &r.sha256 {
            summary += &format!(" sha256 {}", short_sha(sha));
        }
        if let Some(by) = &r.changed_by {
            summary += &format!(" by {by}");
        }
        if let Some(e) = r.errors.first() {
            summary += &format!(": {e}");
        }
        self.notable.offer(ms, || Notable::new(ms, Kind::PolicyReload.name(), summary));
        self.reloads.offer(ms, || r);
        Column::Reload
    }

    /// The report: `top` rows of each ranked table.
    pub fn finish(self, top: usize, files: Vec<String>, since: Option<String>) -> Report {
        let (reason_labels, country_labels) = (&self.reason_labels, &self.country_labels);
        let source_rows = |t: &SpaceSaving<IpAddr, Tally>| Ranked {
            total: t.total(),
            capacity: t.capacity(),
            tracked: t.len(),
            exact: t.evictions() == 0,
            rows: t
                .top(top)
                .into_iter()
                .map(|e| SourceRow {
                    source: e.key.to_string(),
                    drops: e.count,
                    overcount: e.error,
                    exact: e.error == 0,
                    reasons: e.detail.reasons.named(reason_labels),
                    countries: e.detail.countries.named(country_labels),
                })
                .collect(),
        };
        let countries = Ranked {
            total: self.countries.total(),
            capacity: self.countries.capacity(),
            tracked: self.countries.len(),
            exact: self.countries.evictions() == 0,
            rows: self
                .countries
                .top(top)
                .into_iter()
                .map(|e| CountryRow { country: country_labels.name(*e.key).to_owned(), drops: e.count, overcount: e.error, exact: e.error == 0 })
                .collect(),
        };
        let bans = Ranked {
            total: self.bans.total(),
            capacity: self.bans.capacity(),
            tracked: self.bans.len(),
            exact: self.bans.evictions() == 0,
            rows: self
                .bans
                .top(top)
                .into_iter()
                .map(|e| {
                    let b = e.detail;
                    let host = (e.key.prefix_len() == e.key.max_prefix_len()).then(|| e.key.addr().to_string());
                    BanRow {
                        source: host.unwrap_or_else(|| e.key.to_string()),
                        events: e.count,
                        overcount: e.error,
                        exact: e.error == 0,
                        added: b.added,
                        manual: b.manual,
                        expired: b.expired,
                        escalations: b.escalations,
                        max_strikes: b.max_strikes,
                        longest_s: b.longest_s,
                        first: b.first_ms.map(time_text),
                        last: b.last_ms.map(time_text),
                    }
                })
                .collect(),
        };
        let mut events = BTreeMap::new();
        for (kind, n) in Kind::ALL.iter().zip(self.kinds) {
            if n > 0 {
                events.insert(kind.name().to_owned(), n);
            }
        }
        let timeline = TimelineReport {
            bucket_s: self.timeline.width_s(),
            buckets: self
                .timeline
                .buckets()
                .into_iter()
                .map(|(start, c)| Bucket { start: time_text(start * 1000), events: c.events, drops: c.drops, bans: c.bans, rate_trips: c.rate_trips, reloads: c.reloads, suspects: c.suspects })
                .collect(),
        };
        let mut period = self.period;
        period.first = self.first_ms.map(time_text);
        period.last = self.last_ms.map(time_text);
        Report {
            generated: crate::clock::now_rfc3339(),
            files,
            since,
            period,
            events,
            unknown_kinds: self.unknown,
            timeline,
            notable: self.notable.into(),
            drops: self.drops,
            sources: source_rows(&self.sources),
            countries,
            bans: BansReport { totals: self.ban_totals, by_source: bans, manual: self.manual_bans.into() },
            tenants: TenantsReport { drops: source_rows(&self.tenants), suspects: self.suspects.into() },
            reloads: ReloadsReport { ok: self.reloads_ok, rejected: self.reloads_rejected, events: self.reloads.into() },
        }
    }
}

/// What a `bypass` event says: enforcement off or on again, who, why.
fn bypass_summary(f: &Fields) -> String {
    let by = f.by.as_deref().map(|b| format!(" by {b}")).unwrap_or_default();
    let reason = f.reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default();
    match (f.state.as_deref(), f.trigger.as_deref()) {
        (Some("on"), Some("start")) => format!("enforcement still OFF at start (bypass on{by}){reason}; drops pass as would_drop"),
        (Some("on"), _) => format!("enforcement switched OFF (bypass on{by}){reason}; drops pass as would_drop"),
        (Some("off"), _) => format!("enforcement back on (bypass off{by}){reason}"),
        (state, _) => format!("bypass {}{by}{reason}", state.unwrap_or("?")),
    }
}

impl BanTally {
    fn seen(&mut self, ms: i64) {
        self.first_ms = Some(self.first_ms.map_or(ms, |f| f.min(ms)));
        self.last_ms = Some(self.last_ms.map_or(ms, |l| l.max(ms)));
    }
}

/// RFC 3339 of ms since 1970.
fn time_text(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).map(crate::clock::rfc3339).unwrap_or_else(|_| format!("{ms} ms"))
}

/// `90` as `1m30s`, `86400` as `1d`.
pub fn duration_text(s: u64) -> String {
    if s == 0 {
        return "0s".into();
    }
    let parts = [(s / 86_400, "d"), (s / 3600 % 24, "h"), (s / 60 % 60, "m"), (s % 60, "s")];
    parts.iter().filter(|(n, _)| *n > 0).map(|(n, unit)| format!("{n}{unit}")).collect()
}

/// The first 12 hex digits of a SHA-256, as in `git log --abbrev`.
pub fn short_sha(sha: &str) -> &str {
    sha.get(..12).unwrap_or(sha)
}

// ---- What the report says (the JSON form is this, as serde writes it).

#[derive(Debug, Serialize)]
pub struct Report {
    /// When the report was made.
    pub generated: String,
    /// The files read, in order (`-` is stdin).
    pub files: Vec<String>,
    /// Events before this were skipped.
    pub since: Option<String>,
    pub period: Period,
    /// Events counted, by kind (known kinds).
    pub events: BTreeMap<String, u64>,
    /// Events of kinds this version does not know, by kind.
    pub unknown_kinds: BTreeMap<String, u64>,
    pub timeline: TimelineReport,
    /// Escalated bans, manual bans, tenant suspects, reloads, missing uplinks, bypass switches and unknown kinds, in time order.
    pub notable: Listed<Notable>,
    pub drops: Drops,
    /// Outside sources by sampled drops (ingress).
    pub sources: Ranked<SourceRow>,
    /// Sampled drops by the peer's country.
    pub countries: Ranked<CountryRow>,
    pub bans: BansReport,
    pub tenants: TenantsReport,
    pub reloads: ReloadsReport,
}

#[derive(Debug, Default, Serialize)]
pub struct Period {
    /// The earliest and latest event counted.
    pub first: Option<String>,
    pub last: Option<String>,
    pub lines_read: u64,
    pub blank_lines: u64,
    pub skipped: Skipped,
    /// Events counted (lines read less blank and skipped ones).
    pub events: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct Skipped {
    /// Not JSON, or a known kind with fields of the wrong type.
    pub unparsable: u64,
    /// Longer than 64 KiB.
    pub too_long: u64,
    /// Without a readable `time`.
    pub undated: u64,
    /// Older than `--since`.
    pub before_since: u64,
}

#[derive(Debug, Serialize)]
pub struct TimelineReport {
    pub bucket_s: i64,
    pub buckets: Vec<Bucket>,
}

#[derive(Debug, Serialize)]
pub struct Bucket {
    pub start: String,
    pub events: u64,
    pub drops: u64,
    /// `ban_added` and `manual_ban`.
    pub bans: u64,
    pub rate_trips: u64,
    pub reloads: u64,
    pub suspects: u64,
}

/// The earliest [`LIST_LIMIT`] items, and how many more there were.
#[derive(Debug, Serialize)]
pub struct Listed<T> {
    pub shown: Vec<T>,
    pub omitted: u64,
}

impl<T> From<Earliest<T>> for Listed<T> {
    fn from(e: Earliest<T>) -> Self {
        let (shown, omitted) = e.finish();
        Self { shown, omitted }
    }
}

#[derive(Debug, Serialize)]
pub struct Notable {
    pub time: String,
    pub event: String,
    pub summary: String,
}

impl Notable {
    /// Its time in UTC, however the file wrote it (rows sort by it).
    fn new(ms: i64, event: &str, summary: String) -> Self {
        Self { time: time_text(ms), event: event.to_owned(), summary }
    }
}

#[derive(Debug, Default, Serialize)]
pub struct Drops {
    /// `drop_sample` events.
    pub samples: u64,
    /// Of which `drop`, and `would_drop` (monitor mode).
    pub dropped: u64,
    pub would_drop: u64,
    /// Of which another verdict (not counted as drops).
    pub other_verdicts: u64,
    /// Drops without a readable `src`, or a `country`.
    pub no_source: u64,
    pub no_country: u64,
}

/// A heavy-hitters table: the top rows by count.
#[derive(Debug, Serialize)]
pub struct Ranked<R> {
    /// Occurrences counted into the table.
    pub total: u64,
    /// Counters, and how many are in use.
    pub capacity: usize,
    pub tracked: usize,
    /// No key ever took over another's counter: every count is exact.
    pub exact: bool,
    pub rows: Vec<R>,
}

#[derive(Debug, Serialize)]
pub struct SourceRow {
    pub source: String,
    pub drops: u64,
    /// The most `drops` can be over the truth (0: exact; reasons and
    /// countries then count every drop, otherwise those since it was
    /// tracked again).
    pub overcount: u64,
    pub exact: bool,
    pub reasons: BTreeMap<String, u64>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub countries: BTreeMap<String, u64>,
}

#[derive(Debug, Serialize)]
pub struct CountryRow {
    pub country: String,
    pub drops: u64,
    pub overcount: u64,
    pub exact: bool,
}

#[derive(Debug, Serialize)]
pub struct BansReport {
    pub totals: BanTotals,
    pub by_source: Ranked<BanRow>,
    pub manual: Listed<ManualBan>,
}

#[derive(Debug, Default, Serialize)]
pub struct BanTotals {
    pub added: u64,
    /// Bans added with strikes > 1.
    pub escalations: u64,
    pub expired: u64,
    pub manual: u64,
    pub rate_trips: u64,
}

#[derive(Debug, Serialize)]
pub struct BanRow {
    /// An address, or a network (manual bans).
    pub source: String,
    /// Ban events counted for it (added, manual, expired).
    pub events: u64,
    pub overcount: u64,
    pub exact: bool,
    pub added: u64,
    pub manual: u64,
    pub expired: u64,
    /// Bans added with strikes > 1.
    pub escalations: u64,
    pub max_strikes: u64,
    pub longest_s: u64,
    pub first: Option<String>,
    pub last: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ManualBan {
    pub time: String,
    pub source: String,
    pub duration_s: u64,
    pub reason: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct TenantsReport {
    /// Tenant sources by sampled egress drops (blocked outbound attempts).
    pub drops: Ranked<SourceRow>,
    pub suspects: Listed<Suspect>,
}

#[derive(Debug, Serialize)]
pub struct Suspect {
    pub time: String,
    pub interface: String,
    pub src: String,
    pub blocked: u64,
    pub window_s: u64,
    pub quarantine_s: u64,
}

#[derive(Debug, Serialize)]
pub struct ReloadsReport {
    pub ok: u64,
    pub rejected: u64,
    pub events: Listed<Reload>,
}

#[derive(Debug, Serialize)]
pub struct Reload {
    pub time: String,
    pub result: String,
    pub trigger: String,
    pub generation: u64,
    pub entries: Option<u64>,
    pub policy: Option<String>,
    pub sha256: Option<String>,
    pub changed_by: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
    #[serde(skip_serializing_if = "is_zero")]
    pub more_errors: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[cfg(test)]
pub(super) fn kind_names() -> Vec<&'static str> {
    Kind::ALL.iter().map(|k| k.name()).collect()
}

//! Events as JSON lines a SOC can ship as they are: one typed enum,
//! serialised with serde, whose JSON Schema (`smtpguard schema --events`,
//! `docs/events.schema.json`) is derived from the same definition.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use policy_common::{direction, event_kind, reason, verdict};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{clock, policy::Compiled};

/// One line of the event stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The datapath banned a source whose new connections went over the
    /// policy's threshold (or a repeat offender again, escalated).
    BanAdded {
        #[serde(flatten)]
        packet: Packet,
        /// SYNs counted in the sliding minute when the ban started.
        count: u32,
        duration_s: u32,
        /// Bans of this source so far, this one included.
        strikes: u32,
    },
    /// A source's ban ran out; seen on the source's next packet.
    BanExpired {
        #[serde(flatten)]
        packet: Packet,
    },
    /// A source began to be rate limited after admitted connections.
    RateLimitTrip {
        #[serde(flatten)]
        packet: Packet,
    },
    /// A sampled drop (one in `events.drop_sample_one_in`).
    DropSample {
        #[serde(flatten)]
        packet: Packet,
    },
    /// An operator banned a source or network (`smtpguard ban`).
    ManualBan {
        time: String,
        /// The address or network banned.
        source: String,
        duration_s: u64,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        reason: Option<String>,
    },
    /// A source behind a tenant interface had more new connections blocked
    /// in a window than the policy's `tenant_suspect.blocked`: the classic
    /// sign of a compromised VM. Once per episode.
    TenantSuspect {
        time: String,
        /// The tenant interface it sends from.
        interface: String,
        src: IpAddr,
        /// Blocked new connections in the window.
        blocked: u32,
        window_s: u32,
        /// How long it is banned on every guarded port (0: reported only).
        quarantine_s: u32,
    },
    /// smtpguard attached to an interface (at start, or as it appeared).
    InterfaceAttached {
        time: String,
        interface: String,
        /// `uplink` or `tenant`.
        role: String,
        ifindex: u32,
    },
    /// An interface went away (a VM stopped) or is no longer selected.
    InterfaceDetached { time: String, interface: String, role: String, why: String },
    /// A named uplink is gone: nothing judges mail arriving on it until it
    /// comes back (it is attached again then).
    UplinkMissing { time: String, interface: String },
    /// A link pin of an earlier run was stale (its interface deleted or
    /// recreated) and was replaced.
    StalePin { time: String, pin: String, why: String },
    /// Enforcement was switched off (`smtpguard bypass on`: every direction
    /// judges as in monitor mode, drops pass as `would_drop`) or back on;
    /// said again at each start while it stays off.
    Bypass {
        time: String,
        /// `on` (enforcement off) or `off` (enforcing again).
        state: String,
        /// Since when it is bypassed (`on` only).
        #[serde(skip_serializing_if = "Option::is_none", default)]
        since: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        by: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        reason: Option<String>,
        /// `command` (seen switched) or `start` (found switched at start).
        trigger: String,
    },
    /// The shadow policy (`run --shadow`) would have decided this packet
    /// differently (sampled like drops). `verdict`, `reason` and `rule` are
    /// the policy in force's (before monitor mode).
    ShadowDifference {
        #[serde(flatten)]
        packet: Packet,
        /// `pass` or `drop`.
        shadow_verdict: String,
        /// A counter reason, or `not_guarded` (the candidate does not guard the port).
        shadow_reason: String,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        shadow_rule: Option<String>,
        /// The candidate's file.
        shadow_policy: String,
    },
    /// A direction in monitor mode switches to enforce at `enforce_from`
    /// (the policy's schedule): said once, a day ahead.
    EnforceScheduled {
        time: String,
        direction: String,
        /// The day (00:00 UTC) it starts to enforce.
        enforce_from: String,
        hours_left: f64,
    },
    /// `smtpguard rollback`: a known-good policy's files were put back (a
    /// `policy_reload` with trigger `rollback` follows), or the rollback
    /// was refused and nothing changed (`error`).
    Rollback {
        time: String,
        /// The known-good snapshot (its number in `rollback --list`), when
        /// one was named or found.
        #[serde(skip_serializing_if = "Option::is_none", default)]
        known_good: Option<u64>,
        /// The generation whose policy was put back (none when refused).
        #[serde(skip_serializing_if = "Option::is_none", default)]
        to_generation: Option<u64>,
        by: String,
        /// Files whose contents were put back.
        restored: Vec<String>,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        error: Option<String>,
    },
    /// A policy was applied (start, restart, reload) or refused.
    PolicyReload {
        time: String,
        result: ReloadResult,
        /// What asked for it: `start`, `restart`, `SIGHUP`, `file change`, `exemption expiry`, `enforce_from`,
        /// `rollback`, `promote`, `shadow ...` (the shadow policy's own reloads).
        trigger: String,
        /// The policy generation in force afterwards.
        generation: u64,
        /// Map entries of the policy applied.
        #[serde(skip_serializing_if = "Option::is_none", default)]
        entries: Option<usize>,
        /// Why it was refused (the first errors of each kind).
        #[serde(skip_serializing_if = "Vec::is_empty", default)]
        errors: Vec<String>,
        /// Errors left out of `errors`.
        #[serde(skip_serializing_if = "is_zero", default)]
        more_errors: usize,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        duration_ms: Option<f64>,
        /// The policy file read (applied or refused).
        #[serde(skip_serializing_if = "Option::is_none", default)]
        policy: Option<String>,
        /// SHA-256 of that file's bytes.
        #[serde(skip_serializing_if = "Option::is_none", default)]
        sha256: Option<String>,
        /// Who last wrote it: the file's owner, or `fleet revision N`.
        #[serde(skip_serializing_if = "Option::is_none", default)]
        changed_by: Option<String>,
    },
}

/// The `policy`, `sha256` and `changed_by` of a `policy_reload` event for
/// the file at `path` (a fleet revision's when `revision`).
pub fn policy_identity(path: &std::path::Path, revision: Option<i64>) -> (Option<String>, Option<String>, Option<String>) {
    use std::os::unix::fs::MetadataExt;
    let sha = std::fs::read(path).ok().map(|b| crate::controller::sha256_hex(&b));
    let by = match revision {
        Some(rev) => Some(format!("fleet revision {rev}")),
        None => std::fs::metadata(path).ok().map(|m| user_name(m.uid())),
    };
    (Some(path.display().to_string()), sha, by)
}

/// The name /etc/passwd gives `uid`, or `uid N`.
fn user_name(uid: u32) -> String {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    passwd
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() > 2 && f[2] == uid.to_string()).then(|| f[0].to_owned())
        })
        .unwrap_or_else(|| format!("uid {uid}"))
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReloadResult {
    Ok,
    Rejected,
}

/// The packet a datapath event is about, and what the datapath decided.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Packet {
    /// RFC 3339 UTC, when the datapath saw it.
    pub time: String,
    /// `ingress` or `egress`: the policy direction that judged it.
    pub direction: String,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    /// The guarded port it was judged as.
    pub port: Option<u16>,
    /// Why (a counter reason such as `deny_acl`, `rate_ban`, or `ban_expired`).
    pub reason: Option<String>,
    /// `pass`, `drop` or `would_drop` (monitor mode).
    pub verdict: Option<String>,
    /// The id of the rule that decided, when one did.
    pub rule: Option<String>,
    /// The peer's country, when the policy has a geo-fence.
    pub country: Option<String>,
}

impl Event {
    /// A datapath event, with rule ids, countries and ports named by the
    /// policy in force (`ports` by slot).
    pub fn from_datapath(e: &policy_common::Event, compiled: &Compiled, ports: &[u16]) -> Self {
        let mut packet = Packet::from_datapath(e, compiled, ports);
        match e.kind {
            event_kind::BAN_ADDED => Event::BanAdded { packet, count: e.count, duration_s: e.duration_s, strikes: e.strikes as u32 },
            event_kind::BAN_EXPIRED => {
                packet.reason = Some("ban_expired".into());
                Event::BanExpired { packet }
            }
            event_kind::RATE_TRIP => {
                packet.reason = Some("rate_limited".into());
                Event::RateLimitTrip { packet }
            }
            _ => Event::DropSample { packet },
        }
    }

    /// A datapath `SHADOW_DIFF` event, named by the policy in force and the
    /// shadow's record.
    pub fn shadow_difference(e: &policy_common::Event, compiled: &Compiled, ports: &[u16], shadow: &crate::shadow::ShadowRecord) -> Self {
        let mut packet = Packet::from_datapath(e, compiled, ports);
        // Before monitor mode, as the shadow compares them.
        packet.verdict = verdict::NAMES.get(e.verdict as usize).map(|s| (*s).to_owned());
        let (v, r) = ((e.duration_s & 0xff) as u8, ((e.duration_s >> 8) & 0xff) as u8);
        let decision = crate::shadow::decision(v, r);
        let (shadow_verdict, shadow_reason) = decision.split_once('/').map(|(a, b)| (a.to_owned(), b.to_owned())).unwrap_or_default();
        let rule = shadow.rule(e.count);
        Event::ShadowDifference {
            packet,
            shadow_verdict,
            shadow_reason,
            shadow_rule: (rule != "-").then(|| rule.to_owned()),
            shadow_policy: shadow.file.display().to_string(),
        }
    }

    /// One JSON line.
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"event\":\"unserialisable\",\"error\":\"{e}\"}}"))
    }
}

impl Packet {
    /// What a datapath event says of its packet, named by the policy.
    pub fn from_datapath(e: &policy_common::Event, compiled: &Compiled, ports: &[u16]) -> Self {
        let name = |names: &[&'static str], i: u8| names.get(i as usize).map(|s| (*s).to_owned());
        Packet {
            time: clock::rfc3339(clock::wall_time_of(e.ktime_ns)),
            direction: name(&direction::NAMES, e.direction).unwrap_or_else(|| "unknown".into()),
            src: addr(e.family, e.src_octets()),
            dst: addr(e.family, e.dst_octets()),
            sport: e.sport,
            dport: e.dport,
            port: ports.get(e.port_slot as usize).copied(),
            reason: name(&reason::NAMES, e.reason),
            verdict: name(&verdict::NAMES, e.verdict),
            rule: compiled.rule_slot(e.rule).map(|r| r.id.to_string()),
            country: compiled.country(e.country as u32).map(str::to_owned),
        }
    }
}

fn addr(family: u8, octets: [u8; 16]) -> IpAddr {
    if family == 6 {
        IpAddr::V6(Ipv6Addr::from(octets))
    } else {
        IpAddr::V4(Ipv4Addr::new(octets[0], octets[1], octets[2], octets[3]))
    }
}

/// The JSON Schema of an event line.
pub fn schema() -> serde_json::Value {
    let mut schema = serde_json::to_value(schemars::schema_for!(Event)).expect("a schema serialises");
    schema["title"] = "smtpguard event".into();
    schema["description"] = "One line of the event stream (smtpguard run --events FILE, or stdout)".into();
    schema
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_name_their_kind_and_read_back() {
        let e = Event::PolicyReload {
            time: "2026-12-06T00:00:00.000Z".into(),
            result: ReloadResult::Rejected,
            trigger: "SIGHUP".into(),
            generation: 3,
            entries: None,
            errors: vec!["policy.yaml:3: bad".into()],
            more_errors: 0,
            duration_ms: Some(1.5),
            policy: None,
            sha256: None,
            changed_by: None,
        };
        let line = e.to_line();
        assert!(line.starts_with("{\"event\":\"policy_reload\""), "{line}");
        assert!(!line.contains("more_errors") && !line.contains("entries"), "{line}");
        assert_eq!(serde_json::from_str::<Event>(&line).unwrap(), e);
    }

    #[test]
    fn the_documented_schema_is_the_derived_one() {
        let documented: serde_json::Value =
            serde_json::from_str(include_str!("../../docs/events.schema.json")).expect("docs/events.schema.json parses");
        assert_eq!(documented, schema(), "regenerate it: smtpguard schema --events > docs/events.schema.json");
    }
}

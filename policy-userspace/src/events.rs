//! Events as JSON lines a SOC can ship as they are.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use policy_common::{direction, event_kind, reason, verdict, Event};
use serde_json::{json, Value};

use crate::{dataplane::ktime_now_ns, policy::Compiled};

/// RFC 3339 UTC time of a Unix time in nanoseconds.
pub fn rfc3339(unix_ns: u128) -> String {
    let secs = (unix_ns / 1_000_000_000) as i64;
    let millis = (unix_ns / 1_000_000 % 1000) as u32;
    let day = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    format!("{}T{:02}:{:02}:{:02}.{millis:03}Z", crate::policy::time::format_date(day), rem / 3600, rem / 60 % 60, rem % 60)
}

pub fn now_unix_ns() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
}

fn addr(family: u8, octets: [u8; 16]) -> IpAddr {
    if family == 6 {
        IpAddr::V6(Ipv6Addr::from(octets))
    } else {
        IpAddr::V4(Ipv4Addr::new(octets[0], octets[1], octets[2], octets[3]))
    }
}

fn kind_name(kind: u8) -> &'static str {
    match kind {
        event_kind::BAN_ADDED => "ban_added",
        event_kind::BAN_EXPIRED => "ban_expired",
        event_kind::RATE_TRIP => "rate_limit_trip",
        event_kind::DROP_SAMPLE => "drop_sample",
        _ => "unknown",
    }
}

/// One datapath event as a JSON object.
pub fn to_json(e: &Event, compiled: &Compiled, ports: &[u16]) -> Value {
    // The event's kernel time, moved onto the wall clock.
    let age = ktime_now_ns().saturating_sub(e.ktime_ns) as u128;
    let mut v = json!({
        "time": rfc3339(now_unix_ns().saturating_sub(age)),
        "event": kind_name(e.kind),
        "direction": direction::NAMES.get(e.direction as usize).copied().unwrap_or("unknown"),
        "src": addr(e.family, e.src_octets()).to_string(),
        "dst": addr(e.family, e.dst_octets()).to_string(),
        "sport": e.sport,
        "dport": e.dport,
        "port": ports.get(e.port_slot as usize),
        "reason": reason::NAMES.get(e.reason as usize).copied(),
        "verdict": verdict::NAMES.get(e.verdict as usize).copied(),
        "rule": compiled.rule(e.rule).map(|r| &*r.id),
        "country": compiled.country(e.country),
    });
    if e.kind == event_kind::BAN_ADDED {
        v["count"] = json!(e.count);
        v["duration_s"] = json!(e.duration_s);
        v["strikes"] = json!(e.strikes);
    }
    if e.kind == event_kind::BAN_EXPIRED || e.kind == event_kind::RATE_TRIP {
        v["reason"] = json!(if e.kind == event_kind::BAN_EXPIRED { "ban_expired" } else { "rate_limited" });
    }
    v
}

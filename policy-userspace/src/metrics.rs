//! The Prometheus exposition, built at each scrape from the maps (kernel
//! totals become counters) and from the controller's own records.

use prometheus::{
    core::Collector, Encoder, Gauge, Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use policy_common::{direction, reason, stats_index, verdict, GEO_DROPS_ENTRIES, MAX_COUNTRIES, PORT_SLOTS};

use crate::{dataplane::Dataplane, ops, policy::Compiled};

/// What the controller keeps between scrapes.
pub struct ControllerMetrics {
    pub reload_duration: Histogram,
    pub reloads: IntCounterVec,
    pub last_reload_ok: IntGauge,
    pub last_reload_time: Gauge,
}

impl ControllerMetrics {
    pub fn new() -> Self {
        Self {
            reload_duration: Histogram::with_opts(
                HistogramOpts::new("smtpguard_reload_duration_seconds", "Time to validate, compile and load a policy")
                    .buckets(vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            )
            .expect("valid histogram"),
            reloads: IntCounterVec::new(Opts::new("smtpguard_reloads_total", "Policy reloads by result"), &["result"]).expect("valid"),
            last_reload_ok: IntGauge::new("smtpguard_last_reload_success", "1 when the last reload was applied, 0 when it was rejected").expect("valid"),
            last_reload_time: Gauge::new("smtpguard_last_reload_timestamp_seconds", "When the last reload was attempted (Unix time)").expect("valid"),
        }
    }
}

impl Default for ControllerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

fn register(r: &Registry, c: impl Collector + 'static) {
    r.register(Box::new(c)).expect("unique metric names");
}

/// The source table's churn, from the summed `STATS` cells:
/// `smtpguard_source_claims_total` counts new sources the datapath gave a
/// way in `SOURCES`; `smtpguard_source_evictions_total{kind}` those of them
/// that displaced an entry, by what it was (`stale`: idle, nothing lost;
/// `live`: recently active, its bucket and meter lost; `ban`: a ban lost).
/// Claims minus evictions took a free way.
pub fn register_source_claims(r: &Registry, stats: &[policy_common::Counter]) {
    let claims = ops::source_claims(stats);
    let total = IntCounterVec::new(Opts::new("smtpguard_source_claims_total", "New sources given a way in the source table"), &[]).expect("valid");
    total.with_label_values(&[] as &[&str]).inc_by(claims.iter().sum());
    let evictions = IntCounterVec::new(
        Opts::new("smtpguard_source_evictions_total", "New sources that displaced a tracked source, by what was displaced: stale (idle), live (active), ban"),
        &["kind"],
    )
    .expect("valid");
    let evicted = policy_common::claim_kind::STALE as usize;
    for (name, n) in policy_common::claim_kind::NAMES.iter().zip(claims).skip(evicted) {
        evictions.with_label_values(&[name]).inc_by(n);
    }
    register(r, total);
    register(r, evictions);
}

/// Renders the whole exposition.
pub fn render(dp: &mut Dataplane, compiled: &Compiled, m: &ControllerMetrics, ports: &[u16]) -> Result<String, String> {
    let r = Registry::new();
    let packets = IntCounterVec::new(
        Opts::new("smtpguard_packets_total", "Packets on guarded ports by direction, verdict, reason and port"),
        &["direction", "verdict", "reason", "port"],
    )
    .expect("valid");
    let bytes = IntCounterVec::new(
        Opts::new("smtpguard_bytes_total", "Bytes on guarded ports by direction, verdict, reason and port"),
        &["direction", "verdict", "reason", "port"],
    )
    .expect("valid");
    let stats = dp.stats().map_err(|e| e.to_string())?;
    for d in [direction::INGRESS, direction::EGRESS] {
        for v in 0..verdict::COUNT as u8 {
            for why in 0..reason::COUNT as u8 {
                for slot in 0..PORT_SLOTS {
                    let c = stats[stats_index(d, v, why, slot) as usize];
                    if c.packets == 0 {
                        continue;
                    }
                    let port = ports.get(slot).map(|p| p.to_string()).unwrap_or_else(|| "unknown".into());
                    let labels = [direction::NAMES[d as usize], verdict::NAMES[v as usize], reason::NAMES[why as usize], port.as_str()];
                    packets.with_label_values(&labels).inc_by(c.packets);
                    bytes.with_label_values(&labels).inc_by(c.bytes);
                }
            }
        }
    }
    let events_lost = IntCounterVec::new(Opts::new("smtpguard_events_lost_total", "Events dropped because the ring buffer was full"), &[]).expect("valid");
    events_lost.with_label_values(&[] as &[&str]).inc_by(stats[policy_common::STATS_EVENTS_LOST as usize].packets);
    let bans_total = IntCounterVec::new(Opts::new("smtpguard_bans_total", "Bans started, by origin"), &["origin"]).expect("valid");
    for (origin, cell) in [
        ("auto", policy_common::STATS_BANS_AUTO),
        ("escalated", policy_common::STATS_BANS_ESCALATED),
        ("manual", policy_common::STATS_BANS_MANUAL),
    ] {
        bans_total.with_label_values(&[origin]).inc_by(stats[cell as usize].packets);
    }
    register_source_claims(&r, &stats);
    let geo = IntCounterVec::new(Opts::new("smtpguard_geo_drops_total", "Drops (and would-drops) by the geo-fence, by country"), &["direction", "country"]).expect("valid");
    let geo_cells = dp.geo_drops().map_err(|e| e.to_string())?;
    for (i, drops) in geo_cells.iter().enumerate().take(GEO_DROPS_ENTRIES as usize) {
        if *drops > 0 {
            let d = i / MAX_COUNTRIES;
            let country = compiled.country((i % MAX_COUNTRIES) as u32).unwrap_or("unknown");
            geo.with_label_values(&[direction::NAMES[d], country]).inc_by(*drops);
        }
    }
    let slots = dp.sources().map_err(|e| e.to_string())?;
    let active = ops::active_bans(&slots);
    let bans = IntGaugeVec::new(Opts::new("smtpguard_active_bans", "Sources banned now, by origin"), &["origin"]).expect("valid");
    for origin in ["auto", "escalated", "manual"] {
        bans.with_label_values(&[origin]).set(active.iter().filter(|b| b.origin == origin).count() as i64);
    }
    let tracked = IntGauge::new("smtpguard_tracked_sources", "Sources in the rate and ban table").expect("valid");
    tracked.set(slots.len() as i64);
    let entries = IntGaugeVec::new(Opts::new("smtpguard_map_entries", "Entries in each map (EVENTS: bytes waiting is not tracked)"), &["map"]).expect("valid");
    let capacity = IntGaugeVec::new(Opts::new("smtpguard_map_capacity", "Capacity of each map (EVENTS: bytes)"), &["map"]).expect("valid");
    let (_, acl6) = dp.acl_entry_counts();
    entries.with_label_values(&[policy_common::ACL_V6]).set(acl6 as i64);
    let (used, room) = dp.acl4_usage();
    for (name, used, room) in [
        (policy_common::ACL4_NODES, used.nodes, room.nodes),
        (policy_common::ACL4_SLOTS, used.slots, room.slots),
        (policy_common::ACL4_VALUES, used.values, room.values),
    ] {
        entries.with_label_values(&[name]).set(used as i64);
        capacity.with_label_values(&[name]).set(room as i64);
    }
    entries.with_label_values(&[policy_common::SOURCES]).set(slots.len() as i64);
    let (ban4, ban6) = dp.network_ban_counts();
    entries.with_label_values(&[policy_common::BAN_V4]).set(ban4 as i64);
    entries.with_label_values(&[policy_common::BAN_V6]).set(ban6 as i64);
    entries.with_label_values(&[policy_common::TENANT_IFACES]).set(dp.tenant_iface_count() as i64);
    // Fixed-size arrays are always full: entries equal capacity.
    for (name, cap) in [
        (policy_common::RUNTIME, 1),
        (policy_common::POLICY, policy_common::GENERATIONS as i64),
        (policy_common::ACL4_ROOT, policy_common::acl4::ROOT_CHUNKS as i64),
        (policy_common::STATS, policy_common::STATS_ENTRIES as i64),
        (policy_common::GEO_DROPS, policy_common::GEO_DROPS_ENTRIES as i64),
        (policy_common::EVENT_BUDGET, 1),
        (policy_common::SCRATCH, 1),
    ] {
        entries.with_label_values(&[name]).set(cap);
        capacity.with_label_values(&[name]).set(cap);
    }
    for (name, cap) in [
        (policy_common::ACL_V6, policy_common::ACL_CAPACITY as i64),
        (policy_common::BAN_V4, policy_common::BAN_CIDR_CAPACITY as i64),
        (policy_common::BAN_V6, policy_common::BAN_CIDR_CAPACITY as i64),
        (policy_common::SOURCES, dp.source_sets() as i64 * policy_common::source::WAYS as i64),
        (policy_common::EVENTS, policy_common::EVENTS_BYTES as i64),
        (policy_common::TENANT_IFACES, policy_common::TENANT_IFACES_CAPACITY as i64),
    ] {
        capacity.with_label_values(&[name]).set(cap);
    }
    let generation = IntGauge::new("smtpguard_policy_generation", "Generation number of the policy in force").expect("valid");
    let active_gen = dp.active_generation().map_err(|e| e.to_string())?;
    generation.set(dp.policy(active_gen).map_err(|e| e.to_string())?.generation as i64);
    let build = IntGaugeVec::new(Opts::new("smtpguard_build_info", "Build information"), &["version"]).expect("valid");
    build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);

    for c in [packets, bytes, events_lost, bans_total, geo] {
        register(&r, c);
    }
    register(&r, bans);
    register(&r, tracked);
    register(&r, entries);
    register(&r, capacity);
    register(&r, generation);
    register(&r, build);
    register(&r, m.reload_duration.clone());
    register(&r, m.reloads.clone());
    register(&r, m.last_reload_ok.clone());
    register(&r, m.last_reload_time.clone());
    let mut out = Vec::new();
    TextEncoder::new().encode(&r.gather(), &mut out).map_err(|e| e.to_string())?;
    String::from_utf8(out).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use policy_common::{claim_kind, Counter, STATS_CLAIMS, STATS_ENTRIES};

    use super::*;

    #[test]
    fn source_claims_and_evictions_by_kind_reach_the_exposition() {
        let mut stats = vec![Counter::default(); STATS_ENTRIES as usize];
        for (kind, n) in [(claim_kind::FREE, 8), (claim_kind::STALE, 3), (claim_kind::LIVE, 5), (claim_kind::BAN, 1)] {
            stats[STATS_CLAIMS as usize + kind as usize].packets = n;
        }
        let r = Registry::new();
        register_source_claims(&r, &stats);
        let mut out = Vec::new();
        TextEncoder::new().encode(&r.gather(), &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        for line in [
            "smtpguard_source_claims_total 17",
            "smtpguard_source_evictions_total{kind=\"stale\"} 3",
            "smtpguard_source_evictions_total{kind=\"live\"} 5",
            "smtpguard_source_evictions_total{kind=\"ban\"} 1",
            "# TYPE smtpguard_source_evictions_total counter",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
    }
}

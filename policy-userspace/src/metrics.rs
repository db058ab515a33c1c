//! The Prometheus exposition, built at each scrape from the kernel's
//! counters (read then), the controller's records and the last scan of the
//! source table (which is too large to read per scrape).

use prometheus::{
    core::Collector, Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use policy_common::{
    acl4::Capacity,
    direction, reason,
    source::ban_origin,
    verdict, StatsCell, GEO_DROPS_ENTRIES, MAX_COUNTRIES,
};

use crate::{
    clock::{self, ktime_now_ns},
    commands::state::source_claims,
    dataplane::observer::Observer,
};

/// What the controller keeps between scrapes.
pub struct ControllerMetrics {
    pub reload_duration: Histogram,
    pub reloads: IntCounterVec,
    pub last_reload_ok: IntGauge,
    pub last_reload_time: Gauge,
    pub event_write_failures: IntCounter,
    /// Suspect episodes reported, by tenant interface (labels go with it).
    pub tenant_suspects: IntCounterVec,
    pub quarantines: IntCounter,
    /// `smtpguard bypass` switches seen, by the state switched to.
    pub bypass_changes: IntCounterVec,
    /// `smtpguard rollback`s, by result.
    pub rollbacks: IntCounterVec,
    /// `smtpguard promote`s, by result.
    pub promotions: IntCounterVec,
    /// The fleet's families, once the host joined one.
    pub fleet: std::sync::OnceLock<std::sync::Arc<crate::fleet::metrics::FleetMetrics>>,
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
            event_write_failures: IntCounter::new("smtpguard_event_write_failures_total", "Events that could not be written to the event log (full disk, closed pipe)")
                .expect("valid"),
            tenant_suspects: IntCounterVec::new(
                Opts::new("smtpguard_tenant_suspect_episodes_total", "Sources behind a tenant interface reported as suspects (tenant_suspect events), by interface"),
                &["interface"],
            )
            .expect("valid"),
            quarantines: IntCounter::new("smtpguard_quarantines_total", "Tenant suspects banned on every guarded port (policy tenant_suspect.quarantine)").expect("valid"),
            bypass_changes: IntCounterVec::new(
                Opts::new("smtpguard_bypass_changes_total", "Switches of the fail-open lever (smtpguard bypass), by the state switched to: on (enforcement off) or off"),
                &["to"],
            )
            .expect("valid"),
            rollbacks: IntCounterVec::new(
                Opts::new("smtpguard_rollbacks_total", "smtpguard rollback requests, by result: ok (the known-good policy is in force) or failed"),
                &["result"],
            )
            .expect("valid"),
            promotions: IntCounterVec::new(
                Opts::new("smtpguard_promotions_total", "smtpguard promote requests, by result: ok (the shadow policy is enforced) or failed"),
                &["result"],
            )
            .expect("valid"),
            fleet: std::sync::OnceLock::new(),
        }
    }
}

impl ControllerMetrics {
    /// The families both backends' controllers keep: reloads and event writes.
    pub fn register_reloads(&self, r: &Registry) {
        register(r, self.reload_duration.clone());
        register(r, self.reloads.clone());
        register(r, self.last_reload_ok.clone());
        register(r, self.last_reload_time.clone());
        register(r, self.event_write_failures.clone());
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

/// What the controller installed last, for the exposition; replaced after
/// every reload and attach.
#[derive(Clone, Debug, Default)]
pub struct PolicyView {
    pub generation: u64,
    /// Guarded ports by slot, for the `port` label.
    pub ports: Vec<u16>,
    /// Country index `n` is `countries[n - 1]`, for the `country` label.
    pub countries: Vec<String>,
    pub acl6_entries: usize,
    pub acl4_used: Capacity,
    pub acl4_room: Capacity,
    /// The interfaces attached now.
    pub interfaces: Vec<crate::interfaces::InterfaceView>,
    /// Named uplinks that are not there.
    pub missing_uplinks: Vec<String>,
    /// The egress policy's `tenant_suspect.window` (0: off), for the gauge.
    pub suspect_window_s: u32,
    /// The ACL rules in force, for `smtpguard_rule_hits_total`.
    pub rules: Option<std::sync::Arc<crate::rule_hits::RuleBook>>,
    /// Which directions rate-limit (their rate rule's hits are exported).
    pub rate_limited: [bool; direction::COUNT],
    /// The candidate judged beside the policy, when one is loaded.
    pub shadow: Option<std::sync::Arc<crate::shadow::ShadowRecord>>,
    /// By direction: the day a monitored direction starts to enforce.
    pub enforce_from: [Option<i64>; direction::COUNT],
}

impl PolicyView {
    fn country(&self, index: usize) -> Option<&str> {
        index.checked_sub(1).and_then(|i| self.countries.get(i)).map(String::as_str)
    }
}

/// Gauges that need a scan of the source table (52 MB when full) or the
/// ban tries: computed at a bounded rate, never per scrape.
#[derive(Clone, Debug, Default)]
pub struct TableGauges {
    /// When the scan ran (Unix seconds); 0: not yet.
    pub scanned_at: f64,
    pub tracked_sources: u64,
    /// Active bans by origin: auto, escalated, manual, quarantine, fleet.
    pub bans: [u64; 5],
    pub network_bans_v4: u64,
    pub network_bans_v6: u64,
    /// `TENANT_STATS`, summed over CPUs.
    pub tenant_stats: Vec<u64>,
    /// What `TENANT_SOURCES` holds.
    pub tenant_sources: Vec<crate::dataplane::tenants::TenantSource>,
}

impl TableGauges {
    /// One pass over the source table and the ban tries.
    pub fn scan(observer: &Observer) -> std::io::Result<Self> {
        let now = ktime_now_ns();
        let snapshot = observer.sources().snapshot(now);
        let mut g = TableGauges { tracked_sources: snapshot.tracked, ..TableGauges::default() };
        for (i, origin) in [ban_origin::AUTO, ban_origin::ESCALATED, ban_origin::MANUAL, ban_origin::QUARANTINE, ban_origin::FLEET].into_iter().enumerate() {
            g.bans[i] = snapshot.banned[origin as usize];
        }
        (g.network_bans_v4, g.network_bans_v6) = observer.network_ban_counts()?;
        g.tenant_stats = observer.tenant_stats()?;
        g.tenant_sources = observer.tenant_sources()?;
        g.scanned_at = clock::unix_now_s();
        Ok(g)
    }
}

/// Attached interfaces (and named uplinks that are not there), what each
/// tenant interface sent, and its current suspects: one series per
/// interface that exists, none left for those gone.
fn register_interfaces(r: &Registry, view: &PolicyView, tables: &TableGauges) {
    let attached = IntGaugeVec::new(
        Opts::new("smtpguard_interface_attached", "1 for each interface smtpguard judges on, by role; 0 for a named uplink that is not there (nothing judges it)"),
        &["interface", "role"],
    )
    .expect("valid");
    for i in &view.interfaces {
        attached.with_label_values(&[i.name.as_str(), i.role.name()]).set(1);
    }
    for name in &view.missing_uplinks {
        attached.with_label_values(&[name.as_str(), "uplink"]).set(0);
    }
    let packets = IntCounterVec::new(
        Opts::new("smtpguard_tenant_packets_total", "Packets each tenant interface sent to guarded ports, by verdict and reason (from the last table scan)"),
        &["interface", "verdict", "reason"],
    )
    .expect("valid");
    let suspects = IntGaugeVec::new(
        Opts::new("smtpguard_tenant_suspects", "Sources behind each tenant interface in a suspect episode now (from the last table scan)"),
        &["interface"],
    )
    .expect("valid");
    for i in view.interfaces.iter().filter(|i| i.slot != 0) {
        for (v, why, n) in crate::dataplane::tenants::slot_cells(&tables.tenant_stats, i.slot) {
            packets.with_label_values(&[i.name.as_str(), verdict::NAMES[v as usize], reason::NAMES[why as usize]]).inc_by(n);
        }
        let now = tables.tenant_sources.iter().filter(|s| s.ifindex == i.ifindex && s.suspect_now(view.suspect_window_s)).count();
        suspects.with_label_values(&[i.name.as_str()]).set(now as i64);
    }
    register(r, attached);
    register(r, packets);
    register(r, suspects);
}

/// The source table's churn, from the summed `STATS` cells:
/// `smtpguard_source_claims_total` counts new sources the datapath gave a
/// way in `SOURCES`; `smtpguard_source_evictions_total{kind}` those of them
/// that displaced an entry, by what it was (`stale`: idle, nothing lost;
/// `live`: recently active, its bucket and meter lost; `ban`: a ban lost).
/// Claims minus evictions took a free way.
pub fn register_source_claims(r: &Registry, stats: &[policy_common::Counter]) {
    let claims = source_claims(stats);
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

/// The `backend` label of the families both backends export.
const BACKEND: &str = "ebpf";

/// Renders the whole exposition: kernel counters read now, the rest from
/// what the controller and the last table scan recorded.
pub fn render(observer: &Observer, view: &PolicyView, tables: &TableGauges, m: &ControllerMetrics) -> Result<String, String> {
    let r = Registry::new();
    let packets = IntCounterVec::new(
        Opts::new("smtpguard_packets_total", "Packets on guarded ports by direction, verdict, reason and port"),
        &["backend", "direction", "verdict", "reason", "port"],
    )
    .expect("valid");
    let bytes = IntCounterVec::new(
        Opts::new("smtpguard_bytes_total", "Bytes on guarded ports by direction, verdict, reason and port"),
        &["backend", "direction", "verdict", "reason", "port"],
    )
    .expect("valid");
    let stats = observer.stats().map_err(|e| e.to_string())?;
    for cell in StatsCell::all() {
        let c = stats[cell.index as usize];
        if c.packets == 0 {
            continue;
        }
        let port = view.ports.get(cell.port_slot).map(|p| p.to_string()).unwrap_or_else(|| "unknown".into());
        let labels = [BACKEND, direction::NAMES[cell.direction as usize], verdict::NAMES[cell.verdict as usize], reason::NAMES[cell.reason as usize], port.as_str()];
        packets.with_label_values(&labels).inc_by(c.packets);
        bytes.with_label_values(&labels).inc_by(c.bytes);
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
    let scan_truncated = IntCounterVec::new(
        Opts::new("smtpguard_smtp_scan_truncated_total", "Payload segments of command-filtered SMTP ports longer than the scanner reads (512 bytes); the rest went unscanned"),
        &[],
    )
    .expect("valid");
    scan_truncated.with_label_values(&[] as &[&str]).inc_by(stats[policy_common::STATS_SCAN_TRUNCATED as usize].packets);
    let smtp_flows = IntCounterVec::new(
        Opts::new(
            "smtpguard_smtp_flows_total",
            "Client streams of command-filtered SMTP ports the filter began to follow: one per stream, plus one per stream whose state was evicted from SMTP_FLOWS",
        ),
        &[],
    )
    .expect("valid");
    smtp_flows.with_label_values(&[] as &[&str]).inc_by(stats[policy_common::STATS_SMTP_FLOW_MISSES as usize].packets);
    let resets = IntCounterVec::new(
        Opts::new("smtpguard_resets_total", "TCP resets sent to the senders of dropped segments of open connections the policy denies (`established: reset`)"),
        &["backend", "direction"],
    )
    .expect("valid");
    for d in [direction::INGRESS, direction::EGRESS] {
        resets.with_label_values(&[BACKEND, direction::NAMES[d as usize]]).inc_by(stats[policy_common::STATS_RESETS as usize + d as usize].packets);
    }
    let geo = IntCounterVec::new(Opts::new("smtpguard_geo_drops_total", "Drops and would-drops (monitor mode) by the geo-fence, by country"), &["direction", "verdict", "country"]).expect("valid");
    let geo_cells = observer.geo_drops().map_err(|e| e.to_string())?;
    // (direction, country, drops and would-drops): the geo-fence's hits.
    let mut geo_rows: Vec<(u8, String, u64)> = Vec::new();
    for (i, drops) in geo_cells.iter().enumerate().take(GEO_DROPS_ENTRIES as usize) {
        if *drops > 0 {
            let (d, monitor) = (i / MAX_COUNTRIES / 2, i / MAX_COUNTRIES % 2 == 1);
            let v = if monitor { verdict::WOULD_DROP } else { verdict::DROP };
            let country = view.country(i % MAX_COUNTRIES).unwrap_or("unknown");
            geo.with_label_values(&[direction::NAMES[d], verdict::NAMES[v as usize], country]).inc_by(*drops);
            match geo_rows.iter_mut().find(|(rd, rc, _)| *rd as usize == d && rc == country) {
                Some(row) => row.2 += drops,
                None => geo_rows.push((d as u8, country.to_owned(), *drops)),
            }
        }
    }
    let bans = IntGaugeVec::new(Opts::new("smtpguard_active_bans", "Sources banned now, by origin (from the last table scan)"), &["origin"]).expect("valid");
    for (origin, n) in ["auto", "escalated", "manual", "quarantine", "fleet"].iter().zip(tables.bans) {
        bans.with_label_values(&[origin]).set(n as i64);
    }
    let tracked = IntGauge::new("smtpguard_tracked_sources", "Sources in the rate and ban table (from the last table scan)").expect("valid");
    tracked.set(tables.tracked_sources as i64);
    let scanned = Gauge::new("smtpguard_table_scan_timestamp_seconds", "When the source table and ban tries were last scanned for the gauges above (Unix time)").expect("valid");
    scanned.set(tables.scanned_at);
    let entries = IntGaugeVec::new(Opts::new("smtpguard_map_entries", "Entries in each map (EVENTS: bytes waiting is not tracked)"), &["map"]).expect("valid");
    let capacity = IntGaugeVec::new(Opts::new("smtpguard_map_capacity", "Capacity of each map (EVENTS, AYA_LOGS: bytes)"), &["map"]).expect("valid");
    entries.with_label_values(&[policy_common::ACL_V6]).set(view.acl6_entries as i64);
    for (name, used, room) in [
        (policy_common::ACL4_NODES, view.acl4_used.nodes, view.acl4_room.nodes),
        (policy_common::ACL4_SLOTS, view.acl4_used.slots, view.acl4_room.slots),
        (policy_common::ACL4_VALUES, view.acl4_used.values, view.acl4_room.values),
    ] {
        entries.with_label_values(&[name]).set(used as i64);
        capacity.with_label_values(&[name]).set(room as i64);
    }
    entries.with_label_values(&[policy_common::SOURCES]).set(tables.tracked_sources as i64);
    entries.with_label_values(&[policy_common::BAN_V4]).set(tables.network_bans_v4 as i64);
    entries.with_label_values(&[policy_common::BAN_V6]).set(tables.network_bans_v6 as i64);
    entries.with_label_values(&[policy_common::TENANT_IFACES]).set(view.interfaces.iter().filter(|i| i.slot != 0).count() as i64);
    // Fixed-size arrays are always full: entries equal capacity.
    for (name, cap) in [
        (policy_common::RUNTIME, 1),
        (policy_common::POLICY, policy_common::POLICY_ENTRIES as i64),
        (policy_common::ACL4_ROOT, policy_common::acl4::ROOT_CHUNKS as i64),
        (policy_common::STATS, policy_common::STATS_ENTRIES as i64),
        (policy_common::RULE_HITS, policy_common::RULE_HITS_ENTRIES as i64),
        (policy_common::BYPASS, 1),
        (policy_common::SHADOW_TOTALS, policy_common::shadow_total::COUNT as i64),
        (policy_common::SHADOW_BUF, 1),
        (policy_common::GEO_DROPS, policy_common::GEO_DROPS_ENTRIES as i64),
        (policy_common::EVENT_BUDGET, 1),
        (policy_common::SCRATCH, 1),
        (policy_common::SCAN_BUF, 1),
        (policy_common::RESET_BUF, 1),
        (policy_common::TRACE, 1),
        (policy_common::TRACE_BUF, 1),
        (policy_common::TENANT_STATS, policy_common::TENANT_STATS_ENTRIES as i64),
        (policy_common::TENANT_BUF, 1),
    ] {
        entries.with_label_values(&[name]).set(cap);
        capacity.with_label_values(&[name]).set(cap);
    }
    for (name, cap) in [
        (policy_common::ACL_V6, policy_common::ACL_CAPACITY as i64),
        (policy_common::BAN_V4, policy_common::BAN_CIDR_CAPACITY as i64),
        (policy_common::BAN_V6, policy_common::BAN_CIDR_CAPACITY as i64),
        (policy_common::SOURCES, observer.source_capacity() as i64),
        (policy_common::SMTP_FLOWS, observer.smtp_flow_capacity() as i64),
        (policy_common::EVENTS, policy_common::EVENTS_BYTES as i64),
        (policy_common::AYA_LOGS, policy_common::AYA_LOGS_BYTES as i64),
        (policy_common::TENANT_IFACES, policy_common::TENANT_IFACES_CAPACITY as i64),
        (policy_common::TENANT_SOURCES, policy_common::TENANT_SOURCES_CAPACITY as i64),
        (policy_common::SHADOW_DIFFS, policy_common::SHADOW_DIFFS_CAPACITY as i64),
        (policy_common::SHADOW_SOURCES, policy_common::SHADOW_SOURCES_CAPACITY as i64),
    ] {
        capacity.with_label_values(&[name]).set(cap);
    }
    entries.with_label_values(&[policy_common::TENANT_SOURCES]).set(tables.tenant_sources.len() as i64);
    register_interfaces(&r, view, tables);
    let generation = IntGauge::new("smtpguard_policy_generation", "Generation number of the policy in force").expect("valid");
    generation.set(view.generation as i64);
    let build = IntGaugeVec::new(Opts::new("smtpguard_build_info", "Build information"), &["version"]).expect("valid");
    build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);

    for c in [packets, bytes, events_lost, bans_total, scan_truncated, smtp_flows, resets, geo] {
        register(&r, c);
    }
    register(&r, bans);
    register(&r, tracked);
    register(&r, scanned);
    register(&r, entries);
    register(&r, capacity);
    register(&r, generation);
    register(&r, build);
    m.register_reloads(&r);
    register(&r, m.tenant_suspects.clone());
    register(&r, m.quarantines.clone());
    register_rule_hits(&r, observer, view, &stats, &geo_rows)?;
    for (family, labels) in [(&m.bypass_changes, ["on", "off"]), (&m.rollbacks, ["ok", "failed"]), (&m.promotions, ["ok", "failed"])] {
        // Present from the start, at 0: alerts and panels see a series.
        for l in labels {
            family.with_label_values(&[l]);
        }
    }
    register(&r, m.bypass_changes.clone());
    register(&r, m.rollbacks.clone());
    register(&r, m.promotions.clone());
    register_shadow(&r, observer, view)?;
    let scheduled = GaugeVec::new(
        Opts::new("smtpguard_enforce_from_timestamp_seconds", "When a direction in monitor mode starts to enforce (the policy's enforce_from, Unix time); 0 when none is scheduled"),
        &["direction"],
    )
    .expect("valid");
    for (d, day) in view.enforce_from.iter().enumerate() {
        scheduled.with_label_values(&[direction::NAMES[d]]).set(day.map_or(0.0, |day| day as f64 * 86_400.0));
    }
    register(&r, scheduled);
    let bypass = IntGauge::new("smtpguard_bypass", "1 while enforcement is bypassed (smtpguard bypass on): every direction judges as in monitor mode").expect("valid");
    bypass.set(observer.bypass_since().is_some() as i64);
    register(&r, bypass);
    let since = Gauge::new("smtpguard_bypass_since_timestamp_seconds", "When enforcement was bypassed (Unix time; 0 while enforcing)").expect("valid");
    since.set(observer.bypass_since().unwrap_or(0) as f64);
    register(&r, since);
    if let Some(fleet) = m.fleet.get() {
        fleet.register(&r);
    }
    encode(&r)
}

/// The shadow policy's families: packets it judged and where it differed.
fn register_shadow(r: &Registry, observer: &Observer, view: &PolicyView) -> Result<(), String> {
    let Some(record) = &view.shadow else { return Ok(()) };
    let loaded = IntGauge::new("smtpguard_shadow_policy", "The shadow policy's number (each reload of it counts one up); absent without one").expect("valid");
    loaded.set(record.number as i64);
    register(r, loaded);
    let judged = IntCounterVec::new(Opts::new("smtpguard_shadow_judged_total", "Packets the shadow policy judged beside the policy in force, by direction"), &["direction"]).expect("valid");
    let totals = observer.shadow_totals().map_err(|e| e.to_string())?;
    for (d, name) in direction::NAMES.iter().enumerate() {
        judged.with_label_values(&[name]).inc_by(totals.get(d).copied().unwrap_or(0));
    }
    register(r, judged);
    let diffs = IntCounterVec::new(
        Opts::new(
            "smtpguard_shadow_differences_total",
            "Packets the shadow policy would have decided differently, by direction, port, the policy in force's decision, the candidate's and the candidate's rule (since the candidate was loaded)",
        ),
        &["direction", "port", "decision", "shadow_decision", "shadow_rule"],
    )
    .expect("valid");
    for (k, n) in observer.shadow_diffs().map_err(|e| e.to_string())? {
        let d = direction::NAMES.get(k.direction as usize).copied().unwrap_or("unknown");
        let port = record.port(k.port_slot);
        diffs
            .with_label_values(&[d, &port, &crate::shadow::decision(k.verdict, k.reason), &crate::shadow::decision(k.shadow_verdict, k.shadow_reason), record.rule(k.shadow_rule)])
            .inc_by(n);
    }
    register(r, diffs);
    Ok(())
}

/// `smtpguard_rule_hits_total{rule, kind, direction}`: packets each rule of
/// the policy in force decided. ACL rules (allow, deny, exemption; a list
/// file is one rule) from the kernel's per-rule counters; the rate limit
/// (`<direction>.rate_limit`) and the geo-fence per country
/// (`<direction>.geo.<CC>`) from the counters by reason and by country.
fn register_rule_hits(r: &Registry, observer: &Observer, view: &PolicyView, stats: &[policy_common::Counter], geo_rows: &[(u8, String, u64)]) -> Result<(), String> {
    let hits = IntCounterVec::new(
        Opts::new("smtpguard_rule_hits_total", "Packets each rule of the policy in force decided (a list file is one rule; rate limits and geo-fence countries too)"),
        &["rule", "kind", "direction"],
    )
    .expect("valid");
    if let Some(book) = &view.rules {
        let counts = observer.rule_hits(book.kernel_generation).map_err(|e| e.to_string())?;
        for (row, n) in book.totals(&counts) {
            hits.with_label_values(&[&row.id, &row.kind, &row.direction]).inc_by(n);
        }
        let beyond = book.beyond_cap(&counts);
        if beyond > 0 {
            hits.with_label_values(&["_beyond_cap", "acl", "any"]).inc_by(beyond);
        }
    }
    for (d, name) in direction::NAMES.iter().enumerate() {
        if !view.rate_limited[d] {
            continue;
        }
        let n: u64 = StatsCell::all()
            .filter(|c| c.direction as usize == d && c.verdict != verdict::PASS && matches!(c.reason, reason::RATE_LIMITED | reason::RATE_BAN))
            .map(|c| stats[c.index as usize].packets)
            .sum();
        hits.with_label_values(&[&format!("{name}.rate_limit"), "rate_limit", name]).inc_by(n);
    }
    for (d, country, n) in geo_rows {
        let name = direction::NAMES[*d as usize];
        hits.with_label_values(&[&format!("{name}.geo.{country}"), "geo", name]).inc_by(*n);
    }
    register(r, hits);
    Ok(())
}

/// The exposition text of everything in `r`.
pub fn encode(r: &Registry) -> Result<String, String> {
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

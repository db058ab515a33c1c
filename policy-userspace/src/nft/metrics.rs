//! The nftables backend's exposition: the same families as the eBPF
//! datapath's where nftables counts the same thing (packets by direction,
//! verdict, reason and port from the table's named counters; resets; bans
//! by origin; set sizes against their room), each with `backend="nftables"`,
//! plus the controller's own.

use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use policy_common::{direction, reason, verdict};

use super::{bans, ruleset, Sizes};
use crate::metrics::{ControllerMetrics, PolicyView};

pub const BACKEND: &str = "nftables";

fn register(r: &Registry, c: impl prometheus::core::Collector + 'static) {
    r.register(Box::new(c)).expect("metric names are unique");
}

/// Reads the table now and renders the whole exposition.
pub fn render(view: &PolicyView, sizes: Sizes, m: &ControllerMetrics) -> Result<String, String> {
    let r = Registry::new();
    let counters = super::counters().map_err(|e| e.to_string())?;
    let packets = IntCounterVec::new(
        Opts::new("smtpguard_packets_total", "Packets on guarded ports by direction, verdict, reason and port"),
        &["backend", "direction", "verdict", "reason", "port"],
    )
    .expect("valid");
    for (name, (dir, v, why, slot)) in ruleset::counter_names() {
        let n = counters.get(&name).copied().unwrap_or(0);
        if n == 0 {
            continue;
        }
        let port = slot.and_then(|s| view.ports.get(s)).map(|p| p.to_string()).unwrap_or_else(|| "unknown".into());
        packets
            .with_label_values(&[BACKEND, direction::NAMES[dir as usize], verdict::NAMES[v as usize], reason::NAMES[why as usize], port.as_str()])
            .inc_by(n);
    }
    let resets = IntCounterVec::new(
        Opts::new("smtpguard_resets_total", "TCP resets sent to the senders of dropped segments of open connections the policy denies (`established: reset`)"),
        &["backend", "direction"],
    )
    .expect("valid");
    for d in [direction::INGRESS, direction::EGRESS] {
        resets.with_label_values(&[BACKEND, direction::NAMES[d as usize]]).inc_by(counters.get(&ruleset::resets_counter(d)).copied().unwrap_or(0));
    }
    let active = IntGaugeVec::new(Opts::new("smtpguard_active_bans", "Sources banned now, by origin"), &["backend", "origin"]).expect("valid");
    let entries = IntGaugeVec::new(Opts::new("smtpguard_map_entries", "Entries in each map (nftables: set)"), &["backend", "map"]).expect("valid");
    let capacity = IntGaugeVec::new(Opts::new("smtpguard_map_capacity", "Capacity of each map (nftables: set size)"), &["backend", "map"]).expect("valid");
    let all = bans::list_bans().map_err(|e| e.to_string())?;
    for origin in ["auto", "escalated", "manual"] {
        active.with_label_values(&[BACKEND, origin]).set(all.iter().filter(|b| b.origin.name() == origin).count() as i64);
    }
    for (name, n) in super::set_sizes().map_err(|e| e.to_string())? {
        entries.with_label_values(&[BACKEND, &name]).set(n as i64);
        capacity.with_label_values(&[BACKEND, &name]).set(sizes.sources as i64);
    }
    let generation = IntGauge::new("smtpguard_policy_generation", "Generation number of the policy in force").expect("valid");
    generation.set(view.generation as i64);
    let build = IntGaugeVec::new(Opts::new("smtpguard_build_info", "Build information"), &["version", "backend"]).expect("valid");
    build.with_label_values(&[env!("CARGO_PKG_VERSION"), BACKEND]).set(1);
    register(&r, packets);
    register(&r, resets);
    register(&r, active);
    register(&r, entries);
    register(&r, capacity);
    register(&r, generation);
    register(&r, build);
    m.register_reloads(&r);
    crate::metrics::encode(&r)
}

//! The fleet's Prometheus families, kept by the fleet's thread and
//! exported with the controller's.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

pub struct FleetMetrics {
    pub connected: IntGauge,
    /// Fleet bans seen by this host, by result: installed, own (its own,
    /// echoed), expired, or refused (unparsable, too_wide, over_cap).
    pub received: IntCounterVec,
    /// This host's bans sent to the fleet, by result (ok, failed).
    pub published: IntCounterVec,
    /// Bans lifted here because the fleet lifted them.
    pub lifted: IntCounter,
    /// Fleet bans made elsewhere that are installed here now.
    pub installed: IntGauge,
    /// The fleet policy revision in force (0: a local file).
    pub policy_revision: IntGauge,
    pub policy_rejected: IntCounter,
    /// Ban start on its origin host to its install here.
    pub propagation: Histogram,
    pub sessions: IntCounter,
}

impl FleetMetrics {
    pub fn new() -> Self {
        Self {
            connected: IntGauge::new("smtpguard_fleet_connected", "1 while the fleet's etcd is reachable and watched").expect("valid"),
            received: IntCounterVec::new(
                Opts::new("smtpguard_fleet_bans_received_total", "Fleet bans seen, by result: installed, own, expired, unparsable, too_wide, over_cap"),
                &["result"],
            )
            .expect("valid"),
            published: IntCounterVec::new(Opts::new("smtpguard_fleet_bans_published_total", "This host's bans sent to the fleet, by result"), &["result"])
                .expect("valid"),
            lifted: IntCounter::new("smtpguard_fleet_bans_lifted_total", "Bans lifted here because the fleet lifted them (smtpguard unban on any host)").expect("valid"),
            installed: IntGauge::new("smtpguard_fleet_bans", "Bans made on other hosts and installed here").expect("valid"),
            policy_revision: IntGauge::new("smtpguard_fleet_policy_revision", "The fleet policy revision in force here (0: a local policy file)").expect("valid"),
            policy_rejected: IntCounter::new("smtpguard_fleet_policy_rejected_total", "Fleet policy revisions this host could not apply").expect("valid"),
            propagation: Histogram::with_opts(
                HistogramOpts::new("smtpguard_fleet_ban_propagation_seconds", "From a ban's start on its origin host to its install here")
                    .buckets(vec![0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0]),
            )
            .expect("valid"),
            sessions: IntCounter::new("smtpguard_fleet_sessions_total", "Sessions with etcd begun (each begins with a full read)").expect("valid"),
        }
    }

    pub fn register(&self, r: &Registry) {
        let cs: [Box<dyn prometheus::core::Collector>; 9] = [
            Box::new(self.connected.clone()),
            Box::new(self.received.clone()),
            Box::new(self.published.clone()),
            Box::new(self.lifted.clone()),
            Box::new(self.installed.clone()),
            Box::new(self.policy_revision.clone()),
            Box::new(self.policy_rejected.clone()),
            Box::new(self.propagation.clone()),
            Box::new(self.sessions.clone()),
        ];
        for c in cs {
            r.register(c).expect("unique metric names");
        }
    }
}

impl Default for FleetMetrics {
    fn default() -> Self {
        Self::new()
    }
}

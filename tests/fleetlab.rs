//! A fleet of smtpguard hosts sharing one real etcd cluster.
//!
//! Each [`FleetHost`] is a [`PairLab`] (client and server namespaces, a
//! greeter on 25) with pins of its own, and a management link from its
//! SERVER namespace to the etcd namespace (`mgmt0`, `10.77.N.0/24`), so a
//! controller started there with `RunningController` reaches etcd at
//! [`FleetHost::endpoints`]. Hosts are named "a", "b", "c"...
//!
//! Dropping the lab drops the hosts (namespaces, pins), then the cluster.

use std::{path::Path, process::Command};

use anyhow::{bail, Context, Result};

use crate::{
    etcd::{ns_command, output_text, tls_flags, EtcdCluster, MgmtLink, TlsFiles, MGMT_IF},
    pairlab::{PairLab, RunningController, TestPins},
    smtpguard_bin,
};

/// One smtpguard host of the fleet.
pub struct FleetHost {
    /// "a", "b", "c"...
    pub name: String,
    pub lab: PairLab,
    /// Pins tagged `fleet_NAME`.
    pub pins: TestPins,
    /// The link to etcd from `lab.server`.
    pub link: MgmtLink,
    endpoints: String,
    tls: Option<TlsFiles>,
}

impl FleetHost {
    /// The `--fleet-etcd` value: every member's client URL as this host's
    /// server namespace reaches it.
    pub fn endpoints(&self) -> &str {
        &self.endpoints
    }

    /// CA, client certificate and key when the cluster uses TLS.
    pub fn tls(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    /// Runs `args` inside this host's server namespace (network only, so
    /// pins stay visible; killed after `etcd::EXEC_TIMEOUT`); returns exit
    /// code (-1 on a signal) and stdout followed by stderr. `args[0]` is
    /// the program.
    pub fn exec(&self, args: &[&str]) -> (i32, String) {
        let rest: Vec<String> = args[1..].iter().map(|a| a.to_string()).collect();
        output(ns_command(self.lab.server.name(), args[0], &rest))
    }

    /// `etcdctl ARGS` from this host's server namespace against
    /// [`Self::endpoints`], with the client certificate on a TLS cluster
    /// and no credentials (pass `--user`/`--password` in `args`).
    /// Defaults `--dial-timeout=2s --command-timeout=5s` come first.
    pub fn etcdctl(&self, args: &[&str]) -> (i32, String) {
        let mut full = vec![format!("--endpoints={}", self.endpoints), "--dial-timeout=2s".into(), "--command-timeout=5s".into()];
        if let Some(tls) = &self.tls {
            full.extend(tls_flags(tls));
        }
        full.extend(args.iter().map(|a| a.to_string()));
        output(ns_command(self.lab.server.name(), "etcdctl", &full))
    }

    /// Starts `smtpguard run` on this host's uplink `b0`, in the fleet as
    /// host [`Self::name`] (its state directory beside its policies), with
    /// `extra` arguments; ready (answering /healthz on `port`).
    pub fn start(&self, policy: &Path, port: u16, extra: &[&str]) -> Result<RunningController> {
        let state = self.pins.policy_dir().join("state").display().to_string();
        let mut args = vec!["--uplink", "b0", "--fleet-etcd", self.endpoints(), "--host-id", &self.name, "--state-dir", &state];
        args.extend_from_slice(extra);
        RunningController::start_on(&self.lab, &self.pins, policy, port, &args).with_context(|| format!("host {}", self.name))
    }

    /// `smtpguard ARGS` (an operator command: ban, unban, bans...) in this
    /// host's server namespace, with its pins; exit code and output.
    pub fn smtpguard(&self, args: &[&str]) -> (i32, String) {
        let bin = smtpguard_bin().display().to_string();
        let pins = self.pins.args();
        let full: Vec<&str> = std::iter::once(bin.as_str()).chain(args.iter().copied()).chain(pins.iter().map(String::as_str)).collect();
        self.exec(&full)
    }

    /// `smtpguard fleet ARGS --fleet-etcd ENDPOINTS` in this host's server
    /// namespace; exit code and output.
    pub fn fleet(&self, args: &[&str]) -> (i32, String) {
        let bin = smtpguard_bin().display().to_string();
        let full: Vec<&str> = [bin.as_str(), "fleet"].into_iter().chain(args.iter().copied()).chain(["--fleet-etcd", self.endpoints()]).collect();
        self.exec(&full)
    }

    /// Cuts (`false`) or restores (`true`) this host's link to etcd, as a
    /// partition: the interface goes down, the host keeps its data plane.
    pub fn set_etcd_link(&self, up: bool) -> Result<()> {
        self.lab.server.ip(&["link", "set", MGMT_IF, if up { "up" } else { "down" }])?;
        Ok(())
    }
}

fn output(mut cmd: Command) -> (i32, String) {
    match cmd.output() {
        Ok(out) => (out.status.code().unwrap_or(-1), output_text(&out)),
        Err(e) => (-1, format!("starting {cmd:?}: {e}")),
    }
}

/// An etcd cluster and hosts connected to it. Fields drop in order: the
/// hosts first, then the cluster.
pub struct FleetLab {
    pub hosts: Vec<FleetHost>,
    pub etcd: EtcdCluster,
}

impl FleetLab {
    /// `hosts` hosts (at most 26) and a healthy `members`-member (1 or 3)
    /// cluster on plain http.
    pub fn new(hosts: usize, members: usize) -> Result<Self> {
        Self::with_cluster(hosts, EtcdCluster::start(members)?)
    }

    /// As [`Self::new`], the cluster on https requiring client certificates.
    pub fn new_tls(hosts: usize, members: usize) -> Result<Self> {
        Self::with_cluster(hosts, EtcdCluster::start_tls(members)?)
    }

    fn with_cluster(hosts: usize, mut etcd: EtcdCluster) -> Result<Self> {
        if hosts > 26 {
            bail!("{hosts} hosts: at most 26 (named a..z)");
        }
        let mut list = Vec::with_capacity(hosts);
        for name in ('a'..='z').take(hosts) {
            let lab = PairLab::new().with_context(|| format!("host {name}'s namespaces"))?;
            let link = etcd.connect(&lab.server)?;
            let endpoints = etcd.endpoints_from(&lab.server);
            let tls = etcd.tls().cloned();
            list.push(FleetHost { name: name.to_string(), lab, pins: TestPins::new(&format!("fleet_{name}")), link, endpoints, tls });
        }
        Ok(Self { hosts: list, etcd })
    }

    /// The host named `name`.
    ///
    /// # Panics
    /// When there is none.
    pub fn host(&self, name: &str) -> &FleetHost {
        self.hosts.iter().find(|h| h.name == name).unwrap_or_else(|| panic!("no fleet host {name:?}"))
    }
}

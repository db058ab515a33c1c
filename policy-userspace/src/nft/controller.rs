//! `smtpguard run --backend nftables`: the policy loaded into smtpguard's
//! nftables table, reloaded in one transaction on SIGHUP or a file change,
//! base chains following the selected interfaces (rtnetlink), bans from
//! the rate meter escalated, metrics and events as with eBPF. Enforcement
//! lives in the table: the controller can stop, crash or restart while it
//! keeps judging; `smtpguard detach` deletes it.

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{bail, Context, Result};

use super::{bans, ruleset, Devices, Sizes};
use crate::{
    clock,
    controller::{give_back_memory, mtime, serve_and_read_policy, settled_change, watch_list, FileVersion, RunOptions, Signals},
    event_log::EventLog,
    events::{Event, Packet, ReloadResult},
    http,
    interfaces::{netlink, Role, Selection},
    metrics::PolicyView,
    policy::{load_for_reload, Compiled, Policy},
    privileges,
};

/// The file in the run directory that tells the operator commands which
/// backend enforces.
pub const BACKEND_FILE: &str = "backend";

/// Bans a source had, kept in the run directory (as long as the table:
/// both go at reboot and `detach`) so a restart still escalates: strikes,
/// and when the last ban started (Unix seconds).
type Strikes = HashMap<IpAddr, (u32, u64)>;

/// A source's strikes are forgotten a day after its last ban, as the eBPF
/// datapath forgets an idle source.
const STRIKES_KEPT_S: u64 = 86_400;

struct Controller {
    o: RunOptions,
    policy: Policy,
    compiled: Compiled,
    generation: u64,
    devices: Devices,
    watched: Vec<(PathBuf, Option<FileVersion>)>,
    last_seen: Option<Vec<Option<FileVersion>>>,
    state: std::sync::Arc<http::State>,
    events: EventLog,
    strikes: Strikes,
    sizes: Sizes,
    loader: super::Loader,
    /// The day a date-driven recompile was last tried.
    expiry_tried: Option<i64>,
}

fn preflight(o: &RunOptions) -> Result<()> {
    if !privileges::has_net_admin().context("reading this process's capabilities")? {
        bail!("smtpguard run --backend nftables needs CAP_NET_ADMIN (nothing was changed)");
    }
    if o.uplinks.is_empty() && o.tenants.is_empty() {
        bail!("name at least one --uplink or --tenant interface");
    }
    if o.pins.exists() {
        bail!(
            "the eBPF datapath is pinned in {} and enforcing: run `smtpguard detach` before switching this host to nftables (nothing was changed)",
            o.pins.dir.display()
        );
    }
    if o.fleet.is_some() {
        bail!("the fleet (--fleet-etcd) works with the eBPF backend only (docs/nftables.md); nothing was changed");
    }
    if let Err(e) = std::process::Command::new("nft").arg("--version").output() {
        bail!("running nft: {e} (install nftables; nothing was changed)");
    }
    Ok(())
}

impl Controller {
    fn strikes_file(&self) -> PathBuf {
        strikes_file(&self.o.pins.run_dir)
    }

    fn view(&self) -> PolicyView {
        PolicyView { generation: self.generation, ports: self.policy.ports.iter().map(|g| g.port).collect(), ..PolicyView::default() }
    }

    /// Loads the compiled policy and the base chains of `devices` as one
    /// transaction, and removes the base chains of devices gone.
    fn load(&mut self, compiled: &Compiled) -> Result<()> {
        self.loader.load(compiled, self.sizes, &self.devices)?;
        let stale: Vec<String> = super::base_chains()?.into_iter().filter(|c| !self.wanted_chains().contains(c)).collect();
        super::delete_chains(&stale)?;
        Ok(())
    }

    fn wanted_chains(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for u in &self.devices.uplinks {
            out.insert(ruleset::base_chain_name(false, u));
            out.insert(ruleset::base_chain_name(true, u));
        }
        for t in &self.devices.tenants {
            out.insert(ruleset::base_chain_name(false, t));
        }
        out
    }

    fn reload(&mut self, why: &str) {
        self.state.reload_started();
        let state = self.state.clone();
        let m = &state.metrics;
        m.last_reload_time.set(clock::unix_now_s());
        let started = Instant::now();
        let (compiled, diags) = load_for_reload(&self.o.policy, &self.o.policy_options);
        let result = match compiled {
            Some((policy, compiled)) => self.load(&compiled).map(|()| (policy, compiled)).map_err(|e| (vec![format!("{e:#}")], 0)),
            // Diagnostics keep the first errors of each kind and count the rest.
            None => Err((diags.errors().map(|d| d.to_string()).collect(), diags.suppressed_errors())),
        };
        let seconds = started.elapsed().as_secs_f64();
        m.reload_duration.observe(seconds);
        match result {
            Ok((policy, compiled)) => {
                self.generation += 1;
                self.policy = policy;
                self.compiled = compiled;
                self.watched = watch_list(&self.o.policy, &self.policy);
                m.reloads.with_label_values(&["ok"]).inc();
                m.last_reload_ok.set(1);
                tracing::info!("policy generation {} in force in nftables ({why}, {:.1} ms)", self.generation, seconds * 1e3);
                self.state.set_view(self.view());
                self.emit_reload(why, ReloadResult::Ok, (Vec::new(), 0), Some(seconds * 1e3));
            }
            Err((errors, more)) => {
                for w in &mut self.watched {
                    w.1 = mtime(&w.0);
                }
                m.reloads.with_label_values(&["rejected"]).inc();
                m.last_reload_ok.set(0);
                for e in &errors {
                    tracing::error!("{e}");
                }
                if more > 0 {
                    tracing::error!("... and {more} more error(s)");
                }
                tracing::error!("reload rejected ({why}); generation {} stays in force", self.generation);
                self.emit_reload(why, ReloadResult::Rejected, (errors, more), Some(seconds * 1e3));
            }
        }
        self.state.reload_ended();
        give_back_memory();
    }

    /// A `policy_reload` event; `errors` are the first ones and a count of the rest.
    fn emit_reload(&mut self, why: &str, result: ReloadResult, (errors, more_errors): (Vec<String>, usize), duration_ms: Option<f64>) {
        let ok = result == ReloadResult::Ok;
        let (policy, sha256, changed_by) = crate::events::policy_identity(&self.o.policy, None);
        let event = Event::PolicyReload {
            time: clock::now_rfc3339(),
            result,
            trigger: why.to_owned(),
            generation: self.generation,
            entries: ok.then(|| self.compiled.entries()),
            errors,
            more_errors,
            duration_ms,
            policy,
            sha256,
            changed_by,
        };
        self.events.emit(&event);
    }

    /// Whether a watched file changed and has since stayed unchanged for one poll.
    fn changed(&mut self) -> bool {
        settled_change(&self.watched, &mut self.last_seen)
    }

    /// Finds the bans the rate meter started since the last pass, counts
    /// the source's strikes and writes each back with its escalated length
    /// (one transaction), sending a `ban_added` event for each.
    fn escalate(&mut self) -> Result<()> {
        let fresh: Vec<bans::Ban> = bans::list_bans()?.into_iter().filter(|b| b.origin == bans::Origin::Meter).collect();
        if fresh.is_empty() {
            return Ok(());
        }
        let now = clock::unix_now_s() as u64;
        self.strikes.retain(|_, (_, last)| now.saturating_sub(*last) < STRIKES_KEPT_S);
        let mut rewrites = Vec::new();
        let recent_v6 = if fresh.iter().any(|b| b.net.addr().is_ipv6()) { bans::recently_banned_v6()? } else { Vec::new() };
        for b in fresh {
            // Strikes go by the ban's key (an IPv6 /64); the event names the address.
            let addr = b.net.addr();
            let shown = recent_v6.iter().find(|a| b.net.contains(&IpAddr::V6(**a))).map_or(addr, |a| IpAddr::V6(*a));
            // The ban sets are shared: lengths come from the direction that bans.
            let dirs = &self.compiled.config.direction;
            let dir = dirs.iter().find(|d| d.ban_threshold != 0).unwrap_or(&dirs[0]);
            let strikes = self.strikes.get(&addr).map_or(1, |(n, _)| n + 1);
            self.strikes.insert(addr, (strikes, now));
            let base = dir.ban_base_s.max(1) as u64;
            let factor = dir.ban_factor.max(1) as u64;
            let length = (1..strikes).fold(base, |l, _| l.saturating_mul(factor)).min(dir.ban_max_s.max(dir.ban_base_s) as u64);
            rewrites.push((b.net, length, bans::Origin::Auto { strikes }));
            let packet = Packet {
                time: clock::now_rfc3339(),
                direction: "unknown".into(),
                src: shown,
                // Not known: the ban outlived the packet.
                dst: if shown.is_ipv4() { IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED) } else { IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED) },
                sport: 0,
                dport: 0,
                port: None,
                reason: Some("rate_ban".into()),
                verdict: Some("drop".into()),
                rule: None,
                country: None,
            };
            self.events.emit(&Event::BanAdded { packet, count: 0, duration_s: length as u32, strikes });
        }
        bans::rewrite(&rewrites)?;
        let text = serde_json::to_string(&self.strikes.iter().map(|(a, (n, t))| (a.to_string(), (*n, *t))).collect::<HashMap<_, _>>())?;
        std::fs::write(self.strikes_file(), text).with_context(|| format!("writing {}", self.strikes_file().display()))?;
        Ok(())
    }

    /// A link notification: a base chain for what appeared, none for what went.
    fn link_changed(&mut self, change: netlink::LinkChange) {
        let selection = Selection::new(&self.o.uplinks, &self.o.tenants).expect("checked at start");
        let Some(role) = selection.role(&change.name) else { return };
        let list = match role {
            Role::Uplink => &mut self.devices.uplinks,
            Role::Tenant => &mut self.devices.tenants,
        };
        let known = list.contains(&change.name);
        match (change.present, known) {
            (true, false) => list.push(change.name.clone()),
            (false, true) => list.retain(|n| *n != change.name),
            _ => return,
        }
        let compiled = self.compiled.clone();
        let time = clock::now_rfc3339();
        match self.load(&compiled) {
            Ok(()) => {
                let event = if change.present {
                    tracing::info!("nftables: judging {} ({})", change.name, role.name());
                    Event::InterfaceAttached { time, interface: change.name, role: role.name().into(), ifindex: change.ifindex }
                } else {
                    if role == Role::Uplink {
                        tracing::error!("uplink {} is gone: nothing judges mail arriving on it until it comes back", change.name);
                    }
                    Event::InterfaceDetached { time, interface: change.name, role: role.name().into(), why: "the interface went away".into() }
                };
                self.events.emit(&event);
            }
            Err(e) => tracing::error!("nftables: following interface {}: {e:#}", change.name),
        }
    }
}

pub fn strikes_file(run_dir: &Path) -> PathBuf {
    run_dir.join("nftables-strikes.json")
}

fn read_strikes(path: &Path) -> Strikes {
    let Ok(text) = std::fs::read_to_string(path) else { return Strikes::new() };
    let parsed: HashMap<String, (u32, u64)> = serde_json::from_str(&text).unwrap_or_default();
    parsed.into_iter().filter_map(|(a, v)| Some((a.parse().ok()?, v))).collect()
}

pub fn run(o: RunOptions) -> Result<()> {
    if let Some(shadow) = &o.shadow {
        anyhow::bail!("--shadow {} needs the eBPF backend: nftables cannot judge a packet by a second policy without deciding by it (docs/nftables.md)", shadow.display());
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let _entered = rt.enter();
    let mut signals = Signals::install()?;
    preflight(&o)?;
    let selection = Selection::new(&o.uplinks, &o.tenants).context("nothing was changed")?;
    let (state, policy, compiled) = serve_and_read_policy(&o)?;
    std::fs::create_dir_all(&o.pins.run_dir).with_context(|| format!("creating {}", o.pins.run_dir.display()))?;
    let _lock = crate::pins::lock_dir(&o.pins.run_dir)?;
    std::fs::write(o.pins.run_dir.join(BACKEND_FILE), "nftables\n")?;
    let events = EventLog::open(o.events.as_deref(), state.metrics.event_write_failures.clone())
        .with_context(|| format!("opening {}", o.events.as_deref().unwrap_or(Path::new("stdout")).display()))?;
    let adopting = super::table_exists();
    let (links, mut link_changes) = rt.block_on(netlink::watch()).context("watching network interfaces (rtnetlink)")?;
    let mut devices = Devices::default();
    for (name, _) in &links {
        match selection.role(name) {
            Some(Role::Uplink) => devices.uplinks.push(name.clone()),
            Some(Role::Tenant) => devices.tenants.push(name.clone()),
            None => {}
        }
    }
    for u in selection.named_uplinks() {
        if !devices.uplinks.iter().any(|d| d == u) {
            if !o.wait_for_uplinks {
                bail!("interface {u} does not exist (nothing was changed); --wait-for-uplinks starts without it");
            }
            tracing::error!("uplink {u} is not there: nothing judges mail arriving on it until it appears");
        }
    }
    let sizes = Sizes { sources: o.capacities.sources };
    let mut c = Controller {
        strikes: read_strikes(&strikes_file(&o.pins.run_dir)),
        watched: watch_list(&o.policy, &policy),
        o: o.clone(),
        policy,
        compiled: compiled.clone(),
        generation: 1,
        devices,
        last_seen: None,
        state: state.clone(),
        events,
        sizes,
        loader: super::Loader::default(),
        expiry_tried: None,
    };
    let start = Instant::now();
    c.load(&compiled).context("loading the policy into nftables")?;
    let m = &state.metrics;
    m.reload_duration.observe(start.elapsed().as_secs_f64());
    m.reloads.with_label_values(&["ok"]).inc();
    m.last_reload_ok.set(1);
    m.last_reload_time.set(clock::unix_now_s());
    std::fs::write(o.pins.pid_file(), std::process::id().to_string())?;
    state.set_view(c.view());
    state.ready_nftables(sizes);
    tracing::info!(
        "{} policy from {} through nftables (table netdev {}); uplinks {:?}, tenants {:?}",
        if adopting { "took over the table; enforcing" } else { "enforcing" },
        o.policy.display(),
        ruleset::TABLE,
        c.devices.uplinks,
        c.devices.tenants
    );
    c.emit_reload(if adopting { "restart" } else { "start" }, ReloadResult::Ok, (Vec::new(), 0), None);
    privileges::notify("READY=1\nSTATUS=enforcing through nftables");
    let result = rt.block_on(control_loop(&mut c, &mut signals, &mut link_changes));
    tracing::info!("stopping; enforcement continues in nftables (smtpguard detach removes it)");
    let _ = std::fs::remove_file(o.pins.pid_file());
    result
}

async fn control_loop(c: &mut Controller, signals: &mut Signals, links: &mut (impl futures_util::Stream<Item = netlink::LinkChange> + Unpin)) -> Result<()> {
    use futures_util::StreamExt;
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        c.state.beat();
        tokio::select! {
            _ = signals.hup.recv() => c.reload("SIGHUP"),
            _ = signals.usr1.recv() => c.events.reopen("SIGUSR1"),
            _ = signals.term.recv() => break,
            _ = signals.int.recv() => break,
            _ = tick.tick() => {
                c.events.follow_rotation();
                if c.changed() {
                    c.reload("file change");
                } else if let Some(why) = crate::controller::date_change_due(&c.compiled, &mut c.expiry_tried) {
                    c.reload(why);
                }
                if let Err(e) = c.escalate() {
                    tracing::error!("nftables: recording the rate meter's bans: {e:#}");
                }
            }
            Some(change) = links.next() => c.link_changed(change),
        }
    }
    Ok(())
}

//! `smtpguard run`: attach, load the policy, reload it on demand, serve
//! metrics and stream events. Enforcement lives in the pinned objects; the
//! controller can stop, crash or restart without a packet going unjudged.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Instant, SystemTime},
};

use anyhow::{bail, Context, Result};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, Signal, SignalKind},
};

use crate::{
    clock,
    fleet::{self, bundle::PolicyCache, hosts::HostPolicy, metrics::FleetMetrics, settings::FleetOptions, FleetLink, PolicyOffer},
    dataplane::{bans::BanLock, Capacities, Dataplane},
    interfaces::{netlink, Change, Interfaces, Selection},
    event_log::EventLog,
    events::{Event, ReloadResult},
    http,
    metrics::{ControllerMetrics, PolicyView},
    privileges,
    commands::recovery::{BypassNote, PromoteRequest, PromoteResult, RollbackRequest, RollbackResult, ROLLBACK},
    shadow,
    known_good::{inputs_of, KnownGood},
    rule_hits::RuleBook,
    pins::Pins,
    policy::{self, load_and_compile, load_for_reload, time, Compiled, Policy},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpModeChoice {
    /// Native (driver) XDP, falling back to generic with a warning.
    Auto,
    Native,
    Generic,
}

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub policy: PathBuf,
    /// A candidate judged beside `policy` (`--shadow`).
    pub shadow: Option<PathBuf>,
    /// The fleet policy revision `policy` is (following the fleet).
    pub start_revision: Option<i64>,
    pub fleet: Option<crate::fleet::settings::FleetOptions>,
    pub state_dir: PathBuf,
    pub uplinks: Vec<String>,
    pub tenants: Vec<String>,
    /// Start without a named uplink; attach it when it appears.
    pub wait_for_uplinks: bool,
    pub xdp_mode: XdpModeChoice,
    pub backend: crate::nft::Backend,
    pub metrics_addr: SocketAddr,
    pub pins: Pins,
    pub events: Option<PathBuf>,
    pub policy_options: policy::ReadOptions,
    pub capacities: Capacities,
}

fn iface_exists(name: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(name) else { return false };
    // SAFETY: a valid C string.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

/// Everything that can be refused before anything changes.
fn preflight(o: &RunOptions) -> Result<()> {
    let missing = privileges::missing().context("reading this process's capabilities")?;
    if !missing.is_empty() {
        let list: Vec<String> = missing.iter().map(|(name, why)| format!("{name} ({why})")).collect();
        bail!("smtpguard run lacks {} (nothing was changed); run it as root, or with these capabilities (see deploy/systemd/smtpguard.service)", list.join(", "));
    }
    if o.uplinks.is_empty() && o.tenants.is_empty() {
        bail!("name at least one --uplink or --tenant interface");
    }
    if crate::nft::table_exists() {
        bail!("smtpguard's nftables table enforces on this host: run `smtpguard detach` before switching it to eBPF (nothing was changed)");
    }
    let selection = Selection::new(&o.uplinks, &o.tenants).context("nothing was changed")?;
    // A named uplink must be there at start (a typo is refused); tenant
    // interfaces come and go with VMs, and patterns match what appears.
    for i in selection.named_uplinks() {
        if !iface_exists(i) && !o.wait_for_uplinks {
            bail!("interface {i} does not exist (nothing was changed); --wait-for-uplinks starts without it");
        }
    }
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let parent = o.pins.dir.parent().unwrap_or(Path::new("/"));
    if !mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (Some(_), Some(mp), Some(fs)) = (f.next(), f.next(), f.next()) else { return false };
        fs == "bpf" && parent.starts_with(mp)
    }) {
        bail!("{} is not on a bpffs mount (mount -t bpf bpf /sys/fs/bpf)", o.pins.dir.display());
    }
    Ok(())
}

struct Controller {
    o: RunOptions,
    dp: Dataplane,
    policy: Policy,
    compiled: Compiled,
    generation: u64,
    watched: Vec<(PathBuf, Option<FileVersion>)>,
    /// What the metrics endpoint serves; it runs on a thread of its own.
    state: Arc<http::State>,
    events: EventLog,
    /// Modification times at the previous poll, for settling.
    last_seen: Option<Vec<Option<FileVersion>>>,
    /// The day an expiry reload was last tried, so a rejected one is not
    /// retried every second.
    expiry_tried: Option<i64>,
    /// The same for the shadow's candidate.
    shadow_expiry_tried: Option<i64>,
    interfaces: Interfaces,
    /// The fleet's thread, when the host is in one.
    fleet: Option<FleetLink>,
    /// The fleet policy revision in force (following the fleet).
    revision: Option<i64>,
    /// Why the last reload was rejected, until one is applied.
    last_error: Option<String>,
    /// Since when enforcement is bypassed, as last seen (`smtpguard bypass`).
    bypass_seen: Option<u64>,
    /// The policies applied last, for `smtpguard rollback`.
    known_good: KnownGood,
    /// A rollback whose reload has not finished yet.
    rollback: Option<RollbackRequest>,
    /// The rules in force and what they counted before (`rules.json`).
    rule_book: Option<Arc<RuleBook>>,
    /// The candidate judged beside the policy (`--shadow`), when loaded.
    shadow: Option<shadow::Loaded>,
    /// The candidate's files, polled like the policy's.
    shadow_watched: Vec<(PathBuf, Option<FileVersion>)>,
    shadow_last_seen: Option<Vec<Option<FileVersion>>>,
    /// The candidate was promoted and its files have not changed since.
    shadow_promoted: bool,
    /// `enforce_from` switches announced, by (direction, day).
    announced: std::collections::HashSet<(u8, i64)>,
}

/// What tells one version of a file from another: its mtime, and which
/// file it is (a path swapped to another file, as the kubelet swaps a
/// ConfigMap's `..data` link, may keep the same mtime) and its length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FileVersion {
    modified: Option<SystemTime>,
    dev: u64,
    ino: u64,
    len: u64,
}

/// The version of the file `p` names now (following links).
pub(crate) fn mtime(p: &Path) -> Option<FileVersion> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p).ok()?;
    Some(FileVersion { modified: m.modified().ok(), dev: m.dev(), ino: m.ino(), len: m.len() })
}

/// The policy file and every file it reads.
pub(crate) fn watch_list(path: &Path, p: &Policy) -> Vec<(PathBuf, Option<FileVersion>)> {
    let mut files = vec![path.to_path_buf()];
    files.extend(p.input_files());
    files.sort();
    files.dedup();
    files.into_iter().map(|f| {
        let t = mtime(&f);
        (f, t)
    }).collect()
}

/// A day `compiled` changes by itself has come (an exemption ended, or a
/// monitored direction starts to enforce): the reload's trigger, once a day
/// (`tried`: the day last tried, so a rejected recompile is not retried
/// every second).
pub(crate) fn date_change_due(compiled: &Compiled, tried: &mut Option<i64>) -> Option<&'static str> {
    let today = time::today();
    if compiled.next_expiry.is_none_or(|day| today < day) || *tried == Some(today) {
        return None;
    }
    *tried = Some(today);
    Some(if compiled.enforce_from.iter().flatten().any(|day| today >= *day) { "enforce_from" } else { "exemption expiry" })
}

/// Whether a watched file differs from the version in force and has stayed
/// as it is since the last poll (`last_seen`): a file caught half-written
/// is read on the next tick.
pub(crate) fn settled_change(watched: &[(PathBuf, Option<FileVersion>)], last_seen: &mut Option<Vec<Option<FileVersion>>>) -> bool {
    let now: Vec<Option<FileVersion>> = watched.iter().map(|(p, _)| mtime(p)).collect();
    let differs = watched.iter().zip(&now).any(|((_, t), n)| t != n);
    let settled = last_seen.as_ref() == Some(&now);
    *last_seen = Some(now);
    differs && settled
}

/// A reload being compiled off the control loop (file reads and parsing
/// can take seconds, or block on a bad file).
struct ReloadJob {
    why: &'static str,
    /// The policy file read, and the fleet revision it is (if one).
    path: PathBuf,
    revision: Option<i64>,
    started: Instant,
    compiled: tokio::task::JoinHandle<(Option<(Policy, Compiled)>, policy::Diagnostics)>,
}

/// The shadow's candidate being compiled, off the control loop as a
/// reload is (a candidate with a geo database takes a second or more).
struct ShadowJob {
    trigger: String,
    file: PathBuf,
    started: Instant,
    compiled: tokio::task::JoinHandle<(Option<(Policy, Compiled)>, policy::Diagnostics)>,
}

impl Controller {
    fn ports(&self) -> Vec<u16> {
        self.policy.ports.iter().map(|g| g.port).collect()
    }

    fn emit(&mut self, event: &Event) {
        self.events.emit(event);
    }

    /// The `policy_reload` event of an applied policy.
    fn applied_event(&self, trigger: &str, duration_ms: Option<f64>) -> Event {
        let (policy, sha256, changed_by) = crate::events::policy_identity(&self.o.policy, self.revision);
        Event::PolicyReload {
            time: clock::now_rfc3339(),
            result: ReloadResult::Ok,
            trigger: trigger.to_owned(),
            generation: self.generation,
            entries: Some(self.compiled.entries()),
            errors: Vec::new(),
            more_errors: 0,
            duration_ms,
            policy,
            sha256,
            changed_by,
        }
    }

    /// Starts compiling the policy files on the blocking pool.
    fn start_reload(&mut self, why: &'static str) -> ReloadJob {
        let (path, revision) = (self.o.policy.clone(), self.revision);
        self.start_reload_of(why, path, revision)
    }

    /// The same, of another policy file (a fleet revision).
    fn start_reload_of(&mut self, why: &'static str, path: PathBuf, revision: Option<i64>) -> ReloadJob {
        self.state.reload_started();
        self.state.metrics.last_reload_time.set(clock::unix_now_s());
        let (file, options) = (path.clone(), self.o.policy_options.clone());
        ReloadJob { why, path, revision, started: Instant::now(), compiled: tokio::task::spawn_blocking(move || load_for_reload(&file, &options)) }
    }

    /// What is in force, for the fleet's host record.
    fn host_policy(&self) -> HostPolicy {
        use policy_common::{direction, mode};
        let modes: Vec<String> = [("ingress", direction::INGRESS), ("egress", direction::EGRESS)]
            .iter()
            .map(|(name, d)| format!("{name} {}", if self.compiled.config.direction[*d as usize].mode == mode::MONITOR { "monitor" } else { "enforce" }))
            .collect();
        HostPolicy {
            source: if self.revision.is_some() { "fleet" } else { "file" }.into(),
            revision: self.revision,
            file: self.o.policy.display().to_string(),
            sha256: std::fs::read(&self.o.policy).map(|b| sha256_hex(&b)).unwrap_or_default(),
            generation: self.generation,
            mode: modes.join(", "),
            last_error: self.last_error.clone(),
        }
    }

    /// Tells the fleet's thread what is in force now.
    fn tell_fleet(&self) {
        if let Some(f) = &self.fleet {
            let _ = f.policy.send(self.host_policy());
        }
    }

    /// Applies a compiled reload into the inactive generation and flips to
    /// it. An invalid policy changes nothing.
    fn finish_reload(&mut self, job: ReloadJob, outcome: Result<(Option<(Policy, Compiled)>, policy::Diagnostics), tokio::task::JoinError>) {
        let why = job.why;
        let (path, revision) = (job.path.clone(), job.revision);
        let result = match outcome {
            Err(e) => Err((vec![format!("compiling the policy failed: {e}")], 0)),
            // Diagnostics keep the first errors of each kind and count the rest.
            Ok((None, diags)) => Err((diags.errors().map(|d| d.to_string()).collect::<Vec<_>>(), diags.suppressed_errors())),
            Ok((Some((policy, compiled)), _)) => {
                // The policy in force is the file this reload read from now on.
                let before = std::mem::replace(&mut self.o.policy, path.clone());
                let applied = self.apply(policy, compiled).map_err(|e| (vec![e.to_string()], 0));
                if applied.is_err() {
                    self.o.policy = before;
                }
                applied
            }
        };
        let seconds = job.started.elapsed().as_secs_f64();
        let applied = result.is_ok();
        let m = &self.state.metrics;
        m.reload_duration.observe(seconds);
        match result {
            Ok(()) => {
                m.reloads.with_label_values(&["ok"]).inc();
                m.last_reload_ok.set(1);
                tracing::info!("policy generation {} in force ({why}, {:.1} ms)", self.generation, seconds * 1e3);
                self.last_error = None;
                if revision.is_some() {
                    self.revision = revision;
                }
                if let (Some(f), Some(rev)) = (&self.fleet, revision) {
                    f.metrics.policy_revision.set(rev);
                    if let Err(e) = f.cache.mark_applied(rev, &path) {
                        tracing::error!("fleet: recording revision {rev} as applied: {e:#}");
                    }
                }
                privileges::notify(&format!("STATUS=enforcing policy generation {}", self.generation));
                let ev = self.applied_event(why, Some(seconds * 1e3));
                self.emit(&ev);
                self.keep_known_good(why);
            }
            Err((errors, more)) => {
                m.reloads.with_label_values(&["rejected"]).inc();
                m.last_reload_ok.set(0);
                for e in &errors {
                    tracing::error!("{e}");
                }
                if more > 0 {
                    tracing::error!("... and {more} more error(s)");
                }
                tracing::error!("reload rejected ({why}); generation {} stays in force", self.generation);
                let first = errors.first().cloned().unwrap_or_default();
                self.last_error = Some(match revision {
                    Some(rev) if revision != self.revision => format!("revision {rev}: {first}"),
                    _ => first,
                });
                if let Some(f) = &self.fleet {
                    if revision.is_some() && revision != self.revision {
                        f.metrics.policy_rejected.inc();
                    }
                }
                let (policy, sha256, changed_by) = crate::events::policy_identity(&path, revision);
                let ev = Event::PolicyReload {
                    time: clock::now_rfc3339(),
                    result: ReloadResult::Rejected,
                    trigger: why.to_owned(),
                    generation: self.generation,
                    entries: None,
                    errors,
                    more_errors: more,
                    duration_ms: Some(seconds * 1e3),
                    policy,
                    sha256,
                    changed_by,
                };
                self.emit(&ev);
            }
        }
        // Watch what the policy in force names. After a rejected edit the
        // policy file stays watched, so fixing it triggers the next reload.
        if applied {
            self.watched = watch_list(&self.o.policy, &self.policy);
        } else {
            for w in &mut self.watched {
                w.1 = mtime(&w.0);
            }
        }
        if why == ROLLBACK {
            if let Some(request) = self.rollback.take() {
                let result = RollbackResult { id: request.id, ok: applied, generation: self.generation, error: self.last_error.clone().filter(|_| !applied) };
                self.finish_rollback(result);
            }
        }
        self.state.reload_ended();
        self.tell_fleet();
        give_back_memory();
    }

    /// Loads the candidate `--shadow` names into the shadow generations,
    /// here and now (at start); an invalid one leaves the shadow as it
    /// was. Without `--shadow`, a shadow left in the pins by an earlier run
    /// is removed.
    fn load_shadow(&mut self, trigger: &str) {
        let Some(file) = self.shadow_file() else { return };
        let started = Instant::now();
        let (loaded, diags) = load_for_reload(&file, &self.o.policy_options);
        self.shadow_loaded(trigger, file, started, loaded, diags);
    }

    /// The same, compiled off the loop: [`Self::finish_shadow_load`] takes
    /// it from there.
    fn start_shadow_load(&mut self, trigger: &str) -> Option<ShadowJob> {
        let file = self.shadow_file()?;
        let (path, options) = (file.clone(), self.o.policy_options.clone());
        Some(ShadowJob { trigger: trigger.to_owned(), file, started: Instant::now(), compiled: tokio::task::spawn_blocking(move || load_for_reload(&path, &options)) })
    }

    fn finish_shadow_load(&mut self, job: ShadowJob, outcome: Result<(Option<(Policy, Compiled)>, policy::Diagnostics), tokio::task::JoinError>) {
        match outcome {
            Ok((loaded, diags)) => self.shadow_loaded(&job.trigger, job.file, job.started, loaded, diags),
            Err(e) => tracing::error!("compiling the shadow policy {} failed: {e}", job.file.display()),
        }
    }

    /// `--shadow`'s file; without one, a shadow an earlier run left is removed.
    fn shadow_file(&mut self) -> Option<PathBuf> {
        if self.o.shadow.is_none() {
            self.drop_leftover_shadow("no --shadow");
        }
        self.o.shadow.clone()
    }

    /// Removes a shadow the pins hold that this run has not loaded: judged
    /// on, it would count with no record of what it is.
    fn drop_leftover_shadow(&mut self, why: &str) {
        if self.shadow.is_some() || self.dp.maps().runtime().shadow == 0 {
            return;
        }
        match self.dp.remove_shadow() {
            Ok(()) => tracing::info!("removed the shadow policy an earlier run left ({why})"),
            Err(e) => tracing::warn!("removing the shadow policy an earlier run left: {e}"),
        }
        shadow::ShadowRecord::remove(&self.o.pins.run_dir);
    }

    /// Installs a compiled candidate as the shadow, or says why not.
    fn shadow_loaded(&mut self, trigger: &str, file: PathBuf, started: Instant, loaded: Option<(Policy, Compiled)>, diags: policy::Diagnostics) {
        let why = format!("shadow {trigger}");
        let (policy, sha256, changed_by) = crate::events::policy_identity(&file, None);
        let event = |result, generation, entries, errors: Vec<String>, more_errors| Event::PolicyReload {
            time: clock::now_rfc3339(),
            result,
            trigger: why.clone(),
            generation,
            entries,
            errors,
            more_errors,
            duration_ms: Some(started.elapsed().as_secs_f64() * 1e3),
            policy: policy.clone(),
            sha256: sha256.clone(),
            changed_by: changed_by.clone(),
        };
        let number = self.shadow.as_ref().map_or(0, |s| s.record.number) + 1;
        let outcome = match loaded {
            None => Err((diags.errors().map(|d| d.to_string()).collect::<Vec<_>>(), diags.suppressed_errors())),
            Some((p, c)) => match self.dp.install_shadow(&c, number) {
                Ok(generation) => Ok((p, c, generation)),
                Err(e) => Err((vec![e.to_string()], 0)),
            },
        };
        let ev = match outcome {
            Ok((p, c, generation)) => {
                let record = Arc::new(shadow::ShadowRecord::new(&file, (&p, &c), number, generation, self.ports()));
                if let Err(e) = record.write(&self.o.pins.run_dir) {
                    tracing::warn!("writing the shadow's record: {e}");
                }
                tracing::info!("shadow policy {} ({}) judged beside generation {}", file.display(), number, self.generation);
                self.shadow_watched = watch_list(&file, &p);
                let entries = c.entries();
                self.shadow = Some(shadow::Loaded { policy: p, compiled: c, record });
                self.publish_view();
                event(ReloadResult::Ok, number, Some(entries), Vec::new(), 0)
            }
            Err((errors, more)) => {
                for e in &errors {
                    tracing::error!("{e}");
                }
                tracing::error!("shadow policy {} rejected ({trigger}); {}", file.display(), if self.shadow.is_some() { "the one loaded stays" } else { "no shadow is judged" });
                self.drop_leftover_shadow("its candidate cannot be loaded");
                if self.shadow_watched.is_empty() {
                    self.shadow_watched = vec![(file.clone(), mtime(&file))];
                } else {
                    for w in &mut self.shadow_watched {
                        w.1 = mtime(&w.0);
                    }
                }
                event(ReloadResult::Rejected, number - 1, None, errors, more)
            }
        };
        self.emit(&ev);
    }

    /// Whether a file of the candidate changed and has settled.
    fn shadow_changed(&mut self) -> bool {
        !self.shadow_watched.is_empty() && settled_change(&self.shadow_watched, &mut self.shadow_last_seen)
    }

    /// `smtpguard promote`: the candidate, as judged, becomes the enforced
    /// policy in one swap, its file is written where `--policy` points, and
    /// the shadow goes.
    fn promote(&mut self, request: PromoteRequest) {
        let result = self.promote_candidate();
        let answer = PromoteResult {
            id: request.id,
            ok: result.is_ok(),
            generation: self.generation,
            error: result.as_ref().err().map(|e| format!("{e:#}")),
            not_written: result.as_ref().ok().cloned().flatten(),
        };
        match &result {
            Ok(_) => tracing::warn!("promoted the shadow policy (asked by {}): generation {} in force", request.by, self.generation),
            Err(e) => tracing::error!("promote refused: {e:#}"),
        }
        self.state.metrics.promotions.with_label_values(&[if answer.ok { "ok" } else { "failed" }]).inc();
        if let Err(e) = answer.write(&self.o.pins) {
            tracing::error!("writing the promote result: {e:#}");
        }
    }

    /// In force, or refused with nothing changed; in force but not
    /// written where --policy points gives why.
    fn promote_candidate(&mut self) -> Result<Option<String>> {
        if self.revision.is_some() {
            bail!("this host follows the fleet policy: push the candidate to the fleet instead (smtpguard fleet push)");
        }
        let Some(loaded) = self.shadow.take() else { bail!("no shadow policy is loaded") };
        let candidate = loaded.record.file.clone();
        let text = match self.promotable(&loaded) {
            Ok(text) => text,
            Err(e) => {
                self.shadow = Some(loaded);
                return Err(e);
            }
        };
        let started = Instant::now();
        let (policy, compiled) = (loaded.policy.clone(), loaded.compiled.clone());
        if let Err(e) = self.apply(policy, compiled) {
            self.shadow = Some(loaded);
            return Err(e);
        }
        // Compiled on another day, it may be due again today.
        self.expiry_tried = None;
        // In force; now where --policy points, the old file kept aside.
        let not_written = crate::files::replace_keeping(&self.o.policy, &text, ".before-promote", std::fs::read(&self.o.policy).ok().as_deref()).err().map(|e| {
            let why = format!("writing it to {} failed: {e}; a restart would enforce the old file: copy {} there", self.o.policy.display(), candidate.display());
            tracing::error!("the candidate is in force, but {why}");
            why
        });
        // Its file stays watched: an edit starts the next dual run; a
        // SIGHUP alone does not bring it back.
        self.shadow_promoted = true;
        self.watched = watch_list(&self.o.policy, &self.policy);
        self.last_seen = None;
        if let Err(e) = self.dp.remove_shadow() {
            tracing::warn!("removing the shadow after the promote: {e}");
        }
        shadow::ShadowRecord::remove(&self.o.pins.run_dir);
        self.publish_view();
        let m = &self.state.metrics;
        m.reloads.with_label_values(&["ok"]).inc();
        m.reload_duration.observe(started.elapsed().as_secs_f64());
        let ev = self.applied_event("promote", Some(started.elapsed().as_secs_f64() * 1e3));
        self.emit(&ev);
        self.keep_known_good("promote");
        self.tell_fleet();
        Ok(not_written)
    }

    /// The candidate's text, when what a restart would read from where
    /// --policy points is what was judged; else why not.
    fn promotable(&self, loaded: &shadow::Loaded) -> Result<Vec<u8>> {
        let candidate = &loaded.record.file;
        // Paths in a policy (list files, the geo database) are relative to
        // its own directory: written where --policy points, the candidate
        // must still read the same files.
        let (from, to) = (candidate.parent().unwrap_or(Path::new("")), self.o.policy.parent().unwrap_or(Path::new("")));
        if from != to {
            if let Some(file) = loaded.policy.input_files().into_iter().find(|f| f != candidate && f.starts_with(from)) {
                bail!("the candidate reads {} from its own directory, which is not the directory of {}: keep both in one directory", file.display(), self.o.policy.display());
            }
        }
        // The candidate and its list files as loaded.
        let mut text = Vec::new();
        for (file, sha256) in inputs_of(candidate, &loaded.policy) {
            let t = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            if sha256_hex(&t) != sha256 {
                bail!("{} changed since the candidate was loaded as the shadow: let it reload, check `smtpguard shadow` again, then promote", file.display());
            }
            if file == *candidate {
                text = t;
            }
        }
        Ok(text)
    }

    /// Keeps the policy now in force as known-good (`smtpguard rollback`).
    fn keep_known_good(&self, trigger: &str) {
        let (_, _, changed_by) = crate::events::policy_identity(&self.o.policy, self.revision);
        if let Err(e) = self.known_good.record(self.generation, &inputs_of(&self.o.policy, &self.policy), trigger, changed_by) {
            tracing::warn!("keeping policy generation {} as known-good: {e:#}", self.generation);
        }
    }

    /// A SIGHUP, taken when no reload compiles: the promote `smtpguard
    /// promote` asked for (done here), the rollback `smtpguard rollback`
    /// asked for (its files put back first; `None` when that failed:
    /// nothing changed), or else a reload of the policy and the shadow.
    fn on_hup(&mut self) -> Option<&'static str> {
        if let Some(request) = PromoteRequest::take(&self.o.pins) {
            self.promote(request);
            return None;
        }
        let Some(request) = RollbackRequest::take(&self.o.pins) else { return Some("SIGHUP") };
        let restored = if self.revision.is_some() {
            Err(anyhow::anyhow!("this host follows the fleet policy: push the revision to go back to (smtpguard fleet push)"))
        } else {
            self.known_good.target(request.to, self.generation).and_then(|target| Ok((target.clone(), self.known_good.restore(&target)?)))
        };
        match restored {
            Ok((to, files)) => {
                tracing::warn!("rolling back to known-good #{} (the policy of generation {}, asked by {}); files restored: {}", to.number, to.generation, request.by, files.len());
                self.emit(&Event::Rollback {
                    time: clock::now_rfc3339(),
                    known_good: Some(to.number),
                    to_generation: Some(to.generation),
                    by: request.by.clone(),
                    restored: files.iter().map(|f| f.display().to_string()).collect(),
                    error: None,
                });
                self.rollback = Some(request);
                Some(ROLLBACK)
            }
            Err(e) => {
                tracing::error!("rollback refused: {e:#}");
                self.emit(&Event::Rollback { time: clock::now_rfc3339(), known_good: request.to, to_generation: None, by: request.by.clone(), restored: Vec::new(), error: Some(format!("{e:#}")) });
                self.finish_rollback(RollbackResult { id: request.id, ok: false, generation: self.generation, error: Some(format!("{e:#}")) });
                None
            }
        }
    }

    fn finish_rollback(&self, result: RollbackResult) {
        self.state.metrics.rollbacks.with_label_values(&[if result.ok { "ok" } else { "failed" }]).inc();
        if let Err(e) = result.write(&self.o.pins) {
            tracing::error!("writing the rollback's result: {e:#}");
        }
    }

    /// Announces a switch of the fail-open lever (the datapath obeyed it at
    /// once; this is the audit trail): a `bypass` event, a counter, the log.
    fn watch_bypass(&mut self, trigger: &str) {
        let now = self.dp.maps().bypass().since();
        if now == self.bypass_seen {
            return;
        }
        self.bypass_seen = now;
        let note = now.and_then(|since| BypassNote::read(&self.o.pins, since));
        let state = if now.is_some() { "on" } else { "off" };
        if let Some(since) = now {
            tracing::warn!(
                "enforcement bypassed since {}{}: drops pass as would_drop until `smtpguard bypass off`",
                clock::rfc3339_of_unix(since),
                note.as_ref().map(|n| format!(" by {}", n.by)).unwrap_or_default()
            );
        } else {
            tracing::info!("enforcement restored (smtpguard bypass off)");
        }
        if trigger != "start" || now.is_some() {
            self.state.metrics.bypass_changes.with_label_values(&[state]).inc_by(u64::from(trigger != "start"));
            let ev = Event::Bypass {
                time: clock::now_rfc3339(),
                state: state.into(),
                since: now.map(clock::rfc3339_of_unix),
                by: note.as_ref().map(|n| n.by.clone()),
                reason: note.and_then(|n| n.reason),
                trigger: trigger.into(),
            };
            self.emit(&ev);
        }
    }

    fn apply(&mut self, policy: Policy, compiled: Compiled) -> Result<()> {
        let number = self.generation + 1;
        let replaced = self.dp.active_generation();
        let active = self.dp.swap(&compiled, number)?;
        // The replaced generation is idle now (the swap waited a grace
        // period): its counts are final. Published before they are zeroed,
        // so a scrape never sees a rule's count go down.
        let counts = self.dp.maps().rule_hits(replaced).unwrap_or_default();
        let book = RuleBook::of(&compiled, number, active, self.rule_book.as_deref().map(|b| (b, &counts[..])));
        if let Err(e) = book.write(&self.o.pins.run_dir) {
            tracing::warn!("writing {}: {e}", self.o.pins.run_dir.join("rules.json").display());
        }
        self.rule_book = Some(Arc::new(book));
        self.generation = number;
        self.policy = policy;
        self.compiled = compiled;
        // The shadow's counters name ports by the policy's slots: counted
        // under other ports, they start again (the swap waited a grace
        // period, so no packet is judged by the old slots any more).
        let ports = self.ports();
        if let Some(shadow) = self.shadow.as_mut().filter(|s| s.record.ports != ports) {
            if let Err(e) = self.dp.restart_shadow_counts() {
                tracing::warn!("clearing the shadow's counts: {e}");
            }
            tracing::info!("the policy's ports changed: the shadow's differences are counted again from now");
            let record = shadow::ShadowRecord { ports, loaded_at: clock::now_rfc3339(), ..(*shadow.record).clone() };
            if let Err(e) = record.write(&self.o.pins.run_dir) {
                tracing::warn!("writing the shadow's record: {e}");
            }
            shadow.record = Arc::new(record);
        }
        self.publish_view();
        if let Err(e) = self.dp.zero_rule_hits(replaced) {
            tracing::warn!("zeroing the replaced generation's rule hits: {e}");
        }
        Ok(())
    }

    /// Tells the metrics endpoint what is in force now.
    fn publish_view(&mut self) {
        let (_, acl6_entries) = self.dp.acl_entry_counts();
        let Ok((acl4_used, acl4_room)) = self.dp.acl4_usage() else { return };
        self.state.set_view(PolicyView {
            generation: self.generation,
            ports: self.ports(),
            countries: self.compiled.countries.clone(),
            acl6_entries,
            acl4_used,
            acl4_room,
            interfaces: self.interfaces.view(),
            missing_uplinks: self.interfaces.selection().named_uplinks().filter(|n| self.interfaces.view().iter().all(|v| v.name != *n)).map(str::to_owned).collect(),
            suspect_window_s: self.compiled.config.direction[policy_common::direction::EGRESS as usize].suspect_window_s,
            rules: self.rule_book.clone(),
            shadow: self.shadow.as_ref().map(|s| s.record.clone()),
            enforce_from: self.compiled.enforce_from,
            rate_limited: std::array::from_fn(|d| self.compiled.config.direction[d].rate_enabled != 0),
        });
    }

    /// Whether a watched file changed and has since stayed unchanged for
    /// one poll: a file caught half-written is read on the next tick.
    fn changed(&mut self) -> bool {
        settled_change(&self.watched, &mut self.last_seen)
    }

    fn expiry_due(&mut self) -> Option<&'static str> {
        date_change_due(&self.compiled, &mut self.expiry_tried)
    }

    /// The same for the candidate: compiled for another day, it would
    /// count differences its promoted self would not make.
    fn shadow_expiry_due(&mut self) -> Option<&'static str> {
        date_change_due(&self.shadow.as_ref()?.compiled, &mut self.shadow_expiry_tried)
    }

    /// Says a day ahead (once per direction and date) that a monitored
    /// direction starts to enforce: an event and the log; the metric
    /// `smtpguard_enforce_from_timestamp_seconds` says it all along.
    fn announce_enforcement(&mut self) {
        let now = clock::unix_now_s();
        for (d, day) in self.compiled.enforce_from.into_iter().enumerate() {
            let Some(day) = day else { continue };
            let at = day as f64 * 86_400.0;
            if at - now > 86_400.0 || !self.announced.insert((d as u8, day)) {
                continue;
            }
            let direction = policy_common::direction::NAMES[d];
            tracing::warn!("{direction} switches from monitor to enforce at {}T00:00Z, in {:.1} h", time::format_date(day), (at - now) / 3600.0);
            let ev = Event::EnforceScheduled {
                time: clock::now_rfc3339(),
                direction: direction.to_owned(),
                enforce_from: time::format_date(day),
                hours_left: ((at - now) / 3600.0 * 10.0).round() / 10.0,
            };
            self.emit(&ev);
        }
    }

    fn drain_events(&mut self) {
        let Ok(evs) = self.dp.drain_events() else { return };
        let ports = self.ports();
        for e in evs {
            if e.kind == policy_common::event_kind::BAN_ADDED {
                if let Some(f) = &self.fleet {
                    f.ban_started.notify_one();
                }
            }
            if e.kind == policy_common::event_kind::TENANT_SUSPECT {
                self.tenant_suspect(&e);
                continue;
            }
            let event = if e.kind == policy_common::event_kind::SHADOW_DIFF {
                let Some(shadow) = &self.shadow else { continue };
                Event::shadow_difference(&e, &self.compiled, &ports, &shadow.record)
            } else {
                Event::from_datapath(&e, &self.compiled, &ports)
            };
            self.emit(&event);
        }
    }

    /// A source behind a tenant interface went over the policy's blocked
    /// connections: reported, and quarantined where the policy says so.
    fn tenant_suspect(&mut self, e: &policy_common::Event) {
        let interface = self.interfaces.name_of(e.ifindex).map(str::to_owned).unwrap_or_else(|| format!("ifindex {}", e.ifindex));
        let packet = crate::events::Packet::from_datapath(e, &self.compiled, &self.ports());
        let quarantine_s = self.compiled.quarantine_s;
        tracing::warn!("tenant suspect: {} behind {interface} had {} new connections blocked within {} s", packet.src, e.count, e.duration_s);
        if quarantine_s > 0 {
            if let Err(err) = self.quarantine(packet.src, quarantine_s) {
                tracing::error!("quarantining {} failed: {err:#}", packet.src);
            }
        }
        self.state.metrics.tenant_suspects.with_label_values(&[&interface]).inc();
        let event = Event::TenantSuspect { time: packet.time, interface, src: packet.src, blocked: e.count, window_s: e.duration_s, quarantine_s };
        self.emit(&event);
    }

    fn quarantine(&mut self, addr: std::net::IpAddr, seconds: u32) -> Result<()> {
        let lock = BanLock::take(&self.o.pins.ban_lock_dir())?;
        self.dp.maps_mut().quarantine_source(&lock, addr, std::time::Duration::from_secs(seconds as u64))?;
        self.state.metrics.quarantines.inc();
        Ok(())
    }

    /// A link notification: attach what appeared, detach what went.
    fn link_changed(&mut self, change: netlink::LinkChange) {
        let result = if change.present {
            self.interfaces.appeared(&mut self.dp, &change.name, change.ifindex)
        } else {
            self.interfaces.gone(&mut self.dp, &change.name, change.ifindex).map(|c| c.into_iter().collect())
        };
        match result {
            Ok(changes) => {
                let any = !changes.is_empty();
                for c in changes {
                    self.report(c);
                }
                if any {
                    self.publish_view();
                }
            }
            Err(e) => tracing::error!("interface {} ({}): {e:#}", change.name, if change.present { "appeared" } else { "went away" }),
        }
    }

    /// Logs an interface change and sends its event.
    fn report(&mut self, change: Change) {
        let time = clock::now_rfc3339();
        let event = match change {
            Change::Attached { name, role, ifindex, adopted } => {
                tracing::info!("{} {name} ({}, ifindex {ifindex})", if adopted { "adopted" } else { "attached to" }, role.name());
                Event::InterfaceAttached { time, interface: name, role: role.name().into(), ifindex }
            }
            Change::Detached { name, role, why } => {
                tracing::info!("detached from {name} ({}): {why}", role.name());
                let _ = self.state.metrics.tenant_suspects.remove_label_values(&[&name]);
                Event::InterfaceDetached { time, interface: name, role: role.name().into(), why: why.into() }
            }
            Change::UplinkMissing { name } => {
                tracing::error!("uplink {name} is gone: nothing judges mail arriving on it until it comes back (it is attached again then)");
                Event::UplinkMissing { time, interface: name }
            }
            Change::StalePin { pin, why } => {
                tracing::warn!("removed the stale pin {pin}: {why}");
                Event::StalePin { time, pin, why: why.into() }
            }
        };
        self.emit(&event);
    }
}

/// Hands freed heap back to the kernel: a rejected policy of a million
/// lines should not leave the controller that much larger.
pub(crate) fn give_back_memory() {
    // SAFETY: malloc_trim has no preconditions.
    unsafe { libc::malloc_trim(0) };
}

/// The signals the controller answers. Installed first thing, so a
/// SIGHUP during start-up is a reload once started, never the default
/// disposition's exit.
pub(crate) struct Signals {
    pub hup: Signal,
    pub term: Signal,
    pub int: Signal,
    pub usr1: Signal,
}

impl Signals {
    pub fn install() -> Result<Self> {
        let on = |kind: SignalKind| signal(kind).context("installing signal handlers");
        Ok(Self { hup: on(SignalKind::hangup())?, term: on(SignalKind::terminate())?, int: on(SignalKind::interrupt())?, usr1: on(SignalKind::user_defined1())? })
    }
}

pub fn run(o: RunOptions) -> Result<()> {
    if o.backend == crate::nft::Backend::Nftables {
        return crate::nft::controller::run(o);
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let _entered = rt.enter();
    let mut signals = Signals::install()?;
    preflight(&o)?;
    // Bound before anything changes: a busy port refuses the start whole.
    let (state, policy, compiled) = serve_and_read_policy(&o)?;
    o.pins.create().with_context(|| format!("creating {} and {}", o.pins.dir.display(), o.pins.run_dir.display()))?;
    let _lock = o.pins.lock()?;
    let events = EventLog::open(o.events.as_deref(), state.metrics.event_write_failures.clone())
        .with_context(|| format!("opening {}", o.events.as_deref().unwrap_or(Path::new("stdout")).display()))?;
    let adopting = o.pins.exists();
    let dp = Dataplane::load(o.capacities, Some(&o.pins.dir)).context("loading the datapath")?;
    let generation = if adopting { dp.maps().policy(dp.active_generation())?.generation } else { 0 };
    let watched = watch_list(&o.policy, &policy);
    let interfaces = Interfaces::new(Selection::new(&o.uplinks, &o.tenants)?, o.pins.clone(), o.xdp_mode);
    let mut c = Controller {
        o: o.clone(),
        dp,
        policy,
        compiled,
        generation,
        watched,
        state: state.clone(),
        events,
        last_seen: None,
        expiry_tried: None,
        shadow_expiry_tried: None,
        interfaces,
        fleet: None,
        revision: o.start_revision,
        last_error: None,
        bypass_seen: None,
        known_good: KnownGood::new(&o.state_dir),
        rollback: None,
        rule_book: None,
        shadow: None,
        shadow_watched: Vec::new(),
        shadow_promoted: false,
        shadow_last_seen: None,
        announced: Default::default(),
    };
    // The hits the pinned generation counted, named as its controller
    // named them (otherwise they are let go at the first swap).
    if adopting {
        let active = c.dp.active_generation();
        c.rule_book = RuleBook::read(&o.pins.run_dir).filter(|b| b.kernel_generation == active && b.generation == generation).map(Arc::new);
    }
    // Load the policy before attaching, so the first packet a new link
    // judges already has it; adopted links judge by the pinned one meanwhile.
    let (p, comp) = (c.policy.clone(), c.compiled.clone());
    let start = Instant::now();
    c.apply(p, comp).context("loading the policy into the datapath")?;
    // Kept at once: the files are as compiled (a later edit would be refused).
    c.keep_known_good(if adopting { "restart" } else { "start" });
    c.load_shadow(if adopting { "restart" } else { "start" });
    let m = &state.metrics;
    m.reload_duration.observe(start.elapsed().as_secs_f64());
    m.reloads.with_label_values(&["ok"]).inc();
    m.last_reload_ok.set(1);
    m.last_reload_time.set(clock::unix_now_s());
    // Subscribed before the interfaces are listed: one created in between
    // is seen twice, never missed.
    let (links, mut link_changes) = rt.block_on(netlink::watch()).context("watching network interfaces (rtnetlink)")?;
    let changes = c.interfaces.start(&mut c.dp, &links)?;
    for change in changes {
        c.report(change);
    }
    c.dp.programs().pin(&o.pins.dir)?;
    // The new programs are in every link now: what older pins held is
    // carried over without a count lost.
    if let Some(report) = c.dp.finish_upgrade().context("upgrading the pinned maps")? {
        tracing::info!(
            "upgraded the pinned maps from layout {} to {}: bans, buckets and network bans kept{}",
            report.from,
            policy_common::LAYOUT_VERSION,
            report.carried.iter().map(|c| format!(", {c} carried over")).collect::<String>()
        );
    }
    std::fs::write(o.pins.pid_file(), std::process::id().to_string())?;
    std::fs::write(o.pins.run_dir.join(crate::nft::controller::BACKEND_FILE), "ebpf\n")?;
    // The view first: once /healthz answers, /metrics lists every interface.
    c.publish_view();
    state.ready(c.dp.observer()?);
    tracing::info!(
        "{} policy generation {} from {}; pins in {}",
        if adopting { "adopted pinned state;" } else { "enforcing" },
        c.generation,
        o.policy.display(),
        o.pins.dir.display()
    );
    let started = c.applied_event(if adopting { "restart" } else { "start" }, None);
    c.emit(&started);
    c.watch_bypass("start");
    privileges::notify(&format!("READY=1\nSTATUS=enforcing policy generation {}", c.generation));
    // The fleet comes after enforcement: etcd away never delays it.
    let mut offers = match &o.fleet {
        Some(f) => Some(join_fleet(&mut c, f)?),
        None => None,
    };
    let result = rt.block_on(control_loop(&mut c, &mut signals, &mut link_changes, &mut offers));
    tracing::info!("stopping; enforcement continues from {} (smtpguard detach removes it)", o.pins.dir.display());
    let _ = std::fs::remove_file(o.pins.pid_file());
    result
}

/// What both backends do first, before anything changes: bind the metrics
/// port (a busy one refuses the start whole) and serve it, then read the
/// first policy, which must be valid.
pub(crate) fn serve_and_read_policy(o: &RunOptions) -> Result<(Arc<http::State>, Policy, Compiled)> {
    let listener = std::net::TcpListener::bind(o.metrics_addr).with_context(|| format!("binding metrics on {} (nothing was changed)", o.metrics_addr))?;
    let state = http::State::new(ControllerMetrics::new());
    http::spawn(listener, state.clone()).context("starting the metrics server")?;
    let (compiled, diags) = load_and_compile(&o.policy, &o.policy_options);
    for line in diags.to_string().lines() {
        tracing::warn!("{line}");
    }
    let Some((policy, compiled)) = compiled else { bail!("{}: the policy is not valid; nothing was changed", o.policy.display()) };
    Ok((state, policy, compiled))
}

/// Starts the fleet's thread; returns where its policy revisions arrive.
fn join_fleet(c: &mut Controller, f: &FleetOptions) -> Result<tokio::sync::mpsc::UnboundedReceiver<PolicyOffer>> {
    f.connection.record(&c.o.pins.run_dir, &f.host_id)?;
    let metrics = Arc::new(FleetMetrics::new());
    let _ = c.state.metrics.fleet.set(metrics.clone());
    metrics.policy_revision.set(c.revision.unwrap_or(0));
    let (link, offers) = fleet::start(f.clone(), c.o.pins.clone(), PolicyCache::new(&c.o.state_dir), metrics, c.host_policy())?;
    c.fleet = Some(link);
    tracing::info!("fleet: host {} joins the fleet at {} (prefix {}){}", f.host_id, f.connection.endpoints.join(","), f.connection.prefix, if f.follow_policy { ", following its policy" } else { "" });
    Ok(offers)
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// The next fleet policy revision, or never outside a fleet.
async fn next_offer(offers: &mut Option<tokio::sync::mpsc::UnboundedReceiver<PolicyOffer>>) -> Option<PolicyOffer> {
    match offers {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn control_loop(
    c: &mut Controller,
    signals: &mut Signals,
    links: &mut (impl futures_util::Stream<Item = netlink::LinkChange> + Unpin),
    offers: &mut Option<tokio::sync::mpsc::UnboundedReceiver<PolicyOffer>>,
) -> Result<()> {
    use futures_util::StreamExt;
    let ring_fd = c.dp.events_fd()?;
    // SAFETY: the fd is ours (a dup) and stays open while registered.
    let ring = unsafe { AsyncFd::register(ring_fd) }.map_err(|e| anyhow::anyhow!("watching the event ring buffer: {e:?}"))?;
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    let mut job: Option<ReloadJob> = None;
    // A reload asked for while one compiles runs after it, once; a fleet
    // revision likewise (the latest).
    let mut queued: Option<&'static str> = None;
    let mut queued_offer: Option<PolicyOffer> = None;
    // A SIGHUP while a reload compiles is taken after it: a promote or a
    // rollback it carries must not be overwritten by that reload's result.
    let mut hup_pending = false;
    // The shadow's candidate compiles likewise, one at a time.
    let mut shadow_job: Option<ShadowJob> = None;
    let mut shadow_queued: Option<&'static str> = None;
    loop {
        c.state.beat();
        let mut wanted = None;
        let mut shadow_wanted = None;
        tokio::select! {
            _ = signals.hup.recv() => {
                if job.is_some() {
                    hup_pending = true;
                } else {
                    wanted = c.on_hup();
                }
            }
            _ = signals.usr1.recv() => c.events.reopen("SIGUSR1"),
            _ = signals.term.recv() => break,
            _ = signals.int.recv() => break,
            _ = tick.tick() => {
                c.events.follow_rotation();
                if c.changed() {
                    wanted = Some("file change");
                } else if let Some(why) = c.expiry_due() {
                    wanted = Some(why);
                }
                c.announce_enforcement();
                c.drain_events();
                c.watch_bypass("command");
                if c.shadow_changed() {
                    c.shadow_promoted = false;
                    shadow_wanted = Some("file change");
                } else if let Some(why) = c.shadow_expiry_due() {
                    shadow_wanted = Some(why);
                }
            }
            Some(change) = links.next() => c.link_changed(change),
            Some(offer) = next_offer(offers) => queued_offer = Some(offer),
            ready = ring.readable() => {
                if let Ok(mut guard) = ready {
                    c.drain_events();
                    guard.clear_ready();
                }
            }
            outcome = async { (&mut job.as_mut().expect("guarded by the condition").compiled).await }, if job.is_some() => {
                let done = job.take().expect("guarded by the condition");
                c.finish_reload(done, outcome);
                // What the SIGHUP asks for reads the files anew: it covers a queued reload.
                let from_hup = if std::mem::take(&mut hup_pending) { c.on_hup() } else { None };
                wanted = from_hup.or(queued.take());
            }
            outcome = async { (&mut shadow_job.as_mut().expect("guarded by the condition").compiled).await }, if shadow_job.is_some() => {
                let done = shadow_job.take().expect("guarded by the condition");
                c.finish_shadow_load(done, outcome);
                shadow_wanted = shadow_queued.take();
            }
        }
        // A SIGHUP reloads the shadow too, unless it was promoted (its
        // file unchanged since).
        if wanted == Some("SIGHUP") && !c.shadow_promoted {
            shadow_wanted = Some("SIGHUP");
        }
        if let Some(why) = shadow_wanted {
            if shadow_job.is_some() {
                shadow_queued = Some(why);
            } else {
                shadow_job = c.start_shadow_load(why);
            }
        }
        if job.is_none() {
            if let Some(offer) = queued_offer.take() {
                tracing::info!("applying fleet policy revision {} ({})", offer.revision, offer.policy_file.display());
                job = Some(c.start_reload_of("fleet policy", offer.policy_file, Some(offer.revision)));
            }
        }
        if let Some(why) = wanted {
            if job.is_some() {
                // A rollback's reload answers its request: never folded into another.
                queued = if why == ROLLBACK { Some(why) } else { queued.or(Some(why)) };
            } else {
                job = Some(c.start_reload(why));
            }
        }
    }
    Ok(())
}

//! The recovery levers: `smtpguard bypass` (fail open in one map write)
//! and `smtpguard rollback` (re-apply a known-good policy).

use std::path::PathBuf;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::{clock, dataplane::maps::Maps, nft, pins::Pins};

/// Who switched enforcement off and why, beside the pins (the switch
/// itself is the pinned `BYPASS` word): what `status` and the controller's
/// `bypass` event say.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BypassNote {
    pub since: u64,
    pub by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl BypassNote {
    pub fn path(pins: &Pins) -> PathBuf {
        pins.run_dir.join("bypass.json")
    }

    /// The note of the switch turned off at `since` (none, or a stale one: `None`).
    pub fn read(pins: &Pins, since: u64) -> Option<Self> {
        let note: Self = serde_json::from_str(&std::fs::read_to_string(Self::path(pins)).ok()?).ok()?;
        (note.since == since).then_some(note)
    }
}

/// The user running a command, as the audit trail names them.
pub fn invoking_user() -> String {
    std::env::var("SUDO_USER").or_else(|_| std::env::var("USER")).unwrap_or_else(|_| format!("uid {}", unsafe { libc::getuid() }))
}

/// `smtpguard bypass on|off|status`.
pub fn bypass(pins: &Pins, on: Option<bool>, reason: Option<&str>) -> anyhow::Result<()> {
    if nft::commands::enforces(pins) {
        bail!("bypass needs the eBPF datapath; this host enforces through nftables (run its policy with `mode: monitor` instead)");
    }
    let maps = super::state::open_maps(pins)?;
    let switch = maps.bypass();
    match on {
        Some(true) => {
            if let Some(since) = switch.since() {
                println!("already bypassed since {} (nothing changed)", clock::rfc3339_of_unix(since));
                return Ok(());
            }
            let since = clock::unix_now_s() as u64;
            let note = BypassNote { since, by: invoking_user(), reason: reason.map(str::to_owned) };
            // The note first: the controller reads it when it sees the switch.
            std::fs::create_dir_all(&pins.run_dir).with_context(|| pins.run_dir.display().to_string())?;
            crate::files::replace(&BypassNote::path(pins), &serde_json::to_vec(&note)?).with_context(|| BypassNote::path(pins).display().to_string())?;
            switch.set(Some(since));
            println!(
                "enforcement bypassed: every direction now judges as in monitor mode (drops pass, counted as would_drop) until `smtpguard bypass off`"
            );
        }
        Some(false) => {
            if switch.since().is_none() {
                println!("not bypassed: the policy enforces (nothing changed)");
                return Ok(());
            }
            switch.set(None);
            let _ = std::fs::remove_file(BypassNote::path(pins));
            println!("enforcement restored: the policy in force decides again");
        }
        None => match switch.since() {
            Some(since) => {
                let note = BypassNote::read(pins, since);
                println!(
                    "bypassed since {}{}{}",
                    clock::rfc3339_of_unix(since),
                    note.as_ref().map(|n| format!(" by {}", n.by)).unwrap_or_default(),
                    note.and_then(|n| n.reason).map(|r| format!(": {r}")).unwrap_or_default()
                );
            }
            None => println!("not bypassed: the policy enforces"),
        },
    }
    Ok(())
}

/// The reload trigger of a rollback.
pub const ROLLBACK: &str = "rollback";

/// What `smtpguard rollback` asks the controller (with a SIGHUP).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RollbackRequest {
    pub id: String,
    /// The known-good snapshot to go back to (its number); `None`: the
    /// newest that differs.
    pub to: Option<u64>,
    pub by: String,
}

impl RollbackRequest {
    fn path(pins: &Pins) -> PathBuf {
        pins.run_dir.join("rollback-request.json")
    }

    /// The request waiting, taken (so a later SIGHUP is a plain reload).
    pub fn take(pins: &Pins) -> Option<Self> {
        let path = Self::path(pins);
        let text = std::fs::read_to_string(&path).ok()?;
        let _ = std::fs::remove_file(&path);
        serde_json::from_str(&text).ok()
    }
}

/// What the controller answers a rollback with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RollbackResult {
    pub id: String,
    pub ok: bool,
    /// The generation in force afterwards.
    pub generation: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl RollbackResult {
    fn path(pins: &Pins) -> PathBuf {
        pins.run_dir.join("rollback-result.json")
    }

    pub fn write(&self, pins: &Pins) -> anyhow::Result<()> {
        Ok(crate::files::replace(&Self::path(pins), &serde_json::to_vec(self)?)?)
    }

    fn read(pins: &Pins, id: &str) -> Option<Self> {
        let r: Self = serde_json::from_slice(&std::fs::read(Self::path(pins)).ok()?).ok()?;
        (r.id == id).then_some(r)
    }
}

/// How long `rollback` waits for the controller's answer (a policy with a
/// large geo database takes seconds to compile).
const ROLLBACK_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// `smtpguard rollback [--to N] [--list]`.
pub fn rollback(pins: &Pins, state_dir: &std::path::Path, to: Option<u64>, list: bool) -> anyhow::Result<()> {
    if nft::commands::enforces(pins) {
        bail!("rollback needs the eBPF controller; with the nftables backend, put the policy file back and `smtpguard reload`");
    }
    let kept = crate::known_good::KnownGood::new(state_dir);
    let current = Maps::open_pinned(&pins.dir).ok().and_then(|m| m.policy(m.runtime().active).ok()).map(|p| p.generation);
    if list {
        let all = kept.list();
        if all.is_empty() {
            println!("no known-good policies kept in {}", state_dir.join("known-good").display());
            return Ok(());
        }
        let in_force = current.and_then(|g| crate::known_good::KnownGood::in_force(&all, g)).map(|s| s.number);
        println!("{:<5} {:<6} {:<26} {:<18} {:<14} {:<14} files", "#", "gen", "applied", "trigger", "by", "policy sha256");
        for s in &all {
            let mark = if Some(s.number) == in_force { " (in force)" } else { "" };
            println!(
                "{:<5} {:<6} {:<26} {:<18} {:<14} {:<14} {}{mark}",
                s.number,
                s.generation,
                s.applied_at,
                s.trigger,
                s.changed_by.as_deref().unwrap_or("-"),
                &s.policy_sha256()[..12.min(s.policy_sha256().len())],
                s.files.iter().map(|f| f.path.display().to_string()).collect::<Vec<_>>().join(", ")
            );
        }
        return Ok(());
    }
    let pid = pins.controller_pid().ok_or_else(|| anyhow::anyhow!("no controller is running (no live pid in {}): a rollback is applied by `smtpguard run`", pins.pid_file().display()))?;
    let current = current.ok_or_else(|| anyhow::anyhow!("no policy in force is pinned at {}", pins.dir.display()))?;
    // Refused here already when there is nothing to go back to.
    let target = kept.target(to, current)?;
    let id = format!("{}-{}", std::process::id(), clock::unix_now_s());
    let request = RollbackRequest { id: id.clone(), to: Some(target.number), by: invoking_user() };
    crate::files::replace(&RollbackRequest::path(pins), &serde_json::to_vec(&request)?).context("writing the rollback request")?;
    // SAFETY: sending a signal to a pid we read.
    if unsafe { libc::kill(pid, libc::SIGHUP) } != 0 {
        bail!("signalling controller {pid}: {}", std::io::Error::last_os_error());
    }
    let start = std::time::Instant::now();
    while start.elapsed() < ROLLBACK_WAIT {
        if let Some(r) = RollbackResult::read(pins, &id) {
            if r.ok {
                println!("rolled back to #{}: the policy of generation {} is in force again as generation {}", target.number, target.generation, r.generation);
                return Ok(());
            }
            bail!("the rollback failed, generation {} stays in force: {}", r.generation, r.error.unwrap_or_default());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    bail!("controller {pid} did not answer within {} s: see its log", ROLLBACK_WAIT.as_secs())
}

/// What `smtpguard promote` asks the controller (with a SIGHUP).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PromoteRequest {
    pub id: String,
    pub by: String,
}

impl PromoteRequest {
    fn path(pins: &Pins) -> PathBuf {
        pins.run_dir.join("promote-request.json")
    }

    /// The request waiting, taken.
    pub fn take(pins: &Pins) -> Option<Self> {
        let path = Self::path(pins);
        let text = std::fs::read_to_string(&path).ok()?;
        let _ = std::fs::remove_file(&path);
        serde_json::from_str(&text).ok()
    }
}

/// What the controller answers a promote with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PromoteResult {
    pub id: String,
    pub ok: bool,
    pub generation: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// In force, but not written where --policy points: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_written: Option<String>,
}

impl PromoteResult {
    fn path(pins: &Pins) -> PathBuf {
        pins.run_dir.join("promote-result.json")
    }

    pub fn write(&self, pins: &Pins) -> anyhow::Result<()> {
        Ok(crate::files::replace(&Self::path(pins), &serde_json::to_vec(self)?)?)
    }

    fn read(pins: &Pins, id: &str) -> Option<Self> {
        let r: Self = serde_json::from_slice(&std::fs::read(Self::path(pins)).ok()?).ok()?;
        (r.id == id).then_some(r)
    }
}

/// `smtpguard promote`: the shadow policy becomes the enforced one.
pub fn promote(pins: &Pins) -> anyhow::Result<()> {
    if nft::commands::enforces(pins) {
        bail!("shadow policies need the eBPF datapath; this host enforces through nftables");
    }
    let pid = pins.controller_pid().ok_or_else(|| anyhow::anyhow!("no controller is running (no live pid in {})", pins.pid_file().display()))?;
    let id = format!("{}-{}", std::process::id(), clock::unix_now_s());
    let request = PromoteRequest { id: id.clone(), by: invoking_user() };
    crate::files::replace(&PromoteRequest::path(pins), &serde_json::to_vec(&request)?).context("writing the promote request")?;
    // SAFETY: sending a signal to a pid we read.
    if unsafe { libc::kill(pid, libc::SIGHUP) } != 0 {
        bail!("signalling controller {pid}: {}", std::io::Error::last_os_error());
    }
    let start = std::time::Instant::now();
    while start.elapsed() < ROLLBACK_WAIT {
        if let Some(r) = PromoteResult::read(pins, &id) {
            if let (true, Some(why)) = (r.ok, &r.not_written) {
                bail!("promoted: the shadow policy is enforced as generation {}, but {why}", r.generation);
            }
            if r.ok {
                println!("promoted: the shadow policy is enforced as generation {} and written where --policy points", r.generation);
                return Ok(());
            }
            bail!("the promote failed, generation {} stays in force: {}", r.generation, r.error.unwrap_or_default());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    bail!("controller {pid} did not answer within {} s: see its log", ROLLBACK_WAIT.as_secs())
}

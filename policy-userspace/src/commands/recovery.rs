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
    if !pins.exists() {
        bail!("nothing is attached: no smtpguard state pinned at {} (start `smtpguard run` first)", pins.dir.display());
    }
    let maps = Maps::open_pinned(&pins.dir)?;
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
            std::fs::write(BypassNote::path(pins), serde_json::to_vec(&note)?).with_context(|| BypassNote::path(pins).display().to_string())?;
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

//! The nftables backend: the compiled policy enforced by one nftables
//! table instead of the eBPF programs (docs/nftables.md).
//!
//! - [`ranges`]: the compiled ACL split into the address ranges interval sets hold;
//! - [`ruleset`]: the table, its sets, counters and chains, as nftables commands;
//! - [`differences`]: what a policy asks that nftables does only approximately;
//! - this module: loading a ruleset and reading its counters through `nft`.

pub mod bans;
pub mod commands;
pub mod controller;
pub mod differences;
pub mod metrics;
pub mod ranges;
pub mod ruleset;

use std::collections::HashMap;

pub use ruleset::{Devices, Sizes};

/// Which datapath enforces the policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    #[default]
    Ebpf,
    Nftables,
}

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("running nft: {0}")]
    Spawn(#[from] std::io::Error),
    #[error("nft {args}: {stderr}")]
    Refused { args: String, stderr: String },
    #[error("nft printed what is not its JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// Runs `nft -j ARGS` with `input` on stdin; its stdout. (The crate's
/// helpers drop nft's error message, which an operator needs.)
fn nft(args: &[&str], input: Option<&str>) -> Result<String, NftError> {
    nft_in(true, args, input)
}

fn nft_in(json: bool, args: &[&str], input: Option<&str>) -> Result<String, NftError> {
    use std::io::Write;
    let mut child = std::process::Command::new("nft")
        .args(json.then_some("-j"))
        .args(args)
        .stdin(if input.is_some() { std::process::Stdio::piped() } else { std::process::Stdio::null() })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(NftError::Refused { args: args.join(" "), stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned() });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Loads `commands` as one transaction: all of it or, on any error, none.
pub fn apply(commands: &[ruleset::Command]) -> Result<(), NftError> {
    nft(&["-f", "-"], Some(&ruleset::document(commands))).map(drop)
}

/// Makes the table if missing and loads the compiled policy in one
/// transaction (after the state sets, made once: see
/// [`ruleset::state_sets`]). Bans, meters and counters are kept.
pub fn load(c: &crate::policy::Compiled, sizes: Sizes, devices: &Devices) -> Result<(), NftError> {
    Loader::default().load(c, sizes, devices)
}

/// Loads policies one after another, each after the first as an update
/// of what the last one put in the sets ([`ruleset::render_update`]).
#[derive(Default)]
pub struct Loader {
    /// What the sets hold, when this loader filled them.
    loaded: Option<ruleset::Elements>,
}

impl Loader {
    pub fn load(&mut self, c: &crate::policy::Compiled, sizes: Sizes, devices: &Devices) -> Result<(), NftError> {
        let present = present_sets()?;
        if let Some(text) = ruleset::state_sets(sizes, &present) {
            nft_in(false, &["-f", "-"], Some(&text))?;
        }
        // Not known after a failure: the next load is whole.
        let previous = self.loaded.take();
        match previous {
            Some(previous) => {
                let (commands, next) = ruleset::render_update(c, devices, &previous);
                apply(&commands)?;
                self.loaded = Some(next);
            }
            None => {
                apply(&ruleset::render(c, devices))?;
                self.loaded = Some(ruleset::elements_of(c, devices));
            }
        }
        Ok(())
    }
}

/// Runs `nft -j ARGS` and returns its JSON objects.
fn list(args: &[&str]) -> Result<Vec<serde_json::Value>, NftError> {
    let doc: serde_json::Value = serde_json::from_str(&nft(args, None)?)?;
    Ok(doc["nftables"].as_array().cloned().unwrap_or_default())
}

/// Is the table loaded?
pub fn table_exists() -> bool {
    // Terse (no elements): a table of a million elements lists in seconds.
    list(&["-t", "list", "table", "netdev", ruleset::TABLE]).is_ok()
}

/// The names of the table's sets (none when it is not loaded).
pub fn present_sets() -> Result<std::collections::HashSet<String>, NftError> {
    let objects = match list(&["-t", "list", "sets", "table", "netdev", ruleset::TABLE]) {
        Ok(o) => o,
        // No table yet.
        Err(NftError::Refused { .. }) => return Ok(Default::default()),
        Err(e) => return Err(e),
    };
    Ok(objects.iter().filter_map(|o| Some(o.get("set")?["name"].as_str()?.to_owned())).collect())
}

/// The table's base chains (`hook_*`), by name.
pub fn base_chains() -> Result<Vec<String>, NftError> {
    let objects = list(&["-t", "list", "chains", "netdev"])?;
    Ok(objects
        .iter()
        .filter_map(|o| {
            let c = o.get("chain")?;
            (c["table"].as_str()? == ruleset::TABLE).then(|| c["name"].as_str().map(str::to_owned))?
        })
        .filter(|n| n.starts_with("hook_"))
        .collect())
}

/// Deletes chains of the table (flushed first: a chain with rules cannot go).
pub fn delete_chains(names: &[String]) -> Result<(), NftError> {
    if names.is_empty() {
        return Ok(());
    }
    let commands: Vec<ruleset::Command> = names
        .iter()
        .flat_map(|n| {
            let chain = serde_json::json!({ "family": "netdev", "table": ruleset::TABLE, "name": n });
            [serde_json::json!({ "flush": { "chain": chain.clone() } }), serde_json::json!({ "delete": { "chain": chain } })]
        })
        .collect();
    apply(&commands)
}

/// Elements in each set the datapath fills (bans and meters).
pub fn set_sizes() -> Result<Vec<(String, usize)>, NftError> {
    let mut out = Vec::new();
    for name in ruleset::state_set_names() {
        let n = list(&["list", "set", "netdev", ruleset::TABLE, &name])?
            .iter()
            .filter_map(|o| o.get("set").map(|s| s["elem"].as_array().map_or(0, Vec::len)))
            .sum();
        out.push((name, n));
    }
    Ok(out)
}

/// Packets counted by each named counter of the table.
pub fn counters() -> Result<HashMap<String, u64>, NftError> {
    let objects = list(&["list", "counters", "table", "netdev", ruleset::TABLE])?;
    Ok(objects
        .iter()
        .filter_map(|o| {
            let c = o.get("counter")?;
            Some((c["name"].as_str()?.to_owned(), c["packets"].as_u64()?))
        })
        .collect())
}

/// Deletes the table, and with it everything smtpguard put in nftables.
pub fn delete_table() -> Result<(), NftError> {
    let cmd = serde_json::json!({ "delete": { "table": { "family": "netdev", "name": ruleset::TABLE } } });
    apply(&[cmd])
}

/// `document` as `nft list` prints it, after nft itself loaded it into a
/// private network namespace: what `render` shows is what nft accepts,
/// and the host's ruleset is not touched.
pub fn print_in_scratch_namespace(state_sets: &str, document: &str) -> anyhow::Result<String> {
    use anyhow::Context;
    let (state, policy) = (scratch_file("state.nft", state_sets)?, scratch_file("policy.json", document)?);
    let script = format!("nft -f \"$1\" && nft -j -f \"$2\" && nft list table netdev {}", ruleset::TABLE);
    let out = std::process::Command::new("unshare")
        .args(["--user", "--map-root-user", "--net", "sh", "-c", &script, "sh"])
        .args([&state, &policy])
        .output()
        .context("running unshare and nft");
    let _ = (std::fs::remove_file(&state), std::fs::remove_file(&policy));
    let out = out?;
    if !out.status.success() {
        anyhow::bail!("nft refused the ruleset: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn scratch_file(name: &str, text: &str) -> std::io::Result<std::path::PathBuf> {
    use std::io::Write;
    let path = std::env::temp_dir().join(format!("smtpguard-render-{}-{name}", std::process::id()));
    std::fs::OpenOptions::new().write(true).create_new(true).open(&path)?.write_all(text.as_bytes())?;
    Ok(path)
}

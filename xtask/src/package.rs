//! `cargo xtask package`: the Debian package, with cargo-deb. The release
//! binary (the eBPF object embedded by its build script), then the man
//! pages and completions that binary generates from its own clap
//! definitions (`smtpguard generate-assets`), then cargo-deb with the
//! metadata in policy-userspace/Cargo.toml and the maintainer scripts in
//! packaging/debian/. docs/packaging.md tells what the package holds.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

use crate::setup::{self, status, target_dir, workspace_root};

/// Builds the package; returns the path of the .deb (under `target/debian/`).
pub fn build() -> Result<PathBuf> {
    let root = workspace_root();
    // The package's version is the workspace's and a revision, as the
    // changelog's newest entry says (its first line: `smtpguard (0.1.0-1) ...`).
    let changelog = std::fs::read_to_string(root.join("packaging/debian/changelog")).context("reading packaging/debian/changelog")?;
    let version = env!("CARGO_PKG_VERSION");
    let deb_version = changelog
        .strip_prefix("smtpguard (")
        .and_then(|rest| rest.split_once(')'))
        .map(|(v, _)| v)
        .filter(|v| v.strip_prefix(version).is_some_and(|rev| rev.starts_with('-')))
        .with_context(|| format!("packaging/debian/changelog does not open with an entry for {version}: add one (smtpguard ({version}-1) ...)"))?;
    setup::build_tools()?;
    let cargo_deb = setup::cargo_deb()?;
    status(Command::new("cargo").current_dir(&root).args(["build", "--release", "--bin", "smtpguard"]))?;

    // cargo-deb finds these under `target/release/` (its name for the real target directory).
    let assets = target_dir().join("release/package-assets");
    if assets.exists() {
        std::fs::remove_dir_all(&assets).with_context(|| format!("removing {}", assets.display()))?;
    }
    status(Command::new(target_dir().join("release/smtpguard")).arg("generate-assets").arg(&assets).stdout(Stdio::null()))
        .context("generating the man pages and completions")?;
    // cargo-deb compresses man pages only outside the target directory: as
    // Debian wants them, best compression, no name or time stamp inside.
    let man: Vec<PathBuf> = std::fs::read_dir(assets.join("man"))?.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>()?;
    status(Command::new("gzip").args(["-9", "--no-name", "--force"]).args(&man))?;

    let out = Command::new(&cargo_deb)
        .current_dir(&root)
        // The binary was just built; cargo-deb strips it and computes $auto depends.
        .args(["--no-build", "--package", "policy-userspace", "--deb-version", deb_version])
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", cargo_deb.display()))?;
    if !out.status.success() {
        bail!("cargo-deb failed ({})", out.status);
    }
    // cargo-deb prints the path of the package it wrote, and nothing else, on stdout.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let deb = stdout.lines().map(str::trim).rfind(|l| l.ends_with(".deb")).map(PathBuf::from).with_context(|| format!("cargo-deb named no .deb: {stdout}"))?;
    if !deb.is_file() {
        bail!("cargo-deb said it wrote {}, which is not a file", deb.display());
    }
    Ok(deb)
}

//! The last known-good policies: each policy the controller applied, kept
//! in its state directory with the list files it read (and their SHA-256),
//! so `smtpguard rollback` can put one back, whole, when a change blocks
//! legitimate mail. The geo database is not kept (it is large and changes
//! on its own schedule): a rollback reads the one in place.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::{clock, controller::sha256_hex, policy::model::Policy};

/// Snapshots kept, newest first.
pub const KEEP: usize = 5;

/// The snapshots under `<state dir>/known-good/<number>/`. Numbers only
/// grow: generations start again at 1 when the pins go (a reboot), so they
/// cannot order what was kept before and after.
#[derive(Clone, Debug)]
pub struct KnownGood {
    dir: PathBuf,
}

/// One applied policy: `manifest.json` beside the files it names.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Its directory's name: what `rollback --to` takes.
    #[serde(skip)]
    pub number: u64,
    pub generation: u64,
    pub applied_at: String,
    /// What applied it: `start`, `SIGHUP`, `file change`, `rollback`, ...
    pub trigger: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changed_by: Option<String>,
    /// The policy file first, then its list files.
    pub files: Vec<KeptFile>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptFile {
    /// Where the controller read it.
    pub path: PathBuf,
    pub sha256: String,
    /// Its copy's name in the snapshot's directory.
    pub stored: String,
}

impl Snapshot {
    /// Whether `other` holds the same files with the same contents.
    pub fn same_files(&self, other: &Snapshot) -> bool {
        self.files == other.files
    }

    pub fn policy_sha256(&self) -> &str {
        self.files.first().map_or("", |f| f.sha256.as_str())
    }
}

/// The files a policy was compiled from, with the SHA-256 of the bytes
/// read: the policy file, then its list files.
pub fn inputs_of(policy_file: &Path, policy: &Policy) -> Vec<(PathBuf, String)> {
    let mut inputs = vec![(policy_file.to_path_buf(), policy.sha256.clone())];
    for l in [&policy.ingress, &policy.egress].iter().flat_map(|d| d.lists.iter()) {
        if !inputs.iter().any(|(p, _)| p.as_path() == &*l.file) {
            inputs.push((l.file.to_path_buf(), l.list.sha256.clone()));
        }
    }
    inputs
}

/// How `inputs` are named in a snapshot.
fn kept_files(inputs: &[(PathBuf, String)]) -> Vec<KeptFile> {
    inputs
        .iter()
        .enumerate()
        .map(|(i, (path, compiled))| KeptFile {
            path: std::path::absolute(path).unwrap_or_else(|_| path.clone()),
            sha256: compiled.clone(),
            stored: format!("{i}-{}", path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()),
        })
        .collect()
}

impl KnownGood {
    pub fn new(state_dir: &Path) -> Self {
        Self { dir: state_dir.join("known-good") }
    }

    fn snapshot_dir(&self, number: u64) -> PathBuf {
        self.dir.join(number.to_string())
    }

    /// Keeps what generation `generation` was compiled from ([`inputs_of`]:
    /// each file with the SHA-256 of what was compiled) as the newest
    /// snapshot. A file changed since is refused: the snapshot would not be
    /// what was enforced (the change's own reload keeps the next one).
    /// The same files as the newest snapshot's only move it to `generation`
    /// (restarts and reloads of an unchanged policy must not push the
    /// earlier policies out). Older snapshots beyond [`KEEP`] go.
    pub fn record(&self, generation: u64, inputs: &[(PathBuf, String)], trigger: &str, changed_by: Option<String>) -> Result<()> {
        let newest = self.list().into_iter().next();
        if let Some(newest) = newest.as_ref().filter(|n| n.files == kept_files(inputs)) {
            let moved = Snapshot { generation, ..newest.clone() };
            let dir = self.snapshot_dir(newest.number);
            return crate::files::replace(&dir.join("manifest.json"), &serde_json::to_vec_pretty(&moved)?).context("replacing the manifest");
        }
        let number = newest.map_or(1, |n| n.number + 1);
        let tmp = self.dir.join(format!(".{number}.tmp"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let files = kept_files(inputs);
        for ((path, compiled), kept) in inputs.iter().zip(&files) {
            let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            if sha256_hex(&bytes) != *compiled {
                let _ = std::fs::remove_dir_all(&tmp);
                bail!("{} changed since it was compiled", path.display());
            }
            std::fs::write(tmp.join(&kept.stored), &bytes).with_context(|| format!("writing {}", tmp.join(&kept.stored).display()))?;
        }
        let snapshot = Snapshot { number, generation, applied_at: clock::now_rfc3339(), trigger: trigger.to_owned(), changed_by, files };
        std::fs::write(tmp.join("manifest.json"), serde_json::to_vec_pretty(&snapshot)?).context("writing the manifest")?;
        let dir = self.snapshot_dir(number);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(&tmp, &dir).with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))?;
        for old in self.list().into_iter().skip(KEEP) {
            let _ = std::fs::remove_dir_all(self.snapshot_dir(old.number));
        }
        Ok(())
    }

    /// Every snapshot kept, newest first.
    pub fn list(&self) -> Vec<Snapshot> {
        let mut all: Vec<Snapshot> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let number = e.file_name().to_str()?.parse::<u64>().ok()?;
                let snapshot: Snapshot = serde_json::from_slice(&std::fs::read(e.path().join("manifest.json")).ok()?).ok()?;
                Some(Snapshot { number, ..snapshot })
            })
            .collect();
        all.sort_by_key(|s: &Snapshot| std::cmp::Reverse(s.number));
        all
    }

    /// The snapshot of the policy in force: the newest, when it is of
    /// generation `current` (the controller keeps each policy it applies).
    pub fn in_force(all: &[Snapshot], current: u64) -> Option<&Snapshot> {
        all.first().filter(|s| s.generation == current)
    }

    /// The snapshot to go back to: number `to`, or else the newest one
    /// whose files differ from those of the policy in force (generation
    /// `current`).
    pub fn target(&self, to: Option<u64>, current: u64) -> Result<Snapshot> {
        let all = self.list();
        if let Some(to) = to {
            return match all.iter().find(|s| s.number == to) {
                Some(s) => Ok(s.clone()),
                None => bail!(
                    "no known-good policy #{to} is kept in {} (kept: {})",
                    self.dir.display(),
                    all.iter().map(|s| format!("#{}", s.number)).collect::<Vec<_>>().join(", ")
                ),
            };
        }
        let Some(now) = Self::in_force(&all, current) else {
            bail!("the policy in force (generation {current}) is not the newest kept in {}: name one with --to (see --list)", self.dir.display())
        };
        match all.iter().find(|s| s.number < now.number && !s.same_files(now)) {
            Some(s) => Ok(s.clone()),
            None => bail!("no earlier known-good policy differs from the one in force (generation {current})"),
        }
    }

    /// Writes the snapshot's files back where they were read (each by an
    /// atomic rename; the file replaced is kept as `<file>.before-rollback`).
    /// Returns the files whose contents changed.
    pub fn restore(&self, snapshot: &Snapshot) -> Result<Vec<PathBuf>> {
        let dir = self.snapshot_dir(snapshot.number);
        // Every copy read and checked before anything is written.
        let mut copies = Vec::new();
        for f in &snapshot.files {
            let bytes = std::fs::read(dir.join(&f.stored)).with_context(|| format!("reading {}", dir.join(&f.stored).display()))?;
            if sha256_hex(&bytes) != f.sha256 {
                bail!("the kept copy of {} does not match its SHA-256: {} was altered", f.path.display(), dir.display());
            }
            copies.push((f, bytes));
        }
        let mut restored = Vec::new();
        for (f, bytes) in copies {
            let current = std::fs::read(&f.path).ok();
            if current.as_deref().is_some_and(|c| sha256_hex(c) == f.sha256) {
                continue;
            }
            crate::files::replace_keeping(&f.path, &bytes, ".before-rollback", current.as_deref()).with_context(|| format!("replacing {}", f.path.display()))?;
            restored.push(f.path.clone());
        }
        Ok(restored)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_are_kept_found_and_restored() {
        let dir = std::env::temp_dir().join(format!("sg-known-good-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let policy_file = dir.join("policy.yaml");
        let kept = KnownGood::new(&dir.join("state"));
        let write_and_record = |generation: u64, text: &str| {
            std::fs::write(&policy_file, text).unwrap();
            kept.record(generation, &[(policy_file.clone(), sha256_hex(text.as_bytes()))], "test", None).unwrap();
        };
        // A file changed since it was compiled is not kept as known-good.
        std::fs::write(&policy_file, "version: 1 # later\n").unwrap();
        let refused = kept.record(1, &[(policy_file.clone(), sha256_hex(b"version: 1 # a\n"))], "test", None).unwrap_err();
        assert!(refused.to_string().contains("changed since it was compiled"), "{refused}");
        assert!(kept.list().is_empty());
        write_and_record(1, "version: 1 # a\n");
        // The same files again (a restart, a reload of an unchanged
        // policy): the snapshot moves to the new generation, no new one.
        write_and_record(2, "version: 1 # a\n");
        write_and_record(3, "version: 1 # b\n");
        let numbered = |kept: &KnownGood| kept.list().iter().map(|s| (s.number, s.generation)).collect::<Vec<_>>();
        assert_eq!(numbered(&kept), vec![(2, 3), (1, 2)]);
        assert_eq!(kept.target(None, 3).unwrap().number, 1, "the newest that differs");
        assert!(kept.target(None, 2).is_err(), "generation 2 is not the policy in force");
        assert!(kept.target(Some(9), 3).unwrap_err().to_string().contains("kept: #2, #1"));
        let restored = kept.restore(&kept.target(Some(1), 3).unwrap()).unwrap();
        assert_eq!(restored.len(), 1);
        assert_eq!(std::fs::read_to_string(&policy_file).unwrap(), "version: 1 # a\n");
        assert_eq!(std::fs::read_to_string(dir.join("policy.yaml.before-rollback")).unwrap(), "version: 1 # b\n");
        assert!(kept.restore(&kept.target(Some(1), 3).unwrap()).unwrap().is_empty(), "nothing left to change");
        for g in 4..=9 {
            write_and_record(g, &format!("version: 1 # {g}\n"));
        }
        assert_eq!(kept.list().iter().map(|s| s.number).collect::<Vec<_>>(), vec![8, 7, 6, 5, 4]);
        // A kept copy altered on disk is refused, nothing written.
        std::fs::write(dir.join("state/known-good/4/0-policy.yaml"), "evil").unwrap();
        assert!(kept.restore(&kept.target(Some(4), 9).unwrap()).unwrap_err().to_string().contains("altered"));
        assert_eq!(std::fs::read_to_string(&policy_file).unwrap(), "version: 1 # 9\n");
        // A reboot: the pins are gone and generations start again at 1.
        // What is applied then is the newest, and the rollback's default
        // is what came before it, not a snapshot of a higher generation.
        write_and_record(1, "version: 1 # after the reboot\n");
        let all = kept.list();
        assert_eq!(numbered(&kept), vec![(9, 1), (8, 9), (7, 8), (6, 7), (5, 6)]);
        assert_eq!(KnownGood::in_force(&all, 1).map(|s| s.number), Some(9));
        assert_eq!(kept.target(None, 1).unwrap().number, 8);
        // Numbers and generations apart: a snapshot is read by its number.
        write_and_record(2, "version: 1 # a bad change\n");
        let back = kept.target(None, 2).unwrap();
        assert_eq!((back.number, back.generation), (9, 1));
        assert_eq!(kept.restore(&back).unwrap().len(), 1);
        assert_eq!(std::fs::read_to_string(&policy_file).unwrap(), "version: 1 # after the reboot\n");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

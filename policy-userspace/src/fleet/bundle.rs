//! The fleet's policy: a bundle of the policy file and the list files it
//! names (geo databases stay local files, named by path), stored in
//! chunks under `PREFIX/policy-blobs/<sha256>/` and made current by a
//! compare-and-swap of the pointer `PREFIX/policy`. The pointer's etcd
//! revision is the fleet policy's revision. Hosts keep each revision they
//! fetched, and which one they applied last, in their state directory, so
//! a host restarted while etcd is away enforces what it last applied.

use std::{
    collections::BTreeMap,
    path::{Component, Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::policy::{self, Diagnostics, ReadOptions};

/// etcd refuses requests over 1.5 MiB by default: chunks stay well under.
const CHUNK_BYTES: usize = 512 * 1024;

pub fn pointer_key(prefix: &str) -> String {
    format!("{prefix}/policy")
}

fn blobs_prefix(prefix: &str) -> String {
    format!("{prefix}/policy-blobs/")
}

fn blob_prefix(prefix: &str, sha256: &str) -> String {
    format!("{prefix}/policy-blobs/{sha256}/")
}

/// The policy file and its list files, by path relative to the policy's
/// directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bundle {
    /// The policy file's name among `files`.
    pub policy: String,
    pub files: BTreeMap<String, String>,
}

/// The value of `PREFIX/policy`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pointer {
    pub sha256: String,
    pub chunks: u32,
    pub bytes: u64,
    pub pushed_by: String,
    pub pushed_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}

/// A relative path that stays inside the directory it is joined to.
fn contained(rel: &str) -> Option<PathBuf> {
    let p = Path::new(rel);
    let ok = !rel.is_empty() && p.components().all(|c| matches!(c, Component::Normal(_)));
    ok.then(|| p.to_path_buf())
}

impl Bundle {
    /// Reads and validates the policy as `check` does (lists read from
    /// `files_dir`, else beside the policy), and bundles it. `Err` holds
    /// the diagnostics of an invalid policy.
    pub fn build(policy_file: &Path, options: &ReadOptions) -> Result<(Bundle, Diagnostics), Diagnostics> {
        let (loaded, diags) = policy::load_and_compile(policy_file, options);
        let Some((policy, _)) = loaded else { return Err(diags) };
        let dir = options.files_dir.clone().unwrap_or_else(|| policy_file.parent().map(Path::to_path_buf).unwrap_or_default());
        let name = policy_file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "policy.yaml".into());
        let mut files = BTreeMap::new();
        let fail = |why: String| {
            let mut d = Diagnostics::default();
            d.error(policy_file, crate::policy::yaml::Pos { line: 1, col: 1 }, "", why);
            d
        };
        let text = std::fs::read_to_string(policy_file).map_err(|e| fail(format!("reading it again: {e}")))?;
        files.insert(name.clone(), text);
        for d in [&policy.ingress, &policy.egress] {
            for list in &d.lists {
                let rel = list.file.strip_prefix(&dir).ok().and_then(|r| r.to_str()).and_then(contained);
                let Some(rel) = rel else {
                    return Err(fail(format!(
                        "list {} is outside {}: a fleet policy names its lists relative to the policy (or --lists DIR), so every host finds them",
                        list.file.display(),
                        dir.display()
                    )));
                };
                let text = std::fs::read_to_string(&list.file).map_err(|e| fail(format!("reading {}: {e}", list.file.display())))?;
                files.insert(rel.to_string_lossy().into_owned(), text);
            }
        }
        Ok((Bundle { policy: name, files }, diags))
    }

    fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a bundle serialises")
    }

    /// Writes the files under `dir` (made afresh); returns the policy file.
    fn write_to(&self, dir: &Path) -> Result<PathBuf> {
        for (rel, text) in &self.files {
            let Some(path) = contained(rel) else { bail!("the bundle names {rel:?}, which is not a path inside its directory") };
            let path = dir.join(path);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
            }
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        }
        let Some(policy) = contained(&self.policy).filter(|_| self.files.contains_key(&self.policy)) else {
            bail!("the bundle's policy {:?} is not among its files", self.policy)
        };
        Ok(dir.join(policy))
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// What a push did.
pub struct Pushed {
    pub revision: i64,
    pub pointer: Pointer,
    pub files: usize,
}

/// Stores `bundle` as the fleet's policy if the pointer is still at
/// `expected` (its mod revision; 0: no policy yet). `Ok(Err(rev))`: it
/// moved to `rev` meanwhile, and nothing was changed.
pub async fn push(client: &mut Client, prefix: &str, bundle: &Bundle, expected: i64, pushed_by: &str, comment: Option<String>) -> Result<std::result::Result<Pushed, i64>> {
    let bytes = bundle.to_bytes();
    let sha256 = sha256_hex(&bytes);
    let chunks: Vec<&[u8]> = bytes.chunks(CHUNK_BYTES).collect();
    // The chunks first, content-addressed: the pointer never names a
    // bundle that is not whole.
    for (i, chunk) in chunks.iter().enumerate() {
        client.put(format!("{}{i:06}", blob_prefix(prefix, &sha256)), chunk.to_vec(), None).await.context("storing the policy bundle")?;
    }
    let pointer = Pointer {
        sha256: sha256.clone(),
        chunks: chunks.len() as u32,
        bytes: bytes.len() as u64,
        pushed_by: pushed_by.to_owned(),
        pushed_at: crate::clock::now_rfc3339(),
        comment,
    };
    let key = pointer_key(prefix);
    let txn = Txn::new()
        .when([Compare::mod_revision(key.clone(), CompareOp::Equal, expected)])
        .and_then([TxnOp::put(key.clone(), serde_json::to_vec(&pointer)?, None)])
        .or_else([TxnOp::get(key.clone(), None)]);
    let resp = client.txn(txn).await.context("swapping the policy pointer")?;
    if !resp.succeeded() {
        let now = resp.op_responses().into_iter().find_map(|r| match r {
            etcd_client::TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.mod_revision()),
            _ => None,
        });
        return Ok(Err(now.unwrap_or(0)));
    }
    let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
    prune_blobs(client, prefix, &sha256, expected).await;
    Ok(Ok(Pushed { revision, pointer, files: bundle.files.len() }))
}

/// Removes bundles but the new one and the one it replaced (a host may be
/// fetching that one now).
async fn prune_blobs(client: &mut Client, prefix: &str, keep: &str, previous_revision: i64) {
    let mut keep = vec![keep.to_owned()];
    if previous_revision > 0 {
        if let Ok(resp) = client.get(pointer_key(prefix), Some(GetOptions::new().with_revision(previous_revision))).await {
            if let Some(p) = resp.kvs().first().and_then(|kv| serde_json::from_slice::<Pointer>(kv.value()).ok()) {
                keep.push(p.sha256);
            }
        }
    }
    let Ok(resp) = client.get(blobs_prefix(prefix), Some(GetOptions::new().with_prefix().with_keys_only())).await else { return };
    let mut gone: Vec<String> = resp
        .kvs()
        .iter()
        .filter_map(|kv| kv.key_str().ok())
        .filter_map(|k| k.strip_prefix(&blobs_prefix(prefix))?.split('/').next().map(str::to_owned))
        .filter(|h| !keep.contains(h))
        .collect();
    gone.dedup();
    for h in gone {
        let _ = client.delete(blob_prefix(prefix, &h), Some(etcd_client::DeleteOptions::new().with_prefix())).await;
    }
}

/// The pointer and its mod revision; `None` when no policy was pushed.
pub async fn pointer(client: &mut Client, prefix: &str) -> Result<Option<(i64, Pointer)>> {
    let resp = client.get(pointer_key(prefix), None).await.context("reading the policy pointer")?;
    let Some(kv) = resp.kvs().first() else { return Ok(None) };
    let p: Pointer = serde_json::from_slice(kv.value()).with_context(|| format!("{}: not a policy pointer", pointer_key(prefix)))?;
    Ok(Some((kv.mod_revision(), p)))
}

/// The bundle a pointer names, checked against its hash. The outer error
/// is etcd's (worth a retry); the inner says why the bundle is unusable.
pub async fn fetch(client: &mut Client, prefix: &str, p: &Pointer) -> Result<std::result::Result<Bundle, String>> {
    let resp = client.get(blob_prefix(prefix, &p.sha256), Some(GetOptions::new().with_prefix())).await.context("reading the policy bundle")?;
    let mut kvs: Vec<_> = resp.kvs().iter().collect();
    kvs.sort_by(|a, b| a.key().cmp(b.key()));
    if kvs.len() != p.chunks as usize {
        return Ok(Err(format!("the policy bundle {} has {} of its {} chunks", p.sha256, kvs.len(), p.chunks)));
    }
    let bytes: Vec<u8> = kvs.iter().flat_map(|kv| kv.value().iter().copied()).collect();
    if sha256_hex(&bytes) != p.sha256 {
        return Ok(Err(format!("the policy bundle does not match its sha256 {}", p.sha256)));
    }
    Ok(serde_json::from_slice(&bytes).map_err(|e| format!("the policy bundle is not one: {e}")))
}

/// The revisions of the fleet policy a host fetched, under its state
/// directory: `<revision>/` each, `applied` naming the last applied.
#[derive(Clone, Debug)]
pub struct PolicyCache {
    dir: PathBuf,
}

/// Revisions kept besides the one applied.
const KEEP: usize = 3;

impl PolicyCache {
    pub fn new(state_dir: &Path) -> Self {
        Self { dir: state_dir.join("fleet-policy") }
    }

    fn revision_dir(&self, revision: i64) -> PathBuf {
        self.dir.join(revision.to_string())
    }

    /// The revision applied last and its policy file.
    pub fn applied(&self) -> Option<(i64, PathBuf)> {
        let text = std::fs::read_to_string(self.dir.join("applied")).ok()?;
        let (rev, file) = text.trim().split_once(' ')?;
        let rev: i64 = rev.parse().ok()?;
        let path = self.revision_dir(rev).join(file);
        path.is_file().then_some((rev, path))
    }

    /// Writes a revision's files (once); returns its policy file.
    pub fn store(&self, revision: i64, bundle: &Bundle) -> Result<PathBuf> {
        let dir = self.revision_dir(revision);
        if !dir.exists() {
            let tmp = self.dir.join(format!(".{revision}.tmp"));
            let _ = std::fs::remove_dir_all(&tmp);
            std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
            bundle.write_to(&tmp)?;
            std::fs::rename(&tmp, &dir).with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))?;
        }
        Ok(dir.join(&bundle.policy))
    }

    /// Records that `revision` is in force, and prunes old revisions.
    pub fn mark_applied(&self, revision: i64, policy_file: &Path) -> Result<()> {
        let name = policy_file.strip_prefix(self.revision_dir(revision)).unwrap_or(policy_file);
        let tmp = self.dir.join(".applied.tmp");
        std::fs::write(&tmp, format!("{revision} {}\n", name.display())).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, self.dir.join("applied")).with_context(|| format!("writing {}", self.dir.join("applied").display()))?;
        let mut revisions: Vec<i64> =
            std::fs::read_dir(&self.dir).into_iter().flatten().filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect();
        revisions.sort_unstable_by(|a, b| b.cmp(a));
        for old in revisions.into_iter().filter(|r| *r != revision).skip(KEEP) {
            let _ = std::fs::remove_dir_all(self.revision_dir(old));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundles_name_only_paths_inside_their_directory() {
        assert!(contained("lists/drop.txt").is_some());
        for bad in ["", "/etc/passwd", "../x", "lists/../../x", "./x"] {
            assert!(contained(bad).is_none(), "{bad}");
        }
        let dir = std::env::temp_dir().join(format!("sg-bundle-{}", std::process::id()));
        let cache = PolicyCache::new(&dir);
        let mut files = BTreeMap::new();
        files.insert("p.yaml".to_owned(), "version: 1\n".to_owned());
        files.insert("lists/a.txt".to_owned(), "192.0.2.0/24\n".to_owned());
        let good = Bundle { policy: "p.yaml".into(), files: files.clone() };
        let path = cache.store(7, &good).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("fleet-policy/7/lists/a.txt")).unwrap(), "192.0.2.0/24\n");
        assert_eq!(cache.applied(), None);
        cache.mark_applied(7, &path).unwrap();
        assert_eq!(cache.applied(), Some((7, path)));
        files.insert("../escape".to_owned(), String::new());
        assert!(cache.store(8, &Bundle { policy: "p.yaml".into(), files }).is_err());
        assert!(!dir.join("escape").exists() && !dir.join("fleet-policy/8").exists());
        for r in 9..14 {
            let p = cache.store(r, &good).unwrap();
            cache.mark_applied(r, &p).unwrap();
        }
        assert!(!dir.join("fleet-policy/9").exists() && dir.join("fleet-policy/10").exists(), "three kept besides the applied one");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

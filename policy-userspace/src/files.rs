//! Files replaced whole: a reader, or the host after a power cut, finds
//! the old bytes or the new, never a part of them.

use std::{
    ffi::OsString,
    fs::File,
    io::{self, Write},
    path::Path,
};

/// Replaces `path` with `bytes`: written beside it as `.NAME.tmp`, synced,
/// renamed over it, and the directory synced. A file replaced keeps its
/// permissions.
pub fn replace(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let name = path.file_name().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{} names no file", path.display())))?;
    let mut tmp_name = OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let mut f = File::create(&tmp)?;
    if let Ok(old) = std::fs::metadata(path) {
        f.set_permissions(old.permissions())?;
    }
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    File::open(dir)?.sync_all()
}

/// [`replace`] through a symlink to the file it names (a link replaced by
/// a file would no longer follow its target), with `old`, the bytes
/// replaced, kept beside it as `FILE` + `aside_suffix`.
pub fn replace_keeping(path: &Path, bytes: &[u8], aside_suffix: &str, old: Option<&[u8]>) -> io::Result<()> {
    let target = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    if let Some(old) = old {
        let mut aside = target.as_os_str().to_owned();
        aside.push(aside_suffix);
        replace(Path::new(&aside), old)?;
    }
    replace(&target, bytes)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_replaced_file_holds_the_new_bytes_and_keeps_its_mode() {
        let dir = std::env::temp_dir().join(format!("sg-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("policy.yaml");
        replace(&path, b"one").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        replace(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o640);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "no temporary file left");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

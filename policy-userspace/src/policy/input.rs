//! Every file the policy reads (the policy itself, list files, geo
//! databases) comes through [`open`]: regular files only, never more than
//! a limit, and nothing that can block. A FIFO would otherwise freeze the
//! controller until someone writes to it, and `/dev/zero` fills memory.

use std::{
    fmt,
    fs::File,
    io::{self, Read},
    os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

/// A policy file larger than this is refused; large sets of networks
/// belong in list files. Not raisable: the limits are inside the policy.
pub const POLICY_FILE_BYTES: u64 = 4 * MIB;
/// Spamhaus DROP is about 40 KB; a full routing table as CIDRs about 20 MB.
pub const DEFAULT_LIST_FILE_BYTES: u64 = 8 * MIB;
/// GeoLite2-Country is about 9 MB, GeoLite2-City about 70 MB.
pub const DEFAULT_GEO_DATABASE_BYTES: u64 = 128 * MIB;
/// The real country databases hold about a million networks.
pub const DEFAULT_GEO_NETWORKS: u64 = 4_000_000;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

/// How much the loader reads. The command-line flags replace the
/// defaults; a policy's `limits` section overrides both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of each list file.
    pub list_file_bytes: u64,
    /// Bytes of each geo database.
    pub geo_database_bytes: u64,
    /// Networks (search-tree leaves, with or without data) read from each geo database.
    pub geo_networks: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            list_file_bytes: DEFAULT_LIST_FILE_BYTES,
            geo_database_bytes: DEFAULT_GEO_DATABASE_BYTES,
            geo_networks: DEFAULT_GEO_NETWORKS,
        }
    }
}

/// What a file is to the policy, for saying which limit applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputKind {
    Policy,
    List,
    GeoDatabase,
}

impl InputKind {
    fn how_to_raise(self) -> &'static str {
        match self {
            InputKind::Policy => "the limit for a policy file; move large sets of networks into list files",
            InputKind::List => "the limit for a list file; raise it with `limits: {list_file_bytes: ...}` in the policy or --max-list-bytes",
            InputKind::GeoDatabase => {
                "the limit for a geo database; raise it with `limits: {geo_database_bytes: ...}` in the policy or --max-geo-bytes"
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("cannot open {}: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("{} is {what}, not a regular file; only regular files are read", path.display())]
    NotRegular { path: PathBuf, what: &'static str },
    #[error("{} is {} bytes, over {} ({})", path.display(), size, Size(*limit), kind.how_to_raise())]
    TooLarge { path: PathBuf, size: u64, limit: u64, kind: InputKind },
    #[error("{} grew past {} while being read ({})", path.display(), Size(*limit), kind.how_to_raise())]
    Grew { path: PathBuf, limit: u64, kind: InputKind },
    #[error("reading {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
}

/// A regular file opened for reading, whose size was within its limit
/// when opened. Reads stop one byte past the limit.
pub struct BoundedFile {
    path: PathBuf,
    limit: u64,
    kind: InputKind,
    meta: std::fs::Metadata,
    reader: io::Take<File>,
}

/// What a file type is, in words, when it is not a regular file.
fn not_regular(t: std::fs::FileType) -> Option<&'static str> {
    Some(if t.is_file() {
        return None;
    } else if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a file"
    })
}

/// Opens `path` without blocking (O_NONBLOCK: a FIFO with no writer opens
/// at once; O_NOCTTY: a terminal does not become ours) and refuses
/// anything but a regular file of at most `limit` bytes.
pub fn open(path: &Path, limit: u64, kind: InputKind) -> Result<BoundedFile, InputError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|source| {
            // A socket cannot be opened at all (ENXIO): say what it is.
            match std::fs::metadata(path).ok().and_then(|m| not_regular(m.file_type())) {
                Some(what) => InputError::NotRegular { path: path.to_owned(), what },
                None => InputError::Open { path: path.to_owned(), source },
            }
        })?;
    // The type of what was opened, not of what the path names now.
    let meta = file.metadata().map_err(|source| InputError::Read { path: path.to_owned(), source })?;
    if let Some(what) = not_regular(meta.file_type()) {
        return Err(InputError::NotRegular { path: path.to_owned(), what });
    }
    if meta.len() > limit {
        return Err(InputError::TooLarge { path: path.to_owned(), size: meta.len(), limit, kind });
    }
    Ok(BoundedFile { path: path.to_owned(), limit, kind, meta, reader: file.take(limit.saturating_add(1)) })
}

/// Reads a whole input file within its limit.
pub fn read_bounded(path: &Path, limit: u64, kind: InputKind) -> Result<Vec<u8>, InputError> {
    open(path, limit, kind)?.read_all()
}

impl BoundedFile {
    pub fn metadata(&self) -> &std::fs::Metadata {
        &self.meta
    }

    /// Identifies the file's content without reading it: device, inode,
    /// size, modification and change times.
    pub fn stamp(&self) -> Stamp {
        let m = &self.meta;
        Stamp { dev: m.dev(), ino: m.ino(), len: m.len(), mtime: (m.mtime(), m.mtime_nsec()), ctime: (m.ctime(), m.ctime_nsec()) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn read_all(mut self) -> Result<Vec<u8>, InputError> {
        // Sized from fstat, but a file can grow: the read is bounded anyway.
        let mut buf = Vec::with_capacity(self.meta.len() as usize + 1);
        self.reader.read_to_end(&mut buf).map_err(|source| InputError::Read { path: self.path.clone(), source })?;
        self.check_not_grown(buf.len() as u64)?;
        Ok(buf)
    }

    /// The error to give once more than the limit was read.
    pub fn check_not_grown(&self, bytes_read: u64) -> Result<(), InputError> {
        if bytes_read > self.limit {
            return Err(InputError::Grew { path: self.path.clone(), limit: self.limit, kind: self.kind });
        }
        Ok(())
    }

    pub fn read_error(&self, source: io::Error) -> InputError {
        InputError::Read { path: self.path.clone(), source }
    }
}

impl Read for BoundedFile {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.reader.read(buf)
    }
}

/// What [`BoundedFile::stamp`] compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

/// A byte count as policies write it: `65536`, `64MiB`, `500 KB`, `2GiB`
/// (KiB, MiB, GiB are powers of 1024; kB, MB, GB of 1000).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("`{s}` is not a size; write bytes or a number with KiB, MiB, GiB, kB, MB or GB (64MiB)"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => KIB,
        "mib" => MIB,
        "gib" => GIB,
        "kb" => 1000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        _ => return Err(format!("`{s}` has an unknown unit; use KiB, MiB, GiB, kB, MB or GB (64MiB)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("`{s}` is too large"))
}

/// A byte count for messages: `64 MiB` when it is a whole number of them.
pub struct Size(pub u64);

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (unit, name) in [(GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")] {
            if n >= unit && n.is_multiple_of(unit) {
                return write!(f, "{} {name}", n / unit);
            }
        }
        write!(f, "{n} bytes")
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("smtpguard-input-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("65536"), Ok(65_536));
        assert_eq!(parse_size("64MiB"), Ok(64 * MIB));
        assert_eq!(parse_size("2 GiB"), Ok(2 * GIB));
        assert_eq!(parse_size("500kB"), Ok(500_000));
        assert!(parse_size("64 parsecs").unwrap_err().contains("unknown unit"));
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("99999999999999GiB").unwrap_err().contains("too large"));
        assert_eq!(Size(64 * MIB).to_string(), "64 MiB");
        assert_eq!(Size(1000).to_string(), "1000 bytes");
    }

    #[test]
    fn only_regular_files_within_the_limit_are_read() {
        let dir = temp_dir("kinds");
        let file = dir.join("ten.txt");
        std::fs::write(&file, "0123456789").unwrap();
        assert_eq!(read_bounded(&file, 10, InputKind::List).unwrap(), b"0123456789");
        let e = read_bounded(&file, 9, InputKind::List).unwrap_err().to_string();
        assert!(e.contains("is 10 bytes, over 9 bytes") && e.contains("--max-list-bytes"), "{e}");
        let e = read_bounded(&dir, 1 << 20, InputKind::List).unwrap_err().to_string();
        assert!(e.contains("is a directory, not a regular file"), "{e}");
        let e = read_bounded(Path::new("/dev/zero"), 1 << 20, InputKind::GeoDatabase).unwrap_err().to_string();
        assert!(e.contains("/dev/zero is a character device"), "{e}");
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // No writer: a blocking open would never return.
        let e = read_bounded(&fifo, 1 << 20, InputKind::List).unwrap_err().to_string();
        assert!(e.contains("is a FIFO (named pipe)"), "{e}");
        let e = read_bounded(&dir.join("missing"), 1, InputKind::Policy).unwrap_err().to_string();
        assert!(e.starts_with("cannot open") && e.contains("No such file"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_growing_past_the_limit_is_cut_at_limit_plus_one() {
        let dir = temp_dir("grow");
        let path = dir.join("list.txt");
        std::fs::write(&path, "12345").unwrap();
        let mut f = open(&path, 8, InputKind::List).unwrap();
        // It grows after the size check.
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"6789abcdef").unwrap();
        let mut buf = Vec::new();
        f.read_to_end(&mut buf).unwrap();
        assert_eq!(buf.len(), 9, "limit + 1 bytes at most");
        assert!(f.check_not_grown(buf.len() as u64).unwrap_err().to_string().contains("grew past 8 bytes"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

}

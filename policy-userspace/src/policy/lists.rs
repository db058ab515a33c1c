//! List files: one CIDR per line, `#` and `;` start comments (the format
//! of Spamhaus DROP and most published blocklists).
//!
//! A list is parsed as it is read, so its text is never whole in memory;
//! a network costs 24 bytes, shared by every rule and reload that uses
//! the list. Only the first errors are kept with their text.

use std::{
    collections::HashMap,
    fmt,
    io::BufRead,
    path::{Path, PathBuf},
    sync::{Arc, LazyLock, Mutex},
};

use ipnet::IpNet;

use super::{
    diag::KEPT_PER_SEVERITY,
    input::{self, InputError, InputKind, Stamp},
    parse::parse_cidr,
};

#[derive(Clone, PartialEq, Eq)]
pub struct List {
    /// Each network and its line.
    pub nets: Vec<(IpNet, u32)>,
    /// The first bad lines.
    pub errors: Vec<LineError>,
    /// Bad lines beyond those in `errors`.
    pub more_errors: usize,
    /// SHA-256 of the bytes parsed: what a known-good snapshot must hold.
    pub sha256: String,
}

impl List {
    pub fn error_count(&self) -> usize {
        self.errors.len() + self.more_errors
    }
}

/// Not the networks: a list can hold millions.
impl fmt::Debug for List {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "List {{ {} networks, {} errors }}", self.nets.len(), self.error_count())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LineError {
    pub line: usize,
    pub col: usize,
    pub message: String,
}

/// Parsed lists by path: a reload re-reads only the lists that changed
/// (a 100,000-line feed costs tens of milliseconds to parse).
static PARSED: LazyLock<Mutex<Parsed>> = LazyLock::new(Default::default);

/// Lists by path, with the stamp of the file they were parsed from.
type Parsed = HashMap<PathBuf, (Stamp, Arc<List>)>;

/// The lists one load read. They replace the cache only when the load
/// is valid, so a rejected reload leaves memory as it found it.
#[derive(Default)]
pub struct ListReader {
    read: Parsed,
}

impl ListReader {
    /// The list at `path`, parsed now or earlier if the file is unchanged.
    pub fn read(&mut self, path: &Path, limit: u64) -> Result<Arc<List>, InputError> {
        // The file is opened and its type and size checked before any
        // cached parse is trusted: a list replaced by a FIFO or grown past
        // the limit is refused like a new one.
        let mut file = input::open(path, limit, InputKind::List)?;
        let stamp = file.stamp();
        if let Some((s, list)) = self.read.get(path) {
            if *s == stamp {
                return Ok(list.clone());
            }
        }
        let cached = PARSED.lock().unwrap_or_else(|p| p.into_inner()).get(path).filter(|(s, _)| *s == stamp).map(|(_, l)| l.clone());
        let list = match cached {
            Some(list) => list,
            None => Arc::new(parse_from(&mut file)?),
        };
        self.read.insert(path.to_owned(), (stamp, list.clone()));
        Ok(list)
    }

    /// Makes this load's lists the cached ones: lists no policy uses any
    /// more are let go, and lists with errors are never kept.
    pub fn commit(self) {
        let kept = self.read.into_iter().filter(|(_, (_, l))| l.error_count() == 0).collect();
        *PARSED.lock().unwrap_or_else(|p| p.into_inner()) = kept;
    }
}

/// Parses as it reads, line by line.
fn parse_from(file: &mut input::BoundedFile) -> Result<List, InputError> {
    let mut reader = std::io::BufReader::with_capacity(1 << 16, &mut *file);
    let mut list = List { nets: Vec::new(), errors: Vec::new(), more_errors: 0, sha256: String::new() };
    let mut line = Vec::new();
    let (mut number, mut bytes) = (0usize, 0u64);
    let mut digest = <sha2::Sha256 as sha2::Digest>::new();
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line).map_err(|e| reader.get_ref().read_error(e))?;
        if n == 0 {
            break;
        }
        sha2::Digest::update(&mut digest, &line);
        bytes += n as u64;
        number += 1;
        parse_line(&mut list, number, &line);
    }
    drop(reader);
    file.check_not_grown(bytes)?;
    list.sha256 = sha2::Digest::finalize(digest).iter().map(|b| format!("{b:02x}")).collect();
    list.nets.shrink_to_fit();
    Ok(list)
}

fn parse_line(list: &mut List, number: usize, raw: &[u8]) {
    let mut error = |col: usize, message: String| {
        if list.errors.len() < KEPT_PER_SEVERITY {
            list.errors.push(LineError { line: number, col, message });
        } else {
            list.more_errors += 1;
        }
    };
    let text = match std::str::from_utf8(raw) {
        Ok(t) => t,
        Err(e) => {
            error(e.valid_up_to() + 1, "not UTF-8 text".into());
            return;
        }
    };
    let content = text.split(['#', ';']).next().unwrap_or("");
    let token = content.trim();
    if token.is_empty() {
        return;
    }
    let col = content.len() - content.trim_start().len() + 1;
    match (parse_cidr(token), u32::try_from(number)) {
        (Ok(net), Ok(line)) => list.nets.push((net, line)),
        (Err(msg), _) => error(col, msg),
        (_, Err(_)) => error(col, format!("a list file holds at most {} lines", u32::MAX)),
    }
}

/// Parses list text (for tests and callers that hold it already).
pub fn parse(text: &str) -> List {
    let mut list = List { nets: Vec::new(), errors: Vec::new(), more_errors: 0, sha256: String::new() };
    for (i, line) in text.split_inclusive('\n').enumerate() {
        parse_line(&mut list, i + 1, line.as_bytes());
    }
    list.sha256 = crate::controller::sha256_hex(text.as_bytes());
    list
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_format() {
        let l = parse("; Spamhaus DROP List\n1.10.16.0/20 ; SBL256894\n# comment\n\n  2001:db8::/32\n10.0.0.1/8 ; bad\nnonsense\n");
        assert_eq!(l.nets.len(), 2);
        assert_eq!(l.nets[0].1, 2);
        assert_eq!(l.errors.len(), 2);
        assert_eq!((l.errors[0].line, l.errors[0].col), (6, 1));
        assert!(l.errors[0].message.contains("host bits"), "{}", l.errors[0].message);
    }

    #[test]
    fn only_the_first_bad_lines_keep_their_text() {
        let text = "192.0.2.0/24\n".to_owned() + &"nonsense\n".repeat(10_000) + "198.51.100.0/24\n\u{fffd}\n";
        let l = parse(&text);
        assert_eq!((l.nets.len(), l.errors.len(), l.more_errors), (2, KEPT_PER_SEVERITY, 10_001 - KEPT_PER_SEVERITY));
        assert_eq!(l.errors[0].line, 2);
        let mut bad = b"192.0.2.0/24\n  \xff\n".to_vec();
        bad.extend_from_slice(b"198.51.100.0/24");
        let mut l = List { nets: Vec::new(), errors: Vec::new(), more_errors: 0, sha256: String::new() };
        for (i, line) in bad.split_inclusive(|b| *b == b'\n').enumerate() {
            parse_line(&mut l, i + 1, line);
        }
        assert_eq!(l.nets.len(), 2);
        assert_eq!(l.errors, [LineError { line: 2, col: 3, message: "not UTF-8 text".into() }]);
    }

    #[test]
    fn a_cached_list_is_not_trusted_once_the_path_is_no_longer_a_regular_file() {
        let dir = std::env::temp_dir().join(format!("smtpguard-lists-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("list.txt");
        std::fs::write(&path, "192.0.2.0/24\n").unwrap();
        let mut r = ListReader::default();
        assert_eq!(r.read(&path, 1 << 20).unwrap().nets.len(), 1);
        r.commit();
        std::fs::remove_file(&path).unwrap();
        let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = ListReader::default().read(&path, 1 << 20).unwrap_err().to_string();
        assert!(e.contains("is a FIFO"), "{e}");
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, "192.0.2.0/24\n198.51.100.0/24\n").unwrap();
        let e = ListReader::default().read(&path, 16).unwrap_err().to_string();
        assert!(e.contains("over 16 bytes"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! List files: one CIDR per line, `#` and `;` start comments (the format
//! of Spamhaus DROP and most published blocklists).

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use ipnet::IpNet;

use super::parse::parse_cidr;

pub struct List {
    /// Each network and its line.
    pub nets: Vec<(IpNet, usize)>,
    /// Line, column and message of each bad line.
    pub errors: Vec<(usize, usize, String)>,
}

/// What identifies a file's content without reading it.
type Stamp = (u64, Option<std::time::SystemTime>, u64);

/// Parsed lists by path: a reload re-reads only the lists that changed
/// (a 100,000-line feed costs tens of milliseconds to parse).
static PARSED: Mutex<Option<ListCache>> = Mutex::new(None);
type ListCache = HashMap<PathBuf, (Stamp, Arc<List>)>;

pub fn read(path: &Path) -> std::io::Result<Arc<List>> {
    let meta = std::fs::metadata(path)?;
    let stamp = (meta.len(), meta.modified().ok(), std::os::unix::fs::MetadataExt::ino(&meta));
    let mut cache = PARSED.lock().unwrap_or_else(|p| p.into_inner());
    let cache = cache.get_or_insert_with(HashMap::new);
    if let Some((s, list)) = cache.get(path) {
        if *s == stamp {
            return Ok(list.clone());
        }
    }
    let list = Arc::new(parse(&std::fs::read_to_string(path)?));
    cache.insert(path.to_owned(), (stamp, list.clone()));
    Ok(list)
}

pub fn parse(text: &str) -> List {
    let mut list = List { nets: Vec::new(), errors: Vec::new() };
    for (i, raw) in text.lines().enumerate() {
        let content = raw.split(['#', ';']).next().unwrap_or("");
        let token = content.trim();
        if token.is_empty() {
            continue;
        }
        let col = content.len() - content.trim_start().len() + 1;
        match parse_cidr(token) {
            Ok(net) => list.nets.push((net, i + 1)),
            Err(msg) => list.errors.push((i + 1, col, msg)),
        }
    }
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
        assert_eq!((l.errors[0].0, l.errors[0].1), (6, 1));
        assert!(l.errors[0].2.contains("host bits"), "{}", l.errors[0].2);
    }
}

//! List files: one CIDR per line, `#` and `;` start comments (the format
//! of Spamhaus DROP and most published blocklists).

use std::path::Path;

use ipnet::IpNet;

use super::parse::parse_cidr;

pub struct List {
    /// Each network and its line.
    pub nets: Vec<(IpNet, usize)>,
    /// Line, column and message of each bad line.
    pub errors: Vec<(usize, usize, String)>,
}

pub fn read(path: &Path) -> std::io::Result<List> {
    let text = std::fs::read_to_string(path)?;
    Ok(parse(&text))
}

pub fn parse(text: &str) -> List {
    let mut list = List { nets: Vec::new(), errors: Vec::new() };
    for (i, raw) in text.lines().enumerate() {
        let content = raw.split(['#', ';']).next().unwrap_or("");
        let token = content.trim();
        if token.is_empty() {
            continue;
        }
        let col = raw.find(token).unwrap_or(0) + 1;
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

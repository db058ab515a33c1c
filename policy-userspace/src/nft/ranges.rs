//! The compiled ACL as disjoint address ranges: nftables interval sets
//! hold ranges, not a longest-prefix trie. Every compiled entry says all
//! its prefix means (the compiler folds parents into children), so the
//! address space splits exactly into ranges that each take the entry of
//! the longest prefix over them, or none.

use ipnet::{Ipv4Net, Ipv6Net};
use policy_common::AclEntry;

/// An inclusive range of addresses (IPv4 in the low 32 bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Range {
    pub first: u128,
    pub last: u128,
}

/// Splits `[0, max]` by the prefixes `(first, last, entry)`, nested or
/// disjoint as prefixes are: every address takes the innermost entry over
/// it; addresses under none get `None`.
fn partition(mut prefixes: Vec<(u128, u128, AclEntry)>, max: u128) -> Vec<(Range, Option<AclEntry>)> {
    // Outer prefixes first where two start together.
    prefixes.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    let mut out = Vec::new();
    // The first address not yet emitted; `None` past the end of the space.
    let mut cursor = Some(0u128);
    let mut open: Vec<(u128, AclEntry)> = Vec::new();
    let mut emit = |cursor: &mut Option<u128>, last: u128, entry: Option<AclEntry>| {
        if let Some(first) = *cursor {
            if first <= last {
                out.push((Range { first, last }, entry));
                *cursor = last.checked_add(1);
            }
        }
    };
    for (first, last, entry) in prefixes {
        while let Some(&(end, e)) = open.last() {
            if end >= first {
                break;
            }
            emit(&mut cursor, end, Some(e));
            open.pop();
        }
        let around = open.last().map(|&(_, e)| e);
        if first > 0 {
            emit(&mut cursor, first - 1, around);
        }
        open.push((last, entry));
    }
    while let Some((end, e)) = open.pop() {
        emit(&mut cursor, end, Some(e));
    }
    emit(&mut cursor, max, None);
    out
}

fn v4_range(n: &Ipv4Net) -> (u128, u128) {
    (u32::from(n.network()) as u128, u32::from(n.broadcast()) as u128)
}

fn v6_range(n: &Ipv6Net) -> (u128, u128) {
    (u128::from(n.network()), u128::from(n.broadcast()))
}

/// The IPv4 space of one ACL scope, split.
pub fn v4(entries: &[(u8, Ipv4Net, AclEntry)], scope: u8) -> Vec<(Range, Option<AclEntry>)> {
    let prefixes = entries.iter().filter(|(s, ..)| *s == scope).map(|(_, n, e)| (v4_range(n).0, v4_range(n).1, *e)).collect();
    partition(prefixes, u32::MAX as u128)
}

/// The IPv6 space of one ACL scope, split.
pub fn v6(entries: &[(u8, Ipv6Net, AclEntry)], scope: u8) -> Vec<(Range, Option<AclEntry>)> {
    let prefixes = entries.iter().filter(|(s, ..)| *s == scope).map(|(_, n, e)| (v6_range(n).0, v6_range(n).1, *e)).collect();
    partition(prefixes, u128::MAX)
}

/// The ranges whose entry satisfies `keep`, adjacent ones joined.
pub fn select(parts: &[(Range, Option<AclEntry>)], keep: impl Fn(Option<&AclEntry>) -> bool) -> Vec<Range> {
    let mut out: Vec<Range> = Vec::new();
    for (r, e) in parts {
        if !keep(e.as_ref()) {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.last.checked_add(1) == Some(r.first) => last.last = r.last,
            _ => out.push(*r),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use super::*;
    use crate::reference::AclIndex;

    fn entry(tag: u32) -> AclEntry {
        AclEntry { allow_rule: [tag, 0, 0, 0], deny_rule: [0; 4], country: tag }
    }

    fn find(parts: &[(Range, Option<AclEntry>)], a: u128) -> Option<AclEntry> {
        parts.iter().find(|(r, _)| r.first <= a && a <= r.last).and_then(|(_, e)| *e)
    }

    /// Random nested and disjoint prefixes: every address probed finds in
    /// the ranges what the longest-prefix model finds, and the ranges tile
    /// the space without overlap.
    #[test]
    fn ranges_agree_with_the_longest_prefix_match() {
        let mut seed = 0x1234_5678_9abc_def0u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..200 {
            let mut v4 = Vec::new();
            let mut v6 = Vec::new();
            for i in 0..(next() % 12) as u32 {
                let len = [0u8, 8, 16, 20, 24, 30, 32][(next() % 7) as usize];
                let a = Ipv4Addr::from(((next() % 4) as u32) << 30 | ((next() % 4) as u32) << 16 | (next() % 256) as u32);
                v4.push((0u8, Ipv4Net::new(a, len).unwrap().trunc(), entry(i + 1)));
                let len6 = [0u8, 32, 48, 64, 127, 128][(next() % 6) as usize];
                let a6 = Ipv6Addr::from(((next() % 4) as u128) << 126 | ((next() % 4) as u128) << 64 | (next() % 256) as u128);
                v6.push((0u8, Ipv6Net::new(a6, len6).unwrap().trunc(), entry(i + 1)));
            }
            v4.sort_by_key(|(_, n, _)| (n.network(), n.prefix_len()));
            v4.dedup_by_key(|(_, n, _)| *n);
            v6.sort_by_key(|(_, n, _)| (n.network(), n.prefix_len()));
            v6.dedup_by_key(|(_, n, _)| *n);
            let index = AclIndex::of_entries(&v4, &v6);
            let (p4, p6) = (super::v4(&v4, 0), super::v6(&v6, 0));
            for parts in [&p4, &p6] {
                assert_eq!(parts[0].0.first, 0, "round {round}");
                for w in parts.windows(2) {
                    assert_eq!(w[0].0.last + 1, w[1].0.first, "round {round}: a gap or an overlap");
                }
            }
            assert_eq!(p4.last().unwrap().0.last, u32::MAX as u128);
            assert_eq!(p6.last().unwrap().0.last, u128::MAX);
            let mut probes: Vec<u128> = vec![0, u32::MAX as u128];
            for (_, n, _) in &v4 {
                let (f, l) = v4_range(n);
                probes.extend([f, l, f.saturating_sub(1), (l + 1).min(u32::MAX as u128)]);
            }
            probes.extend((0..64).map(|_| (next() as u32) as u128));
            for a in probes {
                let want = index.lookup(0, IpAddr::V4(Ipv4Addr::from(a as u32))).copied();
                assert_eq!(find(&p4, a), want, "round {round}: {}", Ipv4Addr::from(a as u32));
            }
            let mut probes6: Vec<u128> = vec![0, u128::MAX];
            for (_, n, _) in &v6 {
                let (f, l) = v6_range(n);
                probes6.extend([f, l, f.saturating_sub(1), l.saturating_add(1)]);
            }
            for a in probes6 {
                let want = index.lookup(0, IpAddr::V6(Ipv6Addr::from(a))).copied();
                assert_eq!(find(&p6, a), want, "round {round}: {}", Ipv6Addr::from(a));
            }
        }
    }

    #[test]
    fn adjacent_selected_ranges_are_joined() {
        let parts = [
            (Range { first: 0, last: 9 }, Some(entry(1))),
            (Range { first: 10, last: 19 }, Some(entry(2))),
            (Range { first: 20, last: 29 }, None),
            (Range { first: 30, last: 39 }, Some(entry(3))),
        ];
        assert_eq!(select(&parts, |e| e.is_some()), [Range { first: 0, last: 19 }, Range { first: 30, last: 39 }]);
    }
}

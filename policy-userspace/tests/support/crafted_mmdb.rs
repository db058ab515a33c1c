// A hostile MaxMind database, written byte by byte (mmdb-writer cannot
// write a tree that reuses its nodes). Included by the geo unit tests
// and by tests/policy.rs.

/// An IPv4 MaxMind DB of about 300 bytes whose search tree expands to
/// 2^depth networks: both records of node i lead to node i + 1, and both
/// of the last node to one data record, `{country: {iso_code: US}}`.
pub fn self_similar_mmdb(depth: u32) -> Vec<u8> {
    assert!((1..=32).contains(&depth));
    fn utf8(out: &mut Vec<u8>, s: &str) {
        assert!(s.len() < 29);
        out.push(0x40 | s.len() as u8);
        out.extend_from_slice(s.as_bytes());
    }
    /// Type 5 (uint16) or 6 (uint32), big-endian without leading zeros.
    fn uint(out: &mut Vec<u8>, type_number: u8, v: u32) {
        let bytes: Vec<u8> = v.to_be_bytes().into_iter().skip_while(|b| *b == 0).collect();
        out.push(type_number << 5 | bytes.len() as u8);
        out.extend_from_slice(&bytes);
    }
    let node_count = depth;
    let mut out = Vec::new();
    // Search tree: 24-bit records, left then right. A record of
    // node_count + 16 + n points at byte n of the data section.
    for node in 0..node_count {
        let next = if node + 1 < node_count { node + 1 } else { node_count + 16 };
        for _ in 0..2 {
            out.extend_from_slice(&next.to_be_bytes()[1..]);
        }
    }
    out.extend_from_slice(&[0; 16]);
    // Data section: one map {country: {iso_code: "US"}}.
    out.push(0xE1);
    utf8(&mut out, "country");
    out.push(0xE1);
    utf8(&mut out, "iso_code");
    utf8(&mut out, "US");
    out.extend_from_slice(b"\xAB\xCD\xEFMaxMind.com");
    // Metadata: a map of nine entries.
    out.push(0xE9);
    utf8(&mut out, "node_count");
    uint(&mut out, 6, node_count);
    utf8(&mut out, "record_size");
    uint(&mut out, 5, 24);
    utf8(&mut out, "ip_version");
    uint(&mut out, 5, 4);
    utf8(&mut out, "database_type");
    utf8(&mut out, "Crafted-Country");
    utf8(&mut out, "languages");
    out.extend_from_slice(&[0x00, 0x04]); // extended type 11 (array), empty
    utf8(&mut out, "binary_format_major_version");
    uint(&mut out, 5, 2);
    utf8(&mut out, "binary_format_minor_version");
    uint(&mut out, 5, 0);
    utf8(&mut out, "build_epoch");
    out.extend_from_slice(&[0x00, 0x02]); // extended type 9 (uint64), zero
    utf8(&mut out, "description");
    out.push(0xE0);
    out
}

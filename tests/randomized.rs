//! Random policies and packets for the differential tests, which hold a
//! datapath (the eBPF programs, or the nftables backend) to the userspace
//! model: policies written as YAML over a small address pool, so rules and
//! packets meet, and packets alone or as client streams cut into segments.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use policy_common::direction;
use serde::Serialize;
use smtpguard::reference::{Fragment, Packet};

use crate::rng::Rng;

pub const COUNTRIES: [&str; 4] = ["DE", "KP", "US", "BR"];
pub const PORTS: [(u16, &str); 4] = [(25, "smtp"), (465, "smtps"), (587, "submission"), (2525, "other")];

/// Addresses come from a small pool so rules and packets meet.
pub fn addr(rng: &mut Rng, v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, rng.below(4) as u16, rng.below(4) as u16, 0, 0, 0, rng.below(256) as u16))
    } else {
        IpAddr::V4(Ipv4Addr::new(10, rng.below(4) as u8, rng.below(4) as u8, rng.below(256) as u8))
    }
}

pub fn cidr(rng: &mut Rng, v6: bool) -> ipnet::IpNet {
    let a = addr(rng, v6);
    let len = if v6 { *rng.pick(&[32u8, 40, 48, 56, 64, 112, 128]) } else { *rng.pick(&[8u8, 14, 16, 22, 24, 28, 32]) };
    ipnet::IpNet::new(a, len).unwrap().trunc()
}

#[derive(Serialize)]
struct Record {
    country_code: &'static str,
    n: u32,
}

/// A geo database over the address pool: a country per /16 (IPv4) and /48 (IPv6).
pub fn write_geo(path: &Path) {
    let mut w = mmdb_writer::Writer::new("country");
    let mut n = 0;
    for b in 0..4u8 {
        for c in 0..4u8 {
            n += 1;
            let cc = COUNTRIES[((b + c) % 4) as usize];
            let v4: ipnet::IpNet = format!("10.{b}.{c}.0/24").parse().unwrap();
            w.insert(v4, &Record { country_code: cc, n }).unwrap();
            let v6: ipnet::IpNet = format!("2001:db8:{b}:{c}::/64").parse().unwrap();
            w.insert(v6, &Record { country_code: cc, n }).unwrap();
        }
    }
    std::fs::write(path, w.to_bytes().unwrap()).unwrap();
}

pub fn random_direction_yaml(rng: &mut Rng, ports: &[(u16, &str)]) -> String {
    let mut y = String::new();
    if rng.chance(25) {
        y += "    mode: monitor\n";
    }
    let defaults: Vec<String> = ports.iter().map(|(p, _)| format!("{p}: {}", if rng.chance(50) { "deny" } else { "allow" })).collect();
    writeln!(y, "    default: {{{}}}", defaults.join(", ")).unwrap();
    for kind in ["allow", "deny"] {
        let n = rng.below(6);
        if n == 0 {
            continue;
        }
        writeln!(y, "    {kind}:").unwrap();
        for _ in 0..n {
            let v6 = rng.chance(40);
            let side = if rng.chance(40) { ", side: local" } else { "" };
            let port_list = if rng.chance(40) {
                let chosen: Vec<String> = ports.iter().filter(|_| rng.chance(50)).map(|(p, _)| p.to_string()).collect();
                if chosen.is_empty() { String::new() } else { format!(", ports: [{}]", chosen.join(", ")) }
            } else {
                String::new()
            };
            writeln!(y, "      - {{cidr: \"{}\"{side}{port_list}}}", cidr(rng, v6)).unwrap();
        }
    }
    if rng.chance(50) {
        let countries: Vec<&str> = COUNTRIES.iter().copied().filter(|_| rng.chance(40)).collect();
        let list = if rng.chance(70) { "block" } else { "allow_only" };
        let unknown = if rng.chance(50) { "allow" } else { "deny" };
        writeln!(y, "    geo: {{database: geo.mmdb, field: country_code, {list}: [{}], unknown: {unknown}}}", countries.join(", ")).unwrap();
    }
    if rng.chance(60) {
        y += if rng.chance(30) { "    smtp_commands: {block: [VRFY, EXPN], fragments: allow}\n" } else { "    smtp_commands: {block: [VRFY, EXPN]}\n" };
    }
    if rng.chance(40) {
        y += "    rate_limit: {new_per_minute: 6000, burst: 1000, ban_above_per_minute: 60000}\n";
    }
    writeln!(y, "    malformed: {}", if rng.chance(50) { "deny" } else { "allow" }).unwrap();
    y
}

pub fn random_policy(rng: &mut Rng) -> String {
    let ports: Vec<(u16, &str)> = PORTS.iter().copied().filter(|(p, _)| *p == 25 || rng.chance(50)).collect();
    let port_map: Vec<String> = ports.iter().map(|(p, prof)| format!("{p}: {prof}")).collect();
    format!(
        "version: 1\nmode: {}\nports: {{{}}}\ningress:\n{}egress:\n{}",
        if rng.chance(15) { "monitor" } else { "enforce" },
        port_map.join(", "),
        random_direction_yaml(rng, &ports),
        random_direction_yaml(rng, &ports)
    )
}

pub fn random_packet(rng: &mut Rng) -> Packet {
    let v6 = rng.chance(40);
    let dport = if rng.chance(85) { rng.pick(&PORTS).0 } else { *rng.pick(&[80u16, 443, 26, 24]) };
    let syn = rng.chance(50);
    let payload = if syn { Vec::new() } else { random_payload(rng) };
    let fragment = match rng.below(20) {
        0 => Fragment::First,
        1 => Fragment::Later,
        _ => Fragment::Whole,
    };
    Packet {
        direction: if rng.chance(50) { direction::INGRESS } else { direction::EGRESS },
        src: addr(rng, v6),
        dst: addr(rng, v6),
        sport: 40_000,
        dport,
        syn,
        payload,
        seq: 1,
        fragment,
    }
}

/// A client stream to 25 cut into segments at random points, sent in
/// order with now and then a retransmission, a segment skipped (a gap)
/// or an overlap, as a hostile client or a lossy path would.
pub fn random_stream(rng: &mut Rng) -> Vec<Packet> {
    let v6 = rng.chance(40);
    let text: Vec<u8> = (0..1 + rng.below(3)).flat_map(|_| random_payload(rng)).collect();
    let template = Packet {
        direction: if rng.chance(50) { direction::INGRESS } else { direction::EGRESS },
        src: addr(rng, v6),
        dst: addr(rng, v6),
        sport: 1024 + rng.below(60_000) as u16,
        dport: 25,
        syn: false,
        payload: Vec::new(),
        // Now and then near the wrap of sequence space.
        seq: if rng.chance(20) { u32::MAX - rng.below(64) as u32 } else { rng.below(1 << 30) as u32 },
        fragment: Fragment::Whole,
    };
    let mut packets = Vec::new();
    let (mut at, mut sent) = (0usize, Vec::<(usize, usize)>::new());
    while at < text.len() && packets.len() < 12 {
        let len = (1 + rng.below(40) as usize).min(text.len() - at);
        let (start, end) = match rng.below(10) {
            // A retransmission of something already sent.
            0 if !sent.is_empty() => *rng.pick(&sent),
            // An overlap: from a little before, to past, what was sent.
            1 if at > 0 => (at - 1 - rng.below(at.min(4) as u64) as usize, at + len),
            _ => (at, at + len),
        };
        let end = end.min(text.len());
        // A gap: this piece is lost, the next one arrives first.
        if rng.chance(8) && end < text.len() {
            at = end;
            continue;
        }
        at = at.max(end);
        sent.push((start, end));
        packets.push(Packet { payload: text[start..end].to_vec(), seq: template.seq.wrapping_add(start as u32), ..template.clone() });
    }
    packets
}

/// Up to four pipelined lines: commands with and without leading blanks,
/// in any case, bare CR or LF line ends, near-misses, and sometimes a
/// long line that pushes what follows past the scanner's 512 bytes.
pub fn random_payload(rng: &mut Rng) -> Vec<u8> {
    const VERBS: [&str; 10] = ["VRFY root", "expn list", "VrFy", "EXPN:all", "EHLO x", "VRFYX", "QUIT", "V RFY x", "MAIL FROM:<vrfy@x>", "noop"];
    const BLANKS: [&str; 4] = ["", " ", "\t ", "\x0b"];
    const ENDS: [&str; 4] = ["\r\n", "\n", "\r", ""];
    let mut out = Vec::new();
    for _ in 0..rng.below(5) {
        if rng.chance(10) {
            let n = [300, 500, 506, 1400][rng.below(4) as usize];
            out.extend(std::iter::repeat_n(b'x', n));
        } else {
            out.extend_from_slice(rng.pick(&BLANKS).as_bytes());
            out.extend_from_slice(rng.pick(&VERBS).as_bytes());
        }
        out.extend_from_slice(rng.pick(&ENDS).as_bytes());
    }
    // XDP test runs take a frame within one page.
    out.truncate(3000);
    out
}


/// `p` as a frame: a SYN or a data segment, whole or as a first or later
/// IP fragment (a later one at a random offset, more to come or not).
pub fn frame_of(p: &Packet, rng: &mut Rng) -> Vec<u8> {
    let flags = if p.syn { 0x02 } else { 0x18 };
    let frame = crate::packet::TcpFrame::new(p.src, p.dst, p.dport, flags).sport(p.sport).seq(p.seq).payload(&p.payload);
    match p.fragment {
        Fragment::Whole => frame,
        Fragment::First => frame.fragment(0, true),
        Fragment::Later => frame.fragment(1 + rng.below(100) as u16, rng.chance(50)),
    }
    .build()
}

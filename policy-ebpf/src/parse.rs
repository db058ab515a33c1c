//! Ethernet, up to two VLAN tags, IPv4 (honouring IHL) or IPv6 (walking
//! extension headers up to a named limit), then TCP.
//!
//! Parsing reads only the fields a decision needs, as whole words where
//! the field is one: every byte moved is an instruction on every packet.
//! Multi-byte fields are loaded in memory order and converted with
//! `from_be` where a value is needed; addresses stay in memory order
//! (network-order bytes in a word), which is what the map keys hold.

use policy_common::{MAX_IPV6_EXT_HEADERS, MAX_VLAN_TAGS};

use crate::frame::{ptr_at, Frame};

const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_TCP: u8 = 6;
const IPV6_HOPOPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DSTOPTS: u8 = 60;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
/// Headers must end within this many bytes of the frame start; also the
/// verifier's bound on every variable offset.
pub const HEADER_SPAN: usize = 512;
/// How much a TC hook pulls into the linear area when headers are short.
pub const PULL_LEN: u32 = (HEADER_SPAN + 64) as u32;

/// Where a TCP segment's headers are, as far as the ports.
#[derive(Clone, Copy)]
pub struct Segment {
    pub v6: bool,
    /// Offset of the IP header.
    pub l3: usize,
    /// Offset of the TCP header.
    pub l4: usize,
    /// TCP header and payload, by the IP length fields.
    pub len: usize,
    pub sport: u16,
    pub dport: u16,
}

/// A TCP segment to a guarded port, fully parsed. The addresses are copied
/// out here, once the port is known to be guarded: keeping header offsets
/// instead would make the verifier walk the pipeline once per header layout.
pub struct Flow {
    pub seg: Segment,
    /// Address words in memory order; IPv4 uses the first word.
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub port_slot: usize,
    /// SYN without ACK: a new connection.
    pub syn: bool,
    pub payload_offset: usize,
    pub payload_len: u32,
}

/// How far parsing got. Plain integers rather than an enum with data:
/// LLVM spills the unset payload of such enums as undefined registers,
/// which the verifier rejects.
pub mod outcome {
    /// Not IP or not TCP: none of our business.
    pub const NOT_TCP: u8 = 0;
    /// A non-first TCP fragment.
    pub const FRAGMENT: u8 = 1;
    /// Broken headers.
    pub const MALFORMED: u8 = 2;
    /// The headers run past the directly readable data.
    pub const SHORT: u8 = 3;
    /// Parsed as far as asked.
    pub const TCP: u8 = 4;
}

impl Segment {
    pub const NONE: Self = Self { v6: false, l3: 0, l4: 0, len: 0, sport: 0, dport: 0 };
}

impl Flow {
    pub const NONE: Self =
        Self { seg: Segment::NONE, src: [0; 4], dst: [0; 4], port_slot: 0, syn: false, payload_offset: 0, payload_len: 0 };
}

/// The result of [`ports`]: an [`outcome`] and, for TCP, the segment.
pub struct Ports {
    pub outcome: u8,
    pub seg: Segment,
}

impl Ports {
    #[inline(always)]
    const fn only(outcome: u8) -> Self {
        Self { outcome, seg: Segment::NONE }
    }
}

/// Loads a `T` at `offset`. Never a single byte: LLVM turns the bounds
/// check of a 1-byte load into `ptr >= end`, which the verifier does not
/// take as a proof of one readable byte.
///
/// Packet fields are not always aligned for `T` (an IPv4 address after an
/// odd number of VLAN tags is 2-byte aligned). The verifier and the JIT
/// accept such loads on the architectures smtpguard targets; declaring
/// them unaligned would make LLVM split each into byte loads.
#[inline(always)]
fn load<F: Frame, T: Copy>(frame: &F, offset: usize) -> Option<T> {
    if offset > HEADER_SPAN {
        return None;
    }
    // SAFETY: bounds checked by ptr_at; T is a plain integer or array.
    unsafe { ptr_at::<F, T>(frame, offset).map(|p| core::ptr::read(p)) }
}

#[inline(always)]
fn be16<F: Frame>(frame: &F, offset: usize) -> Option<u16> {
    load::<F, u16>(frame, offset).map(u16::from_be)
}

/// Parses as far as the TCP ports.
#[inline(always)]
pub fn ports<F: Frame>(frame: &F) -> Ports {
    let Some(mut ethertype) = be16(frame, 12) else { return Ports::only(outcome::SHORT) };
    let mut offset = 14;
    for _ in 0..MAX_VLAN_TAGS {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        let Some(inner) = be16(frame, offset + 2) else { return Ports::only(outcome::SHORT) };
        ethertype = inner;
        offset += 4;
    }
    match ethertype {
        ETH_P_IPV4 => ipv4(frame, offset),
        ETH_P_IPV6 => ipv6(frame, offset),
        ETH_P_8021Q | ETH_P_8021AD => Ports::only(outcome::MALFORMED),
        _ => Ports::only(outcome::NOT_TCP),
    }
}

#[inline(always)]
fn ipv4<F: Frame>(frame: &F, l3: usize) -> Ports {
    // Bytes 8, 9: TTL, protocol.
    let Some([_, proto]) = load::<F, [u8; 2]>(frame, l3 + 8) else { return Ports::only(outcome::SHORT) };
    if proto != IPPROTO_TCP {
        return Ports::only(outcome::NOT_TCP);
    }
    // One check after another: matching a tuple of Options lets LLVM
    // compute with a value whose load did not happen, which the verifier
    // rejects when the register still holds a packet pointer.
    let Some([ver_ihl, _]) = load::<F, [u8; 2]>(frame, l3) else { return Ports::only(outcome::SHORT) };
    let Some(total_len) = be16(frame, l3 + 2) else { return Ports::only(outcome::SHORT) };
    let Some(frag) = be16(frame, l3 + 6) else { return Ports::only(outcome::SHORT) };
    let header_len = ((ver_ihl & 0x0f) as usize) * 4;
    let total_len = total_len as usize;
    if ver_ihl >> 4 != 4 || header_len < 20 || total_len < header_len {
        return Ports::only(outcome::MALFORMED);
    }
    if frag & 0x1fff != 0 {
        return Ports::only(outcome::FRAGMENT);
    }
    tcp_ports(frame, false, l3, l3 + header_len, total_len - header_len)
}

#[inline(always)]
fn ipv6<F: Frame>(frame: &F, l3: usize) -> Ports {
    let Some([version, _]) = load::<F, [u8; 2]>(frame, l3) else { return Ports::only(outcome::SHORT) };
    let Some(payload_len) = be16(frame, l3 + 4) else { return Ports::only(outcome::SHORT) };
    let Some([mut next, _]) = load::<F, [u8; 2]>(frame, l3 + 6) else { return Ports::only(outcome::SHORT) };
    if version >> 4 != 6 {
        return Ports::only(outcome::MALFORMED);
    }
    let payload_len = payload_len as usize;
    let mut offset = l3 + 40;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next {
            IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS => {
                let Some(h) = load::<F, [u8; 2]>(frame, offset) else { return Ports::only(outcome::SHORT) };
                next = h[0];
                offset += (h[1] as usize + 1) * 8;
            }
            IPV6_FRAGMENT => {
                let Some([n, _, hi, lo]) = load::<F, [u8; 4]>(frame, offset) else { return Ports::only(outcome::SHORT) };
                let frag = u16::from_be_bytes([hi, lo]);
                next = n;
                if frag >> 3 != 0 {
                    return Ports::only(if next == IPPROTO_TCP { outcome::FRAGMENT } else { outcome::NOT_TCP });
                }
                offset += 8;
            }
            _ => break,
        }
    }
    match next {
        IPPROTO_TCP => {}
        IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS | IPV6_FRAGMENT => return Ports::only(outcome::MALFORMED),
        _ => return Ports::only(outcome::NOT_TCP),
    }
    let ext_len = offset - (l3 + 40);
    if payload_len < ext_len {
        return Ports::only(outcome::MALFORMED);
    }
    tcp_ports(frame, true, l3, offset, payload_len - ext_len)
}

#[inline(always)]
fn tcp_ports<F: Frame>(frame: &F, v6: bool, l3: usize, l4: usize, len: usize) -> Ports {
    let Some(ports) = load::<F, [u16; 2]>(frame, l4) else { return Ports::only(outcome::SHORT) };
    let (sport, dport) = (u16::from_be(ports[0]), u16::from_be(ports[1]));
    Ports { outcome: outcome::TCP, seg: Segment { v6, l3, l4, len, sport, dport } }
}

/// Parses the rest of the TCP header of a segment to a guarded port: an
/// [`outcome`] and, for TCP, the flow.
#[inline(always)]
pub fn rest<F: Frame>(frame: &F, seg: Segment, port_slot: usize) -> (u8, Flow) {
    let Some(t) = load::<F, [u8; 2]>(frame, seg.l4 + 12) else { return (outcome::SHORT, Flow::NONE) };
    let header_len = ((t[0] >> 4) as usize) * 4;
    // The whole TCP header must be in the frame, options included.
    if header_len < 20 || seg.len < header_len || seg.l4 + header_len > frame.wire_len() as usize {
        return (outcome::MALFORMED, Flow::NONE);
    }
    let (src, dst) = if seg.v6 {
        let Some(a) = load::<F, [u32; 8]>(frame, seg.l3 + 8) else { return (outcome::SHORT, Flow::NONE) };
        ([a[0], a[1], a[2], a[3]], [a[4], a[5], a[6], a[7]])
    } else {
        let Some(a) = load::<F, [u32; 2]>(frame, seg.l3 + 12) else { return (outcome::SHORT, Flow::NONE) };
        ([a[0], 0, 0, 0], [a[1], 0, 0, 0])
    };
    let flow = Flow {
        seg,
        src,
        dst,
        port_slot,
        syn: t[1] & (TCP_SYN | TCP_ACK) == TCP_SYN,
        payload_offset: seg.l4 + header_len,
        payload_len: (seg.len - header_len) as u32,
    };
    (outcome::TCP, flow)
}

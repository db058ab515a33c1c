//! Ethernet, up to two VLAN tags, IPv4 (honouring IHL) or IPv6 (walking
//! extension headers up to a named limit), then TCP.
//!
//! Headers are read as byte arrays: packet data has no alignment, and
//! network byte order is explicit at each read.

use policy_common::{DirectionPolicy, MAX_IPV6_EXT_HEADERS, MAX_VLAN_TAGS, PORT_SLOT_UNKNOWN};

use crate::frame::{ptr_at, Frame};

const ETH_HLEN: usize = 14;
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

/// A TCP segment to a guarded port.
pub struct Flow {
    pub v6: bool,
    /// IPv4 addresses use the first four bytes.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub port_slot: usize,
    /// SYN without ACK: a new connection.
    pub syn: bool,
    pub payload_offset: usize,
    pub payload_len: u32,
}

pub enum Parsed {
    /// Not IP, not TCP, or no guarded port: none of our business.
    NotOurs,
    /// A non-first TCP fragment.
    Fragment,
    /// Broken headers; `port_slot` is known once the ports were read.
    Malformed { port_slot: usize },
    /// Headers run past the directly readable data.
    Short { port_slot: usize },
    Tcp(Flow),
}

#[inline(always)]
fn read<F: Frame, const N: usize>(frame: &F, offset: usize) -> Option<[u8; N]> {
    if offset > HEADER_SPAN {
        return None;
    }
    // SAFETY: [u8; N] has alignment 1 and accepts any bytes.
    unsafe { ptr_at::<F, [u8; N]>(frame, offset).map(|p| *p) }
}

#[inline(always)]
fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

const UNKNOWN_SHORT: Parsed = Parsed::Short { port_slot: PORT_SLOT_UNKNOWN };
const UNKNOWN_MALFORMED: Parsed = Parsed::Malformed { port_slot: PORT_SLOT_UNKNOWN };

#[inline(always)]
pub fn parse<F: Frame>(frame: &F, policy: &DirectionPolicy) -> Parsed {
    let Some(eth) = read::<F, ETH_HLEN>(frame, 0) else { return UNKNOWN_SHORT };
    let mut ethertype = be16([eth[12], eth[13]]);
    let mut offset = ETH_HLEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        let Some(tag) = read::<F, 4>(frame, offset) else { return UNKNOWN_SHORT };
        ethertype = be16([tag[2], tag[3]]);
        offset += 4;
    }
    match ethertype {
        ETH_P_IPV4 => parse_ipv4(frame, offset, policy),
        ETH_P_IPV6 => parse_ipv6(frame, offset, policy),
        ETH_P_8021Q | ETH_P_8021AD => UNKNOWN_MALFORMED,
        _ => Parsed::NotOurs,
    }
}

#[inline(always)]
fn parse_ipv4<F: Frame>(frame: &F, offset: usize, policy: &DirectionPolicy) -> Parsed {
    let Some(ip) = read::<F, 20>(frame, offset) else { return UNKNOWN_SHORT };
    if ip[9] != IPPROTO_TCP {
        return Parsed::NotOurs;
    }
    let header_len = ((ip[0] & 0x0f) as usize) * 4;
    let total_len = be16([ip[2], ip[3]]) as usize;
    if ip[0] >> 4 != 4 || header_len < 20 || total_len < header_len {
        return UNKNOWN_MALFORMED;
    }
    if be16([ip[6], ip[7]]) & 0x1fff != 0 {
        return Parsed::Fragment;
    }
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src[..4].copy_from_slice(&ip[12..16]);
    dst[..4].copy_from_slice(&ip[16..20]);
    parse_tcp(frame, offset + header_len, total_len - header_len, false, src, dst, policy)
}

#[inline(always)]
fn parse_ipv6<F: Frame>(frame: &F, offset: usize, policy: &DirectionPolicy) -> Parsed {
    let Some(ip) = read::<F, 40>(frame, offset) else { return UNKNOWN_SHORT };
    if ip[0] >> 4 != 6 {
        return UNKNOWN_MALFORMED;
    }
    let payload_len = be16([ip[4], ip[5]]) as usize;
    let mut next = ip[6];
    let mut offset = offset + 40;
    let mut ext_len = 0usize;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next {
            IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS => {
                let Some(h) = read::<F, 2>(frame, offset) else { return UNKNOWN_SHORT };
                next = h[0];
                let len = (h[1] as usize + 1) * 8;
                offset += len;
                ext_len += len;
            }
            IPV6_FRAGMENT => {
                let Some(h) = read::<F, 8>(frame, offset) else { return UNKNOWN_SHORT };
                next = h[0];
                if be16([h[2], h[3]]) >> 3 != 0 {
                    return if next == IPPROTO_TCP { Parsed::Fragment } else { Parsed::NotOurs };
                }
                offset += 8;
                ext_len += 8;
            }
            _ => break,
        }
    }
    match next {
        IPPROTO_TCP => {}
        IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS | IPV6_FRAGMENT => return UNKNOWN_MALFORMED,
        _ => return Parsed::NotOurs,
    }
    if payload_len < ext_len {
        return UNKNOWN_MALFORMED;
    }
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src.copy_from_slice(&ip[8..24]);
    dst.copy_from_slice(&ip[24..40]);
    parse_tcp(frame, offset, payload_len - ext_len, true, src, dst, policy)
}

#[inline(always)]
fn parse_tcp<F: Frame>(
    frame: &F,
    offset: usize,
    segment_len: usize,
    v6: bool,
    src: [u8; 16],
    dst: [u8; 16],
    policy: &DirectionPolicy,
) -> Parsed {
    let Some(ports) = read::<F, 4>(frame, offset) else { return UNKNOWN_SHORT };
    let dport = be16([ports[2], ports[3]]);
    let Some(port_slot) = policy.port_slot(dport) else { return Parsed::NotOurs };
    let Some(tcp) = read::<F, 20>(frame, offset) else { return Parsed::Short { port_slot } };
    let header_len = ((tcp[12] >> 4) as usize) * 4;
    if header_len < 20 || segment_len < header_len {
        return Parsed::Malformed { port_slot };
    }
    let flags = tcp[13];
    Parsed::Tcp(Flow {
        v6,
        src,
        dst,
        sport: be16([ports[0], ports[1]]),
        dport,
        port_slot,
        syn: flags & (TCP_SYN | TCP_ACK) == TCP_SYN,
        payload_offset: offset + header_len,
        payload_len: (segment_len - header_len) as u32,
    })
}

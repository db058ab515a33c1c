//! Ethernet, up to two VLAN tags, IPv4 (honouring IHL) or IPv6 (walking
//! extension headers up to a named limit), then TCP.
//!
//! Parsing reads only the fields a decision needs, as whole words where
//! the field is one: every byte moved is an instruction on every packet.
//! Multi-byte fields are loaded in memory order and converted with
//! `from_be` where a value is needed; addresses stay in memory order
//! (network-order bytes in a word), which is what the map keys hold.

use core::mem::MaybeUninit;

use policy_common::{MAX_IPV6_EXT_HEADERS, MAX_VLAN_TAGS};

use crate::{
    frame::{load, ptr_at, Frame},
    opaque::opaque,
};

/// Loads field `$field` (or element `$field[$i]`) of the header `$ty`
/// behind `$h`, a pointer [`ptr_at`] returned, as a `$width` (u8, u16 or
/// u32) with one [`load`] at its offset. The closure, never called, makes
/// the compiler check that the field has that type.
macro_rules! field {
    ($width:ident, $h:expr, $ty:ty, $($field:ident).+) => {{
        let _: fn(&$ty) -> $width = |t| t.$($field).+;
        // SAFETY: `$h` passed `ptr_at`'s bounds check for a whole `$ty`.
        unsafe { load::$width::<{ core::mem::offset_of!($ty, $($field).+) }>($h.cast::<u8>()) }
    }};
    ($width:ident, $h:expr, $ty:ty, $field:ident[$i:literal]) => {{
        let _: fn(&$ty) -> $width = |t| t.$field[$i];
        // SAFETY: as above.
        unsafe { load::$width::<{ core::mem::offset_of!($ty, $field) + $i * core::mem::size_of::<$width>() }>($h.cast::<u8>()) }
    }};
}

const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_TCP: u8 = 6;
const IPV6_HOPOPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DSTOPTS: u8 = 60;
/// IPv4 flags and fragment offset: More Fragments, and the offset's bits.
const IPV4_MORE_FRAGMENTS: u16 = 0x2000;
const IPV4_OFFSET: u16 = 0x1fff;
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
    /// The first fragment of a fragmented segment: the rest of it (and
    /// perhaps of its TCP header) is in later fragments.
    pub first_fragment: bool,
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
    /// SYN without ACK: a new connection. Also a first fragment too short
    /// for the TCP flags: judged as the new connection it may be.
    pub syn: bool,
    pub payload_offset: usize,
    pub payload_len: u32,
    /// Sequence number of the first payload byte (a SYN takes one).
    pub stream_seq: u32,
}

/// [`Flow::stream_seq`] from a TCP header's fields.
#[inline(always)]
fn stream_seq(seq_be: u32, flags: u8) -> u32 {
    u32::from_be(seq_be).wrapping_add((flags & TCP_SYN != 0) as u32)
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
    pub const NONE: Self = Self { v6: false, l3: 0, l4: 0, len: 0, sport: 0, dport: 0, first_fragment: false };
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

/// The header `T` at `offset`, after one bounds check for all of it. Read
/// its fields with `field!`: the pointer may be misaligned for `T`.
#[inline(always)]
fn header<F: Frame, T>(frame: &F, offset: usize) -> Option<*const T> {
    if offset > HEADER_SPAN {
        return None;
    }
    // SAFETY: ptr_at checks that size_of::<T>() bytes are readable.
    unsafe { ptr_at::<F, T>(frame, offset) }
}

// Header layouts, packed: a layout's alignment is 1 like the packet's,
// and its fields sit at their wire offsets with no padding. Only `field!`
// reads them (sizes for bounds checks, offsets for loads).

#[repr(C, packed)]
struct EthHdr {
    dst: [u8; 6],
    src: [u8; 6],
    ethertype: u16,
}
const _: () = assert!(core::mem::size_of::<EthHdr>() == 14);

#[repr(C, packed)]
struct VlanTag {
    tci: u16,
    ethertype: u16,
}
const _: () = assert!(core::mem::size_of::<VlanTag>() == 4);

#[repr(C, packed)]
struct Ipv4Hdr {
    ver_ihl: u8,
    tos: u8,
    total_len: u16,
    id: u16,
    frag: u16,
    ttl: u8,
    protocol: u8,
    check: u16,
    src: u32,
    dst: u32,
}
const _: () = assert!(core::mem::size_of::<Ipv4Hdr>() == 20);

#[repr(C, packed)]
struct Ipv6Hdr {
    /// Version (high nibble) and the traffic class's first half.
    ver_class: u8,
    class_flow: [u8; 3],
    payload_len: u16,
    next: u8,
    hop_limit: u8,
    src: [u32; 4],
    dst: [u32; 4],
}
const _: () = assert!(core::mem::size_of::<Ipv6Hdr>() == 40);

/// The first bytes shared by hop-by-hop, routing and destination options.
#[repr(C, packed)]
struct Ipv6Ext {
    next: u8,
    len: u8,
}

#[repr(C, packed)]
struct Ipv6Frag {
    next: u8,
    reserved: u8,
    offset_flags: u16,
    id: u32,
}
const _: () = assert!(core::mem::size_of::<Ipv6Frag>() == 8);

#[repr(C, packed)]
struct TcpPorts {
    sport: u16,
    dport: u16,
}

#[repr(C, packed)]
struct TcpHdr {
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    offset: u8,
    flags: u8,
    window: u16,
    check: u16,
    urgent: u16,
}
const _: () = assert!(core::mem::size_of::<TcpHdr>() == 20);

/// The common frame, read at fixed offsets: untagged IPv4 without
/// options, then the TCP ports.
#[repr(C, packed)]
struct PlainTcp4 {
    eth: EthHdr,
    ver_ihl: u8,
    tos: u8,
    total_len: u16,
    id: u16,
    frag: u16,
    ttl: u8,
    protocol: u8,
    check: u16,
    src: u32,
    dst: u32,
    sport: u16,
    dport: u16,
}
const _: () = assert!(core::mem::size_of::<PlainTcp4>() == 38);

/// [`plain`]'s answers besides a TCP destination port (0..=65535).
pub mod plain {
    /// Untagged IPv4 without options, not TCP.
    pub const NOT_TCP: u32 = 0x1_0000;
    /// Anything else: parse it in full.
    pub const OTHER: u32 = 0x2_0000;
}

/// One bounds check and a few fixed loads for the frame most traffic is:
/// its TCP destination port, or a [`plain`] answer. Non-first fragments
/// are `OTHER` (their bytes there are no ports).
#[inline(always)]
pub fn plain<F: Frame>(frame: &F) -> u32 {
    // SAFETY: ptr_at checks that the whole struct is readable.
    let Some(h) = (unsafe { ptr_at::<F, PlainTcp4>(frame, 0) }) else { return plain::OTHER };
    let (ethertype, ver_ihl, protocol) = (field!(u16, h, PlainTcp4, eth.ethertype), field!(u8, h, PlainTcp4, ver_ihl), field!(u8, h, PlainTcp4, protocol));
    if ethertype != ETH_P_IPV4.to_be() || ver_ihl != 0x45 {
        return plain::OTHER;
    }
    if protocol != IPPROTO_TCP {
        return plain::NOT_TCP;
    }
    if u16::from_be(field!(u16, h, PlainTcp4, frag)) & IPV4_OFFSET != 0 {
        return plain::OTHER;
    }
    u16::from_be(field!(u16, h, PlainTcp4, dport)) as u32
}

/// [`PlainTcp4`] followed by the rest of a TCP header without options'
/// worth: what a SYN is.
#[repr(C, packed)]
struct PlainSegment4 {
    eth: EthHdr,
    ip: Ipv4Hdr,
    tcp: TcpHdr,
}
const _: () = assert!(core::mem::size_of::<PlainSegment4>() == 54);

/// The flow of a frame [`plain`] answered with a guarded port, read with
/// one bounds check at fixed offsets into `flow`; the same outcomes as
/// [`ports`] and [`rest`] would give, or `SHORT` when the frame is shorter
/// than a header without options (the general parse then decides).
#[inline(always)]
pub fn plain_flow<F: Frame>(frame: &F, port_slot: usize, flow: &mut MaybeUninit<Flow>) -> u8 {
    // SAFETY: ptr_at checks that the whole struct is readable.
    let Some(h) = (unsafe { ptr_at::<F, PlainSegment4>(frame, 0) }) else { return outcome::SHORT };
    let (total_len, frag, addrs, sport, dport, offset, flags, seq) = (
        u16::from_be(field!(u16, h, PlainSegment4, ip.total_len)) as usize,
        u16::from_be(field!(u16, h, PlainSegment4, ip.frag)),
        (field!(u32, h, PlainSegment4, ip.src), field!(u32, h, PlainSegment4, ip.dst)),
        u16::from_be(field!(u16, h, PlainSegment4, tcp.sport)),
        u16::from_be(field!(u16, h, PlainSegment4, tcp.dport)),
        field!(u8, h, PlainSegment4, tcp.offset),
        field!(u8, h, PlainSegment4, tcp.flags),
        field!(u32, h, PlainSegment4, tcp.seq),
    );
    // First fragments are rare: the general parse handles them.
    if frag & IPV4_MORE_FRAGMENTS != 0 {
        return outcome::SHORT;
    }
    let header_len = ((offset >> 4) as usize) * 4;
    let wire_len = frame.wire_len() as usize;
    // 14 + total_len: the IP length must not run past the frame (as in `rest`).
    if total_len < 20 || header_len < 20 || total_len - 20 < header_len || 14 + total_len > wire_len {
        return outcome::MALFORMED;
    }
    let stream_seq = stream_seq(seq, flags);
    flow.write(Flow {
        seg: Segment { v6: false, l3: 14, l4: 34, len: total_len - 20, sport, dport, first_fragment: false },
        src: [addrs.0, 0, 0, 0],
        dst: [addrs.1, 0, 0, 0],
        port_slot,
        syn: flags & (TCP_SYN | TCP_ACK) == TCP_SYN,
        payload_offset: 34 + header_len,
        payload_len: (total_len - 20 - header_len) as u32,
        stream_seq,
    });
    outcome::TCP
}

/// Parses as far as the TCP ports.
#[inline(always)]
pub fn ports<F: Frame>(frame: &F) -> Ports {
    let Some(eth) = header::<F, EthHdr>(frame, 0) else { return Ports::only(outcome::SHORT) };
    let mut ethertype = u16::from_be(field!(u16, eth, EthHdr, ethertype));
    let mut offset = 14;
    for _ in 0..MAX_VLAN_TAGS {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        let Some(tag) = header::<F, VlanTag>(frame, offset) else { return Ports::only(outcome::SHORT) };
        ethertype = u16::from_be(field!(u16, tag, VlanTag, ethertype));
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
    let Some(ip) = header::<F, Ipv4Hdr>(frame, l3) else { return Ports::only(outcome::SHORT) };
    let (ver_ihl, protocol, total_len, frag) =
        (
            field!(u8, ip, Ipv4Hdr, ver_ihl),
            field!(u8, ip, Ipv4Hdr, protocol),
            u16::from_be(field!(u16, ip, Ipv4Hdr, total_len)) as usize,
            u16::from_be(field!(u16, ip, Ipv4Hdr, frag)),
        );
    if protocol != IPPROTO_TCP {
        return Ports::only(outcome::NOT_TCP);
    }
    let header_len = ((ver_ihl & 0x0f) as usize) * 4;
    if ver_ihl >> 4 != 4 || header_len < 20 || total_len < header_len {
        return Ports::only(outcome::MALFORMED);
    }
    if frag & IPV4_OFFSET != 0 {
        return Ports::only(outcome::FRAGMENT);
    }
    tcp_ports(frame, false, l3, l3 + header_len, total_len - header_len, frag & IPV4_MORE_FRAGMENTS != 0)
}

#[inline(always)]
fn ipv6<F: Frame>(frame: &F, l3: usize) -> Ports {
    let Some(ip) = header::<F, Ipv6Hdr>(frame, l3) else { return Ports::only(outcome::SHORT) };
    let (first, payload_len, mut next) =
        (field!(u8, ip, Ipv6Hdr, ver_class), u16::from_be(field!(u16, ip, Ipv6Hdr, payload_len)) as usize, field!(u8, ip, Ipv6Hdr, next));
    if first >> 4 != 6 {
        return Ports::only(outcome::MALFORMED);
    }
    let mut offset = l3 + 40;
    let mut first_fragment = false;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next {
            IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS => {
                let Some(h) = header::<F, Ipv6Ext>(frame, offset) else { return Ports::only(outcome::SHORT) };
                let (n, len) = (field!(u8, h, Ipv6Ext, next), field!(u8, h, Ipv6Ext, len));
                next = n;
                offset += (len as usize + 1) * 8;
            }
            IPV6_FRAGMENT => {
                let Some(h) = header::<F, Ipv6Frag>(frame, offset) else { return Ports::only(outcome::SHORT) };
                let (n, frag) = (field!(u8, h, Ipv6Frag, next), u16::from_be(field!(u16, h, Ipv6Frag, offset_flags)));
                next = n;
                if frag >> 3 != 0 {
                    // A later fragment: TCP, or headers before TCP that may
                    // end in it, is a fragment we count; anything else is not ours.
                    return Ports::only(match next {
                        IPPROTO_TCP | IPV6_HOPOPTS | IPV6_ROUTING | IPV6_FRAGMENT | IPV6_DSTOPTS => outcome::FRAGMENT,
                        _ => outcome::NOT_TCP,
                    });
                }
                first_fragment |= frag & 1 != 0;
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
    tcp_ports(frame, true, l3, offset, payload_len - ext_len, first_fragment)
}

#[inline(always)]
fn tcp_ports<F: Frame>(frame: &F, v6: bool, l3: usize, l4: usize, len: usize, first_fragment: bool) -> Ports {
    // The ports must be within the IP length, even in a first fragment.
    if len < 4 {
        return Ports::only(outcome::MALFORMED);
    }
    let Some(p) = header::<F, TcpPorts>(frame, l4) else { return Ports::only(outcome::SHORT) };
    let (sport, dport) = (u16::from_be(field!(u16, p, TcpPorts, sport)), u16::from_be(field!(u16, p, TcpPorts, dport)));
    // Opaque: false is a constant on most header layouts, and the verifier
    // would carry the difference through the pipeline.
    let first_fragment = opaque(first_fragment as u64) != 0;
    Ports { outcome: outcome::TCP, seg: Segment { v6, l3, l4, len, sport, dport, first_fragment } }
}

/// Flags and header length for a first fragment that ends inside its TCP
/// header: a SYN, and a header as long as what is there (no payload).
/// Opaque, so the verifier does not walk the pipeline once more for
/// these constants.
#[inline(always)]
fn cut_header(len: usize) -> (u8, usize, u32) {
    (opaque(TCP_SYN as u64) as u8, opaque(len as u64) as usize, 0)
}

/// Parses the rest of the TCP header of a segment to a guarded port: an
/// [`outcome`] and, for TCP, the flow, written into `flow` only then: a
/// returned or pre-zeroed `Flow` costs a memset (a byte loop in BPF) or
/// an empty flow materialised on every failure path.
#[inline(always)]
pub fn rest<F: Frame>(frame: &F, seg: Segment, port_slot: usize, flow: &mut MaybeUninit<Flow>) -> u8 {
    // An IP length past the frame's end claims bytes that are not there.
    if seg.l4 + seg.len > frame.wire_len() as usize {
        return outcome::MALFORMED;
    }
    // A first fragment that ends inside the TCP header still names both
    // ports: it is judged as a new connection (the flags are not in sight).
    // (A cut header's sequence number is not needed: first fragments
    // move no flow state.)
    let (flags, header_len, seq) = if seg.first_fragment && seg.len < 20 {
        cut_header(seg.len)
    } else {
        let Some(tcp) = header::<F, TcpHdr>(frame, seg.l4) else { return outcome::SHORT };
        let (offset, flags, seq) = (field!(u8, tcp, TcpHdr, offset), field!(u8, tcp, TcpHdr, flags), field!(u32, tcp, TcpHdr, seq));
        let header_len = ((offset >> 4) as usize) * 4;
        if seg.first_fragment && seg.len < header_len {
            cut_header(seg.len)
        } else {
            // The whole TCP header must be in the frame, options included.
            if header_len < 20 || seg.len < header_len || seg.l4 + header_len > frame.wire_len() as usize {
                return outcome::MALFORMED;
            }
            (flags, header_len, seq)
        }
    };
    let stream_seq = stream_seq(seq, flags);
    let syn = flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    // Opaque: the branches above taught the verifier whether this is a
    // first fragment, and it would walk the whole pipeline once for each.
    let seg = Segment { first_fragment: opaque(seg.first_fragment as u64) != 0, ..seg };
    let (src, dst) = if seg.v6 {
        let Some(ip) = header::<F, Ipv6Hdr>(frame, seg.l3) else { return outcome::SHORT };
        let src = [field!(u32, ip, Ipv6Hdr, src[0]), field!(u32, ip, Ipv6Hdr, src[1]), field!(u32, ip, Ipv6Hdr, src[2]), field!(u32, ip, Ipv6Hdr, src[3])];
        let dst = [field!(u32, ip, Ipv6Hdr, dst[0]), field!(u32, ip, Ipv6Hdr, dst[1]), field!(u32, ip, Ipv6Hdr, dst[2]), field!(u32, ip, Ipv6Hdr, dst[3])];
        (src, dst)
    } else {
        let Some(ip) = header::<F, Ipv4Hdr>(frame, seg.l3) else { return outcome::SHORT };
        ([field!(u32, ip, Ipv4Hdr, src), 0, 0, 0], [field!(u32, ip, Ipv4Hdr, dst), 0, 0, 0])
    };
    flow.write(Flow {
        seg,
        src,
        dst,
        port_slot,
        syn,
        payload_offset: seg.l4 + header_len,
        payload_len: (seg.len - header_len) as u32,
        stream_seq,
    });
    outcome::TCP
}

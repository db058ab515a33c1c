//! The flow-trace selector: which flows' decisions the datapath describes
//! in an aya-log line (`smtpguard trace`).
//!
//! `TRACE` holds one [`TraceSelector`]. It is a `BPF_F_MMAPABLE` array:
//! `smtpguard trace` maps it and stores whole 8-byte words
//! ([`trace_word`]) with atomic stores, `until_ns` last when it turns a
//! trace on and first when it turns it off; the datapath reads each word
//! with one atomic load. With `until_ns` zero (the normal state) the
//! datapath's whole cost is that one load and a branch.

use core::net::IpAddr;

/// Key 0 of `TRACE`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceSelector {
    /// Coarse-clock time (ns) until which matching flows are traced; 0:
    /// off. The datapath honours it, so a trace whose command was killed
    /// stops by itself.
    pub until_ns: u64,
    /// The address, as words holding network-order bytes (the flow's
    /// layout); IPv4 in the first word, the rest zero.
    pub addr: [u32; 4],
    /// A port (host order) the flow's source or destination port must
    /// equal; 0: any.
    pub port: u16,
    /// 1: `addr` is IPv6.
    pub v6: u8,
    pub _pad: [u8; 5],
}
const _: () = assert!(core::mem::size_of::<TraceSelector>() == 8 * trace_word::COUNT);

/// The 8-byte words of [`TraceSelector`], as the datapath loads them.
pub mod trace_word {
    /// `until_ns`.
    pub const UNTIL: usize = 0;
    /// `addr[0..2]` (low half: `addr[0]`).
    pub const ADDR_LO: usize = 1;
    /// `addr[2..4]`.
    pub const ADDR_HI: usize = 2;
    /// `port` (bits 0..16) and `v6` (bits 16..24).
    pub const MATCH: usize = 3;
    pub const COUNT: usize = 4;
}
const _: () = {
    use core::mem::offset_of;
    assert!(offset_of!(TraceSelector, until_ns) == 8 * trace_word::UNTIL);
    assert!(offset_of!(TraceSelector, addr) == 8 * trace_word::ADDR_LO);
    assert!(offset_of!(TraceSelector, port) == 8 * trace_word::MATCH);
    assert!(offset_of!(TraceSelector, v6) == 8 * trace_word::MATCH + 2);
};

impl TraceSelector {
    /// Traces flows from or to `addr` (and `port`, unless 0) until `until_ns`.
    pub fn new(addr: IpAddr, port: u16, until_ns: u64) -> Self {
        let (octets, v6) = match addr {
            IpAddr::V4(a) => {
                let o = a.octets();
                ([o[0], o[1], o[2], o[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0)
            }
            IpAddr::V6(a) => (a.octets(), 1),
        };
        let mut words = [0u32; 4];
        for (i, w) in words.iter_mut().enumerate() {
            *w = u32::from_ne_bytes([octets[4 * i], octets[4 * i + 1], octets[4 * i + 2], octets[4 * i + 3]]);
        }
        Self { until_ns, addr: words, port, v6, _pad: [0; 5] }
    }

    /// The value as its words, in order.
    pub fn words(&self) -> [u64; trace_word::COUNT] {
        // SAFETY: both are 32 bytes of plain integers; `_pad` is a field,
        // so the struct has no padding bytes of the compiler's.
        unsafe { core::mem::transmute::<Self, [u64; trace_word::COUNT]>(*self) }
    }

    /// The value whose words these are.
    pub fn from_words(words: [u64; trace_word::COUNT]) -> Self {
        // SAFETY: as in `words`; every bit pattern is a valid selector.
        unsafe { core::mem::transmute::<[u64; trace_word::COUNT], Self>(words) }
    }
}

/// The `TraceSelector::addr` words as a pair of 8-byte words, as the
/// datapath compares them: `[addr[0] | addr[1] << 32, addr[2] | addr[3] << 32]`.
#[inline(always)]
pub const fn addr_pair(addr: &[u32; 4]) -> (u64, u64) {
    (addr[0] as u64 | (addr[1] as u64) << 32, addr[2] as u64 | (addr[3] as u64) << 32)
}

#[cfg(test)]
mod tests {
    use core::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    #[test]
    fn words_hold_the_flow_layout_and_the_match_word() {
        let s = TraceSelector::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7)), 25, 99);
        let w = s.words();
        assert_eq!(w[trace_word::UNTIL], 99);
        assert_eq!(w[trace_word::ADDR_LO], u32::from_ne_bytes([198, 51, 100, 7]) as u64);
        assert_eq!(w[trace_word::ADDR_HI], 0);
        assert_eq!(w[trace_word::MATCH], 25);
        assert_eq!(TraceSelector::from_words(w), s);
        assert_eq!(addr_pair(&s.addr), (w[trace_word::ADDR_LO], w[trace_word::ADDR_HI]));

        let a: Ipv6Addr = "2001:db8:100::7".parse().unwrap();
        let s = TraceSelector::new(IpAddr::V6(a), 0, 1);
        let w = s.words();
        assert_eq!(w[trace_word::MATCH], 1 << 16);
        let mut octets = [0u8; 16];
        octets[..8].copy_from_slice(&w[trace_word::ADDR_LO].to_ne_bytes());
        octets[8..].copy_from_slice(&w[trace_word::ADDR_HI].to_ne_bytes());
        assert_eq!(Ipv6Addr::from(octets), a);
    }
}

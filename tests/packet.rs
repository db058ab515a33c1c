//! Crafted frames for BPF_PROG_TEST_RUN: Ethernet, VLAN tags, IPv4 with
//! options, IPv6 with extension headers, fragments, TCP with payload.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const ACK: u8 = 0x10;
pub const PSH: u8 = 0x08;

pub const TPID_8021Q: u16 = 0x8100;
pub const TPID_8021AD: u16 = 0x88a8;

/// IPv6 extension header kinds the builder can insert.
#[derive(Clone, Copy, Debug)]
pub enum Ext {
    HopByHop,
    Routing,
    DestOpts,
}

/// A fragment position.
#[derive(Clone, Copy, Debug)]
pub struct Fragment {
    /// Offset in 8-byte units; 0 is the first fragment.
    pub offset: u16,
    pub more: bool,
}

#[derive(Clone, Debug)]
pub struct TcpFrame {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub flags: u8,
    /// Sequence number (1 unless set).
    pub seq: u32,
    pub payload: Vec<u8>,
    /// Outermost first: (TPID, VLAN id).
    pub vlans: Vec<(u16, u16)>,
    /// IPv4 options, padded to 4 bytes by the builder.
    pub ipv4_options: Vec<u8>,
    pub ipv6_ext: Vec<Ext>,
    pub fragment: Option<Fragment>,
    /// IP protocol number (6 for TCP; others build a non-TCP frame).
    pub protocol: u8,
}

impl TcpFrame {
    pub fn new(src: IpAddr, dst: IpAddr, dport: u16, flags: u8) -> Self {
        Self {
            src,
            dst,
            sport: 40_000,
            dport,
            flags,
            seq: 1,
            payload: Vec::new(),
            vlans: Vec::new(),
            ipv4_options: Vec::new(),
            ipv6_ext: Vec::new(),
            fragment: None,
            protocol: 6,
        }
    }

    pub fn payload(mut self, payload: &[u8]) -> Self {
        self.payload = payload.to_vec();
        self
    }

    pub fn vlan(mut self, tpid: u16, vid: u16) -> Self {
        self.vlans.push((tpid, vid));
        self
    }

    pub fn ipv4_options(mut self, options: &[u8]) -> Self {
        self.ipv4_options = options.to_vec();
        self
    }

    pub fn ext(mut self, ext: Ext) -> Self {
        self.ipv6_ext.push(ext);
        self
    }

    pub fn fragment(mut self, offset: u16, more: bool) -> Self {
        self.fragment = Some(Fragment { offset, more });
        self
    }

    pub fn protocol(mut self, protocol: u8) -> Self {
        self.protocol = protocol;
        self
    }

    pub fn seq(mut self, seq: u32) -> Self {
        self.seq = seq;
        self
    }

    pub fn sport(mut self, sport: u16) -> Self {
        self.sport = sport;
        self
    }

    /// Length of Ethernet and VLAN headers.
    pub fn l2_len(&self) -> usize {
        14 + 4 * self.vlans.len()
    }

    /// Offset of the TCP header in the built frame.
    pub fn l4_offset(&self) -> usize {
        self.l2_len()
            + match self.src {
                IpAddr::V4(_) => 20 + self.ipv4_options.len().div_ceil(4) * 4,
                IpAddr::V6(_) => {
                    40 + 8 * self.ipv6_ext.len() + if self.fragment.is_some() { 8 } else { 0 }
                }
            }
    }

    fn l4(&self) -> Vec<u8> {
        let mut tcp = Vec::with_capacity(20 + self.payload.len());
        tcp.extend_from_slice(&self.sport.to_be_bytes());
        tcp.extend_from_slice(&self.dport.to_be_bytes());
        tcp.extend_from_slice(&self.seq.to_be_bytes());
        tcp.extend_from_slice(&(if self.flags & ACK != 0 { 1u32 } else { 0 }).to_be_bytes());
        tcp.push(5 << 4); // data offset
        tcp.push(self.flags);
        tcp.extend_from_slice(&64240u16.to_be_bytes()); // window
        tcp.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
        tcp.extend_from_slice(&self.payload);
        tcp
    }

    pub fn build(&self) -> Vec<u8> {
        let mut f = Vec::with_capacity(128);
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]); // dst MAC
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]); // src MAC
        for (tpid, vid) in &self.vlans {
            f.extend_from_slice(&tpid.to_be_bytes());
            f.extend_from_slice(&vid.to_be_bytes());
        }
        let l4 = self.l4();
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                f.extend_from_slice(&0x0800u16.to_be_bytes());
                let mut opts = self.ipv4_options.clone();
                opts.resize(opts.len().div_ceil(4) * 4, 0);
                let hlen = 20 + opts.len();
                let start = f.len();
                f.push(0x40 | (hlen / 4) as u8);
                f.push(0);
                f.extend_from_slice(&((hlen + l4.len()) as u16).to_be_bytes());
                f.extend_from_slice(&0x1234u16.to_be_bytes());
                let frag = self
                    .fragment
                    .map(|fr| (fr.offset & 0x1fff) | if fr.more { 0x2000 } else { 0 })
                    .unwrap_or(0x4000); // DF
                f.extend_from_slice(&frag.to_be_bytes());
                f.push(64);
                f.push(self.protocol);
                f.extend_from_slice(&[0, 0]);
                f.extend_from_slice(&s.octets());
                f.extend_from_slice(&d.octets());
                f.extend_from_slice(&opts);
                let sum = checksum(&f[start..start + hlen]);
                f[start + 10..start + 12].copy_from_slice(&sum.to_be_bytes());
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                f.extend_from_slice(&0x86ddu16.to_be_bytes());
                let mut chain: Vec<(u8, Vec<u8>)> = self
                    .ipv6_ext
                    .iter()
                    .map(|e| {
                        let kind = match e {
                            Ext::HopByHop => 0,
                            Ext::Routing => 43,
                            Ext::DestOpts => 60,
                        };
                        // Next header and length are patched below; PadN fills the rest.
                        (kind, vec![0, 0, 1, 4, 0, 0, 0, 0])
                    })
                    .collect();
                if let Some(fr) = self.fragment {
                    let off = (fr.offset << 3) | fr.more as u16;
                    let mut h = vec![0, 0];
                    h.extend_from_slice(&off.to_be_bytes());
                    h.extend_from_slice(&0xabcd_0001u32.to_be_bytes());
                    chain.push((44, h));
                }
                let ext_len: usize = chain.iter().map(|(_, h)| h.len()).sum();
                f.extend_from_slice(&[0x60, 0, 0, 0]);
                f.extend_from_slice(&((ext_len + l4.len()) as u16).to_be_bytes());
                f.push(chain.first().map(|(k, _)| *k).unwrap_or(self.protocol));
                f.push(64);
                f.extend_from_slice(&s.octets());
                f.extend_from_slice(&d.octets());
                for i in 0..chain.len() {
                    let next = chain.get(i + 1).map(|(k, _)| *k).unwrap_or(self.protocol);
                    let mut h = chain[i].1.clone();
                    h[0] = next;
                    f.extend_from_slice(&h);
                }
            }
            _ => panic!("source and destination must be the same family"),
        }
        f.extend_from_slice(&l4);
        f
    }
}

/// An ARP request: not IP at all.
pub fn arp_frame() -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01, 0x08, 0x06]);
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01, 192, 0, 2, 1]);
    f.extend_from_slice(&[0, 0, 0, 0, 0, 0, 192, 0, 2, 2]);
    f.resize(60, 0);
    f
}

/// RFC 1071 one's complement sum.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 { u16::from_be_bytes([chunk[0], chunk[1]]) } else { (chunk[0] as u16) << 8 };
        sum += word as u32;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A TCP frame's fields as read back from bytes (VLAN tags, IPv4 without
/// options or IPv6 without extension headers), for checking what a
/// program wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadTcp {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub vlans: Vec<[u8; 4]>,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub ttl: u8,
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    pub payload_len: usize,
    /// The IPv4 header checksum verifies (always true for IPv6).
    pub ip_checksum_ok: bool,
    /// The TCP checksum verifies over the pseudo header.
    pub tcp_checksum_ok: bool,
    /// Bytes after the IP length (padding).
    pub trailer: usize,
}

pub fn read_tcp(f: &[u8]) -> Option<ReadTcp> {
    let mut at = 12;
    let mut vlans = Vec::new();
    while matches!(u16::from_be_bytes([*f.get(at)?, *f.get(at + 1)?]), TPID_8021Q | TPID_8021AD) {
        vlans.push([f[at], f[at + 1], f[at + 2], f[at + 3]]);
        at += 4;
    }
    let ethertype = u16::from_be_bytes([*f.get(at)?, *f.get(at + 1)?]);
    let l3 = at + 2;
    let (src, dst, ttl, l4, ip_end, ip_checksum_ok, pseudo): (IpAddr, IpAddr, u8, usize, usize, bool, Vec<u8>) = match ethertype {
        0x0800 => {
            let h = f.get(l3..l3 + 20)?;
            if h[0] != 0x45 || h[9] != 6 {
                return None;
            }
            let total = u16::from_be_bytes([h[2], h[3]]) as usize;
            let (s, d) = (Ipv4Addr::new(h[12], h[13], h[14], h[15]), Ipv4Addr::new(h[16], h[17], h[18], h[19]));
            let mut pseudo = h[12..20].to_vec();
            pseudo.extend_from_slice(&[0, 6]);
            pseudo.extend_from_slice(&((total - 20) as u16).to_be_bytes());
            (s.into(), d.into(), h[8], l3 + 20, l3 + total, checksum(h) == 0, pseudo)
        }
        0x86dd => {
            let h = f.get(l3..l3 + 40)?;
            if h[6] != 6 {
                return None;
            }
            let plen = u16::from_be_bytes([h[4], h[5]]) as usize;
            let s: [u8; 16] = h[8..24].try_into().ok()?;
            let d: [u8; 16] = h[24..40].try_into().ok()?;
            let mut pseudo = h[8..40].to_vec();
            pseudo.extend_from_slice(&(plen as u32).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, 6]);
            (Ipv6Addr::from(s).into(), Ipv6Addr::from(d).into(), h[7], l3 + 40, l3 + 40 + plen, true, pseudo)
        }
        _ => return None,
    };
    let t = f.get(l4..l4 + 20)?;
    let hlen = (t[12] >> 4) as usize * 4;
    let segment = f.get(l4..ip_end)?;
    let tcp_checksum_ok = checksum(&[pseudo, segment.to_vec()].concat()) == 0;
    Some(ReadTcp {
        dst_mac: f[0..6].try_into().ok()?,
        src_mac: f[6..12].try_into().ok()?,
        vlans,
        src,
        dst,
        ttl,
        sport: u16::from_be_bytes([t[0], t[1]]),
        dport: u16::from_be_bytes([t[2], t[3]]),
        seq: u32::from_be_bytes([t[4], t[5], t[6], t[7]]),
        ack: u32::from_be_bytes([t[8], t[9], t[10], t[11]]),
        flags: t[13],
        window: u16::from_be_bytes([t[14], t[15]]),
        payload_len: ip_end - l4 - hlen,
        ip_checksum_ok,
        tcp_checksum_ok,
        trailer: f.len() - ip_end,
    })
}

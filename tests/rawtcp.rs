//! A TCP client built by hand on an AF_PACKET socket, for segments the
//! kernel's own TCP never sends: a data segment split into IP fragments
//! (IPv4, or IPv6 with a Fragment header), a SYN cut into a tiny first
//! fragment. It does the handshake itself, acknowledges what the server
//! sends and computes every checksum; it never retransmits, so each test
//! packet crosses the datapath exactly once.
//!
//! Its address must not be configured on the client's interface: the
//! client namespace's kernel, which opened no connection, would answer the
//! server's SYN-ACK with a reset. An address that is not its own (and
//! forwarding off, as in a fresh namespace) makes that kernel drop the
//! server's packets without a word while the packet socket reads them. The
//! server finds the address through a permanent neighbour entry pointing
//! at the client interface's MAC ([`neighbour`]).
//!
//! Every segment carries the timestamp option (negotiated in the SYN), so
//! a data segment's TCP header is 32 bytes, longer than the 20 a parser
//! may assume.

use std::{
    net::IpAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::atomic::{AtomicU16, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{netns::Netns, packet::checksum};

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

const ETH_P_ALL: u16 = 0x0003;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const IPV6_FRAGMENT: u8 = 44;

/// Source ports, one per connection: never a port an earlier connection
/// of this process left in the server's tables.
static NEXT_PORT: AtomicU16 = AtomicU16::new(41_000);

/// IP identifications (IPv4 ID, IPv6 fragment id), one per packet of the
/// process, never per connection: the later fragments of a packet whose
/// first fragment was dropped wait in the host's reassembly queue (30 s,
/// `ipfrag_time`), and a new first fragment with the same source,
/// destination and id would be completed by them (checksum error: the
/// host discards the mix, and the new packet's own later fragment starts
/// a queue that never completes).
static NEXT_IP_ID: AtomicU16 = AtomicU16::new(0x5300);

/// The MAC address of `ifname` in `ns`.
/// A packet socket bound to `ifname` in `ns` (reads time out after 20 ms).
pub fn packet_socket(ns: &Netns, ifname: &str) -> Result<OwnedFd> {
    let name = std::ffi::CString::new(ifname)?;
    ns.enter(|| -> Result<OwnedFd> {
        // SAFETY: a valid NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            bail!("no interface {ifname}: {}", std::io::Error::last_os_error());
        }
        // SAFETY: plain socket call; the fd is owned below.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, ETH_P_ALL.to_be() as i32) };
        if raw < 0 {
            bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: a fresh fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: zeroed sockaddr_ll is valid; the fields set are the ones bind reads.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = ETH_P_ALL.to_be();
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: sll lives across the call and its size is given.
        let rc = unsafe { libc::bind(fd.as_raw_fd(), &sll as *const _ as *const libc::sockaddr, std::mem::size_of::<libc::sockaddr_ll>() as u32) };
        if rc != 0 {
            bail!("binding the packet socket to {ifname}: {}", std::io::Error::last_os_error());
        }
        // Short reads, so waits keep to their deadlines.
        let tv = libc::timeval { tv_sec: 0, tv_usec: 20_000 };
        // SAFETY: tv lives across the call and its size is given.
        let rc = unsafe {
            libc::setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv as *const _ as *const libc::c_void, std::mem::size_of::<libc::timeval>() as u32)
        };
        if rc != 0 {
            bail!("SO_RCVTIMEO: {}", std::io::Error::last_os_error());
        }
        Ok(fd)
    })?
}

/// Sends each frame once out of `ifname` in `ns`: the peer's datapath
/// sees exactly these packets, no retransmission.
pub fn send_frames(ns: &Netns, ifname: &str, frames: &[Vec<u8>]) -> Result<()> {
    let fd = packet_socket(ns, ifname)?;
    for f in frames {
        // SAFETY: the buffer lives across the call.
        let n = unsafe { libc::send(fd.as_raw_fd(), f.as_ptr().cast(), f.len(), 0) };
        if n != f.len() as isize {
            bail!("sending a frame out of {ifname}: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

pub fn mac_of(ns: &Netns, ifname: &str) -> Result<[u8; 6]> {
    let out = ns.ip(&["-j", "link", "show", ifname])?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let text = v[0]["address"].as_str().with_context(|| format!("no address for {ifname}"))?;
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = text.split(':').collect();
    if parts.len() != 6 {
        bail!("odd MAC {text}");
    }
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16)?;
    }
    Ok(mac)
}

/// A permanent neighbour entry in `ns`: `addr` is at `mac` on `ifname`
/// (no ARP or neighbour solicitation that nobody would answer).
pub fn neighbour(ns: &Netns, ifname: &str, addr: &str, mac: [u8; 6]) -> Result<()> {
    let mac = mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
    ns.ip(&["neigh", "replace", addr, "lladdr", &mac, "nud", "permanent", "dev", ifname])?;
    Ok(())
}

/// A segment from the server, as read off the wire.
#[derive(Debug)]
struct Seen {
    flags: u8,
    seq: u32,
    ack: u32,
    ts_val: Option<u32>,
    payload: Vec<u8>,
}

pub struct RawTcp {
    fd: OwnedFd,
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    iss: u32,
    snd_nxt: u32,
    rcv_nxt: u32,
    /// The server's latest acknowledgement: where its receive window
    /// starts, the only sequence number a reset is accepted at.
    peer_acked: u32,
    ts_val: u32,
    ts_ecr: u32,
    /// A SYN-ACK came: the server holds state to reset on drop.
    synchronised: bool,
    received: Vec<u8>,
}

/// `a` is later than `b` in sequence space.
fn after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

impl RawTcp {
    /// A packet socket on `ifname` in `ns` for a connection from `src`
    /// (not configured there) to `dst:dport` behind the MAC `dst_mac`.
    pub fn new(ns: &Netns, ifname: &str, dst_mac: [u8; 6], src: IpAddr, dst: IpAddr, dport: u16) -> Result<Self> {
        if src.is_ipv4() != dst.is_ipv4() {
            bail!("{src} and {dst} are of different families");
        }
        let src_mac = mac_of(ns, ifname)?;
        let fd = packet_socket(ns, ifname)?;
        let iss = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.subsec_nanos().wrapping_mul(2_654_435_761);
        Ok(Self {
            fd,
            src_mac,
            dst_mac,
            src,
            dst,
            sport: NEXT_PORT.fetch_add(1, Ordering::Relaxed),
            dport,
            iss,
            snd_nxt: iss,
            rcv_nxt: 0,
            peer_acked: iss,
            ts_val: 1_000,
            ts_ecr: 0,
            synchronised: false,
            received: Vec::new(),
        })
    }

    /// The three-way handshake: `Ok(false)` when no SYN-ACK came within
    /// `within`.
    pub fn connect(&mut self, within: Duration) -> Result<bool> {
        self.connect_split(None, within)
    }

    /// [`RawTcp::connect`] with the SYN sent as two IP fragments, the first
    /// carrying `first` bytes of the TCP header (a multiple of 8).
    pub fn connect_split(&mut self, first: Option<usize>, within: Duration) -> Result<bool> {
        let mut options = vec![2, 4, 0x05, 0xb4]; // MSS 1460
        options.extend_from_slice(&self.timestamps());
        let syn = self.segment(self.iss, 0, SYN, &options, &[]);
        self.send_l4(&syn, first)?;
        self.snd_nxt = self.iss.wrapping_add(1);
        let Some(seen) = self.wait(within, |s| s.flags & (SYN | ACK) == SYN | ACK)? else { return Ok(false) };
        if seen.ack != self.snd_nxt {
            bail!("SYN-ACK acknowledges {}, not {}", seen.ack, self.snd_nxt);
        }
        self.synchronised = true;
        self.rcv_nxt = seen.seq.wrapping_add(1);
        self.peer_acked = seen.ack;
        self.send_flags(ACK)?;
        Ok(true)
    }

    /// One data segment of `payload`.
    pub fn send(&mut self, payload: &[u8]) -> Result<()> {
        self.send_data(payload, false)
    }

    /// One data segment of `payload` in two IP fragments: the first ends
    /// exactly at the end of the TCP header (no payload), the second
    /// carries the payload.
    pub fn send_fragmented(&mut self, payload: &[u8]) -> Result<()> {
        self.send_data(payload, true)
    }

    fn send_data(&mut self, payload: &[u8], split: bool) -> Result<()> {
        let options = self.timestamps();
        let seg = self.segment(self.snd_nxt, self.rcv_nxt, PSH | ACK, &options, payload);
        let header = seg.len() - payload.len();
        self.send_l4(&seg, split.then_some(header))?;
        self.snd_nxt = self.snd_nxt.wrapping_add(payload.len() as u32);
        Ok(())
    }

    /// The next complete SMTP reply (every line of it), acknowledging what
    /// arrives, or `None` when none completed within `within`.
    pub fn reply(&mut self, within: Duration) -> Result<Option<String>> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(reply) = take_reply(&mut self.received) {
                return Ok(Some(reply));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            if self.wait(left, |_| true)?.is_none() {
                return Ok(None);
            }
        }
    }

    /// Waits for a segment from the server that `want` accepts; every
    /// segment read on the way is taken in (acknowledged, its in-order
    /// payload kept).
    fn wait(&mut self, within: Duration, want: impl Fn(&Seen) -> bool) -> Result<Option<Seen>> {
        let deadline = Instant::now() + within;
        let mut buf = [0u8; 2048];
        while Instant::now() < deadline {
            // SAFETY: buf outlives the call and its length is given.
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted) {
                    continue;
                }
                bail!("reading the packet socket: {e}");
            }
            let Some(seen) = self.parse(&buf[..n as usize]) else { continue };
            if seen.flags & RST != 0 {
                bail!("the server reset the connection (port {})", self.sport);
            }
            self.take_in(&seen)?;
            if want(&seen) {
                return Ok(Some(seen));
            }
        }
        Ok(None)
    }

    fn take_in(&mut self, seen: &Seen) -> Result<()> {
        if let Some(ts) = seen.ts_val {
            self.ts_ecr = ts;
        }
        if seen.flags & ACK != 0 && after(seen.ack, self.peer_acked) {
            self.peer_acked = seen.ack;
        }
        if !self.synchronised {
            return Ok(());
        }
        let mut news = !seen.payload.is_empty();
        if seen.seq == self.rcv_nxt {
            self.received.extend_from_slice(&seen.payload);
            self.rcv_nxt = self.rcv_nxt.wrapping_add(seen.payload.len() as u32);
            if seen.flags & FIN != 0 {
                self.rcv_nxt = self.rcv_nxt.wrapping_add(1);
                news = true;
            }
        }
        // Old, out of order or new: say where this side stands.
        if news {
            self.send_flags(ACK)?;
        }
        Ok(())
    }

    /// A segment of this connection from the server, if `frame` is one.
    fn parse(&self, frame: &[u8]) -> Option<Seen> {
        let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
        let ip = frame.get(14..)?;
        let (src, dst, tcp): (IpAddr, IpAddr, &[u8]) = match ethertype {
            ETH_P_IP => {
                let ihl = ((*ip.first()? & 0x0f) as usize) * 4;
                let total = u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]) as usize;
                let frag = u16::from_be_bytes([*ip.get(6)?, *ip.get(7)?]);
                if ip[9] != IPPROTO_TCP || frag & 0x3fff != 0 {
                    return None;
                }
                let src = <[u8; 4]>::try_from(ip.get(12..16)?).ok()?;
                let dst = <[u8; 4]>::try_from(ip.get(16..20)?).ok()?;
                (src.into(), dst.into(), ip.get(ihl..total)?)
            }
            ETH_P_IPV6 => {
                if *ip.get(6)? != IPPROTO_TCP {
                    return None;
                }
                let len = u16::from_be_bytes([*ip.get(4)?, *ip.get(5)?]) as usize;
                let src = <[u8; 16]>::try_from(ip.get(8..24)?).ok()?;
                let dst = <[u8; 16]>::try_from(ip.get(24..40)?).ok()?;
                (src.into(), dst.into(), ip.get(40..40 + len)?)
            }
            _ => return None,
        };
        let sport = u16::from_be_bytes([*tcp.first()?, *tcp.get(1)?]);
        let dport = u16::from_be_bytes([*tcp.get(2)?, *tcp.get(3)?]);
        if src != self.dst || dst != self.src || sport != self.dport || dport != self.sport {
            return None;
        }
        let word = |at: usize| -> Option<u32> { Some(u32::from_be_bytes(tcp.get(at..at + 4)?.try_into().ok()?)) };
        let header = ((*tcp.get(12)? >> 4) as usize) * 4;
        let mut ts_val = None;
        let mut at = 20;
        while at < header {
            match *tcp.get(at)? {
                0 => break,
                1 => at += 1,
                kind => {
                    let len = *tcp.get(at + 1)? as usize;
                    if len < 2 {
                        break;
                    }
                    if kind == 8 && len == 10 {
                        ts_val = word(at + 2);
                    }
                    at += len;
                }
            }
        }
        Some(Seen { flags: *tcp.get(13)?, seq: word(4)?, ack: word(8)?, ts_val, payload: tcp.get(header..)?.to_vec() })
    }

    /// NOP, NOP, timestamps (this side's clock, the server's last value).
    fn timestamps(&mut self) -> [u8; 12] {
        self.ts_val += 1;
        let mut o = [1, 1, 8, 10, 0, 0, 0, 0, 0, 0, 0, 0];
        o[4..8].copy_from_slice(&self.ts_val.to_be_bytes());
        o[8..12].copy_from_slice(&self.ts_ecr.to_be_bytes());
        o
    }

    fn send_flags(&mut self, flags: u8) -> Result<()> {
        let options = self.timestamps();
        let seq = if flags & RST != 0 { self.peer_acked } else { self.snd_nxt };
        let seg = self.segment(seq, self.rcv_nxt, flags, &options, &[]);
        self.send_l4(&seg, None)
    }

    /// A TCP segment with its checksum.
    fn segment(&self, seq: u32, ack: u32, flags: u8, options: &[u8], payload: &[u8]) -> Vec<u8> {
        assert!(options.len().is_multiple_of(4) && options.len() <= 40, "options come in words");
        let mut t = Vec::with_capacity(20 + options.len() + payload.len());
        t.extend_from_slice(&self.sport.to_be_bytes());
        t.extend_from_slice(&self.dport.to_be_bytes());
        t.extend_from_slice(&seq.to_be_bytes());
        t.extend_from_slice(&(if flags & ACK != 0 { ack } else { 0 }).to_be_bytes());
        t.push((((20 + options.len()) / 4) as u8) << 4);
        t.push(flags);
        t.extend_from_slice(&65_535u16.to_be_bytes());
        t.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
        t.extend_from_slice(options);
        t.extend_from_slice(payload);
        let mut pseudo = Vec::with_capacity(40 + t.len());
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                pseudo.extend_from_slice(&s.octets());
                pseudo.extend_from_slice(&d.octets());
                pseudo.extend_from_slice(&[0, IPPROTO_TCP]);
                pseudo.extend_from_slice(&(t.len() as u16).to_be_bytes());
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                pseudo.extend_from_slice(&s.octets());
                pseudo.extend_from_slice(&d.octets());
                pseudo.extend_from_slice(&(t.len() as u32).to_be_bytes());
                pseudo.extend_from_slice(&[0, 0, 0, IPPROTO_TCP]);
            }
            _ => unreachable!("checked in new"),
        }
        pseudo.extend_from_slice(&t);
        let sum = checksum(&pseudo);
        t[16..18].copy_from_slice(&sum.to_be_bytes());
        t
    }

    /// Sends a TCP segment in one IP packet, or in two fragments with
    /// `split` bytes of it in the first (a multiple of 8, as fragment
    /// offsets count in 8-byte units).
    fn send_l4(&self, l4: &[u8], split: Option<usize>) -> Result<()> {
        let ip_id = NEXT_IP_ID.fetch_add(1, Ordering::Relaxed);
        let pieces: Vec<(usize, &[u8], bool)> = match split {
            None => vec![(0, l4, false)],
            Some(at) => {
                assert!(at.is_multiple_of(8) && at > 0 && at < l4.len(), "a first fragment of {at} of {} bytes", l4.len());
                vec![(0, &l4[..at], true), (at, &l4[at..], false)]
            }
        };
        for (offset, piece, more) in pieces {
            let mut f = Vec::with_capacity(14 + 48 + piece.len());
            f.extend_from_slice(&self.dst_mac);
            f.extend_from_slice(&self.src_mac);
            match (self.src, self.dst) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    f.extend_from_slice(&ETH_P_IP.to_be_bytes());
                    let frag = if split.is_none() { 0x4000 } else { (offset / 8) as u16 | if more { 0x2000 } else { 0 } };
                    let mut ip = Vec::with_capacity(20);
                    ip.extend_from_slice(&[0x45, 0]);
                    ip.extend_from_slice(&((20 + piece.len()) as u16).to_be_bytes());
                    ip.extend_from_slice(&ip_id.to_be_bytes());
                    ip.extend_from_slice(&frag.to_be_bytes());
                    ip.extend_from_slice(&[64, IPPROTO_TCP, 0, 0]);
                    ip.extend_from_slice(&s.octets());
                    ip.extend_from_slice(&d.octets());
                    let sum = checksum(&ip);
                    ip[10..12].copy_from_slice(&sum.to_be_bytes());
                    f.extend_from_slice(&ip);
                }
                (IpAddr::V6(s), IpAddr::V6(d)) => {
                    f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
                    let fragment_header = split.is_some();
                    let len = piece.len() + if fragment_header { 8 } else { 0 };
                    f.extend_from_slice(&[0x60, 0, 0, 0]);
                    f.extend_from_slice(&(len as u16).to_be_bytes());
                    f.push(if fragment_header { IPV6_FRAGMENT } else { IPPROTO_TCP });
                    f.push(64);
                    f.extend_from_slice(&s.octets());
                    f.extend_from_slice(&d.octets());
                    if fragment_header {
                        f.extend_from_slice(&[IPPROTO_TCP, 0]);
                        f.extend_from_slice(&(((offset / 8) as u16) << 3 | more as u16).to_be_bytes());
                        f.extend_from_slice(&(0x5347_0000 | ip_id as u32).to_be_bytes());
                    }
                }
                _ => unreachable!("checked in new"),
            }
            f.extend_from_slice(piece);
            // SAFETY: f outlives the call and its length is given.
            let n = unsafe { libc::send(self.fd.as_raw_fd(), f.as_ptr() as *const libc::c_void, f.len(), 0) };
            if n != f.len() as isize {
                bail!("sending a {}-byte frame: {}", f.len(), std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

impl Drop for RawTcp {
    /// A reset at the server's window start, so no connection or
    /// retransmission outlives the test.
    fn drop(&mut self) {
        if self.synchronised {
            let _ = self.send_flags(RST | ACK);
        }
    }
}

/// Removes and returns the first complete SMTP reply in `buf`: lines up to
/// one whose code is followed by a space (or nothing), CRLF-terminated.
fn take_reply(buf: &mut Vec<u8>) -> Option<String> {
    let mut at = 0;
    while let Some(i) = buf[at..].windows(2).position(|w| w == b"\r\n") {
        let line = &buf[at..at + i];
        at += i + 2;
        if line.len() >= 3 && line.get(3) != Some(&b'-') {
            let reply = String::from_utf8_lossy(&buf[..at]).into_owned();
            buf.drain(..at);
            return Some(reply);
        }
    }
    None
}

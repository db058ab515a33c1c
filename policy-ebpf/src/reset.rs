//! TCP resets for open connections the policy now denies.
//!
//! Every segment to a guarded port is judged, not only SYNs, so a policy
//! edit or a ban takes effect on connections already open. Dropping their
//! segments silently would leave the client retransmitting until it times
//! out; instead, where the policy asks for it, the dropped segment itself
//! is turned into the RST its sender's stack accepts (RFC 793: sequence
//! number = the segment's acknowledgment, exactly what the sender expects
//! next) and sent back: `XDP_TX` out of the uplink, or from TC back out of
//! the tenant interface (`tc_ingress`) or into the host (`tc_egress`).
//!
//! One reset per dropped segment, never longer than it, and only for
//! segments that carry ACK (no SYN, no RST): a spoofed source gains no
//! amplification, and a reset is never answered with one. Frames with
//! IPv4 options or IPv6 extension headers are dropped without a reset.
//!
//! The decision pipeline only notes where the headers are ([`prepare`]);
//! the rewrite runs once, after the verdict, in a function of its own, on
//! a copy of the headers in a per-CPU buffer: helpers copy them in and
//! out, so TC programs make no direct packet writes (which would make the
//! kernel unclone every cloned skb these hooks see, reset or not).

use aya_ebpf::{
    bindings::{xdp_action, BPF_F_INGRESS, TC_ACT_SHOT},
    helpers::generated::{bpf_redirect, bpf_skb_change_tail, bpf_skb_load_bytes, bpf_skb_store_bytes, bpf_xdp_adjust_tail, bpf_xdp_get_buff_len, bpf_xdp_load_bytes, bpf_xdp_store_bytes},
    macros::map,
    maps::PerCpuArray,
    programs::{TcContext, XdpContext},
    EbpfContext,
};

use crate::{opaque::opaque, parse::Flow, stats};

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// The segment to answer and a copy of its headers, as 4-byte words in
/// memory order (network-order bytes, loaded little-endian): every field
/// sits at a constant offset, so the rewrite is a few register operations.
#[repr(C, align(8))]
pub struct ResetJob {
    l3: u32,
    l4: u32,
    payload_len: u32,
    v6: u32,
    direction: u32,
    /// Destination and source MAC addresses (12 bytes).
    macs: [u32; 3],
    /// The IP header: IPv4 in the first 5 words, IPv6 in all 10.
    ip: [u32; 10],
    /// The TCP header without options.
    tcp: [u32; 5],
}

/// Key 0: the segment to answer. Writer and reader: this module.
#[map]
static RESET_BUF: PerCpuArray<ResetJob> = PerCpuArray::with_max_entries(1, 0);

/// Notes where a dropped segment's headers are, for [`xdp`] or [`tc`] to
/// answer it after the verdict.
#[inline(always)]
pub fn prepare(flow: &Flow, direction: u8) {
    if let Some(j) = RESET_BUF.get_ptr_mut(0) {
        // SAFETY: per-CPU value, no concurrent user.
        unsafe {
            (*j).l3 = flow.seg.l3 as u32;
            (*j).l4 = flow.seg.l4 as u32;
            (*j).payload_len = flow.payload_len;
            (*j).v6 = flow.seg.v6 as u32;
            (*j).direction = direction as u32;
        }
    }
}

/// Answers the segment [`prepare`] noted with a reset sent back out of
/// the interface it came in on; a plain drop where none can be made.
#[inline(never)]
pub fn xdp(ctx: &XdpContext) -> u32 {
    let Some(j) = RESET_BUF.get_ptr_mut(0) else { return xdp_action::XDP_DROP };
    // SAFETY: per-CPU value, no concurrent user.
    let j = unsafe { &mut *j };
    let Some((l3, ip_len, l4)) = offsets(j) else { return xdp_action::XDP_DROP };
    let x = ctx.as_ptr() as *mut _;
    // SAFETY: the helpers bounds-check the frame and write at most the
    // named fields' sizes; the context pointer is valid for the run. (The
    // length comes from a helper too: packet pointers read here would be
    // spilled in halves, which the verifier refuses.)
    unsafe {
        let frame_len = bpf_xdp_get_buff_len(x) as u32;
        if bpf_xdp_load_bytes(x, 0, j.macs.as_mut_ptr().cast(), 12) != 0
            || bpf_xdp_load_bytes(x, l3, j.ip.as_mut_ptr().cast(), ip_len) != 0
            || bpf_xdp_load_bytes(x, l4, j.tcp.as_mut_ptr().cast(), 20) != 0
            || !rewrite(j)
        {
            return xdp_action::XDP_DROP;
        }
        if bpf_xdp_store_bytes(x, 0, j.macs.as_mut_ptr().cast(), 12) != 0
            || bpf_xdp_store_bytes(x, l3, j.ip.as_mut_ptr().cast(), ip_len) != 0
            || bpf_xdp_store_bytes(x, l4, j.tcp.as_mut_ptr().cast(), 20) != 0
        {
            return xdp_action::XDP_DROP;
        }
        let len = l4 + 20;
        if frame_len > len && bpf_xdp_adjust_tail(x, len as i32 - frame_len as i32) != 0 {
            return xdp_action::XDP_DROP;
        }
    }
    stats::record_reset(j.direction as u8);
    xdp_action::XDP_TX
}

/// As [`xdp`], for a TC hook: the reset leaves through the interface the
/// segment was on, toward its sender: back out of it (`into_host` false:
/// a tenant interface's ingress) or into the host (`into_host`: the
/// uplink's egress, where the sender is the host itself).
#[inline(never)]
pub fn tc(ctx: &TcContext, into_host: bool) -> i32 {
    let Some(j) = RESET_BUF.get_ptr_mut(0) else { return TC_ACT_SHOT };
    // SAFETY: per-CPU value, no concurrent user.
    let j = unsafe { &mut *j };
    let Some((l3, ip_len, l4)) = offsets(j) else { return TC_ACT_SHOT };
    let skb = ctx.skb.skb;
    // SAFETY: as in `xdp`.
    unsafe {
        if bpf_skb_load_bytes(skb as *const _, 0, j.macs.as_mut_ptr().cast(), 12) != 0
            || bpf_skb_load_bytes(skb as *const _, l3, j.ip.as_mut_ptr().cast(), ip_len) != 0
            || bpf_skb_load_bytes(skb as *const _, l4, j.tcp.as_mut_ptr().cast(), 20) != 0
            || !rewrite(j)
        {
            return TC_ACT_SHOT;
        }
        if bpf_skb_store_bytes(skb, 0, j.macs.as_mut_ptr().cast(), 12, 0) != 0
            || bpf_skb_store_bytes(skb, l3, j.ip.as_mut_ptr().cast(), ip_len, 0) != 0
            || bpf_skb_store_bytes(skb, l4, j.tcp.as_mut_ptr().cast(), 20, 0) != 0
            || bpf_skb_change_tail(skb, l4 + 20, 0) != 0
        {
            return TC_ACT_SHOT;
        }
        stats::record_reset(j.direction as u8);
        let ifindex = (*skb).ifindex;
        bpf_redirect(ifindex, if into_host { BPF_F_INGRESS as u64 } else { 0 }) as i32
    }
}

/// The IP header's offset and length and the TCP header's offset, when
/// the headers are ones a reset is made of (no IPv4 options, no IPv6
/// extension headers).
#[inline(always)]
fn offsets(j: &ResetJob) -> Option<(u32, u32, u32)> {
    // Opaque: the verifier would otherwise carry each caller path's exact
    // offsets into this function.
    let (l3, l4) = (opaque(j.l3 as u64) as u32, opaque(j.l4 as u64) as u32);
    let ip_len = if j.v6 != 0 { 40 } else { 20 };
    if !(14..=512).contains(&l3) || l4 != l3 + ip_len {
        return None;
    }
    Some((l3, ip_len, l4))
}

/// Sum of a word's two 16-bit halves, for a one's complement sum over
/// memory-order words: it comes out byte-swapped, and is stored the same
/// way, which gives the right bytes (RFC 1071, 2(B)).
#[inline(always)]
fn halves(w: u32) -> u32 {
    (w & 0xffff) + (w >> 16)
}

#[inline(always)]
fn fold(mut sum: u32) -> u32 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !sum & 0xffff
}

/// Turns the copied headers into the sender's reset: addresses and ports
/// swapped, sequence number = the segment's acknowledgment, acknowledging
/// all it carried, no options, no payload. `false`: the segment is no
/// candidate (no ACK, or a SYN or RST).
#[inline(always)]
fn rewrite(j: &mut ResetJob) -> bool {
    let t = &mut j.tcp;
    let flags = (t[3] >> 8) as u8;
    if flags & TCP_ACK == 0 || flags & (TCP_SYN | TCP_RST) != 0 {
        return false;
    }
    let acked = u32::from_be(t[1]).wrapping_add(j.payload_len).wrapping_add((flags & TCP_FIN != 0) as u32);
    let m = &mut j.macs;
    *m = [(m[1] >> 16) | (m[2] << 16), (m[2] >> 16) | (m[0] << 16), (m[0] >> 16) | (m[1] << 16)];
    // Pseudo header: protocol 6 and TCP length 20, as memory-order halves.
    let mut sum = 0x0600 + 0x1400;
    let ip = &mut j.ip;
    if j.v6 != 0 {
        for k in 2..6 {
            ip.swap(k, k + 4);
            sum += halves(ip[k]) + halves(ip[k + 4]);
        }
        // Payload length 20, next header TCP, hop limit 64.
        ip[1] = 0x4006_1400;
    } else {
        ip.swap(3, 4);
        // Total length 40; no id, don't fragment; TTL 64, TCP.
        ip[0] = (ip[0] & 0xffff) | (0x2800 << 16);
        ip[1] = 0x0040_0000;
        ip[2] = 0x0000_0640;
        let check = fold(halves(ip[0]) + halves(ip[1]) + halves(ip[2]) + halves(ip[3]) + halves(ip[4]));
        ip[2] |= check << 16;
        sum += halves(ip[3]) + halves(ip[4]);
    }
    t[0] = t[0].rotate_left(16);
    t[1] = t[2];
    t[2] = acked.to_be();
    // Header length 20, RST and ACK, window 0.
    t[3] = 0x0000_1450;
    t[4] = 0;
    t[4] = fold(sum + halves(t[0]) + halves(t[1]) + halves(t[2]) + halves(t[3]));
    true
}

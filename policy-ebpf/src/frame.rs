//! Uniform access to XDP frames and socket buffers.
//!
//! Headers are read with direct packet access, which the verifier only
//! allows after a bounds check against `data_end`. A TC skb may keep part of
//! its headers outside the linear area (AF_PACKET senders, GRO): then the
//! parser reports `SHORT` although the frame is longer, and the TC hook
//! pulls the headers in and parses again. The command scan copies payload
//! into its own buffer with `bpf_skb_load_bytes`, which needs no pull, so
//! locally generated TCP (payload in page fragments) is never linearised.

use core::mem::size_of;

use aya_ebpf::{
    helpers::generated::{bpf_skb_load_bytes, bpf_xdp_load_bytes},
    programs::{TcContext, XdpContext},
    EbpfContext,
};

pub trait Frame {
    fn start(&self) -> usize;
    fn end(&self) -> usize;
    /// Length of the whole frame, linear or not.
    fn wire_len(&self) -> u32;
    /// Makes up to `len` bytes directly readable; false when nothing changed.
    fn pull(&self, len: u32) -> bool;
    /// Copies `len` bytes at `offset`, wherever they are, to `dst`; false
    /// when the frame is shorter.
    ///
    /// # Safety
    /// `dst` is valid for writes of `len` bytes.
    unsafe fn copy_to(&self, offset: usize, dst: *mut u8, len: u32) -> bool;
    /// Ifindex the packet arrived on before being forwarded; 0 when it
    /// was generated on this host (or not known, as in XDP).
    fn arrived_on(&self) -> u32;
    /// Ifindex of the interface the hook runs on.
    fn ifindex(&self) -> u32;
}

/// Pointer to a `T` at `offset` into the frame, after the bounds check the
/// verifier wants. `T` is a header layout: it gives the size checked here
/// and the field offsets for [`load`]; nothing reads a `T` itself.
///
/// # Safety
/// The pointer is valid for reads of `size_of::<T>()` bytes until the frame
/// changes (a pull). It is NOT aligned for `T`: packet data has no
/// alignment guarantee (an IPv4 address after one VLAN tag is 2-byte
/// aligned, and a frame's start promises nothing). Read through it only
/// with [`load`] (the parser's `field!`), never with `*p`, `read` or a
/// reference, which would assume `T`'s alignment.
#[inline(always)]
pub unsafe fn ptr_at<F: Frame, T>(frame: &F, offset: usize) -> Option<*const T> {
    let start = frame.start();
    if start + offset + size_of::<T>() > frame.end() {
        return None;
    }
    Some((start + offset) as *const T)
}

/// Packet loads of one width at a constant offset, as one BPF load
/// instruction each, whatever the address's alignment.
///
/// Rust's `read_unaligned` would be sound but LLVM splits it into byte
/// loads on BPF (two to four instructions more per field, and single-byte
/// loads the verifier handles worse); a plain `*p` of a `u16` or `u32`
/// field assumes an alignment packets do not have (undefined behaviour,
/// whatever the JIT does). Inline assembly is neither: the kernel accepts
/// unaligned packet loads on the architectures with efficient unaligned
/// access (the verifier checks alignment only in strict mode), as C XDP
/// programs rely on. LLVM sees an opaque read and cannot merge or move it
/// before the bounds check.
pub mod load {
    use core::arch::asm;

    /// The byte at `p + OFF`.
    ///
    /// # Safety
    /// `p + OFF` is within a range [`super::ptr_at`] checked.
    #[inline(always)]
    pub unsafe fn u8<const OFF: usize>(p: *const u8) -> u8 {
        // SAFETY: in bounds (the caller's promise); a byte is always aligned.
        unsafe { p.add(OFF).read() }
    }

    /// The two bytes at `p + OFF`, in memory order.
    ///
    /// # Safety
    /// `p + OFF .. p + OFF + 2` is within a range [`super::ptr_at`] checked.
    #[inline(always)]
    pub unsafe fn u16<const OFF: usize>(p: *const u8) -> u16 {
        let v: u64;
        // SAFETY: in bounds (the caller's promise); the load zero-extends.
        unsafe {
            asm!("{v} = *(u16 *)({p} + {off})", p = in(reg) p, v = lateout(reg) v, off = const OFF, options(pure, readonly, nostack, preserves_flags));
            core::hint::assert_unchecked(v <= u16::MAX as u64);
        }
        v as u16
    }

    /// The four bytes at `p + OFF`, in memory order.
    ///
    /// # Safety
    /// `p + OFF .. p + OFF + 4` is within a range [`super::ptr_at`] checked.
    #[inline(always)]
    pub unsafe fn u32<const OFF: usize>(p: *const u8) -> u32 {
        let v: u64;
        // SAFETY: as in `u16`.
        unsafe {
            asm!("{v} = *(u32 *)({p} + {off})", p = in(reg) p, v = lateout(reg) v, off = const OFF, options(pure, readonly, nostack, preserves_flags));
            core::hint::assert_unchecked(v <= u32::MAX as u64);
        }
        v as u32
    }
}

pub struct XdpFrame<'a>(pub &'a XdpContext);

// The context fields are u32, so LLVM may keep a packet pointer in a 32-bit
// subregister and spill it with a 4-byte store, which the verifier rejects.
// Volatile loads make every use re-read the field instead of keeping it.
impl Frame for XdpFrame<'_> {
    #[inline(always)]
    fn start(&self) -> usize {
        // SAFETY: the context pointer is valid for the program's run.
        unsafe { core::ptr::read_volatile(&(*self.0.ctx).data) as usize }
    }

    #[inline(always)]
    fn end(&self) -> usize {
        // SAFETY: as above.
        unsafe { core::ptr::read_volatile(&(*self.0.ctx).data_end) as usize }
    }

    /// Frames are linear: this program is not loaded for multi-buffer XDP.
    #[inline(always)]
    fn wire_len(&self) -> u32 {
        (self.end() - self.start()) as u32
    }

    #[inline(always)]
    fn pull(&self, _len: u32) -> bool {
        false
    }

    /// A helper rather than direct access: the offset then stays an
    /// imprecise scalar for the verifier, which keeps its state count down.
    #[inline(always)]
    unsafe fn copy_to(&self, offset: usize, dst: *mut u8, len: u32) -> bool {
        // SAFETY: the helper bounds-checks the frame; the caller vouches for `dst`.
        unsafe { bpf_xdp_load_bytes(self.0.as_ptr() as *mut _, offset as u32, dst.cast(), len) == 0 }
    }

    #[inline(always)]
    fn arrived_on(&self) -> u32 {
        0
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: the context pointer is valid for the program's run.
        unsafe { core::ptr::read_volatile(&(*self.0.ctx).ingress_ifindex) }
    }
}

pub struct SkbFrame<'a>(pub &'a TcContext);

impl Frame for SkbFrame<'_> {
    #[inline(always)]
    fn start(&self) -> usize {
        self.0.data()
    }

    #[inline(always)]
    fn end(&self) -> usize {
        self.0.data_end()
    }

    #[inline(always)]
    fn wire_len(&self) -> u32 {
        self.0.len()
    }

    #[inline(always)]
    fn pull(&self, len: u32) -> bool {
        let linear = (self.0.data_end() - self.0.data()) as u32;
        let want = if len < self.0.len() { len } else { self.0.len() };
        want > linear && self.0.pull_data(want).is_ok()
    }

    #[inline(always)]
    unsafe fn copy_to(&self, offset: usize, dst: *mut u8, len: u32) -> bool {
        // SAFETY: as for XDP.
        unsafe { bpf_skb_load_bytes(self.0.as_ptr(), offset as u32, dst.cast(), len) == 0 }
    }

    #[inline(always)]
    fn arrived_on(&self) -> u32 {
        // SAFETY: the context pointer is valid for the program's run.
        unsafe { (*self.0.skb.skb).ingress_ifindex }
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: the context pointer is valid for the program's run.
        unsafe { (*self.0.skb.skb).ifindex }
    }
}

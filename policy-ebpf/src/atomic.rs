//! Shared map words. A load or store is one 8-byte BPF load or store,
//! which does not tear: atomic, with relaxed ordering. They are written as
//! inline assembly because LLVM's BPF backend selects no atomic load or
//! store before `-mcpu=v4` (and `read_volatile` racing another thread's
//! store is undefined behaviour in Rust; an assembly block is an opaque
//! operation, like a call, that may access memory atomically). The BPF
//! target lacks `AtomicU64::compare_exchange` (rustc does not claim CAS
//! for it), but the instruction exists from `-mcpu=v3`, so the intrinsic
//! lowers to `BPF_CMPXCHG`.
//!
//! A `Word` is made from a raw pointer into a map value (`get_ptr_mut`,
//! then `addr_of_mut!` to the field), never from a reference: other CPUs
//! and userspace (through the mapping) write these words while a program
//! runs, which a `&u64` would promise cannot happen.

use core::{
    arch::asm,
    intrinsics::{atomic_cxchg, AtomicOrdering},
};

/// The u64 at byte `OFF` of a map value that several CPUs, or userspace,
/// update. The offset is a constant of the instruction, so a value's
/// words share one base register (a pointer per word cost the verifier a
/// third more states on the SYN path).
#[derive(Clone, Copy)]
pub struct Word<const OFF: usize>(*mut u8);

impl<const OFF: usize> Word<OFF> {
    /// # Safety
    /// `base + OFF` is an 8-byte aligned `u64` of a live map value (map
    /// values outlive the program run), and every concurrent access to it
    /// is atomic: the datapath's through `Word`, userspace's through
    /// `AtomicU64` on the mapping.
    #[inline(always)]
    pub unsafe fn new(base: *mut u8) -> Self {
        Self(base)
    }

    /// One 8-byte load. Not `pure`: every call loads again, as the word
    /// may change between two of them.
    #[inline(always)]
    pub fn load(self) -> u64 {
        let v: u64;
        // SAFETY: `new`'s contract: aligned and live.
        unsafe {
            asm!("{v} = *(u64 *)({p} + {off})", p = in(reg) self.0, v = lateout(reg) v, off = const OFF, options(readonly, nostack, preserves_flags))
        };
        v
    }

    /// One 8-byte store.
    #[inline(always)]
    pub fn store(self, value: u64) {
        // SAFETY: as in `load`.
        unsafe { asm!("*(u64 *)({p} + {off}) = {v}", p = in(reg) self.0, v = in(reg) value, off = const OFF, options(nostack, preserves_flags)) };
    }

    /// Stores `new` if the word still holds `old`.
    #[inline(always)]
    pub fn cas(self, old: u64, new: u64) -> bool {
        // SAFETY: as in `load`; every access to the word is atomic.
        unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(self.0.add(OFF).cast(), old, new).1
        }
    }
}

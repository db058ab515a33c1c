//! Shared map words. The BPF target lacks `AtomicU64::compare_exchange`
//! (rustc does not claim CAS for it), but the instruction exists from
//! `-mcpu=v3`, so the intrinsic lowers to `BPF_CMPXCHG`.

use core::intrinsics::{atomic_cxchg, AtomicOrdering};

/// A u64 in a map value that several CPUs update.
#[derive(Clone, Copy)]
pub struct Word(*mut u64);

impl Word {
    #[inline(always)]
    pub fn of(field: &u64) -> Self {
        Self(field as *const u64 as *mut u64)
    }

    #[inline(always)]
    pub fn load(self) -> u64 {
        // SAFETY: the pointer comes from a live map value, 8-byte aligned.
        unsafe { core::ptr::read_volatile(self.0) }
    }

    #[inline(always)]
    pub fn store(self, value: u64) {
        // SAFETY: as in `load`; single aligned stores do not tear.
        unsafe { core::ptr::write_volatile(self.0, value) }
    }

    /// Stores `new` if the word still holds `old`.
    #[inline(always)]
    pub fn cas(self, old: u64, new: u64) -> bool {
        // SAFETY: as in `load`.
        unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(self.0, old, new).1
        }
    }
}

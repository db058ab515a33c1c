//! Hiding exact values from the verifier.
//!
//! The verifier walks a program once per distinct state, and a scalar it
//! knows exactly (a header offset per header layout, a way index per way)
//! multiplies the states of everything after it. Passing such a value
//! through a map word turns it into an unknown scalar, so the code after
//! it is verified once; bounds checks on its uses keep it safe.

use aya_ebpf::{macros::map, maps::PerCpuArray};

/// Key 0: this CPU's scratch word. Writer and reader: the datapath.
#[map]
static SCRATCH: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
pub fn opaque(value: u64) -> u64 {
    match SCRATCH.get_ptr_mut(0) {
        // SAFETY: per-CPU value of the right type, no concurrent user.
        Some(p) => unsafe {
            core::ptr::write_volatile(p, value);
            core::ptr::read_volatile(p)
        },
        None => 0,
    }
}

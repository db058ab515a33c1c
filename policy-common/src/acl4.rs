//! The IPv4 ACL as a compressed multibit trie in arrays.
//!
//! The kernel's LPM trie walks a binary tree one bit at a time; at a
//! million prefixes its lookup costs more than the rest of the pipeline.
//! Here a lookup is at most five array reads, whatever the rule count:
//!
//! - `ACL4_ROOT`: one slot per /16 per (generation, scope). A slot is a
//!   value index, or [`CHILD`] | a node index when the /16 holds more
//!   specific prefixes.
//! - `ACL4_NODES`: a node splits its range into 256 slots of the next 8
//!   bits. Consecutive slots with the same meaning form one run; the node
//!   keeps a bit per slot that starts a run (every 64th slot always does)
//!   and, per 64 slots, where their runs sit in `ACL4_SLOTS`. A slot's run
//!   is found by counting the bits up to it.
//! - `ACL4_SLOTS`: the runs' slot values, as in the root.
//! - `ACL4_VALUES`: the distinct [`AclEntry`] values; index 0 means "no
//!   entry".
//!
//! The compiler pushes every prefix's meaning down to the slots it covers
//! (leaf pushing), so the slot reached last answers alone. Each generation
//! owns half of every array, so the standby one is rewritten while the
//! active one is read.

use crate::ACL_SCOPES;

/// Slot bit: the rest is a node index, not a value index.
pub const CHILD: u32 = 1 << 31;
/// Root slots per (generation, scope): one per /16.
pub const ROOT_SLOTS: u32 = 1 << 16;
/// u32 slots per array value of `ACL4_ROOT` and `ACL4_SLOTS`. Array values
/// are stored 8-byte aligned, so single u32s would waste half the memory.
pub const SLOT_CHUNK: usize = 16;
/// Entries of `ACL4_ROOT`, in chunks.
pub const ROOT_CHUNKS: u32 = crate::GENERATIONS * ACL_SCOPES as u32 * ROOT_SLOTS / SLOT_CHUNK as u32;

/// Default per-generation capacities, settable at load time: about 33 MB
/// for both generations. They hold the whole real geo database (which
/// merges into about 10,000 nodes) with 100,000 random CIDRs on top, each
/// list line its own value (its rule id).
pub const DEFAULT_NODES: u32 = 131_072;
pub const DEFAULT_SLOTS: u32 = 1_048_576;
pub const DEFAULT_VALUES: u32 = 131_072;

/// A chunk of slots.
pub type SlotChunk = [u32; SLOT_CHUNK];

/// One 256-way node. `runs` has a bit per slot that starts a run (bit 0 of
/// each word always set); `base[w]` is the `ACL4_SLOTS` index of the run
/// of slot `64 * w`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AclNode {
    pub runs: [u64; 4],
    pub base: [u32; 4],
}
const _: () = assert!(core::mem::size_of::<AclNode>() == 48);

impl AclNode {
    /// The `ACL4_SLOTS` index holding slot `slot` (0..=255) of this node.
    #[inline(always)]
    pub fn slot_index(&self, slot: u32) -> u32 {
        let word = (slot >> 6) as usize & 3;
        let bit = slot & 63;
        // Bits 0..=bit; for bit 63 the shift wraps to 0 and the mask to all ones.
        let upto = (2u64 << bit).wrapping_sub(1);
        let rank = popcount(self.runs[word] & upto);
        self.base[word].wrapping_add(rank).wrapping_sub(1)
    }
}

/// Population count without the instruction the BPF target lacks.
#[inline(always)]
pub const fn popcount(mut x: u64) -> u32 {
    x -= (x >> 1) & 0x5555_5555_5555_5555;
    x = (x & 0x3333_3333_3333_3333) + ((x >> 2) & 0x3333_3333_3333_3333);
    x = (x + (x >> 4)) & 0x0f0f_0f0f_0f0f_0f0f;
    (x.wrapping_mul(0x0101_0101_0101_0101) >> 56) as u32
}

/// Index of the root slot for `addr` (host order) in a (generation, scope).
#[inline(always)]
pub const fn root_slot(generation: u32, scope: u8, addr: u32) -> u32 {
    (((generation & 1) * ACL_SCOPES as u32 + (scope as u32 & 3)) << 16) | (addr >> 16)
}

/// The slot of a node that covers `addr` at `depth` (1: bits 8..16 from
/// the top after the root's 16, 2: the last 8).
#[inline(always)]
pub const fn node_slot(addr: u32, depth: u32) -> u32 {
    (addr >> (16 - 8 * depth)) & 0xff
}

/// Per-generation capacities of the arrays, in elements.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capacity {
    pub nodes: u32,
    pub slots: u32,
    pub values: u32,
}

impl Capacity {
    pub const DEFAULT: Self = Self { nodes: DEFAULT_NODES, slots: DEFAULT_SLOTS, values: DEFAULT_VALUES };

    /// Entries of `ACL4_SLOTS` (chunks) holding both generations.
    pub const fn slot_chunks(&self) -> u32 {
        crate::GENERATIONS * self.slots / SLOT_CHUNK as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn popcount_matches_count_ones() {
        for x in [0u64, 1, 3, u64::MAX, 0x8000_0000_0000_0001, 0x0123_4567_89ab_cdef] {
            assert_eq!(popcount(x), x.count_ones());
        }
    }

    #[test]
    fn slot_index_counts_runs_up_to_the_slot() {
        // Runs start at slots 0, 5, 63, 64, 128, 192 and 200.
        let node = AclNode { runs: [1 | 1 << 5 | 1 << 63, 1, 1, 1 | 1 << 8], base: [10, 13, 14, 15] };
        assert_eq!(node.slot_index(0), 10);
        assert_eq!(node.slot_index(4), 10);
        assert_eq!(node.slot_index(5), 11);
        assert_eq!(node.slot_index(62), 11);
        assert_eq!(node.slot_index(63), 12);
        assert_eq!(node.slot_index(64), 13);
        assert_eq!(node.slot_index(128), 14);
        assert_eq!(node.slot_index(199), 15);
        assert_eq!(node.slot_index(200), 16);
        assert_eq!(node.slot_index(255), 16);
    }
}

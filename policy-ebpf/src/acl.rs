//! Allow, deny and geo in one longest-prefix lookup per side: for IPv6 in
//! an LPM trie, for IPv4 in a multibit trie of arrays (see
//! `policy_common::acl4`), whose cost does not grow with the rule count.
//!
//! The compiler folds every rule into the tries so that the longest
//! matching prefix alone tells, per port slot, which rule allows and which
//! denies, and which country the address is in.

use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::{lpm_trie::Key, Array, LpmTrie},
};
use policy_common::{
    acl4::{self, AclNode, SlotChunk, CHILD, SLOT_CHUNK},
    acl_scope, direction, side, AclEntry, AclKeyV6, ACL_CAPACITY, ACL_KEY_HEADER_BITS, GENERATIONS,
};

use crate::parse::Flow;

// The IPv4 ACL (layout: policy_common::acl4). Writer: controller, through
// mmap. Capacities of nodes, slots and values are set at load time.
#[map]
static ACL4_ROOT: Array<SlotChunk> = Array::with_max_entries(acl4::ROOT_CHUNKS, BPF_F_MMAPABLE);
#[map]
static ACL4_NODES: Array<AclNode> = Array::with_max_entries(GENERATIONS * acl4::DEFAULT_NODES, BPF_F_MMAPABLE);
#[map]
static ACL4_SLOTS: Array<SlotChunk> = Array::with_max_entries(acl4::Capacity::DEFAULT.slot_chunks(), BPF_F_MMAPABLE);
#[map]
static ACL4_VALUES: Array<AclEntry> = Array::with_max_entries(GENERATIONS * acl4::DEFAULT_VALUES, BPF_F_MMAPABLE);

/// Key: (generation, direction << 1 | side, IPv6 prefix). Writer: controller.
#[map]
static ACL_V6: LpmTrie<AclKeyV6, AclEntry> = LpmTrie::with_max_entries(ACL_CAPACITY, 0);

/// The ACL's opinion of a flow; rule ids are 0 when no rule applies.
#[derive(Default)]
pub struct AclMatch {
    pub allow_rule: u32,
    pub deny_rule: u32,
    pub country: u32,
}

/// An LPM key laid out like aya's `Key<K>` but 4-byte aligned. aya's key
/// is `packed`, so building one copies the address byte by byte; this one
/// is built with word stores and viewed as aya's key for the lookup.
#[repr(C)]
struct AlignedKey<K> {
    prefix_len: u32,
    data: K,
}

impl<K> AlignedKey<K> {
    #[inline(always)]
    fn as_key(&self) -> &Key<K> {
        // SAFETY: same fields in the same order at the same offsets (K is
        // 4-byte aligned, so there is no padding after prefix_len); Key<K>
        // is packed, so any alignment is enough.
        unsafe { &*(self as *const Self as *const Key<K>) }
    }
}

#[inline(always)]
fn slot(array: &Array<SlotChunk>, index: u32) -> Option<u32> {
    array.get(index / SLOT_CHUNK as u32).map(|chunk| chunk[index as usize % SLOT_CHUNK])
}

/// At most five array reads: root, then per level a node and its run.
#[inline(always)]
fn entry_v4(addr: u32, generation: u8, scope: u8) -> Option<&'static AclEntry> {
    let addr = u32::from_be(addr);
    let mut v = slot(&ACL4_ROOT, acl4::root_slot(generation as u32, scope, addr))?;
    if v & CHILD != 0 {
        let node = ACL4_NODES.get(v & !CHILD)?;
        v = slot(&ACL4_SLOTS, node.slot_index(acl4::node_slot(addr, 1)))?;
        if v & CHILD != 0 {
            let node = ACL4_NODES.get(v & !CHILD)?;
            v = slot(&ACL4_SLOTS, node.slot_index(acl4::node_slot(addr, 2)))?;
        }
    }
    if v == 0 {
        None
    } else {
        ACL4_VALUES.get(v)
    }
}

#[inline(always)]
fn entry(v6: bool, addr: &[u32; 4], generation: u8, scope: u8) -> Option<&'static AclEntry> {
    if v6 {
        let key = AlignedKey {
            prefix_len: ACL_KEY_HEADER_BITS + 128,
            data: AclKeyV6 { generation, scope, _pad: [0; 2], addr: *addr },
        };
        ACL_V6.get(key.as_key())
    } else {
        entry_v4(addr[0], generation, scope)
    }
}

/// One side's entry in the trie alone (a shadow generation's, which has
/// no IPv4 arrays): IPv4 as an IPv4-mapped address in a scope of its own.
#[inline(always)]
fn trie_entry(v6: bool, addr: &[u32; 4], generation: u8, scope: u8) -> Option<&'static AclEntry> {
    let (addr, scope) = if v6 { (*addr, scope) } else { ([0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), addr[0]], scope | policy_common::SHADOW_V4_SCOPE) };
    let key = AlignedKey { prefix_len: ACL_KEY_HEADER_BITS + 128, data: AclKeyV6 { generation, scope, _pad: [0; 2], addr } };
    ACL_V6.get(key.as_key())
}

/// [`lookup`] in a shadow generation, for port slot `slot` of its policy.
#[inline(always)]
pub fn lookup_shadow(v6: bool, src: &[u32; 4], dst: &[u32; 4], generation: u8, dir: u8, sides: u8, slot: usize) -> AclMatch {
    let (peer, local) = if dir == direction::INGRESS { (src, dst) } else { (dst, src) };
    let mut found = AclMatch::default();
    if sides & side::PEER_BIT != 0 {
        if let Some(e) = trie_entry(v6, peer, generation, acl_scope(dir, side::PEER)) {
            found.allow_rule = *e.allow_rule.get(slot).unwrap_or(&0);
            found.deny_rule = *e.deny_rule.get(slot).unwrap_or(&0);
            found.country = e.country;
        }
    }
    if sides & side::LOCAL_BIT != 0 && found.allow_rule == 0 {
        if let Some(e) = trie_entry(v6, local, generation, acl_scope(dir, side::LOCAL)) {
            found.allow_rule = *e.allow_rule.get(slot).unwrap_or(&0);
            if found.deny_rule == 0 {
                found.deny_rule = *e.deny_rule.get(slot).unwrap_or(&0);
            }
        }
    }
    found
}

/// Looks the flow's peer and local addresses up, each only when the policy
/// has rules for that side (`sides`, [`side`] bits). The peer is the
/// source on ingress and the destination on egress.
#[inline(always)]
pub fn lookup(flow: &Flow, generation: u8, dir: u8, sides: u8) -> AclMatch {
    let (peer, local) = if dir == direction::INGRESS { (&flow.src, &flow.dst) } else { (&flow.dst, &flow.src) };
    let slot = flow.port_slot;
    let mut found = AclMatch::default();
    if sides & side::PEER_BIT != 0 {
        if let Some(e) = entry(flow.seg.v6, peer, generation, acl_scope(dir, side::PEER)) {
            found.allow_rule = *e.allow_rule.get(slot).unwrap_or(&0);
            found.deny_rule = *e.deny_rule.get(slot).unwrap_or(&0);
            found.country = e.country;
        }
    }
    if sides & side::LOCAL_BIT != 0 && found.allow_rule == 0 {
        if let Some(e) = entry(flow.seg.v6, local, generation, acl_scope(dir, side::LOCAL)) {
            found.allow_rule = *e.allow_rule.get(slot).unwrap_or(&0);
            if found.deny_rule == 0 {
                found.deny_rule = *e.deny_rule.get(slot).unwrap_or(&0);
            }
        }
    }
    found
}

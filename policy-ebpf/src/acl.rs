//! Allow, deny and geo in one longest-prefix lookup per side.
//!
//! The compiler folds every rule into the tries so that the longest
//! matching prefix alone tells, per port slot, which rule allows and which
//! denies, and which country the address is in.

use aya_ebpf::{
    macros::map,
    maps::{lpm_trie::Key, Array, LpmTrie},
};
use policy_common::{
    acl_scope, direction, side, AclEntry, AclKeyV4, AclKeyV6, AclSkip, ACL_CAPACITY, ACL_KEY_HEADER_BITS, ACL_SCOPES,
    GENERATIONS,
};

use crate::parse::Flow;

/// Key: (generation, direction << 1 | side, IPv4 prefix). Writer: controller.
#[map]
static ACL_V4: LpmTrie<AclKeyV4, AclEntry> = LpmTrie::with_max_entries(ACL_CAPACITY, 0);

/// Key: (generation, direction << 1 | side, IPv6 prefix). Writer: controller.
#[map]
static ACL_V6: LpmTrie<AclKeyV6, AclEntry> = LpmTrie::with_max_entries(ACL_CAPACITY, 0);

/// Key: `AclSkip::index(generation, scope)`. Writer: controller.
#[map]
static ACL_SKIP: Array<AclSkip> = Array::with_max_entries(GENERATIONS * ACL_SCOPES as u32, 0);

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
fn entry(v6: bool, addr: &[u32; 4], generation: u8, scope: u8) -> Option<&'static AclEntry> {
    if v6 {
        let key = AlignedKey {
            prefix_len: ACL_KEY_HEADER_BITS + 128,
            data: AclKeyV6 { generation, scope, _pad: [0; 2], addr: *addr },
        };
        ACL_V6.get(key.as_key())
    } else {
        // Most addresses sit in a /16 without entries: one word answers.
        if ACL_SKIP.get(AclSkip::index(generation, scope)).is_some_and(|s| s.skips(addr[0])) {
            return None;
        }
        let key = AlignedKey {
            prefix_len: ACL_KEY_HEADER_BITS + 32,
            data: AclKeyV4 { generation, scope, _pad: [0; 2], addr: addr[0] },
        };
        ACL_V4.get(key.as_key())
    }
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

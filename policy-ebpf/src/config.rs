//! The datapath's configuration: runtime settings and the two policy
//! generations. Packets read `Runtime::active` once and are judged wholly
//! by that generation, so a flip of that word is an atomic policy swap.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap},
};
use policy_common::{PolicyConfig, Runtime, GENERATIONS, TENANT_IFACES_CAPACITY};

/// Key 0. Writer: controller. Reader: every hook.
#[map]
static RUNTIME: Array<Runtime> = Array::with_max_entries(1, 0);

/// Key: generation (0, 1). Writer: controller (inactive generation only).
#[map]
static POLICY: Array<PolicyConfig> = Array::with_max_entries(GENERATIONS, 0);

#[inline(always)]
pub fn runtime() -> Option<&'static Runtime> {
    RUNTIME.get(0)
}

#[inline(always)]
pub fn policy(generation: u32) -> Option<&'static PolicyConfig> {
    POLICY.get(generation)
}

/// The generation to judge by, read exactly once per packet (volatile, so
/// the compiler cannot read the map word again later).
#[inline(always)]
pub fn active_generation(runtime: &Runtime) -> u32 {
    // SAFETY: a valid reference to map memory.
    unsafe { core::ptr::read_volatile(&runtime.active) }
}

/// Key: ifindex of a tenant interface. Writer: controller (at attach).
#[map]
static TENANT_IFACES: HashMap<u32, u32> = HashMap::with_max_entries(TENANT_IFACES_CAPACITY, 0);

/// Did a packet that arrived on `ifindex` pass a tenant hook already?
#[inline(always)]
pub fn judged_on_arrival(ifindex: u32) -> bool {
    // SAFETY: the value is only tested for presence.
    ifindex != 0 && unsafe { TENANT_IFACES.get(ifindex) }.is_some()
}

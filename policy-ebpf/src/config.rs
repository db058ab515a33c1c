//! The datapath's configuration: runtime settings and the two policy
//! generations. Packets read `Runtime::active` once and are judged wholly
//! by that generation, so a flip of that word is an atomic policy swap.

use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::Array,
};
use policy_common::{port_filter_bit, runtime_word, PolicyConfig, Runtime, POLICY_ENTRIES, PORT_FILTER_WORDS};

use crate::atomic::Word;

/// Key 0: the [`Runtime`] words. Mmapable: userspace stores single 8-byte
/// words, each word with one writer (see `Runtime`). Reader: every hook.
#[map]
static RUNTIME: Array<Runtime> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// Key 0: the fail-open switch, a word: 0 off, else the Unix time it was
/// turned on. Mmapable; one writer, `smtpguard bypass`, one atomic store.
/// Read only for a packet the policy drops, so it costs nothing otherwise.
#[map]
static BYPASS: Array<u64> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// Key: generation (0, 1; a shadow's 2, 3). Writer: controller (inactive
/// generations only).
#[map]
static POLICY: Array<PolicyConfig> = Array::with_max_entries(POLICY_ENTRIES, 0);

/// The runtime settings, read with one atomic load of the field's word
/// each: userspace stores those words while packets are judged, so no
/// reference to the value is ever made.
#[derive(Clone, Copy)]
pub struct RuntimeView(*mut u8);

/// Byte offset of a [`runtime_word`].
const fn at(word: usize) -> usize {
    8 * word
}

impl RuntimeView {
    /// The word at byte `OFF` (a constant of the load instruction).
    #[inline(always)]
    fn word<const OFF: usize>(self) -> u64 {
        // SAFETY: the value is `runtime_word::COUNT` aligned words of a live
        // map value, written only by atomic stores; callers pass in-bounds
        // word offsets.
        unsafe { Word::<OFF>::new(self.0) }.load()
    }

    /// The generation to judge by. Read it exactly once per packet: a
    /// second read could see a flip and judge the packet by two policies.
    #[inline(always)]
    pub fn active(self) -> u32 {
        self.word::<{ at(runtime_word::GENERATION) }>() as u32
    }

    #[inline(always)]
    pub fn source_sets(self) -> u32 {
        (self.word::<{ at(runtime_word::GENERATION) }>() >> 32) as u32
    }

    #[inline(always)]
    pub fn hook_direction(self, hook: usize) -> u8 {
        (self.word::<{ at(runtime_word::HOOKS) }>() >> (8 * (hook % policy_common::hook::COUNT))) as u8
    }

    /// The shadow policy's generation, 0 when none: from the word the
    /// hook's direction is read from, so checking costs no load.
    #[inline(always)]
    pub fn shadow(self) -> u32 {
        ((self.word::<{ at(runtime_word::HOOKS) }>() >> 24) & 0xff) as u32
    }

    #[inline(always)]
    pub fn cidr_bans(self) -> bool {
        self.word::<{ at(runtime_word::CIDR_BANS) }>() != 0
    }

    #[inline(always)]
    pub fn drop_sample_one_in(self) -> u32 {
        self.word::<{ at(runtime_word::EVENTS) }>() as u32
    }

    #[inline(always)]
    pub fn events_per_second(self) -> u32 {
        (self.word::<{ at(runtime_word::EVENTS) }>() >> 32) as u32
    }

    /// May TCP to `port` be guarded? `false` is certain; `true` may not be.
    #[inline(always)]
    pub fn may_guard(self, port: u16) -> bool {
        let (word, bit) = port_filter_bit(port);
        // SAFETY: `word` < PORT_FILTER_WORDS, so the load stays in the value.
        let filter = RuntimeView(unsafe { self.0.add(8 * (word % PORT_FILTER_WORDS)) });
        filter.word::<{ at(runtime_word::PORT_FILTER) }>() & bit != 0
    }
}

#[inline(always)]
pub fn runtime() -> Option<RuntimeView> {
    RUNTIME.get_ptr_mut(0).map(|p| RuntimeView(p.cast()))
}

/// Is enforcement switched off (`smtpguard bypass on`)? Then every
/// direction judges as in monitor mode.
#[inline(always)]
pub fn bypassed() -> bool {
    // SAFETY: key 0's value is one aligned u64, written only by an atomic
    // store through the mapping.
    BYPASS.get_ptr_mut(0).is_some_and(|p| unsafe { Word::<0>::new(p.cast()) }.load() != 0)
}

#[inline(always)]
pub fn policy(generation: u32) -> Option<&'static PolicyConfig> {
    POLICY.get(generation)
}

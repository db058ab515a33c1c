//! Per-source state shared by all CPUs: bans, the new-connection bucket
//! and the ban meter, in the set-associative `SOURCES` table.
//!
//! The bucket and the ban are updated by compare-and-swap, so SYNs of one
//! source spread over CPUs by RSS spend from one bucket. Losing a race a
//! few times in a row counts as no token: under such contention the
//! source is flooding anyway. The ban meter and bookkeeping use plain
//! stores (see `on_syn`).

use core::{mem::offset_of, ptr::addr_of_mut};

use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::{lpm_trie::Key, Array, LpmTrie},
};
use policy_common::{
    source::{
        ban_duration_s, ban_origin, claim_kind_of, eviction_score, gcra_admit, sets_for, slot_flag, source_key_v4_word,
        source_key_v6_words, source_set, Admit, SlotInfo, SourceSet, SourceSlot, Window, WAYS,
    },
    DirectionPolicy, BAN_CIDR_CAPACITY, DEFAULT_SOURCE_CAPACITY,
};

use crate::{atomic::Word, opaque::opaque, parse::Flow, stats};

/// Key: `source_set(source key)`; 8 ways per set. Writer: datapath (SYNs,
/// expiries) and `smtpguard ban`/`unban` (one way, through the mapping,
/// with the protocol below). Capacity set at load time. Mmapable: the
/// controller reads it in place for metrics and `bans`.
///
/// Protocol per way: a claim stores the bucket, meter, ban and info words,
/// then the key last; `ban_until_ns` changes only by compare-and-swap
/// (start, expiry, manual ban and unban), so no writer undoes another's
/// ban with a stale value; the meter and info are plain stores.
#[map]
static SOURCES: Array<SourceSet> = Array::with_max_entries(sets_for(DEFAULT_SOURCE_CAPACITY), BPF_F_MMAPABLE);

const CAS_TRIES: usize = 4;
const NS_PER_S: u64 = 1_000_000_000;

/// Applies `f` atomically; `None` from `f` leaves the word alone.
#[inline(always)]
fn update<const OFF: usize>(w: Word<OFF>, mut f: impl FnMut(u64) -> Option<u64>) -> Option<u64> {
    for _ in 0..CAS_TRIES {
        let old = w.load();
        let new = f(old)?;
        if w.cas(old, new) {
            return Some(new);
        }
    }
    None
}

/// One way of a set in `SOURCES`, by raw pointer: other CPUs and userspace
/// write its words while a program runs.
#[derive(Clone, Copy)]
struct Slot(*mut SourceSlot);

impl Slot {
    /// Way `way % WAYS` of the set at `set`, a pointer `get_ptr_mut` gave.
    #[inline(always)]
    fn of(set: *mut SourceSet, way: u32) -> Self {
        // SAFETY: `set` points to a live map value; the index is in bounds.
        Self(unsafe { addr_of_mut!((*set).slots[way as usize % WAYS]) })
    }

    // SAFETY (each word below): an aligned u64 field of a live map value,
    // accessed only atomically (see `Word::new`).
    #[inline(always)]
    fn key(self) -> Word<{ offset_of!(SourceSlot, key) }> {
        unsafe { Word::new(self.0.cast()) }
    }

    #[inline(always)]
    fn admit_tat(self) -> Word<{ offset_of!(SourceSlot, admit_tat_ns) }> {
        unsafe { Word::new(self.0.cast()) }
    }

    #[inline(always)]
    fn window(self) -> Word<{ offset_of!(SourceSlot, window) }> {
        unsafe { Word::new(self.0.cast()) }
    }

    #[inline(always)]
    fn ban_until(self) -> Word<{ offset_of!(SourceSlot, ban_until_ns) }> {
        unsafe { Word::new(self.0.cast()) }
    }

    #[inline(always)]
    fn info(self) -> Word<{ offset_of!(SourceSlot, info) }> {
        unsafe { Word::new(self.0.cast()) }
    }
}

/// A flow's source: its key, its set, and the way it holds (`tracked`) or
/// would take if it were new.
pub struct Source {
    key: u64,
    set: Option<*mut SourceSet>,
    way: u32,
    tracked: bool,
}

impl Source {
    #[inline(always)]
    fn slot(&self) -> Option<Slot> {
        Some(Slot::of(self.set?, self.way))
    }
}

/// Finds the flow's source in its set. Only keys are compared here: most
/// packets that ask (ACL, geo and ban checks) are from sources that stay
/// untracked, and choosing a way for a newcomer waits for its first SYN.
#[inline(always)]
pub fn locate(flow: &Flow, sets: u32) -> Source {
    let key = if flow.seg.v6 { source_key_v6_words(&flow.src) } else { source_key_v4_word(flow.src[0]) };
    let set = SOURCES.get_ptr_mut(source_set(key, sets));
    let found = match set {
        Some(set) => find_way(set, key),
        None => None,
    };
    Source { key, set, way: opaque(found.unwrap_or(0) as u64) as u32, tracked: found.is_some() }
}

/// The way of `set` holding `key`. Each way's key is loaded at a constant
/// offset from the set (way `i` at `i * size_of::<SourceSlot>()`), so the
/// search is one load and one compare per way, as in a plain struct read.
#[inline(always)]
fn find_way(set: *mut SourceSet, key: u64) -> Option<u32> {
    const SLOT: usize = size_of::<SourceSlot>();
    macro_rules! ways {
        ($($way:literal)*) => {
            $(
                // SAFETY: way `$way` < WAYS of a live set, its key an aligned,
                // atomically accessed word.
                if unsafe { Word::<{ $way * SLOT + offset_of!(SourceSlot, key) }>::new(set.cast()) }.load() == key {
                    return Some($way);
                }
            )*
        };
    }
    ways!(0 1 2 3 4 5 6 7);
    const _: () = assert!(WAYS == 8, "find_way lists every way");
    None
}

/// The way a new source takes: the lowest [`eviction_score`] (a free way,
/// else the idlest unbanned source, else the ban that ends first; manual
/// bans go last).
#[inline(always)]
fn victim(set: *mut SourceSet, now_ns: u64) -> u32 {
    let mut way = 0;
    let mut best = u64::MAX;
    for i in 0..WAYS as u32 {
        let s = Slot::of(set, i);
        let key = s.key().load();
        // A free way needs no more loads.
        let score = if key == 0 { 0 } else { eviction_score(key, s.ban_until().load(), s.info().load(), now_ns) };
        if score < best {
            best = score;
            way = i;
        }
    }
    opaque(way as u64) as u32
}

pub enum BanCheck {
    Clear,
    Banned,
    /// The ban ran out just now; the caller reports it.
    Expired,
}

/// Is the source banned at `now_ns`? An expired ban is cleared here.
#[inline(always)]
pub fn check_ban(source: &Source, now_ns: u64) -> BanCheck {
    if !source.tracked {
        return BanCheck::Clear;
    }
    let Some(slot) = source.slot() else { return BanCheck::Clear };
    let ban = slot.ban_until();
    let until = ban.load();
    if until == 0 {
        BanCheck::Clear
    } else if until > now_ns {
        BanCheck::Banned
    } else if ban.cas(until, 0) {
        BanCheck::Expired
    } else {
        BanCheck::Clear
    }
}

/// Key: source prefix (words in memory order). Value: banned until (ns).
/// Writer: `smtpguard ban` for networks. Reader: pipeline, when
/// `Runtime::cidr_bans` says there are any.
#[map]
static BAN_V4: LpmTrie<[u32; 1], u64> = LpmTrie::with_max_entries(BAN_CIDR_CAPACITY, 0);
#[map]
static BAN_V6: LpmTrie<[u32; 4], u64> = LpmTrie::with_max_entries(BAN_CIDR_CAPACITY, 0);

/// Is the flow's source inside a manually banned network at `now_ns`?
#[inline(always)]
pub fn network_banned(flow: &Flow, now_ns: u64) -> bool {
    let until = if flow.seg.v6 {
        BAN_V6.get(Key::new(128, flow.src)).copied()
    } else {
        BAN_V4.get(Key::new(32, [flow.src[0]])).copied()
    };
    until.is_some_and(|u| u > now_ns)
}

/// Gives the source its chosen way, evicting whoever held it, and counts
/// what the way held (a `claim_kind`). The key is stored last, so a CPU
/// that finds it finds the other words reset.
#[inline(always)]
fn claim(slot: Slot, key: u64, now_ns: u64) {
    let kind = claim_kind_of(slot.key().load(), slot.admit_tat().load(), slot.ban_until().load(), slot.info().load(), now_ns);
    slot.admit_tat().store(0);
    slot.window().store(0);
    slot.ban_until().store(0);
    slot.info().store(SlotInfo { last_seen_s: (now_ns / NS_PER_S) as u32, ..SlotInfo::default() }.pack());
    slot.key().store(key);
    stats::record_claim(kind);
}

pub enum SynOutcome {
    Admitted,
    /// No token. `trip`: the first limited SYN after admitted ones.
    Limited { trip: bool },
    /// This SYN started a ban.
    BanStarted { count: u32, duration_s: u32, strikes: u32 },
    /// Another CPU started the ban a moment ago.
    Banned,
}

/// Meters a new connection: the ban meter counts every SYN, then the
/// bucket decides whether it may pass.
#[inline(always)]
pub fn on_syn(source: &mut Source, policy: &DirectionPolicy, now_ns: u64) -> SynOutcome {
    let Some(set) = source.set else { return SynOutcome::Admitted };
    let now_s = (now_ns / NS_PER_S) as u32;
    if !source.tracked {
        source.way = victim(set, now_ns);
        let Some(slot) = source.slot() else { return SynOutcome::Admitted };
        claim(slot, source.key, now_ns);
        source.tracked = true;
    }
    let Some(slot) = source.slot() else { return SynOutcome::Admitted };
    let info_word = slot.info();

    if policy.ban_threshold != 0 {
        // The meter is a plain read-modify-write: a race between CPUs can
        // lose a count, which delays a ban by a SYN; a CAS here would cost
        // every SYN a locked instruction.
        let meter = slot.window();
        let window = Window::unpack(meter.load()).record(now_s);
        meter.store(window.pack());
        let count = window.estimate(now_s);
        if count > policy.ban_threshold {
            let info = SlotInfo::unpack(info_word.load());
            let strikes = info.strikes as u32 + 1;
            let duration_s =
                ban_duration_s(strikes, policy.ban_base_s, policy.ban_factor, policy.ban_max_s);
            let until = now_ns + duration_s as u64 * NS_PER_S;
            let ban = slot.ban_until();
            let old = ban.load();
            if old > now_ns || !ban.cas(old, until) {
                return SynOutcome::Banned;
            }
            let origin = if strikes > 1 { ban_origin::ESCALATED } else { ban_origin::AUTO };
            info_word.store(
                SlotInfo { strikes: strikes as u16, origin, flags: 0, last_seen_s: now_s }.pack(),
            );
            slot.window().store(0);
            return SynOutcome::BanStarted { count, duration_s, strikes };
        }
    }

    let admitted = policy.rate_interval_ns == 0
        || update(slot.admit_tat(), |tat| {
            match gcra_admit(tat, now_ns, policy.rate_interval_ns, policy.rate_tolerance_ns) {
                Admit::Accept(next) => Some(next),
                Admit::Reject => None,
            }
        })
        .is_some();
    // Bookkeeping for eviction and trip events, written only when it
    // changes (at most once a second, or on a trip).
    let old = info_word.load();
    let mut info = SlotInfo::unpack(old);
    let trip = !admitted && info.flags & slot_flag::LIMITED == 0;
    info.flags = if admitted { info.flags & !slot_flag::LIMITED } else { info.flags | slot_flag::LIMITED };
    info.last_seen_s = now_s;
    let new = info.pack();
    if new != old {
        info_word.store(new);
    }
    if admitted {
        SynOutcome::Admitted
    } else {
        SynOutcome::Limited { trip }
    }
}

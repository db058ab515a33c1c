//! Per-source state shared by all CPUs: bans, the new-connection bucket
//! and the ban meter, in the set-associative `SOURCES` table.
//!
//! The bucket and the ban are updated by compare-and-swap, so SYNs of one
//! source spread over CPUs by RSS spend from one bucket. Losing a race a
//! few times in a row counts as no token: under such contention the
//! source is flooding anyway. The ban meter and bookkeeping use plain
//! stores (see `on_syn`).

use aya_ebpf::{
    macros::map,
    maps::{lpm_trie::Key, Array, LpmTrie},
};
use policy_common::{
    source::{
        ban_duration_s, ban_origin, gcra_admit, sets_for, slot_flag, source_key_v4_word, source_key_v6_words,
        source_set, Admit, SlotInfo, SourceSet, SourceSlot, Window, WAYS,
    },
    DirectionPolicy, BAN_CIDR_CAPACITY, DEFAULT_SOURCE_CAPACITY,
};

use crate::{atomic::Word, opaque::opaque, parse::Flow};

/// Key: `source_set(source key)`; 8 ways per set. Writer: datapath (SYNs,
/// expiries) and controller (manual bans). Capacity set at load time.
#[map]
static SOURCES: Array<SourceSet> = Array::with_max_entries(sets_for(DEFAULT_SOURCE_CAPACITY), 0);

const CAS_TRIES: usize = 4;
const NS_PER_S: u64 = 1_000_000_000;

#[inline(always)]
fn word(field: &u64) -> Word {
    Word::of(field)
}

/// Applies `f` atomically; `None` from `f` leaves the word alone.
#[inline(always)]
fn update(w: Word, mut f: impl FnMut(u64) -> Option<u64>) -> Option<u64> {
    for _ in 0..CAS_TRIES {
        let old = w.load();
        let new = f(old)?;
        if w.cas(old, new) {
            return Some(new);
        }
    }
    None
}

/// A flow's source: its key, its set, and the way it holds (`tracked`) or
/// would take if it were new.
pub struct Source {
    key: u64,
    set: Option<&'static SourceSet>,
    way: u32,
    tracked: bool,
}

impl Source {
    #[inline(always)]
    fn slot(&self) -> Option<&'static SourceSlot> {
        let set = self.set?;
        Some(&set.slots[(self.way as usize) % WAYS])
    }
}

/// Finds the flow's source in its set. Only keys are compared here: most
/// packets that ask (ACL, geo and ban checks) are from sources that stay
/// untracked, and choosing a way for a newcomer waits for its first SYN.
#[inline(always)]
pub fn locate(flow: &Flow, sets: u32) -> Source {
    let key = if flow.seg.v6 { source_key_v6_words(&flow.src) } else { source_key_v4_word(flow.src[0]) };
    let set = SOURCES.get(source_set(key, sets));
    let mut way = 0;
    let mut tracked = false;
    if let Some(set) = set {
        for i in 0..WAYS {
            if word(&set.slots[i].key).load() == key {
                way = i as u32;
                tracked = true;
                break;
            }
        }
    }
    Source { key, set, way: opaque(way as u64) as u32, tracked }
}

/// The way a new source takes: a free way, else the idlest unbanned
/// source, else the ban that ends first; manual bans go last.
#[inline(always)]
fn victim(set: &SourceSet, now_ns: u64) -> u32 {
    let mut way = 0;
    let mut best = u64::MAX;
    for i in 0..WAYS {
        let s = &set.slots[i];
        let score = if word(&s.key).load() == 0 {
            0
        } else {
            let until = word(&s.ban_until_ns).load();
            if until > now_ns {
                let info = SlotInfo::unpack(word(&s.info).load());
                let rank = if info.origin == ban_origin::MANUAL { 3u64 << 62 } else { 1u64 << 62 };
                rank | (until / NS_PER_S)
            } else {
                1 + SlotInfo::unpack(word(&s.info).load()).last_seen_s as u64
            }
        };
        if score < best {
            best = score;
            way = i as u32;
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
    let ban = word(&slot.ban_until_ns);
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

/// Gives the source its chosen way, evicting whoever held it.
#[inline(always)]
fn claim(slot: &SourceSlot, key: u64, now_s: u32) {
    word(&slot.admit_tat_ns).store(0);
    word(&slot.window).store(0);
    word(&slot.ban_until_ns).store(0);
    word(&slot.info).store(SlotInfo { last_seen_s: now_s, ..SlotInfo::default() }.pack());
    word(&slot.key).store(key);
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
        claim(slot, source.key, now_s);
        source.tracked = true;
    }
    let Some(slot) = source.slot() else { return SynOutcome::Admitted };
    let info_word = word(&slot.info);

    if policy.ban_threshold != 0 {
        // The meter is a plain read-modify-write: a race between CPUs can
        // lose a count, which delays a ban by a SYN; a CAS here would cost
        // every SYN a locked instruction.
        let meter = word(&slot.window);
        let window = Window::unpack(meter.load()).record(now_s);
        meter.store(window.pack());
        let count = window.estimate(now_s);
        if count > policy.ban_threshold {
            let info = SlotInfo::unpack(info_word.load());
            let strikes = info.strikes as u32 + 1;
            let duration_s =
                ban_duration_s(strikes, policy.ban_base_s, policy.ban_factor, policy.ban_max_s);
            let until = now_ns + duration_s as u64 * NS_PER_S;
            let ban = word(&slot.ban_until_ns);
            let old = ban.load();
            if old > now_ns || !ban.cas(old, until) {
                return SynOutcome::Banned;
            }
            let origin = if strikes > 1 { ban_origin::ESCALATED } else { ban_origin::AUTO };
            info_word.store(
                SlotInfo { strikes: strikes as u16, origin, flags: 0, last_seen_s: now_s }.pack(),
            );
            word(&slot.window).store(0);
            return SynOutcome::BanStarted { count, duration_s, strikes };
        }
    }

    let admitted = policy.rate_interval_ns == 0
        || update(word(&slot.admit_tat_ns), |tat| {
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

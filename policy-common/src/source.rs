//! The per-source table: new-connection buckets, ban meter and bans.
//!
//! `SOURCES` is an array of 8-way sets rather than an LRU hash: a kernel
//! LRU hash element carries about 48 bytes of bookkeeping, which puts a
//! million sources near 100 MiB; a 40-byte slot in a plain array does not.
//! Eviction is ours to choose, so a flood of new sources evicts idle
//! entries before it evicts a ban.
//!
//! The rate and meter arithmetic lives here as pure functions so the
//! kernel and the userspace model compute the same thing.

/// Slots per set.
pub const WAYS: usize = 8;

/// One tracked source: five 8-byte words, each updated with single
/// stores or compare-and-swap (never the slot whole), so CPUs share one
/// bucket per source and userspace can change one way beside them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceSlot {
    /// [`source_key_v4`] / [`source_key_v6`]; 0 marks a free slot.
    pub key: u64,
    /// GCRA theoretical arrival time of the next SYN, ns (ktime).
    pub admit_tat_ns: u64,
    /// Ban meter, see [`Window`].
    pub window: u64,
    /// Banned until this ktime, ns; 0 when not banned.
    pub ban_until_ns: u64,
    /// See [`SlotInfo`].
    pub info: u64,
}
const _: () = assert!(core::mem::size_of::<SourceSlot>() == 40);

/// One element of `SOURCES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceSet {
    pub slots: [SourceSlot; WAYS],
}
const _: () = assert!(core::mem::size_of::<SourceSet>() == 320);

/// Sets needed for `capacity` sources.
pub const fn sets_for(capacity: u32) -> u32 {
    let sets = capacity.div_ceil(WAYS as u32);
    if sets == 0 {
        1
    } else {
        sets
    }
}

const V4_TAG: u64 = 0xffff_ffff_0000_0000;

/// Key of an IPv4 source. The tag keeps it apart from IPv6 keys: a /64
/// beginning `ffff:ffff` is multicast and never a TCP source.
#[inline(always)]
pub const fn source_key_v4(addr: [u8; 4]) -> u64 {
    V4_TAG | u32::from_be_bytes(addr) as u64
}

/// Key of an IPv6 source: its /64, the unit a host is given.
#[inline(always)]
pub const fn source_key_v6(addr: [u8; 16]) -> u64 {
    u64::from_be_bytes([addr[0], addr[1], addr[2], addr[3], addr[4], addr[5], addr[6], addr[7]])
}

/// [`source_key_v4`] of an address word holding network-order bytes.
#[inline(always)]
pub const fn source_key_v4_word(addr: u32) -> u64 {
    source_key_v4(addr.to_ne_bytes())
}

/// [`source_key_v6`] of address words holding network-order bytes.
#[inline(always)]
pub const fn source_key_v6_words(addr: &[u32; 4]) -> u64 {
    ((u32::from_be(addr[0]) as u64) << 32) | u32::from_be(addr[1]) as u64
}

/// The set a key lives in.
#[inline(always)]
pub const fn source_set(key: u64, sets: u32) -> u32 {
    let h = key.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (((h >> 32) * sets as u64) >> 32) as u32
}

const NS_PER_S: u64 = 1_000_000_000;

/// An unbanned source without a SYN for this long has an empty ban meter
/// (the sliding minute looks back at most two windows): with a full
/// bucket too, forgetting it changes nothing but its strike count.
pub const STALE_AFTER_S: u32 = 2 * super::BAN_WINDOW_S;

/// How much a way is worth keeping; a new source takes the way of its set
/// with the lowest score (the first of equals): a free way, else the
/// idlest unbanned source, else the ban that ends first, manual bans last.
/// The datapath and `smtpguard ban` choose by this one ranking.
#[inline(always)]
pub const fn eviction_score(key: u64, ban_until_ns: u64, info: u64, now_ns: u64) -> u64 {
    if key == 0 {
        0
    } else if ban_until_ns > now_ns {
        let rank = if SlotInfo::unpack(info).origin == ban_origin::MANUAL { 3u64 << 62 } else { 1u64 << 62 };
        rank | (ban_until_ns / NS_PER_S)
    } else {
        1 + SlotInfo::unpack(info).last_seen_s as u64
    }
}

/// What a way held when a new source took it: a [`crate::claim_kind`].
#[inline(always)]
pub const fn claim_kind_of(key: u64, admit_tat_ns: u64, ban_until_ns: u64, info: u64, now_ns: u64) -> u8 {
    let now_s = (now_ns / NS_PER_S) as u32;
    if key == 0 {
        crate::claim_kind::FREE
    } else if ban_until_ns > now_ns {
        crate::claim_kind::BAN
    } else if SlotInfo::unpack(info).last_seen_s.saturating_add(STALE_AFTER_S) <= now_s && admit_tat_ns <= now_ns {
        crate::claim_kind::STALE
    } else {
        crate::claim_kind::LIVE
    }
}

/// Result of offering a SYN to a GCRA bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Take a token: store this TAT.
    Accept(u64),
    Reject,
}

/// Generic cell rate algorithm: a token bucket in one word. `interval_ns`
/// is 60 s / rate per minute, `tolerance_ns` is (burst - 1) * interval.
#[inline(always)]
pub const fn gcra_admit(tat_ns: u64, now_ns: u64, interval_ns: u64, tolerance_ns: u64) -> Admit {
    let tat = if tat_ns < now_ns { now_ns } else { tat_ns };
    if tat - now_ns > tolerance_ns {
        Admit::Reject
    } else {
        Admit::Accept(tat + interval_ns)
    }
}

/// Sliding-minute SYN counter packed in a word: the current window's start
/// (seconds of ktime), the previous window's count and the current count.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Window {
    pub start_s: u32,
    pub previous: u16,
    pub current: u16,
}

impl Window {
    #[inline(always)]
    pub const fn unpack(word: u64) -> Self {
        Self { start_s: (word >> 32) as u32, previous: (word >> 16) as u16, current: word as u16 }
    }

    #[inline(always)]
    pub const fn pack(self) -> u64 {
        ((self.start_s as u64) << 32) | ((self.previous as u64) << 16) | self.current as u64
    }

    /// Counts one SYN at `now_s`, rolling the window forward as needed.
    #[inline(always)]
    pub const fn record(self, now_s: u32) -> Self {
        let elapsed = now_s.wrapping_sub(self.start_s);
        let rolled = if self.start_s == 0 && self.previous == 0 && self.current == 0 {
            Self { start_s: now_s, previous: 0, current: 0 }
        } else if elapsed < super::BAN_WINDOW_S {
            self
        } else if elapsed < 2 * super::BAN_WINDOW_S {
            Self { start_s: self.start_s + super::BAN_WINDOW_S, previous: self.current, current: 0 }
        } else {
            Self { start_s: now_s, previous: 0, current: 0 }
        };
        let current = if rolled.current == u16::MAX { u16::MAX } else { rolled.current + 1 };
        Self { current, ..rolled }
    }

    /// SYNs in the minute ending at `now_s`: the current count plus the
    /// share of the previous window that still overlaps it.
    #[inline(always)]
    pub const fn estimate(self, now_s: u32) -> u32 {
        let elapsed = now_s.wrapping_sub(self.start_s);
        let overlap = super::BAN_WINDOW_S.saturating_sub(elapsed);
        self.current as u32 + (self.previous as u32 * overlap) / super::BAN_WINDOW_S
    }
}

/// Length of ban number `strikes` (1 = first): base * factor^(strikes-1),
/// capped at `max_s` (when `max_s` is 0 there is no escalation cap beyond base).
#[inline(always)]
pub const fn ban_duration_s(strikes: u32, base_s: u32, factor: u32, max_s: u32) -> u32 {
    let cap = if max_s < base_s { base_s } else { max_s };
    let mut d = base_s as u64;
    let mut i = 1;
    while i < strikes && i < super::MAX_BAN_STRIKES {
        d *= factor as u64;
        if d >= cap as u64 {
            return cap;
        }
        i += 1;
    }
    if d > cap as u64 {
        cap
    } else {
        d as u32
    }
}

/// How a ban came to be, for metrics.
pub mod ban_origin {
    pub const NONE: u8 = 0;
    pub const AUTO: u8 = 1;
    pub const ESCALATED: u8 = 2;
    pub const MANUAL: u8 = 3;
    /// A tenant suspect's quarantine (the controller, on `tenant_suspect`).
    pub const QUARANTINE: u8 = 4;
    /// Made on another host of the fleet and installed here (the
    /// controller, from etcd).
    pub const FLEET: u8 = 5;
    pub const COUNT: usize = 6;
}

/// `SourceSlot::info`: strikes, ban origin, flags and last activity.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotInfo {
    pub strikes: u16,
    pub origin: u8,
    /// [`slot_flag`] bits.
    pub flags: u8,
    /// Seconds of ktime of the last SYN, for eviction.
    pub last_seen_s: u32,
}

/// Bits of [`SlotInfo::flags`].
pub mod slot_flag {
    /// The last SYN was rate limited: the next limited SYN is no new trip.
    pub const LIMITED: u8 = 1 << 0;
}

impl SlotInfo {
    #[inline(always)]
    pub const fn unpack(word: u64) -> Self {
        Self {
            strikes: (word >> 48) as u16,
            origin: (word >> 40) as u8,
            flags: (word >> 32) as u8,
            last_seen_s: word as u32,
        }
    }

    #[inline(always)]
    pub const fn pack(self) -> u64 {
        ((self.strikes as u64) << 48)
            | ((self.origin as u64) << 40)
            | ((self.flags as u64) << 32)
            | self.last_seen_s as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gcra_allows_burst_then_rate() {
        let interval = 1_000_000_000;
        let tolerance = 2 * interval; // burst 3
        let mut tat = 0;
        let now = 10_000_000_000;
        let mut accepted = 0;
        for _ in 0..5 {
            if let Admit::Accept(t) = gcra_admit(tat, now, interval, tolerance) {
                tat = t;
                accepted += 1;
            }
        }
        assert_eq!(accepted, 3);
        assert_eq!(gcra_admit(tat, now + interval, interval, tolerance), Admit::Accept(tat + interval));
    }

    #[test]
    fn window_estimate_slides() {
        let mut w = Window::default();
        for _ in 0..90 {
            w = w.record(1000);
        }
        assert_eq!(w.estimate(1000), 90);
        // Half a window later, half of the previous 90 still counts.
        let w2 = w.record(1090);
        assert_eq!(w2.previous, 90);
        assert_eq!(w2.estimate(1090), 1 + 45);
        // Two windows later nothing old remains.
        assert_eq!(w.record(1200).estimate(1200), 1);
        assert_eq!(Window::unpack(w2.pack()), w2);
    }

    #[test]
    fn bans_escalate_to_cap() {
        assert_eq!(ban_duration_s(1, 900, 2, 3600), 900);
        assert_eq!(ban_duration_s(2, 900, 2, 3600), 1800);
        assert_eq!(ban_duration_s(3, 900, 2, 3600), 3600);
        assert_eq!(ban_duration_s(9, 900, 2, 3600), 3600);
        assert_eq!(ban_duration_s(5, 900, 1, 0), 900);
    }

    #[test]
    fn claims_rank_free_then_idle_then_bans_and_say_what_they_evicted() {
        use crate::claim_kind::*;
        let now = 1_000 * NS_PER_S;
        let seen = |s: u32| SlotInfo { last_seen_s: s, ..SlotInfo::default() }.pack();
        let manual = SlotInfo { origin: ban_origin::MANUAL, ..SlotInfo::default() }.pack();
        let free = eviction_score(0, 0, 0, now);
        let idle = eviction_score(7, 0, seen(500), now);
        let recent = eviction_score(7, 0, seen(999), now);
        let ban = eviction_score(7, now + 10 * NS_PER_S, seen(999), now);
        let longer_ban = eviction_score(7, now + 20 * NS_PER_S, seen(999), now);
        let manual_ban = eviction_score(7, now + NS_PER_S, manual, now);
        assert!(free < idle && idle < recent && recent < ban && ban < longer_ban && longer_ban < manual_ban);
        assert_eq!(claim_kind_of(0, 0, 0, 0, now), FREE);
        assert_eq!(claim_kind_of(7, 0, 0, seen(1_000 - STALE_AFTER_S), now), STALE);
        assert_eq!(claim_kind_of(7, 0, 0, seen(1_001 - STALE_AFTER_S), now), LIVE);
        // Idle, but its bucket is still short of tokens.
        assert_eq!(claim_kind_of(7, now + 1, 0, seen(0), now), LIVE);
        // An expired ban is no ban.
        assert_eq!(claim_kind_of(7, 0, now, seen(0), now), STALE);
        assert_eq!(claim_kind_of(7, 0, now + 1, seen(0), now), BAN);
    }

    #[test]
    fn keys_of_families_differ_and_sets_stay_in_range() {
        assert_ne!(source_key_v4([0, 0, 0, 1]), source_key_v6([0; 16]));
        for k in [1u64, 2, u64::MAX, source_key_v4([192, 0, 2, 1])] {
            assert!(source_set(k, 1000) < 1000);
        }
    }
}

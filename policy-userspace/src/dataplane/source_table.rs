//! The datapath's source table (`SOURCES`), mapped: reads for metrics,
//! `bans` and `status`, and the manual bans of `smtpguard ban`/`unban`.
//!
//! The datapath updates single words of a set while userspace works on
//! it, so userspace never writes a set back whole: a manual ban or unban
//! touches only its own way, with the datapath's protocol
//! (`policy-ebpf/src/sources.rs`):
//!
//! - a claim of a way for a new source takes the key word with a
//!   compare-and-swap from the key it saw (so a way someone else took
//!   meanwhile is not taken), then resets the bucket, meter and info;
//! - `ban_until_ns` changes only by compare-and-swap, from the value seen;
//! - after the change the key is checked again; if the way changed hands
//!   meanwhile the change is taken back and the whole step retried. After
//!   a claim the check waits for an RCU grace period first, so a
//!   datapath claim of the same way that was in flight has finished.
//!
//! Reads are plain atomic loads of the mapped words, without locks or
//! syscalls, safe from any thread: a slot read while the datapath writes
//! it may mix words from before and after (a gauge can live with that).

use std::{os::fd::BorrowedFd, sync::atomic::Ordering};

use policy_common::source::{ban_origin, eviction_score, source_set, SlotInfo, SourceSet, SourceSlot, WAYS};

use super::{generations::rcu_grace_period, shared_words::SharedWords};

/// Words per slot: key, bucket TAT, meter, ban expiry, info.
const SLOT_WORDS: usize = size_of::<SourceSlot>() / 8;
const KEY: usize = 0;
const TAT: usize = 1;
const WINDOW: usize = 2;
const BAN_UNTIL: usize = 3;
const INFO: usize = 4;
const _: () = assert!(SLOT_WORDS == 5 && size_of::<SourceSet>() == WAYS * SLOT_WORDS * 8);
/// Attempts of a ban or unban whose way keeps changing hands.
const TRIES: usize = 8;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("the source's way in SOURCES kept changing hands ({TRIES} tries): the set is flooded; try again")]
pub struct Contended;

/// What the table holds now, counted in one pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceSnapshot {
    /// Ways holding a source.
    pub tracked: u64,
    /// Sources banned now, by `ban_origin` (index 0, `NONE`, stays 0).
    pub banned: [u64; ban_origin::COUNT],
    /// Ways in the table.
    pub capacity: u64,
}

/// How a manual ban found its way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BanWay {
    /// The source was tracked already.
    Tracked,
    /// It took a way, evicting whatever the way held (by the datapath's
    /// ranking: a free way, else the idlest unbanned source, else the ban
    /// that ends first).
    Claimed,
}

/// A ban made elsewhere, to install: see [`SourceTable::install`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Install {
    pub key: u64,
    pub until_ns: u64,
    /// The source's strikes fleet-wide: its next ban here escalates from them.
    pub strikes: u16,
}

#[derive(Clone, Copy)]
enum Strikes {
    OneMore,
    AtLeast(u16),
}

pub struct SourceTable {
    words: SharedWords,
    sets: u32,
}

impl SourceTable {
    /// Maps the `SOURCES` array behind `fd`, `sets` sets long (the map's
    /// max_entries; it must be mmapable).
    pub fn open(fd: BorrowedFd<'_>, sets: u32) -> std::io::Result<Self> {
        Ok(Self { words: SharedWords::new(fd, sets as usize * WAYS * SLOT_WORDS)?, sets })
    }

    pub fn sets(&self) -> u32 {
        self.sets
    }

    fn word(&self, set: u32, way: usize, field: usize) -> &std::sync::atomic::AtomicU64 {
        self.words.word((set as usize * WAYS + way) * SLOT_WORDS + field)
    }

    fn slot(&self, set: u32, way: usize) -> SourceSlot {
        let w = |f| self.word(set, way, f).load(Ordering::Acquire);
        SourceSlot { key: w(KEY), admit_tat_ns: w(TAT), window: w(WINDOW), ban_until_ns: w(BAN_UNTIL), info: w(INFO) }
    }

    /// Set `index`, word by word.
    pub fn read_set(&self, index: u32) -> SourceSet {
        SourceSet { slots: std::array::from_fn(|way| self.slot(index, way)) }
    }

    /// Overwrites set `index` whole, word by word, key last. For tests and
    /// seeding only: beside traffic it would undo the datapath's updates.
    pub fn write_set(&self, index: u32, set: &SourceSet) {
        for (way, s) in set.slots.iter().enumerate() {
            for (field, v) in [(TAT, s.admit_tat_ns), (WINDOW, s.window), (BAN_UNTIL, s.ban_until_ns), (INFO, s.info), (KEY, s.key)] {
                self.word(index, way, field).store(v, Ordering::Release);
            }
        }
    }

    /// Every tracked slot.
    pub fn slots(&self) -> Vec<SourceSlot> {
        let mut out = Vec::new();
        for set in 0..self.sets {
            for way in 0..WAYS {
                if self.word(set, way, KEY).load(Ordering::Relaxed) != 0 {
                    out.push(self.slot(set, way));
                }
            }
        }
        out
    }

    /// Tracked sources and bans in force at `now_ns`, counted in one pass
    /// over the keys (ban words only of tracked ways), allocating nothing.
    pub fn snapshot(&self, now_ns: u64) -> SourceSnapshot {
        let mut s = SourceSnapshot { capacity: self.sets as u64 * WAYS as u64, ..SourceSnapshot::default() };
        for set in 0..self.sets {
            for way in 0..WAYS {
                if self.word(set, way, KEY).load(Ordering::Relaxed) == 0 {
                    continue;
                }
                s.tracked += 1;
                if self.word(set, way, BAN_UNTIL).load(Ordering::Relaxed) > now_ns {
                    let origin = SlotInfo::unpack(self.word(set, way, INFO).load(Ordering::Relaxed)).origin;
                    s.banned[origin as usize % ban_origin::COUNT] += 1;
                }
            }
        }
        s
    }

    /// When the source `key`'s ban ends, if it is banned at `now_ns`.
    pub fn banned_until(&self, key: u64, now_ns: u64) -> Option<u64> {
        let set = source_set(key, self.sets);
        let way = self.find(set, key)?;
        Some(self.word(set, way, BAN_UNTIL).load(Ordering::Acquire)).filter(|u| *u > now_ns)
    }

    /// The bans in force at `now_ns`: (key, until, info), reading only
    /// the ban word of ways not banned (the fleet's scan, every second).
    pub fn bans_in_force(&self, now_ns: u64) -> Vec<(u64, u64, SlotInfo)> {
        let mut out = Vec::new();
        for set in 0..self.sets {
            for way in 0..WAYS {
                let until = self.word(set, way, BAN_UNTIL).load(Ordering::Relaxed);
                if until <= now_ns {
                    continue;
                }
                let key = self.word(set, way, KEY).load(Ordering::Acquire);
                if key != 0 {
                    out.push((key, until, SlotInfo::unpack(self.word(set, way, INFO).load(Ordering::Relaxed))));
                }
            }
        }
        out
    }

    fn find(&self, set: u32, key: u64) -> Option<usize> {
        (0..WAYS).find(|&way| self.word(set, way, KEY).load(Ordering::Acquire) == key)
    }

    /// The way a new source takes, by the datapath's ranking.
    fn victim(&self, set: u32, now_ns: u64) -> usize {
        let score = |way| {
            let w = |f| self.word(set, way, f).load(Ordering::Acquire);
            eviction_score(w(KEY), w(BAN_UNTIL), w(INFO), now_ns)
        };
        (0..WAYS).min_by_key(|&way| (score(way), way)).unwrap_or(0)
    }

    /// Bans the source `key` until `until_ns` (a ban made in userspace:
    /// `origin` manual or quarantine, one more strike), taking a way for it
    /// if it has none. `now_ns` is the datapath's clock.
    pub fn ban(&self, key: u64, until_ns: u64, origin: u8, now_ns: impl Fn() -> u64) -> Result<BanWay, Contended> {
        self.ban_with(key, until_ns, origin, Strikes::OneMore, &now_ns)
    }

    fn ban_with(&self, key: u64, until_ns: u64, origin: u8, strikes: Strikes, now_ns: &impl Fn() -> u64) -> Result<BanWay, Contended> {
        let set = source_set(key, self.sets);
        for _ in 0..TRIES {
            let now = now_ns();
            let now_s = (now / 1_000_000_000) as u32;
            let (way, how) = match self.find(set, key) {
                Some(way) => (way, BanWay::Tracked),
                None => {
                    let way = self.victim(set, now);
                    let seen = self.word(set, way, KEY).load(Ordering::Acquire);
                    if self.word(set, way, KEY).compare_exchange(seen, key, Ordering::AcqRel, Ordering::Acquire).is_err() {
                        continue;
                    }
                    self.word(set, way, TAT).store(0, Ordering::Release);
                    self.word(set, way, WINDOW).store(0, Ordering::Release);
                    self.word(set, way, INFO).store(SlotInfo { last_seen_s: now_s, ..SlotInfo::default() }.pack(), Ordering::Release);
                    (way, BanWay::Claimed)
                }
            };
            let ban = self.word(set, way, BAN_UNTIL);
            ban.swap(until_ns, Ordering::AcqRel);
            let _ = self.word(set, way, INFO).fetch_update(Ordering::AcqRel, Ordering::Acquire, |old| {
                let info = SlotInfo::unpack(old);
                let strikes = match strikes {
                    Strikes::OneMore => info.strikes.saturating_add(1),
                    Strikes::AtLeast(n) => info.strikes.max(n),
                };
                Some(SlotInfo { strikes, origin, flags: info.flags, last_seen_s: now_s }.pack())
            });
            if how == BanWay::Claimed {
                // A datapath claim of this way that began before ours ends
                // within a grace period; after it the key says who owns it.
                rcu_grace_period();
            }
            if self.word(set, way, KEY).load(Ordering::Acquire) == key {
                return Ok(how);
            }
            // The way changed hands: the ban is not ours to leave there.
            let _ = ban.compare_exchange(until_ns, 0, Ordering::AcqRel, Ordering::Acquire);
        }
        Err(Contended)
    }

    /// Installs bans made elsewhere (the fleet's: `origin` fleet), many at
    /// once: each source is banned until at least its `until_ns` (a longer
    /// ban in force stands) with at least its strikes, `origin` where this
    /// ban is the one in force. The ways claimed share one RCU grace
    /// period, so a batch of 10,000 costs one, not 10,000. Returns how
    /// many of `bans` are in force afterwards.
    pub fn install(&self, bans: &[Install], origin: u8, now_ns: impl Fn() -> u64) -> usize {
        let mut claimed = Vec::new();
        let mut installed = 0;
        for b in bans {
            match self.install_one(b, origin, now_ns()) {
                Some((way, BanWay::Claimed)) => claimed.push((b, way)),
                Some(_) => installed += 1,
                None => {}
            }
        }
        if claimed.is_empty() {
            return installed;
        }
        rcu_grace_period();
        for (b, way) in claimed {
            let set = source_set(b.key, self.sets);
            if self.word(set, way, KEY).load(Ordering::Acquire) == b.key {
                installed += 1;
                continue;
            }
            // The way changed hands under the claim: take the ban back and
            // go the careful way, one grace period per try.
            let _ = self.word(set, way, BAN_UNTIL).compare_exchange(b.until_ns, 0, Ordering::AcqRel, Ordering::Acquire);
            if self.ban_with(b.key, b.until_ns, origin, Strikes::AtLeast(b.strikes), &now_ns).is_ok() {
                installed += 1;
            }
        }
        installed
    }

    /// One install without waiting for a grace period: the way and how it
    /// was found, or `None` when the set kept changing.
    fn install_one(&self, b: &Install, origin: u8, now: u64) -> Option<(usize, BanWay)> {
        let set = source_set(b.key, self.sets);
        let now_s = (now / 1_000_000_000) as u32;
        for _ in 0..TRIES {
            let (way, how) = match self.find(set, b.key) {
                Some(way) => (way, BanWay::Tracked),
                None => {
                    let way = self.victim(set, now);
                    let seen = self.word(set, way, KEY).load(Ordering::Acquire);
                    if self.word(set, way, KEY).compare_exchange(seen, b.key, Ordering::AcqRel, Ordering::Acquire).is_err() {
                        continue;
                    }
                    self.word(set, way, TAT).store(0, Ordering::Release);
                    self.word(set, way, WINDOW).store(0, Ordering::Release);
                    self.word(set, way, BAN_UNTIL).store(0, Ordering::Release);
                    self.word(set, way, INFO).store(SlotInfo { last_seen_s: now_s, ..SlotInfo::default() }.pack(), Ordering::Release);
                    (way, BanWay::Claimed)
                }
            };
            let ban = self.word(set, way, BAN_UNTIL);
            let before = ban.fetch_max(b.until_ns, Ordering::AcqRel);
            let ours = before < b.until_ns;
            let _ = self.word(set, way, INFO).fetch_update(Ordering::AcqRel, Ordering::Acquire, |old| {
                let info = SlotInfo::unpack(old);
                let origin = if ours { origin } else { info.origin };
                Some(SlotInfo { strikes: info.strikes.max(b.strikes), origin, ..info }.pack())
            });
            if how == BanWay::Tracked && self.word(set, way, KEY).load(Ordering::Acquire) != b.key {
                if ours {
                    let _ = ban.compare_exchange(b.until_ns, before, Ordering::AcqRel, Ordering::Acquire);
                }
                continue;
            }
            return Some((way, how));
        }
        None
    }

    /// Lifts the ban of the source `key`; false when it is not banned at
    /// `now_ns` (the datapath's clock).
    pub fn unban(&self, key: u64, now_ns: impl Fn() -> u64) -> Result<bool, Contended> {
        self.unban_ending_by(key, u64::MAX, now_ns)
    }

    /// Lifts the ban of the source `key` if it ends by `until_ns` (a ban
    /// lifted elsewhere: a longer one made here since stands).
    pub fn unban_ending_by(&self, key: u64, until_ns: u64, now_ns: impl Fn() -> u64) -> Result<bool, Contended> {
        let set = source_set(key, self.sets);
        for _ in 0..TRIES {
            let Some(way) = self.find(set, key) else { return Ok(false) };
            let ban = self.word(set, way, BAN_UNTIL);
            let until = ban.load(Ordering::Acquire);
            if until <= now_ns() || until > until_ns {
                return Ok(false);
            }
            if ban.compare_exchange(until, 0, Ordering::AcqRel, Ordering::Acquire).is_err() {
                continue;
            }
            if self.word(set, way, KEY).load(Ordering::Acquire) == key {
                return Ok(true);
            }
            // Someone else's ban, by the same value, in a way that changed hands: give it back.
            let _ = ban.compare_exchange(0, until, Ordering::AcqRel, Ordering::Acquire);
        }
        Err(Contended)
    }
}

const _: () = {
    const fn shareable<T: Send + Sync>() {}
    shareable::<SourceTable>();
};

#[cfg(test)]
mod tests {
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};

    use policy_common::source::source_key_v4;

    use super::*;

    const S: u64 = 1_000_000_000;

    /// A table of `sets` sets in a memfd: the same mapping code, no kernel map.
    fn table(sets: u32) -> (OwnedFd, SourceTable) {
        // SAFETY: memfd_create with a valid name; the fd is ours.
        let fd = unsafe { OwnedFd::from_raw_fd(libc::memfd_create(c"sources".as_ptr(), 0)) };
        let len = (sets as usize * size_of::<SourceSet>()).next_multiple_of(4096);
        // SAFETY: sizing the memfd we own.
        assert_eq!(unsafe { libc::ftruncate(std::os::fd::AsRawFd::as_raw_fd(&fd), len as i64) }, 0);
        let t = SourceTable::open(fd.as_fd(), sets).unwrap();
        (fd, t)
    }

    fn key(n: u8) -> u64 {
        source_key_v4([198, 51, 100, n])
    }

    #[test]
    fn a_manual_ban_takes_the_way_the_datapath_would_and_writes_only_it() {
        let (_fd, t) = table(1);
        let now = 1_000 * S;
        // Seven busy ways: five auto-banned, two unbanned, the idlest at way 4.
        let mut set = SourceSet::default();
        for (way, slot) in set.slots.iter_mut().enumerate().take(7) {
            let banned = way < 4 || way == 6;
            *slot = SourceSlot {
                key: key(way as u8 + 1),
                admit_tat_ns: 7,
                window: 9,
                ban_until_ns: if banned { now + 600 * S } else { 0 },
                info: SlotInfo { strikes: 1, origin: if banned { ban_origin::AUTO } else { 0 }, flags: 0, last_seen_s: 900 + way as u32 }.pack(),
            };
        }
        t.write_set(0, &set);
        // A free way first.
        assert_eq!(t.ban(key(100), now + 3600 * S, ban_origin::MANUAL, || now), Ok(BanWay::Claimed));
        let after = t.read_set(0);
        assert_eq!(after.slots[7].key, key(100));
        assert_eq!(after.slots[7].ban_until_ns, now + 3600 * S);
        assert_eq!(SlotInfo::unpack(after.slots[7].info), SlotInfo { strikes: 1, origin: ban_origin::MANUAL, flags: 0, last_seen_s: 1_000 });
        assert_eq!(&after.slots[..7], &set.slots[..7], "the other ways are untouched");
        // Then the idlest unbanned source (way 4), never a ban.
        assert_eq!(t.ban(key(101), now + 3600 * S, ban_origin::MANUAL, || now), Ok(BanWay::Claimed));
        let after = t.read_set(0);
        assert_eq!(after.slots[4].key, key(101));
        assert_eq!((after.slots[4].admit_tat_ns, after.slots[4].window), (0, 0), "a claimed way starts afresh");
        // A tracked source (key 6, way 5) keeps its way, one more strike.
        assert_eq!(t.ban(key(6), now + 60 * S, ban_origin::MANUAL, || now), Ok(BanWay::Tracked));
        let way5 = t.read_set(0).slots[5];
        assert_eq!((way5.key, way5.ban_until_ns, SlotInfo::unpack(way5.info).strikes), (key(6), now + 60 * S, 2));
        assert_eq!((way5.admit_tat_ns, way5.window), (7, 9), "a tracked source keeps its bucket and meter");

        let snap = t.snapshot(now);
        assert_eq!((snap.tracked, snap.capacity), (8, 8));
        assert_eq!((snap.banned[ban_origin::AUTO as usize], snap.banned[ban_origin::MANUAL as usize]), (5, 3));
    }

    #[test]
    fn fleet_installs_keep_the_longer_ban_and_the_higher_strikes() {
        let (_fd, t) = table(64);
        let now = 100 * S;
        // A source banned here for longer, with 3 strikes; one unknown here.
        t.ban(key(1), now + 900 * S, ban_origin::MANUAL, || now).unwrap();
        t.ban(key(1), now + 900 * S, ban_origin::MANUAL, || now).unwrap();
        t.ban(key(1), now + 900 * S, ban_origin::MANUAL, || now).unwrap();
        let bans = [Install { key: key(1), until_ns: now + 60 * S, strikes: 1 }, Install { key: key(2), until_ns: now + 60 * S, strikes: 2 }];
        assert_eq!(t.install(&bans, ban_origin::FLEET, || now), 2);
        let slot = |k| t.slots().into_iter().find(|s| s.key == k).unwrap();
        let (a, b) = (slot(key(1)), slot(key(2)));
        assert_eq!((a.ban_until_ns, SlotInfo::unpack(a.info).strikes, SlotInfo::unpack(a.info).origin), (now + 900 * S, 3, ban_origin::MANUAL), "the local ban stands");
        assert_eq!((b.ban_until_ns, SlotInfo::unpack(b.info).strikes, SlotInfo::unpack(b.info).origin), (now + 60 * S, 2, ban_origin::FLEET));
        // A longer fleet ban of the first takes over, strikes kept.
        assert_eq!(t.install(&[Install { key: key(1), until_ns: now + 3600 * S, strikes: 1 }], ban_origin::FLEET, || now), 1);
        let a = slot(key(1));
        assert_eq!((a.ban_until_ns, SlotInfo::unpack(a.info).strikes, SlotInfo::unpack(a.info).origin), (now + 3600 * S, 3, ban_origin::FLEET));
    }

    #[test]
    fn unban_clears_only_a_ban_in_force() {
        let (_fd, t) = table(4);
        let now = 50 * S;
        assert_eq!(t.unban(key(1), || now), Ok(false), "untracked");
        t.ban(key(1), now + 10 * S, ban_origin::MANUAL, || now).unwrap();
        assert_eq!(t.unban(key(1), || now + 11 * S), Ok(false), "already over");
        assert_eq!(t.unban(key(1), || now), Ok(true));
        assert_eq!(t.unban(key(1), || now), Ok(false), "lifted once");
        let slot = t.slots().into_iter().find(|s| s.key == key(1)).unwrap();
        assert_eq!(slot.ban_until_ns, 0);
        assert_eq!(t.snapshot(now).banned, [0; ban_origin::COUNT]);
    }
}

//! Types shared by the smtpguard datapath (`policy-ebpf`) and the controller.
//!
//! Everything here crosses the kernel boundary, so every map key and value is
//! `#[repr(C)]`, holds only integers and byte arrays (no `bool`, `Option` or
//! enums with data), has explicit padding, and has its size pinned by a
//! `const` assertion. Enumerations are `u8` constants in small modules so that
//! either side can store them in a map without a transmute.
#![no_std]

pub mod acl4;
pub mod maps;
pub mod smtp_flow;
pub mod smtp_scan;
pub mod source;
pub mod tenant;
pub mod trace;

pub use maps::*;

/// Guarded-port slots per direction. The profiles operators guard are 25,
/// 465, 587 and 2525; a slot per profile keeps ACL values small.
pub const MAX_PORTS: usize = 4;
/// Index used in counters for packets whose port is unknown (fragments,
/// malformed headers).
pub const PORT_SLOT_UNKNOWN: usize = MAX_PORTS;
/// Port slots in the counter index: the guarded ports plus "unknown".
pub const PORT_SLOTS: usize = MAX_PORTS + 1;
/// Marks an unused entry in [`DirectionPolicy::ports`].
pub const PORT_UNUSED: u32 = u32::MAX;
/// Country indices: 0 is "no country", the rest index the compiled code table.
pub const MAX_COUNTRIES: usize = 256;
/// Upper bound on IPv6 extension headers walked before a packet is malformed.
pub const MAX_IPV6_EXT_HEADERS: usize = 6;
/// VLAN tags parsed (802.1Q and 802.1ad, so Q-in-Q).
pub const MAX_VLAN_TAGS: usize = 2;
/// Repeat-offender escalation steps honoured by the datapath.
pub const MAX_BAN_STRIKES: u32 = 16;
/// Length of the ban meter's sliding window.
pub const BAN_WINDOW_S: u32 = 60;

/// Which policy judges a packet.
pub mod direction {
    /// Mail arriving at servers behind this host.
    pub const INGRESS: u8 = 0;
    /// Tenants connecting out to remote servers.
    pub const EGRESS: u8 = 1;
    pub const COUNT: usize = 2;
    pub const NAMES: [&str; COUNT] = ["ingress", "egress"];
}

/// The attach points; each judges by the direction set in [`Runtime`].
pub mod hook {
    pub const XDP_INGRESS: usize = 0;
    pub const TC_INGRESS: usize = 1;
    pub const TC_EGRESS: usize = 2;
    pub const COUNT: usize = 3;
}

/// What happened to a packet.
pub mod verdict {
    pub const PASS: u8 = 0;
    pub const DROP: u8 = 1;
    /// Monitor mode: the packet passed, enforcement would have dropped it.
    pub const WOULD_DROP: u8 = 2;
    pub const COUNT: usize = 3;
    pub const NAMES: [&str; COUNT] = ["pass", "drop", "would_drop"];
}

/// Why a counted packet got its verdict. Non-SMTP traffic (not IP, not TCP,
/// unguarded port) leaves before any counter and has no reason.
pub mod reason {
    /// Non-first IP fragment: no ports to judge.
    pub const FRAGMENT: u8 = 0;
    /// Truncated or invalid header where the packet may be guarded.
    pub const MALFORMED: u8 = 1;
    pub const ALLOW_ACL: u8 = 2;
    pub const BANNED: u8 = 3;
    pub const DENY_ACL: u8 = 4;
    pub const GEO: u8 = 5;
    /// A SYN found no token in its source's bucket.
    pub const RATE_LIMITED: u8 = 6;
    /// A SYN pushed its source over the ban threshold; the source is now banned.
    pub const RATE_BAN: u8 = 7;
    /// A command line of the segment, or one completed across segments,
    /// is a blocked SMTP command (VRFY, EXPN).
    pub const SMTP_COMMAND: u8 = 8;
    pub const DEFAULT_ALLOW: u8 = 9;
    pub const DEFAULT_DENY: u8 = 10;
    /// A payload segment of a command-filtered flow that starts past the
    /// bytes seen so far: a command could span the gap, so it waits for
    /// the retransmission that fills it (see [`crate::smtp_flow`]).
    pub const SMTP_OUT_OF_ORDER: u8 = 11;
    pub const COUNT: usize = 12;
    pub const NAMES: [&str; COUNT] = [
        "fragment",
        "malformed",
        "allow_acl",
        "banned",
        "deny_acl",
        "geo",
        "rate_limited",
        "rate_ban",
        "smtp_command",
        "default_allow",
        "default_deny",
        "smtp_out_of_order",
    ];
}

/// Drop reasons that deny a connection by policy (who, where from, which
/// way), as opposed to one packet's content or shape: a dropped segment of
/// an open connection for these gets a reset where the policy asks for
/// one. Not the rate limit and bans it starts (SYNs only), nor the command
/// filter (a tarpit: the prober waits), nor fragments and malformed frames.
#[inline(always)]
pub const fn reset_worthy(why: u8) -> bool {
    matches!(why, reason::BANNED | reason::DENY_ACL | reason::GEO | reason::DEFAULT_DENY)
}

/// Enforcement mode of a direction.
pub mod mode {
    pub const ENFORCE: u8 = 0;
    pub const MONITOR: u8 = 1;
}

/// What is spoken on a guarded port; only plaintext SMTP gets the command filter.
pub mod profile {
    pub const SMTP: u8 = 0;
    pub const SMTPS: u8 = 1;
    pub const SUBMISSION: u8 = 2;
    pub const OTHER: u8 = 3;
}

/// Bits of [`DirectionPolicy::smtp_block`].
pub mod smtp_command {
    pub const VRFY: u8 = 1 << 0;
    pub const EXPN: u8 = 1 << 1;
}

/// Bits of [`DirectionPolicy::acl_sides`]: which trie scopes hold entries.
pub mod side {
    pub const PEER: u8 = 0;
    pub const LOCAL: u8 = 1;
    pub const PEER_BIT: u8 = 1 << PEER;
    pub const LOCAL_BIT: u8 = 1 << LOCAL;
}

/// Index of the (direction, verdict, reason, port slot) counter in `STATS`.
#[inline(always)]
pub const fn stats_index(direction: u8, verdict: u8, reason: u8, port_slot: usize) -> u32 {
    ((((direction as usize * verdict::COUNT + verdict as usize) * reason::COUNT + reason as usize)
        * PORT_SLOTS)
        + port_slot) as u32
}

/// Cells of `STATS` indexed by [`stats_index`].
pub const STATS_VERDICT_CELLS: u32 =
    (direction::COUNT * verdict::COUNT * reason::COUNT * PORT_SLOTS) as u32;

/// What a verdict cell of `STATS` counts: [`stats_index`] read backwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatsCell {
    pub direction: u8,
    pub verdict: u8,
    pub reason: u8,
    pub port_slot: usize,
    pub index: u32,
}

impl StatsCell {
    /// The cell at `index` (< [`STATS_VERDICT_CELLS`]).
    pub const fn of(index: u32) -> Self {
        let i = index as usize;
        Self {
            port_slot: i % PORT_SLOTS,
            reason: ((i / PORT_SLOTS) % reason::COUNT) as u8,
            verdict: ((i / PORT_SLOTS / reason::COUNT) % verdict::COUNT) as u8,
            direction: (i / PORT_SLOTS / reason::COUNT / verdict::COUNT) as u8,
            index,
        }
    }

    /// Every verdict cell, in index order.
    pub fn all() -> impl Iterator<Item = Self> {
        (0..STATS_VERDICT_CELLS).map(Self::of)
    }
}
/// The `STATS` cell (packets only) counting events lost to a full ring buffer.
pub const STATS_EVENTS_LOST: u32 = STATS_VERDICT_CELLS;
/// `STATS` cells (packets only) counting bans started, by origin: automatic
/// and escalated (datapath), manual (`smtpguard ban`).
pub const STATS_BANS_AUTO: u32 = STATS_VERDICT_CELLS + 1;
pub const STATS_BANS_ESCALATED: u32 = STATS_VERDICT_CELLS + 2;
pub const STATS_BANS_MANUAL: u32 = STATS_VERDICT_CELLS + 3;
/// First of the `STATS` cells (packets only) counting the datapath's
/// claims of a way in `SOURCES` for a new source, one per [`claim_kind`]:
/// cell `STATS_CLAIMS + kind`. Their sum is every new source tracked; all
/// but `FREE` are evictions.
pub const STATS_CLAIMS: u32 = STATS_VERDICT_CELLS + 4;
/// `STATS` cell: payload segments of command-filtered flows longer than
/// [`smtp_scan::SCAN_BYTES`]; their bytes beyond were not scanned.
pub const STATS_SCAN_TRUNCATED: u32 = STATS_CLAIMS + claim_kind::COUNT as u32;
/// `STATS` cell: payload segments of command-filtered flows that found no
/// entry in `SMTP_FLOWS`: one per client flow, plus one per flow whose
/// entry was evicted (then scanned as if it started a line).
pub const STATS_SMTP_FLOW_MISSES: u32 = STATS_SCAN_TRUNCATED + 1;
/// `STATS` cells, one per direction: TCP resets sent for dropped
/// segments of open connections (`DirectionPolicy::established_reset`).
pub const STATS_RESETS: u32 = STATS_SMTP_FLOW_MISSES + 1;
/// Entries of the `STATS` per-CPU array.
pub const STATS_ENTRIES: u32 = STATS_RESETS + direction::COUNT as u32;

/// The generations a shadow policy (`smtpguard run --shadow`) is kept in,
/// side by side for its own atomic reloads: entries 2 and 3 of `POLICY`,
/// and its ACL (both families) in the `ACL_V6` trie only, IPv4 as
/// IPv4-mapped addresses, so a host without a shadow spends no memory on it.
pub const SHADOW_GENERATIONS: [u32; 2] = [2, 3];
/// Set in the scope byte of a shadow generation's IPv4 entries: IPv4 and
/// IPv6 rules then never cover each other (an IPv6 `::/0` would cover
/// every mapped IPv4 address, and an IPv4 rule an IPv6 packet's
/// `::ffff:a.b.c.d`, which the enforced policy's separate IPv4 arrays and
/// IPv6 trie never do).
pub const SHADOW_V4_SCOPE: u8 = 0x80;
/// Entries of `POLICY`: the enforced generations, then the shadow's.
pub const POLICY_ENTRIES: u32 = GENERATIONS + 2;

/// Where the shadow's judgement differed from the enforced policy's: a
/// key of `SHADOW_DIFFS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ShadowKey {
    pub direction: u8,
    pub port_slot: u8,
    /// The enforced policy's [`verdict`] (before monitor mode) and [`reason`].
    pub verdict: u8,
    pub reason: u8,
    /// The candidate's; [`reason::COUNT`] as `shadow_reason` means the
    /// candidate does not guard the port.
    pub shadow_verdict: u8,
    pub shadow_reason: u8,
    pub _pad: [u8; 2],
    /// The candidate's deciding rule id (of its generation), 0 if none.
    pub shadow_rule: u32,
}
const _: () = assert!(core::mem::size_of::<ShadowKey>() == 12);

/// A source a shadow difference was about: a key of `SHADOW_SOURCES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ShadowSource {
    /// Network-order words; IPv4 in the first.
    pub addr: [u32; 4],
    pub family: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<ShadowSource>() == 20);

/// Cells of `SHADOW_TOTALS`.
pub mod shadow_total {
    /// Packets the shadow judged, by direction (cells 0, 1).
    pub const JUDGED: u32 = 0;
    /// Differences not counted by key: `SHADOW_DIFFS` was full.
    pub const UNKEYED: u32 = 2;
    pub const COUNT: u32 = 3;
}

/// Rule ids counted one by one in `RULE_HITS`, per generation; hits of
/// higher ids (a policy of more rule ids: `check` warns) share cell 0.
pub const RULE_SLOTS: u32 = 8192;
/// Cells of `RULE_HITS`.
pub const RULE_HITS_ENTRIES: u32 = GENERATIONS * RULE_SLOTS;

/// Index of rule `rule`'s hit counter of `generation` in `RULE_HITS`.
#[inline(always)]
pub const fn rule_hits_index(generation: u32, rule: u32) -> u32 {
    let cell = if rule < RULE_SLOTS { rule } else { 0 };
    (generation & 1) * RULE_SLOTS + cell
}

/// What the way a new source takes in its `SOURCES` set held before:
/// how full the table is under churn. See [`source::claim_kind_of`].
pub mod claim_kind {
    /// An empty way: no eviction.
    pub const FREE: u8 = 0;
    /// An unbanned source idle long enough that forgetting it changes
    /// nothing: no SYN for [`crate::source::STALE_AFTER_S`] and a full
    /// bucket.
    pub const STALE: u8 = 1;
    /// An unbanned source still active: its bucket or ban meter is lost.
    /// Steady numbers of these mean the table is too small for the churn.
    pub const LIVE: u8 = 2;
    /// A banned source (every way of the set was banned): the ban is lost.
    pub const BAN: u8 = 3;
    pub const COUNT: usize = 4;
    pub const NAMES: [&str; COUNT] = ["free", "stale", "live", "ban"];
}

/// Index of a (direction, verdict, country) drop counter in `GEO_DROPS`;
/// `verdict` is [`verdict::DROP`] or [`verdict::WOULD_DROP`] (other values
/// count as drops).
#[inline(always)]
pub const fn geo_index(direction: u8, verdict: u8, country: u32) -> u32 {
    let monitor = (verdict == verdict::WOULD_DROP) as u32;
    (direction as u32 * 2 + monitor) * MAX_COUNTRIES as u32 + country
}

pub const GEO_DROPS_ENTRIES: u32 = (direction::COUNT * 2 * MAX_COUNTRIES) as u32;

/// Settings of the loaded datapath that are not part of a policy generation.
///
/// `RUNTIME` is a `BPF_F_MMAPABLE` array: userspace maps it and stores
/// whole 8-byte words ([`runtime_word`]) with atomic stores, never the
/// whole value, and each word has exactly one writer, so no writer can
/// undo another's update with a stale copy. (A read-modify-write of the
/// whole value through `bpf_map_update_elem` did: a network ban racing a
/// reload cleared the ban flag, or put back the generation the reload had
/// flipped away from.) The datapath only reads, each field by one atomic
/// load of its word. Fields sit in words by writer:
///
/// | word | fields | writer |
/// |---|---|---|
/// | 0 | `active`, `source_sets` | controller: `activate` flips `active` (a reload); `source_sets` once, when it creates the maps |
/// | 1 | `drop_sample_one_in`, `events_per_second` | controller: `activate` |
/// | 2 | `hook_direction`; byte 3: `shadow` | controller, when it creates the maps (tests: per case); `shadow` when it installs or removes a shadow policy |
/// | 3 | `cidr_bans` | `smtpguard ban`/`unban` of networks only, under a lock on the pin directory |
/// | 4..8 | `port_filter` | controller: `install` widens it, after the grace period narrows it |
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Runtime {
    /// Index (0 or 1) of the policy generation packets are judged by. The
    /// controller fills the other generation, then flips this one word.
    pub active: u32,
    /// Sets in `SOURCES`, as the map was created.
    pub source_sets: u32,
    /// One drop in this many is offered to the event stream (0: none).
    pub drop_sample_one_in: u32,
    /// Cap on sampled-drop and rate-trip events per second and CPU.
    pub events_per_second: u32,
    /// Direction each hook judges by, indexed by [`hook`].
    pub hook_direction: [u8; hook::COUNT],
    /// The shadow policy's generation ([`SHADOW_GENERATIONS`]), 0 when
    /// none is loaded. In the hooks' word, which every guarded packet
    /// loads anyway: no shadow costs nothing.
    pub shadow: u8,
    pub _pad0: [u8; 4],
    /// Non-zero while `BAN_V4`/`BAN_V6` hold manual network bans, so an
    /// empty ban trie costs no lookup. A word of its own: its writer is
    /// not the controller.
    pub cidr_bans: u64,
    /// Bit `port & 255` is set for every port guarded by either direction
    /// of either generation: TCP to a port whose bit is clear leaves
    /// before any policy is read. A superset is always safe.
    pub port_filter: [u64; PORT_FILTER_WORDS],
}
const _: () = assert!(core::mem::size_of::<Runtime>() == 8 * runtime_word::COUNT);

pub const PORT_FILTER_WORDS: usize = 4;

/// The 8-byte words of [`Runtime`], each with one writer (see there).
/// Words hold their fields in memory order: on the little-endian targets
/// smtpguard runs on, the first field of a word is its low half.
pub mod runtime_word {
    /// `active` (low half), `source_sets` (high half).
    pub const GENERATION: usize = 0;
    /// `drop_sample_one_in` (low half), `events_per_second` (high half).
    pub const EVENTS: usize = 1;
    /// `hook_direction`: byte `hook` of the word; `shadow`: byte 3.
    pub const HOOKS: usize = 2;
    pub const CIDR_BANS: usize = 3;
    /// The first of the `port_filter` words.
    pub const PORT_FILTER: usize = 4;
    pub const COUNT: usize = 8;
}
const _: () = {
    use core::mem::offset_of;
    assert!(offset_of!(Runtime, active) == 8 * runtime_word::GENERATION);
    assert!(offset_of!(Runtime, source_sets) == 8 * runtime_word::GENERATION + 4);
    assert!(offset_of!(Runtime, drop_sample_one_in) == 8 * runtime_word::EVENTS);
    assert!(offset_of!(Runtime, events_per_second) == 8 * runtime_word::EVENTS + 4);
    assert!(offset_of!(Runtime, hook_direction) == 8 * runtime_word::HOOKS);
    assert!(offset_of!(Runtime, cidr_bans) == 8 * runtime_word::CIDR_BANS);
    assert!(offset_of!(Runtime, port_filter) == 8 * runtime_word::PORT_FILTER);
};
#[cfg(target_endian = "big")]
compile_error!("Runtime's words put their first field in the low half: little-endian only");

impl Runtime {
    /// May TCP to `port` be guarded? `false` is certain; `true` may not be.
    #[inline(always)]
    pub fn may_guard(&self, port: u16) -> bool {
        let (word, bit) = port_filter_bit(port);
        self.port_filter[word] & bit != 0
    }

    /// The value as its words, in order.
    pub fn words(&self) -> [u64; runtime_word::COUNT] {
        // SAFETY: both are 64 bytes of plain integers; Runtime has no padding
        // bytes the compiler owns (`_pad0` is a field) and u64 any bit pattern.
        unsafe { core::mem::transmute::<Self, [u64; runtime_word::COUNT]>(*self) }
    }

    /// The value whose words these are.
    pub fn from_words(words: [u64; runtime_word::COUNT]) -> Self {
        // SAFETY: as in `words`; every bit pattern is a valid Runtime.
        unsafe { core::mem::transmute::<[u64; runtime_word::COUNT], Self>(words) }
    }
}

/// The word of [`Runtime::port_filter`] holding `port`'s bit, and the bit.
#[inline(always)]
pub const fn port_filter_bit(port: u16) -> (usize, u64) {
    let bit = port as usize & 255;
    (bit >> 6, 1 << (bit & 63))
}

/// The [`Runtime::port_filter`] bits of one policy generation.
pub fn port_filter(policy: &PolicyConfig) -> [u64; PORT_FILTER_WORDS] {
    let mut words = [0; PORT_FILTER_WORDS];
    for dp in &policy.direction {
        for &port in dp.ports.iter().filter(|&&p| p != PORT_UNUSED) {
            let (word, bit) = port_filter_bit(port as u16);
            words[word] |= bit;
        }
    }
    words
}

/// One direction's share of a policy generation.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirectionPolicy {
    /// Guarded server ports in host byte order; [`PORT_UNUSED`] ends the list.
    pub ports: [u32; MAX_PORTS],
    /// [`verdict`] (`PASS` or `DROP`) when nothing else decided, per port slot.
    pub default_verdict: [u8; MAX_PORTS],
    /// [`profile`] per port slot.
    pub profile: [u8; MAX_PORTS],
    /// [`mode`].
    pub mode: u8,
    /// [`verdict`] (`PASS` or `DROP`) for malformed packets.
    pub malformed_verdict: u8,
    /// [`side`] bits: which ACL scopes have entries, so empty ones cost nothing.
    pub acl_sides: u8,
    /// [`smtp_command`] bits blocked on SMTP-profile ports.
    pub smtp_block: u8,
    /// Non-zero when new connections are rate limited.
    pub rate_enabled: u8,
    /// Non-zero when the geo-fence applies.
    pub geo_enabled: u8,
    /// [`verdict`] (`PASS` or `DROP`) for IP fragments of segments to an SMTP-profile port
    /// while `smtp_block` is set: the command filter cannot read them.
    pub fragment_verdict: u8,
    /// Non-zero: a dropped segment of an open connection (a policy edit or
    /// a ban denied it mid-session) is answered with a TCP reset to its
    /// sender, so the client fails at once instead of stalling (see
    /// [`reset_worthy`]).
    pub established_reset: u8,
    /// GCRA emission interval: 60 s / new connections per minute.
    pub rate_interval_ns: u64,
    /// GCRA tolerance: (burst - 1) * interval.
    pub rate_tolerance_ns: u64,
    /// Ban when more than this many SYNs arrive in the sliding minute; 0: never.
    pub ban_threshold: u32,
    /// First ban length.
    pub ban_base_s: u32,
    /// Each repeat ban is this many times longer ...
    pub ban_factor: u32,
    /// ... up to this length.
    pub ban_max_s: u32,
    /// Report a source behind a tenant interface whose blocked new
    /// connections go over this many in `suspect_window_s` (0: never);
    /// see [`tenant`].
    pub suspect_blocked: u32,
    pub suspect_window_s: u32,
    /// Bit per country index: drop when set.
    pub geo_drop: [u64; MAX_COUNTRIES / 64],
}
const _: () = assert!(core::mem::size_of::<DirectionPolicy>() == 104);

impl DirectionPolicy {
    /// Guards nothing: every packet leaves as non-SMTP.
    pub const EMPTY: Self = Self {
        ports: [PORT_UNUSED; MAX_PORTS],
        default_verdict: [verdict::PASS; MAX_PORTS],
        profile: [profile::OTHER; MAX_PORTS],
        mode: mode::ENFORCE,
        malformed_verdict: verdict::DROP,
        acl_sides: 0,
        smtp_block: 0,
        rate_enabled: 0,
        geo_enabled: 0,
        fragment_verdict: verdict::DROP,
        established_reset: 0,
        rate_interval_ns: 0,
        rate_tolerance_ns: 0,
        ban_threshold: 0,
        ban_base_s: 0,
        ban_factor: 1,
        ban_max_s: 0,
        suspect_blocked: 0,
        suspect_window_s: 0,
        geo_drop: [0; MAX_COUNTRIES / 64],
    };

    /// Drops packets of this country index.
    #[inline(always)]
    pub fn geo_drops(&self, country: u32) -> bool {
        let word = (country as usize / 64) % (MAX_COUNTRIES / 64);
        self.geo_drop[word] & (1u64 << (country % 64)) != 0
    }
}

/// A whole policy as the datapath sees it: one entry of `POLICY`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyConfig {
    /// Monotonic policy generation number, for status and events.
    pub generation: u64,
    pub direction: [DirectionPolicy; direction::COUNT],
}
const _: () = assert!(core::mem::size_of::<PolicyConfig>() == 216);

impl PolicyConfig {
    pub const EMPTY: Self = Self { generation: 0, direction: [DirectionPolicy::EMPTY; 2] };
}

/// Data of an `ACL_V6` key: generation, scope, zero padding, address.
///
/// The scope byte is `direction << 1 | side`, so one trie holds both
/// directions, both sides and both generations; the prefix length of a key
/// is `ACL_KEY_HEADER_BITS + CIDR prefix length`. Addresses are words
/// holding the bytes in network order (as loaded from the packet), so keys
/// are built with word stores. IPv4 has its own layout: [`acl4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AclKeyV6 {
    pub generation: u8,
    pub scope: u8,
    pub _pad: [u8; 2],
    pub addr: [u32; 4],
}
const _: () = assert!(core::mem::size_of::<AclKeyV6>() == 20);

impl AclKeyV6 {
    pub fn new(generation: u8, scope: u8, octets: [u8; 16]) -> Self {
        let mut addr = [0u32; 4];
        for (i, w) in addr.iter_mut().enumerate() {
            *w = u32::from_ne_bytes([octets[4 * i], octets[4 * i + 1], octets[4 * i + 2], octets[4 * i + 3]]);
        }
        Self { generation, scope, _pad: [0; 2], addr }
    }
}

/// Bits of an ACL key's prefix length taken by generation, scope and padding.
pub const ACL_KEY_HEADER_BITS: u32 = 32;

/// Scope byte of an ACL key.
#[inline(always)]
pub const fn acl_scope(direction: u8, side: u8) -> u8 {
    (direction << 1) | side
}

/// ACL scopes: (direction, side) pairs.
pub const ACL_SCOPES: usize = 4;
/// What the longest matching prefix means, resolved by the compiler.
///
/// For each guarded port slot: the rule allowing it (wins over everything)
/// and the rule denying it; then the peer's country index for the geo-fence.
/// Rule ids are the compiler's, 0 means none.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AclEntry {
    pub allow_rule: [u32; MAX_PORTS],
    pub deny_rule: [u32; MAX_PORTS],
    pub country: u32,
}
const _: () = assert!(core::mem::size_of::<AclEntry>() == 36);

/// Kinds of [`Event`].
pub mod event_kind {
    pub const BAN_ADDED: u8 = 1;
    pub const BAN_EXPIRED: u8 = 2;
    pub const RATE_TRIP: u8 = 3;
    pub const DROP_SAMPLE: u8 = 4;
    /// A source behind a tenant interface went over the policy's blocked
    /// connections in a window (`count`, `ifindex`).
    pub const TENANT_SUSPECT: u8 = 5;
    /// The shadow policy would have decided differently: `verdict`,
    /// `reason` and `rule` are the enforced policy's; the candidate's rule
    /// is in `count`, its verdict and reason in `duration_s` (low byte,
    /// next byte).
    pub const SHADOW_DIFF: u8 = 6;
}

/// A record on the `EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// When it happened, on the datapath's clock (`bpf_ktime_get_coarse_ns`).
    pub ktime_ns: u64,
    pub kind: u8,
    pub direction: u8,
    pub verdict: u8,
    pub reason: u8,
    /// 4 or 6.
    pub family: u8,
    pub port_slot: u8,
    pub sport: u16,
    pub dport: u16,
    pub _pad0: [u8; 2],
    /// Deciding rule id, 0 if none.
    pub rule: u32,
    /// SYNs in the ban window when the ban started.
    pub count: u32,
    /// Ban length.
    pub duration_s: u32,
    /// Bans of this source so far, this one included (at most
    /// `MAX_BAN_STRIKES`).
    pub strikes: u16,
    /// Country index of the peer, 0 if none (below `MAX_COUNTRIES`).
    pub country: u16,
    /// The tenant interface it came in on (`TENANT_SUSPECT`), else 0.
    pub ifindex: u32,
    /// Address words holding network-order bytes; IPv4 uses the first word.
    pub src: [u32; 4],
    pub dst: [u32; 4],
}
// As small as it was before `ifindex`: events are built on the stack of
// programs whose frame is near the verifier's 512 bytes with their callees.
const _: () = assert!(core::mem::size_of::<Event>() == 72);

impl Event {
    /// The source address as bytes (IPv4 in the first four).
    pub fn src_octets(&self) -> [u8; 16] {
        words_to_octets(&self.src)
    }

    pub fn dst_octets(&self) -> [u8; 16] {
        words_to_octets(&self.dst)
    }
}

/// Address words holding network-order bytes, as bytes.
pub fn words_to_octets(words: &[u32; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        out[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
    }
    out
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C), contain only integers and byte
    // arrays, and have no implicit padding (sizes asserted above).
    unsafe impl aya::Pod for Runtime {}
    unsafe impl aya::Pod for PolicyConfig {}
    unsafe impl aya::Pod for AclKeyV6 {}
    unsafe impl aya::Pod for AclEntry {}
    unsafe impl aya::Pod for acl4::AclNode {}
    unsafe impl aya::Pod for Event {}
    unsafe impl aya::Pod for ShadowKey {}
    unsafe impl aya::Pod for ShadowSource {}
    unsafe impl aya::Pod for source::SourceSet {}
    unsafe impl aya::Pod for maps::Counter {}
    unsafe impl aya::Pod for smtp_flow::SmtpFlowKey {}
    unsafe impl aya::Pod for smtp_flow::SmtpFlowState {}
    unsafe impl aya::Pod for tenant::SourceKey {}
    unsafe impl aya::Pod for tenant::SourceState {}
    unsafe impl aya::Pod for trace::TraceSelector {}
}

impl DirectionPolicy {
    /// Slot of a guarded server port, or `None` when the port is not guarded.
    #[inline(always)]
    pub fn port_slot(&self, port: u16) -> Option<usize> {
        let port = port as u32;
        let mut i = 0;
        while i < MAX_PORTS {
            if self.ports[i] == port {
                return Some(i);
            }
            i += 1;
        }
        None
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_cells_read_back_their_index() {
        let mut n = 0;
        for c in StatsCell::all() {
            assert_eq!(stats_index(c.direction, c.verdict, c.reason, c.port_slot), c.index);
            n += 1;
        }
        assert_eq!(n, STATS_VERDICT_CELLS);
    }
}

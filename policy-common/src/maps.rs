//! Map names and capacities: the one place both sides take them from.
//! Names stay within the kernel's 15 characters.

/// `Array<Runtime>`, 1 entry, `BPF_F_MMAPABLE`. Key 0; value: eight 8-byte
/// words, each with one writer (the table at [`crate::Runtime`]): the
/// controller for all but `cidr_bans`, whose writer is `smtpguard
/// ban`/`unban` of networks. Userspace stores single words atomically
/// through the mapping. Reader: every hook, one atomic load per field.
pub const RUNTIME: &str = "RUNTIME";
/// `Array<u64>`, 1 entry, `BPF_F_MMAPABLE`: the fail-open switch, 0 off,
/// else the Unix time (s) it was turned on: every direction judges as in
/// monitor mode (drops pass as `would_drop`, no resets). Writer: `smtpguard
/// bypass` (one atomic store through the mapping). Readers: the pipeline,
/// only for packets the policy drops; the controller (events, metrics).
pub const BYPASS: &str = "BYPASS";
/// `PerCpuHashMap<ShadowKey, u64>`: packets the shadow policy judged
/// differently, by (direction, port, both verdicts and reasons, the
/// candidate's rule). Writer: datapath. Reader: `smtpguard shadow`,
/// metrics; the controller clears it when the shadow is replaced.
pub const SHADOW_DIFFS: &str = "SHADOW_DIFFS";
pub const SHADOW_DIFFS_CAPACITY: u32 = 16_384;
/// `LruPerCpuHashMap<ShadowSource, u64>`: differences by source address
/// (the peer), an LRU: the most recently seen kept. Writer: datapath. Reader: `smtpguard shadow`.
pub const SHADOW_SOURCES: &str = "SHADOW_SOURCES";
pub const SHADOW_SOURCES_CAPACITY: u32 = 65_536;
/// `PerCpuArray<u64>`, `shadow_total` cells. Writer: datapath.
pub const SHADOW_TOTALS: &str = "SHADOW_TOTALS";
/// `PerCpuArray<ShadowJob>`, 1 entry: a judged packet handed to the
/// shadow's judgement.
pub const SHADOW_BUF: &str = "SHADOW_BUF";
/// `Array<PolicyConfig>`, one entry per generation (the enforced pair,
/// then the shadow's). Writer: controller.
pub const POLICY: &str = "POLICY";
/// `Array<SlotChunk>`: IPv4 ACL root slots, one per /16 per (generation,
/// scope); see [`crate::acl4`]. Writer: controller (install).
pub const ACL4_ROOT: &str = "ACL4_ROOT";
/// `Array<AclNode>`: IPv4 ACL nodes, half per generation.
pub const ACL4_NODES: &str = "ACL4_NODES";
/// `Array<SlotChunk>`: the nodes' run slots, half per generation.
pub const ACL4_SLOTS: &str = "ACL4_SLOTS";
/// `Array<AclEntry>`: what an IPv4 slot means, half per generation.
pub const ACL4_VALUES: &str = "ACL4_VALUES";
/// `LpmTrie<AclKeyV6, AclEntry>`: allow, deny and geo folded per prefix.
pub const ACL_V6: &str = "ACL_V6";
/// `Array<SourceSet>`, `BPF_F_MMAPABLE`: rate buckets and bans per source,
/// shared by all CPUs. Key: `source::source_set(key, sets)`; value: 8
/// ways. Writers: the datapath (claims store the key last; ban words only
/// by compare-and-swap) and `smtpguard ban`/`unban` (only the source's
/// own way, with the same protocol, through the mapping). Readers: the
/// pipeline; the controller and operator commands, in place.
pub const SOURCES: &str = "SOURCES";
/// `PerCpuArray<Counter>`, indexed by `stats_index`, then events lost,
/// bans started by origin and source claims by kind (`STATS_*` in the
/// crate root). Writer: datapath (the manual-ban cell: `smtpguard ban`,
/// CPU 0's cell). Reader: controller, summing CPUs.
pub const STATS: &str = "STATS";
/// `PerCpuArray<u64>`, packets each ACL rule decided, indexed by
/// `rule_hits_index(generation, rule id)`. Writer: datapath. Readers:
/// controller (folds and zeroes a generation once it is replaced),
/// `smtpguard status --rules`.
pub const RULE_HITS: &str = "RULE_HITS";
/// `PerCpuArray<u64>`, drops and would-drops per (direction, verdict,
/// country), indexed by `geo_index`.
pub const GEO_DROPS: &str = "GEO_DROPS";
/// `RingBuf` of `Event`s.
pub const EVENTS: &str = "EVENTS";
/// `PerCpuArray<EventBudget>`: token bucket capping sampled events per CPU.
pub const EVENT_BUDGET: &str = "EVENT_BUDGET";

/// `LpmTrie<[u32; 1], u64>`: manual network bans (source prefix → until,
/// ns of the coarse clock). Writer: `smtpguard ban`. Reader: pipeline.
pub const BAN_V4: &str = "BAN_V4";
/// `LpmTrie<[u32; 4], u64>`.
pub const BAN_V6: &str = "BAN_V6";
/// Capacity of each manual network ban trie.
pub const BAN_CIDR_CAPACITY: u32 = 65_536;

/// `PerCpuArray<u64>`, 1 entry: a word that hides exact values from the
/// verifier, keeping its state count small (`policy-ebpf/src/opaque.rs`).
pub const SCRATCH: &str = "SCRATCH";

/// `HashMap<u32, u32>`: ifindex of a tenant interface -> its slot in
/// `TENANT_STATS` (1..=capacity). Writer: controller, as interfaces come
/// and go. A packet forwarded from one of them was judged there, so
/// `tc_egress` on the uplink lets it go uncounted instead of judging it a
/// second time; `tc_ingress` counts it at the slot.
pub const TENANT_IFACES: &str = "TENANT_IFACES";
pub const TENANT_IFACES_CAPACITY: u32 = 4096;
/// `PerCpuArray<u64>`: packets judged on each tenant interface, at
/// `tenant::cell(slot, verdict, reason)` (slot 0 unused). Writer:
/// `tc_ingress`; the controller zeroes a slot before giving it again.
/// Reader: controller, `smtpguard tenants`.
pub const TENANT_STATS: &str = "TENANT_STATS";
pub const TENANT_STATS_ENTRIES: u32 = (TENANT_IFACES_CAPACITY + 1) * crate::tenant::CELLS as u32;
/// `LruHashMap<tenant::SourceKey, tenant::SourceState>`: blocked new
/// connections per source behind a tenant interface, in windows. Writer:
/// `tc_ingress`. Reader: controller (suspect gauges), `smtpguard tenants`.
pub const TENANT_SOURCES: &str = "TENANT_SOURCES";
pub const TENANT_SOURCES_CAPACITY: u32 = 65_536;
/// `PerCpuArray<TenantJob>`, 1 entry: a judged packet handed to the
/// tenant accounting.
pub const TENANT_BUF: &str = "TENANT_BUF";

/// `PerCpuArray<ScanJob>`, 1 entry: a segment's flow, place and payload
/// bytes handed to the scanner.
pub const SCAN_BUF: &str = "SCAN_BUF";

/// `PerCpuArray<ResetJob>`, 1 entry: where a segment to answer with a
/// reset has its headers, and the rewritten headers.
pub const RESET_BUF: &str = "RESET_BUF";

/// `LruHashMap<SmtpFlowKey, SmtpFlowState>`: where each client stream of
/// a command-filtered port stands (see [`crate::smtp_flow`]). Writer and
/// reader: the datapath; the controller only sizes it.
pub const SMTP_FLOWS: &str = "SMTP_FLOWS";
/// Default capacity of `SMTP_FLOWS`, in flows. Settable at load time.
pub const DEFAULT_SMTP_FLOWS_CAPACITY: u32 = 65_536;

/// `Array<TraceSelector>`, 1 entry, `BPF_F_MMAPABLE`: which flows'
/// decisions are traced (see [`crate::trace`]). Writer: `smtpguard trace`
/// (word by word, through the mapping). Reader: the pipeline's exit, one
/// word while tracing is off.
pub const TRACE: &str = "TRACE";
/// `PerCpuArray<TraceJob>`, 1 entry: a traced decision handed to the
/// function that writes its log line.
pub const TRACE_BUF: &str = "TRACE_BUF";
/// aya-log's `RingBuf` of log records (the name is aya-log-ebpf's): the
/// trace lines. Writer: the datapath, only for traced flows. Reader:
/// `smtpguard trace` (aya-log's `EbpfLogger`); nobody otherwise.
pub const AYA_LOGS: &str = "AYA_LOGS";
/// Size of `AYA_LOGS` in bytes, as aya-log-ebpf 0.2 defines it (the ELF
/// test checks the object agrees): about 250 trace lines.
pub const AYA_LOGS_BYTES: u32 = 1 << 17;

/// Every map of the object, for the ELF test and the controller.
pub const ALL_MAPS: [&str; 31] = [
    RUNTIME,
    BYPASS,
    POLICY,
    ACL4_ROOT,
    ACL4_NODES,
    ACL4_SLOTS,
    ACL4_VALUES,
    ACL_V6,
    BAN_V4,
    BAN_V6,
    SOURCES,
    STATS,
    RULE_HITS,
    SHADOW_DIFFS,
    SHADOW_SOURCES,
    SHADOW_TOTALS,
    SHADOW_BUF,
    GEO_DROPS,
    EVENTS,
    EVENT_BUDGET,
    SCRATCH,
    TENANT_IFACES,
    TENANT_STATS,
    TENANT_SOURCES,
    TENANT_BUF,
    SCAN_BUF,
    SMTP_FLOWS,
    RESET_BUF,
    TRACE,
    TRACE_BUF,
    AYA_LOGS,
];

/// Program names, one per hook.
pub const PROG_XDP_INGRESS: &str = "xdp_ingress";
pub const PROG_TC_INGRESS: &str = "tc_ingress";
pub const PROG_TC_EGRESS: &str = "tc_egress";
pub const ALL_PROGRAMS: [&str; 3] = [PROG_XDP_INGRESS, PROG_TC_INGRESS, PROG_TC_EGRESS];

/// The layout of the pinned maps (their set, key and value layouts, and
/// what their indices mean). Raise it with any change to one of them, and
/// teach `policy-userspace/src/dataplane/upgrade.rs` what to carry over
/// from the layout before; docs/upgrade.md lists every layout.
pub const LAYOUT_VERSION: u32 = 3;

/// Policy generations kept side by side for atomic swaps.
pub const GENERATIONS: u32 = 2;
/// IPv6 ACL trie capacity, shared by both generations. LPM tries
/// allocate per entry, so this is a bound, not a reservation.
pub const ACL_CAPACITY: u32 = 4_194_304;
/// Default capacity of `SOURCES`, in sources. Settable at load time.
pub const DEFAULT_SOURCE_CAPACITY: u32 = 1_310_720;
/// Ring buffer size (a power of two, multiple of the page size).
pub const EVENTS_BYTES: u32 = 1 << 20;

/// One counter cell: packets and bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<Counter>() == 16);

/// Sums per-CPU cells.
impl core::ops::Add for Counter {
    type Output = Self;

    fn add(self, other: Self) -> Self {
        Self { packets: self.packets + other.packets, bytes: self.bytes + other.bytes }
    }
}

/// Per-CPU token bucket for sampled events.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventBudget {
    pub tokens: u64,
    pub last_ns: u64,
}
const _: () = assert!(core::mem::size_of::<EventBudget>() == 16);

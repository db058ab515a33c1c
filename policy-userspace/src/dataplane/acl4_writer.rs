//! Builds the IPv4 ACL arrays ([`policy_common::acl4`]) from prefixes, and
//! reads them back.
//!
//! Prefixes become breakpoints of the address space (where the longest
//! match changes), and the breakpoints become nodes only where a /16 or /24
//! is not uniform. Building is linear in prefixes plus nodes.

use std::collections::HashMap;

use ipnet::Ipv4Net;
use policy_common::{
    acl4::{AclNode, Capacity, CHILD, ROOT_SLOTS},
    AclEntry, ACL_SCOPES,
};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("the IPv4 ACL needs at least {needed} {what} per generation, but the datapath was loaded with room for {capacity}; restart with a larger --acl4-{what}")]
pub struct CapacityError {
    pub what: &'static str,
    /// How many were asked for when the room ran out (the build stops
    /// there: a policy far too large costs no more memory than the room).
    pub needed: usize,
    pub capacity: u32,
}

/// One generation's arrays, with every index already absolute (pointing
/// into that generation's half).
#[derive(Debug, Default)]
pub struct Tables {
    /// `ACL_SCOPES * ROOT_SLOTS` slots, scope-major.
    pub root: Vec<u32>,
    pub nodes: Vec<AclNode>,
    pub slots: Vec<u32>,
    /// Index 0 (no entry) first.
    pub values: Vec<AclEntry>,
}

/// Where generation `generation`'s half of each array starts.
#[derive(Clone, Copy, Debug)]
pub struct Bases {
    pub nodes: u32,
    pub slots: u32,
    pub values: u32,
}

impl Bases {
    pub const fn of(generation: u32, capacity: &Capacity) -> Self {
        let g = generation & 1;
        Self { nodes: g * capacity.nodes, slots: g * capacity.slots, values: g * capacity.values }
    }
}

struct Builder<'a> {
    tables: Tables,
    bases: Bases,
    capacity: &'a Capacity,
    /// Run buffers to reuse: a build makes a node per non-uniform range.
    spare: Vec<Vec<(u32, u32)>>,
}

/// (first address, value index) where the longest match changes; the
/// first one is at address 0.
type Breakpoints = Vec<(u64, u32)>;

/// Builds one generation from `entries` (scope, prefix, meaning). A prefix
/// listed twice in a scope keeps its last meaning.
pub fn build(entries: &[(u8, Ipv4Net, AclEntry)], generation: u32, capacity: &Capacity) -> Result<Tables, CapacityError> {
    let bases = Bases::of(generation, capacity);
    let mut b = Builder { tables: Tables::default(), bases, capacity, spare: Vec::new() };
    b.tables.values.push(AclEntry::default());
    let mut value_index: HashMap<AclEntry, u32, WordHash> = HashMap::with_capacity_and_hasher((entries.len() / 4).min(capacity.values as usize), WordHash);
    value_index.insert(AclEntry::default(), 0);
    let mut per_scope: Vec<Vec<(u32, u8, u32)>> = vec![Vec::new(); ACL_SCOPES];
    for (scope, net, entry) in entries {
        let next = b.tables.values.len() as u32;
        let v = *value_index.entry(*entry).or_insert_with(|| {
            b.tables.values.push(*entry);
            next
        });
        if b.tables.values.len() > capacity.values as usize {
            return Err(CapacityError { what: "values", needed: b.tables.values.len(), capacity: capacity.values });
        }
        per_scope[*scope as usize % ACL_SCOPES].push((u32::from(net.network()), net.prefix_len(), v));
    }
    let absolute = |v: u32| if v == 0 { 0 } else { bases.values + v };
    b.tables.root = vec![0; ACL_SCOPES * ROOT_SLOTS as usize];
    for (scope, mut prefixes) in per_scope.into_iter().enumerate() {
        // The compiler's output is sorted already. Stable: of a prefix
        // given twice, the later stays last and wins.
        if !prefixes.is_sorted_by_key(|&(addr, len, _)| (addr, len)) {
            prefixes.sort_by_key(|&(addr, len, _)| (addr, len));
        }
        let mut bps = breakpoints(&prefixes);
        for bp in &mut bps {
            bp.1 = absolute(bp.1);
        }
        b.root(scope, &bps)?;
    }
    Ok(b.tables)
}

/// A multiply-rotate hash over the words of an `AclEntry`: SipHash's
/// flood resistance buys nothing for the compiler's own values, and it was
/// a tenth of a large reload.
#[derive(Clone, Copy, Default)]
struct WordHash;

impl std::hash::BuildHasher for WordHash {
    type Hasher = WordHasher;
    fn build_hasher(&self) -> WordHasher {
        WordHasher(0)
    }
}

struct WordHasher(u64);

impl std::hash::Hasher for WordHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(4);
        for w in &mut words {
            self.write_u32(u32::from_ne_bytes([w[0], w[1], w[2], w[3]]));
        }
        for b in words.remainder() {
            self.write_u32(*b as u32);
        }
    }
    fn write_u32(&mut self, word: u32) {
        self.0 = (self.0.rotate_left(5) ^ word as u64).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
    fn write_usize(&mut self, n: usize) {
        self.write_u32(n as u32);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

/// The room per generation `entries` take (each count at least 1).
pub fn needed(entries: &[(u8, Ipv4Net, AclEntry)]) -> Capacity {
    let unbounded = Capacity { nodes: CHILD - 1, slots: CHILD - 1, values: CHILD - 1 };
    let t = build(entries, 0, &unbounded).expect("unbounded room");
    Capacity { nodes: t.nodes.len().max(1) as u32, slots: t.slots.len().max(1) as u32, values: t.values.len() as u32 }
}

/// Records that the value is `v` from `at` on, in `changes` (non-empty,
/// ordered by position, `at` not before the last): a change at the same
/// position replaces the last, and one that changes nothing is dropped.
fn change_at<P: PartialEq + Copy>(changes: &mut Vec<(P, u32)>, at: P, v: u32) {
    let n = changes.len();
    if changes[n - 1].0 == at {
        changes[n - 1].1 = v;
        if n >= 2 && changes[n - 2].1 == v {
            changes.pop();
        }
    } else if changes[n - 1].1 != v {
        changes.push((at, v));
    }
}

/// Sweeps prefixes sorted by (address, length) into breakpoints.
fn breakpoints(prefixes: &[(u32, u8, u32)]) -> Breakpoints {
    fn emit(bps: &mut Breakpoints, at: u64, v: u32) {
        if at <= u32::MAX as u64 {
            change_at(bps, at, v);
        }
    }
    let mut bps: Breakpoints = vec![(0, 0)];
    // Open prefixes: (end, value), innermost last.
    let mut open: Vec<(u64, u32)> = Vec::new();
    let close_until = |bps: &mut Breakpoints, open: &mut Vec<(u64, u32)>, at: u64| {
        while let Some(&(end, _)) = open.last() {
            if end > at {
                break;
            }
            open.pop();
            emit(bps, end, open.last().map_or(0, |o| o.1));
        }
    };
    for &(addr, len, v) in prefixes {
        let start = addr as u64;
        close_until(&mut bps, &mut open, start);
        // The same prefix again nests inside the first, so the later wins.
        emit(&mut bps, start, v);
        open.push((start + (1u64 << (32 - len)), v));
    }
    close_until(&mut bps, &mut open, u64::MAX);
    bps
}

impl Builder<'_> {
    fn root(&mut self, scope: usize, bps: &[(u64, u32)]) -> Result<(), CapacityError> {
        let base = scope * ROOT_SLOTS as usize;
        let runs = self.runs(0, 16, ROOT_SLOTS, bps[0].1, &bps[1..])?;
        for (k, &(slot, value)) in runs.iter().enumerate() {
            let end = runs.get(k + 1).map_or(ROOT_SLOTS, |r| r.0);
            self.tables.root[base + slot as usize..base + end as usize].fill(value);
        }
        self.spare.push(runs);
        Ok(())
    }

    /// The runs of `count` slots of width `1 << shift` from `start`, as
    /// (first slot, value), given the value `v0` at `start` and the
    /// breakpoints `inner` inside the range. A slot holding more than one
    /// value becomes a child node. Linear in breakpoints, not in slots.
    fn runs(&mut self, start: u64, shift: u32, count: u32, v0: u32, inner: &[(u64, u32)]) -> Result<Vec<(u32, u32)>, CapacityError> {
        fn push(runs: &mut Vec<(u32, u32)>, count: u32, slot: u32, value: u32) {
            if slot < count {
                change_at(runs, slot, value);
            }
        }
        let mut runs = self.spare.pop().unwrap_or_default();
        runs.clear();
        runs.push((0, v0));
        let mut current = v0;
        let width = 1u64 << shift;
        let mut i = 0;
        while i < inner.len() {
            let slot = ((inner[i].0 - start) >> shift) as u32;
            let slot_start = start + ((slot as u64) << shift);
            let mut j = i + 1;
            while j < inner.len() && inner[j].0 < slot_start + width {
                j += 1;
            }
            let (first, rest) = if inner[i].0 == slot_start { (inner[i].1, &inner[i + 1..j]) } else { (current, &inner[i..j]) };
            if rest.is_empty() {
                push(&mut runs, count, slot, first);
                current = first;
            } else {
                let child = self.node(slot_start, shift - 8, first, rest)?;
                push(&mut runs, count, slot, CHILD | child);
                current = inner[j - 1].1;
                push(&mut runs, count, slot + 1, current);
            }
            i = j;
        }
        Ok(runs)
    }

    /// A node for the range at `start` with slots of width `1 << shift`;
    /// returns its absolute index.
    fn node(&mut self, start: u64, shift: u32, v0: u32, inner: &[(u64, u32)]) -> Result<u32, CapacityError> {
        let runs = self.runs(start, shift, 256, v0, inner)?;
        let mut node = AclNode::default();
        let mut r = 0;
        for word in 0..4u32 {
            node.base[word as usize] = self.bases.slots + self.tables.slots.len() as u32;
            let first = word * 64;
            // Every word starts a run: the one covering its first slot.
            while r + 1 < runs.len() && runs[r + 1].0 <= first {
                r += 1;
            }
            node.runs[word as usize] |= 1;
            self.tables.slots.push(runs[r].1);
            while r + 1 < runs.len() && runs[r + 1].0 < first + 64 {
                r += 1;
                node.runs[word as usize] |= 1 << (runs[r].0 - first);
                self.tables.slots.push(runs[r].1);
            }
        }
        self.spare.push(runs);
        if self.tables.slots.len() > self.capacity.slots as usize {
            return Err(CapacityError { what: "slots", needed: self.tables.slots.len(), capacity: self.capacity.slots });
        }
        if self.tables.nodes.len() >= self.capacity.nodes as usize {
            return Err(CapacityError { what: "nodes", needed: self.tables.nodes.len() + 1, capacity: self.capacity.nodes });
        }
        self.tables.nodes.push(node);
        Ok(self.bases.nodes + self.tables.nodes.len() as u32 - 1)
    }
}

/// Read access to the arrays as the datapath sees them (absolute indexes).
pub trait View {
    fn root(&self, index: u32) -> u32;
    fn node(&self, index: u32) -> AclNode;
    fn slot(&self, index: u32) -> u32;
    fn value(&self, index: u32) -> AclEntry;
}

/// The datapath's lookup, for tests and for reading a generation back.
pub fn lookup(view: &impl View, generation: u32, scope: u8, addr: u32) -> Option<AclEntry> {
    use policy_common::acl4::{node_slot, root_slot};
    let mut v = view.root(root_slot(generation, scope, addr));
    for depth in 1..=2 {
        if v & CHILD == 0 {
            break;
        }
        let node = view.node(v & !CHILD);
        v = view.slot(node.slot_index(node_slot(addr, depth)));
    }
    (v != 0).then(|| view.value(v))
}

/// A (generation, scope) read back as prefixes: each maximal range of one
/// meaning, split into CIDR blocks. The same lookups as what was built,
/// though not necessarily the same prefixes.
pub fn read_back(view: &impl View, generation: u32, scope: u8) -> Vec<(Ipv4Net, AclEntry)> {
    /// Appends the range of `1 << (32 - len)` addresses at `addr` to `ranges`.
    fn walk(view: &impl View, v: u32, addr: u32, len: u8, ranges: &mut Vec<(u64, u64, u32)>) {
        if v & CHILD == 0 {
            let (start, end) = (addr as u64, addr as u64 + (1u64 << (32 - len)));
            match ranges.last_mut() {
                Some(last) if last.1 == start && last.2 == v => last.1 = end,
                _ => ranges.push((start, end, v)),
            }
            return;
        }
        let node = view.node(v & !CHILD);
        for slot in 0..256u32 {
            walk(view, view.slot(node.slot_index(slot)), addr | slot << (24 - len as u32), len + 8, ranges);
        }
    }
    let mut ranges = Vec::new();
    for top in 0..ROOT_SLOTS {
        walk(view, view.root(policy_common::acl4::root_slot(generation, scope, top << 16)), top << 16, 16, &mut ranges);
    }
    let mut out = Vec::new();
    for (mut start, end, v) in ranges {
        if v == 0 {
            continue;
        }
        let entry = view.value(v);
        while start < end {
            // The largest block aligned at `start` that fits before `end`.
            let align = if start == 0 { 32 } else { start.trailing_zeros().min(32) };
            let mut size_bits = align;
            while (1u64 << size_bits) > end - start {
                size_bits -= 1;
            }
            out.push((Ipv4Net::new((start as u32).into(), 32 - size_bits as u8).expect("length <= 32"), entry));
            start += 1u64 << size_bits;
        }
    }
    out
}

/// One array map mapped into this process (`BPF_F_MMAPABLE`): the
/// controller writes a generation with plain stores instead of a syscall
/// per element.
pub struct Mapped {
    ptr: *mut u8,
    len: usize,
    /// Bytes per element: the kernel stores values 8-byte aligned.
    stride: usize,
    entries: u32,
}

// SAFETY: the mapping is owned by this value and only written through
// `&mut self`.
unsafe impl Send for Mapped {}

impl Mapped {
    /// Maps the array behind `fd` as `entries` elements `stride` bytes
    /// apart (a map value's size rounded up to 8, or a part of a value).
    pub fn new(fd: std::os::fd::BorrowedFd<'_>, entries: u32, stride: usize) -> std::io::Result<Self> {
        use std::os::fd::AsRawFd;
        let len = (entries as usize * stride).next_multiple_of(4096);
        // SAFETY: a fresh shared mapping of the map's own size; the kernel
        // checks the fd is an mmapable array.
        let ptr = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd.as_raw_fd(), 0)
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self { ptr: ptr.cast(), len, stride, entries })
    }

    /// Writes `values` from element `first` on.
    pub fn write<T: aya::Pod>(&mut self, first: usize, values: &[T]) {
        assert!(size_of::<T>() <= self.stride && first + values.len() <= self.entries as usize, "write past the array");
        if size_of::<T>() == self.stride {
            // SAFETY: in bounds (asserted); T is plain old data.
            unsafe { std::ptr::copy_nonoverlapping(values.as_ptr().cast::<u8>(), self.ptr.add(first * self.stride), size_of_val(values)) };
            return;
        }
        for (i, v) in values.iter().enumerate() {
            // SAFETY: as above, one element at a time.
            unsafe { std::ptr::write_unaligned(self.ptr.add((first + i) * self.stride).cast::<T>(), *v) };
        }
    }

    /// Element `index`, or zeroes past the end (as the datapath's failed
    /// lookup reads as "no entry").
    pub fn read<T: aya::Pod + Default>(&self, index: usize) -> T {
        if index >= self.entries as usize || size_of::<T>() > self.stride {
            return T::default();
        }
        // SAFETY: in bounds; T is plain old data.
        unsafe { std::ptr::read_unaligned(self.ptr.add(index * self.stride).cast::<T>()) }
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// The four arrays of the loaded datapath, mapped.
pub struct Arrays {
    /// Slots, counted in u32s (the map's values are chunks of them).
    pub root: Mapped,
    pub nodes: Mapped,
    pub slots: Mapped,
    pub values: Mapped,
    pub capacity: Capacity,
}

impl Arrays {
    /// Writes one generation built by [`build`] for it. The caller makes
    /// sure no packet reads that generation meanwhile.
    pub fn write(&mut self, generation: u32, tables: &Tables) {
        let bases = Bases::of(generation, &self.capacity);
        // Index 0 of each half is never read: a slot of 0 means no entry.
        self.values.write(bases.values as usize + 1, &tables.values[1..]);
        self.slots.write(bases.slots as usize, &tables.slots);
        self.nodes.write(bases.nodes as usize, &tables.nodes);
        self.root.write(policy_common::acl4::root_slot(generation, 0, 0) as usize, &tables.root);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    }
}

impl View for Arrays {
    fn root(&self, index: u32) -> u32 {
        self.root.read(index as usize)
    }
    fn node(&self, index: u32) -> AclNode {
        self.nodes.read(index as usize)
    }
    fn slot(&self, index: u32) -> u32 {
        self.slots.read(index as usize)
    }
    fn value(&self, index: u32) -> AclEntry {
        self.values.read(index as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tables of one generation laid out at their absolute indexes.
    struct Flat {
        generation: u32,
        bases: Bases,
        tables: Tables,
    }

    impl View for Flat {
        fn root(&self, index: u32) -> u32 {
            let local = index as usize - (self.generation as usize & 1) * ACL_SCOPES * ROOT_SLOTS as usize;
            self.tables.root[local]
        }
        fn node(&self, index: u32) -> AclNode {
            self.tables.nodes[(index - self.bases.nodes) as usize]
        }
        fn slot(&self, index: u32) -> u32 {
            self.tables.slots[(index - self.bases.slots) as usize]
        }
        fn value(&self, index: u32) -> AclEntry {
            self.tables.values[(index - self.bases.values) as usize]
        }
    }

    fn entry(rule: u32) -> AclEntry {
        AclEntry { deny_rule: [rule; policy_common::MAX_PORTS], ..AclEntry::default() }
    }

    fn flat(entries: &[(u8, Ipv4Net, AclEntry)], generation: u32) -> Flat {
        let capacity = Capacity::DEFAULT;
        let tables = build(entries, generation, &capacity).expect("fits");
        Flat { generation, bases: Bases::of(generation, &capacity), tables }
    }

    /// The longest matching prefix, the slow way.
    fn naive(entries: &[(u8, Ipv4Net, AclEntry)], scope: u8, addr: u32) -> Option<AclEntry> {
        let mut best: Option<(u8, AclEntry)> = None;
        for (s, net, e) in entries {
            if *s == scope && net.contains(&std::net::Ipv4Addr::from(addr)) && best.is_none_or(|(l, _)| net.prefix_len() >= l) {
                best = Some((net.prefix_len(), *e));
            }
        }
        best.map(|(_, e)| e).filter(|e| *e != AclEntry::default())
    }

    /// xorshift64*, enough for reproducible test data.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn nested_prefixes_answer_by_longest_match() {
        let entries = vec![
            (0, net("10.0.0.0/8"), entry(1)),
            (0, net("10.1.0.0/16"), entry(2)),
            (0, net("10.1.2.0/24"), entry(3)),
            (0, net("10.1.2.128/25"), entry(4)),
            (0, net("10.1.2.200/32"), entry(5)),
            (1, net("0.0.0.0/0"), entry(6)),
            (2, net("255.255.255.255/32"), entry(7)),
        ];
        for generation in [0, 1] {
            let f = flat(&entries, generation);
            let at = |scope, a: &str| lookup(&f, generation, scope, u32::from(a.parse::<std::net::Ipv4Addr>().unwrap()));
            assert_eq!(at(0, "10.9.9.9"), Some(entry(1)));
            assert_eq!(at(0, "10.1.9.9"), Some(entry(2)));
            assert_eq!(at(0, "10.1.2.1"), Some(entry(3)));
            assert_eq!(at(0, "10.1.2.199"), Some(entry(4)));
            assert_eq!(at(0, "10.1.2.200"), Some(entry(5)));
            assert_eq!(at(0, "10.1.2.201"), Some(entry(4)));
            assert_eq!(at(0, "10.1.3.0"), Some(entry(2)));
            assert_eq!(at(0, "11.0.0.0"), None);
            assert_eq!(at(1, "11.0.0.0"), Some(entry(6)));
            assert_eq!(at(2, "255.255.255.255"), Some(entry(7)));
            assert_eq!(at(2, "255.255.255.254"), None);
            assert_eq!(at(3, "10.1.2.200"), None);
        }
    }

    #[test]
    fn random_prefixes_match_a_naive_longest_match() {
        let mut rng = Rng(0x5eed);
        // Clustered in a few /12s so that lookups hit nested prefixes.
        let mut entries = Vec::new();
        for i in 0..3000 {
            let len = (rng.next() % 25) as u8 + 8;
            let addr = (10u32 << 24) | ((rng.next() as u32) & 0x003f_ffff);
            entries.push(((i % 2) as u8, Ipv4Net::new(addr.into(), len).unwrap().trunc(), entry((rng.next() % 7) as u32 + 1)));
        }
        let f = flat(&entries, 1);
        for _ in 0..20_000 {
            let addr = (10u32 << 24) | ((rng.next() as u32) & 0x003f_ffff);
            let scope = (rng.next() % 2) as u8;
            assert_eq!(lookup(&f, 1, scope, addr), naive(&entries, scope, addr), "{} scope {scope}", std::net::Ipv4Addr::from(addr));
        }
        // Every address of the read-back prefixes answers as before, and
        // they are no more than the ranges the prefixes make.
        let back = read_back(&f, 1, 0);
        assert!(back.len() < 3 * entries.len(), "{} prefixes read back from {}", back.len(), entries.len());
        let again: Vec<_> = back.iter().map(|(n, e)| (0u8, *n, *e)).collect();
        let g = flat(&again, 0);
        for _ in 0..20_000 {
            let addr = (10u32 << 24) | ((rng.next() as u32) & 0x003f_ffff);
            assert_eq!(lookup(&g, 0, 0, addr), lookup(&f, 1, 0, addr));
        }
    }

    #[test]
    fn a_prefix_given_twice_keeps_its_last_meaning() {
        let entries = vec![(0, net("192.0.2.0/24"), entry(1)), (0, net("192.0.2.0/24"), entry(2))];
        let f = flat(&entries, 0);
        assert_eq!(lookup(&f, 0, 0, u32::from(std::net::Ipv4Addr::new(192, 0, 2, 9))), Some(entry(2)));
    }

    #[test]
    fn too_many_nodes_is_an_error_naming_the_capacity() {
        let entries: Vec<_> = (0..10u32).map(|i| (0, Ipv4Net::new((i << 16 | 1).into(), 32).unwrap(), entry(1))).collect();
        let small = Capacity { nodes: 5, ..Capacity::DEFAULT };
        let err = build(&entries, 0, &small).unwrap_err();
        assert_eq!((err.what, err.capacity), ("nodes", 5));
        assert!(err.to_string().contains("--acl4-nodes"), "{err}");
    }
}

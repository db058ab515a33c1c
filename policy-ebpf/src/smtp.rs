//! The SMTP command filter: every command line of a client's stream, up to
//! `SCAN_BYTES` of each segment, run through the shared scanner
//! (`policy_common::smtp_scan`) from where the flow's entry in
//! `SMTP_FLOWS` says the stream stands (`policy_common::smtp_flow`).
//!
//! The segment's flow and its payload are written to a per-CPU job with one
//! helper call; a global function then does the rest (lookup, scan,
//! update), so the verifier checks it once, on its own, instead of once per
//! path of the pipeline that reaches it. The scan reads a word at a time:
//! inside a line (the common case) a word without CR or LF is skipped
//! whole; other words step byte by byte.

use aya_ebpf::{
    macros::map,
    maps::{LruHashMap, PerCpuArray},
};
use policy_common::{
    smtp_flow::{self, place, SmtpFlowKey, SmtpFlowState},
    smtp_scan::{self, SCAN_BYTES},
    DEFAULT_SMTP_FLOWS_CAPACITY,
};

use crate::{frame::Frame, opaque::opaque, parse::Flow, stats};

/// What the filter found in a segment.
pub mod found {
    pub const CLEAN: u32 = 0;
    /// A blocked command, whole or completed across segments.
    pub const COMMAND: u32 = 1;
    /// Bytes before the segment were not seen.
    pub const GAP: u32 = 2;
}

/// Bits of [`ScanJob::flags`].
mod job {
    /// Monitor mode: what is found reaches the host all the same.
    pub const MONITOR: u8 = 1 << 0;
    /// A first fragment: the rest of its payload is out of sight, so it
    /// moves no flow state.
    pub const PARTIAL: u8 = 1 << 1;
}

#[repr(C, align(8))]
pub struct ScanJob {
    key: SmtpFlowKey,
    /// Sequence number of the first payload byte.
    start: u32,
    /// Payload bytes of the segment (`bytes` holds the first `SCAN_BYTES`).
    len: u32,
    blocked: u8,
    flags: u8,
    pad: [u8; 6],
    bytes: [u8; SCAN_BYTES],
}
const _: () = assert!(core::mem::offset_of!(ScanJob, bytes) % 8 == 0);
const _: () = assert!(SCAN_BYTES.is_power_of_two());

/// Key 0: the segment being judged. Writer and reader: this module.
#[map]
static SCAN_BUF: PerCpuArray<ScanJob> = PerCpuArray::with_max_entries(1, 0);

/// Where each client stream stands. Writer and reader: this module; the
/// controller sizes it at load time.
#[map]
static SMTP_FLOWS: LruHashMap<SmtpFlowKey, SmtpFlowState> = LruHashMap::with_max_entries(DEFAULT_SMTP_FLOWS_CAPACITY, 0);

const WORDS: usize = SCAN_BYTES / 8;
const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// Does `word` hold a byte equal to `b`? (No false negatives; false
/// positives only make a word take the byte-wise path.)
#[inline(always)]
fn has_byte(word: u64, b: u8) -> bool {
    let x = word ^ (ONES * b as u64);
    x.wrapping_sub(ONES) & !x & HIGHS != 0
}

/// Judges a segment of a command-filtered flow: a [`found`] value. Called
/// for every segment, payload or not: a branch around the call would have
/// the verifier walk the rest of the pipeline once more per side.
#[inline(always)]
pub fn judge<F: Frame>(frame: &F, flow: &Flow, blocked: u8, monitor: bool) -> u32 {
    let Some(j) = SCAN_BUF.get_ptr_mut(0) else { return found::CLEAN };
    let mut n = if flow.payload_len as usize > SCAN_BYTES { SCAN_BYTES as u32 } else { flow.payload_len };
    // SAFETY: per-CPU value, no concurrent user; `bytes` holds SCAN_BYTES >= n.
    unsafe {
        (*j).key = SmtpFlowKey { src: flow.src, dst: flow.dst, sport: flow.seg.sport, dport: flow.seg.dport, v6: flow.seg.v6 as u8, pad: [0; 3] };
        (*j).start = flow.stream_seq;
        (*j).len = flow.payload_len;
        (*j).blocked = blocked;
        (*j).flags = (if monitor { job::MONITOR } else { 0 }) | (if flow.seg.first_fragment { job::PARTIAL } else { 0 });
        if n != 0 {
            // The same value, but not a known one: the verifier tracks the
            // helper's size argument back to the header lengths it came
            // from and would walk every layout separately.
            n = (opaque(n as u64 - 1) & (SCAN_BYTES as u64 - 1)) as u32 + 1;
            if !frame.copy_to(flow.payload_offset, (*j).bytes.as_mut_ptr(), n) {
                (*j).len = 0;
            }
        }
    }
    smtp_judge_job()
}

/// The job's verdict. A global function: verified once, on its own.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn smtp_judge_job() -> u32 {
    let Some(j) = SCAN_BUF.get_ptr_mut(0) else { return found::CLEAN };
    // SAFETY: per-CPU value, no concurrent user; written by `judge`.
    let j = unsafe { &*j };
    let len = j.len;
    if len == 0 {
        return found::CLEAN;
    }
    if len as usize > SCAN_BYTES {
        stats::record_scan_truncated();
    }
    let entry = SMTP_FLOWS.get_ptr_mut(&j.key);
    // SAFETY: an LRU value of the map's type; a racing update on another
    // CPU (the same flow, reordered) costs at worst one stale read.
    let stored = entry.map(|e| unsafe { *e });
    if stored.is_none() {
        stats::record_smtp_flow_miss();
    }
    let plan = smtp_flow::plan(stored, j.start, len);
    let (skip, n) = smtp_flow::window(&plan, len);
    let out = scan(&j.bytes, skip as usize, (skip + n) as usize, j.blocked, plan.from);
    let states = out & smtp_scan::STATES_MASK;
    let hit = out & smtp_scan::BLOCKED != 0 || smtp_scan::verb_at_end(states);
    let held = hit || plan.place == place::GAP;
    if (!held || j.flags & job::MONITOR != 0) && j.flags & job::PARTIAL == 0 {
        let scanned_to_end = skip + n == len;
        if let Some(next) = smtp_flow::next_state(&plan, j.start, len, scanned_to_end, states) {
            match entry {
                // SAFETY: as above.
                Some(e) => unsafe { *e = next },
                None => {
                    let _ = SMTP_FLOWS.insert(&j.key, &next, 0);
                }
            }
        }
    }
    if hit {
        found::COMMAND
    } else if plan.place == place::GAP {
        found::GAP
    } else {
        found::CLEAN
    }
}

/// Scans `bytes[from..to]` from `states`: the states after, with
/// `smtp_scan::BLOCKED` when a command was completed on the way.
#[inline(always)]
fn scan(bytes: &[u8; SCAN_BYTES], from: usize, to: usize, blocked: u8, states: u16) -> u16 {
    let words = bytes.as_ptr() as *const u64;
    let mut states = states;
    let mut hit = 0;
    for w in 0..WORDS {
        let start = w * 8;
        if start >= to {
            break;
        }
        if start + 8 <= from {
            continue;
        }
        // SAFETY: w < WORDS, within the buffer; `bytes` is 8-aligned.
        let word = unsafe { *words.add(w) };
        if smtp_scan::only_in_line(states) && start >= from && start + 8 <= to && !has_byte(word, b'\n') && !has_byte(word, b'\r') {
            continue;
        }
        for i in 0..8 {
            let at = start + i;
            if at >= to {
                break;
            }
            if at < from {
                continue;
            }
            let out = smtp_scan::step(blocked, (word >> (8 * i)) as u8, states);
            hit |= out & smtp_scan::BLOCKED;
            states = out & smtp_scan::STATES_MASK;
        }
    }
    states | hit
}

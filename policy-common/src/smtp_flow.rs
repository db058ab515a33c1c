//! Per-flow state of the SMTP command filter: where each client stream of a
//! command-filtered port stands, so a command split across segments is
//! still found. The rules are here, once, for the kernel and the model.
//!
//! A flow's entry holds the sequence number of the next byte the host is
//! owed (`next`) and the scanner states after the bytes before it. A
//! payload segment at `start`:
//! - no entry (the flow's first data, or its entry was evicted): scanned
//!   from a line start, an entry made if it passes;
//! - `start == next`: scanned from the stored states (in order);
//! - starts before `next`, ends past it: the new bytes from `next` on are
//!   scanned from the stored states (Linux keeps the bytes it already has);
//! - ends at or before `next` (a retransmission): scanned alone, as a line
//!   start or inside a line; it moves nothing;
//! - starts past `next`: bytes in between were not seen, so a command may
//!   span them: out of order, held back (dropped) until the gap is filled;
//!   monitor mode counts it and resynchronises at its end.
//!
//! SYNs and bare ACKs carry no payload and touch no entry.

use crate::{
    reason,
    smtp_scan::{self, States, SCAN_BYTES},
};

/// `SMTP_FLOWS` key: a client stream, addresses in memory order (IPv4 in
/// the first word), ports in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SmtpFlowKey {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub v6: u8,
    pub pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<SmtpFlowKey>() == 40);

impl SmtpFlowKey {
    /// The key of the client stream `src:sport` -> `dst:dport` (both of one
    /// family), as the datapath builds it from the headers.
    pub fn of(src: core::net::IpAddr, dst: core::net::IpAddr, sport: u16, dport: u16) -> Self {
        fn words(addr: core::net::IpAddr) -> [u32; 4] {
            match addr {
                core::net::IpAddr::V4(a) => [u32::from_ne_bytes(a.octets()), 0, 0, 0],
                core::net::IpAddr::V6(a) => {
                    let o = a.octets();
                    core::array::from_fn(|i| u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]))
                }
            }
        }
        Self { src: words(src), dst: words(dst), sport, dport, v6: src.is_ipv6() as u8, pad: [0; 3] }
    }
}

/// `SMTP_FLOWS` value: where the stream stands.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SmtpFlowState {
    /// Sequence number of the next byte not yet seen.
    pub next: u32,
    /// Scanner states after the bytes before `next`.
    pub states: u16,
    pub pad: u16,
}
const _: () = assert!(core::mem::size_of::<SmtpFlowState>() == 8);

/// How a segment stands to its flow's entry.
pub mod place {
    /// No entry: the first data seen of the flow.
    pub const NEW: u8 = 0;
    /// It brings bytes from `next` on (in order, or overlapping old ones).
    pub const ADVANCES: u8 = 1;
    /// Only bytes already seen.
    pub const OLD: u8 = 2;
    /// It starts past `next`.
    pub const GAP: u8 = 3;
}

/// How to scan a segment of `len` payload bytes at `start`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    pub place: u8,
    /// States to scan from.
    pub from: States,
    /// Payload bytes to skip (already seen) before scanning.
    pub skip: u32,
}

/// `a` is later in sequence space than `b` (RFC 1982 serial arithmetic).
#[inline(always)]
pub fn after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// The plan for a segment of `len` (> 0) bytes at `start`, given its
/// flow's entry.
#[inline(always)]
pub fn plan(stored: Option<SmtpFlowState>, start: u32, len: u32) -> Plan {
    let Some(s) = stored else { return Plan { place: place::NEW, from: smtp_scan::AT_LINE_START, skip: 0 } };
    let end = start.wrapping_add(len);
    if after(start, s.next) {
        Plan { place: place::GAP, from: smtp_scan::LINE_OR_START, skip: 0 }
    } else if after(end, s.next) {
        Plan { place: place::ADVANCES, from: s.states, skip: s.next.wrapping_sub(start) }
    } else {
        Plan { place: place::OLD, from: smtp_scan::LINE_OR_START, skip: 0 }
    }
}

/// The scanner's bytes of a segment: `(skip, n)` of the payload's first
/// `SCAN_BYTES`; `n == 0` when all of it was skipped.
#[inline(always)]
pub fn window(plan: &Plan, len: u32) -> (u32, u32) {
    let seen = if len as usize > SCAN_BYTES { SCAN_BYTES as u32 } else { len };
    if plan.skip >= seen {
        (seen, 0)
    } else {
        (plan.skip, seen - plan.skip)
    }
}

/// The entry after a segment that reached the host (`None`: leave it), given
/// the scanner's states at the end of what it scanned. A segment whose end
/// was not scanned (past `SCAN_BYTES`) leaves the states unknown: a line
/// start or inside a line.
#[inline(always)]
pub fn next_state(plan: &Plan, start: u32, len: u32, scanned_to_end: bool, states: States) -> Option<SmtpFlowState> {
    let end = start.wrapping_add(len);
    let states = if scanned_to_end { states } else { smtp_scan::LINE_OR_START };
    match plan.place {
        place::OLD => None,
        place::GAP => Some(SmtpFlowState { next: end, states: smtp_scan::LINE_OR_START, pad: 0 }),
        _ => Some(SmtpFlowState { next: end, states, pad: 0 }),
    }
}

/// What the filter concludes from a scan: [`CLEAN`] or the drop reason,
/// and the flow's new entry (`None`: leave it). `out` is the scan's result
/// (states, or `smtp_scan::BLOCKED` with the states where it stopped at a
/// command) over the window `(skip, n)`; `monitor`: what is held back
/// reaches the host all the same; `partial`: a first fragment, whose rest
/// is out of sight.
#[inline(always)]
pub fn conclude(plan: &Plan, start: u32, len: u32, (skip, n): (u32, u32), out: u16, monitor: bool, partial: bool) -> (u32, Option<SmtpFlowState>) {
    let stopped = out & smtp_scan::BLOCKED != 0;
    let states = out & smtp_scan::STATES_MASK;
    let hit = stopped || smtp_scan::verb_at_end(states);
    let why = if hit {
        reason::SMTP_COMMAND as u32
    } else if plan.place == place::GAP {
        reason::SMTP_OUT_OF_ORDER as u32
    } else {
        CLEAN
    };
    if (why != CLEAN && !monitor) || partial {
        return (why, None);
    }
    (why, next_state(plan, start, len, skip + n == len && !stopped, states))
}

/// [`conclude`]'s answer for a segment the filter passes.
pub const CLEAN: u32 = 0;
const _: () = assert!(reason::SMTP_COMMAND as u32 != CLEAN && reason::SMTP_OUT_OF_ORDER as u32 != CLEAN);

/// Judges a segment of `payload` at `start` against its flow's entry, as
/// the datapath does: the reason or [`CLEAN`], and the new entry.
pub fn judge(stored: Option<SmtpFlowState>, start: u32, payload: &[u8], blocked: u8, monitor: bool, partial: bool) -> (u32, Option<SmtpFlowState>) {
    let len = payload.len() as u32;
    if len == 0 {
        return (CLEAN, None);
    }
    let p = plan(stored, start, len);
    let (skip, n) = window(&p, len);
    let out = smtp_scan::scan_to_block(blocked, p.from, &payload[skip as usize..(skip + n) as usize]);
    conclude(&p, start, len, (skip, n), out, monitor, partial)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;
    use crate::smtp_command;

    const BOTH: u8 = smtp_command::VRFY | smtp_command::EXPN;

    /// Runs segments `(start, bytes)` through the rules with an entry map
    /// of one flow; true where a segment is held back (command or gap).
    fn run(segments: &[(u32, &[u8])]) -> Vec<bool> {
        let mut entry = None;
        segments
            .iter()
            .map(|&(start, bytes)| {
                let (why, next) = judge(entry, start, bytes, BOTH, false, false);
                if next.is_some() {
                    entry = next;
                }
                why != CLEAN
            })
            .collect()
    }

    #[test]
    fn a_command_split_at_any_byte_is_held_back() {
        let stream = b"EHLO x\r\n VRFY root\r\n";
        for cut in 1..stream.len() {
            let held = run(&[(100, &stream[..cut]), (100 + cut as u32, &stream[cut..])]);
            assert!(held.contains(&true), "cut at {cut}: {held:?}");
        }
    }

    #[test]
    fn clean_sessions_pass_in_any_segmentation() {
        let stream = b"EHLO x\r\nMAIL FROM:<vrfy@x>\r\nRCPT TO:<a@b>\r\nDATA\r\n";
        for cut in 1..stream.len() {
            let held = run(&[(7, &stream[..cut]), (7 + cut as u32, &stream[cut..])]);
            assert_eq!(held, [false, false], "cut at {cut}");
        }
    }

    #[test]
    fn an_overlap_is_read_from_where_the_host_stands() {
        // The host keeps the "VR" it has; the overlap's own first bytes differ.
        assert_eq!(run(&[(1, b"VR"), (1, b"xxFY root\r\n")]), [false, true]);
        // A retransmission of what was seen, then more: only the new bytes count.
        assert_eq!(run(&[(1, b"EHLO x\r\n"), (1, b"EHLO x\r\nNOOP\r\n")]), [false, false]);
    }

    #[test]
    fn retransmissions_are_judged_alone_and_move_nothing() {
        assert_eq!(run(&[(1, b"EHLO x\r\nVR"), (1, b"EHLO x\r\n"), (11, b"FY x\r\n")]), [false, false, true]);
        assert_eq!(run(&[(1, b"EHLO x\r\n"), (1, b"VRFY x\r\n")]), [false, true]);
    }

    #[test]
    fn a_gap_is_held_back_and_wraps_in_sequence_space() {
        assert_eq!(run(&[(1, b"EHLO x\r\n"), (20, b"NOOP\r\n")]), [false, true]);
        let near_wrap = u32::MAX - 3;
        assert_eq!(run(&[(near_wrap, b"EHLO x\r\nVR"), (near_wrap.wrapping_add(10), b"FY x\r\n")]), [false, true]);
        assert!(after(2, u32::MAX) && !after(u32::MAX, 2));
    }

    #[test]
    fn the_window_is_the_first_scan_bytes_after_the_skip() {
        let p = |skip| Plan { place: place::ADVANCES, from: 0, skip };
        assert_eq!(window(&p(0), 10), (0, 10));
        assert_eq!(window(&p(4), 10), (4, 6));
        assert_eq!(window(&p(0), 3000), (0, SCAN_BYTES as u32));
        assert_eq!(window(&p(600), 3000), (SCAN_BYTES as u32, 0));
    }
}

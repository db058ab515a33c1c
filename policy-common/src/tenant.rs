//! Tenant interfaces: what each one sends on guarded ports, and sources
//! behind them that keep hitting the egress deny (a compromised VM sending
//! spam tries port 25 over and over: the classic sign an IDC wants to hear
//! about in minutes).
//!
//! `TENANT_STATS` counts packets judged on each tenant interface by
//! (verdict, reason), at the interface's slot, which the controller gives
//! it in `TENANT_IFACES` (ifindex -> slot, 1..=capacity) and clears before
//! giving it again. `TENANT_SOURCES` holds, per (interface, source), its
//! blocked new connections in fixed windows, and whether the current
//! episode was reported.

use crate::{reason, verdict};

/// `TENANT_STATS` cells per slot: one per (verdict, reason).
pub const CELLS: usize = verdict::COUNT * reason::COUNT;

/// The `TENANT_STATS` cell of a slot's (verdict, reason).
#[inline(always)]
pub const fn cell(slot: u32, verdict: u8, reason: u8) -> u32 {
    slot * CELLS as u32 + verdict as u32 * reason::COUNT as u32 + reason as u32
}

/// `TENANT_SOURCES` key: a source behind a tenant interface. Address words
/// in memory order, IPv4 in the first.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SourceKey {
    pub src: [u32; 4],
    pub ifindex: u32,
    pub v6: u8,
    pub pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<SourceKey>() == 24);

/// `TENANT_SOURCES` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceState {
    /// Start of the current window, s of the datapath's clock.
    pub window_start_s: u32,
    /// Blocked new connections in the current window.
    pub blocked: u32,
    /// Non-zero once the current episode was reported.
    pub reported: u32,
    /// The last blocked connection, s.
    pub last_s: u32,
}
const _: () = assert!(core::mem::size_of::<SourceState>() == 16);

/// A source's state after one more blocked new connection at `now_s`, and
/// whether that starts a suspect episode to report: more than `threshold`
/// in a window of `window_s`. An episode lasts as long as its windows stay
/// over the threshold; a window at or under it, or a whole quiet window,
/// ends it, so the next one is reported again.
#[inline(always)]
pub fn on_blocked(stored: Option<SourceState>, now_s: u32, threshold: u32, window_s: u32) -> (SourceState, bool) {
    let mut s = match stored {
        Some(s) => s,
        None => SourceState { window_start_s: now_s, blocked: 0, reported: 0, last_s: now_s },
    };
    let window_s = if window_s == 0 { 1 } else { window_s };
    let age = now_s.wrapping_sub(s.window_start_s);
    if age >= window_s {
        if s.blocked <= threshold || age >= 2 * window_s {
            s.reported = 0;
        }
        s.window_start_s = now_s;
        s.blocked = 0;
    }
    s.blocked = s.blocked.saturating_add(1);
    s.last_s = now_s;
    let report = s.blocked > threshold && s.reported == 0;
    if report {
        s.reported = 1;
    }
    (s, report)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;

    /// Reports over `attempts` (seconds at which a connection was blocked).
    fn reports(attempts: &[u32], threshold: u32, window_s: u32) -> usize {
        let mut state = None;
        let mut n = 0;
        for &t in attempts {
            let (s, report) = on_blocked(state, t, threshold, window_s);
            state = Some(s);
            n += report as usize;
        }
        n
    }

    #[test]
    fn one_report_per_episode() {
        // 60 attempts in 30 s, threshold 50 in 300 s: one report.
        let burst: Vec<u32> = (0..60).map(|i| 1000 + i / 2).collect();
        assert_eq!(reports(&burst, 50, 300), 1);
        // The same rate for 20 minutes: still one episode.
        let steady: Vec<u32> = (0..2400).map(|i| 1000 + i / 2).collect();
        assert_eq!(reports(&steady, 50, 300), 1);
        // Two bursts an hour apart: two episodes.
        let two: Vec<u32> = burst.iter().copied().chain(burst.iter().map(|t| t + 3600)).collect();
        assert_eq!(reports(&two, 50, 300), 2);
        // At the threshold: nothing.
        let at: Vec<u32> = (0..50).map(|i| 1000 + i).collect();
        assert_eq!(reports(&at, 50, 300), 0);
    }

    #[test]
    fn a_window_under_the_threshold_ends_the_episode() {
        let mut t: Vec<u32> = (0..60).map(|i| 1000 + i).collect();
        // Next window: only 10.
        t.extend((0..10).map(|i| 1300 + i));
        // The window after: 60 again, a new episode.
        t.extend((0..60).map(|i| 1600 + i));
        assert_eq!(reports(&t, 50, 300), 2);
    }

    #[test]
    fn cells_are_distinct_per_slot() {
        assert_eq!(cell(0, verdict::COUNT as u8 - 1, reason::COUNT as u8 - 1) + 1, cell(1, 0, 0));
    }
}

//! What happened when, in bounded memory: counts per time bucket, whose
//! width grows with the period seen, and the earliest few events of a kind
//! kept in full.

use std::collections::{BTreeMap, BinaryHeap};

/// Most buckets: when the period seen would need more, buckets widen.
pub const MAX_BUCKETS: i64 = 120;

/// Bucket widths in seconds, each a multiple of the one before (so buckets
/// merge whole); past the last, widths grow fourfold.
const WIDTHS: [i64; 7] = [60, 300, 900, 3600, 6 * 3600, 86_400, 7 * 86_400];

/// The columns of the timeline.
#[derive(Clone, Copy, Debug)]
pub enum Column {
    /// A sampled drop (`drop` or `would_drop`).
    Drop,
    /// `ban_added` or `manual_ban`.
    Ban,
    RateTrip,
    Reload,
    Suspect,
    /// Any other event.
    Other,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub events: u64,
    pub drops: u64,
    pub bans: u64,
    pub rate_trips: u64,
    pub reloads: u64,
    pub suspects: u64,
}

impl Counts {
    fn add(&mut self, column: Column) {
        self.events += 1;
        match column {
            Column::Drop => self.drops += 1,
            Column::Ban => self.bans += 1,
            Column::RateTrip => self.rate_trips += 1,
            Column::Reload => self.reloads += 1,
            Column::Suspect => self.suspects += 1,
            Column::Other => {}
        }
    }

    fn merge(&mut self, o: &Counts) {
        self.events += o.events;
        self.drops += o.drops;
        self.bans += o.bans;
        self.rate_trips += o.rate_trips;
        self.reloads += o.reloads;
        self.suspects += o.suspects;
    }
}

/// Counts per bucket of `width_s` seconds (aligned to multiples of it since
/// 1970), at most [`MAX_BUCKETS`] from the first to the last.
pub struct Timeline {
    width_s: i64,
    buckets: BTreeMap<i64, Counts>,
}

impl Default for Timeline {
    fn default() -> Self {
        Self { width_s: WIDTHS[0], buckets: BTreeMap::new() }
    }
}

impl Timeline {
    /// Counts an event at `ms` (since 1970) in `column`.
    pub fn count(&mut self, ms: i64, column: Column) {
        let start = ms.div_euclid(1000).div_euclid(self.width_s) * self.width_s;
        self.buckets.entry(start).or_default().add(column);
        if self.span() > MAX_BUCKETS {
            self.widen();
        }
    }

    /// Buckets from the first to the last, empty ones included.
    fn span(&self) -> i64 {
        match (self.buckets.first_key_value(), self.buckets.last_key_value()) {
            (Some((first, _)), Some((last, _))) => (last - first) / self.width_s + 1,
            _ => 0,
        }
    }

    fn widen(&mut self) {
        while self.span() > MAX_BUCKETS {
            self.width_s = WIDTHS.iter().copied().find(|w| *w > self.width_s).unwrap_or(self.width_s.saturating_mul(4));
            let mut merged: BTreeMap<i64, Counts> = BTreeMap::new();
            for (start, counts) in std::mem::take(&mut self.buckets) {
                merged.entry(start.div_euclid(self.width_s) * self.width_s).or_default().merge(&counts);
            }
            self.buckets = merged;
        }
    }

    pub fn width_s(&self) -> i64 {
        self.width_s
    }

    /// Every bucket from the first to the last (start in seconds since
    /// 1970), empty ones as zeros.
    pub fn buckets(&self) -> Vec<(i64, Counts)> {
        let (Some((&first, _)), Some((&last, _))) = (self.buckets.first_key_value(), self.buckets.last_key_value()) else { return Vec::new() };
        (0..=(last - first) / self.width_s)
            .map(|i| {
                let start = first + i * self.width_s;
                (start, self.buckets.get(&start).copied().unwrap_or_default())
            })
            .collect()
    }
}

/// The `limit` earliest items offered (by time, then by order offered),
/// and how many others were left out.
pub struct Earliest<T> {
    limit: usize,
    heap: BinaryHeap<Timed<T>>,
    offered: u64,
}

struct Timed<T> {
    at: (i64, u64),
    item: T,
}

impl<T> PartialEq for Timed<T> {
    fn eq(&self, o: &Self) -> bool {
        self.at == o.at
    }
}
impl<T> Eq for Timed<T> {}
impl<T> PartialOrd for Timed<T> {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl<T> Ord for Timed<T> {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.at.cmp(&o.at)
    }
}

impl<T> Earliest<T> {
    pub fn new(limit: usize) -> Self {
        Self { limit, heap: BinaryHeap::new(), offered: 0 }
    }

    /// Offers an item at `ms`; `make` runs only when it is kept.
    pub fn offer(&mut self, ms: i64, make: impl FnOnce() -> T) {
        let at = (ms, self.offered);
        self.offered += 1;
        if self.heap.len() < self.limit {
            self.heap.push(Timed { at, item: make() });
        } else if self.heap.peek().is_some_and(|latest| at < latest.at) {
            self.heap.pop();
            self.heap.push(Timed { at, item: make() });
        }
    }

    /// The items kept, earliest first, and how many were left out.
    pub fn finish(self) -> (Vec<T>, u64) {
        let omitted = self.offered - self.heap.len() as u64;
        (self.heap.into_sorted_vec().into_iter().map(|t| t.item).collect(), omitted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_start_at_a_minute_and_widen_to_stay_bounded() {
        let mut t = Timeline::default();
        let t0 = 1_796_000_000_000i64; // ms
        t.count(t0, Column::Drop);
        t.count(t0 + 59_000, Column::Ban);
        t.count(t0 + 3 * 60_000, Column::Reload);
        assert_eq!(t.width_s(), 60);
        let b = t.buckets();
        assert_eq!(b.len(), 4, "empty minutes in between are there: {b:?}");
        assert_eq!(b.iter().map(|(_, c)| c.events).sum::<u64>(), 3);
        // 72 hours of events: hourly buckets, nothing lost.
        let mut t = Timeline::default();
        for h in 0..72 {
            for m in [0, 17, 59] {
                t.count(t0 + (h * 3600 + m * 60) * 1000, Column::Drop);
            }
        }
        assert_eq!(t.width_s(), 3600);
        let b = t.buckets();
        assert!(b.len() as i64 <= MAX_BUCKETS && b.len() >= 72, "{}", b.len());
        assert_eq!(b.iter().map(|(_, c)| c.drops).sum::<u64>(), 216);
        assert!(b.iter().all(|(start, _)| start % 3600 == 0));
        // Two events years apart still make at most MAX_BUCKETS.
        t.count(t0 + 5 * 365 * 86_400_000, Column::Other);
        assert!(t.buckets().len() as i64 <= MAX_BUCKETS);
        assert_eq!(t.buckets().iter().map(|(_, c)| c.events).sum::<u64>(), 217);
    }

    #[test]
    fn the_earliest_are_kept_in_time_order_and_the_rest_counted() {
        let mut e = Earliest::new(3);
        for (i, ms) in [50, 10, 40, 10, 30, 60].into_iter().enumerate() {
            e.offer(ms, || (ms, i));
        }
        assert_eq!(e.finish(), (vec![(10, 1), (10, 3), (30, 4)], 3));
    }
}

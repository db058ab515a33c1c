//! The most frequent keys of a stream in a fixed number of counters:
//! Space-Saving (Metwally, Agrawal, El Abbadi, "Efficient computation of
//! frequent and top-k elements in data streams", 2005).
//!
//! Each of `capacity` counters holds a key, its count and the most that
//! count can be over the truth (`error`). A key not held takes over the
//! counter with the smallest count `m`: its count becomes `m + 1` and its
//! error `m`. So for every key held, `count - error <= true count <= count`;
//! every error is at most `total / capacity`; every key whose true count is
//! over `total / capacity` is held; and while no more distinct keys came
//! than there are counters, nothing is taken over and every count is exact
//! (error 0).
//!
//! The counters are kept in one array sorted by count, with the last
//! position of each count's run: an increment swaps the counter to the end
//! of its run and the run boundary moves, so each key costs one hash lookup
//! and O(1) work, however many distinct keys the stream has (a heap would
//! sift through the long runs of equal smallest counts a stream of
//! millions of one-off sources makes).

use std::{
    borrow::Borrow,
    collections::HashMap,
    hash::Hash,
};

struct Counter<K, D> {
    /// `None` while the counter was never used.
    key: Option<K>,
    count: u64,
    error: u64,
    /// Where it is in `order`.
    pos: u32,
    detail: D,
}

/// Space-Saving with a detail `D` per counter (such as reasons seen), reset
/// when a counter changes hands.
pub struct SpaceSaving<K, D> {
    counters: Vec<Counter<K, D>>,
    /// Counter indices by count, ascending.
    order: Vec<u32>,
    /// The last position in `order` of each count held.
    run_end: HashMap<u64, u32>,
    index: HashMap<K, u32>,
    total: u64,
    evictions: u64,
}

/// One counter, as [`SpaceSaving::entries`] gives them.
pub struct Entry<'s, K, D> {
    pub key: &'s K,
    pub count: u64,
    /// The most `count` can be over the key's true count (0: exact).
    pub error: u64,
    pub detail: &'s D,
}

impl<K: Hash + Eq, D: Default> SpaceSaving<K, D> {
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.clamp(1, u32::MAX as usize);
        let counters = (0..capacity).map(|i| Counter { key: None, count: 0, error: 0, pos: i as u32, detail: D::default() }).collect();
        let mut run_end = HashMap::new();
        run_end.insert(0, (capacity - 1) as u32);
        Self { counters, order: (0..capacity as u32).collect(), run_end, index: HashMap::with_capacity(capacity), total: 0, evictions: 0 }
    }

    /// Counts one occurrence of `key`; its counter's detail, to add to.
    pub fn add<Q>(&mut self, key: &Q) -> &mut D
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        self.total += 1;
        let c = match self.index.get(key) {
            Some(&c) => c,
            None => {
                // The counter with the smallest count changes hands.
                let c = self.order[0];
                let counter = &mut self.counters[c as usize];
                if let Some(old) = counter.key.take() {
                    self.index.remove::<K>(&old);
                    self.evictions += 1;
                }
                counter.key = Some(key.to_owned());
                counter.error = counter.count;
                counter.detail = D::default();
                self.index.insert(key.to_owned(), c);
                c
            }
        };
        self.increment(c);
        &mut self.counters[c as usize].detail
    }

    /// Moves counter `c` to the end of its count's run, then counts one more.
    fn increment(&mut self, c: u32) {
        let count = self.counters[c as usize].count;
        let p = self.counters[c as usize].pos;
        let q = self.run_end[&count];
        let other = self.order[q as usize];
        self.order.swap(p as usize, q as usize);
        self.counters[other as usize].pos = p;
        self.counters[c as usize].pos = q;
        if q == 0 || self.counters[self.order[q as usize - 1] as usize].count != count {
            self.run_end.remove(&count);
        } else {
            self.run_end.insert(count, q - 1);
        }
        self.counters[c as usize].count = count + 1;
        self.run_end.entry(count + 1).or_insert(q);
    }

    /// Occurrences counted.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Keys that took over another's counter; 0 means every count is exact.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    pub fn capacity(&self) -> usize {
        self.counters.len()
    }

    /// Keys held.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// The `n` keys with the highest counts, highest first (ties by key).
    pub fn top(&self, n: usize) -> Vec<Entry<'_, K, D>>
    where
        K: Ord,
    {
        let mut all: Vec<Entry<'_, K, D>> = self
            .counters
            .iter()
            .filter_map(|c| Some(Entry { key: c.key.as_ref()?, count: c.count, error: c.error, detail: &c.detail }))
            .collect();
        all.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.key.cmp(b.key)));
        all.truncate(n);
        all
    }

    /// The count and error of `key`, when held.
    #[cfg(test)]
    pub fn get<Q>(&self, key: &Q) -> Option<(u64, u64)>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.index.get(key).map(|&c| (self.counters[c as usize].count, self.counters[c as usize].error))
    }

    /// The order and run boundaries are what they claim.
    #[cfg(test)]
    fn check(&self) {
        for (p, &c) in self.order.iter().enumerate() {
            assert_eq!(self.counters[c as usize].pos as usize, p);
            if p > 0 {
                assert!(self.counters[self.order[p - 1] as usize].count <= self.counters[c as usize].count);
            }
            let count = self.counters[c as usize].count;
            let last = p + 1 == self.order.len() || self.counters[self.order[p + 1] as usize].count != count;
            assert_eq!(last, self.run_end.get(&count) == Some(&(p as u32)), "run end of {count} at {p}");
        }
        assert_eq!(self.run_end.len(), self.order.windows(2).filter(|w| self.counters[w[0] as usize].count != self.counters[w[1] as usize].count).count() + 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift64, for repeatable streams.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn counts_are_exact_while_the_distinct_keys_fit() {
        let mut s: SpaceSaving<u64, u64> = SpaceSaving::new(64);
        let mut truth = HashMap::new();
        let mut rng = Rng(7);
        for _ in 0..20_000 {
            let k = rng.next() % 64;
            *s.add(&k) += 1;
            *truth.entry(k).or_insert(0u64) += 1;
        }
        s.check();
        assert_eq!(s.evictions(), 0);
        assert_eq!(s.len(), 64);
        for (k, n) in &truth {
            assert_eq!(s.get(k), Some((*n, 0)), "key {k}");
        }
        // The detail counted each add since the key came: all of them.
        assert!(s.top(64).iter().all(|e| *e.detail == e.count));
        let top = s.top(3);
        assert!(top.windows(2).all(|w| w[0].count >= w[1].count));
    }

    #[test]
    fn heavy_hitters_are_held_and_errors_stay_in_their_bound() {
        let capacity = 100;
        let mut s: SpaceSaving<u64, ()> = SpaceSaving::new(capacity);
        let mut truth: HashMap<u64, u64> = HashMap::new();
        let mut rng = Rng(42);
        for i in 0..200_000u64 {
            // Five heavy hitters, 30% of the stream; the rest one-off or rare keys.
            let k = if rng.next() % 10 < 3 { rng.next() % 5 } else { 1000 + rng.next() % 50_000 };
            s.add(&k);
            *truth.entry(k).or_insert(0) += 1;
            if i % 50_000 == 0 {
                s.check();
            }
        }
        s.check();
        let total = s.total();
        assert_eq!(total, 200_000);
        assert!(s.evictions() > 0);
        for e in s.top(capacity) {
            let t = truth[e.key];
            assert!(e.count - e.error <= t && t <= e.count, "key {}: count {} error {} truth {t}", e.key, e.count, e.error);
            assert!(e.error <= total / capacity as u64, "error {} over total/capacity", e.error);
        }
        for (k, t) in &truth {
            if *t > total / capacity as u64 {
                assert!(s.get(k).is_some(), "key {k} with {t} (over total/capacity) is held");
            }
        }
        let top: Vec<u64> = s.top(5).iter().map(|e| *e.key).collect();
        let mut sorted = top.clone();
        sorted.sort();
        assert_eq!(sorted, vec![0, 1, 2, 3, 4], "the five heavy hitters rank first");
    }

    #[test]
    fn one_counter_still_counts() {
        let mut s: SpaceSaving<String, ()> = SpaceSaving::new(1);
        s.add("a");
        s.add("a");
        s.add("b");
        s.check();
        assert_eq!(s.get("b"), Some((3, 2)));
        assert_eq!(s.get("a"), None);
    }
}

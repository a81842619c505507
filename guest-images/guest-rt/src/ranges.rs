//! Sets of disjoint address ranges with a fixed capacity (no allocator).

use core::fmt;

/// `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Range {
    pub start: u64,
    pub end: u64,
}

impl Range {
    pub const fn new(start: u64, end: u64) -> Self {
        Range { start, end }
    }

    pub fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    pub fn contains(&self, a: u64) -> bool {
        self.start <= a && a < self.end
    }

    pub fn intersect(&self, o: &Range) -> Range {
        Range { start: self.start.max(o.start), end: self.end.min(o.end) }
    }

    /// The largest sub-range whose ends are multiples of `align` (a power of two).
    pub fn shrink_to(&self, align: u64) -> Range {
        Range { start: crate::align_up(self.start, align), end: crate::align_down(self.end, align) }
    }

    /// The smallest range whose ends are multiples of `align` (a power of two).
    pub fn grow_to(&self, align: u64) -> Range {
        Range { start: crate::align_down(self.start, align), end: crate::align_up(self.end, align) }
    }
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}-{:#x}", self.start, self.end)
    }
}

/// Disjoint, sorted, non-empty ranges; at most `N` (further ranges are dropped and counted).
#[derive(Clone, Copy, Debug)]
pub struct RangeSet<const N: usize> {
    r: [Range; N],
    n: usize,
    /// Ranges (or pieces) that did not fit.
    pub dropped: usize,
}

impl<const N: usize> Default for RangeSet<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> RangeSet<N> {
    pub const fn new() -> Self {
        RangeSet { r: [Range::new(0, 0); N], n: 0, dropped: 0 }
    }

    pub fn as_slice(&self) -> &[Range] {
        &self.r[..self.n]
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    pub fn total(&self) -> u64 {
        self.as_slice().iter().map(Range::len).sum()
    }

    /// Adds `x`, merging it with the ranges it overlaps or touches.
    pub fn add(&mut self, x: Range) {
        if x.is_empty() {
            return;
        }
        let mut x = x;
        let mut out = [Range::default(); N];
        let mut m = 0;
        let mut placed = false;
        let cur = self.r;
        for &r in &cur[..self.n] {
            if r.end < x.start {
                Self::push(&mut out, &mut m, r, &mut self.dropped);
            } else if x.end < r.start {
                if !placed {
                    Self::push(&mut out, &mut m, x, &mut self.dropped);
                    placed = true;
                }
                Self::push(&mut out, &mut m, r, &mut self.dropped);
            } else {
                x = Range::new(x.start.min(r.start), x.end.max(r.end));
            }
        }
        if !placed {
            Self::push(&mut out, &mut m, x, &mut self.dropped);
        }
        self.r = out;
        self.n = m;
    }

    /// Removes `x` from every range.
    pub fn subtract(&mut self, x: Range) {
        if x.is_empty() {
            return;
        }
        let mut out = [Range::default(); N];
        let mut m = 0;
        let cur = self.r;
        for &r in &cur[..self.n] {
            let lo = Range::new(r.start, r.end.min(x.start));
            let hi = Range::new(r.start.max(x.end), r.end);
            if !lo.is_empty() {
                Self::push(&mut out, &mut m, lo, &mut self.dropped);
            }
            if !hi.is_empty() {
                Self::push(&mut out, &mut m, hi, &mut self.dropped);
            }
        }
        self.r = out;
        self.n = m;
    }

    /// Keeps only what lies inside `x`.
    pub fn clip(&mut self, x: Range) {
        self.subtract(Range::new(0, x.start));
        self.subtract(Range::new(x.end, u64::MAX));
    }

    fn push(out: &mut [Range; N], m: &mut usize, r: Range, dropped: &mut usize) {
        if *m < N {
            out[*m] = r;
            *m += 1;
        } else {
            *dropped += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(rs: &[(u64, u64)]) -> RangeSet<8> {
        let mut s = RangeSet::new();
        for &(a, b) in rs {
            s.add(Range::new(a, b));
        }
        s
    }

    fn pairs<const N: usize>(s: &RangeSet<N>) -> Vec<(u64, u64)> {
        s.as_slice().iter().map(|r| (r.start, r.end)).collect()
    }

    #[test]
    fn add_merges_and_sorts() {
        assert_eq!(pairs(&set(&[(10, 20), (0, 5), (30, 40)])), vec![(0, 5), (10, 20), (30, 40)]);
        assert_eq!(pairs(&set(&[(10, 20), (20, 30)])), vec![(10, 30)]);
        assert_eq!(pairs(&set(&[(10, 20), (0, 50), (60, 70)])), vec![(0, 50), (60, 70)]);
        assert_eq!(pairs(&set(&[(10, 10)])), vec![]);
    }

    #[test]
    fn subtract_and_clip() {
        let mut s = set(&[(0, 100)]);
        s.subtract(Range::new(10, 20));
        s.subtract(Range::new(90, 200));
        s.subtract(Range::new(0, 5));
        assert_eq!(pairs(&s), vec![(5, 10), (20, 90)]);
        assert_eq!(s.total(), 75);
        s.clip(Range::new(8, 30));
        assert_eq!(pairs(&s), vec![(8, 10), (20, 30)]);
    }

    #[test]
    fn overflow_is_counted() {
        let mut s: RangeSet<2> = RangeSet::new();
        s.add(Range::new(0, 100));
        s.subtract(Range::new(10, 20));
        s.subtract(Range::new(30, 40));
        assert_eq!(s.len(), 2);
        assert_eq!(s.dropped, 1);
    }

    #[test]
    fn alignment() {
        let r = Range::new(0x1001, 0x5fff);
        assert_eq!(r.shrink_to(0x1000), Range::new(0x2000, 0x5000));
        assert_eq!(r.grow_to(0x1000), Range::new(0x1000, 0x6000));
        assert!(Range::new(0x1001, 0x1fff).shrink_to(0x1000).is_empty());
    }
}

//! `Region`: a range of physical addresses as the device tree describes them (`reg` entries,
//! /memreserve/ entries, boot modules).
//!
//! It owns only the arithmetic on one range. Its invariant is that `base + size` fits in a `u64`,
//! so `end()` can never overflow; it must never be built from untrusted numbers without
//! [`Region::new`]'s check.

use core::fmt;

/// A physical address range `[base, base + size)`, with `base + size <= u64::MAX`.
///
/// `Region::default()` is the empty range at 0; every region the device-tree parser produces is
/// non-empty.
#[derive(Clone, Copy, PartialEq, Eq, Default, Hash, PartialOrd, Ord)]
pub struct Region {
    base: u64,
    size: u64,
}

impl Region {
    /// `[base, base + size)`, or `None` when `size` is zero or the end does not fit in 64 bits.
    pub const fn new(base: u64, size: u64) -> Option<Region> {
        if size == 0 {
            return None;
        }
        match base.checked_add(size) {
            Some(_) => Some(Region { base, size }),
            None => None,
        }
    }

    /// `[base, end)`, or `None` when `end <= base`.
    pub const fn from_bounds(base: u64, end: u64) -> Option<Region> {
        if end > base {
            Some(Region { base, size: end - base })
        } else {
            None
        }
    }

    /// First address.
    pub const fn base(&self) -> u64 {
        self.base
    }

    /// Number of bytes.
    pub const fn size(&self) -> u64 {
        self.size
    }

    /// One past the last address (never overflows, by the invariant).
    pub const fn end(&self) -> u64 {
        self.base + self.size
    }

    /// Last address (inclusive), as printed in logs.
    pub const fn last(&self) -> u64 {
        self.end().saturating_sub(1)
    }

    /// True for the empty region (only `Region::default()`).
    pub const fn is_empty(&self) -> bool {
        self.size == 0
    }

    /// True when the two ranges share at least one byte.
    pub fn overlaps(&self, other: &Region) -> bool {
        !self.is_empty() && !other.is_empty() && self.base < other.end() && other.base < self.end()
    }

    /// True when `other` lies entirely inside `self`.
    pub fn contains(&self, other: &Region) -> bool {
        other.base >= self.base && other.end() <= self.end()
    }

    /// The bytes both ranges share, if any.
    pub fn intersection(&self, other: &Region) -> Option<Region> {
        Region::from_bounds(self.base.max(other.base), self.end().min(other.end()))
    }
}

impl fmt::Debug for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}..{:#x}", self.base, self.end())
    }
}

impl fmt::Display for Region {
    /// `0x40000000-0x7fffffff`: inclusive bounds, at least 8 hex digits.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#010x}-{:#010x}", self.base, self.last())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_rejects_empty_and_overflowing_ranges() {
        assert_eq!(Region::new(0x1000, 0), None);
        assert_eq!(Region::new(u64::MAX, 1), None);
        assert_eq!(Region::new(u64::MAX - 1, 2), None);
        let top = Region::new(u64::MAX - 1, 1).unwrap();
        assert_eq!(top.end(), u64::MAX);
        assert_eq!(top.last(), u64::MAX - 1);
    }

    #[test]
    fn overlap_and_intersection() {
        let a = Region::new(0x1000, 0x1000).unwrap();
        let b = Region::new(0x1800, 0x1000).unwrap();
        let c = Region::new(0x2000, 0x1000).unwrap();
        assert!(a.overlaps(&b));
        assert!(!a.overlaps(&c), "adjacent ranges do not overlap");
        assert_eq!(a.intersection(&b), Region::new(0x1800, 0x800));
        assert_eq!(a.intersection(&c), None);
        assert!(Region::new(0, 0x4000).unwrap().contains(&b));
        assert!(!a.contains(&b));
    }

    #[test]
    fn display_is_inclusive_with_eight_digits_minimum() {
        let r = Region::new(0x4000_0000, 0x4000_0000).unwrap();
        assert_eq!(format!("{r}"), "0x40000000-0x7fffffff");
        let low = Region::new(0x1000, 0x1000).unwrap();
        assert_eq!(format!("{low}"), "0x00001000-0x00001fff");
        let high = Region::new(0x1_0000_0000, 0x1000).unwrap();
        assert_eq!(format!("{high}"), "0x100000000-0x100000fff");
    }
}

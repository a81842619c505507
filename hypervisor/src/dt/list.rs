//! `FixedList`: a bounded, heap-free list used for everything the device tree (and the memory map
//! built from it) can describe a variable number of.
//!
//! It owns only its inline array. It must never allocate, and never panic: a push beyond the
//! capacity is an error the caller turns into a message, not a crash.

use core::fmt;

/// Returned by [`FixedList::push`] when the list is already full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

/// A list of at most `N` `Copy` items stored inline. Slots past `len` hold a filler value that is
/// never exposed.
#[derive(Clone, Copy)]
pub struct FixedList<T: Copy, const N: usize> {
    items: [T; N],
    len: usize,
}

impl<T: Copy, const N: usize> FixedList<T, N> {
    /// The list's capacity.
    pub const CAPACITY: usize = N;

    /// An empty list whose unused slots hold `filler` (for item types without a `Default`).
    pub const fn filled(filler: T) -> Self {
        Self { items: [filler; N], len: 0 }
    }

    /// An empty list.
    pub fn new() -> Self
    where
        T: Default,
    {
        Self::filled(T::default())
    }

    /// Appends `item`, or returns [`Full`] (leaving the list unchanged) when there is no room.
    pub fn push(&mut self, item: T) -> Result<(), Full> {
        let slot = self.items.get_mut(self.len).ok_or(Full)?;
        *slot = item;
        self.len += 1;
        Ok(())
    }

    /// Number of items.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the list holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// True when a push would fail.
    pub fn is_full(&self) -> bool {
        self.len >= N
    }

    /// The items, in insertion order (or sorted order after [`FixedList::sort_by_key`]).
    pub fn as_slice(&self) -> &[T] {
        self.items.get(..self.len).unwrap_or_default()
    }

    /// The item at `index`, if there is one.
    pub fn get(&self, index: usize) -> Option<&T> {
        self.as_slice().get(index)
    }

    /// The items in order.
    pub fn iter(&self) -> core::slice::Iter<'_, T> {
        self.as_slice().iter()
    }

    /// Forgets every item.
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Sorts the items by `key` (equal keys may be reordered).
    pub fn sort_by_key<K: Ord>(&mut self, key: impl FnMut(&T) -> K) {
        let live = self.items.get_mut(..self.len).unwrap_or_default();
        live.sort_unstable_by_key(key);
    }
}

impl<T: Copy + Default, const N: usize> Default for FixedList<T, N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Copy, const N: usize> core::ops::Deref for FixedList<T, N> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        self.as_slice()
    }
}

impl<T: Copy + fmt::Debug, const N: usize> fmt::Debug for FixedList<T, N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<T: Copy + Eq, const N: usize> Eq for FixedList<T, N> {}

impl<T: Copy + PartialEq, const N: usize> PartialEq for FixedList<T, N> {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_until_full_then_refuse() {
        let mut l: FixedList<u32, 2> = FixedList::new();
        assert!(l.is_empty());
        assert_eq!(l.push(1), Ok(()));
        assert_eq!(l.push(2), Ok(()));
        assert!(l.is_full());
        assert_eq!(l.push(3), Err(Full));
        assert_eq!(l.len(), 2);
        assert_eq!(l.iter().copied().collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(l.get(1), Some(&2));
        assert_eq!(l.get(2), None);
    }

    #[test]
    fn sort_and_clear() {
        let mut l: FixedList<u32, 4> = FixedList::new();
        for v in [3, 1, 2] {
            l.push(v).unwrap();
        }
        l.sort_by_key(|v| *v);
        assert_eq!(l.iter().copied().collect::<Vec<_>>(), vec![1, 2, 3]);
        l.clear();
        assert!(l.is_empty());
        assert_eq!(l.iter().count(), 0);
    }

    #[test]
    fn zero_capacity_list_is_always_full() {
        let mut l: FixedList<u8, 0> = FixedList::new();
        assert!(l.is_full());
        assert_eq!(l.push(1), Err(Full));
    }
}

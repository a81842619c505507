//! Property values: numbers, strings, string lists, `#address-cells`/`#size-cells`, `reg`
//! entries and their translation through parent buses' `ranges`.
//!
//! It owns the interpretation of raw property bytes. It must never assume a length: every value
//! is length-checked before it is read, cell counts are limited to what fits a `u64`, and every
//! address sum is a checked add. Errors name the node and the property.

use super::error::{DtError, Problem};
use super::region::Region;
use super::token::{be32, be64};
use super::tree::Node;

/// One property: its name and raw value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Property<'a> {
    pub name: &'a str,
    pub value: &'a [u8],
}

impl<'a> Property<'a> {
    /// The value as one big-endian cell, if it is exactly 4 bytes.
    pub fn as_u32(&self) -> Option<u32> {
        if self.value.len() == 4 {
            be32(self.value, 0)
        } else {
            None
        }
    }

    /// The value as two big-endian cells, if it is exactly 8 bytes.
    pub fn as_u64(&self) -> Option<u64> {
        if self.value.len() == 8 {
            be64(self.value, 0)
        } else {
            None
        }
    }

    /// The value as one string: NUL-terminated, no other NUL, UTF-8.
    pub fn as_str(&self) -> Option<&'a str> {
        let (&last, text) = self.value.split_last()?;
        if last != 0 || text.contains(&0) {
            return None;
        }
        core::str::from_utf8(text).ok()
    }

    /// The entries of a string list (`"a\0b\0"`), as raw bytes; a missing final NUL is tolerated.
    pub fn strings(&self) -> impl Iterator<Item = &'a [u8]> + 'a {
        let text = match self.value.split_last() {
            Some((0, text)) => text,
            _ => self.value,
        };
        text.split(|&b| b == 0).filter(|s| !s.is_empty())
    }

    /// True when the string list contains `s`.
    pub fn has_string(&self, s: &str) -> bool {
        self.strings().any(|e| e == s.as_bytes())
    }
}

/// A node's `#address-cells` and `#size-cells`: how many 32-bit cells its children's addresses
/// and sizes take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cells {
    pub address: u32,
    pub size: u32,
}

impl Cells {
    /// The specification's defaults when a node has neither property.
    pub const DEFAULT: Cells = Cells { address: 2, size: 1 };
}

/// A one-cell property such as `#address-cells`, or `None` when absent.
pub(crate) fn u32_prop<'a>(node: &Node<'a>, prop: &'static str) -> Result<Option<u32>, DtError<'a>> {
    match node.property(prop) {
        None => Ok(None),
        Some(p) => p.as_u32().map(Some).ok_or(DtError::Property {
            node: node.path(),
            prop,
            problem: Problem::WrongLength { len: p.value.len(), expected: 4 },
        }),
    }
}

/// A string property, or `None` when absent.
pub(crate) fn str_prop<'a>(node: &Node<'a>, prop: &'static str) -> Result<Option<&'a str>, DtError<'a>> {
    match node.property(prop) {
        None => Ok(None),
        Some(p) => p.as_str().map(Some).ok_or(DtError::Property {
            node: node.path(),
            prop,
            problem: Problem::NotString,
        }),
    }
}

/// `node`'s own cell sizes, each taken from `fallback` when the property is absent.
pub(crate) fn cells_or<'a>(node: &Node<'a>, fallback: Cells) -> Result<Cells, DtError<'a>> {
    Ok(Cells {
        address: u32_prop(node, "#address-cells")?.unwrap_or(fallback.address),
        size: u32_prop(node, "#size-cells")?.unwrap_or(fallback.size),
    })
}

/// `node`'s own cell sizes with the specification's defaults (2 and 1).
pub(crate) fn cells<'a>(node: &Node<'a>) -> Result<Cells, DtError<'a>> {
    cells_or(node, Cells::DEFAULT)
}

/// Checks that `cells` (read from `owner`) describe addresses of 1 or 2 cells and sizes of
/// `min_size` to 2 cells: what a 64-bit physical address and size can hold.
pub(crate) fn check_cells<'a>(owner: &Node<'a>, cells: Cells, min_size: u32) -> Result<Cells, DtError<'a>> {
    if !(1..=2).contains(&cells.address) {
        return Err(DtError::Property {
            node: owner.path(),
            prop: "#address-cells",
            problem: Problem::UnsupportedCells { value: cells.address, min: 1, max: 2 },
        });
    }
    if !(min_size..=2).contains(&cells.size) {
        return Err(DtError::Property {
            node: owner.path(),
            prop: "#size-cells",
            problem: Problem::UnsupportedCells { value: cells.size, min: min_size, max: 2 },
        });
    }
    Ok(cells)
}

/// Reads `n` (0, 1 or 2) cells at `pos` as one number.
fn read_cells(bytes: &[u8], pos: usize, n: u32) -> Option<u64> {
    match n {
        0 => Some(0),
        1 => be32(bytes, pos).map(u64::from),
        2 => be64(bytes, pos),
        _ => None,
    }
}

/// The (address, size) entries of a `reg`-like property; see [`reg`].
#[derive(Clone)]
pub(crate) struct RegEntries<'a> {
    value: &'a [u8],
    cells: Cells,
    pos: usize,
}

impl Iterator for RegEntries<'_> {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        let address = read_cells(self.value, self.pos, self.cells.address)?;
        let size_pos = self.pos.checked_add(self.cells.address as usize * 4)?;
        let size = read_cells(self.value, size_pos, self.cells.size)?;
        self.pos = size_pos.checked_add(self.cells.size as usize * 4)?;
        Some((address, size))
    }
}

/// The entries of `node`'s property `prop` with the given (already checked) cell sizes. Errors
/// when the property is missing or its length is not a whole number of entries.
pub(crate) fn reg<'a>(
    node: &Node<'a>,
    prop: &'static str,
    cells: Cells,
) -> Result<RegEntries<'a>, DtError<'a>> {
    let p = node.property(prop).ok_or(DtError::Property {
        node: node.path(),
        prop,
        problem: Problem::Missing,
    })?;
    let entry = (cells.address as usize + cells.size as usize) * 4;
    if entry == 0 || p.value.len() % entry != 0 {
        return Err(DtError::Property {
            node: node.path(),
            prop,
            problem: Problem::LengthNotMultiple { len: p.value.len(), entry },
        });
    }
    Ok(RegEntries { value: p.value, cells, pos: 0 })
}

/// A non-empty region from a `reg` entry of `node`, or the error naming why it is not one.
pub(crate) fn region<'a>(
    node: &Node<'a>,
    prop: &'static str,
    address: u64,
    size: u64,
) -> Result<Region, DtError<'a>> {
    if size == 0 {
        return Err(DtError::Property { node: node.path(), prop, problem: Problem::ZeroSize { address } });
    }
    Region::new(address, size).ok_or(DtError::Property {
        node: node.path(),
        prop,
        problem: Problem::Overflow { address, size },
    })
}

/// The entries of `node`'s `reg`, read with its parent's cell sizes and translated to CPU
/// physical addresses through every ancestor bus's `ranges`. For device nodes (UART, GIC).
pub(crate) fn device_regions<'a>(node: &Node<'a>) -> Result<DeviceRegions<'a>, DtError<'a>> {
    let parent = node.parent().ok_or(DtError::Property {
        node: node.path(),
        prop: "reg",
        problem: Problem::Unexpected { allowed: "on a node below the root" },
    })?;
    let cells = check_cells(&parent, cells(&parent)?, 1)?;
    Ok(DeviceRegions { node: *node, entries: reg(node, "reg", cells)? })
}

/// Iterator over a device's translated `reg` regions; see [`device_regions`].
pub(crate) struct DeviceRegions<'a> {
    node: Node<'a>,
    entries: RegEntries<'a>,
}

impl<'a> Iterator for DeviceRegions<'a> {
    type Item = Result<Region, DtError<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        let (address, size) = self.entries.next()?;
        Some(region(&self.node, "reg", address, size).and_then(|r| translate(&self.node, r)))
    }
}

/// `r`, a region in `node`'s parent's address space, as a CPU physical region. Each bus between
/// the node and the root must have `ranges` (empty = identity) mapping the whole region.
pub(crate) fn translate<'a>(node: &Node<'a>, r: Region) -> Result<Region, DtError<'a>> {
    let not_mapped = |address| DtError::Property {
        node: node.path(),
        prop: "reg",
        problem: Problem::NotTranslatable { address },
    };
    let mut r = r;
    let Some(mut bus) = node.parent() else { return Ok(r) };
    while let Some(above) = bus.parent() {
        let ranges = bus.property("ranges").ok_or(not_mapped(r.base()))?;
        if !ranges.value.is_empty() {
            let child = check_cells(&bus, cells(&bus)?, 1)?;
            let parent_address = check_cells(&above, cells(&above)?, 0)?.address;
            let entry = (child.address + parent_address + child.size) as usize * 4;
            if ranges.value.len() % entry != 0 {
                return Err(DtError::Property {
                    node: bus.path(),
                    prop: "ranges",
                    problem: Problem::LengthNotMultiple { len: ranges.value.len(), entry },
                });
            }
            let mut mapped = None;
            for pos in (0..ranges.value.len()).step_by(entry) {
                let (Some(child_base), Some(parent_base), Some(size)) = (
                    read_cells(ranges.value, pos, child.address),
                    read_cells(ranges.value, pos + child.address as usize * 4, parent_address),
                    read_cells(ranges.value, pos + (child.address + parent_address) as usize * 4, child.size),
                ) else {
                    break;
                };
                let Some(window) = Region::new(child_base, size) else { continue };
                if window.contains(&r) {
                    let base = parent_base.checked_add(r.base() - child_base);
                    mapped = base.and_then(|b| Region::new(b, r.size()));
                    if mapped.is_some() {
                        break;
                    }
                }
            }
            r = mapped.ok_or(not_mapped(r.base()))?;
        }
        bus = above;
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_need_exact_lengths() {
        let p = Property { name: "x", value: &[0, 0, 0, 7] };
        assert_eq!(p.as_u32(), Some(7));
        assert_eq!(p.as_u64(), None);
        let p = Property { name: "x", value: &[0, 0, 0, 1, 0, 0, 0, 2] };
        assert_eq!(p.as_u64(), Some(0x1_0000_0002));
        assert_eq!(p.as_u32(), None);
        assert_eq!(Property { name: "x", value: &[] }.as_u32(), None);
    }

    #[test]
    fn strings_must_be_single_terminated_utf8() {
        assert_eq!(Property { name: "s", value: b"smc\0" }.as_str(), Some("smc"));
        assert_eq!(Property { name: "s", value: b"smc" }.as_str(), None);
        assert_eq!(Property { name: "s", value: b"a\0b\0" }.as_str(), None);
        assert_eq!(Property { name: "s", value: b"\xff\0" }.as_str(), None);
        assert_eq!(Property { name: "s", value: b"" }.as_str(), None);
        assert_eq!(Property { name: "s", value: b"\0" }.as_str(), Some(""));
    }

    #[test]
    fn string_lists_match_whole_entries() {
        let p = Property { name: "compatible", value: b"arm,pl011\0arm,primecell\0" };
        assert!(p.has_string("arm,pl011"));
        assert!(p.has_string("arm,primecell"));
        assert!(!p.has_string("arm,pl01"));
        let unterminated = Property { name: "compatible", value: b"a\0b" };
        assert!(unterminated.has_string("b"));
        let junk = Property { name: "compatible", value: b"\xff\0\0a" };
        assert!(junk.has_string("a"));
    }
}

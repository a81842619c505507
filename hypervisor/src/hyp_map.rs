//! The hypervisor's own EL2 stage-1 translation tables: an identity map, 4 KiB granule,
//! 48-bit addresses, four levels.
//!
//! It owns the descriptor format and the table pool it is given. It only ever turns an invalid
//! entry into a valid one (or finds the identical entry already there): it never changes or
//! removes a live entry, so no break-before-make or TLB maintenance is ever owed for it; the
//! caller issues `DSB ISHST; ISB` after extending a live map. It never touches memory outside
//! its pool, and the pool's own addresses are the table addresses (identity map), which keeps
//! this module free of `unsafe`.

use tock_registers::{register_bitfields, LocalRegisterCopy};

pub const PAGE_SIZE: u64 = 4096;
const ENTRIES: usize = 512;
/// Output-address bits of a descriptor: [47:12].
const OA_MASK: u64 = 0x0000_ffff_ffff_f000;
/// Highest address this map can hold (48-bit VA, `TCR_EL2.T0SZ` = 16).
pub const VA_BITS: u32 = 48;

register_bitfields! {u64,
    /// A stage-1 descriptor of the EL2 (single-privilege) translation regime.
    pub DESC [
        VALID OFFSET(0) NUMBITS(1) [],
        /// At levels 0-2: 1 = next-level table, 0 = block. At level 3 it must be 1 (page).
        TABLE_OR_PAGE OFFSET(1) NUMBITS(1) [],
        /// Index into `MAIR_EL2` (see [`MairIndex`]).
        ATTR_INDX OFFSET(2) NUMBITS(3) [],
        /// AP[1] is RES1 in a regime with one privilege level.
        AP_RES1 OFFSET(6) NUMBITS(1) [],
        /// AP[2]: read-only.
        AP_RO OFFSET(7) NUMBITS(1) [],
        SH OFFSET(8) NUMBITS(2) [
            Non = 0,
            Outer = 2,
            Inner = 3
        ],
        AF OFFSET(10) NUMBITS(1) [],
        /// Execute-never (bit 54 is XN in the EL2 regime).
        XN OFFSET(54) NUMBITS(1) []
    ]
}

/// `MAIR_EL2` slots the descriptors refer to; the arch code programs `MAIR_EL2` to match.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum MairIndex {
    /// Device-nGnRE.
    Device = 0,
    /// Normal, inner and outer write-back read/write-allocate.
    NormalWriteBack = 1,
}

/// What a range of the hypervisor's address space is, which fixes its attributes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapKind {
    /// The hypervisor's code: read-only, executable.
    Text,
    /// Constants, relocation data, the device tree: read-only, never executable.
    ReadOnly,
    /// Data, bss, stacks, RAM: writable, never executable.
    ReadWrite,
    /// MMIO: Device-nGnRE, writable, never executable.
    Device,
}

impl MapKind {
    fn leaf_bits(self) -> u64 {
        let attr = match self {
            MapKind::Device => MairIndex::Device,
            _ => MairIndex::NormalWriteBack,
        };
        let sh = match self {
            MapKind::Device => DESC::SH::Non,
            _ => DESC::SH::Inner,
        };
        let mut v =
            DESC::VALID::SET + DESC::ATTR_INDX.val(attr as u64) + DESC::AP_RES1::SET + DESC::AF::SET + sh;
        if matches!(self, MapKind::Text | MapKind::ReadOnly) {
            v += DESC::AP_RO::SET;
        }
        if self != MapKind::Text {
            v += DESC::XN::SET;
        }
        v.value
    }
}

/// One 4 KiB translation table.
#[derive(Clone)]
#[repr(C, align(4096))]
pub struct Table(pub [u64; ENTRIES]);

impl Table {
    pub const EMPTY: Table = Table([0; ENTRIES]);
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapError {
    /// The range does not start and end on page boundaries, or is empty.
    Unaligned { start: u64, end: u64 },
    /// The range reaches past the 48-bit address space.
    OutOfRange { end: u64 },
    /// The pool has no table left for a new level.
    OutOfTables,
    /// A different valid entry already maps this address: changing it would need
    /// break-before-make, which this map never does.
    Conflict { addr: u64 },
}

impl core::fmt::Display for MapError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            MapError::Unaligned { start, end } => {
                write!(f, "range {start:#x}-{end:#x} is empty or not page-aligned")
            }
            MapError::OutOfRange { end } => write!(f, "range end {end:#x} beyond 48-bit space"),
            MapError::OutOfTables => write!(f, "EL2 page-table pool exhausted"),
            MapError::Conflict { addr } => {
                write!(f, "{addr:#x} is already mapped differently")
            }
        }
    }
}

/// A translation of one address found by [`IdentityMap::translate`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    pub pa: u64,
    pub kind: MapKind,
    /// Size of the block or page holding the address.
    pub size: u64,
}

/// The identity map over a pool of tables; `pool[0]` is the root (level 0) table.
pub struct IdentityMap<'a> {
    pool: &'a mut [Table],
    used: usize,
}

fn level_shift(level: usize) -> u32 {
    12 + 9 * (3 - level as u32)
}

fn index(addr: u64, level: usize) -> usize {
    ((addr >> level_shift(level)) as usize) & (ENTRIES - 1)
}

impl<'a> IdentityMap<'a> {
    /// Takes over `pool` with `used` tables already in use (1 for a fresh map: the empty root;
    /// a pool must be zeroed before it is first used).
    pub fn new(pool: &'a mut [Table], used: usize) -> Self {
        let used = used.clamp(1, pool.len().max(1));
        IdentityMap { pool, used }
    }

    /// Tables taken so far (the root included).
    pub fn tables_used(&self) -> usize {
        self.used
    }

    /// Physical address of the root table, for `TTBR0_EL2`.
    pub fn root_address(&self) -> u64 {
        self.table_address(0)
    }

    fn table_address(&self, idx: usize) -> u64 {
        core::ptr::addr_of!(self.pool[idx]) as u64
    }

    /// The pool slot of a table that one of our descriptors points to.
    fn table_slot(&self, desc: u64) -> Option<usize> {
        let base = self.table_address(0);
        let pa = desc & OA_MASK;
        let slot = (pa.checked_sub(base)? / PAGE_SIZE) as usize;
        (slot < self.used).then_some(slot)
    }

    /// Maps `[start, end)` to itself with the attributes of `kind`, using the largest block that
    /// fits each piece. Entries already mapped identically are left as they are.
    pub fn map(&mut self, start: u64, end: u64, kind: MapKind) -> Result<(), MapError> {
        if start >= end || !start.is_multiple_of(PAGE_SIZE) || !end.is_multiple_of(PAGE_SIZE) {
            return Err(MapError::Unaligned { start, end });
        }
        if end > 1u64 << VA_BITS {
            return Err(MapError::OutOfRange { end });
        }
        let mut addr = start;
        while addr < end {
            addr = self.map_one(addr, end, kind)?;
        }
        Ok(())
    }

    /// Maps the largest aligned piece at `addr` that fits below `end`; returns where it stopped.
    fn map_one(&mut self, addr: u64, end: u64, kind: MapKind) -> Result<u64, MapError> {
        let mut table = 0usize;
        for level in 0..4 {
            let size = 1u64 << level_shift(level);
            let slot = index(addr, level);
            let entry = self.pool[table].0[slot];
            let block_ok = level >= 1 && addr.is_multiple_of(size) && end - addr >= size;
            if entry & 1 == 0 {
                if block_ok {
                    let page_bit = if level == 3 { DESC::TABLE_OR_PAGE::SET.value } else { 0 };
                    self.pool[table].0[slot] = addr | kind.leaf_bits() | page_bit;
                    return Ok(addr + size);
                }
                let next = self.alloc_table()?;
                self.pool[table].0[slot] =
                    self.table_address(next) | (DESC::VALID::SET + DESC::TABLE_OR_PAGE::SET).value;
                table = next;
                continue;
            }
            let is_table = level < 3 && entry & 2 != 0;
            if is_table {
                table = self.table_slot(entry).ok_or(MapError::Conflict { addr })?;
                continue;
            }
            // A live block or page: fine only if it is exactly what we would have written.
            let block_base = addr & !(size - 1);
            let page_bit = if level == 3 { DESC::TABLE_OR_PAGE::SET.value } else { 0 };
            if entry != block_base | kind.leaf_bits() | page_bit {
                return Err(MapError::Conflict { addr });
            }
            return Ok((block_base + size).min(end));
        }
        unreachable!("level 3 always maps or conflicts")
    }

    fn alloc_table(&mut self) -> Result<usize, MapError> {
        if self.used >= self.pool.len() {
            return Err(MapError::OutOfTables);
        }
        let idx = self.used;
        self.used += 1;
        self.pool[idx].0.fill(0);
        Ok(idx)
    }

    /// Walks the tables as the MMU would; `None` if `va` is not mapped.
    pub fn translate(&self, va: u64) -> Option<Translation> {
        let mut table = 0usize;
        for level in 0..4 {
            let size = 1u64 << level_shift(level);
            let entry = self.pool[table].0[index(va, level)];
            if entry & 1 == 0 {
                return None;
            }
            if level < 3 && entry & 2 != 0 {
                table = self.table_slot(entry)?;
                continue;
            }
            let desc = LocalRegisterCopy::<u64, DESC::Register>::new(entry);
            let kind = if desc.read(DESC::ATTR_INDX) == MairIndex::Device as u64 {
                MapKind::Device
            } else if !desc.is_set(DESC::AP_RO) {
                MapKind::ReadWrite
            } else if desc.is_set(DESC::XN) {
                MapKind::ReadOnly
            } else {
                MapKind::Text
            };
            let pa = (entry & OA_MASK & !(size - 1)) | (va & (size - 1));
            return Some(Translation { pa, kind, size });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(n: usize) -> Vec<Table> {
        vec![Table::EMPTY; n]
    }

    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;

    #[test]
    fn maps_pages_and_translates_identity() {
        let mut p = pool(8);
        let mut m = IdentityMap::new(&mut p, 1);
        m.map(0x4020_0000, 0x4020_3000, MapKind::Text).unwrap();
        let t = m.translate(0x4020_1234).unwrap();
        assert_eq!(t, Translation { pa: 0x4020_1234, kind: MapKind::Text, size: PAGE_SIZE });
        assert_eq!(m.translate(0x4020_3000), None);
        assert_eq!(m.translate(0x401f_f000), None);
    }

    #[test]
    fn uses_largest_blocks_that_fit() {
        let mut p = pool(8);
        let mut m = IdentityMap::new(&mut p, 1);
        // 1 GiB + 2 MiB + 4 KiB: one 1 GiB block, one 2 MiB block, one page.
        m.map(GIB, 2 * GIB + 2 * MIB + PAGE_SIZE, MapKind::ReadWrite).unwrap();
        assert_eq!(m.translate(GIB + 5).unwrap().size, GIB);
        assert_eq!(m.translate(2 * GIB + 5).unwrap().size, 2 * MIB);
        assert_eq!(m.translate(2 * GIB + 2 * MIB).unwrap().size, PAGE_SIZE);
        // root, one L1, one L2, one L3.
        assert_eq!(m.tables_used(), 4);
    }

    #[test]
    fn attributes_follow_kind() {
        let mut p = pool(8);
        let mut m = IdentityMap::new(&mut p, 1);
        m.map(0x0900_0000, 0x0900_1000, MapKind::Device).unwrap();
        m.map(0x4000_0000, 0x4000_1000, MapKind::ReadOnly).unwrap();
        let root = m.root_address();
        assert_eq!(m.translate(0x0900_0000).unwrap().kind, MapKind::Device);
        assert_eq!(m.translate(0x4000_0000).unwrap().kind, MapKind::ReadOnly);
        // Device leaves are XN; no leaf is both writable and executable.
        let leaves: Vec<u64> = p.iter().flat_map(|t| t.0.iter().copied()).collect();
        let l3_pages: Vec<u64> = leaves.into_iter().filter(|d| d & 3 == 3 && d & (1 << 10) != 0).collect();
        assert_eq!(l3_pages.len(), 2);
        for d in l3_pages {
            assert_ne!(d & (1 << 54), 0, "leaf {d:#x} must be execute-never");
        }
        assert_eq!(root % PAGE_SIZE, 0);
    }

    #[test]
    fn text_is_executable_and_read_only() {
        let mut p = pool(8);
        let mut m = IdentityMap::new(&mut p, 1);
        m.map(0x4020_0000, 0x4020_1000, MapKind::Text).unwrap();
        let slot_desc = {
            let t = m.translate(0x4020_0000).unwrap();
            assert_eq!(t.kind, MapKind::Text);
            t
        };
        assert_eq!(slot_desc.pa, 0x4020_0000);
    }

    #[test]
    fn remapping_identically_is_a_no_op() {
        let mut p = pool(8);
        let mut m = IdentityMap::new(&mut p, 1);
        m.map(0x4000_0000, 0x4040_0000, MapKind::ReadWrite).unwrap();
        let used = m.tables_used();
        m.map(0x4010_0000, 0x4030_0000, MapKind::ReadWrite).unwrap();
        assert_eq!(m.tables_used(), used);
    }

    #[test]
    fn refuses_to_change_a_live_entry() {
        let mut p = pool(8);
        let mut m = IdentityMap::new(&mut p, 1);
        m.map(0x4000_0000, 0x4000_2000, MapKind::ReadWrite).unwrap();
        assert_eq!(
            m.map(0x4000_1000, 0x4000_2000, MapKind::Device),
            Err(MapError::Conflict { addr: 0x4000_1000 })
        );
        // Still the old mapping.
        assert_eq!(m.translate(0x4000_1000).unwrap().kind, MapKind::ReadWrite);
    }

    #[test]
    fn refuses_a_block_over_existing_pages_with_other_attributes() {
        let mut p = pool(8);
        let mut m = IdentityMap::new(&mut p, 1);
        m.map(0x4000_0000, 0x4000_1000, MapKind::Text).unwrap();
        // The 2 MiB block at 0x4000_0000 already has a table: descend, then conflict on the page.
        assert_eq!(
            m.map(0x4000_0000, 0x4020_0000, MapKind::ReadWrite),
            Err(MapError::Conflict { addr: 0x4000_0000 })
        );
    }

    #[test]
    fn fills_around_existing_pages() {
        let mut p = pool(8);
        let mut m = IdentityMap::new(&mut p, 1);
        m.map(0x4020_0000, 0x4020_1000, MapKind::ReadWrite).unwrap();
        m.map(0x4000_0000, 0x8000_0000, MapKind::ReadWrite).unwrap();
        assert_eq!(m.translate(0x4020_0000).unwrap().size, PAGE_SIZE);
        assert_eq!(m.translate(0x4020_1000).unwrap().size, PAGE_SIZE);
        assert_eq!(m.translate(0x4040_0000).unwrap().size, 2 * MIB);
        assert!(m.translate(0x7fff_ffff).is_some());
    }

    #[test]
    fn pool_exhaustion_is_an_error() {
        let mut p = pool(3);
        let mut m = IdentityMap::new(&mut p, 1);
        assert_eq!(m.map(0x4000_0000, 0x4000_1000, MapKind::ReadWrite), Err(MapError::OutOfTables));
    }

    #[test]
    fn bad_ranges_are_errors() {
        let mut p = pool(4);
        let mut m = IdentityMap::new(&mut p, 1);
        assert!(matches!(m.map(0x1001, 0x2000, MapKind::ReadWrite), Err(MapError::Unaligned { .. })));
        assert!(matches!(m.map(0x2000, 0x2000, MapKind::ReadWrite), Err(MapError::Unaligned { .. })));
        assert!(matches!(
            m.map(0, (1 << 48) + PAGE_SIZE, MapKind::ReadWrite),
            Err(MapError::OutOfRange { .. })
        ));
    }

    #[test]
    fn can_continue_a_map_built_earlier() {
        let mut p = pool(8);
        let used = {
            let mut m = IdentityMap::new(&mut p, 1);
            m.map(0x4020_0000, 0x4020_1000, MapKind::Text).unwrap();
            m.tables_used()
        };
        let mut m = IdentityMap::new(&mut p, used);
        m.map(0x0900_0000, 0x0900_1000, MapKind::Device).unwrap();
        assert_eq!(m.translate(0x4020_0000).unwrap().kind, MapKind::Text);
        assert_eq!(m.translate(0x0900_0000).unwrap().kind, MapKind::Device);
    }
}

//! The physical memory map: RAM, what is reserved in it and why, and what is left free.
//!
//! This module owns one computation, done once at boot: from the RAM banks the device tree
//! describes and the list of reservations (the hypervisor image, the device tree blob,
//! /memreserve/, /reserved-memory, guests' boot modules), build the sorted, merged RAM list, the
//! reservations clipped to RAM, and the free ranges (RAM minus reservations, each shrunk to
//! whole 4 KiB pages). It also owns the map's boot-log format, which tests compare: see
//! [`MemoryMap`]'s `Display`. It must never allocate, never touch memory (it only does
//! arithmetic on ranges), and never report as free a byte that any reservation covers.

use core::fmt;

use crate::dt::{FixedList, ModuleKind, Platform, Region};

/// Granule that free ranges are aligned to.
pub const PAGE_SIZE: u64 = 4096;
/// RAM banks kept after merging.
pub const MAX_RAM: usize = 16;
/// Reservations a [`ReservationList`] holds: enough for every table of a `dt::Platform` (16
/// /memreserve/, 16 /reserved-memory, 8 guests x 3 modules) plus the image and the blob.
pub const MAX_RESERVATIONS: usize = 64;
/// Reservation pieces in the map (a reservation spanning several RAM banks is cut per bank).
pub const MAX_RESERVED: usize = MAX_RESERVATIONS + MAX_RAM;
/// Free ranges: at most one more per bank than there are reservation pieces.
pub const MAX_FREE: usize = MAX_RESERVED + MAX_RAM;

/// Why a range is reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reason<'a> {
    /// Labyrinth's own image.
    #[default]
    HypervisorImage,
    /// The boot device tree blob.
    DeviceTree,
    /// A /memreserve/ entry.
    MemReserve,
    /// A /reserved-memory child, by node name.
    ReservedMemory { name: &'a str, no_map: bool },
    /// A guest's boot module.
    BootModule { guest: &'a str, kind: ModuleKind },
}

impl fmt::Display for Reason<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::HypervisorImage => f.write_str("hypervisor image"),
            Reason::DeviceTree => f.write_str("device tree blob"),
            Reason::MemReserve => f.write_str("/memreserve/"),
            Reason::ReservedMemory { name, no_map: false } => write!(f, "reserved-memory {name}"),
            Reason::ReservedMemory { name, no_map: true } => {
                write!(f, "reserved-memory {name} (no-map)")
            }
            Reason::BootModule { guest, kind } => write!(f, "guest {guest} {kind}"),
        }
    }
}

/// A range that must not be handed out, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reservation<'a> {
    pub region: Region,
    pub reason: Reason<'a>,
}

impl<'a> Reservation<'a> {
    pub const fn new(region: Region, reason: Reason<'a>) -> Self {
        Reservation { region, reason }
    }
}

/// The reservations handed to [`MemoryMap::build`].
pub type ReservationList<'a> = FixedList<Reservation<'a>, MAX_RESERVATIONS>;

/// A reservation as it lies in the map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reserved<'a> {
    /// The part inside one RAM bank, or the whole reservation when it touches no RAM.
    pub region: Region,
    pub reason: Reason<'a>,
    /// True when the reservation lies outside all RAM (recorded, does not affect free).
    pub outside_ram: bool,
}

/// Why no usable map could be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemMapError<'a> {
    /// No non-empty RAM bank was given.
    NoRam,
    /// More items than a fixed-size table holds.
    TooMany { what: &'static str, max: usize },
    /// Less free RAM than `min_free` (at least one page is always required).
    NotEnoughFree {
        ram: u64,
        reserved: u64,
        free: u64,
        min_free: u64,
        /// The largest reservation inside RAM, the likeliest culprit.
        largest: Option<Reserved<'a>>,
    },
}

impl fmt::Display for MemMapError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            MemMapError::NoRam => f.write_str("no RAM: the device tree describes no memory"),
            MemMapError::TooMany { what, max } => write!(f, "more than {max} {what}"),
            MemMapError::NotEnoughFree { ram, reserved, free, min_free, largest } => {
                write!(
                    f,
                    "not enough free RAM: {} free of {} RAM ({} reserved), need at least {}",
                    Size(free),
                    Size(ram),
                    Size(reserved),
                    Size(min_free)
                )?;
                if let Some(r) = largest {
                    write!(f, "; largest reservation {} {} ({})", r.region, Size(r.region.size()), r.reason)?;
                }
                Ok(())
            }
        }
    }
}

/// A byte count printed exactly, in the largest of MiB, KiB or B that divides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const KIB: u64 = 1024;
        const MIB: u64 = 1024 * 1024;
        let n = self.0;
        if n.is_multiple_of(MIB) {
            write!(f, "{} MiB", n / MIB)
        } else if n.is_multiple_of(KIB) {
            write!(f, "{} KiB", n / KIB)
        } else {
            write!(f, "{n} B")
        }
    }
}

/// The boot memory map.
///
/// # Boot-log format (stable: a QEMU boot test parses it)
///
/// One line per item, in this order, each ending in `\n`:
///
/// ```text
/// ram      0x40000000-0x7fffffff  1024 MiB
/// reserved 0x40000000-0x400fffff  1 MiB  device tree blob
/// reserved 0x40200000-0x4027ffff  512 KiB  hypervisor image
/// reserved 0x00001000-0x00001fff  4 KiB  /memreserve/ (outside RAM)
/// free     0x40100000-0x401fffff  1 MiB
/// free     0x40280000-0x7fffffff  1021 MiB
/// total: 1024 MiB RAM, 1536 KiB reserved, 1022 MiB free
/// ```
///
/// - `ram` lines: the merged RAM banks, by address. `reserved` lines: every reservation piece
///   (clipped to its RAM bank; a reservation touching no RAM is printed whole with
///   ` (outside RAM)`), by address. `free` lines: the free ranges, by address.
/// - The first field is the kind padded to 8 characters, then one space. A range is
///   `START-LAST`, both inclusive, `0x` and lowercase hex zero-padded to at least 8 digits.
///   Fields are separated by two spaces. Sizes are exact: `N MiB` if a whole number of MiB,
///   else `N KiB` if a whole number of KiB, else `N B`.
/// - `total:` gives RAM (sum of banks), reserved (bytes of RAM covered by at least one
///   reservation; overlaps counted once) and free (sum of free ranges). RAM minus reserved minus
///   free is what page alignment of the free ranges lost.
/// - Reason texts: `hypervisor image`, `device tree blob`, `/memreserve/`,
///   `reserved-memory NAME` (+ ` (no-map)`), `guest NAME kernel|ramdisk|device tree`.
#[derive(Debug, Clone, Copy)]
pub struct MemoryMap<'a> {
    ram: FixedList<Region, MAX_RAM>,
    reserved: FixedList<Reserved<'a>, MAX_RESERVED>,
    free: FixedList<Region, MAX_FREE>,
    ram_bytes: u64,
    reserved_bytes: u64,
    free_bytes: u64,
}

impl<'a> MemoryMap<'a> {
    /// Builds the map. Empty regions are ignored; overlapping or adjacent RAM banks are merged.
    /// Fails when there is no RAM, when a table overflows, or when fewer than
    /// `max(min_free, PAGE_SIZE)` bytes are free.
    pub fn build(
        ram: &[Region],
        reservations: &[Reservation<'a>],
        min_free: u64,
    ) -> Result<Self, MemMapError<'a>> {
        let mut map = MemoryMap {
            ram: FixedList::new(),
            reserved: FixedList::new(),
            free: FixedList::new(),
            ram_bytes: 0,
            reserved_bytes: 0,
            free_bytes: 0,
        };
        map.merge_ram(ram)?;
        map.clip_reservations(reservations)?;
        map.reserved_bytes = map.union_of_reserved();
        map.compute_free()?;

        let min_free = min_free.max(PAGE_SIZE);
        if map.free_bytes < min_free {
            let largest =
                map.reserved.iter().filter(|r| !r.outside_ram).max_by_key(|r| r.region.size()).copied();
            return Err(MemMapError::NotEnoughFree {
                ram: map.ram_bytes,
                reserved: map.reserved_bytes,
                free: map.free_bytes,
                min_free,
                largest,
            });
        }
        Ok(map)
    }

    /// Sorted, merged RAM banks.
    fn merge_ram(&mut self, ram: &[Region]) -> Result<(), MemMapError<'a>> {
        // Banks stay pairwise disjoint and non-adjacent: each new region absorbs every bank it
        // touches, so many overlapping entries still fit the table.
        let touches = |a: &Region, b: &Region| a.base() <= b.end() && b.base() <= a.end();
        let mut banks: FixedList<Region, MAX_RAM> = FixedList::new();
        for r in ram.iter().filter(|r| !r.is_empty()) {
            let mut merged = *r;
            let mut rest: FixedList<Region, MAX_RAM> = FixedList::new();
            for b in banks.iter() {
                if touches(b, &merged) {
                    merged = Region::from_bounds(b.base().min(merged.base()), b.end().max(merged.end()))
                        .unwrap_or(merged);
                } else {
                    // `rest` never holds more than `banks` did.
                    let _ = rest.push(*b);
                }
            }
            rest.push(merged).map_err(|_| MemMapError::TooMany { what: "RAM banks", max: MAX_RAM })?;
            banks = rest;
        }
        if banks.is_empty() {
            return Err(MemMapError::NoRam);
        }
        banks.sort_by_key(|b| b.base());
        self.ram = banks;
        self.ram_bytes = banks.iter().map(|b| b.size()).fold(0u64, u64::saturating_add);
        Ok(())
    }

    /// Each reservation cut to the RAM banks it touches (or kept whole when it touches none).
    fn clip_reservations(&mut self, reservations: &[Reservation<'a>]) -> Result<(), MemMapError<'a>> {
        let too_many = |_| MemMapError::TooMany { what: "reservation pieces", max: MAX_RESERVED };
        for res in reservations.iter().filter(|r| !r.region.is_empty()) {
            let mut inside = false;
            for bank in self.ram.iter() {
                if let Some(piece) = bank.intersection(&res.region) {
                    inside = true;
                    self.reserved
                        .push(Reserved { region: piece, reason: res.reason, outside_ram: false })
                        .map_err(too_many)?;
                }
            }
            if !inside {
                self.reserved
                    .push(Reserved { region: res.region, reason: res.reason, outside_ram: true })
                    .map_err(too_many)?;
            }
        }
        self.reserved.sort_by_key(|r| (r.region.base(), r.region.end()));
        Ok(())
    }

    /// Bytes of RAM covered by at least one reservation (pieces are sorted by base).
    fn union_of_reserved(&self) -> u64 {
        let mut total = 0u64;
        let mut covered_to = 0u64;
        for r in self.reserved.iter().filter(|r| !r.outside_ram) {
            let start = r.region.base().max(covered_to);
            if r.region.end() > start {
                total = total.saturating_add(r.region.end() - start);
            }
            covered_to = covered_to.max(r.region.end());
        }
        total
    }

    /// RAM minus reservations, each gap shrunk to whole pages.
    fn compute_free(&mut self) -> Result<(), MemMapError<'a>> {
        let mut free: FixedList<Region, MAX_FREE> = FixedList::new();
        let too_many = |_| MemMapError::TooMany { what: "free ranges", max: MAX_FREE };
        for bank in self.ram.iter() {
            let mut cursor = bank.base();
            for r in self.reserved.iter().filter(|r| !r.outside_ram && bank.contains(&r.region)) {
                if r.region.base() > cursor {
                    if let Some(gap) = page_shrink(cursor, r.region.base()) {
                        free.push(gap).map_err(too_many)?;
                    }
                }
                cursor = cursor.max(r.region.end());
            }
            if let Some(gap) = page_shrink(cursor, bank.end()) {
                free.push(gap).map_err(too_many)?;
            }
        }
        self.free_bytes = free.iter().map(|r| r.size()).fold(0u64, u64::saturating_add);
        self.free = free;
        Ok(())
    }

    /// RAM banks, sorted and merged.
    pub fn ram(&self) -> &[Region] {
        self.ram.as_slice()
    }

    /// Reservation pieces, sorted by address.
    pub fn reserved(&self) -> &[Reserved<'a>] {
        self.reserved.as_slice()
    }

    /// Free ranges: page-aligned, sorted, disjoint, inside RAM, clear of every reservation.
    pub fn free(&self) -> &[Region] {
        self.free.as_slice()
    }

    /// Sum of the RAM banks.
    pub fn ram_bytes(&self) -> u64 {
        self.ram_bytes
    }

    /// Bytes of RAM covered by reservations.
    pub fn reserved_bytes(&self) -> u64 {
        self.reserved_bytes
    }

    /// Sum of the free ranges.
    pub fn free_bytes(&self) -> u64 {
        self.free_bytes
    }

    /// The map's boot-log lines, in the documented order (see the type's documentation).
    pub fn lines(&self) -> impl Iterator<Item = MapLine<'_, 'a>> + '_ {
        self.ram
            .iter()
            .map(|r| MapLine::Ram(*r))
            .chain(self.reserved.iter().map(MapLine::Reserved))
            .chain(self.free.iter().map(|r| MapLine::Free(*r)))
            .chain(core::iter::once(MapLine::Total {
                ram: self.ram_bytes,
                reserved: self.reserved_bytes,
                free: self.free_bytes,
            }))
    }
}

/// `[start, end)` shrunk inwards to page boundaries, if a page remains.
fn page_shrink(start: u64, end: u64) -> Option<Region> {
    let start = start.checked_add(PAGE_SIZE - 1)? & !(PAGE_SIZE - 1);
    let end = end & !(PAGE_SIZE - 1);
    Region::from_bounds(start, end)
}

/// One line of the boot-log map (no trailing newline).
#[derive(Debug, Clone, Copy)]
pub enum MapLine<'m, 'a> {
    Ram(Region),
    Reserved(&'m Reserved<'a>),
    Free(Region),
    Total { ram: u64, reserved: u64, free: u64 },
}

impl fmt::Display for MapLine<'_, '_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MapLine::Ram(r) => write!(f, "ram      {r}  {}", Size(r.size())),
            MapLine::Free(r) => write!(f, "free     {r}  {}", Size(r.size())),
            MapLine::Reserved(r) => {
                write!(f, "reserved {}  {}  {}", r.region, Size(r.region.size()), r.reason)?;
                if r.outside_ram {
                    f.write_str(" (outside RAM)")?;
                }
                Ok(())
            }
            MapLine::Total { ram, reserved, free } => {
                write!(f, "total: {} RAM, {} reserved, {} free", Size(*ram), Size(*reserved), Size(*free))
            }
        }
    }
}

impl fmt::Display for MemoryMap<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for line in self.lines() {
            writeln!(f, "{line}")?;
        }
        Ok(())
    }
}

/// The reservations a device tree implies: /memreserve/ entries, static /reserved-memory
/// regions, and the boot modules of every well-formed guest. The caller adds the hypervisor
/// image and the blob itself (or uses [`boot_reservations`]).
pub fn platform_reservations<'a>(platform: &Platform<'a>) -> Result<ReservationList<'a>, MemMapError<'a>> {
    let mut list = ReservationList::new();
    let too_many = |_| MemMapError::TooMany { what: "reservations", max: MAX_RESERVATIONS };
    for r in platform.memreserve() {
        list.push(Reservation::new(*r, Reason::MemReserve)).map_err(too_many)?;
    }
    for r in platform.reserved_memory() {
        let reason = Reason::ReservedMemory { name: r.name, no_map: r.no_map };
        list.push(Reservation::new(r.region, reason)).map_err(too_many)?;
    }
    for guest in platform.guests().iter().flatten() {
        for m in guest.modules() {
            let reason = Reason::BootModule { guest: guest.name, kind: m.kind };
            list.push(Reservation::new(m.region, reason)).map_err(too_many)?;
        }
    }
    Ok(list)
}

/// [`platform_reservations`] plus the hypervisor image and the device tree blob at `dtb_base`
/// (its size is the blob's `totalsize`).
pub fn boot_reservations<'a>(
    platform: &Platform<'a>,
    image: Region,
    dtb_base: u64,
) -> Result<ReservationList<'a>, MemMapError<'a>> {
    let mut list = platform_reservations(platform)?;
    let too_many = |_| MemMapError::TooMany { what: "reservations", max: MAX_RESERVATIONS };
    list.push(Reservation::new(image, Reason::HypervisorImage)).map_err(too_many)?;
    // A blob too large for the address space cannot exist in memory; if it is claimed anyway
    // the reservation is still recorded, clipped at the top of the address space.
    let dtb = Region::new(dtb_base, platform.total_size() as u64)
        .or_else(|| Region::from_bounds(dtb_base, u64::MAX))
        .unwrap_or_default();
    list.push(Reservation::new(dtb, Reason::DeviceTree)).map_err(too_many)?;
    Ok(list)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    fn r(base: u64, size: u64) -> Region {
        Region::new(base, size).unwrap()
    }

    fn res(base: u64, size: u64, reason: Reason<'static>) -> Reservation<'static> {
        Reservation::new(r(base, size), reason)
    }

    /// Free ranges must be page aligned, sorted, disjoint, inside RAM and clear of reservations.
    fn assert_invariants(map: &MemoryMap<'_>, reservations: &[Reservation<'_>]) {
        let mut prev_end = 0;
        for f in map.free() {
            assert_eq!(f.base() % PAGE_SIZE, 0, "{f:?} start not page aligned");
            assert_eq!(f.end() % PAGE_SIZE, 0, "{f:?} end not page aligned");
            assert!(f.base() >= prev_end, "free ranges overlap or are unsorted");
            prev_end = f.end();
            assert!(map.ram().iter().any(|b| b.contains(f)), "{f:?} not inside RAM");
            for res in reservations {
                assert!(!f.overlaps(&res.region), "{f:?} overlaps reservation {res:?}");
            }
        }
        assert_eq!(map.free_bytes(), map.free().iter().map(|f| f.size()).sum::<u64>());
        assert!(map.reserved_bytes() + map.free_bytes() <= map.ram_bytes());
    }

    #[test]
    fn qemu_like_map_prints_in_the_documented_format() {
        let ram = [r(0x4000_0000, 1024 * MIB)];
        let reservations = [
            res(0x4020_0000, 512 * 1024, Reason::HypervisorImage),
            res(0x4000_0000, MIB, Reason::DeviceTree),
            res(0x1000, 0x1000, Reason::MemReserve),
        ];
        let map = MemoryMap::build(&ram, &reservations, 0).unwrap();
        assert_invariants(&map, &reservations);
        let expected = "\
ram      0x40000000-0x7fffffff  1024 MiB
reserved 0x00001000-0x00001fff  4 KiB  /memreserve/ (outside RAM)
reserved 0x40000000-0x400fffff  1 MiB  device tree blob
reserved 0x40200000-0x4027ffff  512 KiB  hypervisor image
free     0x40100000-0x401fffff  1 MiB
free     0x40280000-0x7fffffff  1046016 KiB
total: 1024 MiB RAM, 1536 KiB reserved, 1047040 KiB free
";
        assert_eq!(map.to_string(), expected);
        assert_eq!(map.ram_bytes(), 1024 * MIB);
        assert_eq!(map.reserved_bytes(), MIB + 512 * 1024);
        assert_eq!(map.free_bytes(), 1024 * MIB - MIB - 512 * 1024);
    }

    #[test]
    fn overlapping_and_adjacent_banks_merge() {
        let ram = [
            r(0x8000_0000, 0x1000_0000),
            r(0x4000_0000, 0x4000_0000), // adjacent to the first
            r(0x4800_0000, 0x100_0000),  // inside the second
            r(0x1_0000_0000, 0x1000_0000),
        ];
        let map = MemoryMap::build(&ram, &[], 0).unwrap();
        assert_eq!(map.ram(), &[r(0x4000_0000, 0x5000_0000), r(0x1_0000_0000, 0x1000_0000)]);
        assert_eq!(map.free(), map.ram());
        assert_eq!(map.ram_bytes(), 0x6000_0000);
    }

    #[test]
    fn a_bank_bridging_two_others_merges_all_three() {
        let ram = [r(0x1000_0000, 0x1000), r(0x2000_0000, 0x1000), r(0x1000_0000, 0x1000_1000)];
        let map = MemoryMap::build(&ram, &[], 0).unwrap();
        assert_eq!(map.ram(), &[r(0x1000_0000, 0x1000_1000)]);
    }

    #[test]
    fn reservations_at_the_edges_of_ram() {
        let ram = [r(0x4000_0000, 16 * MIB)];
        let reservations =
            [res(0x4000_0000, MIB, Reason::DeviceTree), res(0x40f0_0000, MIB, Reason::HypervisorImage)];
        let map = MemoryMap::build(&ram, &reservations, 0).unwrap();
        assert_eq!(map.free(), &[r(0x4010_0000, 14 * MIB)]);
        assert_invariants(&map, &reservations);
    }

    #[test]
    fn reservation_straddling_ram_edges_is_clipped() {
        let ram = [r(0x4000_0000, 16 * MIB)];
        let reservations = [res(0x3ff0_0000, 2 * MIB, Reason::MemReserve)];
        let map = MemoryMap::build(&ram, &reservations, 0).unwrap();
        assert_eq!(map.reserved()[0].region, r(0x4000_0000, MIB));
        assert!(!map.reserved()[0].outside_ram);
        assert_eq!(map.reserved_bytes(), MIB);
        assert_eq!(map.free(), &[r(0x4010_0000, 15 * MIB)]);
    }

    #[test]
    fn reservation_outside_ram_is_recorded_but_frees_nothing_less() {
        let ram = [r(0x4000_0000, 16 * MIB)];
        let reservations = [res(0x1000_0000, MIB, Reason::MemReserve)];
        let map = MemoryMap::build(&ram, &reservations, 0).unwrap();
        assert_eq!(map.reserved().len(), 1);
        assert!(map.reserved()[0].outside_ram);
        assert_eq!(map.reserved_bytes(), 0);
        assert_eq!(map.free(), &ram);
        assert!(map
            .to_string()
            .contains("reserved 0x10000000-0x100fffff  1 MiB  /memreserve/ (outside RAM)\n"));
    }

    #[test]
    fn reservation_spanning_two_banks_is_cut_per_bank() {
        let ram = [r(0x4000_0000, 2 * MIB), r(0x4040_0000, 2 * MIB)];
        let reservations = [res(0x4010_0000, 4 * MIB, Reason::HypervisorImage)];
        let map = MemoryMap::build(&ram, &reservations, 0).unwrap();
        let pieces: Vec<Region> = map.reserved().iter().map(|r| r.region).collect();
        assert_eq!(pieces, vec![r(0x4010_0000, MIB), r(0x4040_0000, MIB)]);
        assert_eq!(map.free(), &[r(0x4000_0000, MIB), r(0x4050_0000, MIB)]);
        assert_eq!(map.reserved_bytes(), 2 * MIB);
    }

    #[test]
    fn overlapping_reservations_are_counted_once() {
        let ram = [r(0x4000_0000, 16 * MIB)];
        let reservations = [
            res(0x4000_0000, 4 * MIB, Reason::MemReserve),
            res(0x4020_0000, 4 * MIB, Reason::DeviceTree),
            res(0x4010_0000, MIB, Reason::HypervisorImage),
        ];
        let map = MemoryMap::build(&ram, &reservations, 0).unwrap();
        assert_eq!(map.reserved_bytes(), 6 * MIB);
        assert_eq!(map.free(), &[r(0x4060_0000, 10 * MIB)]);
        assert_invariants(&map, &reservations);
    }

    #[test]
    fn unaligned_edges_shrink_free_ranges_to_pages() {
        let ram = [r(0x4000_0123, 0x10_0000)];
        let reservations = [res(0x4000_8001, 0x10, Reason::MemReserve)];
        let map = MemoryMap::build(&ram, &reservations, 0).unwrap();
        assert_eq!(map.free(), &[r(0x4000_1000, 0x7000), r(0x4000_9000, 0xf_7000)]);
        assert_invariants(&map, &reservations);
        assert_eq!(map.reserved_bytes(), 0x10);
        assert!(map.to_string().contains("16 B  /memreserve/"));
    }

    #[test]
    fn reservation_covering_everything_is_an_error_naming_it() {
        let ram = [r(0x4000_0000, 16 * MIB)];
        let reservations =
            [res(0x3000_0000, 0x2000_0000, Reason::ReservedMemory { name: "secure@30000000", no_map: true })];
        let err = MemoryMap::build(&ram, &reservations, 0).unwrap_err();
        match err {
            MemMapError::NotEnoughFree { free: 0, ram, reserved, largest: Some(l), .. } => {
                assert_eq!(ram, 16 * MIB);
                assert_eq!(reserved, 16 * MIB);
                assert_eq!(l.region, r(0x4000_0000, 16 * MIB));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(
            err.to_string(),
            "not enough free RAM: 0 MiB free of 16 MiB RAM (16 MiB reserved), need at least 4 KiB; \
             largest reservation 0x40000000-0x40ffffff 16 MiB (reserved-memory secure@30000000 (no-map))"
        );
    }

    #[test]
    fn sub_page_leftovers_are_not_free() {
        let ram = [r(0x4000_0000, 0x2000)];
        let reservations = [res(0x4000_0800, 0x1000, Reason::DeviceTree)];
        assert!(matches!(
            MemoryMap::build(&ram, &reservations, 0),
            Err(MemMapError::NotEnoughFree { free: 0, .. })
        ));
    }

    #[test]
    fn min_free_is_enforced() {
        let ram = [r(0x4000_0000, 16 * MIB)];
        assert!(MemoryMap::build(&ram, &[], 16 * MIB).is_ok());
        assert!(matches!(
            MemoryMap::build(&ram, &[], 16 * MIB + 1),
            Err(MemMapError::NotEnoughFree { min_free, .. }) if min_free == 16 * MIB + 1
        ));
    }

    #[test]
    fn no_ram_is_an_error() {
        assert_eq!(MemoryMap::build(&[], &[], 0).unwrap_err(), MemMapError::NoRam);
        assert_eq!(MemoryMap::build(&[Region::default()], &[], 0).unwrap_err(), MemMapError::NoRam);
    }

    #[test]
    fn multiple_banks_with_reservations_in_each() {
        let ram = [r(0x4000_0000, 8 * MIB), r(0x8_8000_0000, 8 * MIB)];
        let reservations = [
            res(0x4040_0000, MIB, Reason::HypervisorImage),
            res(0x8_8000_0000, MIB, Reason::BootModule { guest: "domU1", kind: ModuleKind::Kernel }),
        ];
        let map = MemoryMap::build(&ram, &reservations, 0).unwrap();
        assert_eq!(
            map.free(),
            &[r(0x4000_0000, 4 * MIB), r(0x4050_0000, 3 * MIB), r(0x8_8010_0000, 7 * MIB)]
        );
        assert!(map.to_string().contains("reserved 0x880000000-0x8800fffff  1 MiB  guest domU1 kernel\n"));
        assert!(map.to_string().ends_with("total: 16 MiB RAM, 2 MiB reserved, 14 MiB free\n"));
        assert_invariants(&map, &reservations);
    }

    #[test]
    fn ram_at_the_top_of_the_address_space() {
        // Unaligned start, end at the very top: rounding must not overflow.
        let ram = [Region::from_bounds(0xffff_ffff_ffef_ffff, u64::MAX).unwrap()];
        let map = MemoryMap::build(&ram, &[], 0).unwrap();
        assert_eq!(map.free(), &[Region::from_bounds(0xffff_ffff_fff0_0000, 0xffff_ffff_ffff_f000).unwrap()]);
        let ram = [Region::from_bounds(u64::MAX - 0x800, u64::MAX).unwrap()];
        assert!(matches!(MemoryMap::build(&ram, &[], 0), Err(MemMapError::NotEnoughFree { free: 0, .. })));
    }

    #[test]
    fn too_many_banks_is_an_error_not_a_truncation() {
        let ram: Vec<Region> =
            (0..=MAX_RAM as u64).map(|i| r(0x4000_0000 + i * 0x20_0000, 0x10_0000)).collect();
        assert_eq!(
            MemoryMap::build(&ram, &[], 0).unwrap_err(),
            MemMapError::TooMany { what: "RAM banks", max: MAX_RAM }
        );
    }

    #[test]
    fn sizes_print_exactly() {
        assert_eq!(Size(3 * 1024 * MIB).to_string(), "3072 MiB");
        assert_eq!(Size(1536).to_string(), "1536 B");
        assert_eq!(Size(4096).to_string(), "4 KiB");
        assert_eq!(Size(0).to_string(), "0 MiB");
    }

    proptest::proptest! {
        #[test]
        fn free_never_overlaps_reservations(
            banks in proptest::collection::vec((0u64..0x1_0000, 1u64..0x800), 1..6),
            reserved in proptest::collection::vec((0u64..0x1_0000, 1u64..0x400), 0..20),
        ) {
            // Page-granular units scaled by an odd factor so edges are unaligned.
            let ram: Vec<Region> = banks.iter().map(|&(b, s)| r(b * 0x801, s * 0x801)).collect();
            let res: Vec<Reservation<'static>> =
                reserved.iter().map(|&(b, s)| Reservation::new(r(b * 0x801, s * 0x3ff), Reason::MemReserve)).collect();
            match MemoryMap::build(&ram, &res, 0) {
                Ok(map) => {
                    assert_invariants(&map, &res);
                    let _ = map.to_string();
                }
                Err(MemMapError::NotEnoughFree { .. }) | Err(MemMapError::TooMany { .. }) => {}
                Err(e) => panic!("unexpected {e:?}"),
            }
        }
    }
}

//! From the boot memory map to owned frames: where the frame database goes, and how every RAM
//! frame gets its first tag (free, hypervisor or reserved) before the frame manager takes over.
//!
//! It owns that one boot-time decision and nothing after it. It never touches memory: the arch
//! code turns the placement into storage and hands the database back.

use crate::dt::{FixedList, Region};
use crate::frame::{FrameDb, FrameError, FrameState, Pfn, FRAME_SIZE};
use crate::memmap::{MemoryMap, MAX_FREE};

/// Where the frame database lives and what it covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DbPlacement {
    /// Physical storage: `[start, end)`, whole frames.
    pub start: u64,
    pub end: u64,
    /// The first frame the database describes, and how many (holes between banks included).
    pub base: Pfn,
    pub entries: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostMemError {
    /// No free range can hold the database.
    NoRoomForDb {
        bytes: u64,
    },
    Frame(FrameError),
    TooManyRanges,
}

impl From<FrameError> for HostMemError {
    fn from(e: FrameError) -> Self {
        HostMemError::Frame(e)
    }
}

impl core::fmt::Display for HostMemError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            HostMemError::NoRoomForDb { bytes } => {
                write!(f, "no free range holds the {bytes}-byte frame database")
            }
            HostMemError::Frame(e) => write!(f, "{e}"),
            HostMemError::TooManyRanges => f.write_str("too many free ranges"),
        }
    }
}

/// RAM banks as whole-frame `(start, end)` ranges, as the frame database wants them.
pub fn ram_banks(map: &MemoryMap<'_>) -> FixedList<(u64, u64), MAX_FREE> {
    let mut banks = FixedList::new();
    for r in map.ram() {
        // Whole frames only: a partial frame at a bank edge is not RAM Labyrinth can own.
        let start = r.base().div_ceil(FRAME_SIZE) * FRAME_SIZE;
        let end = r.end() / FRAME_SIZE * FRAME_SIZE;
        if end > start {
            let _ = banks.push((start, end));
        }
    }
    banks
}

/// Places the database at the top of the highest free range that holds it (away from the
/// image and firmware at the bottom of RAM).
pub fn place_frame_db(map: &MemoryMap<'_>) -> Result<DbPlacement, HostMemError> {
    let banks = ram_banks(map);
    let (base, entries) = FrameDb::span_of(banks.as_slice())?;
    let bytes = (entries as u64 * FrameDb::BYTES_PER_FRAME as u64).div_ceil(FRAME_SIZE) * FRAME_SIZE;
    let range =
        map.free().iter().rev().find(|r| r.size() >= bytes).ok_or(HostMemError::NoRoomForDb { bytes })?;
    let end = range.end();
    Ok(DbPlacement { start: end - bytes, end, base, entries })
}

/// The frames Labyrinth will hand out: the map's free ranges minus the hypervisor's ranges.
pub type FreeRanges = FixedList<(u64, u64), MAX_FREE>;

/// Tags a fresh database (all RAM free) from the map: `hypervisor` ranges (the image, the
/// database itself) become Hypervisor, every other frame outside the free ranges Reserved.
/// Returns the ranges that stay free, exactly the frames tagged Free.
pub fn tag_frames(
    db: &mut FrameDb<'_>,
    map: &MemoryMap<'_>,
    hypervisor: &[Region],
) -> Result<FreeRanges, HostMemError> {
    for r in hypervisor {
        mark_runs(db, r.base(), r.end(), FrameState::Hypervisor)?;
    }
    // Everything in RAM that the map does not call free is reserved: firmware, the device
    // tree, /memreserve/, /reserved-memory, boot modules.
    for &(bank_start, bank_end) in ram_banks(map).iter() {
        let mut cursor = bank_start;
        for f in map.free().iter().filter(|f| f.base() < bank_end && f.end() > bank_start) {
            mark_runs(db, cursor, f.base().max(bank_start), FrameState::Reserved)?;
            cursor = cursor.max(f.end());
        }
        mark_runs(db, cursor, bank_end, FrameState::Reserved)?;
    }
    let mut free = FreeRanges::new();
    let full = |_| HostMemError::TooManyRanges;
    for f in map.free() {
        let mut rest = FreeRanges::new();
        rest.push((f.base(), f.end())).map_err(full)?;
        for h in hypervisor {
            let (ha, hb) = (h.base() / FRAME_SIZE * FRAME_SIZE, h.end().div_ceil(FRAME_SIZE) * FRAME_SIZE);
            let mut next = FreeRanges::new();
            for &(a, b) in rest.iter() {
                if hb <= a || ha >= b {
                    next.push((a, b)).map_err(full)?;
                    continue;
                }
                if ha > a {
                    next.push((a, ha)).map_err(full)?;
                }
                if hb < b {
                    next.push((hb, b)).map_err(full)?;
                }
            }
            rest = next;
        }
        for &p in rest.iter() {
            free.push(p).map_err(full)?;
        }
    }
    Ok(free)
}

/// Gives every still-free frame of `[start, end)` (rounded out to frames) the state `to`;
/// frames already tagged otherwise keep their tag (reservations may overlap).
fn mark_runs(db: &mut FrameDb<'_>, start: u64, end: u64, to: FrameState) -> Result<(), HostMemError> {
    let (first, last) = (start / FRAME_SIZE, end.div_ceil(FRAME_SIZE));
    let mut run_start = None;
    for pfn in first..=last {
        let free = pfn < last && matches!(db.state(Pfn(pfn)), Ok(FrameState::Free));
        match (free, run_start) {
            (true, None) => run_start = Some(pfn),
            (false, Some(s)) => {
                let range = (s * FRAME_SIZE, pfn * FRAME_SIZE);
                match to {
                    FrameState::Hypervisor => db.mark_hypervisor(range)?,
                    _ => db.mark_reserved(range)?,
                }
                run_start = None;
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::TagCell;
    use crate::memmap::{Reason, Reservation};

    const MIB: u64 = 1 << 20;

    fn map(ram: &[(u64, u64)], res: &[(u64, u64)]) -> MemoryMap<'static> {
        let ram: Vec<Region> = ram.iter().map(|&(b, s)| Region::new(b, s).unwrap()).collect();
        let res: Vec<Reservation<'static>> = res
            .iter()
            .map(|&(b, s)| Reservation::new(Region::new(b, s).unwrap(), Reason::MemReserve))
            .collect();
        MemoryMap::build(&ram, &res, 0).unwrap()
    }

    fn db_for(m: &MemoryMap<'_>) -> (DbPlacement, FrameDb<'static>) {
        let p = place_frame_db(m).unwrap();
        let tags: &'static [TagCell] =
            Box::leak((0..p.entries).map(|_| TagCell::new(0)).collect::<Vec<_>>().into_boxed_slice());
        let db = FrameDb::new(tags, p.base, ram_banks(m).as_slice()).unwrap();
        (p, db)
    }

    #[test]
    fn database_goes_at_the_top_of_the_highest_free_range() {
        let m = map(&[(0x4000_0000, 64 * MIB)], &[(0x4000_0000, MIB)]);
        let p = place_frame_db(&m).unwrap();
        // 16384 frames x 2 bytes = 32 KiB.
        assert_eq!((p.base, p.entries), (Pfn(0x40000), 16384));
        assert_eq!((p.start, p.end), (0x4400_0000 - 0x8000, 0x4400_0000));
    }

    #[test]
    fn every_frame_gets_exactly_the_right_first_tag() {
        let m = map(&[(0x4000_0000, 16 * MIB)], &[(0x4000_0000, 0x3000), (0x4080_0000, MIB)]);
        let (p, mut db) = db_for(&m);
        let image = Region::new(0x4020_0000, 0x10_0000).unwrap();
        let dbr = Region::from_bounds(p.start, p.end).unwrap();
        let free = tag_frames(&mut db, &m, &[image, dbr]).unwrap();
        let state = |a: u64| db.state(Pfn(a >> 12)).unwrap();
        assert_eq!(state(0x4000_0000), FrameState::Reserved);
        assert_eq!(state(0x4000_3000), FrameState::Free);
        assert_eq!(state(0x4020_0000), FrameState::Hypervisor);
        assert_eq!(state(0x402f_f000), FrameState::Hypervisor);
        assert_eq!(state(0x4030_0000), FrameState::Free);
        assert_eq!(state(0x4080_0000), FrameState::Reserved);
        assert_eq!(state(p.start), FrameState::Hypervisor);
        // The free list is exactly the frames tagged free.
        let listed: u64 = free.iter().map(|(a, b)| (b - a) / FRAME_SIZE).sum();
        let tagged =
            (0..db.len() as u64).filter(|i| db.state(Pfn(0x40000 + i)) == Ok(FrameState::Free)).count();
        assert_eq!(listed as usize, tagged);
        for &(a, b) in free.iter() {
            for pfn in a >> 12..b >> 12 {
                assert_eq!(db.state(Pfn(pfn)), Ok(FrameState::Free));
            }
        }
    }

    #[test]
    fn holes_between_banks_stay_absent() {
        let m = map(&[(0x4000_0000, 4 * MIB), (0x5000_0000, 4 * MIB)], &[]);
        let (p, mut db) = db_for(&m);
        let dbr = Region::from_bounds(p.start, p.end).unwrap();
        tag_frames(&mut db, &m, &[dbr]).unwrap();
        assert_eq!(db.state(Pfn(0x48000)), Ok(FrameState::Absent));
        assert_eq!(db.state(Pfn(0x50000)), Ok(FrameState::Free));
    }

    #[test]
    fn no_room_for_the_database_is_an_error() {
        // 1 TiB of RAM (512 MiB of database) whose only free range is small.
        let m = map(&[(0x40_0000_0000, 1 << 40)], &[(0x40_0000_0000 + MIB, (1 << 40) - MIB)]);
        assert!(matches!(place_frame_db(&m), Err(HostMemError::NoRoomForDb { .. })));
    }
}

//! Boot wiring of host frame ownership: place and build the frame database from the memory
//! map, tag every frame (the image, the database and the device tree Hypervisor), start the heap, hand the free frames to the frame manager and fill
//! each CPU's pool. The decisions are the portable `hostmem` and `frame` modules'; this only
//! connects them to raw memory through `arch`.

use labyrinth::dt::Region;
use labyrinth::frame::{FrameDb, FrameManager, PoolConfig};
use labyrinth::hostmem;
use labyrinth::memmap::{MemoryMap, Reason, Size};
use log::info;
use spin::Once;

use crate::arch;

/// Frames the heap takes from the frame manager at boot (2 MiB).
const HEAP_FRAMES: usize = 512;

static FRAMES: Once<FrameManager<'static>> = Once::new();

pub fn init(
    map: &MemoryMap<'_>,
    image: Region,
    cpus: usize,
) -> Result<&'static FrameManager<'static>, &'static str> {
    let placement = hostmem::place_frame_db(map).map_err(|_| "no free range holds the frame database")?;
    // SAFETY: the placement is the top of a free range (mapped read-write by the boot
    // sequence) and `tag_frames` below tags it Hypervisor, so nothing else ever uses it.
    let tags = unsafe { arch::frame_db_storage(placement.start, placement.entries) };
    let banks = hostmem::ram_banks(map);
    let mut db =
        FrameDb::new(tags, placement.base, banks.as_slice()).map_err(|_| "frame database does not fit")?;
    let db_region = Region::from_bounds(placement.start, placement.end).ok_or("empty frame database")?;
    // The device tree stays Labyrinth's for the whole run (its strings are the guests' names).
    let dtb =
        map.reserved().iter().find(|r| r.reason == Reason::DeviceTree && !r.outside_ram).map(|r| r.region);
    // Without a device tree in RAM the image stands in for it: tagging a range twice is a no-op.
    let own = [image, db_region, dtb.unwrap_or(image)];
    let free = hostmem::tag_frames(&mut db, map, &own).map_err(|_| "cannot tag frames")?;
    info!(
        "frame database: {} frames from {:#x}, {} bytes per frame, {} at {db_region}",
        placement.entries,
        placement.base.phys(),
        FrameDb::BYTES_PER_FRAME,
        Size(placement.end - placement.start)
    );

    arch::init_heap();
    // Large pools: a guest's demand faults then reach the buddy allocator (a refill, on the
    // trap path but outside the atomic allocation) once per few hundred pages, not per dozens,
    // and once per 16 blocks (a refill costs ~700 instructions, most of it fixed: ~45 a block).
    // The price: 40 MiB per CPU (8 of pages, 32 of blocks) that promises to guests leave
    // aside (`FrameManager::commit`). 2048 pages rather than 512: the refill's fixed part
    // (the general path's trap, the buddy allocator) is paid once per 2048 faults
    // (docs/guests.md has the figures).
    let config = PoolConfig {
        page_capacity: 2048,
        page_low: 64,
        page_high: 2048,
        block_capacity: 16,
        block_low: 1,
        block_high: 16,
        ..PoolConfig::default()
    };
    let manager = FrameManager::new(db, free.as_slice(), cpus, config, &arch::Scrubber)
        .map_err(|_| "frame manager refused the free ranges")?;
    let manager = FRAMES.call_once(|| manager);
    manager.grow_heap(HEAP_FRAMES, &mut arch::Heap).map_err(|_| "no frames for the heap")?;
    for cpu in 0..cpus {
        manager.refill(cpu).map_err(|_| "cannot fill the frame pools")?;
    }
    let report = manager.audit(None);
    info!(
        "frames: {} free ({}), {} hypervisor, {} reserved; heap {}; per-CPU pools: {} pages, {} blocks",
        report.free,
        Size(report.free as u64 * 4096),
        report.hypervisor,
        report.reserved,
        Size(arch::heap_bytes() as u64),
        config.page_high,
        config.block_high
    );
    if !report.is_consistent() {
        log::error!("ownership audit at boot: {report}");
        return Err("frame ownership audit failed at boot");
    }
    Ok(manager)
}

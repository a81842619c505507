//! The EL2 stage-1 MMU: the table pool in the image's bss, the map built before the MMU is on
//! (image sections with their own permissions, stacks without their guard pages, the device
//! tree read-only), and later extensions (console, RAM). The descriptor logic is the portable
//! `labyrinth::hyp_map`; this module owns the pool and the registers.

use aarch64_cpu::{
    asm::barrier,
    registers::{Readable, Writeable, ID_AA64MMFR0_EL1, MAIR_EL2, SCTLR_EL2, TCR_EL2, TTBR0_EL2},
};
use core::ptr::addr_of_mut;
pub use labyrinth::hyp_map::MapKind;
use labyrinth::hyp_map::{IdentityMap, MapError, Table, PAGE_SIZE};
use spin::Mutex;

use super::cpu::{stack_ranges, MAX_CPUS, STACKS, STACKS_STRIDE};

const POOL_TABLES: usize = 64;
/// The Linux arm64 boot protocol's limit on a device tree's size.
pub const DTB_MAX_SIZE: u64 = 2 << 20;
const FDT_MAGIC: u32 = 0xd00d_feed;

#[link_section = ".bss.pgtables"]
static mut POOL: [Table; POOL_TABLES] = [const { Table::EMPTY }; POOL_TABLES];
/// Tables in use, handed from the early map to the locked one.
static mut EARLY_TABLES_USED: usize = 0;
static MAP: Mutex<Option<IdentityMap<'static>>> = Mutex::new(None);

extern "C" {
    static __text_start: u8;
    static __text_end: u8;
    static __rodata_start: u8;
    static __rodata_end: u8;
    static __data_start: u8;
    static __bss_start: u8;
    static __bss_end: u8;
}

fn sym(s: &u8) -> u64 {
    s as *const u8 as u64
}

fn page_up(x: u64) -> u64 {
    (x + PAGE_SIZE - 1) & !(PAGE_SIZE - 1)
}

/// The device tree's size if `dtb` points at a plausible header (aligned, magic), capped at the
/// protocol's 2 MiB; 0 if not. Full checking comes later, with the MMU on.
fn dtb_size(dtb: u64) -> u64 {
    if dtb == 0 || dtb % 8 != 0 {
        return 0;
    }
    // SAFETY: the boot protocol puts a device tree at x0; an aligned 8-byte read of its first two
    // header words (magic, totalsize) touches only the first 8 bytes of it.
    let header = unsafe { core::ptr::read_volatile(dtb as *const [u32; 2]) };
    if u32::from_be(header[0]) != FDT_MAGIC {
        return 0;
    }
    (u32::from_be(header[1]) as u64).min(DTB_MAX_SIZE)
}

fn early_map_all(map: &mut IdentityMap<'_>, dtb: u64) -> Result<u64, MapError> {
    // SAFETY (all reads of linker symbols below): only their addresses are taken.
    let (text, text_end, ro, ro_end, data, bss, bss_end) = unsafe {
        (
            sym(&__text_start),
            sym(&__text_end),
            sym(&__rodata_start),
            sym(&__rodata_end),
            sym(&__data_start),
            sym(&__bss_start),
            sym(&__bss_end),
        )
    };
    let stacks = addr_of_mut!(STACKS) as u64;
    let stacks_end = stacks + (MAX_CPUS * STACKS_STRIDE) as u64;
    map.map(text, text_end, MapKind::Text)?;
    map.map(ro, ro_end, MapKind::ReadOnly)?;
    map.map(data, bss, MapKind::ReadWrite)?;
    // bss around the stacks, then each stack without its guard page.
    if stacks > bss {
        map.map(bss, stacks, MapKind::ReadWrite)?;
    }
    if bss_end > stacks_end {
        map.map(stacks_end, bss_end, MapKind::ReadWrite)?;
    }
    for cpu in 0..MAX_CPUS {
        for (start, end) in stack_ranges(cpu) {
            map.map(start, end, MapKind::ReadWrite)?;
        }
    }
    let size = dtb_size(dtb);
    if size > 0 {
        map.map(dtb & !(PAGE_SIZE - 1), page_up(dtb + size), MapKind::ReadOnly)?;
    }
    Ok(size)
}

/// Builds the boot map with the MMU off; returns the device tree's mapped size (0: unusable).
///
/// # Safety
/// Called once, by the boot CPU, before the MMU is on and before any other CPU runs.
#[no_mangle]
pub unsafe extern "C" fn early_map(dtb: u64) -> u64 {
    // SAFETY: single CPU, nothing else refers to POOL yet (this function's contract).
    let pool = unsafe { &mut *addr_of_mut!(POOL) };
    let mut map = IdentityMap::new(pool, 1);
    let size = early_map_all(&mut map, dtb).unwrap_or(0);
    // SAFETY: as above; read back in `enable_mmu` on this CPU.
    unsafe { EARLY_TABLES_USED = map.tables_used() };
    size
}

/// RES1 bits of TCR_EL2 (non-VHE) that aarch64-cpu's field list leaves out.
const TCR_EL2_RES1: u64 = (1 << 31) | (1 << 23);
/// RES1 bits of SCTLR_EL2 (non-VHE) that aarch64-cpu's field list leaves out.
const SCTLR_EL2_RES1: u64 =
    (1 << 4) | (1 << 5) | (1 << 11) | (1 << 16) | (1 << 18) | (1 << 22) | (1 << 23) | (1 << 28) | (1 << 29);

/// Programs MAIR/TCR/TTBR0 and turns on the MMU and caches with the boot map.
#[no_mangle]
pub extern "C" fn enable_mmu() {
    MAIR_EL2.write(
        MAIR_EL2::Attr0_Device::nonGathering_nonReordering_EarlyWriteAck
            + MAIR_EL2::Attr1_Normal_Outer::WriteBack_NonTransient_ReadWriteAlloc
            + MAIR_EL2::Attr1_Normal_Inner::WriteBack_NonTransient_ReadWriteAlloc,
    );
    // The physical address size is the CPU's, capped at the 48 bits our tables describe.
    let ps = ID_AA64MMFR0_EL1.read(ID_AA64MMFR0_EL1::PARange).min(5);
    let tcr = TCR_EL2::T0SZ.val(64 - labyrinth::hyp_map::VA_BITS as u64)
        + TCR_EL2::TG0::KiB_4
        + TCR_EL2::SH0::Inner
        + TCR_EL2::ORGN0::WriteBack_ReadAlloc_WriteAlloc_Cacheable
        + TCR_EL2::IRGN0::WriteBack_ReadAlloc_WriteAlloc_Cacheable
        + TCR_EL2::PS.val(ps);
    TCR_EL2.set(tcr.value | TCR_EL2_RES1);
    TTBR0_EL2.set(addr_of_mut!(POOL) as u64);
    barrier::isb(barrier::SY);
    // SAFETY: drops whatever EL2 translations firmware left behind; the MMU is still off.
    unsafe { core::arch::asm!("tlbi alle2", "dsb nsh", options(nostack)) };
    barrier::isb(barrier::SY);
    let sctlr = SCTLR_EL2::M::Enable
        + SCTLR_EL2::C::Cacheable
        + SCTLR_EL2::I::Cacheable
        + SCTLR_EL2::SA::Enable
        + SCTLR_EL2::WXN::Enable;
    SCTLR_EL2.set(sctlr.value | SCTLR_EL2_RES1);
    barrier::isb(barrier::SY);
}

/// Hands the boot map to the lock that guards later extensions. Boot CPU, MMU on.
pub fn adopt_early_map() {
    // SAFETY: called once on the boot CPU after `early_map`; from here on POOL is only reached
    // through MAP's lock.
    let (pool, used) = unsafe { (&mut *addr_of_mut!(POOL), EARLY_TABLES_USED) };
    *MAP.lock() = Some(IdentityMap::new(pool, used));
}

/// Adds `[start, end)` (rounded out to pages) to the live map. Only invalid entries change, so
/// no TLB maintenance is owed; the barriers make the new entries visible to the walker.
pub fn map_range(start: u64, end: u64, kind: MapKind) -> Result<(), MapError> {
    let mut guard = MAP.lock();
    let map = guard.as_mut().ok_or(MapError::OutOfTables)?;
    map.map(start & !(PAGE_SIZE - 1), page_up(end), kind)?;
    barrier::dsb(barrier::ISHST);
    barrier::isb(barrier::SY);
    Ok(())
}

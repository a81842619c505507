//! The stage-2 code's machine on aarch64: table pages read, written and compared-and-swapped
//! through the identity map as 64-bit atomics (several CPUs install into one guest's tables at
//! once), table frames from the atomic path, and the real barriers and TLB instructions.

use core::sync::atomic::{AtomicU64, Ordering};

use labyrinth::frame::{FrameManager, FrameState, Owner, Pfn, VmId};
use labyrinth::stage2::{Stage2Env, Stage2Error};

use super::memory::Scrubber;

pub struct HwStage2<'a> {
    pub frames: &'a FrameManager<'static>,
    pub cpu: usize,
    /// The guest's `VTTBR_EL2`: TLBI by IPA and VMALL*E1IS act on the VMID it holds.
    pub vttbr: u64,
}

/// Entry `index` of the table page `table`, as the atomic it is for every CPU that walks it.
#[inline(always)]
fn entry(table: Pfn, index: usize) -> &'static AtomicU64 {
    // SAFETY: `table` is a page-table frame of a guest (tagged so by the frame database), in
    // RAM identity-mapped at EL2 for the hypervisor's lifetime, 8-byte aligned; `index & 511`
    // stays inside the page. Every access to table memory goes through these atomics.
    unsafe { AtomicU64::from_ptr((table.phys() as *mut u64).add(index & 511)) }
}

impl HwStage2<'_> {
    /// TLB maintenance acts on the VMID in `VTTBR_EL2`: make sure it is this guest's.
    fn select_vmid(&self, vmid: u16) {
        let want = (self.vttbr & !(0xffff << 48)) | ((vmid as u64) << 48);
        let cur: u64;
        // SAFETY: reads VTTBR_EL2.
        unsafe { core::arch::asm!("mrs {}, vttbr_el2", out(reg) cur, options(nomem, nostack)) };
        if cur != want {
            // SAFETY: no guest runs on this CPU while EL2 works; the next guest entry sets it.
            unsafe { core::arch::asm!("msr vttbr_el2, {}", "isb", in(reg) want, options(nostack)) };
        }
    }
}

impl Stage2Env for HwStage2<'_> {
    #[inline(always)]
    fn read(&self, table: Pfn, index: usize) -> u64 {
        entry(table, index).load(Ordering::Acquire)
    }

    #[inline(always)]
    fn write(&mut self, table: Pfn, index: usize, value: u64) {
        // One 64-bit store: a walker sees the old or the new entry.
        entry(table, index).store(value, Ordering::Release)
    }

    #[inline(always)]
    fn cas(&mut self, table: Pfn, index: usize, old: u64, new: u64) -> Result<(), u64> {
        // LDAXR/STLXR on ARMv8.0 (no LSE on the cortex-a72): the exclusive pair replaces the
        // plain store the single-vCPU path made, and the load the fault path made before it.
        entry(table, index).compare_exchange(old, new, Ordering::AcqRel, Ordering::Acquire).map(|_| ())
    }

    fn take_tables(&mut self, vm: VmId, out: &mut [Pfn]) -> Result<(), Stage2Error> {
        let owner = Owner::page_table(vm);
        for i in 0..out.len() {
            match self.frames.alloc_page_atomic_exclusive(self.cpu, owner) {
                Ok(p) => out[i] = p,
                Err(_) => {
                    for &p in &out[..i] {
                        if self.frames.return_unused_page_atomic(self.cpu, p, owner).is_err() {
                            let _ = self.frames.release(p, 1, owner, &Scrubber);
                        }
                    }
                    return Err(Stage2Error::OutOfMemory);
                }
            }
        }
        Ok(())
    }

    fn free_table(&mut self, vm: VmId, table: Pfn) {
        if let Err(e) = self.frames.release(table, 1, Owner::page_table(vm), &Scrubber) {
            log::error!("stage-2 table {table} of VM {} not released: {e}", vm.get());
        }
    }

    fn return_unused_table(&mut self, vm: VmId, table: Pfn) {
        // Never linked, so never written: back to this CPU's pool as it came (still zero);
        // the scrubbing release when the pool is full or busy.
        let owner = Owner::page_table(vm);
        if self.frames.return_unused_page_atomic(self.cpu, table, owner).is_err() {
            self.free_table(vm, table);
        }
    }

    #[inline(always)]
    fn frame_state(&self, pfn: Pfn) -> Option<FrameState> {
        self.frames.db().state(pfn).ok()
    }

    fn frame_unit(&self, pfn: Pfn) -> (Option<FrameState>, u64) {
        match self.frames.db().unit(pfn) {
            Ok((state, run)) => (Some(state), run),
            Err(_) => (None, 1),
        }
    }

    fn split_frames(&mut self, vm: VmId, head: Pfn) {
        if let Err(e) = self.frames.split_block(head, Owner::guest(vm)) {
            log::error!("block at {head} of VM {} not split in the frame database: {e}", vm.get());
        }
    }

    #[inline(always)]
    fn frame_is(&self, pfn: Pfn, state: FrameState) -> bool {
        self.frames.db().is_in(pfn, state)
    }

    #[inline(always)]
    fn block_is(&self, head: Pfn, state: FrameState) -> bool {
        self.frames.db().is_block_in(head, state)
    }

    #[inline(always)]
    fn dsb_ishst(&mut self) {
        // SAFETY: a barrier.
        unsafe { core::arch::asm!("dsb ishst", options(nostack)) };
    }

    fn dsb_ish(&mut self) {
        // SAFETY: a barrier.
        unsafe { core::arch::asm!("dsb ish", options(nostack)) };
    }

    fn isb(&mut self) {
        // SAFETY: a barrier.
        unsafe { core::arch::asm!("isb", options(nostack)) };
    }

    fn tlbi_ipas2e1is(&mut self, vmid: u16, ipa: u64, _level: usize) {
        self.select_vmid(vmid);
        // SAFETY: TLB maintenance for this guest's VMID; Xt holds IPA[51:12].
        unsafe { core::arch::asm!("tlbi ipas2e1is, {}", in(reg) ipa >> 12, options(nostack)) };
    }

    fn tlbi_vmalle1is(&mut self, vmid: u16) {
        self.select_vmid(vmid);
        // SAFETY: TLB maintenance for this guest's VMID.
        unsafe { core::arch::asm!("tlbi vmalle1is", options(nostack)) };
    }

    fn tlbi_vmalls12e1is(&mut self, vmid: u16) {
        self.select_vmid(vmid);
        // SAFETY: TLB maintenance for this guest's VMID.
        unsafe { core::arch::asm!("tlbi vmalls12e1is", options(nostack)) };
    }
}

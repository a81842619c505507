//! What stage-2 table code needs from the machine, as one narrow interface: table memory, table
//! pages, frame ownership, and the barriers and TLB maintenance it issues. The arch implements it
//! over real memory and instructions; the host tests and the fuzzer implement it over a model
//! that checks every write and every invalidation.
//!
//! One value of it serves one CPU (it may carry that CPU's frame pool); several CPUs working on
//! one guest's tables each bring their own, over the same table memory. Table memory is then
//! shared: `read`, `write` and `cas` must each be one single-copy-atomic access, with the
//! orderings they state, so that a walker on another CPU sees a table page's contents once it
//! sees the entry that links it.

use crate::frame::{FrameState, Pfn, VmId};

use super::Stage2Error;

pub trait Stage2Env {
    /// Reads entry `index` of the table in frame `table` (one atomic load, Acquire: a table
    /// it links is seen as it was when linked).
    fn read(&self, table: Pfn, index: usize) -> u64;
    /// Reads entries `index..index + out.len()` of the table in frame `table` into `out`, one
    /// [`Stage2Env::read`] each, in order. For walks nothing else writes beside (a teardown);
    /// an environment whose reads cost a call each (the checking model) answers it at once.
    #[inline(always)]
    fn read_run(&self, table: Pfn, index: usize, out: &mut [u64]) {
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = self.read(table, index + i);
        }
    }
    /// Writes entry `index` of the table in frame `table` with one single-copy-atomic store
    /// (Release). Only structural changes write; a fault installs with [`Stage2Env::cas`].
    fn write(&mut self, table: Pfn, index: usize, value: u64);
    /// Compare-and-swap of entry `index` of the table in frame `table`: if it holds `old`, it
    /// becomes `new` (`Ok`); else nothing is written and `Err` carries what it holds. One
    /// atomic read-modify-write (AcqRel; Acquire when it fails), so of several CPUs installing
    /// into the same invalid entry exactly one wins.
    fn cas(&mut self, table: Pfn, index: usize, old: u64, new: u64) -> Result<(), u64>;

    /// Takes zeroed frames, tagged as `vm`'s page tables, into every slot of `out`; all of them
    /// or none (then `Err(OutOfMemory)`).
    fn take_tables(&mut self, vm: VmId, out: &mut [Pfn]) -> Result<(), Stage2Error>;
    /// Gives back a table page that no walker can reach any more (its invalidation is complete).
    fn free_table(&mut self, vm: VmId, table: Pfn);
    /// Gives back a table page from `take_tables` that was never linked into the tree (a lost
    /// install race, a spare an operation did not need): still zero, so it may go back through
    /// the atomic path without a scrub.
    fn return_unused_table(&mut self, vm: VmId, table: Pfn) {
        self.free_table(vm, table)
    }
    /// The frame database's view of `pfn`; `None` if it is not RAM.
    fn frame_state(&self, pfn: Pfn) -> Option<FrameState>;

    /// The state of `pfn` and how many frames from it on share it as one unit (the rest of a
    /// 2 MiB block owned whole, else 1): a block's owner check reads one tag, not 512.
    fn frame_unit(&self, pfn: Pfn) -> (Option<FrameState>, u64) {
        (self.frame_state(pfn), 1)
    }

    /// Whether the 2 MiB block headed at `head` is held as one unit in `state`: the block
    /// fault's owner check, which an environment may answer with one tag load.
    #[inline(always)]
    fn block_is(&self, head: Pfn, state: FrameState) -> bool {
        head.0.is_multiple_of(512) && self.frame_unit(head) == (Some(state), 512)
    }

    /// The 2 MiB block of guest `vm` headed at `head` is being split into pages: if the frame
    /// database holds it as one unit, give its frames per-frame tags (same owner).
    fn split_frames(&mut self, vm: VmId, head: Pfn);

    /// Whether `pfn` is in `state` (the demand-fault path's owner check; an environment may
    /// answer it more cheaply than by decoding the state).
    #[inline(always)]
    fn frame_is(&self, pfn: Pfn, state: FrameState) -> bool {
        self.frame_state(pfn) == Some(state)
    }

    /// `DSB ISHST`: table writes before it are visible to walkers after it.
    fn dsb_ishst(&mut self);
    /// `DSB ISH`: earlier TLB maintenance is complete after it.
    fn dsb_ish(&mut self);
    /// `ISB`.
    fn isb(&mut self);
    /// `TLBI IPAS2E1IS` for `ipa` under `vmid` (all levels: walk caches included); `level` is
    /// the level of the entry that changed, a hint.
    fn tlbi_ipas2e1is(&mut self, vmid: u16, ipa: u64, level: usize);
    /// `TLBI VMALLE1IS` under `vmid`: stage-1 and combined entries of the guest.
    fn tlbi_vmalle1is(&mut self, vmid: u16);
    /// `TLBI VMALLS12E1IS` under `vmid`: everything cached for the guest, both stages.
    fn tlbi_vmalls12e1is(&mut self, vmid: u16);
}

//! The stage-2 fuzz harness: a byte string becomes a sequence of map / unmap / protect /
//! fault-in / split / collapse / teardown operations on two guests, and after every step the
//! result is checked against a reference model (page-granular translations per guest) and the
//! checking machine model ([`ModelEnv`]: TLBs, break-before-make, ownership). Any divergence
//! panics, which is what libFuzzer reports. The `stage2_ops` fuzz target and the host tests
//! both run it.

use std::collections::BTreeMap;
use std::vec::Vec;

use crate::frame::{ClaimedBlock, ClaimedPage, FrameState, Pfn, VmId};

use super::model::ModelEnv;
use super::{level_size, Attrs, Geometry, MemType, PageState, Stage2, Stage2Env, Stage2Error};

const RAM_BASE_PFN: u64 = 0x40000;
/// 24 MiB of host RAM: enough for both guests' windows and their tables, small enough to run out.
const RAM_FRAMES: usize = 6144;
/// Each guest's IPA window: 8 MiB (four 2 MiB blocks) at the virt machine's RAM base.
const WINDOW: u64 = 0x4000_0000;
const WINDOW_PAGES: u64 = 2048;
const PAGE: u64 = 0x1000;

struct Guest {
    s2: Option<Stage2>,
    vm: VmId,
    vmid: u16,
    /// IPA page -> (PA, attrs): what the guest must see.
    expect: BTreeMap<u64, (u64, Attrs)>,
}

struct Reader<'a> {
    data: &'a [u8],
}

impl Reader<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.data.split_first()?;
        self.data = rest;
        Some(b)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from(self.byte()?) | u16::from(self.byte()?) << 8)
    }
}

fn attrs_from(bits: u8) -> Attrs {
    Attrs {
        mem: MemType::Normal,
        read: bits & 1 != 0,
        write: bits & 2 != 0,
        exec: bits & 4 != 0,
        state: PageState::Owned,
    }
}

pub struct Exercise {
    env: ModelEnv,
    guests: [Guest; 2],
    geo: Geometry,
    /// A hypervisor-owned frame: mapping it must always be refused.
    hyp_frame: Pfn,
}

impl Default for Exercise {
    fn default() -> Self {
        Self::new()
    }
}

impl Exercise {
    pub fn new() -> Self {
        let mut env = ModelEnv::new(RAM_BASE_PFN, RAM_FRAMES);
        let hyp_frame = env.claim_frame(FrameState::Hypervisor).expect("fresh RAM");
        let geo = Geometry::for_pa_bits(40);
        let mut guests = [1u16, 2].map(|n| Guest {
            s2: None,
            vm: VmId::new(n).expect("small id"),
            vmid: n,
            expect: BTreeMap::new(),
        });
        for g in &mut guests {
            let s2 = Stage2::new(&mut env, g.vm, g.vmid, geo).expect("RAM for two roots");
            env.add_root(g.vmid, root_of(&s2), geo.start_level);
            g.s2 = Some(s2);
        }
        Exercise { env, guests, geo, hyp_frame }
    }

    /// Runs the operations `data` encodes, checking after each.
    pub fn run(data: &[u8]) {
        let mut ex = Exercise::new();
        let mut r = Reader { data };
        while let Some(op) = r.byte() {
            if ex.step(op, &mut r).is_none() {
                break;
            }
            ex.check();
        }
        ex.finish();
    }

    fn step(&mut self, op: u8, r: &mut Reader<'_>) -> Option<()> {
        let gi = (op >> 7) as usize;
        match op & 0x0f {
            0..=3 => self.fault_page(gi, u64::from(r.u16()?) % WINDOW_PAGES),
            4 => {
                let b = r.byte()?;
                // Odd bytes take the block fault's fast form first, as the fast trap does.
                self.fault_block(gi, u64::from(b >> 1) % (WINDOW_PAGES / 512), b & 1 != 0)
            }
            5 | 6 => {
                let start = u64::from(r.u16()?) % WINDOW_PAGES;
                let len = 1 + u64::from(r.u16()?) % (WINDOW_PAGES - start);
                self.unmap(gi, start, len);
            }
            7 => {
                let start = u64::from(r.u16()?) % WINDOW_PAGES;
                let len = 1 + u64::from(r.u16()?) % (WINDOW_PAGES - start);
                self.protect(gi, start, len, attrs_from(r.byte()?));
            }
            8 => self.split(gi, u64::from(r.u16()?) % WINDOW_PAGES, 1 + (r.byte()? % 2) as usize),
            9 => self.collapse(gi, u64::from(r.u16()?) % WINDOW_PAGES, 1 + (r.byte()? % 2) as usize),
            10 => self.map_foreign(gi, u64::from(r.u16()?) % WINDOW_PAGES, r.byte()?),
            11 => self.teardown_and_recreate(gi),
            12 => self.env.fail_tables = r.byte()? & 1 != 0,
            _ => self.fault_page(gi, u64::from(r.byte()?) % WINDOW_PAGES),
        }
        Some(())
    }

    fn s2(&mut self, gi: usize) -> (&mut Stage2, &mut ModelEnv) {
        let g = &mut self.guests[gi];
        (g.s2.as_mut().expect("guests always have a space"), &mut self.env)
    }

    fn fault_page(&mut self, gi: usize, page: u64) {
        let vm = self.guests[gi].vm;
        let ipa = WINDOW + page * PAGE;
        let mapped = self.guests[gi].expect.contains_key(&ipa);
        let Some(pfn) = self.env.claim_frame(FrameState::Guest(vm)) else { return };
        let (s2, env) = self.s2(gi);
        // Page faults take the general path, the demand-fault path, or its claimed-page form.
        let r = match page % 3 {
            0 => s2.map(env, ipa, pfn.phys(), 3, Attrs::RAM),
            1 => s2.map_page(env, ipa, pfn.phys(), Attrs::RAM),
            _ => match s2.cached_page_slot(env, ipa) {
                Some(slot) => slot
                    .fill(env, ClaimedPage::assume(pfn, vm))
                    .map_err(|_| Stage2Error::NotOwned { pfn, state: None }),
                None => s2.map_page(env, ipa, pfn.phys(), Attrs::RAM),
            },
        };
        match r {
            Ok(()) => {
                assert!(!mapped, "mapped over the live page at {ipa:#x}");
                self.guests[gi].expect.insert(ipa, (pfn.phys(), Attrs::RAM));
            }
            Err(e) => {
                assert!(
                    matches!(e, Stage2Error::AlreadyMapped { .. }) && mapped
                        || e == Stage2Error::OutOfMemory && !mapped,
                    "fault at {ipa:#x} (mapped: {mapped}) refused with {e:?}"
                );
                self.env.release_frames(pfn.phys(), PAGE);
            }
        }
    }

    fn fault_block(&mut self, gi: usize, block: u64, fast: bool) {
        let vm = self.guests[gi].vm;
        let ipa = WINDOW + block * level_size(2);
        let any_mapped = self.guests[gi].expect.range(ipa..ipa + level_size(2)).next().is_some();
        if fast {
            let (s2, env) = self.s2(gi);
            if s2.vacant_block(env, ipa).is_some() {
                assert!(!any_mapped, "block at {ipa:#x} offered as vacant over live pages");
                // The fast path claims its block only once the entry is known to be vacant.
                let Some(first) = self.env.claim_contiguous(512, 512, FrameState::Guest(vm)) else { return };
                let (s2, env) = self.s2(gi);
                // Asked again: the claim above needed the environment (the fast path's pool does
                // not); a hit in the cached level-2 table this time.
                let vacant = s2.vacant_block(env, ipa).expect("still vacant");
                // Half the time as the fault path does it: with the claim's proof.
                if block.is_multiple_of(2) {
                    vacant
                        .map(env, first.phys(), Attrs::RAM)
                        .expect("an own, whole block maps into a vacant entry");
                } else {
                    let claimed = ClaimedBlock::assume(first, vm);
                    vacant.fill(env, claimed).expect("an own claimed block fills a vacant entry");
                }
                for i in 0..512 {
                    self.guests[gi].expect.insert(ipa + i * PAGE, (first.phys() + i * PAGE, Attrs::RAM));
                }
                return;
            }
            // Declined (something mapped, or no level-2 table yet): the general path follows.
        }
        let Some(first) = self.env.claim_contiguous(512, 512, FrameState::Guest(vm)) else { return };
        let (s2, env) = self.s2(gi);
        match s2.map(env, ipa, first.phys(), 2, Attrs::RAM) {
            Ok(()) => {
                assert!(!any_mapped, "block mapped over live pages at {ipa:#x}");
                for i in 0..512 {
                    self.guests[gi].expect.insert(ipa + i * PAGE, (first.phys() + i * PAGE, Attrs::RAM));
                }
            }
            Err(e) => {
                assert!(
                    matches!(e, Stage2Error::AlreadyMapped { .. }) && any_mapped
                        || e == Stage2Error::OutOfMemory && !any_mapped,
                    "block fault at {ipa:#x} (pages mapped: {any_mapped}) refused with {e:?}"
                );
                self.env.release_frames(first.phys(), level_size(2));
            }
        }
    }

    fn unmap(&mut self, gi: usize, start: u64, len: u64) {
        let (ipa, end) = (WINDOW + start * PAGE, WINDOW + (start + len) * PAGE);
        let mut released = Vec::new();
        let (s2, env) = self.s2(gi);
        let result = s2.unmap(env, ipa, end - ipa, &mut |pa, size| released.push((pa, size)));
        let g = &mut self.guests[gi];
        match result {
            Ok(()) => {
                let mut want: Vec<u64> = g.expect.range(ipa..end).map(|(_, &(pa, _))| pa).collect();
                let mut got: Vec<u64> = released
                    .iter()
                    .flat_map(|&(pa, size)| (0..size / PAGE).map(move |i| pa + i * PAGE))
                    .collect();
                want.sort_unstable();
                got.sort_unstable();
                assert_eq!(got, want, "unmap {ipa:#x}-{end:#x} released the wrong frames");
                let pages: Vec<u64> = g.expect.range(ipa..end).map(|(&k, _)| k).collect();
                for k in pages {
                    g.expect.remove(&k);
                }
            }
            Err(e) => {
                assert_eq!(e, Stage2Error::OutOfMemory, "unmap refused with {e:?}");
                assert!(released.is_empty(), "a refused unmap released frames");
            }
        }
        for (pa, size) in released {
            self.env.release_frames(pa, size);
        }
    }

    fn protect(&mut self, gi: usize, start: u64, len: u64, attrs: Attrs) {
        let (ipa, end) = (WINDOW + start * PAGE, WINDOW + (start + len) * PAGE);
        let (s2, env) = self.s2(gi);
        match s2.protect(env, ipa, end - ipa, attrs) {
            Ok(()) => {
                for (_, v) in self.guests[gi].expect.range_mut(ipa..end) {
                    v.1 = attrs;
                }
            }
            Err(e) => assert_eq!(e, Stage2Error::OutOfMemory, "protect refused with {e:?}"),
        }
    }

    fn split(&mut self, gi: usize, page: u64, level: usize) {
        let (s2, env) = self.s2(gi);
        // Whether it applies depends on the table shape; translations must not change either way.
        let _ = s2.split(env, WINDOW + page * PAGE, level);
    }

    fn collapse(&mut self, gi: usize, page: u64, level: usize) {
        let (s2, env) = self.s2(gi);
        let _ = s2.collapse(env, WINDOW + page * PAGE, level);
    }

    fn map_foreign(&mut self, gi: usize, page: u64, which: u8) {
        let ipa = WINDOW + page * PAGE;
        let other = &self.guests[1 - gi];
        let foreign = match which % 3 {
            0 => other.expect.values().next().map(|&(pa, _)| pa),
            1 => Some(self.hyp_frame.phys()),
            _ => {
                let mut t = None;
                if let Some(s2) = other.s2.as_ref() {
                    s2.for_each_table(&self.env, &mut |p| t = Some(p.phys()));
                }
                t
            }
        };
        let Some(pa) = foreign else { return };
        let (s2, env) = self.s2(gi);
        let r = s2.map(env, ipa, pa, 3, Attrs::RAM);
        assert!(matches!(r, Err(Stage2Error::NotOwned { .. })), "mapped a foreign frame {pa:#x}: {r:?}");
        // The block fault's fast form refuses the 2 MiB it heads, too (never this guest's).
        let head = pa & !(level_size(2) - 1);
        if head == pa {
            if let Some(vacant) = s2.vacant_block(env, ipa) {
                let r = vacant.map(env, pa, Attrs::RAM);
                assert!(
                    matches!(r, Err(Stage2Error::NotOwned { .. })),
                    "mapped a foreign block {pa:#x}: {r:?}"
                );
            }
        }
    }

    fn teardown_and_recreate(&mut self, gi: usize) {
        let s2 = self.guests[gi].s2.take().expect("live space");
        let (vm, vmid) = (self.guests[gi].vm, self.guests[gi].vmid);
        let mut released = Vec::new();
        let proof = s2.teardown(&mut self.env, &mut |pa, size| released.push((pa, size)));
        for (pa, size) in released {
            self.env.release_frames(pa, size);
        }
        assert_eq!(proof.vmid(), vmid);
        assert_eq!(self.env.frames_in(FrameState::Guest(vm)), 0, "guest frames left after teardown");
        assert_eq!(self.env.frames_in(FrameState::PageTable(vm)), 0, "table pages left after teardown");
        assert_eq!(self.env.cached_for(vmid), 0, "TLB entries left for VMID {vmid}: it cannot be reused");
        self.guests[gi].expect.clear();
        let fail = core::mem::replace(&mut self.env.fail_tables, false);
        let s2 = Stage2::new(&mut self.env, vm, vmid, self.geo).expect("the freed root is free again");
        self.env.fail_tables = fail;
        self.env.add_root(vmid, root_of(&s2), self.geo.start_level);
        self.guests[gi].s2 = Some(s2);
    }

    /// The invariants that hold between operations.
    fn check(&mut self) {
        self.env.check_quiescent();
        assert!(self.env.violations.is_empty(), "machine-model violations: {:#?}", self.env.violations);
        let mut owner_of_pa: BTreeMap<u64, u16> = BTreeMap::new();
        for g in &self.guests {
            let s2 = g.s2.as_ref().expect("live space");
            assert!(s2.caches_agree(&self.env), "VM {}: a cached table is not the one a walk finds", g.vmid);
            // Every leaf, expanded to pages, must be exactly the reference model.
            let mut seen: BTreeMap<u64, (u64, Attrs)> = BTreeMap::new();
            s2.for_each_mapping(&self.env, &mut |m| {
                for i in 0..m.size / PAGE {
                    seen.insert(m.ipa + i * PAGE, (m.pa + i * PAGE, m.attrs));
                }
            });
            assert_eq!(seen, g.expect, "VM {}: mappings differ from the reference model", g.vmid);
            // The walker agrees with the leaves, on a spread of addresses (mapped or not).
            for page in
                (0..WINDOW_PAGES).step_by(61).chain(g.expect.keys().map(|k| (k - WINDOW) / PAGE).take(64))
            {
                let ipa = WINDOW + page * PAGE;
                let got = s2.translate(&self.env, ipa).map(|m| (m.pa, m.attrs));
                assert_eq!(
                    got,
                    g.expect.get(&ipa).copied(),
                    "VM {}: IPA {ipa:#x} translates wrongly",
                    g.vmid
                );
            }
            for (&ipa, &(pa, _)) in &g.expect {
                assert_eq!(
                    self.env.frame_state(Pfn(pa >> 12)),
                    Some(FrameState::Guest(g.vm)),
                    "VM {}: IPA {ipa:#x} maps {pa:#x}, which it does not own",
                    g.vmid
                );
                if let Some(other) = owner_of_pa.insert(pa, g.vmid) {
                    assert_eq!(other, g.vmid, "{pa:#x} mapped in two guests");
                }
            }
            let mut tables = 0;
            s2.for_each_table(&self.env, &mut |t| {
                assert_eq!(self.env.frame_state(t), Some(FrameState::PageTable(g.vm)));
                tables += 1;
            });
            assert_eq!(tables, s2.table_pages(), "VM {}: table count drifted", g.vmid);
            assert_eq!(
                self.env.frames_in(FrameState::PageTable(g.vm)),
                tables,
                "VM {}: table pages leaked",
                g.vmid
            );
        }
    }

    /// Tears both guests down; afterwards every frame but the hypervisor's is free.
    fn finish(mut self) {
        for gi in 0..2 {
            let s2 = self.guests[gi].s2.take().expect("live space");
            let mut released = Vec::new();
            let _ = s2.teardown(&mut self.env, &mut |pa, size| released.push((pa, size)));
            for (pa, size) in released {
                self.env.release_frames(pa, size);
            }
        }
        assert!(self.env.violations.is_empty(), "machine-model violations: {:#?}", self.env.violations);
        assert_eq!(self.env.frames_in(FrameState::Free), RAM_FRAMES - 1, "frames leaked");
    }
}

fn root_of(s2: &Stage2) -> Pfn {
    Pfn((s2.vttbr() & 0x0000_ffff_ffff_f000) >> 12)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_scripted_sequence_passes() {
        // Fault pages and a block in both guests, split, protect, unmap across the split,
        // collapse, tear down and recreate one guest.
        let ops: &[u8] = &[
            0x00, 0x05, 0x00, // VM1 fault page 5
            0x80, 0x05, 0x00, // VM2 fault page 5
            0x04, 0x02, // VM1 fault block 1
            0x04, 0x05, // VM1 fault block 2, fast form
            0x04, 0x07, // VM1 fault block 3, fast form
            0x08, 0x00, 0x02, 0x01, // VM1 split page 512 at level 2
            0x07, 0x10, 0x02, 0x20, 0x00, 0x01, // VM1 protect 528..560 read-only
            0x05, 0x00, 0x02, 0x10, 0x00, // VM1 unmap 512..528
            0x09, 0x00, 0x02, 0x01, // VM1 collapse (must refuse now)
            0x0a, 0x07, 0x00, 0x00, // VM1 map VM2's frame: refused
            0x0a, 0x07, 0x00, 0x01, // VM1 map the hypervisor's frame: refused
            0x0a, 0x07, 0x00, 0x02, // VM1 map VM2's table page: refused
            0x8b, // VM2 teardown and recreate
            0x0c, 0x01, // exhaust table memory
            0x00, 0x00, 0x04, // VM1 fault page 1024: out of memory, nothing changes
        ];
        Exercise::run(ops);
    }

    #[test]
    fn replays_the_checked_in_corpus() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus/stage2_ops");
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for e in entries.flatten() {
            Exercise::run(&std::fs::read(e.path()).unwrap());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
        #[test]
        fn random_sequences_keep_every_invariant(data in proptest::collection::vec(any::<u8>(), 0..400)) {
            Exercise::run(&data);
        }
    }
}

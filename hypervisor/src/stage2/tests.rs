//! Stage-2 behaviour, one behaviour per test, each run against the checking model: every test
//! ends with the model's verdict that no rule was broken.

use super::model::{ModelEnv, Sabotage};
use super::*;
use crate::frame::{ClaimedBlock, ClaimedPage, VmId};

const RAM_BASE_PFN: u64 = 0x40000; // 0x4000_0000
const MIB: u64 = 1 << 20;
const GUEST_RAM: u64 = 0x4000_0000;

fn vm(n: u16) -> VmId {
    VmId::new(n).unwrap()
}

fn setup(frames: usize) -> (ModelEnv, Stage2) {
    let mut env = ModelEnv::new(RAM_BASE_PFN, frames);
    let s2 = Stage2::new(&mut env, vm(1), 1, Geometry::for_pa_bits(40)).unwrap();
    env.add_root(1, Pfn(s2.vttbr() >> 12 & ((1 << 36) - 1)), s2.geometry().start_level);
    (env, s2)
}

fn guest_frame(env: &mut ModelEnv, n: u16) -> u64 {
    env.claim_frame(FrameState::Guest(vm(n))).unwrap().phys()
}

fn guest_block(env: &mut ModelEnv, n: u16) -> u64 {
    env.claim_contiguous(512, 512, FrameState::Guest(vm(n))).unwrap().phys()
}

fn clean(env: &mut ModelEnv) {
    env.check_quiescent();
    assert!(env.violations.is_empty(), "model violations: {:#?}", env.violations);
}

#[test]
fn geometry_follows_pa_range() {
    let g = Geometry::for_pa_bits(44);
    assert_eq!((g.ipa_bits, g.start_level, g.t0sz(), g.sl0()), (44, 0, 20, 2));
    let g = Geometry::for_pa_bits(36);
    assert_eq!((g.ipa_bits, g.start_level, g.t0sz(), g.sl0()), (36, 1, 28, 1));
    assert_eq!(Geometry::for_pa_bits(52).ipa_bits, 48);
    assert_eq!(Geometry::for_pa_bits(44).root_entries(), 32);
}

// The table bound a guest's memory promise is built on: mapping every page of a range never
// takes more, and takes exactly as many when the walk needs a table in every region.
#[test]
fn max_table_pages_bounds_mapping_every_page() {
    for (base, pages) in
        [(GUEST_RAM, 1u64), (GUEST_RAM, 1024), (GUEST_RAM + 0x1f_f000, 2), (GUEST_RAM - 0x1000, 3)]
    {
        let (mut env, mut s2) = setup(pages as usize + 64);
        for i in 0..pages {
            let pa = guest_frame(&mut env, 1);
            s2.map(&mut env, base + i * PAGE_SIZE, pa, 3, Attrs::RAM).unwrap();
        }
        assert_eq!(
            s2.table_pages(),
            s2.geometry().max_table_pages(base, pages * PAGE_SIZE),
            "range {base:#x}+{pages} pages"
        );
        clean(&mut env);
    }
    let g = Geometry::for_pa_bits(44);
    // 512 MiB at 1 GiB: root, one L1, one L2, 256 L3.
    assert_eq!(g.max_table_pages(GUEST_RAM, 512 * MIB), 1 + 1 + 1 + 256);
}

#[test]
fn maps_a_page_and_translates_it() {
    let (mut env, mut s2) = setup(64);
    let pa = guest_frame(&mut env, 1);
    s2.map(&mut env, GUEST_RAM, pa, 3, Attrs::RAM).unwrap();
    let m = s2.translate(&env, GUEST_RAM + 0x123).unwrap();
    assert_eq!((m.pa, m.attrs), (pa, Attrs::RAM));
    assert_eq!(s2.translate(&env, GUEST_RAM + 0x1000), None);
    // root + L1 + L2 + L3
    assert_eq!(s2.table_pages(), 4);
    clean(&mut env);
}

#[test]
fn mapping_needs_no_tlb_maintenance() {
    let (mut env, mut s2) = setup(64);
    let pa = guest_frame(&mut env, 1);
    s2.map(&mut env, GUEST_RAM, pa, 3, Attrs::RAM).unwrap();
    assert_eq!(env.tlbi_count, 0);
    clean(&mut env);
}

#[test]
fn maps_a_2mib_block() {
    let (mut env, mut s2) = setup(2048);
    let pa = guest_block(&mut env, 1);
    s2.map(&mut env, GUEST_RAM + 2 * MIB, pa, 2, Attrs::RAM).unwrap();
    let m = s2.translate(&env, GUEST_RAM + 3 * MIB).unwrap();
    assert_eq!(m.pa, pa + MIB);
    let mut n = 0;
    s2.for_each_mapping(&env, &mut |m| {
        assert_eq!(m.size, 2 * MIB);
        n += 1;
    });
    assert_eq!(n, 1);
    clean(&mut env);
}

#[test]
fn maps_a_1gib_block() {
    let frames = 512 * 512 * 2;
    let mut env = ModelEnv::new(RAM_BASE_PFN, frames);
    let mut s2 = Stage2::new(&mut env, vm(1), 1, Geometry::for_pa_bits(40)).unwrap();
    let pa = env.claim_contiguous(512 * 512, 512 * 512, FrameState::Guest(vm(1))).unwrap().phys();
    s2.map(&mut env, 0x8000_0000, pa, 1, Attrs::RAM).unwrap();
    assert_eq!(s2.translate(&env, 0x8000_0000 + 0x1234_5000).unwrap().pa, pa + 0x1234_5000);
}

#[test]
fn refuses_frames_the_guest_does_not_own() {
    let (mut env, mut s2) = setup(64);
    let other = guest_frame(&mut env, 2);
    let hyp = env.claim_frame(FrameState::Hypervisor).unwrap().phys();
    let free = env.claim_frame(FrameState::Free).unwrap().phys();
    let table = env.claim_frame(FrameState::PageTable(vm(1))).unwrap().phys();
    for pa in [other, hyp, free, table] {
        assert!(matches!(s2.map(&mut env, GUEST_RAM, pa, 3, Attrs::RAM), Err(Stage2Error::NotOwned { .. })));
    }
    assert_eq!(s2.translate(&env, GUEST_RAM), None);
    clean(&mut env);
}

#[test]
fn refuses_a_block_with_one_foreign_frame() {
    let (mut env, mut s2) = setup(2048);
    let pa = guest_block(&mut env, 1);
    env.release_frames(pa + 0x5000, 0x1000);
    env.claim_contiguous(1, 1, FrameState::Guest(vm(2)));
    let r = s2.map(&mut env, GUEST_RAM, pa, 2, Attrs::RAM);
    assert!(matches!(r, Err(Stage2Error::NotOwned { .. })), "{r:?}");
}

#[test]
fn device_mappings_may_not_cover_ram() {
    let (mut env, mut s2) = setup(64);
    let pa = guest_frame(&mut env, 1);
    let dev = Attrs { mem: MemType::Device, exec: false, ..Attrs::RAM };
    assert!(s2.map(&mut env, 0x0900_0000, pa, 3, dev).is_err());
    s2.map(&mut env, 0x0900_0000, 0x0900_0000, 3, dev).unwrap();
    assert_eq!(s2.translate(&env, 0x0900_0000).unwrap().attrs.mem, MemType::Device);
    clean(&mut env);
}

#[test]
fn refuses_to_map_over_a_mapping() {
    let (mut env, mut s2) = setup(2048);
    let a = guest_frame(&mut env, 1);
    let b = guest_frame(&mut env, 1);
    s2.map(&mut env, GUEST_RAM, a, 3, Attrs::RAM).unwrap();
    assert_eq!(
        s2.map(&mut env, GUEST_RAM, b, 3, Attrs::RAM),
        Err(Stage2Error::AlreadyMapped { ipa: GUEST_RAM })
    );
    let blk = guest_block(&mut env, 1);
    assert!(s2.map(&mut env, GUEST_RAM, blk, 2, Attrs::RAM).is_err());
    assert_eq!(s2.translate(&env, GUEST_RAM).unwrap().pa, a);
    clean(&mut env);
}

#[test]
fn out_of_memory_leaves_the_space_unchanged() {
    let (mut env, mut s2) = setup(64);
    let pa = guest_frame(&mut env, 1);
    let tables = s2.table_pages();
    env.fail_tables = true;
    assert_eq!(s2.map(&mut env, GUEST_RAM, pa, 3, Attrs::RAM), Err(Stage2Error::OutOfMemory));
    assert_eq!(s2.table_pages(), tables);
    assert_eq!(s2.translate(&env, GUEST_RAM), None);
    assert_eq!(env.frames_in(FrameState::PageTable(vm(1))), 1);
    clean(&mut env);
}

#[test]
fn bad_alignment_and_range_are_refused() {
    let (mut env, mut s2) = setup(2048);
    let pa = guest_frame(&mut env, 1);
    assert!(matches!(s2.map(&mut env, GUEST_RAM + 1, pa, 3, Attrs::RAM), Err(Stage2Error::Unaligned { .. })));
    assert!(matches!(s2.map(&mut env, 1 << 40, pa, 3, Attrs::RAM), Err(Stage2Error::OutOfRange { .. })));
    assert!(matches!(s2.map(&mut env, GUEST_RAM, pa, 2, Attrs::RAM), Err(Stage2Error::Unaligned { .. })));
    assert!(matches!(s2.map(&mut env, GUEST_RAM, pa, 0, Attrs::RAM), Err(Stage2Error::BadLevel { .. })));
    clean(&mut env);
}

#[test]
fn unmap_reports_frames_after_invalidation_and_frees_empty_tables() {
    let (mut env, mut s2) = setup(64);
    let pa = guest_frame(&mut env, 1);
    s2.map(&mut env, GUEST_RAM, pa, 3, Attrs::RAM).unwrap();
    let mut got = Vec::new();
    s2.unmap(&mut env, GUEST_RAM, 0x1000, &mut |pa, size| got.push((pa, size))).unwrap();
    for &(pa, size) in &got {
        env.release_frames(pa, size);
    }
    assert_eq!(got, vec![(pa, 0x1000)]);
    assert_eq!(s2.translate(&env, GUEST_RAM), None);
    assert_eq!(s2.table_pages(), 1, "emptied tables are freed");
    assert_eq!(env.frames_in(FrameState::PageTable(vm(1))), 1);
    clean(&mut env);
}

#[test]
fn unmapping_part_of_a_block_splits_it() {
    let (mut env, mut s2) = setup(2048);
    let pa = guest_block(&mut env, 1);
    s2.map(&mut env, GUEST_RAM, pa, 2, Attrs::RAM).unwrap();
    let mut got = Vec::new();
    s2.unmap(&mut env, GUEST_RAM + 0x3000, 0x2000, &mut |pa, size| got.push((pa, size))).unwrap();
    for &(pa, size) in &got {
        env.release_frames(pa, size);
    }
    assert_eq!(got, vec![(pa + 0x3000, 0x1000), (pa + 0x4000, 0x1000)]);
    assert_eq!(s2.translate(&env, GUEST_RAM + 0x2000).unwrap().pa, pa + 0x2000);
    assert_eq!(s2.translate(&env, GUEST_RAM + 0x3000), None);
    assert_eq!(s2.translate(&env, GUEST_RAM + 0x5000).unwrap().pa, pa + 0x5000);
    clean(&mut env);
}

#[test]
fn protect_changes_permissions_through_break_before_make() {
    let (mut env, mut s2) = setup(64);
    let pa = guest_frame(&mut env, 1);
    s2.map(&mut env, GUEST_RAM, pa, 3, Attrs::RAM).unwrap();
    let ro = Attrs { write: false, ..Attrs::RAM };
    s2.protect(&mut env, GUEST_RAM, 0x1000, ro).unwrap();
    assert_eq!(s2.translate(&env, GUEST_RAM).unwrap().attrs, ro);
    assert!(env.tlbi_count > 0);
    clean(&mut env);
}

#[test]
fn split_then_collapse_round_trips() {
    let (mut env, mut s2) = setup(2048);
    let pa = guest_block(&mut env, 1);
    s2.map(&mut env, GUEST_RAM, pa, 2, Attrs::RAM).unwrap();
    let before = s2.table_pages();
    s2.split(&mut env, GUEST_RAM, 2).unwrap();
    assert_eq!(s2.table_pages(), before + 1);
    assert_eq!(s2.translate(&env, GUEST_RAM + 0x7000).unwrap().pa, pa + 0x7000);
    clean(&mut env);
    s2.collapse(&mut env, GUEST_RAM, 2).unwrap();
    assert_eq!(s2.table_pages(), before);
    let mut sizes = Vec::new();
    s2.for_each_mapping(&env, &mut |m| sizes.push(m.size));
    assert_eq!(sizes, vec![2 * MIB]);
    clean(&mut env);
}

#[test]
fn collapse_refuses_a_table_that_is_not_one_block() {
    let (mut env, mut s2) = setup(2048);
    let pa = guest_block(&mut env, 1);
    s2.map(&mut env, GUEST_RAM, pa, 2, Attrs::RAM).unwrap();
    s2.split(&mut env, GUEST_RAM, 2).unwrap();
    s2.protect(&mut env, GUEST_RAM + 0x1000, 0x1000, Attrs { write: false, ..Attrs::RAM }).unwrap();
    assert_eq!(s2.collapse(&mut env, GUEST_RAM, 2), Err(Stage2Error::NotCollapsible { ipa: GUEST_RAM }));
    clean(&mut env);
}

#[test]
fn teardown_returns_everything_and_leaves_no_tlb_entry() {
    let (mut env, mut s2) = setup(4096);
    let blk = guest_block(&mut env, 1);
    s2.map(&mut env, GUEST_RAM, blk, 2, Attrs::RAM).unwrap();
    for i in 0..5 {
        let pa = guest_frame(&mut env, 1);
        s2.map(&mut env, GUEST_RAM + 2 * MIB + i * 0x1000, pa, 3, Attrs::RAM).unwrap();
    }
    let mut got = Vec::new();
    let proof = s2.teardown(&mut env, &mut |pa, size| got.push((pa, size)));
    for &(pa, size) in &got {
        env.release_frames(pa, size);
    }
    assert_eq!(proof.vmid(), 1);
    assert_eq!(got.len(), 6);
    assert_eq!(env.frames_in(FrameState::Guest(vm(1))), 0);
    assert_eq!(env.frames_in(FrameState::PageTable(vm(1))), 0);
    assert_eq!(env.cached_for(1), 0);
    assert!(env.violations.is_empty(), "{:#?}", env.violations);
}

fn broken_unmap_is_caught(sabotage: Sabotage) {
    let (mut env, mut s2) = setup(64);
    let pa = guest_frame(&mut env, 1);
    let pb = guest_frame(&mut env, 1);
    s2.map(&mut env, GUEST_RAM, pa, 3, Attrs::RAM).unwrap();
    s2.map(&mut env, GUEST_RAM + 0x1000, pb, 3, Attrs::RAM).unwrap();
    env.sabotage = sabotage;
    let mut got = Vec::new();
    s2.unmap(&mut env, GUEST_RAM, 0x1000, &mut |pa, size| got.push((pa, size))).unwrap();
    for &(pa, size) in &got {
        env.release_frames(pa, size);
    }
    env.check_quiescent();
    assert!(!env.violations.is_empty(), "{sabotage:?} went unnoticed");
}

#[test]
fn model_catches_a_missing_ipa_invalidation() {
    broken_unmap_is_caught(Sabotage::DropIpaTlbi);
}

#[test]
fn model_catches_a_missing_stage1_invalidation() {
    broken_unmap_is_caught(Sabotage::DropStage1Tlbi);
}

#[test]
fn model_catches_a_missing_dsb() {
    broken_unmap_is_caught(Sabotage::DropDsbIsh);
}

#[test]
fn model_catches_a_teardown_without_vmid_invalidation() {
    let (mut env, mut s2) = setup(64);
    let pa = guest_frame(&mut env, 1);
    s2.map(&mut env, GUEST_RAM, pa, 3, Attrs::RAM).unwrap();
    env.sabotage = Sabotage::DropVmidTlbi;
    let _ = s2.teardown(&mut env, &mut |pa, size| {
        let _ = (pa, size);
    });
    env.release_frames(pa, 0x1000);
    assert!(!env.violations.is_empty());
}

#[test]
fn model_catches_a_live_entry_changed_in_place() {
    let (mut env, mut s2) = setup(64);
    let pa = guest_frame(&mut env, 1);
    let pb = guest_frame(&mut env, 1);
    s2.map(&mut env, GUEST_RAM, pa, 3, Attrs::RAM).unwrap();
    // Rewrite the live leaf to another frame directly, as a buggy hypervisor would.
    let mut leaf = None;
    s2.for_each_table(&env, &mut |t| leaf = Some(t));
    let l3 = leaf.unwrap();
    env.write(l3, 0, Entry::Leaf { pa: pb, attrs: Attrs::RAM }.encode(3));
    env.dsb_ishst();
    env.check_quiescent();
    assert!(env.violations.iter().any(|v| v.contains("without break-before-make")), "{:#?}", env.violations);
}

#[test]
fn map_page_takes_the_shortcut_and_still_checks_ownership() {
    let (mut env, mut s2) = setup(64);
    let a = guest_frame(&mut env, 1);
    let b = guest_frame(&mut env, 1);
    let foreign = guest_frame(&mut env, 2);
    s2.map_page(&mut env, GUEST_RAM, a, Attrs::RAM).unwrap();
    // Same level-3 table: the shortcut.
    s2.map_page(&mut env, GUEST_RAM + 0x1000, b, Attrs::RAM).unwrap();
    assert_eq!(s2.translate(&env, GUEST_RAM + 0x1000).unwrap().pa, b);
    assert!(matches!(
        s2.map_page(&mut env, GUEST_RAM + 0x2000, foreign, Attrs::RAM),
        Err(Stage2Error::NotOwned { .. })
    ));
    assert_eq!(
        s2.map_page(&mut env, GUEST_RAM + 0x1000, a, Attrs::RAM),
        Err(Stage2Error::AlreadyMapped { ipa: GUEST_RAM + 0x1000 })
    );
    clean(&mut env);
}

// The fast path's form: a slot only through the cached table and only while free; the claim
// stands for the owner check, but only a claim for this guest fills it.
#[test]
fn cached_page_slot_takes_only_this_guests_claims() {
    let (mut env, mut s2) = setup(64);
    assert!(s2.cached_page_slot(&env, GUEST_RAM).is_none(), "no table cached yet: walk");
    let a = guest_frame(&mut env, 1);
    s2.map_page(&mut env, GUEST_RAM, a, Attrs::RAM).unwrap();
    assert!(s2.cached_page_slot(&env, GUEST_RAM).is_none(), "a live entry is no slot");
    assert!(s2.cached_page_slot(&env, GUEST_RAM + 4 * MIB).is_none(), "another table: walk");
    assert!(s2.cached_page_slot(&env, GUEST_RAM + 0x1001).is_none(), "unaligned");
    let b = guest_frame(&mut env, 1);
    let slot = s2.cached_page_slot(&env, GUEST_RAM + 0x1000).unwrap();
    slot.fill(&mut env, ClaimedPage::assume(Pfn(b >> 12), vm(1))).unwrap();
    assert_eq!(s2.translate(&env, GUEST_RAM + 0x1000).unwrap().pa, b);
    let foreign = guest_frame(&mut env, 2);
    let slot = s2.cached_page_slot(&env, GUEST_RAM + 0x2000).unwrap();
    let back = slot.fill(&mut env, ClaimedPage::assume(Pfn(foreign >> 12), vm(2)));
    assert_eq!(back, Err(ClaimedPage::assume(Pfn(foreign >> 12), vm(2))));
    assert_eq!(s2.translate(&env, GUEST_RAM + 0x2000), None);
    clean(&mut env);
}

#[test]
fn map_page_forgets_a_freed_table() {
    let (mut env, mut s2) = setup(64);
    let a = guest_frame(&mut env, 1);
    s2.map_page(&mut env, GUEST_RAM, a, Attrs::RAM).unwrap();
    let mut got = Vec::new();
    s2.unmap(&mut env, GUEST_RAM, 0x1000, &mut |pa, size| got.push((pa, size))).unwrap();
    for (pa, size) in got {
        env.release_frames(pa, size);
    }
    // The level-3 table is gone; mapping again must build a new one, not write into the old.
    let b = guest_frame(&mut env, 1);
    s2.map_page(&mut env, GUEST_RAM + 0x1000, b, Attrs::RAM).unwrap();
    assert_eq!(s2.translate(&env, GUEST_RAM + 0x1000).unwrap().pa, b);
    clean(&mut env);
}

#[test]
fn runs_merge_contiguous_mappings_for_the_dump() {
    let (mut env, mut s2) = setup(4096);
    let blk = guest_block(&mut env, 1);
    s2.map(&mut env, GUEST_RAM, blk, 2, Attrs::RAM).unwrap();
    s2.split(&mut env, GUEST_RAM, 2).unwrap();
    let lone = guest_frame(&mut env, 1);
    s2.map(&mut env, GUEST_RAM + 4 * MIB, lone, 3, Attrs::RAM).unwrap();
    let mut runs = Vec::new();
    s2.for_each_run(&env, &mut |m| runs.push((m.ipa, m.pa, m.size)));
    // The split block is one run again; the lone page is its own.
    assert_eq!(runs, vec![(GUEST_RAM, blk, 2 * MIB), (GUEST_RAM + 4 * MIB, lone, 0x1000)]);
    clean(&mut env);
}

// A 2 MiB block the frame database holds as one unit maps after one owner check, and only for
// its owner; splitting the mapping turns it back into per-frame tags, so its pages can then be
// unmapped and released on their own.
#[test]
fn block_owned_as_one_unit_maps_and_splits_into_pages() {
    let (mut env, mut s2) = setup(2048);
    let pa = guest_block(&mut env, 1);
    let head = Pfn(pa >> 12);
    assert!(env.is_compound(head));
    let foreign = env.claim_contiguous(512, 512, FrameState::Guest(vm(2))).unwrap().phys();
    assert!(matches!(
        s2.map(&mut env, GUEST_RAM + 2 * MIB, foreign, 2, Attrs::RAM),
        Err(Stage2Error::NotOwned { .. })
    ));
    s2.map(&mut env, GUEST_RAM, pa, 2, Attrs::RAM).unwrap();
    s2.split(&mut env, GUEST_RAM, 2).unwrap();
    assert!(!env.is_compound(head));
    let mut released = Vec::new();
    s2.unmap(&mut env, GUEST_RAM + 0x3000, 0x2000, &mut |pa, size| released.push((pa, size))).unwrap();
    for (pa, size) in released {
        env.release_frames(pa, size);
    }
    clean(&mut env);
}

// Unmapping part of a block whose frames stay one unit (the split never reaches the frame
// database) is caught: part of a block would be released while still owned whole.
#[test]
fn model_catches_a_block_split_without_its_frames() {
    let (mut env, mut s2) = setup(2048);
    let pa = guest_block(&mut env, 1);
    s2.map(&mut env, GUEST_RAM, pa, 2, Attrs::RAM).unwrap();
    env.sabotage = Sabotage::KeepBlocksWhole;
    let mut released = Vec::new();
    s2.unmap(&mut env, GUEST_RAM, 0x1000, &mut |pa, size| released.push((pa, size))).unwrap();
    for (pa, size) in released {
        env.release_frames(pa, size);
    }
    assert!(env.violations.iter().any(|v| v.contains("still owned as one unit")), "{:?}", env.violations);
}

// The block fault's fast form: a vacant level-2 entry found through the cached level-2 table,
// then one block entry, with no TLB maintenance.
#[test]
fn vacant_block_maps_through_the_cached_level2_table() {
    let (mut env, mut s2) = setup(4096);
    // A page builds the level-2 table; until then there is no vacant entry to offer.
    assert!(s2.vacant_block(&env, GUEST_RAM + 2 * MIB).is_none(), "no level-2 table yet");
    let page = guest_frame(&mut env, 1);
    s2.map(&mut env, GUEST_RAM, page, 3, Attrs::RAM).unwrap();
    for i in 1..4 {
        let ipa = GUEST_RAM + i * 2 * MIB + 0x5000;
        let pa = guest_block(&mut env, 1);
        let vacant = s2.vacant_block(&env, ipa).expect("nothing mapped there");
        assert_eq!(vacant.ipa(), GUEST_RAM + i * 2 * MIB);
        vacant.map(&mut env, pa, Attrs::RAM).unwrap();
        assert_eq!(s2.translate(&env, ipa).unwrap().pa, pa + 0x5000);
        assert!(s2.caches_agree(&env));
    }
    assert!(s2.vacant_block(&env, GUEST_RAM + 2 * MIB).is_none(), "a block is mapped there");
    assert!(s2.vacant_block(&env, GUEST_RAM + 0x1000).is_none(), "a page is mapped there");
    assert!(s2.vacant_block(&env, GUEST_RAM + 1024 * MIB).is_none(), "another GiB: no level-2 table");
    assert!(s2.vacant_block(&env, 1 << 40).is_none(), "outside the IPA space");
    assert_eq!(env.tlbi_count, 0);
    clean(&mut env);
}

// The fault path's form: only through the cached level-2 table (a miss is `None`, never a
// walk), which the general block map remembers; a claimed block fills the entry, a claim for
// another guest is handed back with nothing written.
#[test]
fn cached_vacant_block_is_primed_by_map_block_and_takes_only_own_claims() {
    let (mut env, mut s2) = setup(4096);
    let first = guest_block(&mut env, 1);
    assert!(s2.cached_vacant_block(&env, GUEST_RAM + 2 * MIB).is_none(), "nothing cached yet");
    s2.map_block(&mut env, GUEST_RAM, first, Attrs::RAM).unwrap();
    assert!(s2.caches_agree(&env));
    assert!(s2.cached_vacant_block(&env, GUEST_RAM).is_none(), "a block is mapped there");
    assert!(s2.cached_vacant_block(&env, GUEST_RAM + 1024 * MIB).is_none(), "another GiB: a miss");
    let second = guest_block(&mut env, 1);
    let vacant = s2.cached_vacant_block(&env, GUEST_RAM + 2 * MIB).expect("cached and vacant");
    vacant.fill(&mut env, ClaimedBlock::assume(Pfn(second >> 12), vm(1))).unwrap();
    assert_eq!(s2.translate(&env, GUEST_RAM + 2 * MIB + 0x3000).unwrap().pa, second + 0x3000);
    let foreign = guest_block(&mut env, 2);
    let vacant = s2.cached_vacant_block(&env, GUEST_RAM + 4 * MIB).expect("cached and vacant");
    let back = vacant.fill(&mut env, ClaimedBlock::assume(Pfn(foreign >> 12), vm(2)));
    assert_eq!(back, Err(ClaimedBlock::assume(Pfn(foreign >> 12), vm(2))));
    assert_eq!(s2.translate(&env, GUEST_RAM + 4 * MIB), None);
    assert_eq!(env.tlbi_count, 0);
    clean(&mut env);
}

// The fast form keeps the owner check, for the block as one unit: another guest's block, a
// block whose frames are tagged one by one, a hypervisor frame, an unaligned address and a
// Device mapping are refused, and nothing is mapped.
#[test]
fn vacant_block_refuses_what_the_guest_does_not_own_as_one_block() {
    let (mut env, mut s2) = setup(8192);
    let page = guest_frame(&mut env, 1);
    s2.map(&mut env, GUEST_RAM, page, 3, Attrs::RAM).unwrap();
    let foreign = guest_block(&mut env, 2);
    let own = guest_block(&mut env, 1);
    let split = guest_block(&mut env, 1);
    env.split_frames(vm(1), Pfn(split >> 12));
    let hyp = env.claim_contiguous(512, 512, FrameState::Hypervisor).unwrap().phys();
    let dev = Attrs { mem: MemType::Device, exec: false, ..Attrs::RAM };
    let ipa = GUEST_RAM + 2 * MIB;
    for (pa, attrs) in [(foreign, Attrs::RAM), (split, Attrs::RAM), (hyp, Attrs::RAM), (own, dev)] {
        let r = s2.vacant_block(&env, ipa).unwrap().map(&mut env, pa, attrs);
        assert!(matches!(r, Err(Stage2Error::NotOwned { .. })), "{pa:#x}: {r:?}");
    }
    let r = s2.vacant_block(&env, ipa).unwrap().map(&mut env, own + 0x1000, Attrs::RAM);
    assert_eq!(r, Err(Stage2Error::Unaligned { addr: own + 0x1000 }));
    assert_eq!(s2.translate(&env, ipa), None);
    s2.vacant_block(&env, ipa).unwrap().map(&mut env, own, Attrs::RAM).unwrap();
    clean(&mut env);
}

// The cached level-2 table is forgotten when its table page goes (an unmap that empties it):
// the next block fault must find the new table, not write into the freed one.
#[test]
fn vacant_block_forgets_a_freed_level2_table() {
    let (mut env, mut s2) = setup(4096);
    let page = guest_frame(&mut env, 1);
    s2.map(&mut env, GUEST_RAM, page, 3, Attrs::RAM).unwrap();
    let a = guest_block(&mut env, 1);
    s2.vacant_block(&env, GUEST_RAM + 2 * MIB).unwrap().map(&mut env, a, Attrs::RAM).unwrap();
    let mut got = Vec::new();
    s2.unmap(&mut env, GUEST_RAM, 4 * MIB, &mut |pa, size| got.push((pa, size))).unwrap();
    for (pa, size) in got {
        env.release_frames(pa, size);
    }
    assert_eq!(s2.table_pages(), 1, "only the root (level 1) is left: the level-2 table was freed");
    assert!(s2.caches_agree(&env));
    // A new level-2 table (a page maps it), then a block through the fast form again.
    let page = guest_frame(&mut env, 1);
    s2.map(&mut env, GUEST_RAM + 8 * MIB, page, 3, Attrs::RAM).unwrap();
    let b = guest_block(&mut env, 1);
    s2.vacant_block(&env, GUEST_RAM + 2 * MIB)
        .expect("the new table's entry is vacant")
        .map(&mut env, b, Attrs::RAM)
        .unwrap();
    assert_eq!(s2.translate(&env, GUEST_RAM + 2 * MIB).unwrap().pa, b);
    assert!(s2.caches_agree(&env));
    clean(&mut env);
}

// A level-2 table collapsed into a 1 GiB block is freed too: the cache must not outlive it.
#[test]
fn vacant_block_forgets_a_level2_table_collapsed_into_a_1gib_block() {
    let frames = 512 * 512 * 3;
    let mut env = ModelEnv::new(RAM_BASE_PFN, frames);
    let mut s2 = Stage2::new(&mut env, vm(1), 1, Geometry::for_pa_bits(40)).unwrap();
    env.add_root(1, Pfn(s2.vttbr() >> 12 & ((1 << 36) - 1)), s2.geometry().start_level);
    let pa = env.claim_contiguous(512 * 512, 512 * 512, FrameState::Guest(vm(1))).unwrap().phys();
    let gib = 0x8000_0000;
    s2.map(&mut env, gib, pa, 2, Attrs::RAM).unwrap();
    // The cache now holds the level-2 table (the offer is dropped unused).
    assert!(s2.vacant_block(&env, gib + 2 * MIB).is_some());
    for i in 1..512 {
        s2.map(&mut env, gib + i * 2 * MIB, pa + i * 2 * MIB, 2, Attrs::RAM).unwrap();
    }
    s2.collapse(&mut env, gib, 1).unwrap();
    assert!(s2.caches_agree(&env));
    assert!(s2.vacant_block(&env, gib + 2 * MIB).is_none(), "a 1 GiB block maps it now");
    clean(&mut env);
}

// Writing an entry into a table page that was freed (what a stale cache would do) is caught.
#[test]
fn model_catches_a_write_into_a_freed_table() {
    let (mut env, mut s2) = setup(64);
    let page = guest_frame(&mut env, 1);
    s2.map(&mut env, GUEST_RAM, page, 3, Attrs::RAM).unwrap();
    let mut l3 = None;
    s2.for_each_table(&env, &mut |t| l3 = Some(t));
    let mut got = Vec::new();
    s2.unmap(&mut env, GUEST_RAM, 0x1000, &mut |pa, size| got.push((pa, size))).unwrap();
    env.write(l3.unwrap(), 1, 0x4000_0000 | 0x7ff);
    assert!(env.violations.iter().any(|v| v.contains("not a live table page")), "{:?}", env.violations);
}

//! Stage-2 behaviour, one behaviour per test, each run against the checking model: every test
//! ends with the model's verdict that no rule was broken.

use super::desc::LOCKED;
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
        let (mut env, s2) = setup(pages as usize + 64);
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
    let (mut env, s2) = setup(64);
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
    let (mut env, s2) = setup(64);
    let pa = guest_frame(&mut env, 1);
    s2.map(&mut env, GUEST_RAM, pa, 3, Attrs::RAM).unwrap();
    assert_eq!(env.tlbi_count, 0);
    clean(&mut env);
}

#[test]
fn maps_a_2mib_block() {
    let (mut env, s2) = setup(2048);
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
    let s2 = Stage2::new(&mut env, vm(1), 1, Geometry::for_pa_bits(40)).unwrap();
    let pa = env.claim_contiguous(512 * 512, 512 * 512, FrameState::Guest(vm(1))).unwrap().phys();
    s2.map(&mut env, 0x8000_0000, pa, 1, Attrs::RAM).unwrap();
    assert_eq!(s2.translate(&env, 0x8000_0000 + 0x1234_5000).unwrap().pa, pa + 0x1234_5000);
}

#[test]
fn refuses_frames_the_guest_does_not_own() {
    let (mut env, s2) = setup(64);
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
    let (mut env, s2) = setup(2048);
    let pa = guest_block(&mut env, 1);
    env.release_frames(pa + 0x5000, 0x1000);
    env.claim_contiguous(1, 1, FrameState::Guest(vm(2)));
    let r = s2.map(&mut env, GUEST_RAM, pa, 2, Attrs::RAM);
    assert!(matches!(r, Err(Stage2Error::NotOwned { .. })), "{r:?}");
}

#[test]
fn device_mappings_may_not_cover_ram() {
    let (mut env, s2) = setup(64);
    let pa = guest_frame(&mut env, 1);
    let dev = Attrs { mem: MemType::Device, exec: false, ..Attrs::RAM };
    assert!(s2.map(&mut env, 0x0900_0000, pa, 3, dev).is_err());
    s2.map(&mut env, 0x0900_0000, 0x0900_0000, 3, dev).unwrap();
    assert_eq!(s2.translate(&env, 0x0900_0000).unwrap().attrs.mem, MemType::Device);
    clean(&mut env);
}

#[test]
fn refuses_to_map_over_a_mapping() {
    let (mut env, s2) = setup(2048);
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
    let (mut env, s2) = setup(64);
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
    let (mut env, s2) = setup(2048);
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
    let (mut env, s2) = setup(4096);
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
    let (mut env, s2) = setup(64);
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
    let (mut env, s2) = setup(64);
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

// ---------------------------------------------------------------------------------------------
// Concurrent installs, one interleaving at a time: the model with a hook that lets "another
// vCPU" act in the middle of an operation (the loom models explore every interleaving on a
// smaller machine; these check the same protocol against the TLB model).

/// When the hook runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Trigger {
    /// At the first TLB invalidation: an entry is held locked by break-before-make.
    FirstTlbi,
    /// At the first compare-and-swap that locks an empty table before it leaves the tree.
    LockingCas,
    /// Right after table pages were taken for an install, before it links any.
    TablesTaken,
}

/// What "another vCPU" does at the trigger.
type Hook<'h> = Box<dyn FnOnce(&mut ModelEnv) + 'h>;

struct Hooked<'h> {
    env: ModelEnv,
    trigger: Trigger,
    hook: Option<Hook<'h>>,
}

impl<'h> Hooked<'h> {
    fn new(env: ModelEnv, trigger: Trigger, hook: impl FnOnce(&mut ModelEnv) + 'h) -> Self {
        Hooked { env, trigger, hook: Some(Box::new(hook)) }
    }
    /// The model back, the hook (and what it borrowed) gone.
    fn into_env(self) -> ModelEnv {
        self.env
    }
    fn fire(&mut self, at: Trigger) {
        if at == self.trigger {
            if let Some(h) = self.hook.take() {
                h(&mut self.env);
            }
        }
    }
}

impl Stage2Env for Hooked<'_> {
    fn read(&self, table: Pfn, index: usize) -> u64 {
        self.env.read(table, index)
    }
    fn write(&mut self, table: Pfn, index: usize, value: u64) {
        self.env.write(table, index, value)
    }
    fn cas(&mut self, table: Pfn, index: usize, old: u64, new: u64) -> Result<(), u64> {
        if new == LOCKED {
            self.fire(Trigger::LockingCas);
        }
        self.env.cas(table, index, old, new)
    }
    fn take_tables(&mut self, vm: VmId, out: &mut [Pfn]) -> Result<(), Stage2Error> {
        self.env.take_tables(vm, out)?;
        if !out.is_empty() {
            self.fire(Trigger::TablesTaken);
        }
        Ok(())
    }
    fn free_table(&mut self, vm: VmId, table: Pfn) {
        self.env.free_table(vm, table)
    }
    fn return_unused_table(&mut self, vm: VmId, table: Pfn) {
        self.env.return_unused_table(vm, table)
    }
    fn frame_state(&self, pfn: Pfn) -> Option<FrameState> {
        self.env.frame_state(pfn)
    }
    fn frame_unit(&self, pfn: Pfn) -> (Option<FrameState>, u64) {
        self.env.frame_unit(pfn)
    }
    fn split_frames(&mut self, vm: VmId, head: Pfn) {
        self.env.split_frames(vm, head)
    }
    fn dsb_ishst(&mut self) {
        self.env.dsb_ishst()
    }
    fn dsb_ish(&mut self) {
        self.env.dsb_ish()
    }
    fn isb(&mut self) {
        self.env.isb()
    }
    fn tlbi_ipas2e1is(&mut self, vmid: u16, ipa: u64, level: usize) {
        self.env.tlbi_ipas2e1is(vmid, ipa, level);
        self.fire(Trigger::FirstTlbi);
    }
    fn tlbi_vmalle1is(&mut self, vmid: u16) {
        self.env.tlbi_vmalle1is(vmid)
    }
    fn tlbi_vmalls12e1is(&mut self, vmid: u16) {
        self.env.tlbi_vmalls12e1is(vmid);
        self.fire(Trigger::FirstTlbi);
    }
}

fn claim_page(env: &mut ModelEnv, n: u16) -> ClaimedPage {
    ClaimedPage::assume(env.claim_frame(FrameState::Guest(vm(n))).unwrap(), vm(n))
}

fn claim_block(env: &mut ModelEnv, n: u16) -> ClaimedBlock {
    ClaimedBlock::assume(env.claim_contiguous(512, 512, FrameState::Guest(vm(n))).unwrap(), vm(n))
}

fn release_all(env: &mut ModelEnv, got: Vec<(u64, u64)>) {
    for (pa, size) in got {
        env.release_frames(pa, size);
    }
}

// The vCPU form: the general fault walks, links the tables and fills the vCPU's cache; the
// next fault in the same 2 MiB goes through the cache with one CAS and no TLB maintenance.
#[test]
fn faults_install_through_the_vcpu_cache() {
    let (mut env, s2) = setup(64);
    let mut cache = FaultCache::new();
    assert!(s2.page_slot(&cache, GUEST_RAM).is_none(), "an empty cache is a miss");
    let a = claim_page(&mut env, 1);
    let pa = a.pfn().phys();
    s2.fault_page(&mut env, &mut cache, GUEST_RAM, a).unwrap();
    assert_eq!(s2.translate(&env, GUEST_RAM).unwrap().pa, pa);
    assert!(cache.agrees(&s2, &env));
    let b = claim_page(&mut env, 1);
    let pb = b.pfn().phys();
    s2.page_slot(&cache, GUEST_RAM + 0x7000).expect("same 2 MiB").install(&mut env, b).unwrap();
    assert_eq!(s2.translate(&env, GUEST_RAM + 0x7000).unwrap().pa, pb);
    assert!(s2.page_slot(&cache, GUEST_RAM + 2 * MIB).is_none(), "another 2 MiB: walk");
    // The page is there: a second fault on it retries, its claim handed back untouched.
    let c = claim_page(&mut env, 1);
    let back = s2.page_slot(&cache, GUEST_RAM).unwrap().install(&mut env, c);
    assert!(matches!(back, Err(Declined::Retry(ref p)) if p.pfn() != Pfn(pa >> 12)), "{back:?}");
    let c = back.unwrap_err().into_claim();
    assert!(matches!(s2.fault_page(&mut env, &mut cache, GUEST_RAM, c), Err(Declined::Retry(_))));
    // A claim for another guest is refused with nothing written.
    let f = claim_page(&mut env, 2);
    let r = s2.page_slot(&cache, GUEST_RAM + 0x8000).unwrap().install(&mut env, f);
    assert!(matches!(r, Err(Declined::Refused(_, Stage2Error::NotOwned { .. }))), "{r:?}");
    assert_eq!(s2.translate(&env, GUEST_RAM + 0x8000), None);
    assert_eq!(env.tlbi_count, 0);
    clean(&mut env);
}

// A cache serving a window (a guest's RAM) remembers a level-3 table only when its whole 2 MiB
// lies inside: so a hit alone says the page is in the window. Forgetting keeps the window.
#[test]
fn a_cache_remembers_only_level_3_tables_inside_its_window() {
    let (mut env, s2) = setup(64);
    // RAM from 2 MiB above GUEST_RAM to 1.5 MiB into the next 2 MiB.
    let base = GUEST_RAM + 2 * MIB;
    let mut cache = FaultCache::serving(base, 3 * MIB + MIB / 2);
    let p = claim_page(&mut env, 1);
    s2.fault_page(&mut env, &mut cache, base + 0x3000, p).unwrap();
    assert!(s2.page_slot(&cache, base + 0x4000).is_some(), "a whole 2 MiB in the window: cached");
    let tail = base + 2 * MIB;
    let p = claim_page(&mut env, 1);
    s2.fault_page(&mut env, &mut cache, tail, p).unwrap();
    assert!(s2.page_slot(&cache, tail + 0x1000).is_none(), "the window ends in this 2 MiB: not cached");
    assert!(s2.page_slot(&cache, tail + 0x1f_f000).is_none(), "past the window: never a hit");
    assert!(cache.agrees(&s2, &env));
    let p = claim_page(&mut env, 1);
    s2.fault_page(&mut env, &mut cache, GUEST_RAM, p).unwrap();
    assert!(s2.page_slot(&cache, GUEST_RAM + 0x1000).is_none(), "below the window: not cached");
    cache.forget();
    let p = claim_page(&mut env, 1);
    s2.fault_page(&mut env, &mut cache, tail + 0x2000, p).unwrap();
    assert!(s2.page_slot(&cache, tail + 0x1000).is_none(), "forgetting keeps the window");
    let p = claim_page(&mut env, 1);
    s2.fault_page(&mut env, &mut cache, base + 0x5000, p).unwrap();
    assert!(s2.page_slot(&cache, base + 0x6000).is_some());
    let mut unbounded = FaultCache::new();
    let p = claim_page(&mut env, 1);
    s2.fault_page(&mut env, &mut unbounded, tail + 0x3000, p).unwrap();
    assert!(s2.page_slot(&unbounded, tail + 0x4000).is_some(), "no window: every table");
    clean(&mut env);
}

// The block forms: a block goes where nothing is; pages there refuse it (map a page instead),
// a block there already is a race to retry.
#[test]
fn block_faults_refuse_pages_and_retry_on_a_block() {
    let (mut env, s2) = setup(4096);
    let mut cache = FaultCache::new();
    let blk = claim_block(&mut env, 1);
    let head = blk.pfn().phys();
    s2.fault_block(&mut env, &mut cache, GUEST_RAM + 0x3000, blk).unwrap();
    assert_eq!(s2.translate(&env, GUEST_RAM + 0x3000).unwrap().pa, head + 0x3000);
    let again = claim_block(&mut env, 1);
    let r = s2.block_slot(&cache, GUEST_RAM).unwrap().install(&mut env, again);
    assert!(matches!(r, Err(Declined::Retry(_))), "{r:?}");
    env.release_frames(r.unwrap_err().into_claim().pfn().phys(), 2 * MIB);
    // Pages in the next 2 MiB: a block there is refused, through the cache and the walk.
    let page = claim_page(&mut env, 1);
    s2.fault_page(&mut env, &mut cache, GUEST_RAM + 2 * MIB, page).unwrap();
    let blk = claim_block(&mut env, 1);
    let r = s2.block_slot(&cache, GUEST_RAM + 2 * MIB).unwrap().install(&mut env, blk);
    assert!(matches!(r, Err(Declined::Refused(_, Stage2Error::AlreadyMapped { .. }))), "{r:?}");
    let r = s2.fault_block(&mut env, &mut cache, GUEST_RAM + 2 * MIB, r.unwrap_err().into_claim());
    assert!(matches!(r, Err(Declined::Refused(_, Stage2Error::AlreadyMapped { .. }))), "{r:?}");
    assert_eq!(env.tlbi_count, 0);
    clean(&mut env);
}

// Another vCPU links the same tables between this install's taking its table pages and
// linking them: this install follows the winner's tables, and its own pages go back zero.
#[test]
fn a_lost_table_race_hands_the_table_pages_back_unused() {
    for same_page in [false, true] {
        let (mut env, s2) = setup(64);
        let mine = claim_page(&mut env, 1);
        let theirs = claim_page(&mut env, 1);
        let (pm, pt) = (mine.pfn().phys(), theirs.pfn().phys());
        let their_ipa = if same_page { GUEST_RAM } else { GUEST_RAM + 0x1000 };
        let (s2r, mut their_cache) = (&s2, FaultCache::new());
        let mut hooked = Hooked::new(env, Trigger::TablesTaken, |env| {
            s2r.fault_page(env, &mut their_cache, their_ipa, theirs).unwrap();
        });
        let r = s2.fault_page(&mut hooked, &mut FaultCache::new(), GUEST_RAM, mine);
        let mut env = hooked.into_env();
        assert_eq!(s2.translate(&env, their_ipa).unwrap().pa, pt);
        if same_page {
            assert_eq!(r.map_err(|d| matches!(d, Declined::Retry(p) if p.pfn().phys() == pm)), Err(true));
        } else {
            r.unwrap();
            assert_eq!(s2.translate(&env, GUEST_RAM).unwrap().pa, pm);
        }
        // Root (level 0), levels 1 to 3: the loser's three table pages went back.
        assert_eq!(s2.table_pages(), 4);
        assert_eq!(env.frames_in(FrameState::PageTable(vm(1))), 4);
        clean(&mut env);
    }
}

// A fault meeting an entry held by break-before-make (an unmap, a split) writes nothing and
// retries; once the change is made, the same fault maps.
#[test]
fn a_fault_during_break_before_make_retries() {
    let (env, s2) = setup(2048);
    let mut env = env;
    let a = guest_frame(&mut env, 1);
    let b = guest_frame(&mut env, 1);
    s2.map(&mut env, GUEST_RAM, a, 3, Attrs::RAM).unwrap();
    s2.map(&mut env, GUEST_RAM + 0x1000, b, 3, Attrs::RAM).unwrap();
    let mut cache = FaultCache::new();
    let c = claim_page(&mut env, 1);
    let pc = c.pfn().phys();
    s2.fault_page(&mut env, &mut cache, GUEST_RAM + 0x2000, c).unwrap();
    let (s2r, mut during) = (&s2, Vec::new());
    let d = claim_page(&mut env, 1);
    let e = claim_page(&mut env, 1);
    let cache_r = &cache;
    let mut hooked = Hooked::new(env, Trigger::FirstTlbi, |env| {
        assert!(s2r.is_held(env, GUEST_RAM), "the entry is locked during break-before-make");
        during.push(s2r.page_slot(cache_r, GUEST_RAM).unwrap().install(env, d));
        during.push(s2r.fault_page(env, &mut FaultCache::new(), GUEST_RAM, e));
    });
    let mut got = Vec::new();
    s2.unmap_live(&mut hooked, GUEST_RAM, 0x1000, &mut |pa, size| got.push((pa, size))).unwrap();
    let mut env = hooked.into_env();
    assert_eq!(got, vec![(a, 0x1000)]);
    release_all(&mut env, got);
    assert_eq!(during.len(), 2);
    let mut back = Vec::new();
    for r in during {
        let Err(Declined::Retry(p)) = r else { panic!("a fault wrote into a held entry: {r:?}") };
        back.push(p);
    }
    assert_eq!(s2.translate(&env, GUEST_RAM), None);
    assert_eq!(s2.translate(&env, GUEST_RAM + 0x2000).unwrap().pa, pc);
    // The guest re-executes the access: now it maps.
    let d = back.remove(0);
    let pd = d.pfn().phys();
    s2.page_slot(&cache, GUEST_RAM).unwrap().install(&mut env, d).unwrap();
    assert_eq!(s2.translate(&env, GUEST_RAM).unwrap().pa, pd);
    clean(&mut env);

    // A split: the block's level-2 entry is held; a fault into its 2 MiB retries.
    let blk = guest_block(&mut env, 1);
    let ipa = GUEST_RAM + 4 * MIB;
    s2.map(&mut env, ipa, blk, 2, Attrs::RAM).unwrap();
    let f = claim_page(&mut env, 1);
    let mut during = None;
    let mut hooked = Hooked::new(env, Trigger::FirstTlbi, |env| {
        during = Some(s2r.fault_page(env, &mut FaultCache::new(), ipa + 0x5000, f));
    });
    s2.split_live(&mut hooked, ipa, 2).unwrap();
    let mut env = hooked.into_env();
    assert!(matches!(during, Some(Err(Declined::Retry(_)))), "{during:?}");
    assert_eq!(s2.translate(&env, ipa + 0x5000).unwrap().pa, blk + 0x5000);
    clean(&mut env);
}

// An unmap empties a level-3 table while a vCPU, through its cache, puts a page in it just
// before the table is locked: the table stays (nothing is lost), the page is mapped.
#[test]
fn a_table_being_emptied_keeps_a_page_put_in_first() {
    let (mut env, s2) = setup(64);
    let mut cache = FaultCache::new();
    let a = claim_page(&mut env, 1);
    let pa = a.pfn().phys();
    s2.fault_page(&mut env, &mut cache, GUEST_RAM, a).unwrap();
    let b = claim_page(&mut env, 1);
    let pb = b.pfn().phys();
    let (s2r, mut late) = (&s2, None);
    let cache_r = &cache;
    let mut hooked = Hooked::new(env, Trigger::LockingCas, |env| {
        late = Some(s2r.page_slot(cache_r, GUEST_RAM + 0x5000).unwrap().install(env, b));
    });
    let mut got = Vec::new();
    s2.unmap_live(&mut hooked, GUEST_RAM, 0x1000, &mut |pa, size| got.push((pa, size))).unwrap();
    let mut env = hooked.into_env();
    assert_eq!(got, vec![(pa, 0x1000)]);
    release_all(&mut env, got);
    assert_eq!(late, Some(Ok(())));
    assert_eq!(s2.translate(&env, GUEST_RAM + 0x5000).unwrap().pa, pb);
    assert_eq!((s2.table_pages(), s2.retired_pages()), (4, 0), "the table stayed");
    assert!(cache.agrees(&s2, &env));
    clean(&mut env);
}

// Tables unlinked while vCPUs run are retired, every entry non-zero, and freed only once every
// vCPU has passed a quiescent point; a vCPU's cache of them is never used again.
#[test]
fn retired_tables_wait_for_every_vcpu() {
    let (mut env, s2) = setup(64);
    let q = Quiescence::<2>::new();
    q.online(0, &s2);
    q.online(1, &s2);
    let mut cache = FaultCache::new();
    let a = claim_page(&mut env, 1);
    s2.fault_page(&mut env, &mut cache, GUEST_RAM, a).unwrap();
    let mut l3 = Pfn(0);
    s2.for_each_table(&env, &mut |t| l3 = t);
    let mut got = Vec::new();
    s2.unmap_live(&mut env, GUEST_RAM, 0x1000, &mut |pa, size| got.push((pa, size))).unwrap();
    release_all(&mut env, got);
    assert_eq!((s2.table_pages(), s2.retired_pages()), (1, 3), "levels 1 to 3 retired");
    assert_eq!(env.frames_in(FrameState::PageTable(vm(1))), 4);
    assert!((0..ENTRIES).all(|i| env.read(l3, i) != 0 && env.read(l3, i) & 1 == 0), "all held");
    assert!(s2.page_slot(&cache, GUEST_RAM + 0x1000).is_none(), "the epoch moved: the cache is stale");
    assert!(cache.agrees(&s2, &env), "a stale cache is never used");
    assert_eq!(s2.drain_retired(&mut env, q.oldest()), 0, "no vCPU passed a quiescent point");
    q.pass(0, &s2);
    assert_eq!(s2.drain_retired(&mut env, q.oldest()), 0, "vCPU 1 may still hold them");
    q.offline(1);
    assert_eq!(s2.drain_retired(&mut env, q.oldest()), 3);
    assert_eq!((s2.table_pages(), s2.retired_pages()), (1, 0));
    assert_eq!(env.frames_in(FrameState::PageTable(vm(1))), 1);
    // A table retired after a vCPU's quiescent point waits for the next one.
    q.online(1, &s2);
    let b = claim_page(&mut env, 1);
    s2.fault_page(&mut env, &mut cache, GUEST_RAM, b).unwrap();
    let mut got = Vec::new();
    s2.unmap_live(&mut env, GUEST_RAM, 0x1000, &mut |pa, size| got.push((pa, size))).unwrap();
    release_all(&mut env, got);
    assert_eq!(s2.drain_retired(&mut env, q.oldest()), 0);
    q.pass(0, &s2);
    q.pass(1, &s2);
    assert_eq!(s2.drain_retired(&mut env, q.oldest()), 3);
    clean(&mut env);
}

// A collapse while vCPUs run retires the level-3 table (its entries are all valid, so no late
// install lands in it); teardown frees whatever is still retired.
#[test]
fn collapse_live_retires_and_teardown_frees_the_retired() {
    let (mut env, s2) = setup(2048);
    let blk = guest_block(&mut env, 1);
    s2.map(&mut env, GUEST_RAM, blk, 2, Attrs::RAM).unwrap();
    s2.split_live(&mut env, GUEST_RAM, 2).unwrap();
    s2.collapse_live(&mut env, GUEST_RAM, 2).unwrap();
    assert_eq!(s2.retired_pages(), 1);
    assert_eq!(s2.translate(&env, GUEST_RAM + 0x9000).unwrap().pa, blk + 0x9000);
    clean(&mut env);
    let mut got = Vec::new();
    let _ = s2.teardown(&mut env, &mut |pa, size| got.push((pa, size)));
    assert_eq!(got, vec![(blk, 2 * MIB)]);
    release_all(&mut env, got);
    assert_eq!(env.frames_in(FrameState::PageTable(vm(1))), 0);
    assert!(env.violations.is_empty(), "{:#?}", env.violations);
}

// A vCPU's cache from a space that was torn down never matches the next one (a reset), even
// where the new space reuses the same table pages.
#[test]
fn a_cache_from_another_space_is_never_used() {
    let (mut env, s2) = setup(64);
    let mut cache = FaultCache::new();
    let a = claim_page(&mut env, 1);
    s2.fault_page(&mut env, &mut cache, GUEST_RAM, a).unwrap();
    let mut got = Vec::new();
    let _ = s2.teardown(&mut env, &mut |pa, size| got.push((pa, size)));
    release_all(&mut env, got);
    let s2 = Stage2::new(&mut env, vm(1), 1, Geometry::for_pa_bits(40)).unwrap();
    assert!(s2.page_slot(&cache, GUEST_RAM).is_none());
    assert!(s2.block_slot(&cache, GUEST_RAM).is_none());
}

// A block fault lands across the end of an unmap's range after the unmap split its edges: the
// unmap leaves it alone (that fault comes after the unmap), and releases only what it unmapped.
#[test]
fn unmap_leaves_a_block_mapped_across_its_end_by_a_later_fault() {
    let (mut env, s2) = setup(4096);
    let page = guest_frame(&mut env, 1);
    s2.map(&mut env, GUEST_RAM, page, 3, Attrs::RAM).unwrap();
    let blk = claim_block(&mut env, 1);
    let head = blk.pfn().phys();
    let s2r = &s2;
    // The first TLBI is the unmap's own break-before-make of the page: the block fault lands
    // right then, over the range's end.
    let mut hooked = Hooked::new(env, Trigger::FirstTlbi, |env| {
        s2r.fault_block(env, &mut FaultCache::new(), GUEST_RAM + 2 * MIB, blk).unwrap();
    });
    let mut got = Vec::new();
    s2.unmap_live(&mut hooked, GUEST_RAM, 2 * MIB + 0x1000, &mut |pa, size| got.push((pa, size))).unwrap();
    let mut env = hooked.into_env();
    assert_eq!(got, vec![(page, 0x1000)]);
    release_all(&mut env, got);
    assert_eq!(s2.translate(&env, GUEST_RAM + 2 * MIB).unwrap().pa, head);
    clean(&mut env);
}

// The general path's form for frames allocated by number: owner-checked, by CAS, and the
// tables it used are remembered in the vCPU's cache for the fast path's next fault; a second
// vCPU mapping the same page meets `AlreadyMapped`.
#[test]
fn map_cached_fills_the_vcpu_cache() {
    let (mut env, s2) = setup(4096);
    let mut cache = FaultCache::new();
    let a = guest_frame(&mut env, 1);
    s2.map_cached(&mut env, &mut cache, GUEST_RAM, a, 3, Attrs::RAM).unwrap();
    assert!(s2.page_slot(&cache, GUEST_RAM + 0x1000).is_some());
    assert!(s2.block_slot(&cache, GUEST_RAM + 2 * MIB).is_some(), "the level-2 table on the path too");
    let b = guest_frame(&mut env, 1);
    let r = s2.map_cached(&mut env, &mut FaultCache::new(), GUEST_RAM, b, 3, Attrs::RAM);
    assert_eq!(r, Err(Stage2Error::AlreadyMapped { ipa: GUEST_RAM }));
    let foreign = guest_frame(&mut env, 2);
    let r = s2.map_cached(&mut env, &mut cache, GUEST_RAM + 0x1000, foreign, 3, Attrs::RAM);
    assert!(matches!(r, Err(Stage2Error::NotOwned { .. })), "{r:?}");
    let blk = guest_block(&mut env, 1);
    let mut other = FaultCache::new();
    s2.map_cached(&mut env, &mut other, GUEST_RAM + 2 * MIB, blk, 2, Attrs::RAM).unwrap();
    assert!(s2.block_slot(&other, GUEST_RAM + 4 * MIB).is_some());
    assert!(s2.page_slot(&other, GUEST_RAM).is_none(), "a block fills only the level-2 table");
    assert!(cache.agrees(&s2, &env) && other.agrees(&s2, &env));
    clean(&mut env);
}

// ---- Shared memory ----

const SHM_IPA: u64 = 0x1000_0000;

/// Guest 1's space (owner) and guest 2's (borrower) over one model, and two frames shared by 1.
fn shared_setup() -> (ModelEnv, Stage2, Stage2, [u64; 2]) {
    let (mut env, owner) = setup(256);
    let borrower = Stage2::new(&mut env, vm(2), 2, Geometry::for_pa_bits(40)).unwrap();
    env.add_root(2, Pfn(borrower.vttbr() >> 12 & ((1 << 36) - 1)), borrower.geometry().start_level);
    let frames = [0, 1].map(|_| env.claim_frame(FrameState::SharedOwned(vm(1))).unwrap().phys());
    (env, owner, borrower, frames)
}

// The owner maps its shared frames as shared-owned, a borrower as shared-borrowed; each mapping
// is refused for frames in any other state, and plain RAM mappings of shared frames too.
#[test]
fn shared_mappings_need_shared_frames_on_the_right_side() {
    let (mut env, owner, borrower, [a, b]) = shared_setup();
    owner.map(&mut env, SHM_IPA, a, 3, Attrs::SHARED_OWNED).unwrap();
    borrower.map(&mut env, SHM_IPA + 0x4000, a, 3, Attrs::SHARED_BORROWED).unwrap();
    let own_frame = guest_frame(&mut env, 2);
    let refused = [
        // The owner cannot borrow its own frame, nor map it as plain RAM.
        (&owner, b, Attrs::SHARED_BORROWED),
        (&owner, b, Attrs::RAM),
        // The borrower cannot claim to own it, nor map it as its RAM.
        (&borrower, b, Attrs::SHARED_OWNED),
        (&borrower, b, Attrs::RAM),
        // Nor borrow a frame that is not shared at all.
        (&borrower, own_frame, Attrs::SHARED_BORROWED),
    ];
    for (i, (s2, pa, attrs)) in refused.into_iter().enumerate() {
        let err = s2.map(&mut env, SHM_IPA + 0x1000, pa, 3, attrs).unwrap_err();
        assert!(matches!(err, Stage2Error::NotOwned { .. }), "case {i}: {err:?}");
    }
    assert!(owner.is_shared(&env, SHM_IPA) && borrower.is_shared(&env, SHM_IPA + 0x4fff));
    assert!(!borrower.is_shared(&env, SHM_IPA) && !owner.is_shared(&env, u64::MAX));
    let m = borrower.translate(&env, SHM_IPA + 0x4008).unwrap();
    assert_eq!((m.pa, m.attrs), (a, Attrs::SHARED_BORROWED));
    clean(&mut env);
}

// A borrower's teardown and reset, and an unmap, remove its view but report none of the shared
// frames released; its own RAM is reported as before. The owner's teardown does the same: the
// region outlives both spaces until whoever holds it releases it.
#[test]
fn teardown_and_unmap_never_release_shared_frames() {
    let (mut env, owner, borrower, [a, b]) = shared_setup();
    let ram = guest_frame(&mut env, 2);
    borrower.map(&mut env, GUEST_RAM, ram, 3, Attrs::RAM).unwrap();
    for s2 in [&owner, &borrower] {
        let attrs = if s2.vm() == vm(1) { Attrs::SHARED_OWNED } else { Attrs::SHARED_BORROWED };
        s2.map(&mut env, SHM_IPA, a, 3, attrs).unwrap();
        s2.map(&mut env, SHM_IPA + 0x1000, b, 3, attrs).unwrap();
    }
    let mut got = Vec::new();
    borrower.unmap_live(&mut env, SHM_IPA, 0x1000, &mut |pa, size| got.push((pa, size))).unwrap();
    assert!(got.is_empty(), "{got:x?}");
    assert_eq!(borrower.translate(&env, SHM_IPA), None);
    borrower.empty(&mut env, &mut |pa, size| got.push((pa, size)));
    assert_eq!(got, vec![(ram, 0x1000)], "only its own RAM");
    assert_eq!(borrower.translate(&env, SHM_IPA + 0x1000), None);
    env.release_frames(ram, 0x1000);
    // Mapped again after the reset, then destroyed for good.
    borrower.map(&mut env, SHM_IPA, a, 3, Attrs::SHARED_BORROWED).unwrap();
    got.clear();
    let _ = borrower.destroy(&mut env, &mut |pa, size| got.push((pa, size)));
    env.remove_root(2);
    let _ = owner.destroy(&mut env, &mut |pa, size| got.push((pa, size)));
    env.remove_root(1);
    assert!(got.is_empty(), "{got:x?}");
    assert_eq!(env.frames_in(FrameState::SharedOwned(vm(1))), 2);
    assert_eq!(env.cached_for(2), 0);
    env.release_frames(a, 0x1000);
    env.release_frames(b, 0x1000);
    assert!(env.violations.is_empty(), "{:#?}", env.violations);
}

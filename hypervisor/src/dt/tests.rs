//! Blob-level tests: real QEMU device trees (and dtc-edited ones) parse to the expected
//! platform; every malformation is refused with the right error; no truncation, corruption or
//! random mutation panics; the fuzz corpus and regressions replay.

use super::exercise::{exercise, parse_and_map, Outcome};
use super::testutil::*;
use super::*;
use crate::memmap::{boot_reservations, platform_reservations, MemoryMap, Reason};

const M1G: &[u8] = include_bytes!("testdata/qemu-virt-m1g.dtb");
const M3G: &[u8] = include_bytes!("testdata/qemu-virt-m3g.dtb");
const SMP4: &[u8] = include_bytes!("testdata/qemu-virt-smp4.dtb");
const CPUMAX: &[u8] = include_bytes!("testdata/qemu-virt-cpumax.dtb");
const GICV2: &[u8] = include_bytes!("testdata/qemu-virt-gicv2.dtb");
const GUESTS: &[u8] = include_bytes!("testdata/qemu-virt-guests.dtb");
const BOARD: &[u8] = include_bytes!("testdata/board-soc.dtb");
/// Four guests with static shared memory nodes (scripts/guestcfg.py; also a fuzz seed).
const SHARED: &[u8] = include_bytes!("../../fuzz/corpus/dt_parse/qemu-virt-shared-memory.dtb");

const ALL: [(&str, &[u8]); 8] = [
    ("m1g", M1G),
    ("m3g", M3G),
    ("smp4", SMP4),
    ("cpumax", CPUMAX),
    ("gicv2", GICV2),
    ("guests", GUESTS),
    ("board", BOARD),
    ("shared-memory", SHARED),
];

const MIB: u64 = 1024 * 1024;

fn r(base: u64, size: u64) -> Region {
    Region::new(base, size).unwrap()
}

fn mpidrs(p: &Platform<'_>) -> Vec<u64> {
    p.cpus().iter().map(|c| c.mpidr).collect()
}

fn qemu_gicv3() -> Gic {
    let mut redistributors = FixedList::new();
    redistributors.push(r(0x80a_0000, 0xf6_0000)).unwrap();
    Gic {
        version: GicVersion::V3,
        distributor: r(0x800_0000, 0x1_0000),
        redistributors,
        cpu_interface: None,
        hyp_interface: None,
        vcpu_interface: None,
    }
}

// ---------------------------------------------------------------------------------------------
// Real device trees
// ---------------------------------------------------------------------------------------------

#[test]
fn qemu_1g_parses_to_the_expected_platform() {
    let p = parse(M1G).unwrap();
    assert_eq!(p.total_size(), M1G.len());
    assert_eq!(p.memory(), &[r(0x4000_0000, 1024 * MIB)]);
    assert_eq!(mpidrs(&p), vec![0, 1]);
    assert_eq!(p.boot_cpuid_phys(), 0);
    assert_eq!(
        p.psci(),
        Some(Psci { conduit: Conduit::Smc, version: PsciVersion::V1_0, cpu_on: Some(0xc400_0003) })
    );
    assert_eq!(
        p.uart(),
        Some(Uart { region: r(0x900_0000, 0x1000), node: "pl011@9000000", is_stdout: true, intid: Some(33) })
    );
    assert_eq!(p.gic(), Some(&qemu_gicv3()));
    assert_eq!(p.stdout_path(), Some("/pl011@9000000"));
    assert_eq!(p.bootargs(), None);
    assert!(p.memreserve().is_empty());
    assert!(p.reserved_memory().is_empty());
    assert!(p.guests().is_empty());
    assert_eq!(exercise(M1G), Outcome::Mapped);
}

#[test]
fn qemu_3g_has_one_3g_bank() {
    let p = parse(M3G).unwrap();
    assert_eq!(p.memory(), &[r(0x4000_0000, 3072 * MIB)]);
    assert_eq!(p.memory()[0].last(), 0xffff_ffff);
}

#[test]
fn qemu_smp4_has_four_cpus() {
    let p = parse(SMP4).unwrap();
    assert_eq!(mpidrs(&p), vec![0, 1, 2, 3]);
    assert_eq!(p.memory(), &[r(0x4000_0000, 1024 * MIB)]);
}

#[test]
fn qemu_cpu_max_parses_like_the_a72() {
    let p = parse(CPUMAX).unwrap();
    assert_eq!(mpidrs(&p), vec![0, 1]);
    assert_eq!(p.gic(), Some(&qemu_gicv3()));
    assert_eq!(p.psci().map(|p| p.conduit), Some(Conduit::Smc));
}

#[test]
fn qemu_gicv2_has_all_four_frames() {
    let p = parse(GICV2).unwrap();
    let gic = p.gic().unwrap();
    assert_eq!(gic.version, GicVersion::V2);
    assert_eq!(gic.distributor, r(0x800_0000, 0x1_0000));
    assert!(gic.redistributors.is_empty());
    assert_eq!(gic.cpu_interface, Some(r(0x801_0000, 0x1_0000)));
    assert_eq!(gic.hyp_interface, Some(r(0x803_0000, 0x1_0000)));
    assert_eq!(gic.vcpu_interface, Some(r(0x804_0000, 0x1_0000)));
}

#[test]
fn edited_qemu_tree_has_reservations_bootargs_and_guests() {
    let p = parse(GUESTS).unwrap();
    assert_eq!(p.memreserve(), &[r(0x4000_0000, 0x1000)]);
    assert_eq!(
        p.reserved_memory(),
        &[
            ReservedMemory { name: "secure@7f000000", region: r(0x7f00_0000, 16 * MIB), no_map: true },
            ReservedMemory { name: "framebuffer@7e000000", region: r(0x7e00_0000, MIB), no_map: false },
        ]
    );
    assert_eq!(p.bootargs(), Some("labyrinth.log=debug"));
    assert_eq!(p.guests().len(), 8);

    let domu1 = p.guests()[0].unwrap();
    assert_eq!(domu1.name, "domU1");
    assert_eq!(domu1.memory_kib, 0x40000);
    assert_eq!(domu1.memory_bytes(), 256 * MIB);
    assert_eq!(domu1.cpus, 2);
    assert_eq!(
        domu1.kernel,
        Module { kind: ModuleKind::Kernel, region: r(0x4800_0000, 8 * MIB), node: "module@48000000" }
    );
    assert_eq!(domu1.ramdisk.map(|m| m.region), Some(r(0x4880_0000, 2 * MIB)));
    assert_eq!(domu1.device_tree.map(|m| m.region), Some(r(0x48a0_0000, 0x1_0000)));
    assert_eq!(domu1.bootargs, Some("console=ttyAMA0 rdinit=/init"));
    assert!(domu1.no_block_mappings);
    assert!(domu1.virtual_gic, "labyrinth,virtual-gic stays accepted");

    // Xen's compatible, one-cell addresses from the guest node, bootargs on the guest node.
    let domu2 = p.guests()[1].unwrap();
    assert_eq!(domu2.name, "domU2");
    assert_eq!(domu2.memory_bytes(), 128 * MIB);
    assert_eq!(domu2.cpus, 1);
    assert_eq!(domu2.kernel.region, r(0x4900_0000, 4 * MIB));
    assert_eq!(domu2.ramdisk, None);
    assert_eq!(domu2.bootargs, Some("console=hvc0"));
    assert!(!domu2.no_block_mappings);
    assert!(domu2.virtual_gic, "every guest gets a virtual GIC by default");

    let problems: Vec<(&str, GuestProblem<'_>)> =
        p.guests()[2..6].iter().map(|g| g.unwrap_err()).map(|e| (e.guest, e.problem)).collect();
    assert_eq!(
        problems,
        vec![
            ("nokernel", GuestProblem::NoKernel),
            ("zerocpus", GuestProblem::ZeroCpus),
            ("overlap", GuestProblem::OverlappingModules { a: "module@4c000000", b: "module@4c100000" }),
            ("shortmem", GuestProblem::BadMemory { len: 4 }),
        ]
    );
    assert_eq!(
        p.guests()[4].unwrap_err().to_string(),
        "guest overlap: modules module@4c000000 and module@4c100000 overlap"
    );

    // A Xen dom0less node for Linux on two vCPUs, with no Labyrinth property at all.
    let linux = p.guests()[6].unwrap();
    assert_eq!((linux.name, linux.cpus, linux.memory_bytes()), ("linux", 2, 256 * MIB));
    assert_eq!(linux.kernel.region, r(0x4e00_0000, 8 * MIB));
    assert_eq!(linux.ramdisk.map(|m| m.region), Some(r(0x4e80_0000, 2 * MIB)));
    assert_eq!(linux.bootargs, Some("console=ttyAMA0 rdinit=/init"));
    assert!(linux.virtual_gic);
    assert_eq!(linux.validate(4, 40), Ok(()));

    // The bare test-kernel guest opts out of the GIC.
    let bare = p.guests()[7].unwrap();
    assert_eq!(bare.name, "bare");
    assert!(!bare.virtual_gic);
}

#[test]
fn guest_validation_needs_the_machine() {
    let p = parse(GUESTS).unwrap();
    let domu1 = p.guests()[0].unwrap();
    assert_eq!(domu1.validate(2, 40), Ok(()));
    assert_eq!(domu1.validate(1, 40).unwrap_err().problem, GuestProblem::TooManyVcpus { cpus: 2, phys: 1 });
    let e = domu1.validate(2, 27).unwrap_err();
    assert_eq!(e.problem, GuestProblem::MemoryExceedsIpa { memory: 256 * MIB, ipa_bits: 27 });
    assert_eq!(e.to_string(), "guest domU1: memory 256 MiB exceeds the 27-bit IPA space");
    assert_eq!(domu1.validate(2, 28), Ok(()), "exactly the IPA space fits");
    assert_eq!(domu1.validate(2, 64), Ok(()));
    assert_eq!(domu1.validate(2, 200), Ok(()));
}

#[test]
fn edited_qemu_tree_memory_map() {
    let p = parse(GUESTS).unwrap();
    let implied = platform_reservations(&p).unwrap();
    // 1 memreserve + 2 reserved-memory + domU1's 3 modules + domU2's kernel + linux's kernel and
    // ramdisk + bare's kernel.
    assert_eq!(implied.len(), 10);
    assert!(implied
        .iter()
        .any(|r| r.reason == Reason::BootModule { guest: "domU2", kind: ModuleKind::Kernel }));
    let image = r(0x4020_0000, 2 * MIB);
    let all = boot_reservations(&p, image, 0x4000_0000).unwrap();
    assert_eq!(all.len(), 12);
    let map = MemoryMap::build(p.memory(), &all, 64 * MIB).unwrap();
    let text = map.to_string();
    let expected = format!(
        "\
ram      0x40000000-0x7fffffff  1024 MiB
reserved 0x40000000-0x40000fff  4 KiB  /memreserve/
reserved 0x40000000-0x{dtb_last:08x}  {dtb_size} B  device tree blob
reserved 0x40200000-0x403fffff  2 MiB  hypervisor image
reserved 0x48000000-0x487fffff  8 MiB  guest domU1 kernel
reserved 0x48800000-0x489fffff  2 MiB  guest domU1 ramdisk
reserved 0x48a00000-0x48a0ffff  64 KiB  guest domU1 device tree
reserved 0x49000000-0x493fffff  4 MiB  guest domU2 kernel
reserved 0x4e000000-0x4e7fffff  8 MiB  guest linux kernel
reserved 0x4e800000-0x4e9fffff  2 MiB  guest linux ramdisk
reserved 0x4f000000-0x4f0fffff  1 MiB  guest bare kernel
reserved 0x7e000000-0x7e0fffff  1 MiB  reserved-memory framebuffer@7e000000
reserved 0x7f000000-0x7fffffff  16 MiB  reserved-memory secure@7f000000 (no-map)
free     0x40003000-0x401fffff  2036 KiB
free     0x40400000-0x47ffffff  124 MiB
free     0x48a10000-0x48ffffff  6080 KiB
free     0x49400000-0x4dffffff  76 MiB
free     0x4ea00000-0x4effffff  6 MiB
free     0x4f100000-0x7dffffff  751 MiB
free     0x7e100000-0x7effffff  15 MiB
",
        dtb_last = 0x4000_0000 + GUESTS.len() - 1,
        dtb_size = GUESTS.len(),
    );
    assert!(text.starts_with(&expected), "got:\n{text}\nexpected:\n{expected}");
    // The blob (10282 bytes) ends inside the third page: free starts at the next page.
    assert_eq!(GUESTS.len(), 10282);
    let modules = 8 * MIB + 2 * MIB + 64 * 1024 + 4 * MIB + 8 * MIB + 2 * MIB + MIB;
    let reserved = 2 * MIB + modules + MIB + 16 * MIB + GUESTS.len() as u64;
    assert_eq!(map.reserved_bytes(), reserved);
    assert!(text.ends_with(&format!(
        "total: 1024 MiB RAM, {} B reserved, {} KiB free\n",
        reserved,
        map.free_bytes() / 1024
    )));
}

#[test]
fn board_with_a_translating_bus_and_aliases() {
    let p = parse(BOARD).unwrap();
    assert_eq!(p.memory(), &[r(0x8000_0000, 1024 * MIB), r(0x8_8000_0000, 1024 * MIB)]);
    assert_eq!(mpidrs(&p), vec![0, 0x100, 0x1_0000_0000]);
    assert_eq!(
        p.psci(),
        Some(Psci { conduit: Conduit::Hvc, version: PsciVersion::V0_1, cpu_on: Some(0x95c1_ba5f) })
    );
    // The alias names the enabled UART at 0x2000 on the bus, which maps 0 to 0xfe000000.
    assert_eq!(p.stdout_path(), Some("serial0:115200n8"));
    assert_eq!(
        p.uart().map(|u| (u.region, u.node, u.is_stdout)),
        Some((r(0xfe00_2000, 0x1000), "serial@2000", true))
    );
    let gic = p.gic().unwrap();
    assert_eq!(gic.version, GicVersion::V3);
    assert_eq!(gic.distributor, r(0xfe10_0000, 0x1_0000));
    assert_eq!(gic.redistributors.as_slice(), &[r(0xfe20_0000, 0x2_0000), r(0xfe30_0000, 0x4_0000)]);
    assert_eq!(gic.cpu_interface, Some(r(0xfe40_0000, 0x2000)));
    assert_eq!(gic.hyp_interface, Some(r(0xfe41_0000, 0x2000)));
    assert_eq!(gic.vcpu_interface, Some(r(0xfe42_0000, 0x2000)));
    let map = MemoryMap::build(p.memory(), &[], 0).unwrap();
    assert!(map.to_string().ends_with("total: 2048 MiB RAM, 0 MiB reserved, 2048 MiB free\n"));
}

/// On well-formed blobs the fdt crate is a fair oracle: our walker must see the same nodes
/// and properties in the same order.
#[test]
fn walker_agrees_with_the_fdt_crate_on_well_formed_blobs() {
    for (name, blob) in ALL {
        let theirs = fdt::Fdt::new(blob).unwrap();
        let ours = check(blob).unwrap().tree();
        let their_nodes: Vec<_> = theirs.all_nodes().collect();
        let our_nodes: Vec<_> = ours.nodes().collect();
        assert_eq!(their_nodes.len(), our_nodes.len(), "{name}: node count");
        for (t, o) in their_nodes.iter().zip(&our_nodes) {
            let our_name = if o.name().is_empty() { "/" } else { o.name() };
            assert_eq!(t.name, our_name, "{name}");
            let tp: Vec<(&str, &[u8])> = t.properties().map(|p| (p.name, p.value)).collect();
            let op: Vec<(&str, &[u8])> = o.properties().map(|p| (p.name, p.value)).collect();
            assert_eq!(tp, op, "{name}: properties of {our_name}");
        }
        assert_eq!(theirs.total_size(), check(blob).unwrap().total_size());
        // Without duplicate names, every node is found by its own path.
        for node in &our_nodes {
            let path = node.path().to_string();
            assert_eq!(ours.find(&path).map(|n| n.path()), Some(node.path()), "{name}: {path}");
        }
    }
}

#[test]
fn duplicate_sibling_names_resolve_to_the_first() {
    // check does not refuse duplicates (finding them costs quadratic time); lookups take the
    // first, and the parser never assumes uniqueness.
    let mut w = FdtWriter::new();
    w.begin("").begin("a").prop_u32("first", 1).end().begin("a").begin("b").end().end().end();
    let blob = w.build();
    let tree = check(&blob).unwrap().tree();
    assert!(tree.find("/a").unwrap().property("first").is_some());
    assert!(tree.find("/a/b").is_none());
    assert_eq!(exercise(&blob), Outcome::Unparsed);
}

#[test]
fn tree_navigation() {
    let tree = check(M1G).unwrap().tree();
    let cpu1 = tree.find("/cpus/cpu@1").unwrap();
    assert_eq!(cpu1.path().to_string(), "/cpus/cpu@1");
    assert_eq!(cpu1.parent().unwrap().name(), "cpus");
    assert_eq!(cpu1.parent().unwrap().parent().unwrap().name(), "");
    assert!(cpu1.parent().unwrap().parent().unwrap().parent().is_none());
    assert_eq!(tree.find("/memory").unwrap().name(), "memory@40000000");
    assert_eq!(tree.find("/").unwrap().depth(), 0);
    assert!(tree.find("/cpus/cpu@7").is_none());
    assert!(tree.find("cpus").is_none(), "relative paths are not looked up");
    let core1 = tree.find("/cpus/cpu-map/socket0/cluster0/core1").unwrap();
    assert_eq!(core1.depth(), 5);
    assert_eq!(core1.path().to_string(), "/cpus/cpu-map/socket0/cluster0/core1");
    let names: Vec<&str> = tree.find("/cpus").unwrap().children().map(|c| c.name()).collect();
    assert_eq!(names, vec!["cpu-map", "cpu@0", "cpu@1"]);
}

/// The boot path keeps these on its stack (64 KiB): keep them bounded. Each guest's shared
/// memory nodes (4 x 56 bytes) took the platform past 4 KiB, their host addresses (Xen's
/// older form, 16 bytes more each) past 6 KiB.
#[test]
fn tables_stay_small() {
    use core::mem::size_of;
    assert!(size_of::<Platform<'_>>() <= 6656, "Platform is {} bytes", size_of::<Platform<'_>>());
    assert!(size_of::<crate::memmap::MemoryMap<'_>>() <= 6144);
    assert!(size_of::<crate::memmap::ReservationList<'_>>() <= 3072);
    assert!(size_of::<DtError<'_>>() <= 96, "DtError is {} bytes", size_of::<DtError<'_>>());
}

#[test]
fn total_size_reads_only_the_header() {
    assert_eq!(total_size(M1G), Ok(M1G.len()));
    assert_eq!(total_size(&M1G[..40]), Ok(M1G.len()));
    assert_eq!(total_size(&M1G[..39]), Err(DtError::TooShort { len: 39 }));
    assert_eq!(total_size(&[0; 40]), Err(DtError::BadMagic { found: 0 }));
    let mut small = M1G[..40].to_vec();
    set_word(&mut small, OFF_TOTALSIZE, 8);
    assert_eq!(total_size(&small), Err(DtError::TotalSizeTooSmall { totalsize: 8 }));
}

#[test]
fn a_blob_followed_by_other_bytes_is_read_up_to_totalsize() {
    let mut padded = M1G.to_vec();
    padded.extend_from_slice(&[0xff; 4096]);
    let p = parse(&padded).unwrap();
    assert_eq!(p.total_size(), M1G.len());
}

// ---------------------------------------------------------------------------------------------
// Never panic: truncation, corruption, random mutation, corpus replay
// ---------------------------------------------------------------------------------------------

#[test]
fn every_truncation_is_refused() {
    for (name, blob) in ALL {
        for len in 0..blob.len() {
            assert!(parse(&blob[..len]).is_err(), "{name}: prefix of {len} bytes accepted");
        }
    }
}

#[test]
fn truncations_with_a_matching_totalsize_are_refused() {
    // The header claims exactly the truncated length, so the check gets past the header and
    // into the block bounds.
    for (_, blob) in [("board", BOARD), ("m1g", M1G)] {
        for len in 40..blob.len() {
            let mut cut = blob[..len].to_vec();
            set_word(&mut cut, OFF_TOTALSIZE, len as u32);
            assert_eq!(parse_and_map(&cut), Outcome::Refused, "truncated at {len}");
        }
    }
}

#[test]
fn struct_block_cut_at_every_byte_is_refused() {
    // The struct block shortened (blocks and sizes kept consistent), so the walk itself meets
    // the end in every possible place.
    for blob in [BOARD, GUESTS] {
        let struct_off = get_word(blob, OFF_DT_STRUCT) as usize;
        let struct_size = get_word(blob, OFF_SIZE_DT_STRUCT) as usize;
        let strings_off = get_word(blob, OFF_DT_STRINGS) as usize;
        let strings = &blob[strings_off..];
        for keep in 0..struct_size {
            let mut cut = blob[..struct_off + keep].to_vec();
            cut.extend_from_slice(strings);
            let total = cut.len() as u32;
            set_word(&mut cut, OFF_TOTALSIZE, total);
            set_word(&mut cut, OFF_SIZE_DT_STRUCT, keep as u32 & !3);
            set_word(&mut cut, OFF_DT_STRINGS, (struct_off + keep) as u32);
            assert_eq!(parse_and_map(&cut), Outcome::Refused, "struct block cut to {keep}");
        }
    }
}

#[test]
fn every_byte_corruption_never_panics() {
    // Every byte of the small board blob, four ways.
    for pos in 0..BOARD.len() {
        let original = BOARD[pos];
        for value in [!original, 0x00, 0xff, original ^ 0x01] {
            let mut bad = BOARD.to_vec();
            bad[pos] = value;
            parse_and_map(&bad);
        }
    }
    // The edited QEMU blob: the header, the reservations and the whole /chosen subtree with its
    // guests (the densest part of the parser), each byte inverted.
    let chosen = GUESTS.windows(7).position(|w| w == b"chosen\0").unwrap();
    let struct_end = (get_word(GUESTS, OFF_DT_STRUCT) + get_word(GUESTS, OFF_SIZE_DT_STRUCT)) as usize;
    for pos in (0..72).chain(chosen..struct_end) {
        let mut bad = GUESTS.to_vec();
        bad[pos] = !bad[pos];
        parse_and_map(&bad);
    }
}

#[test]
fn header_fields_at_extreme_values_never_panic() {
    for blob in [M1G, BOARD] {
        let len = blob.len() as u32;
        for field in 0..10 {
            let original = get_word(blob, field * 4);
            for value in [
                0,
                1,
                3,
                4,
                8,
                16,
                17,
                36,
                40,
                len - 1,
                len,
                len + 1,
                original.wrapping_add(4),
                original.wrapping_sub(4),
                0x7fff_ffff,
                0x8000_0000,
                u32::MAX - 3,
                u32::MAX,
            ] {
                let mut bad = blob.to_vec();
                set_word(&mut bad, field * 4, value);
                parse_and_map(&bad);
            }
        }
    }
}

#[test]
fn struct_words_replaced_by_tokens_and_lengths_never_panic() {
    let blob = BOARD;
    let start = get_word(blob, OFF_DT_STRUCT) as usize;
    let size = get_word(blob, OFF_SIZE_DT_STRUCT) as usize;
    for pos in (start..start + size).step_by(4) {
        for value in [1, 2, 3, 4, 9, 0, 0x7fff_ffff, u32::MAX, 0x8000_0000, 0x10, 0x1000] {
            let mut bad = blob.to_vec();
            set_word(&mut bad, pos, value);
            parse_and_map(&bad);
        }
    }
}

/// Every file of the fuzz corpus and of the fuzz regressions goes through the whole path.
/// A crash the fuzzer found is committed to `hypervisor/fuzz/regressions/dt_parse/` and stays
/// covered here without the nightly toolchain.
#[test]
fn fuzz_corpus_and_regressions_replay() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut replayed = 0;
    for dir in ["corpus/dt_parse", "regressions/dt_parse"] {
        let dir = root.join(dir);
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_file() {
                let data = std::fs::read(&path).unwrap();
                exercise(&data);
                replayed += 1;
            }
        }
    }
    assert!(replayed >= ALL.len(), "only {replayed} corpus files found");
}

mod mutations {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn random_byte_mutations_never_panic(
            which in 0..ALL.len(),
            edits in proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>()), 1..8),
        ) {
            let mut blob = ALL[which].1.to_vec();
            for (at, value) in edits {
                let i = at.index(blob.len());
                blob[i] = value;
            }
            parse_and_map(&blob);
        }

        #[test]
        fn random_word_mutations_never_panic(
            which in 0..ALL.len(),
            edits in proptest::collection::vec((any::<proptest::sample::Index>(), prop_oneof![
                Just(1u32), Just(2), Just(3), Just(4), Just(9), any::<u32>(), 0u32..0x100
            ]), 1..6),
        ) {
            let mut blob = ALL[which].1.to_vec();
            for (at, value) in edits {
                let i = at.index(blob.len() / 4) * 4;
                set_word(&mut blob, i, value);
            }
            parse_and_map(&blob);
        }

        #[test]
        fn random_splices_never_panic(
            which in 0..ALL.len(),
            from in any::<proptest::sample::Index>(),
            to in any::<proptest::sample::Index>(),
            len in 0usize..64,
        ) {
            // Copy a chunk of the blob over another place, keeping the length.
            let mut blob = ALL[which].1.to_vec();
            let n = blob.len();
            let (from, to) = (from.index(n), to.index(n));
            let len = len.min(n - from).min(n - to);
            let chunk = blob[from..from + len].to_vec();
            blob[to..to + len].copy_from_slice(&chunk);
            parse_and_map(&blob);
        }

        #[test]
        fn arbitrary_bytes_behind_a_valid_header_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut blob = M1G[..40].to_vec();
            blob.extend_from_slice(&body);
            let len = blob.len() as u32;
            set_word(&mut blob, OFF_TOTALSIZE, len);
            set_word(&mut blob, OFF_MEM_RSVMAP, 40);
            set_word(&mut blob, OFF_DT_STRUCT, 56);
            set_word(&mut blob, OFF_SIZE_DT_STRUCT, (len.saturating_sub(56 + 32)) & !3);
            set_word(&mut blob, OFF_DT_STRINGS, len.saturating_sub(32));
            set_word(&mut blob, OFF_SIZE_DT_STRINGS, 32.min(len));
            parse_and_map(&blob);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Each malformation, its error
// ---------------------------------------------------------------------------------------------

/// A minimal valid blob: an empty root.
fn minimal() -> FdtWriter {
    let mut w = FdtWriter::new();
    w.begin("").prop_u32("#address-cells", 2).end();
    w
}

fn check_err(blob: &[u8]) -> DtError<'static> {
    match check(blob) {
        Ok(_) => panic!("check accepted a malformed blob"),
        Err(e) => {
            // Every message is printable and non-empty.
            assert!(!e.to_string().is_empty());
            e
        }
    }
}

#[test]
fn minimal_blob_checks() {
    let blob = minimal().build();
    let c = check(&blob).unwrap();
    assert_eq!(c.total_size(), blob.len());
    assert_eq!(c.version(), 17);
    assert_eq!(c.tree().nodes().count(), 1);
    // No /cpus and no memory: checked, but not a platform.
    assert_eq!(parse(&blob).unwrap_err(), DtError::NoMemory);
    let mut w = minimal();
    w.boot_cpuid(0x101);
    assert_eq!(check(&w.build()).unwrap().boot_cpuid_phys(), 0x101);
}

#[test]
fn header_malformations() {
    let good = minimal().build();
    let len = good.len();
    assert_eq!(check_err(&good[..20]), DtError::TooShort { len: 20 });
    assert_eq!(check_err(&[]), DtError::TooShort { len: 0 });

    let with = |off: usize, value: u32| {
        let mut b = good.clone();
        set_word(&mut b, off, value);
        b
    };
    assert_eq!(check_err(&with(0, 0xfeed_d00d)), DtError::BadMagic { found: 0xfeed_d00d });
    assert_eq!(
        check_err(&with(OFF_TOTALSIZE, len as u32 + 1)),
        DtError::TotalSizeBeyondBlob { totalsize: len as u32 + 1, len }
    );
    assert_eq!(check_err(&with(OFF_TOTALSIZE, 39)), DtError::TotalSizeTooSmall { totalsize: 39 });
    assert_eq!(
        check_err(&with(OFF_VERSION, 15)),
        DtError::UnsupportedVersion { version: 15, last_comp_version: 16 }
    );
    assert_eq!(
        check_err(&with(OFF_LAST_COMP, 18)),
        DtError::UnsupportedVersion { version: 17, last_comp_version: 18 }
    );
    let e = check_err(&with(OFF_DT_STRUCT, 0x1000));
    assert!(matches!(e, DtError::BlockBeyondTotalSize { block: Block::Struct, offset: 0x1000, .. }), "{e:?}");
    assert!(e.to_string().starts_with("struct block offset 0x1000 size 0x"), "{e}");
    assert_eq!(
        check_err(&with(OFF_DT_STRUCT, 0x3a)),
        DtError::BlockMisaligned { block: Block::Struct, offset: 0x3a, align: 4 }
    );
    assert_eq!(
        check_err(&with(OFF_SIZE_DT_STRUCT, 0x1e)),
        DtError::BlockMisaligned { block: Block::Struct, offset: 0x1e, align: 4 }
    );
    assert_eq!(
        check_err(&with(OFF_DT_STRUCT, 0x10)),
        DtError::BlockInHeader { block: Block::Struct, offset: 0x10 }
    );
    assert_eq!(
        check_err(&with(OFF_MEM_RSVMAP, 0x2c)),
        DtError::BlockMisaligned { block: Block::MemReserve, offset: 0x2c, align: 8 }
    );
    assert_eq!(
        check_err(&with(OFF_MEM_RSVMAP, 0)),
        DtError::BlockInHeader { block: Block::MemReserve, offset: 0 }
    );
    assert!(matches!(
        check_err(&with(OFF_SIZE_DT_STRINGS, u32::MAX)),
        DtError::BlockBeyondTotalSize { block: Block::Strings, .. }
    ));
    // Strings block moved onto the struct block.
    let struct_off = get_word(&good, OFF_DT_STRUCT);
    assert_eq!(
        check_err(&with(OFF_DT_STRINGS, struct_off)),
        DtError::BlocksOverlap { a: Block::Struct, b: Block::Strings }
    );
    // Memory reservations placed on the struct block, where a property's zero value reads as
    // the terminator: the root's BEGIN_NODE at 56, a PROP at 64, its 24-byte value at 76..100.
    let mut w = FdtWriter::new();
    w.begin("").prop("z", &[0; 24]).end();
    let mut blob = w.build();
    set_word(&mut blob, OFF_MEM_RSVMAP, 80);
    assert_eq!(check_err(&blob), DtError::BlocksOverlap { a: Block::MemReserve, b: Block::Struct });
}

#[test]
fn memreserve_malformations() {
    // The terminator overwritten: the entries run into the struct block and past totalsize.
    let mut w = minimal();
    w.memreserve(0x1000, 0x1000);
    let mut blob = w.build();
    assert_eq!(check(&blob).unwrap().memreserve().collect::<Vec<_>>(), vec![(0x1000, 0x1000)]);
    let struct_off = get_word(&blob, OFF_DT_STRUCT) as usize;
    let len = blob.len();
    // Small non-zero words everywhere after the header: no terminator, no overflow.
    blob[56..72].fill(0x01);
    blob[struct_off..len].fill(0x01);
    assert_eq!(check_err(&blob), DtError::MemReserveUnterminated { offset: 40 });

    let mut w = minimal();
    w.memreserve(u64::MAX - 0xfff, 0x2000);
    assert_eq!(
        check_err(&w.build()),
        DtError::MemReserveOverflow { offset: 40, address: u64::MAX - 0xfff, size: 0x2000 }
    );
}

#[test]
fn structure_malformations() {
    let err = |w: &FdtWriter| check_err(&w.build());
    let base = 56; // struct block offset with no /memreserve/ entries

    let mut w = FdtWriter::new();
    w.begin("").raw_word(0x1234).end();
    assert_eq!(err(&w), DtError::BadToken { offset: base + 8, token: 0x1234 });

    let mut w = FdtWriter::new();
    w.begin("").begin_raw(b"\xc3\x28").end().end();
    assert!(matches!(err(&w), DtError::BadNodeName { why: "is not UTF-8", .. }));

    let mut w = FdtWriter::new();
    w.begin("").begin("a/b").end().end();
    assert!(matches!(err(&w), DtError::BadNodeName { why: "contains '/'", .. }));

    let mut w = FdtWriter::new();
    w.begin("").begin("").end().end();
    assert!(matches!(err(&w), DtError::BadNodeName { why: "is empty", .. }));

    let mut w = FdtWriter::new();
    w.begin("root").end();
    assert!(matches!(err(&w), DtError::BadNodeName { .. }));

    let mut w = FdtWriter::new();
    w.begin("").prop_raw_nameoff(0x100, &[1, 2, 3, 4]).end();
    assert!(matches!(err(&w), DtError::PropertyNameOutsideStrings { nameoff: 0x100, .. }));

    let mut w = FdtWriter::new();
    w.begin("").prop("x", &[]).end();
    let mut blob = w.build();
    let strings = get_word(&blob, OFF_DT_STRINGS) as usize;
    blob[strings + 1] = b'y'; // "x\0" -> "xy": unterminated
    assert!(matches!(check_err(&blob), DtError::BadPropertyName { why, .. } if why.contains("NUL")));
    blob[strings] = 0xff;
    blob[strings + 1] = 0;
    assert!(matches!(check_err(&blob), DtError::BadPropertyName { why: "is not UTF-8", .. }));
    blob[strings] = 0;
    assert!(matches!(check_err(&blob), DtError::BadPropertyName { why: "is empty", .. }));

    let mut w = FdtWriter::new();
    w.prop_u32("a", 1).begin("").end();
    assert_eq!(err(&w), DtError::PropertyOutsideNode { offset: base });

    let mut w = FdtWriter::new();
    w.begin("").begin("child").end().prop_u32("late", 1).end();
    assert!(matches!(err(&w), DtError::PropertyAfterChild { .. }));

    let mut w = FdtWriter::new();
    w.begin("").end().end();
    assert_eq!(err(&w), DtError::UnbalancedEndNode { offset: base + 12 });

    let mut w = FdtWriter::new();
    w.begin("").end().begin("").end();
    assert_eq!(err(&w), DtError::SecondRoot { offset: base + 12 });

    let mut w = FdtWriter::new();
    w.nop();
    assert_eq!(err(&w), DtError::NoRoot);

    let mut w = FdtWriter::new();
    w.begin("").begin("open");
    assert_eq!(err(&w), DtError::EndInsideNode { offset: base + 20, open: 2 });

    let mut w = FdtWriter::new();
    w.begin("").end().without_end();
    assert_eq!(err(&w), DtError::NoEnd);

    let mut w = FdtWriter::new();
    w.begin("").end();
    let mut blob = w.build();
    // Grow the struct block by one NOP word after END (steal it from nothing: append).
    let size = get_word(&blob, OFF_SIZE_DT_STRUCT);
    let strings = get_word(&blob, OFF_DT_STRINGS) as usize;
    blob.splice(strings..strings, 4u32.to_be_bytes());
    set_word(&mut blob, OFF_SIZE_DT_STRUCT, size + 4);
    set_word(&mut blob, OFF_DT_STRINGS, strings as u32 + 4);
    let total = blob.len() as u32;
    set_word(&mut blob, OFF_TOTALSIZE, total);
    assert_eq!(check_err(&blob), DtError::DataAfterEnd { offset: strings as u32 });

    let mut w = FdtWriter::new();
    w.begin("").prop("v", &[0; 8]).end();
    let mut blob = w.build();
    set_word(&mut blob, base as usize + 12, 0x40); // the PROP's length (after BEGIN_NODE "" and the tag)
    assert!(matches!(check_err(&blob), DtError::PropertyBeyondStruct { len: 0x40, .. }));

    // A node name running to the end of the struct block.
    let mut w = FdtWriter::new();
    w.begin("").raw_word(1).raw_word(0x6161_6161).without_end();
    assert!(matches!(err(&w), DtError::NodeNameUnterminated { .. }));

    // The struct block ending in the middle of a PROP header.
    let mut w = FdtWriter::new();
    w.begin("").raw_word(3).raw_word(0).without_end();
    assert!(matches!(err(&w), DtError::TruncatedToken { .. }));
}

#[test]
fn nesting_is_limited() {
    let mut ok = FdtWriter::new();
    ok.begin("");
    for _ in 1..MAX_DEPTH {
        ok.begin("n");
    }
    for _ in 0..MAX_DEPTH {
        ok.end();
    }
    let blob = ok.build();
    let tree = check(&blob).unwrap().tree();
    let deepest = tree.nodes().last().unwrap();
    assert_eq!(deepest.depth(), MAX_DEPTH - 1);
    assert_eq!(deepest.path().to_string(), "/n".repeat(MAX_DEPTH - 1));

    let mut deep = FdtWriter::new();
    deep.begin("");
    for _ in 0..MAX_DEPTH {
        deep.begin("n");
    }
    for _ in 0..=MAX_DEPTH {
        deep.end();
    }
    assert!(matches!(check_err(&deep.build()), DtError::TooDeep { max: MAX_DEPTH, .. }));
}

/// NOPs may sit anywhere between tokens (fdt 0.1.5 panics on several of these placements).
#[test]
fn nops_anywhere_are_harmless() {
    let mut w = FdtWriter::new();
    w.nop().begin("").nop().prop_u32("#address-cells", 2).nop().prop_u32("#size-cells", 2).nop();
    w.begin("memory@40000000").nop().prop_str("device_type", "memory").nop();
    w.reg64("reg", &[(0x4000_0000, 0x1000_0000)]).nop().end().nop();
    w.begin("cpus").prop_u32("#address-cells", 1).nop().begin("cpu@0").prop_u32("reg", 0).end();
    w.nop().begin("cpu@1").nop().prop_u32("reg", 1).nop().end().nop().end();
    w.nop().end().nop().nop();
    let blob = w.build();
    let p = parse(&blob).unwrap();
    assert_eq!(p.memory(), &[r(0x4000_0000, 0x1000_0000)]);
    assert_eq!(mpidrs(&p), vec![0, 1]);
    assert_eq!(exercise(&blob), Outcome::Mapped);
}

// ---------------------------------------------------------------------------------------------
// Content errors
// ---------------------------------------------------------------------------------------------

/// A platform tree with `edit` applied to the written blob's builder before the root closes.
fn tree_with(root_props: &[(&str, u32)], body: impl FnOnce(&mut FdtWriter)) -> Vec<u8> {
    let mut w = FdtWriter::new();
    w.begin("");
    for (name, v) in root_props {
        w.prop_u32(name, *v);
    }
    body(&mut w);
    w.end();
    w.build()
}

fn cpus(w: &mut FdtWriter) {
    w.begin("cpus").prop_u32("#address-cells", 1).prop_u32("#size-cells", 0);
    w.begin("cpu@0").prop_u32("reg", 0).end().end();
}

fn memory(w: &mut FdtWriter) {
    w.begin("memory@40000000").prop_str("device_type", "memory");
    w.reg64("reg", &[(0x4000_0000, 0x1000_0000)]).end();
}

const CELLS22: [(&str, u32); 2] = [("#address-cells", 2), ("#size-cells", 2)];

fn parse_err(blob: &[u8]) -> String {
    match parse(blob) {
        Ok(_) => panic!("parse accepted it"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn required_nodes() {
    assert_eq!(parse(&tree_with(&CELLS22, cpus)).unwrap_err(), DtError::NoMemory);
    assert_eq!(parse(&tree_with(&CELLS22, memory)).unwrap_err(), DtError::NoCpusNode);
    let empty_cpus = tree_with(&CELLS22, |w| {
        memory(w);
        w.begin("cpus").prop_u32("#address-cells", 1).begin("cpu-map").end().end();
    });
    assert_eq!(parse(&empty_cpus).unwrap_err(), DtError::NoCpuNodes);
    // A memory node that is disabled, or has only empty banks, describes no RAM.
    let disabled = tree_with(&CELLS22, |w| {
        cpus(w);
        w.begin("memory@0").prop_str("device_type", "memory").prop_str("status", "disabled");
        w.reg64("reg", &[(0x4000_0000, 0x1000_0000)]).end();
    });
    assert_eq!(parse(&disabled).unwrap_err(), DtError::NoMemory);
    let zero = tree_with(&CELLS22, |w| {
        cpus(w);
        w.begin("memory@0").prop_str("device_type", "memory").reg64("reg", &[(0x4000_0000, 0)]).end();
    });
    assert_eq!(parse(&zero).unwrap_err(), DtError::NoMemory);
    // Minimal but complete: no PSCI, UART, GIC or /chosen is fine.
    let blob = tree_with(&CELLS22, |w| {
        memory(w);
        cpus(w);
    });
    let p = parse(&blob).unwrap();
    assert_eq!((p.psci(), p.uart(), p.gic(), p.bootargs()), (None, None, None, None));
}

#[test]
fn memory_reg_errors() {
    let bad_len = tree_with(&CELLS22, |w| {
        cpus(w);
        w.begin("memory@40000000")
            .prop_str("device_type", "memory")
            .prop_cells("reg", &[0, 0x4000_0000, 0])
            .end();
    });
    assert_eq!(parse_err(&bad_len), "/memory@40000000: reg length 12 not a multiple of 16");

    let overflow = tree_with(&CELLS22, |w| {
        cpus(w);
        w.begin("memory@0")
            .prop_str("device_type", "memory")
            .reg64("reg", &[(u64::MAX - 0xfff, 0x2000)])
            .end();
    });
    assert!(matches!(
        parse(&overflow).unwrap_err(),
        DtError::Property { prop: "reg", problem: Problem::Overflow { .. }, .. }
    ));

    let missing = tree_with(&CELLS22, |w| {
        cpus(w);
        w.begin("memory@0").prop_str("device_type", "memory").end();
    });
    assert_eq!(parse_err(&missing), "/memory@0: reg is missing");

    // Root cell sizes: 3 address cells cannot be a physical address here.
    let three = tree_with(&[("#address-cells", 3), ("#size-cells", 2)], |w| {
        cpus(w);
        memory(w);
    });
    assert_eq!(parse_err(&three), "/: #address-cells = 3 is not supported (expected 1 to 2)");
    let wide = tree_with(&[], |w| {
        w.prop("#address-cells", &[0, 0, 0, 2, 0, 0, 0, 0]);
        cpus(w);
        memory(w);
    });
    assert_eq!(parse_err(&wide), "/: #address-cells is 8 bytes, expected 4");
}

#[test]
fn missing_root_cells_default_to_two_and_one() {
    let blob = tree_with(&[], |w| {
        cpus(w);
        w.begin("memory@40000000").prop_str("device_type", "memory");
        w.prop_cells("reg", &[0, 0x4000_0000, 0x1000_0000, 0x1, 0x0, 0x1000_0000]).end();
    });
    let p = parse(&blob).unwrap();
    assert_eq!(p.memory(), &[r(0x4000_0000, 0x1000_0000), r(0x1_0000_0000, 0x1000_0000)]);
}

#[test]
fn one_cell_roots_and_multiple_memory_nodes() {
    let blob = tree_with(&[("#address-cells", 1), ("#size-cells", 1)], |w| {
        cpus(w);
        w.begin("memory@40000000")
            .prop_str("device_type", "memory")
            .prop_cells("reg", &[0x4000_0000, 0x100_0000])
            .end();
        w.begin("memory@50000000").prop_str("device_type", "memory");
        w.prop_cells("reg", &[0x5000_0000, 0x100_0000, 0x6000_0000, 0x100_0000]).end();
        // Not RAM: no device_type.
        w.begin("memory@70000000").prop_cells("reg", &[0x7000_0000, 0x100_0000]).end();
    });
    let p = parse(&blob).unwrap();
    assert_eq!(
        p.memory(),
        &[r(0x4000_0000, 0x100_0000), r(0x5000_0000, 0x100_0000), r(0x6000_0000, 0x100_0000)]
    );
}

#[test]
fn cpu_errors() {
    let with_cpus = |cells: u32, cpus: &[&[u32]]| {
        tree_with(&CELLS22, |w| {
            memory(w);
            w.begin("cpus").prop_u32("#address-cells", cells);
            for (i, reg) in cpus.iter().enumerate() {
                w.begin(&format!("cpu@{i}")).prop_cells("reg", reg).end();
            }
            w.end();
        })
    };
    assert_eq!(
        parse_err(&with_cpus(3, &[&[0, 0, 0]])),
        "/cpus: #address-cells = 3 is not supported (expected 1 to 2)"
    );
    assert_eq!(parse_err(&with_cpus(1, &[&[0, 1]])), "/cpus/cpu@0: reg is 8 bytes, expected 4");
    assert_eq!(parse_err(&with_cpus(2, &[&[1]])), "/cpus/cpu@0: reg is 4 bytes, expected 8");
    assert_eq!(parse_err(&with_cpus(1, &[&[0], &[0]])), "/cpus/cpu@1: reg 0x0 is used by two CPUs");
    assert!(parse_err(&with_cpus(1, &[&[0x0100_0000]])).contains("outside the MPIDR affinity fields"));
    assert!(parse_err(&with_cpus(2, &[&[0x100, 0]])).contains("outside the MPIDR affinity fields"));
    let blob = with_cpus(2, &[&[0xff, 0xff_ffff]]);
    let p = parse(&blob).unwrap();
    assert_eq!(mpidrs(&p), vec![0xff_00ff_ffff]);
    let no_reg = tree_with(&CELLS22, |w| {
        memory(w);
        w.begin("cpus").prop_u32("#address-cells", 1).begin("cpu@0").end().end();
    });
    assert_eq!(parse_err(&no_reg), "/cpus/cpu@0: reg is missing");
    let too_many = with_cpus(
        1,
        &(0..=MAX_CPUS as u32)
            .map(|i| vec![i])
            .collect::<Vec<_>>()
            .iter()
            .map(|v| v.as_slice())
            .collect::<Vec<_>>(),
    );
    assert_eq!(parse(&too_many).unwrap_err(), DtError::TooMany { what: "CPUs", max: MAX_CPUS });
}

#[test]
fn psci_variants() {
    let with_psci = |body: &dyn Fn(&mut FdtWriter)| {
        tree_with(&CELLS22, |w| {
            memory(w);
            cpus(w);
            w.begin("psci");
            body(w);
            w.end();
        })
    };
    let blob = with_psci(&|w| {
        w.prop_strs("compatible", &["arm,psci-0.2", "arm,psci"]).prop_str("method", "hvc");
    });
    let p = parse(&blob).unwrap();
    assert_eq!(
        p.psci(),
        Some(Psci { conduit: Conduit::Hvc, version: PsciVersion::V0_2, cpu_on: Some(PSCI_CPU_ON_64) })
    );
    let blob = with_psci(&|w| {
        w.prop_str("compatible", "arm,psci").prop_str("method", "smc");
    });
    let p = parse(&blob).unwrap();
    assert_eq!(p.psci(), Some(Psci { conduit: Conduit::Smc, version: PsciVersion::V0_1, cpu_on: None }));
    assert_eq!(
        parse_err(&with_psci(&|w| {
            w.prop_str("compatible", "arm,psci-1.0").prop_str("method", "svc");
        })),
        "/psci: method must be \"smc\" or \"hvc\""
    );
    assert_eq!(
        parse_err(&with_psci(&|w| {
            w.prop_str("compatible", "arm,psci-1.0");
        })),
        "/psci: method is missing"
    );
    assert_eq!(
        parse_err(&with_psci(&|w| {
            w.prop_str("method", "smc").prop("cpu_on", &[1, 2]);
        })),
        "/psci: cpu_on is 2 bytes, expected 4"
    );
    assert_eq!(
        parse_err(&with_psci(&|w| {
            w.prop("method", b"smc");
        })),
        "/psci: method is not a NUL-terminated UTF-8 string"
    );
}

#[test]
fn uart_selection_and_errors() {
    let uart = |w: &mut FdtWriter, name: &str, base: u64| {
        w.begin(name).prop_str("compatible", "arm,pl011").reg64("reg", &[(base, 0x1000)]).end();
    };
    let with = |stdout: Option<&str>, aliases: &[(&str, &str)]| {
        tree_with(&CELLS22, |w| {
            memory(w);
            cpus(w);
            uart(w, "serial@1000", 0x1000);
            uart(w, "serial@2000", 0x2000);
            w.begin("other@3000").prop_str("compatible", "ns16550a").reg64("reg", &[(0x3000, 0x100)]).end();
            w.begin("aliases");
            for (k, v) in aliases {
                w.prop_str(k, v);
            }
            w.end();
            w.begin("chosen");
            if let Some(s) = stdout {
                w.prop_str("stdout-path", s);
            }
            w.end();
        })
    };
    let base = |b: &[u8]| {
        let p = parse(b).unwrap();
        let u = p.uart().unwrap();
        (u.region.base(), u.is_stdout)
    };
    assert_eq!(base(&with(None, &[])), (0x1000, false));
    assert_eq!(base(&with(Some("/serial@2000"), &[])), (0x2000, true));
    assert_eq!(base(&with(Some("/serial@2000:115200n8"), &[])), (0x2000, true));
    assert_eq!(base(&with(Some("serial1"), &[("serial1", "/serial@2000")])), (0x2000, true));
    // Not a PL011, unknown, or an alias naming itself: fall back to the first PL011, no loop.
    assert_eq!(base(&with(Some("/other@3000"), &[])), (0x1000, false));
    assert_eq!(base(&with(Some("/nowhere"), &[])), (0x1000, false));
    assert_eq!(base(&with(Some("serial0"), &[("serial0", "serial0")])), (0x1000, false));
    assert_eq!(base(&with(Some("/serial0"), &[("/serial0", "/serial0")])), (0x1000, false));

    let broken = tree_with(&CELLS22, |w| {
        memory(w);
        cpus(w);
        w.begin("serial@0").prop_str("compatible", "arm,pl011").prop_cells("reg", &[0, 0x1000]).end();
    });
    assert_eq!(parse_err(&broken), "/serial@0: reg length 8 not a multiple of 16");
    let empty = tree_with(&CELLS22, |w| {
        memory(w);
        cpus(w);
        w.begin("serial@0").prop_str("compatible", "arm,pl011").prop("reg", &[]).end();
    });
    assert_eq!(parse_err(&empty), "/serial@0: reg is empty");
    // Behind a bus with no `ranges`, the address means nothing to the CPU.
    let unmapped = tree_with(&CELLS22, |w| {
        memory(w);
        cpus(w);
        w.begin("bus").prop_u32("#address-cells", 1).prop_u32("#size-cells", 1);
        w.begin("serial@0").prop_str("compatible", "arm,pl011").prop_cells("reg", &[0x100, 0x100]).end();
        w.end();
    });
    assert_eq!(
        parse_err(&unmapped),
        "/bus/serial@0: reg address 0x100 is not mapped by the parent buses' ranges"
    );
    // A window too small for the device.
    let outside = tree_with(&CELLS22, |w| {
        memory(w);
        cpus(w);
        w.begin("bus").prop_u32("#address-cells", 1).prop_u32("#size-cells", 1);
        w.prop_cells("ranges", &[0, 0, 0x1000_0000, 0x180]);
        w.begin("serial@100").prop_str("compatible", "arm,pl011").prop_cells("reg", &[0x100, 0x100]).end();
        w.end();
    });
    assert!(parse_err(&outside).contains("not mapped"));
    let malformed_ranges = tree_with(&CELLS22, |w| {
        memory(w);
        cpus(w);
        w.begin("bus").prop_u32("#address-cells", 1).prop_u32("#size-cells", 1);
        w.prop_cells("ranges", &[0, 0, 0x1000_0000]);
        w.begin("serial@100").prop_str("compatible", "arm,pl011").prop_cells("reg", &[0x100, 0x100]).end();
        w.end();
    });
    assert_eq!(parse_err(&malformed_ranges), "/bus: ranges length 12 not a multiple of 16");
}

#[test]
fn gic_errors() {
    let gic = |compatible: &str, extra: &dyn Fn(&mut FdtWriter), regs: &[(u64, u64)]| {
        tree_with(&CELLS22, |w| {
            memory(w);
            cpus(w);
            w.begin("intc@8000000").prop_str("compatible", compatible);
            extra(w);
            w.reg64("reg", regs).end();
        })
    };
    let none = |_: &mut FdtWriter| {};
    assert_eq!(
        parse_err(&gic("arm,gic-v3", &none, &[(0x800_0000, 0x1_0000)])),
        "/intc@8000000: reg has 1 entries, needs at least 2"
    );
    assert_eq!(
        parse_err(&gic("arm,gic-400", &none, &[(0x800_0000, 0x1000)])),
        "/intc@8000000: reg has 1 entries, needs at least 2"
    );
    assert_eq!(
        parse_err(&gic(
            "arm,gic-v3",
            &|w| {
                w.prop_u32("#redistributor-regions", 0);
            },
            &[(0x800_0000, 0x1_0000), (0x80a_0000, 0x2_0000)]
        )),
        "/intc@8000000: #redistributor-regions must be at least 1"
    );
    assert_eq!(
        parse(&gic(
            "arm,gic-v3",
            &|w| {
                w.prop_u32("#redistributor-regions", 9);
            },
            &[(0x800_0000, 0x1_0000)]
        ))
        .unwrap_err(),
        DtError::TooMany { what: "GIC redistributor regions", max: MAX_REDISTRIBUTORS }
    );
    assert_eq!(
        parse_err(&gic(
            "arm,gic-v3",
            &|w| {
                w.prop_u32("#redistributor-regions", 2);
            },
            &[(0x800_0000, 0x1_0000), (0x80a_0000, 0x2_0000)]
        )),
        "/intc@8000000: reg has 2 entries, needs at least 3"
    );
    assert!(parse_err(&gic("arm,gic-v3", &none, &[(0x800_0000, 0), (0x80a_0000, 0x2_0000)]))
        .contains("has size 0"));
    let blob = gic("arm,gic-400", &none, &[(0x800_0000, 0x1000), (0x801_0000, 0x2000)]);
    let p = parse(&blob).unwrap();
    let g = p.gic().unwrap();
    assert_eq!(
        (g.version, g.cpu_interface, g.hyp_interface),
        (GicVersion::V2, Some(r(0x801_0000, 0x2000)), None)
    );
    // A disabled GIC is not used.
    let off = gic(
        "arm,gic-v3",
        &|w| {
            w.prop_str("status", "disabled");
        },
        &[(0x800_0000, 0x1_0000)],
    );
    assert_eq!(parse(&off).unwrap().gic(), None);
}

#[test]
fn chosen_strings_must_be_strings() {
    let blob = platform_blob(|w| {
        w.prop("bootargs", b"no terminator");
    });
    assert_eq!(parse_err(&blob), "/chosen: bootargs is not a NUL-terminated UTF-8 string");
    let blob = platform_blob(|w| {
        w.prop("bootargs", b"\0");
    });
    assert_eq!(parse(&blob).unwrap().bootargs(), Some(""));
}

#[test]
fn reserved_memory_and_memreserve() {
    let mut w = FdtWriter::new();
    w.memreserve(0x4000_0000, 0x1000).memreserve(0x5000_0000, 0);
    platform_tree(&mut w, |_| {});
    let mut blob = w.build();
    let p = parse(&blob).unwrap();
    assert_eq!(p.memreserve(), &[r(0x4000_0000, 0x1000)], "size-0 entries dropped");

    // /reserved-memory with one-cell children when the root has two: its own cells rule.
    let blob2 = tree_with(&CELLS22, |w| {
        memory(w);
        cpus(w);
        w.begin("reserved-memory")
            .prop_u32("#address-cells", 1)
            .prop_u32("#size-cells", 1)
            .prop_empty("ranges");
        w.begin("tee@4f000000").prop_cells("reg", &[0x4f00_0000, 0x100_0000]).prop_empty("no-map").end();
        w.begin("off@4e000000")
            .prop_cells("reg", &[0x4e00_0000, 0x1000])
            .prop_str("status", "disabled")
            .end();
        w.begin("pool").prop_cells("size", &[0x100_0000]).end();
        w.begin("bad@0").prop_cells("reg", &[0x4d00_0000]).end();
        w.end();
    });
    assert_eq!(parse_err(&blob2), "/reserved-memory/bad@0: reg length 4 not a multiple of 8");
    blob.clear();
    let blob3 = tree_with(&CELLS22, |w| {
        memory(w);
        cpus(w);
        w.begin("reserved-memory")
            .prop_u32("#address-cells", 1)
            .prop_u32("#size-cells", 1)
            .prop_empty("ranges");
        w.begin("tee@4f000000").prop_cells("reg", &[0x4f00_0000, 0x100_0000]).prop_empty("no-map").end();
        w.begin("off@4e000000")
            .prop_cells("reg", &[0x4e00_0000, 0x1000])
            .prop_str("status", "disabled")
            .end();
        w.begin("pool").prop_cells("size", &[0x100_0000]).end();
        w.end();
    });
    let p = parse(&blob3).unwrap();
    assert_eq!(
        p.reserved_memory(),
        &[ReservedMemory { name: "tee@4f000000", region: r(0x4f00_0000, 0x100_0000), no_map: true }]
    );
}

// ---------------------------------------------------------------------------------------------
// Guests
// ---------------------------------------------------------------------------------------------

/// A platform whose /chosen holds one guest `g` written by `body`.
fn guest_blob(body: impl FnOnce(&mut FdtWriter)) -> Vec<u8> {
    platform_blob(|w| {
        w.begin("g").prop_str("compatible", "labyrinth,guest");
        body(w);
        w.end();
    })
}

fn kernel(w: &mut FdtWriter, base: u64) {
    w.begin(&format!("module@{base:x}")).prop_strs("compatible", &["multiboot,kernel", "multiboot,module"]);
    w.reg64("reg", &[(base, 0x10_0000)]).end();
}

fn guest_problem(blob: &[u8]) -> GuestProblem<'_> {
    let p = parse(blob).expect("a bad guest never fails the parse");
    assert_eq!(p.guests().len(), 1);
    p.guests()[0].expect_err("guest accepted").problem
}

fn memory_and_cpus(w: &mut FdtWriter) {
    w.prop_cells("memory", &[0, 0x1_0000]).prop_u32("cpus", 1);
}

/// A guest node's cell sizes (one or two cells each), memory, CPUs and kernel module.
fn cells_memory_and_kernel(w: &mut FdtWriter, one_cell: bool) {
    let cells = if one_cell { 1 } else { 2 };
    w.prop_u32("#address-cells", cells).prop_u32("#size-cells", cells);
    memory_and_cpus(w);
    w.begin("module@48000000").prop_strs("compatible", &["multiboot,kernel", "multiboot,module"]);
    if one_cell {
        w.prop_cells("reg", &[0x4800_0000, 0x10_0000]).end();
    } else {
        w.reg64("reg", &[(0x4800_0000, 0x10_0000)]).end();
    }
}

#[test]
fn guest_property_errors() {
    assert_eq!(
        guest_problem(&guest_blob(|w| {
            w.prop_u32("cpus", 1);
            kernel(w, 0x4800_0000);
        })),
        GuestProblem::MissingMemory
    );
    assert_eq!(
        guest_problem(&guest_blob(|w| {
            w.prop_cells("memory", &[0, 0]).prop_u32("cpus", 1);
            kernel(w, 0x4800_0000);
        })),
        GuestProblem::ZeroMemory
    );
    assert_eq!(
        guest_problem(&guest_blob(|w| {
            w.prop_cells("memory", &[0x40_0000, 0]).prop_u32("cpus", 1);
            kernel(w, 0x4800_0000);
        })),
        GuestProblem::MemoryTooLarge { kib: 0x40_0000_0000_0000 }
    );
    assert_eq!(
        guest_problem(&guest_blob(|w| {
            w.prop_cells("memory", &[0, 0x1_0000]);
            kernel(w, 0x4800_0000);
        })),
        GuestProblem::MissingCpus
    );
    assert_eq!(
        guest_problem(&guest_blob(|w| {
            w.prop_cells("memory", &[0, 0x1_0000]).prop_cells("cpus", &[0, 1]);
            kernel(w, 0x4800_0000);
        })),
        GuestProblem::BadCpus { len: 8 }
    );
    assert_eq!(guest_problem(&guest_blob(memory_and_cpus)), GuestProblem::NoKernel);
    assert_eq!(
        guest_problem(&guest_blob(|w| {
            memory_and_cpus(w);
            kernel(w, 0x4800_0000);
            kernel(w, 0x4900_0000);
        })),
        GuestProblem::DuplicateModule { kind: ModuleKind::Kernel, node: "module@49000000" }
    );
    assert_eq!(
        guest_problem(&guest_blob(|w| {
            memory_and_cpus(w);
            kernel(w, 0x4800_0000);
            w.begin("module@1")
                .prop_str("compatible", "multiboot,module")
                .reg64("reg", &[(0x4900_0000, 0x1000)])
                .end();
        })),
        GuestProblem::UnknownModule { node: "module@1" }
    );
    assert_eq!(
        guest_problem(&guest_blob(|w| {
            memory_and_cpus(w);
            w.begin("k")
                .prop_str("compatible", "multiboot,kernel")
                .reg64("reg", &[(0x4800_0000, 0x1000), (0x4900_0000, 0x1000)])
                .end();
        })),
        GuestProblem::BadModuleReg { node: "k", problem: Problem::WrongLength { len: 32, expected: 16 } }
    );
    assert_eq!(
        guest_problem(&guest_blob(|w| {
            memory_and_cpus(w);
            w.begin("k").prop_str("compatible", "multiboot,kernel").reg64("reg", &[(0x4800_0000, 0)]).end();
        })),
        GuestProblem::BadModuleReg { node: "k", problem: Problem::ZeroSize { address: 0x4800_0000 } }
    );
    assert_eq!(
        guest_problem(&guest_blob(|w| {
            memory_and_cpus(w);
            w.begin("k").prop_str("compatible", "multiboot,kernel").reg64("reg", &[(u64::MAX, 2)]).end();
        })),
        GuestProblem::BadModuleReg { node: "k", problem: Problem::Overflow { address: u64::MAX, size: 2 } }
    );
    assert_eq!(
        guest_problem(&guest_blob(|w| {
            memory_and_cpus(w);
            w.begin("k").prop_str("compatible", "multiboot,kernel").end();
        })),
        GuestProblem::BadModuleReg { node: "k", problem: Problem::Missing }
    );
    assert_eq!(
        guest_problem(&guest_blob(|w| {
            memory_and_cpus(w);
            w.begin("k").prop_str("compatible", "multiboot,kernel").reg64("reg", &[(0x4800_0000, 0x1000)]);
            w.prop("bootargs", b"x").end();
        })),
        GuestProblem::BadBootargs { node: "k" }
    );
    assert_eq!(
        guest_problem(&guest_blob(|w| {
            memory_and_cpus(w);
            w.prop("bootargs", &[0xff, 0]);
            kernel(w, 0x4800_0000);
        })),
        GuestProblem::BadBootargs { node: "g" }
    );
    assert_eq!(
        guest_problem(&guest_blob(|w| {
            memory_and_cpus(w);
            w.prop_u32("#address-cells", 3);
            kernel(w, 0x4800_0000);
        })),
        GuestProblem::BadCells {
            prop: "#address-cells",
            problem: Problem::UnsupportedCells { value: 3, min: 1, max: 2 }
        }
    );
    let blob = guest_blob(memory_and_cpus);
    let e = parse(&blob).unwrap().guests()[0].unwrap_err();
    assert_eq!(e.to_string(), "guest g: no kernel module (a child compatible with \"multiboot,kernel\")");
}

#[test]
fn guest_module_cells_default_to_the_roots() {
    // The platform root has 2/2 cells; a guest with only #size-cells = 1 reads 2+1 cells.
    let blob = guest_blob(|w| {
        memory_and_cpus(w);
        w.prop_u32("#size-cells", 1);
        w.begin("k")
            .prop_str("compatible", "multiboot,kernel")
            .prop_cells("reg", &[0, 0x4800_0000, 0x2000])
            .end();
        w.begin("other").prop_str("compatible", "vendor,thing").end();
        w.begin("plain").end();
    });
    let p = parse(&blob).unwrap();
    let g = p.guests()[0].unwrap();
    assert_eq!(g.kernel.region, r(0x4800_0000, 0x2000));
    assert_eq!(g.modules().count(), 1);
    assert_eq!(g.bootargs, None);
}

#[test]
fn guests_beyond_the_table_are_counted_not_dropped_silently() {
    let blob = platform_blob(|w| {
        for i in 0..MAX_GUESTS + 2 {
            w.begin(&format!("vm{i}")).prop_str("compatible", "xen,domain");
            memory_and_cpus(w);
            kernel(w, 0x4800_0000 + i as u64 * 0x20_0000);
            w.end();
        }
        // Not guests.
        w.begin("module@0").prop_str("compatible", "multiboot,kernel").end();
    });
    let p = parse(&blob).unwrap();
    assert_eq!(p.guests().len(), MAX_GUESTS);
    assert_eq!(p.guests_skipped(), 2);
    assert!(p.guests().iter().all(|g| g.is_ok()));
    assert_eq!(exercise(&blob), Outcome::Mapped);
}

#[test]
fn a_bad_guest_does_not_hide_the_good_ones() {
    let blob = platform_blob(|w| {
        w.begin("good").prop_str("compatible", "labyrinth,guest");
        memory_and_cpus(w);
        kernel(w, 0x4800_0000);
        w.end();
        w.begin("bad").prop_str("compatible", "labyrinth,guest").end();
    });
    let p = parse(&blob).unwrap();
    assert_eq!(p.guests()[0].unwrap().name, "good");
    assert_eq!(p.guests()[1].unwrap_err(), GuestError { guest: "bad", problem: GuestProblem::MissingMemory });
    // Only the good guest's modules are reserved.
    let res = platform_reservations(&p).unwrap();
    assert_eq!(res.len(), 1);
}

/// The guest node the Xen dom0less documentation shows, as a new user writes it for Linux on two
/// vCPUs: no Labyrinth property. It gets its two vCPUs and a virtual GIC.
#[test]
fn a_xen_dom0less_node_with_two_vcpus_needs_no_vendor_property() {
    let blob = platform_blob(|w| {
        w.begin("domU1").prop_str("compatible", "xen,domain");
        w.prop_u32("#address-cells", 1).prop_u32("#size-cells", 1);
        w.prop_cells("memory", &[0, 0x4_0000]).prop_u32("cpus", 2);
        w.prop_str("bootargs", "console=ttyAMA0 rdinit=/init");
        w.begin("module@42000000").prop_strs("compatible", &["multiboot,kernel", "multiboot,module"]);
        w.prop_cells("reg", &[0x4200_0000, 0x200_0000]).end();
        w.begin("module@44000000").prop_strs("compatible", &["multiboot,ramdisk", "multiboot,module"]);
        w.prop_cells("reg", &[0x4400_0000, 0x10_0000]).end();
        w.end();
    });
    let p = parse(&blob).unwrap();
    let g = p.guests()[0].unwrap();
    assert_eq!(g.cpus, 2);
    assert!(g.virtual_gic);
    assert_eq!(g.bootargs, Some("console=ttyAMA0 rdinit=/init"));
    assert_eq!(g.kernel.region, r(0x4200_0000, 32 * MIB));
    assert_eq!(g.ramdisk.map(|m| m.region), Some(r(0x4400_0000, MIB)));
    assert_eq!(g.validate(2, 40), Ok(()));
    assert_eq!(g.physical_cpus(0, 4), Ok(0..2));
    assert_eq!(exercise(&blob), Outcome::Mapped);
}

fn gic_of(body: impl FnOnce(&mut FdtWriter)) -> Result<bool, GuestProblem<'static>> {
    let blob = guest_blob(|w| {
        memory_and_cpus(w);
        body(w);
        kernel(w, 0x4800_0000);
    });
    let p = parse(&blob).unwrap();
    p.guests()[0].map(|g| g.virtual_gic).map_err(|e| match e.problem {
        GuestProblem::ConflictingGic => GuestProblem::ConflictingGic,
        other => panic!("{other:?}"),
    })
}

#[test]
fn every_guest_gets_a_virtual_gic_unless_it_opts_out() {
    assert_eq!(gic_of(|_| {}), Ok(true), "the default");
    assert_eq!(
        gic_of(|w| {
            w.prop_empty("labyrinth,virtual-gic");
        }),
        Ok(true),
        "still accepted"
    );
    assert_eq!(
        gic_of(|w| {
            w.prop_empty("labyrinth,no-virtual-gic");
        }),
        Ok(false),
        "the opt-out"
    );
    assert_eq!(
        gic_of(|w| {
            w.prop_empty("labyrinth,virtual-gic").prop_empty("labyrinth,no-virtual-gic");
        }),
        Err(GuestProblem::ConflictingGic)
    );
    let blob = guest_blob(|w| {
        memory_and_cpus(w);
        w.prop_empty("labyrinth,no-virtual-gic").prop_empty("labyrinth,virtual-gic");
        kernel(w, 0x4800_0000);
    });
    assert_eq!(
        parse(&blob).unwrap().guests()[0].unwrap_err().to_string(),
        "guest g: both labyrinth,virtual-gic and labyrinth,no-virtual-gic are present"
    );
}

#[test]
fn vcpu_counts_up_to_the_limit_are_accepted() {
    let with_cpus = |n: u32| {
        guest_blob(|w| {
            w.prop_cells("memory", &[0, 0x1_0000]).prop_u32("cpus", n);
            kernel(w, 0x4800_0000);
        })
    };
    let blob = with_cpus(MAX_VCPUS as u32);
    assert_eq!(parse(&blob).unwrap().guests()[0].unwrap().cpus, 16);
    let blob = with_cpus(MAX_VCPUS as u32 + 1);
    assert_eq!(guest_problem(&blob), GuestProblem::VcpusAboveLimit { cpus: 17 });
    assert_eq!(
        parse(&blob).unwrap().guests()[0].unwrap_err().to_string(),
        "guest g: cpus = 17: a guest has at most 16 vCPUs"
    );
    assert_eq!(guest_problem(&with_cpus(u32::MAX)), GuestProblem::VcpusAboveLimit { cpus: u32::MAX });
}

/// Guests take physical CPUs in configuration order, each as many as it has vCPUs.
#[test]
fn physical_cpus_are_taken_in_order_and_a_guest_that_does_not_fit_is_named() {
    let blob = guest_blob(|w| {
        w.prop_cells("memory", &[0, 0x1_0000]).prop_u32("cpus", 2);
        kernel(w, 0x4800_0000);
    });
    let p = parse(&blob).unwrap();
    let g = p.guests()[0].unwrap();
    // (first free CPU, physical CPUs) -> the range, or how many were left.
    let cases: [(usize, usize, Result<core::ops::Range<usize>, usize>); 7] = [
        (0, 2, Ok(0..2)),
        (0, 4, Ok(0..2)),
        (2, 4, Ok(2..4)),
        (3, 4, Err(1)),
        (4, 4, Err(0)),
        (9, 4, Err(0)),
        (0, 1, Err(1)),
    ];
    for (first, phys, want) in cases {
        let got = g.physical_cpus(first, phys).map_err(|e| match e.problem {
            GuestProblem::NotEnoughCpus { cpus: 2, left, phys: p } if p == phys => left,
            other => panic!("{other:?}"),
        });
        assert_eq!(got, want, "first free {first} of {phys}");
    }
    assert_eq!(
        g.physical_cpus(3, 4).unwrap_err().to_string(),
        "guest g: cpus = 2 but 1 of the 4 physical CPUs is left (each vCPU takes one, in configuration order)"
    );
    assert_eq!(
        g.validate(1, 40).unwrap_err().to_string(),
        "guest g: cpus = 2 but the machine has 1 physical CPU"
    );
}

#[test]
fn a_guaranteed_floor_is_at_most_the_guests_memory() {
    let floor_of = |cells: &[u32]| {
        let blob = guest_blob(|w| {
            memory_and_cpus(w);
            w.prop_cells("labyrinth,guaranteed-memory", cells);
            kernel(w, 0x4800_0000);
        });
        parse(&blob).unwrap().guests()[0].map(|g| g.guaranteed_kib).map_err(|e| e.to_string())
    };
    assert_eq!(floor_of(&[0, 0x4000]), Ok(Some(0x4000)));
    assert_eq!(floor_of(&[0, 0x1_0000]), Ok(Some(0x1_0000)), "all of memory");
    assert_eq!(floor_of(&[0, 0]), Ok(Some(0)), "nothing guaranteed: every page best effort");
    assert_eq!(
        floor_of(&[0, 0x1_0001]),
        Err("guest g: labyrinth,guaranteed-memory 65537 KiB is more than its memory, 65536 KiB".into())
    );
    assert_eq!(
        floor_of(&[0x4000]),
        Err("guest g: labyrinth,guaranteed-memory is 4 bytes, expected 8 (guaranteed RAM in KiB, 2 cells)"
            .into())
    );
    let blob = guest_blob(|w| {
        memory_and_cpus(w);
        kernel(w, 0x4800_0000);
    });
    assert_eq!(parse(&blob).unwrap().guests()[0].unwrap().guaranteed_kib, None, "the default: all of memory");
}

// ---------------------------------------------------------------------------------------------
// Static shared memory nodes (xen,domain-shared-memory-v1)
// ---------------------------------------------------------------------------------------------

/// A shared memory node named `name` with `props` written by `body`.
fn shm_node(w: &mut FdtWriter, name: &str, body: impl FnOnce(&mut FdtWriter)) {
    w.begin(name).prop_str("compatible", SHM_COMPATIBLE);
    body(w);
    w.end();
}

/// The guest `g` (root cells 2/2) with the shared memory nodes `nodes` writes.
fn shm_guest(nodes: impl FnOnce(&mut FdtWriter)) -> Vec<u8> {
    guest_blob(|w| {
        memory_and_cpus(w);
        kernel(w, 0x4800_0000);
        nodes(w);
    })
}

fn shm_of(w: &mut FdtWriter, name: &str, id: &str, role: Option<&str>, addr: u64, size: u64) {
    shm_node(w, name, |w| {
        w.prop_str("xen,shm-id", id);
        if let Some(r) = role {
            w.prop_str("role", r);
        }
        w.reg64("xen,shared-mem", &[(addr, size)]);
    });
}

// The Xen 4.19 form (guest address, size) is read with the guest node's cells; the role is
// "borrower" unless it says "owner".
#[test]
fn shared_memory_nodes_are_read() {
    let blob = shm_guest(|w| {
        shm_of(w, "shm-a", "ring", Some("owner"), 0x1000_0000, 0x20_0000);
        shm_of(w, "shm-b", "other", None, 0x2000_0000, 0x1000);
        shm_of(w, "shm-c", "third", Some("borrower"), 0x3000_0000, 0x4000);
    });
    let p = parse(&blob).unwrap();
    let g = p.guests()[0].unwrap();
    let got: Vec<_> = g.shared.iter().map(|s| (s.id, s.role, s.guest_addr, s.size, s.node)).collect();
    assert_eq!(
        got,
        vec![
            ("ring", ShmRole::Owner, 0x1000_0000, 0x20_0000, "shm-a"),
            ("other", ShmRole::Borrower, 0x2000_0000, 0x1000, "shm-b"),
            ("third", ShmRole::Borrower, 0x3000_0000, 0x4000, "shm-c"),
        ]
    );
    // One-cell guest nodes (as Xen's examples write them) work the same.
    let blob = guest_blob(|w| {
        w.prop_u32("#address-cells", 1).prop_u32("#size-cells", 1);
        memory_and_cpus(w);
        w.begin("module@48000000").prop_strs("compatible", &["multiboot,kernel", "multiboot,module"]);
        w.prop_cells("reg", &[0x4800_0000, 0x10_0000]).end();
        shm_node(w, "domU1-shared-mem-2", |w| {
            w.prop_str("xen,shm-id", "my-shared-mem-2").prop_str("role", "owner");
            w.prop_cells("xen,shared-mem", &[0x8000_0000, 0x2000_0000]);
        });
    });
    let p = parse(&blob).unwrap();
    let s = p.guests()[0].unwrap().shared[0];
    assert_eq!(
        (s.id, s.role, s.guest_addr, s.size, s.host_addr),
        ("my-shared-mem-2", ShmRole::Owner, 0x8000_0000, 0x2000_0000, None)
    );
    // Xen's older form, host address first, as Xen 4.17's example writes it (one cell each),
    // and with two cells: the host address is kept, the rest reads the same.
    for one_cell in [true, false] {
        let blob = guest_blob(|w| {
            cells_memory_and_kernel(w, one_cell);
            shm_node(w, "domU1-shared-mem@10000000", |w| {
                w.prop_str("xen,shm-id", "my-shared-mem-0").prop_str("role", "owner");
                if one_cell {
                    w.prop_cells("xen,shared-mem", &[0x5000_0000, 0x1000_0000, 0x1000_0000]);
                } else {
                    w.prop_cells("xen,shared-mem", &[0, 0x5000_0000, 0, 0x1000_0000, 0, 0x1000_0000]);
                }
            });
        });
        let p = parse(&blob).unwrap();
        let s = p.guests()[0].unwrap().shared[0];
        assert_eq!(
            (s.id, s.role, s.guest_addr, s.size, s.host_addr),
            ("my-shared-mem-0", ShmRole::Owner, 0x1000_0000, 0x1000_0000, Some(0x5000_0000))
        );
    }
}

// Every malformed node refuses its guest, naming the node and the fault.
#[test]
fn shared_memory_node_errors() {
    // Leaked: the problem borrows names from the blob.
    let bad = |body: &dyn Fn(&mut FdtWriter)| guest_problem(shm_guest(|w| shm_node(w, "s", body)).leak());
    let shm = |problem| GuestProblem::BadShm { node: "s", problem };
    assert_eq!(
        bad(&|w| {
            w.reg64("xen,shared-mem", &[(0x1000_0000, 0x1000)]);
        }),
        shm(ShmProblem::MissingId)
    );
    assert_eq!(
        bad(&|w| {
            w.prop_str("xen,shm-id", "").reg64("xen,shared-mem", &[(0x1000_0000, 0x1000)]);
        }),
        shm(ShmProblem::BadId { len: 1 })
    );
    assert_eq!(
        bad(&|w| {
            w.prop_str("xen,shm-id", "sixteen-chars-xx").reg64("xen,shared-mem", &[(0x1000_0000, 0x1000)]);
        }),
        shm(ShmProblem::BadId { len: 17 })
    );
    // Xen before 4.17 took a number: refused as not a string.
    assert_eq!(
        bad(&|w| {
            w.prop_u32("xen,shm-id", 1).reg64("xen,shared-mem", &[(0x1000_0000, 0x1000)]);
        }),
        shm(ShmProblem::BadId { len: 4 })
    );
    assert_eq!(
        bad(&|w| {
            w.prop_str("xen,shm-id", "a").prop_str("role", "lender");
            w.reg64("xen,shared-mem", &[(0x1000_0000, 0x1000)]);
        }),
        shm(ShmProblem::BadRole)
    );
    assert_eq!(
        bad(&|w| {
            w.prop_str("xen,shm-id", "a");
        }),
        shm(ShmProblem::MissingSharedMem)
    );
    assert_eq!(
        bad(&|w| {
            w.prop_str("xen,shm-id", "a").prop_cells("xen,shared-mem", &[0, 0x1000_0000, 0]);
        }),
        shm(ShmProblem::BadSharedMemLength { len: 12, expected: 16 })
    );
    // The older form, host address first: its host address is checked on its own here.
    assert_eq!(
        bad(&|w| {
            w.prop_str("xen,shm-id", "a")
                .prop_cells("xen,shared-mem", &[0, 0x5000_0800, 0, 0x1000_0000, 0, 0x1000]);
        }),
        shm(ShmProblem::HostUnaligned { host: 0x5000_0800 })
    );
    assert_eq!(
        bad(&|w| {
            w.prop_str("xen,shm-id", "a")
                .prop_cells("xen,shared-mem", &[0xffff_ffff, 0xffff_f000, 0, 0x1000_0000, 0, 0x2000]);
        }),
        shm(ShmProblem::HostOverflow { host: 0xffff_ffff_ffff_f000, size: 0x2000 })
    );
    assert_eq!(
        bad(&|w| {
            w.prop_str("xen,shm-id", "a").reg64("xen,shared-mem", &[(0x1000_0000, 0)]);
        }),
        shm(ShmProblem::ZeroSize)
    );
    assert_eq!(
        bad(&|w| {
            w.prop_str("xen,shm-id", "a").reg64("xen,shared-mem", &[(0x1000_0800, 0x1000)]);
        }),
        shm(ShmProblem::Unaligned { guest_addr: 0x1000_0800, size: 0x1000 })
    );
    assert_eq!(
        bad(&|w| {
            w.prop_str("xen,shm-id", "a").reg64("xen,shared-mem", &[(0x1000_0000, 0x1800)]);
        }),
        shm(ShmProblem::Unaligned { guest_addr: 0x1000_0000, size: 0x1800 })
    );
    assert_eq!(
        bad(&|w| {
            w.prop_str("xen,shm-id", "a").reg64("xen,shared-mem", &[(0xffff_ffff_ffff_f000, 0x2000)]);
        }),
        shm(ShmProblem::Overflow { guest_addr: 0xffff_ffff_ffff_f000, size: 0x2000 })
    );
    let blob = shm_guest(|w| {
        shm_of(w, "s", "a", Some("owner"), 0x1000_0000, 0x1000);
        shm_of(w, "t", "a", None, 0x2000_0000, 0x1000);
    });
    assert_eq!(guest_problem(&blob), GuestProblem::DuplicateShmId { id: "a", role: ShmRole::Borrower });
    let p = parse(&blob).unwrap();
    assert_eq!(
        p.guests()[0].unwrap_err().to_string(),
        "guest g: shared memory \"a\" named a second time (as borrower): a guest is the owner or a \
         borrower of a region, once"
    );
    let blob = shm_guest(|w| {
        shm_of(w, "s", "a", None, 0x1000_0000, 0x2000);
        shm_of(w, "t", "b", None, 0x1000_1000, 0x1000);
    });
    assert_eq!(guest_problem(&blob), GuestProblem::OverlappingShared { a: "s", b: "t" });
    let blob = shm_guest(|w| {
        for i in 0..=MAX_SHARED as u64 {
            shm_of(w, &format!("s{i}"), &format!("id{i}"), None, 0x1000_0000 + i * 0x1000, 0x1000);
        }
    });
    assert_eq!(guest_problem(&blob), GuestProblem::TooManyShared);
    let blob = shm_guest(|w| {
        shm_node(w, "s", |w| {
            w.prop_str("xen,shm-id", "a")
                .prop_cells("xen,shared-mem", &[0, 0x5000_0800, 0, 0x1000_0000, 0, 0x1000]);
        })
    });
    let p = parse(&blob).unwrap();
    assert_eq!(
        p.guests()[0].unwrap_err().to_string(),
        "guest g: shared memory node s: xen,shared-mem names host address 0x50000800, not 4 KiB-aligned"
    );
}

mod shm_props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        // Any id, role, cell count and values: the parser accepts exactly the well-formed
        // nodes, and an accepted node reads back what was written.
        #[test]
        fn shared_memory_parser_accepts_exactly_the_well_formed(
            id in "[a-z0-9-]{0,20}",
            role in prop_oneof![Just(None), Just(Some("owner")), Just(Some("borrower")), Just(Some("x"))],
            addr in prop_oneof![any::<u64>(), (0u64..0x10_0000).prop_map(|p| p << 12)],
            size in prop_oneof![any::<u64>(), (0u64..0x1000).prop_map(|p| p << 12)],
            one_cell in any::<bool>(),
            host in any::<bool>(),
        ) {
            let blob = guest_blob(|w| {
                cells_memory_and_kernel(w, one_cell);
                shm_node(w, "s", |w| {
                    w.prop_str("xen,shm-id", &id);
                    if let Some(r) = role {
                        w.prop_str("role", r);
                    }
                    let mut cells_of = Vec::new();
                    let mut put = |v: u64| {
                        if one_cell {
                            cells_of.push(v as u32);
                        } else {
                            cells_of.extend([(v >> 32) as u32, v as u32]);
                        }
                    };
                    if host {
                        put(0x5000_0000);
                    }
                    put(addr);
                    put(size);
                    w.prop_cells("xen,shared-mem", &cells_of);
                });
            });
            let p = parse(&blob).expect("a bad guest never fails the parse");
            let (addr, size) = if one_cell { (addr as u32 as u64, size as u32 as u64) } else { (addr, size) };
            let well_formed = !id.is_empty()
                && id.len() <= SHM_ID_MAX
                && role != Some("x")
                && (!host || 0x5000_0000u64.checked_add(size).is_some())
                && size != 0
                && addr % 4096 == 0
                && size % 4096 == 0
                && addr.checked_add(size).is_some();
            match p.guests()[0] {
                Ok(g) => {
                    prop_assert!(well_formed);
                    let s = g.shared[0];
                    prop_assert_eq!((s.id, s.guest_addr, s.size), (id.as_str(), addr, size));
                    prop_assert_eq!(s.host_addr, host.then_some(0x5000_0000));
                    prop_assert_eq!(s.role, if role == Some("owner") { ShmRole::Owner } else { ShmRole::Borrower });
                }
                Err(e) => {
                    prop_assert!(!well_formed, "refused: {}", e);
                    prop_assert!(matches!(e.problem, GuestProblem::BadShm { node: "s", .. }), "{:?}", e.problem);
                }
            }
        }
    }
}

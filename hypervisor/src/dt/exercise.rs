//! Test and fuzzing support: runs one blob through everything the boot path does with a device
//! tree (check, walk, parse, every accessor, every `Display`, guest validation, reservations,
//! memory map) and asserts the invariants that must hold whatever the input.
//!
//! Compiled only for tests and under `--cfg fuzzing` (set by cargo-fuzz), never into the
//! hypervisor. The fuzz target and the host replay of the corpus both call [`exercise`], so a
//! crash the fuzzer finds reproduces under plain `cargo test`. It must never panic on its own
//! except through an invariant assertion: any panic here is a bug in `dt` or `memmap`.

use core::fmt::{self, Write};

use super::{check, parse, total_size, Region};
use crate::memmap::{boot_reservations, MemoryMap, PAGE_SIZE};

/// A `fmt::Write` that only counts, so every `Display` runs without a heap.
struct Sink(usize);

impl Write for Sink {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0 = self.0.wrapping_add(s.len());
        Ok(())
    }
}

/// A fixed buffer that formats a node path for [`super::Tree::find`].
struct PathBuf {
    buf: [u8; 512],
    len: usize,
}

impl Write for PathBuf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len.checked_add(s.len()).ok_or(fmt::Error)?;
        self.buf.get_mut(self.len..end).ok_or(fmt::Error)?.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// What [`exercise`] saw, for tests that want to know how far a blob got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// `check` refused it.
    Refused,
    /// `check` passed, `parse` refused it.
    Unparsed,
    /// Parsed; the memory map could not be built.
    NoMap,
    /// Parsed and mapped.
    Mapped,
}

/// Runs `blob` through the whole device-tree path, including a walk of every node through
/// every navigation call; panics only if an invariant breaks.
pub fn exercise(blob: &[u8]) -> Outcome {
    let mut sink = Sink(0);
    if let Err(e) = total_size(blob) {
        let _ = write!(sink, "{e}");
    }
    if let Ok(checked) = check(blob) {
        walk(&checked, &mut sink);
    }
    parse_and_map(blob)
}

/// The boot path only (check, parse, every accessor and message, guest validation,
/// reservations, memory map), without the node-by-node walk: cheap enough for exhaustive
/// corruption loops in debug builds.
pub fn parse_and_map(blob: &[u8]) -> Outcome {
    let mut sink = Sink(0);
    let checked = match check(blob) {
        Ok(c) => c,
        Err(e) => {
            let _ = write!(sink, "{e}");
            assert!(parse(blob).is_err(), "parse accepted what check refused");
            return Outcome::Refused;
        }
    };
    assert!(checked.total_size() <= blob.len());

    let platform = match parse(blob) {
        Ok(p) => p,
        Err(e) => {
            let _ = write!(sink, "{e}");
            return Outcome::Unparsed;
        }
    };
    let _ = write!(sink, "{platform:?}");
    assert!(!platform.memory().is_empty() && !platform.cpus().is_empty());
    for guest in platform.guests() {
        match guest {
            Ok(g) => {
                let _ = write!(sink, "{g:?} {}", g.memory_bytes());
                for (phys, bits) in [(0, 0), (1, 32), (platform.cpus().len(), 40), (usize::MAX, 64), (4, 200)]
                {
                    if let Err(e) = g.validate(phys, bits) {
                        let _ = write!(sink, "{e}");
                    }
                }
                assert!(g.modules().any(|m| m.kind == super::ModuleKind::Kernel));
            }
            Err(e) => {
                let _ = write!(sink, "{e}");
            }
        }
    }
    // Shared memory across the well-formed guests: every user of a region gives its size (and
    // its host address, if any), a refused guest joins no region, a region has at most one owner.
    let configs: alloc::vec::Vec<_> =
        platform.guests().iter().filter_map(|g| g.as_ref().ok().copied()).collect();
    for bits in [32, 40, 48, 64] {
        let (regions, verdicts) = crate::vm::shm::plan(&configs, bits, platform.memory());
        assert!(regions.len() <= crate::vm::shm::MAX_REGIONS);
        for r in &regions {
            assert!(r.users.iter().all(|(g, s)| s.size == r.size && s.id == r.id && verdicts[*g].is_none()));
            // Every host address named for a region is the same one, inside host RAM.
            assert!(r.users.iter().all(|(_, s)| s.host_addr.is_none() || s.host_addr == r.host.map(|h| h.0)));
            assert!(r.host.is_none_or(|(h, _)| crate::vm::shm::in_host_ram(platform.memory(), h, r.size)));
            let owners = r.users.iter().filter(|(_, s)| s.role == super::ShmRole::Owner).count();
            assert!(owners <= 1 && (owners == 0 || r.users.iter().any(|(g, _)| Some(*g) == r.owner)));
        }
        for v in verdicts.iter().flatten() {
            let _ = write!(sink, "{v}");
        }
        let names: alloc::vec::Vec<&str> = configs.iter().map(|c| c.name).collect();
        let mut started: alloc::vec::Vec<bool> = verdicts.iter().map(Option::is_none).collect();
        for (_, r) in crate::vm::shm::refuse_orphans(&regions, &names, &mut started) {
            let _ = write!(sink, "{r}");
        }
    }

    // The boot path: the image somewhere in RAM, the blob at the start of RAM, then the map.
    let ram0 = platform.memory().first().copied().unwrap_or_default();
    let image = Region::new(ram0.base(), 0x20_0000).unwrap_or(ram0);
    let reservations = match boot_reservations(&platform, image, ram0.base()) {
        Ok(r) => r,
        Err(e) => {
            let _ = write!(sink, "{e}");
            return Outcome::NoMap;
        }
    };
    match MemoryMap::build(platform.memory(), &reservations, 0) {
        Ok(map) => {
            let _ = write!(sink, "{map}");
            let mut prev_end = 0;
            for f in map.free() {
                assert!(f.base() % PAGE_SIZE == 0 && f.end() % PAGE_SIZE == 0, "unaligned free range");
                assert!(f.base() >= prev_end, "free ranges unsorted or overlapping");
                prev_end = f.end();
                assert!(map.ram().iter().any(|b| b.contains(f)), "free range outside RAM");
                for r in reservations.iter() {
                    assert!(!f.overlaps(&r.region), "free range overlaps a reservation");
                }
            }
            assert!(map.free_bytes().saturating_add(map.reserved_bytes()) <= map.ram_bytes());
            Outcome::Mapped
        }
        Err(e) => {
            let _ = write!(sink, "{e}");
            Outcome::NoMap
        }
    }
}

/// Walks every node of a checked blob through every navigation call.
fn walk(checked: &super::Checked<'_>, sink: &mut Sink) {
    let tree = checked.tree();
    let _ = checked.memreserve().count();
    let mut nodes = 0usize;
    for node in tree.nodes() {
        nodes += 1;
        let _ = write!(sink, "{}", node.base_name());
        for p in node.properties() {
            let _ = (p.as_u32(), p.as_u64(), p.as_str(), p.strings().count());
        }
        let _ = (node.is_enabled(), node.is_compatible("arm,pl011"));
        let _ = super::prop::cells(&node).map_err(|e| write!(sink, "{e}"));
        if node.depth() > 0 {
            let _ = super::prop::device_regions(&node).map(|regs| regs.count());
        }
        for child in node.children() {
            let parent = child.parent().expect("a child has a parent");
            assert_eq!(parent.offset(), node.offset(), "child's parent differs from the node");
            assert_eq!(child.depth(), node.depth() + 1);
        }
        // Looking a node up by its own path finds it, or a node with the same path, or nothing:
        // with duplicate sibling names (which `check` does not refuse) the first one wins and
        // may lack the rest of the path.
        let mut buf = PathBuf { buf: [0; 512], len: 0 };
        if write!(buf, "{}", node.path()).is_ok() {
            if let Some(Ok(text)) = buf.buf.get(..buf.len).map(core::str::from_utf8) {
                if let Some(found) = tree.find(text) {
                    if found.offset() != node.offset() {
                        assert_eq!(found.path(), node.path(), "lookup by path found another path");
                    }
                }
            }
        }
    }
    assert!(nodes >= 1, "a checked blob has a root");
    for path in ["/", "/cpus", "/chosen", "/memory", "/aliases", "/a/b/c", "", "//", "cpus"] {
        let _ = tree.find(path).map(|n| n.name());
    }
}

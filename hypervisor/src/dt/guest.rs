//! Guest descriptions under /chosen (the dom0less-style binding Labyrinth follows).
//!
//! A guest is a child of /chosen compatible with `"labyrinth,guest"` (or Xen's `"xen,domain"`,
//! so a Xen dom0less node runs unchanged; Xen properties Labyrinth has no use for are ignored):
//!
//! ```dts
//! chosen {
//!     domU1 {
//!         compatible = "labyrinth,guest";
//!         #address-cells = <2>;            // for the modules' reg; default: the root's
//!         #size-cells = <2>;
//!         memory = <0x0 0x40000>;          // RAM in KiB, two cells
//!         cpus = <2>;                      // vCPU count, 1 to MAX_VCPUS
//!         labyrinth,no-block-mappings;     // optional: map guest RAM with 4 KiB pages only
//!         labyrinth,guaranteed-memory = <0x0 0x10000>; // optional: the floor promised, in
//!                                          // KiB (default: all of `memory`); the rest is
//!                                          // drawn, best effort, from unpromised memory
//!         labyrinth,no-virtual-gic;        // optional: no GIC and no timer interrupt (bare
//!                                          // test kernels); `labyrinth,virtual-gic` is the
//!                                          // default and accepted
//!         bootargs = "console=ttyAMA0";    // optional, overridden by the kernel module's
//!         module@48000000 {
//!             compatible = "multiboot,kernel", "multiboot,module";
//!             reg = <0x0 0x48000000 0x0 0x800000>;   // host physical address, size
//!             bootargs = "console=ttyAMA0 root=/dev/ram";
//!         };
//!         module@49000000 {
//!             compatible = "multiboot,ramdisk", "multiboot,module";
//!             reg = <0x0 0x49000000 0x0 0x200000>;
//!         };
//!         // and optionally "multiboot,device-tree"
//!     };
//! };
//! ```
//!
//! This module owns the reading of one guest node into a [`GuestConfig`] and the checks that
//! need only the node itself; [`GuestConfig::validate`] adds those that need the machine. It must
//! never fail the whole device tree because one guest is malformed: each guest gets its own
//! `Result`, with a [`GuestError`] naming the guest and the property at fault.

use core::fmt;
use core::ops::Range;

use super::error::{DtError, Problem};
use super::list::FixedList;
use super::prop::{cells_or, check_cells, str_prop, Cells};
use super::region::Region;
use super::shm::{is_shm_node, parse_shm, SharedMem, ShmProblem, ShmRole, MAX_SHARED};
use super::tree::Node;

/// Guests kept; further guest nodes are counted in `Platform::guests_skipped`.
pub const MAX_GUESTS: usize = 8;
/// Module nodes kept per guest (one of each kind at most).
pub const MAX_MODULES: usize = 4;
/// vCPUs a guest may have. vCPU `i` reads MPIDR Aff0 = `i` with the other affinity fields zero,
/// and one GICv3 SGI target list (`ICC_SGI1R_EL1.TargetList`) names Aff0 0-15 of a cluster:
/// sixteen vCPUs are what SGIs reach without range selectors.
pub const MAX_VCPUS: usize = 16;

/// What a boot module holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModuleKind {
    /// The guest kernel image (`"multiboot,kernel"`).
    Kernel,
    /// The initial ramdisk (`"multiboot,ramdisk"`).
    Ramdisk,
    /// A device tree for the guest (`"multiboot,device-tree"`).
    DeviceTree,
}

impl fmt::Display for ModuleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ModuleKind::Kernel => "kernel",
            ModuleKind::Ramdisk => "ramdisk",
            ModuleKind::DeviceTree => "device tree",
        })
    }
}

/// One boot module: an image the bootloader put in host RAM for a guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Module<'a> {
    pub kind: ModuleKind,
    /// Where the image lies in host physical memory.
    pub region: Region,
    /// The module node's name.
    pub node: &'a str,
}

/// A well-formed guest description.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestConfig<'a> {
    /// The guest node's name.
    pub name: &'a str,
    /// Guest RAM in KiB (`memory`).
    pub memory_kib: u64,
    /// vCPU count (`cpus`), 1 to [`MAX_VCPUS`].
    pub cpus: u32,
    pub kernel: Module<'a>,
    pub ramdisk: Option<Module<'a>>,
    pub device_tree: Option<Module<'a>>,
    /// The kernel module's `bootargs`, else the guest node's.
    pub bootargs: Option<&'a str>,
    /// `labyrinth,no-block-mappings` is present.
    pub no_block_mappings: bool,
    /// `labyrinth,guaranteed-memory` in KiB, at most `memory_kib`: the RAM promised to the
    /// guest at creation; `None` promises all of it.
    pub guaranteed_kib: Option<u64>,
    /// Its static shared memory nodes (`xen,domain-shared-memory-v1`), in node order: distinct
    /// ids, guest ranges that do not overlap each other.
    pub shared: FixedList<SharedMem<'a>, MAX_SHARED>,
    /// The guest gets a virtual GICv3 and the timer's interrupts (what Linux needs): every
    /// guest does unless its node says `labyrinth,no-virtual-gic`, which leaves it no
    /// interrupt controller at all.
    pub virtual_gic: bool,
}

impl<'a> GuestConfig<'a> {
    /// Guest RAM in bytes (fits in a `u64`: checked when parsed).
    pub fn memory_bytes(&self) -> u64 {
        self.memory_kib.saturating_mul(1024)
    }

    /// The kernel, then the ramdisk and device tree if present.
    pub fn modules(&self) -> impl Iterator<Item = &Module<'a>> + '_ {
        core::iter::once(&self.kernel).chain(self.ramdisk.iter()).chain(self.device_tree.iter())
    }

    /// The checks that need the machine: the guest's RAM must fit a `ipa_bits`-bit intermediate
    /// physical address space, and it may not have more vCPUs than the machine's `phys_cpus`
    /// physical CPUs ([`physical_cpus`](Self::physical_cpus) checks what is left of them).
    pub fn validate(&self, phys_cpus: usize, ipa_bits: u32) -> Result<(), GuestError<'a>> {
        let error = |problem| GuestError { guest: self.name, problem };
        let ipa_size = 1u64.checked_shl(ipa_bits).unwrap_or(0);
        // A shift of 64 or more means an IPA space larger than any u64 size.
        if ipa_size != 0 && self.memory_bytes() > ipa_size {
            return Err(error(GuestProblem::MemoryExceedsIpa { memory: self.memory_bytes(), ipa_bits }));
        }
        if self.cpus as usize > phys_cpus {
            return Err(error(GuestProblem::TooManyVcpus { cpus: self.cpus, phys: phys_cpus }));
        }
        Ok(())
    }

    /// The physical CPUs the guest's vCPUs are pinned to, vCPU `i` on CPU `first_free + i`:
    /// guests take CPUs in configuration order, each the next `cpus` of the machine's
    /// `phys_cpus`. Refused, naming how many are left, when fewer than `cpus` remain.
    pub fn physical_cpus(&self, first_free: usize, phys_cpus: usize) -> Result<Range<usize>, GuestError<'a>> {
        let left = phys_cpus.saturating_sub(first_free);
        let cpus = self.cpus as usize;
        if cpus > left {
            return Err(GuestError {
                guest: self.name,
                problem: GuestProblem::NotEnoughCpus { cpus: self.cpus, left, phys: phys_cpus },
            });
        }
        Ok(first_free..first_free + cpus)
    }
}

/// What is wrong with a guest description.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestProblem<'a> {
    /// No `memory` property.
    MissingMemory,
    /// `memory` is not two cells.
    BadMemory { len: usize },
    /// `memory` is 0.
    ZeroMemory,
    /// `memory` in bytes does not fit 64 bits.
    MemoryTooLarge { kib: u64 },
    /// `labyrinth,guaranteed-memory` is not two cells.
    BadGuaranteed { len: usize },
    /// `labyrinth,guaranteed-memory` is more than `memory`.
    GuaranteedAboveMemory { guaranteed: u64, memory: u64 },
    /// No `cpus` property.
    MissingCpus,
    /// `cpus` is not one cell.
    BadCpus { len: usize },
    /// `cpus` is 0.
    ZeroCpus,
    /// `cpus` is above [`MAX_VCPUS`].
    VcpusAboveLimit { cpus: u32 },
    /// Both `labyrinth,virtual-gic` and `labyrinth,no-virtual-gic`.
    ConflictingGic,
    /// No module node compatible with `"multiboot,kernel"`.
    NoKernel,
    /// Two modules of the same kind.
    DuplicateModule { kind: ModuleKind, node: &'a str },
    /// A `"multiboot,module"` node of no known kind.
    UnknownModule { node: &'a str },
    /// The guest node's `#address-cells`/`#size-cells` are unusable.
    BadCells { prop: &'static str, problem: Problem },
    /// A module's `reg` is missing or malformed.
    BadModuleReg { node: &'a str, problem: Problem },
    /// A `bootargs` (on `node`) is not a string.
    BadBootargs { node: &'a str },
    /// Two modules share host memory.
    OverlappingModules { a: &'a str, b: &'a str },
    /// A static shared memory node is malformed.
    BadShm { node: &'a str, problem: ShmProblem },
    /// More than [`MAX_SHARED`] shared memory nodes.
    TooManyShared,
    /// Two shared memory nodes name the same region (a guest is owner or borrower of a region,
    /// never both, and maps it once).
    DuplicateShmId { id: &'a str, role: ShmRole },
    /// Two shared regions overlap in the guest's address space.
    OverlappingShared { a: &'a str, b: &'a str },
    /// The guest's RAM exceeds the IPA space ([`GuestConfig::validate`]).
    MemoryExceedsIpa { memory: u64, ipa_bits: u32 },
    /// More vCPUs than physical CPUs ([`GuestConfig::validate`]).
    TooManyVcpus { cpus: u32, phys: usize },
    /// More vCPUs than physical CPUs left by the guests before it ([`GuestConfig::physical_cpus`]).
    NotEnoughCpus { cpus: u32, left: usize, phys: usize },
}

/// A guest that cannot be built, named, with the reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestError<'a> {
    pub guest: &'a str,
    pub problem: GuestProblem<'a>,
}

impl fmt::Display for GuestError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "guest {}: ", self.guest)?;
        match self.problem {
            GuestProblem::MissingMemory => f.write_str("memory (RAM size in KiB, 2 cells) is missing"),
            GuestProblem::BadMemory { len } => {
                write!(f, "memory is {len} bytes, expected 8 (RAM size in KiB, 2 cells)")
            }
            GuestProblem::ZeroMemory => f.write_str("memory is 0 KiB"),
            GuestProblem::MemoryTooLarge { kib } => {
                write!(f, "memory {kib} KiB does not fit 64 bits in bytes")
            }
            GuestProblem::BadGuaranteed { len } => write!(
                f,
                "labyrinth,guaranteed-memory is {len} bytes, expected 8 (guaranteed RAM in KiB, 2 cells)"
            ),
            GuestProblem::GuaranteedAboveMemory { guaranteed, memory } => write!(
                f,
                "labyrinth,guaranteed-memory {guaranteed} KiB is more than its memory, {memory} KiB"
            ),
            GuestProblem::MissingCpus => f.write_str("cpus (vCPU count) is missing"),
            GuestProblem::BadCpus { len } => write!(f, "cpus is {len} bytes, expected 4"),
            GuestProblem::ZeroCpus => f.write_str("cpus is 0"),
            GuestProblem::VcpusAboveLimit { cpus } => {
                write!(f, "cpus = {cpus}: a guest has at most {MAX_VCPUS} vCPUs")
            }
            GuestProblem::ConflictingGic => {
                f.write_str("both labyrinth,virtual-gic and labyrinth,no-virtual-gic are present")
            }
            GuestProblem::NoKernel => {
                f.write_str("no kernel module (a child compatible with \"multiboot,kernel\")")
            }
            GuestProblem::DuplicateModule { kind, node } => {
                write!(f, "module {node} is a second {kind} module")
            }
            GuestProblem::UnknownModule { node } => write!(
                f,
                "module {node} is not \"multiboot,kernel\", \"multiboot,ramdisk\" or \
                 \"multiboot,device-tree\""
            ),
            GuestProblem::BadCells { prop, problem } => write!(f, "{prop} {problem}"),
            GuestProblem::BadModuleReg { node, problem } => write!(f, "module {node}: reg {problem}"),
            GuestProblem::BadBootargs { node } => {
                write!(f, "{node}: bootargs is not a NUL-terminated UTF-8 string")
            }
            GuestProblem::OverlappingModules { a, b } => write!(f, "modules {a} and {b} overlap"),
            GuestProblem::BadShm { node, problem } => write!(f, "shared memory node {node}: {problem}"),
            GuestProblem::TooManyShared => {
                write!(f, "more than {MAX_SHARED} shared memory nodes (xen,domain-shared-memory-v1)")
            }
            GuestProblem::DuplicateShmId { id, role } => write!(
                f,
                "shared memory \"{id}\" named a second time (as {role}): a guest is the owner or a \
                 borrower of a region, once"
            ),
            GuestProblem::OverlappingShared { a, b } => {
                write!(f, "shared memory nodes {a} and {b} overlap in guest memory")
            }
            GuestProblem::MemoryExceedsIpa { memory, ipa_bits } => {
                write!(f, "memory {} MiB exceeds the {ipa_bits}-bit IPA space", memory / (1024 * 1024))
            }
            GuestProblem::TooManyVcpus { cpus, phys } => {
                write!(f, "cpus = {cpus} but the machine has {phys} physical CPU{}", plural(phys))
            }
            GuestProblem::NotEnoughCpus { cpus, left, phys } => write!(
                f,
                "cpus = {cpus} but {left} of the {phys} physical CPUs {} left (each vCPU takes \
                 one, in configuration order)",
                if left == 1 { "is" } else { "are" }
            ),
        }
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// True for a /chosen child that describes a guest.
pub(crate) fn is_guest_node(node: &Node<'_>) -> bool {
    node.is_compatible("labyrinth,guest") || node.is_compatible("xen,domain")
}

/// Reads every guest under `chosen` into `out`; returns how many did not fit.
pub(crate) fn parse_guests<'a>(
    chosen: &Node<'a>,
    root_cells: Cells,
    out: &mut FixedList<Result<GuestConfig<'a>, GuestError<'a>>, MAX_GUESTS>,
) -> usize {
    let mut skipped = 0;
    for node in chosen.children().filter(is_guest_node) {
        if out.push(parse_guest(&node, root_cells)).is_err() {
            skipped += 1;
        }
    }
    skipped
}

/// Reads one guest node.
pub(crate) fn parse_guest<'a>(node: &Node<'a>, root_cells: Cells) -> Result<GuestConfig<'a>, GuestError<'a>> {
    let name = node.name();
    let error = |problem| GuestError { guest: name, problem };

    let memory = node.property("memory").ok_or(error(GuestProblem::MissingMemory))?;
    let memory_kib = memory.as_u64().ok_or(error(GuestProblem::BadMemory { len: memory.value.len() }))?;
    if memory_kib == 0 {
        return Err(error(GuestProblem::ZeroMemory));
    }
    if memory_kib.checked_mul(1024).is_none() {
        return Err(error(GuestProblem::MemoryTooLarge { kib: memory_kib }));
    }
    let guaranteed_kib = match node.property("labyrinth,guaranteed-memory") {
        None => None,
        Some(p) => match p.as_u64() {
            None => return Err(error(GuestProblem::BadGuaranteed { len: p.value.len() })),
            Some(kib) if kib > memory_kib => {
                return Err(error(GuestProblem::GuaranteedAboveMemory {
                    guaranteed: kib,
                    memory: memory_kib,
                }))
            }
            Some(kib) => Some(kib),
        },
    };

    let cpus = node.property("cpus").ok_or(error(GuestProblem::MissingCpus))?;
    let cpus = cpus.as_u32().ok_or(error(GuestProblem::BadCpus { len: cpus.value.len() }))?;
    if cpus == 0 {
        return Err(error(GuestProblem::ZeroCpus));
    }
    if cpus as usize > MAX_VCPUS {
        return Err(error(GuestProblem::VcpusAboveLimit { cpus }));
    }
    let virtual_gic = match (
        node.property("labyrinth,virtual-gic").is_some(),
        node.property("labyrinth,no-virtual-gic").is_some(),
    ) {
        (true, true) => return Err(error(GuestProblem::ConflictingGic)),
        (_, opt_out) => !opt_out,
    };

    // Xen reads module addresses with the guest node's cell sizes; absent ones default to the
    // root's (not the specification's 2/1), which is what a bootloader writing them assumes.
    let cells = cells_or(node, root_cells)
        .and_then(|c| check_cells(node, c, 1))
        .map_err(|e| error(cells_problem(e)))?;

    let mut modules: FixedList<Module<'a>, MAX_MODULES> =
        FixedList::filled(Module { kind: ModuleKind::Kernel, region: Region::default(), node: "" });
    let mut kernel_bootargs = None;
    let mut shared: FixedList<SharedMem<'a>, MAX_SHARED> = FixedList::filled(SharedMem::NONE);
    for child in node.children() {
        if is_shm_node(&child) {
            let shm = parse_shm(&child, cells)
                .map_err(|problem| error(GuestProblem::BadShm { node: child.name(), problem }))?;
            if shared.iter().any(|s| s.id == shm.id) {
                return Err(error(GuestProblem::DuplicateShmId { id: shm.id, role: shm.role }));
            }
            if let Some(other) = shared.iter().find(|s| s.overlaps(&shm)) {
                return Err(error(GuestProblem::OverlappingShared { a: other.node, b: shm.node }));
            }
            shared.push(shm).map_err(|_| error(GuestProblem::TooManyShared))?;
            continue;
        }
        let Some(compatible) = child.property("compatible") else { continue };
        let kind = if compatible.has_string("multiboot,kernel") {
            ModuleKind::Kernel
        } else if compatible.has_string("multiboot,ramdisk") {
            ModuleKind::Ramdisk
        } else if compatible.has_string("multiboot,device-tree") {
            ModuleKind::DeviceTree
        } else if compatible.has_string("multiboot,module") {
            return Err(error(GuestProblem::UnknownModule { node: child.name() }));
        } else {
            continue;
        };
        if modules.iter().any(|m| m.kind == kind) {
            return Err(error(GuestProblem::DuplicateModule { kind, node: child.name() }));
        }
        let region = module_region(&child, cells)
            .map_err(|problem| error(GuestProblem::BadModuleReg { node: child.name(), problem }))?;
        if kind == ModuleKind::Kernel {
            kernel_bootargs = str_prop(&child, "bootargs")
                .map_err(|_| error(GuestProblem::BadBootargs { node: child.name() }))?;
        }
        // Distinct kinds are at most three, so this push cannot fail; if it did, the module
        // would be refused rather than dropped silently.
        modules
            .push(Module { kind, region, node: child.name() })
            .map_err(|_| error(GuestProblem::DuplicateModule { kind, node: child.name() }))?;
    }

    let find = |kind| modules.iter().copied().find(|m: &Module<'_>| m.kind == kind);
    let kernel = find(ModuleKind::Kernel).ok_or(error(GuestProblem::NoKernel))?;
    for (i, a) in modules.iter().enumerate() {
        for b in modules.iter().skip(i + 1) {
            if a.region.overlaps(&b.region) {
                return Err(error(GuestProblem::OverlappingModules { a: a.node, b: b.node }));
            }
        }
    }
    let guest_bootargs =
        str_prop(node, "bootargs").map_err(|_| error(GuestProblem::BadBootargs { node: name }))?;

    Ok(GuestConfig {
        name,
        memory_kib,
        cpus,
        kernel,
        ramdisk: find(ModuleKind::Ramdisk),
        device_tree: find(ModuleKind::DeviceTree),
        bootargs: kernel_bootargs.or(guest_bootargs),
        no_block_mappings: node.property("labyrinth,no-block-mappings").is_some(),
        guaranteed_kib,
        shared,
        virtual_gic,
    })
}

/// The one (address, size) pair of a module's `reg`.
fn module_region(node: &Node<'_>, cells: Cells) -> Result<Region, Problem> {
    let reg = node.property("reg").ok_or(Problem::Missing)?;
    let entry = (cells.address + cells.size) as usize * 4;
    if reg.value.len() != entry {
        return Err(Problem::WrongLength { len: reg.value.len(), expected: entry });
    }
    let read = |pos: usize, n: u32| -> Option<u64> {
        match n {
            1 => super::token::be32(reg.value, pos).map(u64::from),
            2 => super::token::be64(reg.value, pos),
            _ => None,
        }
    };
    let address = read(0, cells.address).ok_or(Problem::Missing)?;
    let size = read(cells.address as usize * 4, cells.size).ok_or(Problem::Missing)?;
    if size == 0 {
        return Err(Problem::ZeroSize { address });
    }
    Region::new(address, size).ok_or(Problem::Overflow { address, size })
}

/// The guest-level problem behind a cell-size error.
fn cells_problem(e: DtError<'_>) -> GuestProblem<'static> {
    match e {
        DtError::Property { prop, problem, .. } => GuestProblem::BadCells { prop, problem },
        _ => GuestProblem::BadCells { prop: "#address-cells", problem: Problem::Missing },
    }
}

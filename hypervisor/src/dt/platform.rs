//! `Platform`: what Labyrinth needs to know about the machine, read from a checked device tree.
//!
//! It owns the bindings: which nodes describe RAM, reservations, CPUs, PSCI, the console UART,
//! the GIC, the boot arguments and the guests, and how their properties are read. It stores
//! everything in fixed-size tables (no heap) and borrows names and strings from the blob. It must
//! never give a malformed node the benefit of the doubt: a property that is present but wrong is
//! an error naming it; an optional device that is absent is `None`. It never uses the fdt crate
//! (see the `dt` module documentation).

use super::check::{check, Checked};
use super::error::{DtError, Problem};
use super::guest::{parse_guests, GuestConfig, GuestError, MAX_GUESTS};
use super::list::FixedList;
use super::prop::{cells, cells_or, check_cells, device_regions, reg, region, str_prop, u32_prop, Cells};
use super::region::Region;
use super::tree::{Node, Tree};

/// RAM banks kept from memory nodes.
pub const MAX_MEMORY: usize = 16;
/// /memreserve/ entries kept.
pub const MAX_MEMRESERVE: usize = 16;
/// /reserved-memory regions kept.
pub const MAX_RESERVED_MEMORY: usize = 16;
/// CPUs kept.
pub const MAX_CPUS: usize = 128;
/// GICv3 redistributor regions kept.
pub const MAX_REDISTRIBUTORS: usize = 8;

/// The bits of an MPIDR that identify a CPU (Aff3 in bits 39:32, Aff2..Aff0 in 23:0).
pub const MPIDR_AFFINITY_MASK: u64 = 0xff_00ff_ffff;

/// The standard PSCI 0.2+ CPU_ON function id (SMC64).
pub const PSCI_CPU_ON_64: u32 = 0xc400_0003;

/// One CPU from /cpus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cpu {
    /// The CPU's MPIDR affinity (its `reg`).
    pub mpidr: u64,
}

/// A /reserved-memory region with its node's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReservedMemory<'a> {
    pub name: &'a str,
    pub region: Region,
    /// `no-map`: the OS must not even map the region.
    pub no_map: bool,
}

/// How PSCI calls reach the firmware.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conduit {
    Smc,
    Hvc,
}

/// The PSCI version the /psci node claims (from its `compatible`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum PsciVersion {
    /// `"arm,psci"`: function ids only from the node's properties.
    V0_1,
    /// `"arm,psci-0.2"`.
    V0_2,
    /// `"arm,psci-1.0"`.
    V1_0,
}

/// The /psci node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Psci {
    pub conduit: Conduit,
    pub version: PsciVersion,
    /// CPU_ON's function id: the `cpu_on` property, else 0xc4000003 for PSCI 0.2 and later.
    pub cpu_on: Option<u32>,
}

/// The console PL011.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Uart<'a> {
    /// Its registers (the first `reg` entry, translated).
    pub region: Region,
    /// Its node's name.
    pub node: &'a str,
    /// True when /chosen's `stdout-path` names it.
    pub is_stdout: bool,
    /// Its interrupt's GIC INTID, when `interrupts` names a GIC SPI (three cells: 0 for SPI,
    /// the SPI number, flags); `None` leaves the console without input.
    pub intid: Option<u32>,
}

/// GIC architecture version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GicVersion {
    V2,
    V3,
}

/// The interrupt controller's register frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gic {
    pub version: GicVersion,
    /// GICD.
    pub distributor: Region,
    /// GICR regions (GICv3 only; empty for v2).
    pub redistributors: FixedList<Region, MAX_REDISTRIBUTORS>,
    /// GICC, if described.
    pub cpu_interface: Option<Region>,
    /// GICH (virtual interface control), if described.
    pub hyp_interface: Option<Region>,
    /// GICV (virtual CPU interface), if described.
    pub vcpu_interface: Option<Region>,
}

/// Everything Labyrinth reads from the boot device tree.
#[derive(Debug, Clone, Copy)]
pub struct Platform<'a> {
    total_size: usize,
    boot_cpuid_phys: u32,
    memory: FixedList<Region, MAX_MEMORY>,
    memreserve: FixedList<Region, MAX_MEMRESERVE>,
    reserved_memory: FixedList<ReservedMemory<'a>, MAX_RESERVED_MEMORY>,
    cpus: FixedList<Cpu, MAX_CPUS>,
    psci: Option<Psci>,
    uart: Option<Uart<'a>>,
    gic: Option<Gic>,
    bootargs: Option<&'a str>,
    stdout_path: Option<&'a str>,
    guests: FixedList<Result<GuestConfig<'a>, GuestError<'a>>, MAX_GUESTS>,
    guests_skipped: usize,
}

impl<'a> Platform<'a> {
    /// The blob's `totalsize` (to reserve the bytes it occupies).
    pub fn total_size(&self) -> usize {
        self.total_size
    }

    /// The header's `boot_cpuid_phys`.
    pub fn boot_cpuid_phys(&self) -> u32 {
        self.boot_cpuid_phys
    }

    /// RAM banks from every memory node, in blob order (not merged: see `memmap`).
    pub fn memory(&self) -> &[Region] {
        self.memory.as_slice()
    }

    /// /memreserve/ entries (size-0 entries dropped).
    pub fn memreserve(&self) -> &[Region] {
        self.memreserve.as_slice()
    }

    /// Static /reserved-memory regions (children with `reg`; `size`-only ones are the OS's to
    /// allocate and are not listed).
    pub fn reserved_memory(&self) -> &[ReservedMemory<'a>] {
        self.reserved_memory.as_slice()
    }

    /// CPUs in /cpus order.
    pub fn cpus(&self) -> &[Cpu] {
        self.cpus.as_slice()
    }

    /// The /psci node, if any.
    pub fn psci(&self) -> Option<Psci> {
        self.psci
    }

    /// The console PL011, if any.
    pub fn uart(&self) -> Option<Uart<'a>> {
        self.uart
    }

    /// The GIC, if any.
    pub fn gic(&self) -> Option<&Gic> {
        self.gic.as_ref()
    }

    /// /chosen `bootargs`.
    pub fn bootargs(&self) -> Option<&'a str> {
        self.bootargs
    }

    /// /chosen `stdout-path` (with any `:options` suffix).
    pub fn stdout_path(&self) -> Option<&'a str> {
        self.stdout_path
    }

    /// Each guest node under /chosen: its configuration, or why it cannot be used.
    pub fn guests(&self) -> &[Result<GuestConfig<'a>, GuestError<'a>>] {
        self.guests.as_slice()
    }

    /// Guest nodes beyond [`MAX_GUESTS`], not read.
    pub fn guests_skipped(&self) -> usize {
        self.guests_skipped
    }
}

/// Checks `blob` and reads the [`Platform`] from it. `blob` may extend past the device tree.
///
/// Required: at least one memory node with RAM, and /cpus with at least one cpu node. Optional:
/// everything else (absent is `None`/empty; present but malformed is an error). A malformed guest
/// node never fails the parse: it becomes an `Err` entry in [`Platform::guests`].
pub fn parse(blob: &[u8]) -> Result<Platform<'_>, DtError<'_>> {
    let checked = check(blob)?;
    read(&checked)
}

/// Reads the platform from an already checked blob.
pub fn read<'a>(checked: &Checked<'a>) -> Result<Platform<'a>, DtError<'a>> {
    let tree = checked.tree();
    let root = tree.root().ok_or(DtError::NoRoot)?;
    let root_cells = cells(&root)?;

    let mut platform = Platform {
        total_size: checked.total_size(),
        boot_cpuid_phys: checked.boot_cpuid_phys(),
        memory: FixedList::new(),
        memreserve: FixedList::new(),
        reserved_memory: FixedList::new(),
        cpus: FixedList::new(),
        psci: None,
        uart: None,
        gic: None,
        bootargs: None,
        stdout_path: None,
        guests: FixedList::filled(Err(GuestError {
            guest: "",
            problem: super::guest::GuestProblem::NoKernel,
        })),
        guests_skipped: 0,
    };

    // One pass over the root's children finds every top-level node we read (a name without a
    // unit address also matches one with, an exact match winning).
    let mut chosen = Pick::new("chosen");
    let mut reserved_memory = Pick::new("reserved-memory");
    let mut aliases = Pick::new("aliases");
    let mut cpus = None;
    let mut psci = None;
    for node in root.children() {
        chosen.offer(&node);
        reserved_memory.offer(&node);
        aliases.offer(&node);
        if cpus.is_none() && node.name() == "cpus" {
            cpus = Some(node);
        }
        if psci.is_none() && is_psci(&node) && node.is_enabled() {
            psci = Some(node);
        }
        if is_memory(&node) {
            read_memory(root_cells, &node, &mut platform.memory)?;
        }
    }
    if platform.memory.is_empty() {
        return Err(DtError::NoMemory);
    }
    read_memreserve(checked, &mut platform.memreserve)?;
    if let Some(parent) = reserved_memory.get() {
        read_reserved_memory(&parent, root_cells, &mut platform.reserved_memory)?;
    }
    read_cpus(&cpus.ok_or(DtError::NoCpusNode)?, &mut platform.cpus)?;
    platform.psci = psci.map(|n| read_psci(&n)).transpose()?;
    if let Some(chosen) = chosen.get() {
        platform.bootargs = str_prop(&chosen, "bootargs")?;
        platform.stdout_path = match str_prop(&chosen, "stdout-path")? {
            Some(path) => Some(path),
            None => str_prop(&chosen, "linux,stdout-path")?,
        };
        platform.guests_skipped = parse_guests(&chosen, root_cells, &mut platform.guests);
    }

    // One pass over every node finds the first GIC and the first PL011.
    let mut gic = None;
    let mut pl011 = None;
    for node in tree.nodes() {
        if gic.is_none() && gic_version(&node).is_some() && node.is_enabled() {
            gic = Some(node);
        }
        if pl011.is_none() && is_pl011(&node) {
            pl011 = Some(node);
        }
        if gic.is_some() && pl011.is_some() {
            break;
        }
    }
    platform.gic = gic.map(|n| read_gic(&n)).transpose()?;
    let stdout = platform.stdout_path.and_then(|p| resolve_stdout(&tree, aliases.get(), p)).filter(is_pl011);
    let is_stdout = stdout.is_some();
    platform.uart = stdout.or(pl011).map(|n| read_uart(&n, is_stdout)).transpose()?;
    Ok(platform)
}

/// The first child with a given name, preferring an exact match over a base-name match.
struct Pick<'a> {
    name: &'static str,
    exact: Option<Node<'a>>,
    base: Option<Node<'a>>,
}

impl<'a> Pick<'a> {
    fn new(name: &'static str) -> Self {
        Pick { name, exact: None, base: None }
    }

    fn offer(&mut self, node: &Node<'a>) {
        if self.exact.is_none() && node.name() == self.name {
            self.exact = Some(*node);
        } else if self.base.is_none() && node.base_name() == self.name {
            self.base = Some(*node);
        }
    }

    fn get(&self) -> Option<Node<'a>> {
        self.exact.or(self.base)
    }
}

fn too_many<'a>(what: &'static str, max: usize) -> impl FnOnce(super::list::Full) -> DtError<'a> {
    move |_| DtError::TooMany { what, max }
}

/// True for an enabled root child with `device_type = "memory"`.
fn is_memory(node: &Node<'_>) -> bool {
    node.property("device_type").and_then(|p| p.as_str()) == Some("memory") && node.is_enabled()
}

/// One memory node's RAM banks (`reg` in the root's cells); zero-sized banks are skipped.
fn read_memory<'a>(
    root_cells: Cells,
    node: &Node<'a>,
    out: &mut FixedList<Region, MAX_MEMORY>,
) -> Result<(), DtError<'a>> {
    let root = node.parent().ok_or(DtError::NoRoot)?;
    let cells = check_cells(&root, root_cells, 1)?;
    for (address, size) in reg(node, "reg", cells)? {
        // A zero-sized bank describes no RAM; firmware does emit them for empty NUMA nodes.
        if size == 0 {
            continue;
        }
        out.push(region(node, "reg", address, size)?).map_err(too_many("memory regions", MAX_MEMORY))?;
    }
    Ok(())
}

/// The /memreserve/ entries (overflow was already refused by `check`).
fn read_memreserve<'a>(
    checked: &Checked<'a>,
    out: &mut FixedList<Region, MAX_MEMRESERVE>,
) -> Result<(), DtError<'a>> {
    for (address, size) in checked.memreserve() {
        if let Some(r) = Region::new(address, size) {
            out.push(r).map_err(too_many("/memreserve/ entries", MAX_MEMRESERVE))?;
        }
    }
    Ok(())
}

/// Static regions under /reserved-memory, with its cells (defaulting to the root's, which the
/// binding requires them to equal).
fn read_reserved_memory<'a>(
    parent: &Node<'a>,
    root_cells: Cells,
    out: &mut FixedList<ReservedMemory<'a>, MAX_RESERVED_MEMORY>,
) -> Result<(), DtError<'a>> {
    let cells = check_cells(parent, cells_or(parent, root_cells)?, 1)?;
    for node in parent.children().filter(Node::is_enabled) {
        if node.property("reg").is_none() {
            continue;
        }
        let no_map = node.property("no-map").is_some();
        for (address, size) in reg(&node, "reg", cells)? {
            let region = region(&node, "reg", address, size)?;
            out.push(ReservedMemory { name: node.name(), region, no_map })
                .map_err(too_many("/reserved-memory regions", MAX_RESERVED_MEMORY))?;
        }
    }
    Ok(())
}

/// CPUs: /cpus children named `cpu@...`, `reg` = MPIDR in /cpus' `#address-cells` (1 or 2).
fn read_cpus<'a>(cpus: &Node<'a>, out: &mut FixedList<Cpu, MAX_CPUS>) -> Result<(), DtError<'a>> {
    let address_cells = u32_prop(cpus, "#address-cells")?.unwrap_or(Cells::DEFAULT.address);
    if !(1..=2).contains(&address_cells) {
        return Err(DtError::Property {
            node: cpus.path(),
            prop: "#address-cells",
            problem: Problem::UnsupportedCells { value: address_cells, min: 1, max: 2 },
        });
    }
    for node in cpus.children().filter(|n| n.base_name() == "cpu") {
        let error = |problem| DtError::Property { node: node.path(), prop: "reg", problem };
        let reg = node.property("reg").ok_or(error(Problem::Missing))?;
        let expected = address_cells as usize * 4;
        let mpidr = match (address_cells, reg.value.len() == expected) {
            (1, true) => reg.as_u32().map(u64::from),
            (2, true) => reg.as_u64(),
            _ => None,
        }
        .ok_or(error(Problem::WrongLength { len: reg.value.len(), expected }))?;
        if mpidr & !MPIDR_AFFINITY_MASK != 0 {
            return Err(error(Problem::MpidrReservedBits { mpidr }));
        }
        if out.iter().any(|c| c.mpidr == mpidr) {
            return Err(error(Problem::DuplicateMpidr { mpidr }));
        }
        out.push(Cpu { mpidr }).map_err(too_many("CPUs", MAX_CPUS))?;
    }
    if out.is_empty() {
        return Err(DtError::NoCpuNodes);
    }
    Ok(())
}

/// True for the /psci node (by name, or by a PSCI `compatible`).
fn is_psci(node: &Node<'_>) -> bool {
    node.base_name() == "psci"
        || ["arm,psci", "arm,psci-0.2", "arm,psci-1.0"].iter().any(|c| node.is_compatible(c))
}

/// The /psci node's conduit, version and CPU_ON id.
fn read_psci<'a>(node: &Node<'a>) -> Result<Psci, DtError<'a>> {
    let method = str_prop(node, "method")?.ok_or(DtError::Property {
        node: node.path(),
        prop: "method",
        problem: Problem::Missing,
    })?;
    let conduit = match method {
        "smc" => Conduit::Smc,
        "hvc" => Conduit::Hvc,
        _ => {
            return Err(DtError::Property {
                node: node.path(),
                prop: "method",
                problem: Problem::Unexpected { allowed: "\"smc\" or \"hvc\"" },
            })
        }
    };
    let version = if node.is_compatible("arm,psci-1.0") {
        PsciVersion::V1_0
    } else if node.is_compatible("arm,psci-0.2") {
        PsciVersion::V0_2
    } else {
        PsciVersion::V0_1
    };
    let cpu_on = match u32_prop(node, "cpu_on")? {
        Some(id) => Some(id),
        None if version >= PsciVersion::V0_2 => Some(PSCI_CPU_ON_64),
        None => None,
    };
    Ok(Psci { conduit, version, cpu_on })
}

/// The node `stdout-path` names: an absolute path, or an alias from /aliases (one level, never
/// recursively), with any `:options` suffix ignored.
fn resolve_stdout<'a>(tree: &Tree<'a>, aliases: Option<Node<'a>>, stdout_path: &str) -> Option<Node<'a>> {
    let path = stdout_path.split(':').next()?;
    if path.starts_with('/') {
        return tree.find(path);
    }
    let target = aliases?.property(path)?.as_str()?;
    if target.starts_with('/') {
        tree.find(target)
    } else {
        None
    }
}

/// True for an enabled PL011.
fn is_pl011(node: &Node<'_>) -> bool {
    node.is_compatible("arm,pl011") && node.is_enabled()
}

/// The console PL011's registers: its first `reg` entry, translated.
fn read_uart<'a>(node: &Node<'a>, is_stdout: bool) -> Result<Uart<'a>, DtError<'a>> {
    let region = device_regions(node)?.next().ok_or(DtError::Property {
        node: node.path(),
        prop: "reg",
        problem: Problem::Empty,
    })??;
    Ok(Uart { region, node: node.name(), is_stdout, intid: spi_intid(node) })
}

/// The INTID of a node's first interrupt if it is a GIC SPI (`<0 n flags>`: INTID 32 + n).
fn spi_intid(node: &Node<'_>) -> Option<u32> {
    let v = node.property("interrupts")?.value;
    let cell = |i: usize| v.get(i * 4..i * 4 + 4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
    match (cell(0)?, cell(1)?, cell(2)?) {
        (0, n, _) if n < 988 => Some(32 + n),
        _ => None,
    }
}

/// The GIC version a node's `compatible` claims: `"arm,gic-v3"`, or GICv2
/// (`"arm,cortex-a15-gic"`, `"arm,gic-400"`).
fn gic_version(node: &Node<'_>) -> Option<GicVersion> {
    let compatible = node.property("compatible")?;
    if compatible.has_string("arm,gic-v3") {
        Some(GicVersion::V3)
    } else if compatible.has_string("arm,cortex-a15-gic") || compatible.has_string("arm,gic-400") {
        Some(GicVersion::V2)
    } else {
        None
    }
}

/// The GIC's register frames.
fn read_gic<'a>(node: &Node<'a>) -> Result<Gic, DtError<'a>> {
    let version = gic_version(node).unwrap_or(GicVersion::V3);
    let redistributor_count = match version {
        GicVersion::V2 => 0,
        GicVersion::V3 => {
            let n = u32_prop(node, "#redistributor-regions")?.unwrap_or(1) as usize;
            if n == 0 {
                return Err(DtError::Property {
                    node: node.path(),
                    prop: "#redistributor-regions",
                    problem: Problem::Unexpected { allowed: "at least 1" },
                });
            }
            if n > MAX_REDISTRIBUTORS {
                return Err(DtError::TooMany { what: "GIC redistributor regions", max: MAX_REDISTRIBUTORS });
            }
            n
        }
    };

    // Distributor, redistributors (v3), then GICC, GICH, GICV when present.
    let mut frames: FixedList<Region, { MAX_REDISTRIBUTORS + 4 }> = FixedList::new();
    let mut have = 0usize;
    for frame in device_regions(node)? {
        let frame = frame?;
        have += 1;
        // Entries past what the binding defines are ignored.
        let _ = frames.push(frame);
    }
    let need = 1 + if version == GicVersion::V3 { redistributor_count } else { 1 };
    if have < need {
        return Err(DtError::Property {
            node: node.path(),
            prop: "reg",
            problem: Problem::TooFewEntries { have, need },
        });
    }
    let frame = |i: usize| frames.get(i).copied();
    let mut redistributors = FixedList::new();
    for i in 1..=redistributor_count {
        if let Some(r) = frame(i) {
            redistributors.push(r).map_err(too_many("GIC redistributor regions", MAX_REDISTRIBUTORS))?;
        }
    }
    let after = 1 + redistributor_count;
    Ok(Gic {
        version,
        distributor: frame(0).unwrap_or_default(),
        redistributors,
        cpu_interface: frame(after),
        hyp_interface: frame(after + 1),
        vcpu_interface: frame(after + 2),
    })
}

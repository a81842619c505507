//! What the guest kernels need from their device tree, read once at boot with the `fdt` crate:
//! RAM (`/memory` nodes), what must be left alone in it (the tree itself, `/memreserve/`
//! entries, an initrd), `/chosen/bootargs` and the hypervisor's `/chosen/labyrinth,reset-count`,
//! the CPUs (`device_type = "cpu"` nodes' `reg`: their MPIDRs), the PSCI conduit (`/psci`
//! `method`) and the GICv3 (`arm,gic-v3`: distributor and first redistributor region), and
//! static shared memory as Xen (and Labyrinth) describe it: `/reserved-memory` children
//! compatible with `"xen,shared-memory-v1"` (`reg`, `xen,id`, `xen,offset`). Those regions are
//! also banks of `/memory` (Xen 4.19): they are taken out of `memory`, the kernels' own RAM.
//! Other `/reserved-memory` children are not read (neither QEMU's virt nor Labyrinth makes any).

use crate::bootargs::Bootargs;
use crate::ranges::{Range, RangeSet};

/// Longest command line kept; a longer one is truncated (and `bootargs_truncated` set).
pub const BOOTARGS_MAX: usize = 1024;
/// CPUs the kernels can run on; further cpu nodes are counted in `cpus_dropped`.
pub const MAX_CPUS: usize = 8;
/// The MPIDR bits that name a CPU (Aff3, Aff2, Aff1, Aff0), as a cpu node's `reg` holds them.
pub const MPIDR_AFFINITY_MASK: u64 = 0xff_00ff_ffff;

/// How PSCI is called (`/psci` `method`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Conduit {
    Hvc,
    Smc,
}

/// Shared memory regions kept; further ones are counted in `shared_dropped`.
pub const MAX_SHARED: usize = 4;
/// Longest `xen,id` kept (Xen's limit: 15 characters).
pub const SHM_ID_MAX: usize = 15;

/// One static shared memory region (`xen,shared-memory-v1`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SharedRegion {
    /// Where it is in this guest's physical address space.
    pub range: Range,
    /// `xen,offset`: where this mapping starts in the owner's region (0 when absent).
    pub offset: u64,
    id: [u8; SHM_ID_MAX],
    id_len: usize,
}

impl SharedRegion {
    /// `xen,id`: the region's name, the same in every guest sharing it.
    pub fn id(&self) -> &str {
        core::str::from_utf8(&self.id[..self.id_len]).unwrap_or("")
    }
}

/// A GICv3's frames: the distributor and the (first) redistributor region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GicV3 {
    pub distributor: Range,
    pub redistributors: Range,
}

pub struct BootInfo {
    /// The device tree: its address (x0 at entry) and `totalsize`.
    pub dtb: Range,
    /// Guest RAM, from every `/memory` node's `reg`.
    pub memory: RangeSet<8>,
    /// Inside RAM but not free: `/memreserve/` and `/chosen/linux,initrd-{start,end}` (the
    /// device tree itself is not in this set: see `dtb`).
    pub reserved: RangeSet<8>,
    /// `/chosen/labyrinth,reset-count`: how many times the hypervisor has reset this guest
    /// (PSCI SYSTEM_RESET) before this boot; 0 when absent.
    pub reset_count: u64,
    /// The CPUs' MPIDRs (affinity fields), ascending: CPU index `i` is the `i`-th. At least one.
    pub cpus: [u64; MAX_CPUS],
    pub cpu_count: usize,
    /// cpu nodes beyond MAX_CPUS.
    pub cpus_dropped: usize,
    /// `/psci` `method`; HVC when absent or unknown (what Labyrinth and QEMU's virt at EL1 use).
    pub conduit: Conduit,
    /// The `arm,gic-v3` node's first two `reg` entries, if there is one.
    pub gic: Option<GicV3>,
    pub bootargs_truncated: bool,
    bootargs: [u8; BOOTARGS_MAX],
    bootargs_len: usize,
    shared: [SharedRegion; MAX_SHARED],
    shared_count: usize,
    /// Shared memory nodes beyond MAX_SHARED, or with an id longer than SHM_ID_MAX.
    pub shared_dropped: usize,
}

impl BootInfo {
    /// The CPUs' MPIDRs, index order.
    pub fn cpu_mpidrs(&self) -> &[u64] {
        &self.cpus[..self.cpu_count]
    }

    /// The static shared memory regions, in device-tree order.
    pub fn shared(&self) -> &[SharedRegion] {
        &self.shared[..self.shared_count]
    }

    pub fn bootargs(&self) -> Bootargs<'_> {
        Bootargs(core::str::from_utf8(&self.bootargs[..self.bootargs_len]).unwrap_or(""))
    }

    /// Guest RAM no one uses, in whole pages: without `image` (and everything below it), the
    /// device tree and the reserved ranges.
    pub fn free_ram(&self, image: Range) -> RangeSet<16> {
        let mut free = RangeSet::new();
        for r in self.memory.as_slice() {
            free.add(r.shrink_to(crate::PAGE));
        }
        free.subtract(Range::new(0, image.end).grow_to(crate::PAGE));
        free.subtract(self.dtb.grow_to(crate::PAGE));
        for r in self.reserved.as_slice() {
            free.subtract(r.grow_to(crate::PAGE));
        }
        free
    }

    /// From the lowest RAM address to the highest.
    pub fn ram_span(&self) -> Range {
        let m = self.memory.as_slice();
        match (m.first(), m.last()) {
            (Some(a), Some(b)) => Range::new(a.start, b.end),
            _ => Range::new(0, 0),
        }
    }
}

/// Reads the device tree at `dtb`.
///
/// # Safety
/// `dtb` must be readable for the size its header declares (the boot protocol's promise).
pub unsafe fn read(dtb: usize) -> Result<BootInfo, &'static str> {
    if dtb == 0 || !dtb.is_multiple_of(8) {
        return Err("x0 is not an 8-byte aligned address");
    }
    let fdt = fdt::Fdt::from_ptr(dtb as *const u8).map_err(|e| match e {
        fdt::FdtError::BadMagic => "bad magic",
        fdt::FdtError::BadPtr => "bad pointer",
        _ => "truncated",
    })?;
    let mut info = BootInfo {
        dtb: Range::new(dtb as u64, dtb as u64 + fdt.total_size() as u64),
        memory: RangeSet::new(),
        reserved: RangeSet::new(),
        reset_count: 0,
        cpus: [0; MAX_CPUS],
        cpu_count: 0,
        cpus_dropped: 0,
        conduit: Conduit::Hvc,
        gic: None,
        bootargs_truncated: false,
        bootargs: [0; BOOTARGS_MAX],
        bootargs_len: 0,
        shared: [SharedRegion::default(); MAX_SHARED],
        shared_count: 0,
        shared_dropped: 0,
    };

    // Only `all_nodes` and `properties` are used: fdt 0.1.5's `find_node` (and `chosen`,
    // `memory`, `children`) stop at the FDT_NOP tokens libfdt leaves when it edits a tree (QEMU's
    // does with `-dtb`), and miss the nodes after them.
    let mut chosen = None;
    for node in fdt.all_nodes() {
        if node.name == "chosen" && chosen.is_none() {
            chosen = Some(node);
        }
        let compatible = |c: &str| node.compatible().is_some_and(|cs| cs.all().any(|x| x == c));
        if node.name == "psci" || compatible("arm,psci-0.2") || compatible("arm,psci") {
            if node.property("method").and_then(|p| p.as_str()) == Some("smc") {
                info.conduit = Conduit::Smc;
            }
        }
        if compatible("arm,gic-v3") {
            let mut regs = node.reg().into_iter().flatten();
            let mut next = || {
                regs.next().map(|r| {
                    let start = r.starting_address as u64;
                    Range::new(start, start.saturating_add(r.size.unwrap_or(0) as u64))
                })
            };
            if let (Some(distributor), Some(redistributors)) = (next(), next()) {
                info.gic = Some(GicV3 { distributor, redistributors });
            }
        }
        if compatible("xen,shared-memory-v1") {
            let reg = node.reg().into_iter().flatten().next();
            let id = node.property("xen,id").and_then(|p| p.as_str()).unwrap_or("");
            match reg {
                Some(r) if info.shared_count < MAX_SHARED && id.len() <= SHM_ID_MAX => {
                    let start = r.starting_address as u64;
                    let mut region = SharedRegion {
                        range: Range::new(start, start.saturating_add(r.size.unwrap_or(0) as u64)),
                        offset: node.property("xen,offset").and_then(|p| p.as_usize()).unwrap_or(0) as u64,
                        id: [0; SHM_ID_MAX],
                        id_len: id.len(),
                    };
                    region.id[..id.len()].copy_from_slice(id.as_bytes());
                    info.shared[info.shared_count] = region;
                    info.shared_count += 1;
                }
                _ => info.shared_dropped += 1,
            }
            continue;
        }
        if node.property("device_type").and_then(|p| p.as_str()) == Some("cpu") {
            // reg: one or two cells (the parent's #address-cells), the MPIDR's affinity fields.
            if let Some(mpidr) = node.property("reg").and_then(|p| p.as_usize()) {
                if info.cpu_count < MAX_CPUS {
                    info.cpus[info.cpu_count] = mpidr as u64 & MPIDR_AFFINITY_MASK;
                    info.cpu_count += 1;
                } else {
                    info.cpus_dropped += 1;
                }
            }
            continue;
        }
        let is_memory = match node.property("device_type").and_then(|p| p.as_str()) {
            Some(t) => t == "memory",
            None => node.name == "memory" || node.name.starts_with("memory@"),
        };
        if !is_memory {
            continue;
        }
        for r in node.reg().into_iter().flatten() {
            let start = r.starting_address as u64;
            info.memory.add(Range::new(start, start.saturating_add(r.size.unwrap_or(0) as u64)));
        }
    }
    // Shared memory is listed as RAM too (Xen 4.19); it is not the kernel's to allocate.
    for r in &info.shared[..info.shared_count] {
        info.memory.subtract(r.range);
    }
    if info.memory.is_empty() {
        return Err("no /memory");
    }
    info.cpus[..info.cpu_count].sort_unstable();
    if info.cpu_count == 0 {
        // A tree without cpu nodes still runs on the CPU that booted it.
        info.cpus[0] = crate::mpidr_affinity();
        info.cpu_count = 1;
    }

    for r in fdt.memory_reservations() {
        let start = r.address() as u64;
        info.reserved.add(Range::new(start, start.saturating_add(r.size() as u64)));
    }

    if let Some(chosen) = chosen {
        let num = |name| chosen.property(name).and_then(|p| p.as_usize()).map(|v| v as u64);
        if let (Some(s), Some(e)) = (num("linux,initrd-start"), num("linux,initrd-end")) {
            info.reserved.add(Range::new(s, e));
        }
        info.reset_count = num("labyrinth,reset-count").unwrap_or(0);
        if let Some(args) = chosen.property("bootargs").and_then(|p| p.as_str()) {
            let mut n = args.len().min(BOOTARGS_MAX);
            while !args.is_char_boundary(n) {
                n -= 1;
            }
            info.bootargs[..n].copy_from_slice(&args.as_bytes()[..n]);
            info.bootargs_len = n;
            info.bootargs_truncated = n < args.len();
        }
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// QEMU 7.2's virt device tree for `-m 64M -append "stress.reset stress.seed=5"`, with
    /// `/chosen/labyrinth,reset-count = <1>` added (dtc), as the guest sees it when that is
    /// given back to QEMU with `-dtb`: QEMU's edits leave 54 FDT_NOP tokens in the root node.
    const QEMU_RESET: &[u8] = include_bytes!("../testdata/qemu-virt-64m-reset.dtb");
    /// QEMU 7.2's `-M virt,gic-version=3 -smp 4 -m 64M` tree (`dumpdtb`, shrunk by dtc).
    const QEMU_GICV3_SMP4: &[u8] = include_bytes!("../testdata/qemu-virt-gicv3-smp4.dtb");

    fn read_blob(blob: &[u8]) -> BootInfo {
        let mut buf = vec![0u64; blob.len().div_ceil(8)];
        // SAFETY: plain bytes into a u64 buffer (8-byte aligned like a real device tree).
        let bytes = unsafe { core::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<u8>(), blob.len()) };
        bytes.copy_from_slice(blob);
        let info = unsafe { read(buf.as_ptr() as usize) }.unwrap();
        let dtb = buf.as_ptr() as u64;
        assert_eq!(info.dtb, Range::new(dtb, dtb + blob.len() as u64));
        info
    }

    #[test]
    fn qemu_virt() {
        let info = read_blob(QEMU_RESET);
        let f = fdt::Fdt::new(QEMU_RESET).unwrap();
        assert!(f.find_node("/chosen").is_none(), "fdt 0.1.5 finds /chosen despite the NOPs now");
        assert_eq!(info.memory.as_slice(), &[Range::new(0x4000_0000, 0x4400_0000)]);
        assert_eq!(info.ram_span(), Range::new(0x4000_0000, 0x4400_0000));
        assert!(info.reserved.is_empty());
        let mut ram = read_blob(QEMU_RESET);
        ram.dtb = Range::new(0x4300_0100, 0x4300_2000);
        ram.reserved.add(Range::new(0x4200_0000, 0x4200_0800));
        let free = ram.free_ram(Range::new(0x4008_0000, 0x4010_0010));
        assert_eq!(
            free.as_slice(),
            &[
                Range::new(0x4010_1000, 0x4200_0000),
                Range::new(0x4200_1000, 0x4300_0000),
                Range::new(0x4300_2000, 0x4400_0000)
            ],
            "pages clear of the image and all below it, the reserved range and the device tree"
        );
        assert_eq!(info.reset_count, 1);
        assert_eq!(info.bootargs().0, "stress.reset stress.seed=5");
        assert!(!info.bootargs_truncated);
        assert_eq!(info.cpu_mpidrs(), &[0]);
        assert_eq!(info.conduit, Conduit::Hvc);
        assert_eq!(info.gic, None, "a GICv2 is not a GICv3");
    }

    #[test]
    fn qemu_virt_gicv3_four_cpus() {
        let info = read_blob(QEMU_GICV3_SMP4);
        assert_eq!(info.cpu_mpidrs(), &[0, 1, 2, 3]);
        assert_eq!(info.cpus_dropped, 0);
        assert_eq!(info.conduit, Conduit::Hvc);
        assert_eq!(
            info.gic,
            Some(GicV3 {
                distributor: Range::new(0x800_0000, 0x801_0000),
                redistributors: Range::new(0x80a_0000, 0x900_0000),
            })
        );
    }

    /// A tree as Labyrinth writes it for a guest with two shared regions (see
    /// `testdata/shared-memory.dts`; `dtc -I dts -O dtb`).
    const SHARED: &[u8] = include_bytes!("../testdata/shared-memory.dtb");

    #[test]
    fn shared_memory_is_found_and_is_not_ram() {
        let info = read_blob(SHARED);
        let got: Vec<_> = info.shared().iter().map(|s| (s.id(), s.range, s.offset)).collect();
        assert_eq!(
            got,
            [
                ("labyrinth-ring", Range::new(0x1000_0000, 0x1020_0000), 0),
                ("other", Range::new(0x2000_0000, 0x2000_1000), 0),
            ]
        );
        assert_eq!(info.memory.as_slice(), &[Range::new(0x4000_0000, 0x4400_0000)]);
        assert_eq!(info.ram_span(), Range::new(0x4000_0000, 0x4400_0000));
        assert_eq!(info.shared_dropped, 0);
    }

    #[test]
    fn rejects_garbage() {
        assert!(unsafe { read(0) }.is_err());
        let buf = [0u64; 16];
        assert!(unsafe { read(buf.as_ptr() as usize) }.is_err());
    }
}

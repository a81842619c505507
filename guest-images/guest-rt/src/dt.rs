//! What the guest kernels need from their device tree, read once at boot with the `fdt` crate:
//! RAM (`/memory` nodes), what must be left alone in it (the tree itself, `/memreserve/`
//! entries, an initrd), `/chosen/bootargs` and the hypervisor's `/chosen/labyrinth,reset-count`.
//! `/reserved-memory` is not read (neither QEMU's virt nor Labyrinth gives guests one).

use crate::bootargs::Bootargs;
use crate::ranges::{Range, RangeSet};

/// Longest command line kept; a longer one is truncated (and `bootargs_truncated` set).
pub const BOOTARGS_MAX: usize = 1024;

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
    pub bootargs_truncated: bool,
    bootargs: [u8; BOOTARGS_MAX],
    bootargs_len: usize,
}

impl BootInfo {
    pub fn bootargs(&self) -> Bootargs<'_> {
        Bootargs(core::str::from_utf8(&self.bootargs[..self.bootargs_len]).unwrap_or(""))
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
        bootargs_truncated: false,
        bootargs: [0; BOOTARGS_MAX],
        bootargs_len: 0,
    };

    // Only `all_nodes` and `properties` are used: fdt 0.1.5's `find_node` (and `chosen`,
    // `memory`, `children`) stop at the FDT_NOP tokens libfdt leaves when it edits a tree (QEMU's
    // does with `-dtb`), and miss the nodes after them.
    let mut chosen = None;
    for node in fdt.all_nodes() {
        if node.name == "chosen" && chosen.is_none() {
            chosen = Some(node);
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
    if info.memory.is_empty() {
        return Err("no /memory");
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
        assert_eq!(info.reset_count, 1);
        assert_eq!(info.bootargs().0, "stress.reset stress.seed=5");
        assert!(!info.bootargs_truncated);
    }

    #[test]
    fn rejects_garbage() {
        assert!(unsafe { read(0) }.is_err());
        let buf = [0u64; 16];
        assert!(unsafe { read(buf.as_ptr() as usize) }.is_err());
    }
}

//! A guest's physical (IPA) layout, the QEMU virt machine's: RAM at 0x4000_0000, a PL011 at
//! 0x0900_0000; and where its kernel, ramdisk and device tree go inside that RAM. Arithmetic
//! only, on sizes Labyrinth has checked; every failure names what does not fit.

use super::image::ImageHeader;

pub const RAM_BASE: u64 = 0x4000_0000;
pub const UART_BASE: u64 = 0x0900_0000;
pub const UART_SIZE: u64 = 0x1000;
const MIB2: u64 = 2 << 20;
/// Room reserved for the guest's device tree (the boot protocol's maximum size).
pub const DTB_ROOM: u64 = MIB2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub ram_base: u64,
    pub ram_size: u64,
    pub kernel: u64,
    pub kernel_size: u64,
    pub ramdisk: Option<(u64, u64)>,
    pub dtb: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayoutError {
    /// RAM too small for the kernel, the ramdisk and the device tree.
    TooSmall { need: u64, have: u64 },
    /// RAM reaches past the IPA space.
    BeyondIpa { ram_end: u64, ipa_bits: u32 },
    /// The kernel asks for a text_offset that is not 4 KiB-aligned or too large.
    BadTextOffset { text_offset: u64 },
}

impl core::fmt::Display for LayoutError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            LayoutError::TooSmall { need, have } => {
                write!(
                    f,
                    "memory {have:#x} bytes is too small: kernel, ramdisk and device tree need {need:#x}"
                )
            }
            LayoutError::BeyondIpa { ram_end, ipa_bits } => {
                write!(f, "memory ends at {ram_end:#x}, beyond the {ipa_bits}-bit IPA space")
            }
            LayoutError::BadTextOffset { text_offset } => {
                write!(f, "kernel text_offset {text_offset:#x} unusable")
            }
        }
    }
}

fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

/// Places the kernel at RAM base + text_offset, the device tree in the top 2 MiB of RAM and the
/// ramdisk right below it (2 MiB-aligned), checking that nothing overlaps.
pub fn plan(
    ram_size: u64,
    ipa_bits: u32,
    kernel: &ImageHeader,
    ramdisk_size: Option<u64>,
) -> Result<Layout, LayoutError> {
    let ram_end = RAM_BASE.checked_add(ram_size).filter(|&e| ipa_bits >= 64 || e <= 1 << ipa_bits);
    let Some(ram_end) = ram_end else {
        return Err(LayoutError::BeyondIpa { ram_end: RAM_BASE.saturating_add(ram_size), ipa_bits });
    };
    if !kernel.text_offset.is_multiple_of(4096) || kernel.text_offset >= ram_size {
        return Err(LayoutError::BadTextOffset { text_offset: kernel.text_offset });
    }
    let kernel_at = RAM_BASE + kernel.text_offset;
    let kernel_end = align_up(kernel_at + kernel.effective_size, 4096);
    let ramdisk_room = ramdisk_size.map_or(0, |s| align_up(s, MIB2));
    let need = (kernel_end - RAM_BASE) + ramdisk_room + DTB_ROOM;
    if need > ram_size || ram_size < DTB_ROOM {
        return Err(LayoutError::TooSmall { need, have: ram_size });
    }
    let dtb = (ram_end - DTB_ROOM) & !(MIB2 - 1);
    if dtb < kernel_end + ramdisk_room {
        return Err(LayoutError::TooSmall { need: need + MIB2, have: ram_size });
    }
    let ramdisk = ramdisk_size.map(|s| (dtb - ramdisk_room, s));
    Ok(Layout {
        ram_base: RAM_BASE,
        ram_size,
        kernel: kernel_at,
        kernel_size: kernel.effective_size,
        ramdisk,
        dtb,
    })
}

impl Layout {
    pub fn ram_end(&self) -> u64 {
        self.ram_base + self.ram_size
    }

    /// One subtraction and one compare: below the base wraps past any size.
    #[inline(always)]
    pub fn in_ram(&self, ipa: u64) -> bool {
        ipa.wrapping_sub(self.ram_base) < self.ram_size
    }
}

/// The units of guest RAM that receive the images `pieces` (IPA ranges, ascending by start, in
/// RAM): a 2 MiB block wherever `blocks` allows one and the whole aligned 2 MiB lies in `ram`,
/// else a 4 KiB page; ascending, each unit once even when two images share it. Each is
/// `(ipa, size)`.
pub fn image_units(
    pieces: &[core::ops::Range<u64>],
    ram: core::ops::Range<u64>,
    blocks: bool,
) -> alloc::vec::Vec<(u64, u64)> {
    let mut units: alloc::vec::Vec<(u64, u64)> = alloc::vec::Vec::new();
    for piece in pieces.iter().filter(|p| !p.is_empty()) {
        let mut at = piece.start & !(PAGE - 1);
        while at < piece.end {
            let block = at & !(MIB2 - 1);
            let unit = if blocks && block >= ram.start && block + MIB2 <= ram.end {
                (block, MIB2)
            } else {
                (at, PAGE)
            };
            match units.last() {
                Some(&(ipa, size)) if unit.0 < ipa + size => {}
                _ => units.push(unit),
            }
            at = unit.0 + unit.1;
        }
    }
    units
}

const PAGE: u64 = 4096;

#[cfg(test)]
mod tests {
    use super::*;

    // The RAM check is one subtraction: below the base wraps to a huge offset.
    #[test]
    fn in_ram_is_the_half_open_range() {
        let l = Layout {
            ram_base: 0x4000_0000,
            ram_size: 0x10_0000,
            kernel: 0,
            kernel_size: 0,
            ramdisk: None,
            dtb: 0,
        };
        assert!(!l.in_ram(0));
        assert!(!l.in_ram(0x3fff_f000));
        assert!(l.in_ram(0x4000_0000));
        assert!(l.in_ram(0x400f_f000));
        assert!(!l.in_ram(0x4010_0000));
        assert!(!l.in_ram(u64::MAX));
    }

    const MIB: u64 = 1 << 20;
    fn k(off: u64, size: u64) -> ImageHeader {
        ImageHeader { text_offset: off, effective_size: size }
    }

    #[test]
    fn kernel_at_text_offset_dtb_on_top_ramdisk_below() {
        let l = plan(64 * MIB, 40, &k(0x8_0000, 3 * MIB), Some(5 * MIB)).unwrap();
        assert_eq!(l.kernel, 0x4008_0000);
        assert_eq!(l.dtb, 0x4000_0000 + 62 * MIB);
        assert_eq!(l.ramdisk, Some((0x4000_0000 + 56 * MIB, 5 * MIB)));
    }

    #[test]
    fn too_small_is_refused() {
        assert!(matches!(plan(4 * MIB, 40, &k(0x8_0000, 3 * MIB), None), Err(LayoutError::TooSmall { .. })));
        assert!(matches!(plan(MIB, 40, &k(0, 4096), None), Err(LayoutError::TooSmall { .. })));
    }

    #[test]
    fn ram_beyond_ipa_space_is_refused() {
        assert!(matches!(plan(1 << 40, 40, &k(0, 4096), None), Err(LayoutError::BeyondIpa { .. })));
        assert!(matches!(plan(u64::MAX, 48, &k(0, 4096), None), Err(LayoutError::BeyondIpa { .. })));
    }

    #[test]
    fn unaligned_text_offset_is_refused() {
        assert!(matches!(plan(64 * MIB, 40, &k(0x123, 4096), None), Err(LayoutError::BadTextOffset { .. })));
    }

    #[test]
    fn images_go_into_blocks_where_allowed_and_pages_elsewhere() {
        const M2: u64 = 2 << 20;
        let ram = RAM_BASE..RAM_BASE + 64 * M2;
        let kernel = RAM_BASE + 0x8_0000..RAM_BASE + 0x8_0000 + 5 * M2 / 2;
        let ramdisk = RAM_BASE + 60 * M2..RAM_BASE + 62 * M2 + 0x1000;
        let dtb = RAM_BASE + 63 * M2..RAM_BASE + 63 * M2 + 0x2345;
        let units = image_units(&[kernel.clone(), ramdisk.clone(), dtb.clone()], ram.clone(), true);
        let blocks = |i: &[u64]| i.iter().map(|&b| (RAM_BASE + b * M2, M2)).collect::<Vec<_>>();
        assert_eq!(
            units,
            blocks(&[0, 1, 2, 60, 61, 62, 63]),
            "the ramdisk's last page and the dtb share no block"
        );
        let pages = image_units(std::slice::from_ref(&dtb), ram.clone(), false);
        assert_eq!(pages, [(dtb.start, 0x1000), (dtb.start + 0x1000, 0x1000), (dtb.start + 0x2000, 0x1000)]);
        let both = image_units(
            &[ramdisk.start..ramdisk.start + 0x1800, ramdisk.start + 0x1800..ramdisk.start + 0x3000],
            ram.clone(),
            false,
        );
        assert_eq!(both.len(), 3, "a page two images share is one unit: {both:x?}");
        // RAM ending inside a block: pages there.
        let short = RAM_BASE..RAM_BASE + M2 + 0x3000;
        let piece = RAM_BASE + M2..RAM_BASE + M2 + 0x2000;
        let tail = image_units(std::slice::from_ref(&piece), short, true);
        assert_eq!(tail, [(RAM_BASE + M2, 0x1000), (RAM_BASE + M2 + 0x1000, 0x1000)]);
        let empty = dtb.start..dtb.start;
        assert!(
            image_units(std::slice::from_ref(&empty), ram, true).is_empty(),
            "an empty image needs nothing"
        );
    }
}

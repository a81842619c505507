//! The PL011 UART each guest sees at 0x0900_0000: transmit only, always ready, its output
//! collected into lines that the hypervisor prints with the guest's name in front.
//!
//! It owns only this device's register state and line buffer. It never blocks and never
//! trusts the access: unknown offsets read as zero and ignore writes; misaligned accesses are
//! refused so the caller injects an abort.

/// Bytes buffered before a line is forced out.
pub const LINE_MAX: usize = 256;

const DR: u64 = 0x000;
const FR: u64 = 0x018;
const IBRD: u64 = 0x024;
const FBRD: u64 = 0x028;
const LCR_H: u64 = 0x02c;
const CR: u64 = 0x030;
const IFLS: u64 = 0x034;
const IMSC: u64 = 0x038;
const RIS: u64 = 0x03c;
const MIS: u64 = 0x040;
const ICR: u64 = 0x044;
const PERIPH_ID: u64 = 0xfe0;
/// PL011 r1p5 and PrimeCell identification, as Linux's AMBA bus probes them.
const IDS: [u32; 8] = [0x11, 0x10, 0x14, 0x00, 0x0d, 0xf0, 0x05, 0xb1];
/// FR: receive FIFO empty, transmit FIFO empty.
const FR_READY: u32 = (1 << 4) | (1 << 7);

pub struct VPl011 {
    line: [u8; LINE_MAX],
    len: usize,
    ibrd: u32,
    fbrd: u32,
    lcr_h: u32,
    cr: u32,
    ifls: u32,
    imsc: u32,
}

impl Default for VPl011 {
    fn default() -> Self {
        Self::new()
    }
}

impl VPl011 {
    pub const fn new() -> Self {
        VPl011 { line: [0; LINE_MAX], len: 0, ibrd: 0, fbrd: 0, lcr_h: 0, cr: 0x300, ifls: 0x12, imsc: 0 }
    }

    /// A read of `size` bytes at `offset`; `None` if the access is not one a PL011 accepts.
    pub fn read(&self, offset: u64, size: u8) -> Option<u32> {
        if !Self::valid(offset, size) {
            return None;
        }
        if let Some(v) = Self::read_constant(offset, size) {
            return Some(v);
        }
        Some(match offset & !3 {
            IBRD => self.ibrd,
            FBRD => self.fbrd,
            LCR_H => self.lcr_h,
            CR => self.cr,
            IFLS => self.ifls,
            IMSC => self.imsc,
            _ => 0,
        })
    }

    /// A read whose value no write changes (the data and flag registers of a UART that is
    /// always ready, the raw and masked interrupt status, the identification registers),
    /// answered without the device's state (and its lock). `None`: anything else, or an
    /// access [`VPl011::read`] refuses.
    #[inline(always)]
    pub fn read_constant(offset: u64, size: u8) -> Option<u32> {
        if !Self::valid(offset, size) {
            return None;
        }
        match offset & !3 {
            DR | RIS | MIS => Some(0),
            FR => Some(FR_READY),
            o if (PERIPH_ID..PERIPH_ID + 32).contains(&o) => Some(IDS[((o - PERIPH_ID) / 4) as usize]),
            _ => None,
        }
    }

    /// A write; `emit` gets each complete line (without its newline). `false` if refused.
    pub fn write(&mut self, offset: u64, size: u8, value: u32, emit: &mut dyn FnMut(&[u8])) -> bool {
        if !Self::valid(offset, size) {
            return false;
        }
        match offset & !3 {
            DR => self.put(value as u8, emit),
            IBRD => self.ibrd = value & 0xffff,
            FBRD => self.fbrd = value & 0x3f,
            LCR_H => self.lcr_h = value & 0xff,
            CR => self.cr = value & 0xffff,
            IFLS => self.ifls = value & 0x3f,
            IMSC => self.imsc = value & 0x7ff,
            ICR => {}
            _ => {}
        }
        true
    }

    /// Whatever is left of an unfinished line (at guest exit).
    pub fn flush(&mut self, emit: &mut dyn FnMut(&[u8])) {
        if self.len > 0 {
            emit(&self.line[..self.len]);
            self.len = 0;
        }
    }

    fn put(&mut self, b: u8, emit: &mut dyn FnMut(&[u8])) {
        match b {
            b'\n' => {
                emit(&self.line[..self.len]);
                self.len = 0;
            }
            b'\r' => {}
            _ => {
                self.line[self.len] = b;
                self.len += 1;
                if self.len == LINE_MAX {
                    emit(&self.line[..self.len]);
                    self.len = 0;
                }
            }
        }
    }

    /// Naturally aligned 8-, 16- and 32-bit accesses inside the 4 KiB frame.
    #[inline(always)]
    fn valid(offset: u64, size: u8) -> bool {
        // Sizes are powers of two: alignment is a mask, not a division.
        matches!(size, 1 | 2 | 4) && offset & (u64::from(size) - 1) == 0 && offset < 0x1000
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(u: &mut VPl011, text: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for &b in text {
            assert!(u.write(DR, 4, b as u32, &mut |l| out.push(l.to_vec())));
        }
        out
    }

    #[test]
    fn collects_lines_and_drops_carriage_returns() {
        let mut u = VPl011::new();
        assert_eq!(lines(&mut u, b"hello\r\nworld\n"), vec![b"hello".to_vec(), b"world".to_vec()]);
    }

    #[test]
    fn long_lines_are_split_not_overflowed() {
        let mut u = VPl011::new();
        let out = lines(&mut u, &[b'x'; LINE_MAX * 2 + 3]);
        assert_eq!(out.len(), 2);
        let mut rest = Vec::new();
        u.flush(&mut |l| rest.push(l.to_vec()));
        assert_eq!(rest, vec![vec![b'x'; 3]]);
    }

    // The lock-free reads agree with the device's own, whatever was written before, and
    // leave every register that a write changes to it.
    #[test]
    fn constant_reads_agree_with_the_device() {
        let mut u = VPl011::new();
        for (o, v) in [(IBRD, 7), (FBRD, 3), (LCR_H, 0x70), (CR, 0x301), (IFLS, 0x9), (IMSC, 0x10)] {
            assert!(u.write(o, 4, v, &mut |_| {}));
        }
        let mut constant = 0;
        for offset in 0..0x1004u64 {
            for size in [1u8, 2, 4, 8] {
                if let Some(v) = VPl011::read_constant(offset, size) {
                    constant += 1;
                    assert_eq!(Some(v), u.read(offset, size), "offset {offset:#x} size {size}");
                }
            }
        }
        assert!(constant > 0);
        for o in [IBRD, FBRD, LCR_H, CR, IFLS, IMSC] {
            assert_eq!(VPl011::read_constant(o, 4), None, "{o:#x} changes with writes");
        }
        assert_eq!(VPl011::read_constant(FR, 4), Some(FR_READY));
        assert_eq!(VPl011::read_constant(FR + 1, 4), None, "misaligned: the device refuses it");
    }

    #[test]
    fn always_ready_and_identifies_as_a_pl011() {
        let u = VPl011::new();
        assert_eq!(u.read(FR, 4).unwrap() & (1 << 5), 0, "TXFF never set");
        assert_eq!(u.read(0xfe0, 4), Some(0x11));
        assert_eq!(u.read(0xffc, 4), Some(0xb1));
    }

    #[test]
    fn control_registers_read_back() {
        let mut u = VPl011::new();
        assert!(u.write(CR, 4, 0x301, &mut |_| {}));
        assert_eq!(u.read(CR, 4), Some(0x301));
    }

    #[test]
    fn misaligned_or_oversized_accesses_are_refused() {
        let mut u = VPl011::new();
        assert_eq!(u.read(0x1, 4), None);
        assert_eq!(u.read(0x0, 8), None);
        assert!(!u.write(0x2, 4, 0, &mut |_| {}));
        assert!(u.write(0x0, 1, b'a' as u32, &mut |_| {}));
    }
}

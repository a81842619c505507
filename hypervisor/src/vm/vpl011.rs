//! The PL011 UART each guest sees at 0x0900_0000. Transmit is always ready, its output collected
//! into lines that the hypervisor prints with the guest's name in front. Receive is a FIFO the
//! hypervisor fills with what the console's user types while the guest has the input focus,
//! with the flags, the interrupt mask, raw and masked status and clear registers as Linux's
//! `amba-pl011` driver uses them: the receive and receive-timeout interrupts are raised while
//! characters wait, the transmit interrupt whenever it is unmasked (the FIFO is always empty).
//!
//! It owns only this device's register state, its line buffer and its receive FIFO, and the
//! level its interrupt line was last reported at. It never blocks and never trusts the access:
//! unknown offsets read as zero and ignore writes; misaligned accesses are refused so the
//! caller injects an abort. A guest that never reads its input loses only its own characters
//! (a full FIFO drops them, counted).

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
/// FR: receive FIFO empty, receive FIFO full, transmit FIFO empty.
const FR_RXFE: u32 = 1 << 4;
const FR_RXFF: u32 = 1 << 6;
const FR_TXFE: u32 = 1 << 7;
/// Interrupt bits (IMSC, RIS, MIS, ICR): receive, transmit, receive timeout.
const INT_RX: u32 = 1 << 4;
const INT_TX: u32 = 1 << 5;
const INT_RT: u32 = 1 << 6;
/// The receive FIFO's depth: deeper than a PL011's 32, because the host's characters arrive
/// in bursts (a pasted or scripted line at once) rather than at a line's baud rate.
pub const RX_FIFO: usize = 512;

pub struct VPl011 {
    line: [u8; LINE_MAX],
    len: usize,
    ibrd: u32,
    fbrd: u32,
    lcr_h: u32,
    cr: u32,
    ifls: u32,
    imsc: u32,
    rx: [u8; RX_FIFO],
    rx_head: usize,
    rx_len: usize,
    /// Characters dropped because the FIFO was full.
    pub rx_dropped: u64,
    /// The interrupt line's level as last reported ([`VPl011::line_change`]).
    line_level: bool,
    /// Output goes out byte by byte rather than in lines (the guest has the input focus, so
    /// a prompt must show before its newline).
    streaming: bool,
}

impl Default for VPl011 {
    fn default() -> Self {
        Self::new()
    }
}

impl VPl011 {
    pub const fn new() -> Self {
        VPl011 {
            line: [0; LINE_MAX],
            len: 0,
            ibrd: 0,
            fbrd: 0,
            lcr_h: 0,
            cr: 0x300,
            ifls: 0x12,
            imsc: 0,
            rx: [0; RX_FIFO],
            rx_head: 0,
            rx_len: 0,
            rx_dropped: 0,
            line_level: false,
            streaming: false,
        }
    }

    /// A character typed for this guest; `false` if its FIFO was full (dropped, counted).
    pub fn push_input(&mut self, b: u8) -> bool {
        if self.rx_len == RX_FIFO {
            self.rx_dropped += 1;
            return false;
        }
        self.rx[(self.rx_head + self.rx_len) % RX_FIFO] = b;
        self.rx_len += 1;
        true
    }

    /// Raw interrupt status: receive and receive timeout while characters wait, transmit
    /// always (nothing ever waits to be sent).
    fn ris(&self) -> u32 {
        INT_TX | if self.rx_len > 0 { INT_RX | INT_RT } else { 0 }
    }

    /// The interrupt line's level now.
    pub fn irq_level(&self) -> bool {
        self.ris() & self.imsc != 0
    }

    /// The new level of the interrupt line if it changed since last asked (the caller tells
    /// the virtual GIC).
    pub fn line_change(&mut self) -> Option<bool> {
        let now = self.irq_level();
        (now != self.line_level).then(|| {
            self.line_level = now;
            now
        })
    }

    /// A read of `size` bytes at `offset`; `None` if the access is not one a PL011 accepts.
    /// Reading DR takes the oldest received character.
    pub fn read(&mut self, offset: u64, size: u8) -> Option<u32> {
        if !Self::valid(offset, size) {
            return None;
        }
        if let Some(v) = Self::read_constant(offset, size, self.rx_len) {
            return Some(v);
        }
        Some(match offset & !3 {
            DR if self.rx_len > 0 => {
                let b = self.rx[self.rx_head];
                self.rx_head = (self.rx_head + 1) % RX_FIFO;
                self.rx_len -= 1;
                u32::from(b)
            }
            DR => 0,
            FR => Self::flags(self.rx_len),
            IBRD => self.ibrd,
            FBRD => self.fbrd,
            LCR_H => self.lcr_h,
            CR => self.cr,
            IFLS => self.ifls,
            IMSC => self.imsc,
            RIS => self.ris(),
            MIS => self.ris() & self.imsc,
            o if (PERIPH_ID..PERIPH_ID + 32).contains(&o) => IDS[((o - PERIPH_ID) / 4) as usize],
            _ => 0,
        })
    }

    /// A read served without the device's lock: the identification registers, and the flags
    /// from `rx_waiting`, the count of received characters the caller mirrors from
    /// [`VPl011::rx_waiting`] (a guest polling FR while it prints never takes the lock).
    /// `None`: anything else (the data and status registers take the FIFO's state), or an
    /// access [`VPl011::read`] refuses.
    #[inline(always)]
    pub fn read_constant(offset: u64, size: u8, rx_waiting: usize) -> Option<u32> {
        if !Self::valid(offset, size) {
            return None;
        }
        match offset & !3 {
            FR => Some(Self::flags(rx_waiting)),
            o if (PERIPH_ID..PERIPH_ID + 32).contains(&o) => Some(IDS[((o - PERIPH_ID) / 4) as usize]),
            _ => None,
        }
    }

    /// FR with `rx_waiting` characters received: transmit always empty.
    #[inline(always)]
    fn flags(rx_waiting: usize) -> u32 {
        FR_TXFE | if rx_waiting == 0 { FR_RXFE } else { 0 } | if rx_waiting >= RX_FIFO { FR_RXFF } else { 0 }
    }

    /// Received characters waiting to be read.
    pub fn rx_waiting(&self) -> usize {
        self.rx_len
    }

    /// A write; `emit` gets each complete line (without its newline, `true`) and, streaming,
    /// each unfinished one as it grows (`false`). `false` if refused.
    pub fn write(&mut self, offset: u64, size: u8, value: u32, emit: &mut dyn FnMut(&[u8], bool)) -> bool {
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
            // Every status bit here follows its condition (characters waiting, the FIFO
            // empty): clearing one that still holds changes nothing.
            ICR => {}
            _ => {}
        }
        true
    }

    /// Streams output or collects it into lines again. Streaming, `emit` gets the line so far
    /// each time it grows (`false`: a prompt shows before its newline) and the whole line at its
    /// end (`true`), so a reader interrupted mid-line can show the line whole again. Turning it
    /// on hands out the unfinished line first.
    pub fn set_streaming(&mut self, on: bool, emit: &mut dyn FnMut(&[u8], bool)) {
        if on && !self.streaming && self.len > 0 {
            emit(&self.line[..self.len], false);
        }
        self.streaming = on;
    }

    pub fn streaming(&self) -> bool {
        self.streaming
    }

    /// Whatever is left of an unfinished line (at guest exit), as a whole line.
    pub fn flush(&mut self, emit: &mut dyn FnMut(&[u8], bool)) {
        if self.len > 0 {
            emit(&self.line[..self.len], true);
            self.len = 0;
        }
    }

    fn put(&mut self, b: u8, emit: &mut dyn FnMut(&[u8], bool)) {
        match b {
            b'\n' => {
                emit(&self.line[..self.len], true);
                self.len = 0;
            }
            b'\r' => {}
            _ => {
                self.line[self.len] = b;
                self.len += 1;
                if self.len == LINE_MAX {
                    emit(&self.line[..self.len], true);
                    self.len = 0;
                } else if self.streaming {
                    emit(&self.line[..self.len], false);
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

    /// What `text` makes the UART hand out: whole lines, and unfinished ones as `+` and the line.
    fn lines(u: &mut VPl011, text: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for &b in text {
            assert!(u.write(DR, 4, b as u32, &mut |l, ended| out.push(part(l, ended))));
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
        u.flush(&mut |l, ended| rest.push(part(l, ended)));
        assert_eq!(rest, vec![vec![b'x'; 3]]);
    }

    // The lock-free reads agree with the device's own, whatever was written before, and
    // leave every register that a write changes to it.
    #[test]
    fn constant_reads_agree_with_the_device() {
        let mut u = VPl011::new();
        for (o, v) in [(IBRD, 7), (FBRD, 3), (LCR_H, 0x70), (CR, 0x301), (IFLS, 0x9), (IMSC, 0x10)] {
            assert!(u.write(o, 4, v, &mut |_, _| {}));
        }
        let mut constant = 0;
        for offset in 0..0x1004u64 {
            for size in [1u8, 2, 4, 8] {
                if let Some(v) = VPl011::read_constant(offset, size, u.rx_waiting()) {
                    constant += 1;
                    assert_eq!(Some(v), u.read(offset, size), "offset {offset:#x} size {size}");
                }
            }
        }
        assert!(constant > 0);
        for o in [IBRD, FBRD, LCR_H, CR, IFLS, IMSC] {
            assert_eq!(VPl011::read_constant(o, 4, 0), None, "{o:#x} changes with writes");
        }
        for o in [DR, RIS, MIS] {
            assert_eq!(VPl011::read_constant(o, 4, 0), None, "{o:#x} takes the receive FIFO's state");
        }
        assert_eq!(VPl011::read_constant(PERIPH_ID + 1, 4, 0), None, "misaligned: the device refuses it");
        assert!(u.push_input(b'x'));
        assert_eq!(
            VPl011::read_constant(FR, 4, u.rx_waiting()),
            u.read(FR, 4),
            "the flags follow the mirror"
        );
    }

    #[test]
    fn always_ready_and_identifies_as_a_pl011() {
        let mut u = VPl011::new();
        assert_eq!(u.read(FR, 4).unwrap() & (1 << 5), 0, "TXFF never set");
        assert_eq!(u.read(0xfe0, 4), Some(0x11));
        assert_eq!(u.read(0xffc, 4), Some(0xb1));
    }

    #[test]
    fn control_registers_read_back() {
        let mut u = VPl011::new();
        assert!(u.write(CR, 4, 0x301, &mut |_, _| {}));
        assert_eq!(u.read(CR, 4), Some(0x301));
    }

    #[test]
    fn misaligned_or_oversized_accesses_are_refused() {
        let mut u = VPl011::new();
        assert_eq!(u.read(0x1, 4), None);
        assert_eq!(u.read(0x0, 8), None);
        assert!(!u.write(0x2, 4, 0, &mut |_, _| {}));
        assert!(u.write(0x0, 1, b'a' as u32, &mut |_, _| {}));
    }

    #[test]
    fn typed_characters_are_read_in_order_and_raise_the_line_while_they_wait() {
        let mut u = VPl011::new();
        assert_eq!(u.read(FR, 4).unwrap() & FR_RXFE, FR_RXFE, "nothing received yet");
        assert!(u.push_input(b'h') && u.push_input(b'i'));
        assert_eq!(u.line_change(), None, "masked: the line stays low");
        assert!(u.write(IMSC, 4, INT_RX | INT_RT, &mut |_, _| {}));
        assert_eq!(u.line_change(), Some(true));
        assert_eq!(u.line_change(), None, "reported once");
        assert_eq!(u.read(MIS, 4), Some(INT_RX | INT_RT));
        assert!(u.write(ICR, 4, 0x7ff, &mut |_, _| {}));
        assert_eq!(u.read(MIS, 4), Some(INT_RX | INT_RT), "still waiting: still raised");
        assert_eq!(u.read(FR, 4).unwrap() & FR_RXFE, 0);
        assert_eq!(u.read(DR, 4), Some(u32::from(b'h')));
        assert_eq!(u.read(DR, 1), Some(u32::from(b'i')));
        assert_eq!(u.read(FR, 4).unwrap() & FR_RXFE, FR_RXFE);
        assert_eq!(u.read(DR, 4), Some(0), "an empty FIFO reads 0");
        assert_eq!(u.line_change(), Some(false), "drained: the line drops");
        assert_eq!(u.read(RIS, 4), Some(INT_TX), "transmit is always ready");
    }

    #[test]
    fn a_guest_that_never_reads_loses_only_what_does_not_fit() {
        let mut u = VPl011::new();
        let kept = (0..RX_FIFO + 68).filter(|&i| u.push_input(i as u8)).count();
        assert_eq!((kept, u.rx_dropped), (RX_FIFO, 68));
        assert_eq!(u.read(FR, 4).unwrap() & FR_RXFF, FR_RXFF);
        assert_eq!(u.read(DR, 4), Some(0), "the oldest character is first");
        assert!(u.push_input(200));
        for want in (1..RX_FIFO as u32).map(|i| i % 256).chain([200]) {
            assert_eq!(u.read(DR, 4), Some(want));
        }
    }

    fn part(line: &[u8], ended: bool) -> Vec<u8> {
        if ended {
            line.to_vec()
        } else {
            [b"+", line].concat()
        }
    }

    #[test]
    fn streaming_hands_out_each_unfinished_line_as_it_grows() {
        let mut u = VPl011::new();
        assert!(lines(&mut u, b"/ # ").is_empty());
        let mut out = Vec::new();
        u.set_streaming(true, &mut |l, ended| out.push(part(l, ended)));
        assert_eq!(out, vec![b"+/ # ".to_vec()], "the unfinished line first");
        assert_eq!(
            lines(&mut u, b"ls\r\n"),
            vec![b"+/ # l".to_vec(), b"+/ # ls".to_vec(), b"/ # ls".to_vec()],
            "the line so far at each byte, then the whole line"
        );
        u.set_streaming(false, &mut |_, _| panic!("nothing to hand out"));
        assert_eq!(lines(&mut u, b"ab\n"), vec![b"ab".to_vec()], "lines again");
    }
}

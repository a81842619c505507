//! The Arm PrimeCell UART (PL011) as Labyrinth's console: transmit polled, receive read from
//! its interrupt handler (what the console's user types, for the guest that has the input).
//!
//! It owns nothing but the register block it is given, and it never waits without bound: a
//! UART whose FIFO never drains drops characters instead of hanging the hypervisor.

use tock_registers::{
    interfaces::{ReadWriteable, Readable, Writeable},
    register_bitfields, register_structs,
    registers::{ReadOnly, ReadWrite, WriteOnly},
};

register_bitfields! {u32,
    pub DR [
        DATA OFFSET(0) NUMBITS(8) []
    ],
    pub FR [
        /// Transmit FIFO full.
        TXFF OFFSET(5) NUMBITS(1) [],
        /// Receive FIFO empty.
        RXFE OFFSET(4) NUMBITS(1) [],
        /// UART busy transmitting.
        BUSY OFFSET(3) NUMBITS(1) []
    ],
    pub LCR_H [
        WLEN OFFSET(5) NUMBITS(2) [
            Bits8 = 0b11
        ],
        FEN OFFSET(4) NUMBITS(1) []
    ],
    pub CR [
        RXE OFFSET(9) NUMBITS(1) [],
        TXE OFFSET(8) NUMBITS(1) [],
        UARTEN OFFSET(0) NUMBITS(1) []
    ],
    pub IMSC [
        /// Receive timeout: characters wait in the FIFO below its trigger level.
        RTIM OFFSET(6) NUMBITS(1) [],
        /// Receive: the FIFO reached its trigger level.
        RXIM OFFSET(4) NUMBITS(1) [],
        ALL OFFSET(0) NUMBITS(11) []
    ]
}

register_structs! {
    pub Pl011Registers {
        (0x00 => pub dr: ReadWrite<u32, DR::Register>),
        (0x04 => _reserved0),
        (0x18 => pub fr: ReadOnly<u32, FR::Register>),
        (0x1c => _reserved1),
        (0x2c => pub lcr_h: ReadWrite<u32, LCR_H::Register>),
        (0x30 => pub cr: ReadWrite<u32, CR::Register>),
        (0x34 => _reserved2),
        (0x38 => pub imsc: ReadWrite<u32, IMSC::Register>),
        (0x3c => _reserved3),
        (0x44 => pub icr: WriteOnly<u32>),
        (0x48 => @END),
    }
}

/// How many times a write polls a full FIFO before it drops the character.
const TX_SPIN_LIMIT: u32 = 1 << 20;

pub struct Pl011<'a> {
    regs: &'a Pl011Registers,
}

impl<'a> Pl011<'a> {
    pub fn new(regs: &'a Pl011Registers) -> Self {
        Pl011 { regs }
    }

    /// Enables the transmitter with 8-bit words and FIFOs, interrupts masked. The baud rate is
    /// left as firmware set it: the console's other end was configured for it.
    pub fn enable(&self) {
        self.regs.imsc.set(0);
        self.regs.lcr_h.write(LCR_H::WLEN::Bits8 + LCR_H::FEN::SET);
        self.regs.cr.modify(CR::UARTEN::SET + CR::TXE::SET);
    }

    /// Turns the receiver on and its interrupts (receive and receive timeout) on, so a
    /// character typed raises the UART's interrupt line.
    pub fn enable_receive(&self) {
        self.regs.icr.set(0x7ff);
        self.regs.cr.modify(CR::RXE::SET);
        self.regs.imsc.write(IMSC::RXIM::SET + IMSC::RTIM::SET);
    }

    /// The next received byte, if one waits (the interrupt clears once the FIFO is empty).
    pub fn read_byte(&self) -> Option<u8> {
        if self.regs.fr.is_set(FR::RXFE) {
            return None;
        }
        Some(self.regs.dr.read(DR::DATA) as u8)
    }

    /// Sends one byte, waiting a bounded time for FIFO space. Returns false if it was dropped.
    pub fn write_byte(&self, byte: u8) -> bool {
        let mut spins = 0;
        while self.regs.fr.is_set(FR::TXFF) {
            spins += 1;
            if spins >= TX_SPIN_LIMIT {
                return false;
            }
            core::hint::spin_loop();
        }
        self.regs.dr.write(DR::DATA.val(byte as u32));
        true
    }
}

impl core::fmt::Write for Pl011<'_> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                self.write_byte(b'\r');
            }
            self.write_byte(b);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::fmt::Write;

    /// A fake register block in host memory: word-aligned and as large as the real one.
    #[repr(C, align(4))]
    struct FakeUart([u32; 0x48 / 4]);

    fn regs(f: &FakeUart) -> &Pl011Registers {
        // The fake has the register block's size and alignment.
        let p = f as *const FakeUart as *const Pl011Registers;
        // SAFETY: FakeUart is 0x48 bytes, 4-aligned, like Pl011Registers, and outlives the borrow.
        unsafe { &*p }
    }

    #[test]
    fn writes_bytes_to_dr_and_expands_newlines() {
        let fake = FakeUart([0; 0x48 / 4]);
        let mut u = Pl011::new(regs(&fake));
        u.enable();
        assert_eq!(regs(&fake).cr.read(CR::UARTEN), 1);
        assert_eq!(regs(&fake).cr.read(CR::TXE), 1);
        writeln!(u, "a").unwrap();
        // Last byte written wins in the fake DR.
        assert_eq!(regs(&fake).dr.read(DR::DATA), b'\n' as u32);
    }

    #[test]
    fn receives_only_when_the_fifo_holds_a_byte() {
        let mut raw = [0u32; 0x48 / 4];
        raw[0x18 / 4] = 1 << 4; // RXFE
        raw[0] = u32::from(b'q');
        let fake = FakeUart(raw);
        let u = Pl011::new(regs(&fake));
        assert_eq!(u.read_byte(), None, "an empty FIFO gives nothing, whatever DR holds");
        regs(&fake).imsc.set(0);
        u.enable_receive();
        assert_eq!(regs(&fake).imsc.get(), (1 << 4) | (1 << 6), "receive and receive-timeout interrupts");
        assert_eq!(regs(&fake).cr.read(CR::RXE), 1);
        let raw = [0u32; 0x48 / 4];
        let fake = FakeUart(raw);
        regs(&fake).dr.set(u32::from(b'q') | 0x100);
        assert_eq!(Pl011::new(regs(&fake)).read_byte(), Some(b'q'), "the data byte, error bits dropped");
    }

    #[test]
    fn full_fifo_drops_instead_of_hanging() {
        let mut raw = [0u32; 0x48 / 4];
        raw[0x18 / 4] = 1 << 5; // TXFF stuck
        let fake = FakeUart(raw);
        let u = Pl011::new(regs(&fake));
        assert!(!u.write_byte(b'x'));
        assert_eq!(regs(&fake).dr.get(), 0);
    }
}

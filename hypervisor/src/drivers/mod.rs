//! Drivers for the host devices Labyrinth itself uses. Each is a register model over an MMIO
//! block whose address the arch code maps and hands in; none decides where its device is.
pub mod pl011;

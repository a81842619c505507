//! Fuzz harnesses for what a guest controls directly: the syndrome of its traps (decoding and
//! system-register classification) and the emulated PL011. Each takes arbitrary bytes, runs
//! them through the code a trap reaches and checks the result against a reference written here
//! from the architecture (field layouts) or the device's documented behaviour, independently of
//! the code under test. A divergence is an `Err`; the fuzz targets panic on it, and the host
//! tests replay every checked-in corpus and regression input through the same functions.
//!
//! Compiled for tests and the fuzz crate (feature `model`) only, never into the hypervisor.

use std::format;
use std::string::String;
use std::vec::Vec;

use super::budget::MemoryBudget;
use super::exit::load_value;
use super::guest::{Vm, VmParts};
use super::layout::Layout;
use super::trap::{decode, is_dc_set_way, is_gic_sgi_register, GuestTrap, MmioAccess};
use super::vcpu::{GuestRegs, VcpuHw};
use super::vgic;
use super::vpl011::{VPl011, LINE_MAX};
use super::vtimer::{self, PhysTimerReg};
use crate::dt::{FixedList, GuestConfig, Module, ModuleKind, Region, SharedMem};
use crate::esr::Syndrome;
use crate::frame::{Promise, Unpromised, VmId};
use crate::stage2::model::ModelEnv;
use crate::stage2::{Geometry, Stage2};

/// Test guests draw nothing beyond their promise.
static NOTHING_UNPROMISED: Unpromised = Unpromised::new();

macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

/// `bits` bits of `v` from bit `at` on.
fn field(v: u64, at: u32, bits: u32) -> u64 {
    (v >> at) & ((1 << bits) - 1)
}

/// ESR_EL2 as the Arm ARM lays it out (D17.2.37), for the aborts, HVC/SMC and MSR/MRS traps.
mod esr {
    pub const EC_AT: u32 = 26;
    pub const ISS_BITS: u32 = 25;
    pub const EC_IABT_LOW: u64 = 0x20;
    pub const EC_DABT_LOW: u64 = 0x24;
    pub const EC_HVC64: u64 = 0x16;
    pub const EC_SMC64: u64 = 0x17;
    pub const EC_SYS64: u64 = 0x18;
    /// Data abort ISS: ISV, SAS, SSE, SRT, SF, FnV, WnR, DFSC.
    pub const ISV: u32 = 24;
    pub const SAS: u32 = 22;
    pub const SSE: u32 = 21;
    pub const SRT: u32 = 16;
    pub const SF: u32 = 15;
    pub const FNV: u32 = 10;
    pub const WNR: u32 = 6;
    /// MSR/MRS ISS: Op0, Op2, Op1, CRn, Rt, CRm, Direction (1 = read).
    pub const OP0: u32 = 20;
    pub const OP2: u32 = 17;
    pub const OP1: u32 = 14;
    pub const CRN: u32 = 10;
    pub const RT: u32 = 5;
    pub const CRM: u32 = 1;
    /// HPFAR_EL2.FIPA: IPA[51:12] in bits [43:4].
    pub const FIPA_AT: u32 = 4;
    pub const FIPA_BITS: u32 = 40;
}

/// The little-endian `u64` at `data[at..]`, zero-padded.
fn u64_at(data: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    for (i, d) in b.iter_mut().enumerate() {
        *d = data.get(at + i).copied().unwrap_or(0);
    }
    u64::from_le_bytes(b)
}

/// Trap decoding: `data` is ESR_EL2, FAR_EL2 and HPFAR_EL2 (8 bytes each, little-endian,
/// zero-padded). Checks every field the decoder reports against the register layouts, and
/// what an emulated MMIO load puts in the guest's register (`exit::load_value`).
pub fn trap(data: &[u8]) -> Result<(), String> {
    let (esr, far, hpfar) = (u64_at(data, 0), u64_at(data, 8), u64_at(data, 16));
    let t = decode(esr, far, hpfar);
    ensure!(t == decode(esr, far, hpfar), "decoding {esr:#x} is not deterministic");
    // ESR_EL2[63:32] (ISS2) and RES0 bits say nothing the decoder uses.
    ensure!(t == decode(esr & 0xffff_ffff, far, hpfar), "ESR {esr:#x}: bits above 31 changed the decoding");
    let ec = field(esr, esr::EC_AT, 6);
    let iss = field(esr, 0, esr::ISS_BITS);
    let bit = |at: u32| iss & (1 << at) != 0;
    let s = Syndrome(esr);
    ensure!(u64::from(s.class()) == ec && u64::from(s.iss()) == iss, "Syndrome fields of {esr:#x}");
    ensure!(!s.class_name().is_empty(), "EC {ec:#x} has no name");
    let abort_class = matches!(ec, 0x20 | 0x21 | 0x24 | 0x25);
    ensure!(s.fault_status_name().is_some() == abort_class, "EC {ec:#x}: fault status name");
    match (ec, t) {
        (esr::EC_IABT_LOW | esr::EC_DABT_LOW, GuestTrap::Abort { instruction, ipa, fsc, write, access }) => {
            let data_abort = ec == esr::EC_DABT_LOW;
            ensure!(instruction == !data_abort, "ESR {esr:#x}: instruction {instruction}");
            ensure!(u64::from(fsc) == field(iss, 0, 6), "ESR {esr:#x}: fault status {fsc:#x}");
            ensure!(write == (data_abort && bit(esr::WNR)), "ESR {esr:#x}: write {write}");
            // HPFAR_EL2 holds the IPA for translation and access-flag faults only, and FAR's
            // page offset only when FAR is valid.
            let want_ipa = (matches!(fsc, 0x04..=0x0b) && !bit(esr::FNV))
                .then(|| field(hpfar, esr::FIPA_AT, esr::FIPA_BITS) << 12 | (far & 0xfff));
            ensure!(
                ipa == want_ipa,
                "ESR {esr:#x} HPFAR {hpfar:#x} FAR {far:#x}: IPA {ipa:x?}, not {want_ipa:x?}"
            );
            ensure!(ipa.is_none_or(|a| a < 1 << 52), "IPA {ipa:x?} beyond 52 bits");
            let want_access = (data_abort && bit(esr::ISV) && !bit(esr::FNV)).then(|| MmioAccess {
                size: 1 << field(iss, esr::SAS, 2),
                write,
                reg: field(iss, esr::SRT, 5) as u8,
                sign_extend: bit(esr::SSE),
                sixty_four: bit(esr::SF),
            });
            ensure!(access == want_access, "ESR {esr:#x}: access {access:?}, not {want_access:?}");
            if let Some(a) = access {
                // What a load puts in its register (FAR and HPFAR as device values): the low
                // SAS bytes, sign- or zero-extended, a W register's upper half zero.
                for v in [far, hpfar, !far] {
                    let bits = 8 * u32::from(a.size);
                    let low = if bits == 64 { v } else { v & ((1 << bits) - 1) };
                    let ext =
                        if a.sign_extend { ((low << (64 - bits)) as i64 >> (64 - bits)) as u64 } else { low };
                    let want = if a.sixty_four { ext } else { ext & 0xffff_ffff };
                    let got = load_value(a, v);
                    ensure!(got == want, "{a:?} loading {v:#x} gives {got:#x}, not {want:#x}");
                }
            }
        }
        (esr::EC_HVC64, GuestTrap::Hvc { imm }) | (esr::EC_SMC64, GuestTrap::Smc { imm }) => {
            ensure!(u64::from(imm) == field(iss, 0, 16), "ESR {esr:#x}: immediate {imm:#x}");
        }
        (esr::EC_SYS64, GuestTrap::SysReg { read, reg, encoding }) => {
            ensure!(read == bit(0), "ESR {esr:#x}: read {read}");
            ensure!(u64::from(reg) == field(iss, esr::RT, 5), "ESR {esr:#x}: register {reg}");
            // Op0, Op2, Op1, CRn (bits 21:10) and CRm (4:1); Rt, the direction and the RES0
            // bits 24:22 are not part of the encoding.
            let want = iss & (field(u64::MAX, 0, 12) << esr::CRN | field(u64::MAX, 0, 4) << esr::CRM);
            ensure!(u64::from(encoding) == want, "ESR {esr:#x}: encoding {encoding:#x}, not {want:#x}");
            classify(encoding)?;
        }
        (_, GuestTrap::Other { class }) => {
            ensure!(u64::from(class) == ec, "ESR {esr:#x}: class {class:#x}");
            ensure!(
                !matches!(
                    ec,
                    esr::EC_IABT_LOW | esr::EC_DABT_LOW | esr::EC_HVC64 | esr::EC_SMC64 | esr::EC_SYS64
                ),
                "ESR {esr:#x}: a handled class decoded as Other"
            );
        }
        (_, t) => return Err(format!("ESR {esr:#x} (EC {ec:#x}) decoded as {t:?}")),
    }
    Ok(())
}

/// The system instructions a trapped MSR/MRS `encoding` (`GuestTrap::SysReg`) is classified
/// as, against the encodings the Arm ARM gives them: DC ISW/CSW/CISW (op0 1, op1 0, CRn 7,
/// op2 2, CRm 6/10/14), ICC_SGI1R/ASGI1R/SGI0R_EL1 (op0 3, op1 0, CRn 12, CRm 11, op2 5-7)
/// and CNTP_TVAL/CTL/CVAL_EL0 (op0 3, op1 3, CRn 14, CRm 2, op2 0/1/2).
fn classify(encoding: u32) -> Result<(), String> {
    let e = u64::from(encoding);
    let (op0, op2, op1) = (field(e, esr::OP0, 2), field(e, esr::OP2, 3), field(e, esr::OP1, 3));
    let (crn, crm) = (field(e, esr::CRN, 4), field(e, esr::CRM, 4));
    let set_way = op0 == 1 && op1 == 0 && crn == 7 && op2 == 2 && matches!(crm, 6 | 10 | 14);
    let sgi = op0 == 3 && op1 == 0 && crn == 12 && crm == 11 && matches!(op2, 5..=7);
    ensure!(is_dc_set_way(encoding) == set_way, "encoding {encoding:#x}: DC set/way {}", !set_way);
    ensure!(is_gic_sgi_register(encoding) == sgi, "encoding {encoding:#x}: SGI register {}", !sgi);
    let timer = (op0 == 3 && op1 == 3 && crn == 14 && crm == 2).then_some(op2).and_then(|op2| {
        [PhysTimerReg::Tval, PhysTimerReg::Ctl, PhysTimerReg::Cval].get(op2 as usize).copied()
    });
    let got = vtimer::classify(encoding);
    ensure!(got == timer, "encoding {encoding:#x}: physical timer register {got:?}, not {timer:?}");
    Ok(())
}

/// System-register classification: `data` is a sequence of 32-bit values (little-endian), each
/// taken as the ISS of a trapped MSR/MRS and, whole, as an encoding handed to the classifiers.
/// Classification depends on the encoding's fields only, never on Rt, direction or other bits.
pub fn sysreg(data: &[u8]) -> Result<(), String> {
    for chunk in data.chunks(4) {
        let v = u64_at(chunk, 0) as u32;
        let esr =
            esr::EC_SYS64 << esr::EC_AT | 1 << esr::ISS_BITS | u64::from(v) & ((1 << esr::ISS_BITS) - 1);
        let GuestTrap::SysReg { encoding, .. } = decode(esr, 0, 0) else {
            return Err(format!("ESR {esr:#x} is not a system register trap"));
        };
        classify(encoding)?;
        // The classifiers read the op0/op1/op2/CRn/CRm bits (mask 0x3ffc1e) and nothing else.
        let fields = v & 0x3f_fc1e;
        ensure!(is_dc_set_way(v) == is_dc_set_way(fields), "{v:#x}: DC set/way reads other bits");
        ensure!(
            is_gic_sgi_register(v) == is_gic_sgi_register(fields),
            "{v:#x}: SGI register reads other bits"
        );
    }
    Ok(())
}

/// The PL011 as its documentation and `vpl011`'s contract describe it, written independently:
/// register values after masking, and the line discipline of the transmit side.
struct Pl011Reference {
    /// (offset, mask, value) of the read/write registers.
    regs: [(u64, u32, u32); 6],
    line: Vec<u8>,
    lines: Vec<Vec<u8>>,
}

impl Pl011Reference {
    fn new() -> Self {
        // IBRD, FBRD, LCR_H, CR (reset: TXE | RXE), IFLS (reset: 1/2 full), IMSC.
        let regs = [
            (0x24, 0xffff, 0),
            (0x28, 0x3f, 0),
            (0x2c, 0xff, 0),
            (0x30, 0xffff, 0x300),
            (0x34, 0x3f, 0x12),
            (0x38, 0x7ff, 0),
        ];
        Pl011Reference { regs, line: Vec::new(), lines: Vec::new() }
    }

    fn accepts(offset: u64, size: u8) -> bool {
        matches!(size, 1 | 2 | 4) && offset.is_multiple_of(u64::from(size)) && offset < 0x1000
    }

    fn read(&self, offset: u64, size: u8) -> Option<u32> {
        if !Self::accepts(offset, size) {
            return None;
        }
        let word = offset & !3;
        const IDS: [u32; 8] = [0x11, 0x10, 0x14, 0x00, 0x0d, 0xf0, 0x05, 0xb1];
        Some(match word {
            // FR: transmit and receive FIFOs empty, never busy, never full.
            0x18 => 0x90,
            // RIS, MIS: nothing received, so only transmit (always ready) is raised.
            0x3c => 0x20,
            0x40 => 0x20 & self.regs[5].2,
            0xfe0..=0xffc => IDS[((word - 0xfe0) / 4) as usize],
            _ => self.regs.iter().find(|r| r.0 == word).map_or(0, |r| r.2),
        })
    }

    fn write(&mut self, offset: u64, size: u8, value: u32) -> bool {
        if !Self::accepts(offset, size) {
            return false;
        }
        let word = offset & !3;
        if word == 0 {
            match value as u8 {
                b'\n' => self.lines.push(core::mem::take(&mut self.line)),
                b'\r' => {}
                b => {
                    self.line.push(b);
                    if self.line.len() == LINE_MAX {
                        self.lines.push(core::mem::take(&mut self.line));
                    }
                }
            }
        } else if let Some(r) = self.regs.iter_mut().find(|r| r.0 == word) {
            r.2 = value & r.1;
        }
        true
    }
}

/// The emulated PL011: `data` is a sequence of 7-byte accesses (control: bit 0 write, bits 1-2
/// log2 size; offset: 16 bits, up to 0x1fff so some fall outside the frame; value: 32 bits).
/// Every read, every refusal and every line the UART emits must be the reference's; lines are
/// never longer than `LINE_MAX` and carry no line ending.
pub fn pl011(data: &[u8]) -> Result<(), String> {
    let mut uart = VPl011::new();
    let mut reference = Pl011Reference::new();
    let mut lines: Vec<Vec<u8>> = Vec::new();
    let mut checked = 0;
    for (n, a) in data.chunks_exact(7).enumerate() {
        let (write, size) = (a[0] & 1 != 0, 1u8 << ((a[0] >> 1) & 3));
        let offset = u64::from(u16::from_le_bytes([a[1], a[2]]) & 0x1fff);
        let value = u32::from_le_bytes([a[3], a[4], a[5], a[6]]);
        if write {
            let got = uart.write(offset, size, value, &mut |l, _| lines.push(l.to_vec()));
            let want = reference.write(offset, size, value);
            ensure!(got == want, "access {n}: write of {size} at {offset:#x} accepted: {got}, not {want}");
        } else {
            let (got, want) = (uart.read(offset, size), reference.read(offset, size));
            ensure!(got == want, "access {n}: read of {size} at {offset:#x} gave {got:x?}, not {want:x?}");
        }
        // Lines are compared as they come (the ones before were equal already).
        if lines.len() != checked || reference.lines.len() != checked {
            ensure!(lines == reference.lines, "access {n}: lines {lines:?}, not {:?}", reference.lines);
            checked = lines.len();
        }
    }
    uart.flush(&mut |l, _| lines.push(l.to_vec()));
    if !reference.line.is_empty() {
        reference.lines.push(core::mem::take(&mut reference.line));
    }
    ensure!(lines == reference.lines, "at the end: lines {lines:?}, not {:?}", reference.lines);
    for l in &lines {
        ensure!(l.len() <= LINE_MAX && !l.contains(&b'\n') && !l.contains(&b'\r'), "line {l:?} emitted");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every file of `fuzz/corpus/TARGET` and `fuzz/regressions/TARGET` through `run`.
    fn replay(target: &str, run: fn(&[u8]) -> Result<(), String>) {
        let mut n = 0;
        for dir in ["corpus", "regressions"] {
            let dir = format!("{}/fuzz/{dir}/{target}", env!("CARGO_MANIFEST_DIR"));
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for e in entries.flatten() {
                let data = std::fs::read(e.path()).expect("readable corpus file");
                if let Err(err) = run(&data) {
                    panic!("{}: {err}", e.path().display());
                }
                n += 1;
            }
        }
        assert!(n > 0, "no {target} corpus to replay");
    }

    #[test]
    fn trap_corpus_and_regressions_replay() {
        replay("trap_decode", trap);
    }

    #[test]
    fn sysreg_corpus_and_regressions_replay() {
        replay("sysreg", sysreg);
    }

    #[test]
    fn pl011_corpus_and_regressions_replay() {
        replay("vpl011", pl011);
    }

    #[test]
    fn exit_path_corpus_and_regressions_replay() {
        replay("exit_path", exit_path);
    }

    /// Pseudo-random byte strings (a fixed LCG: the same inputs every run) through the exit
    /// path harness: what the fuzzer does, a little, in every `cargo test`.
    #[test]
    fn exit_path_survives_random_inputs() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..2_000 {
            let len = (state >> 33) as usize % 400;
            let data: Vec<u8> = (0..len)
                .map(|_| {
                    state =
                        state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                    (state >> 56) as u8
                })
                .collect();
            if let Err(e) = exit_path(&data) {
                panic!("{e} on {data:02x?}");
            }
        }
    }

    /// Every MSR/MRS encoding (16 bits of fields) with Rt 0 and 31, both directions.
    #[test]
    fn every_system_register_encoding_is_classified_as_the_arm_arm_says() {
        for fields in 0..1u32 << 16 {
            // Spread the 16 field bits over op0/op2/op1/CRn (bits 10-21) and CRm (bits 1-4).
            let encoding = (fields >> 4) << 10 | (fields & 0xf) << 1;
            for extra in [0, 1 | 31 << 5] {
                let esr = 0x18u64 << 26 | u64::from(encoding | extra);
                if let Err(e) = trap(&[esr.to_le_bytes(), [0; 8], [0; 8]].concat()) {
                    panic!("{e}");
                }
            }
        }
    }

    #[test]
    fn long_lines_are_cut_at_line_max() {
        let mut data = Vec::new();
        for _ in 0..LINE_MAX + 5 {
            data.extend_from_slice(&[1, 0, 0, b'y', 0, 0, 0]);
        }
        assert!(pl011(&data).is_ok());
    }
}

// A fake CPU and a test guest, for the exit handling's host tests and its fuzz harness.

/// Guest RAM of the test guest, and where its kernel starts.
pub const RAM: u64 = 0x4000_0000;
pub const KERNEL: u64 = RAM + 0x8_0000;

/// The registers a trap saved.
#[derive(Default)]
pub struct Regs {
    pub x: [u64; 31],
    pub pc: u64,
}

impl GuestRegs for Regs {
    fn x(&self, r: u8) -> u64 {
        self.x.get(r as usize).copied().unwrap_or(0)
    }
    fn set_x(&mut self, r: u8, value: u64) {
        if let Some(x) = self.x.get_mut(r as usize) {
            *x = value;
        }
    }
    fn pc(&self) -> u64 {
        self.pc
    }
    fn skip_instruction(&mut self) {
        self.pc += 4;
    }
}

/// What the handler did to the CPU, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Abort { instruction: bool },
    Undefined,
    Eoi(u32),
    WriteLrs(Vec<u64>),
    Ppi(u32, bool),
    HypTimer(Option<u64>),
    Kick(usize),
    Wake,
}

#[derive(Default)]
pub struct FakeCpu {
    pub events: Vec<Event>,
    pub pending: Vec<u32>,
    pub lrs: [u64; 4],
    pub now: u64,
    pub vtimer: (u64, u64),
    pub console: Vec<String>,
}

impl FakeCpu {
    pub fn saw(&self, e: &Event) -> bool {
        self.events.contains(e)
    }
    pub fn lr_intids(&self) -> Vec<u32> {
        self.lrs
            .iter()
            .filter(|&&lr| lr & (vgic::LR_PENDING | vgic::LR_ACTIVE) != 0)
            .map(|&lr| lr as u32)
            .collect()
    }
}

impl VcpuHw for FakeCpu {
    type Regs = Regs;
    fn inject_external_abort(&mut self, _: &mut Regs, instruction: bool, _: u64) {
        self.events.push(Event::Abort { instruction });
    }
    fn inject_undefined(&mut self, _: &mut Regs) {
        self.events.push(Event::Undefined);
    }
    fn ack(&mut self) -> Option<u32> {
        (!self.pending.is_empty()).then(|| self.pending.remove(0))
    }
    fn eoi(&mut self, intid: u32) {
        self.events.push(Event::Eoi(intid));
    }
    fn lr_count(&self) -> usize {
        self.lrs.len()
    }
    fn read_lrs(&mut self, lrs: &mut [u64]) {
        lrs.copy_from_slice(&self.lrs[..lrs.len()]);
    }
    fn write_lrs(&mut self, lrs: &[u64]) {
        self.lrs[..lrs.len()].copy_from_slice(lrs);
        self.events.push(Event::WriteLrs(lrs.to_vec()));
    }
    fn set_underflow(&mut self, _: bool) {}
    fn set_ppi_enabled(&mut self, intid: u32, on: bool) {
        self.events.push(Event::Ppi(intid, on));
    }
    fn counter(&self) -> u64 {
        self.now
    }
    fn vtimer_registers(&self) -> (u64, u64) {
        self.vtimer
    }
    fn set_hyp_timer(&mut self, deadline: Option<u64>) {
        self.events.push(Event::HypTimer(deadline));
    }
    fn kick(&mut self, cpu: usize) {
        self.events.push(Event::Kick(cpu));
    }
    fn wake_waiters(&mut self) {
        self.events.push(Event::Wake);
    }
    fn console_line(&mut self, guest: &str, line: &[u8]) {
        self.console.push(format!("[{guest}] {}", String::from_utf8_lossy(line)));
    }
}

/// A well-formed configuration: guest `name` with `mib` MiB of RAM, one vCPU, no virtual GIC,
/// its kernel module at 0x5000_0000 and the shared memory nodes `shared`.
pub fn guest_config(name: &'static str, mib: u64, shared: &[SharedMem<'static>]) -> GuestConfig<'static> {
    let kernel =
        Module { kind: ModuleKind::Kernel, region: Region::new(0x5000_0000, 0x1000).unwrap(), node: "k" };
    let mut list = FixedList::filled(SharedMem::NONE);
    for s in shared {
        list.push(*s).expect("at most MAX_SHARED nodes");
    }
    GuestConfig {
        name,
        memory_kib: mib * 1024,
        cpus: 1,
        kernel,
        ramdisk: None,
        device_tree: None,
        bootargs: None,
        no_block_mappings: false,
        guaranteed_kib: None,
        shared: list,
        virtual_gic: false,
    }
}

/// A guest of `vcpus` vCPUs on CPUs 4.., 64 MiB of RAM, with a virtual GIC or not; vCPU 0
/// has its start request.
pub fn test_guest(vcpus: u32, gic: bool) -> Vm {
    let config = GuestConfig { cpus: vcpus, virtual_gic: gic, ..guest_config("g", 64, &[]) };
    let layout = Layout {
        ram_base: RAM,
        ram_size: 64 << 20,
        kernel: KERNEL,
        kernel_size: 0x1000,
        ramdisk: None,
        dtb: RAM + (62 << 20),
    };
    let (id, geo) = (VmId::new(1).unwrap(), Geometry::for_pa_bits(40));
    let mut env = ModelEnv::new(RAM, 64);
    let s2 = Stage2::new(&mut env, id, 1, geo).unwrap();
    let parts = VmParts {
        config,
        id,
        layout,
        geo,
        first_cpu: 4,
        s2,
        dtb: Vec::new(),
        budget: MemoryBudget::new(Promise::unbacked(100), 10, &NOTHING_UNPROMISED).unwrap(),
    };
    let vm = Vm::new(parts).expect("a well-formed test guest");
    assert!(vm.boot_vcpu0());
    vm
}

/// The whole exit path of a 2-vCPU guest with a virtual GIC, driven by arbitrary bytes: MMIO
/// to every device frame and beyond, PSCI calls, trapped system registers, physical
/// interrupts, the counter and the virtual timer moving, the guest acknowledging and
/// completing what its list registers hold, vCPUs starting. After every step: nothing
/// panicked, an interrupt's state lives in one place (no SPI in both vCPUs' list registers,
/// no interrupt twice in one vCPU's, nothing waiting in a list register and pending in the
/// model at once), only the registers the architecture says changed, and the PC moved by 0
/// or 4. A stop ends the input; a reset brings the guest back as firmware would.
pub fn exit_path(data: &[u8]) -> Result<(), String> {
    use super::exit::{handle_irq, handle_sync, Outcome};
    use super::vcpu::{host_irq, Vcpu};
    use crate::psci;

    const OPS: usize = 256;
    let vm = test_guest(2, true);
    let g = vm.vgic.as_ref().ok_or("the test guest has a virtual GIC")?;
    let mut cpus = [FakeCpu::default(), FakeCpu::default()];
    let mut vcpus = [Vcpu::new(&vm, 0, None), Vcpu::new(&vm, 1, None)];
    // Every register holds a value of its own, so that a write to the wrong one shows.
    let mut regs = [Regs::default(), Regs::default()];
    for (c, r) in regs.iter_mut().enumerate() {
        for (i, x) in r.x.iter_mut().enumerate() {
            *x = 0x5a00_0000_0000_0000 | (c as u64) << 8 | i as u64;
        }
    }
    let mut input = data.iter().copied();
    let mut byte = move || input.next();
    for _ in 0..OPS {
        let Some(op) = byte() else { break };
        let mut arg = || byte().unwrap_or(0);
        let v = usize::from(op >> 7);
        let (vcpu, cpu, r) = (&mut vcpus[v], &mut cpus[v], &mut regs[v]);
        let mut before = (r.x, r.pc);
        let mut may_change = [false; 31];
        let mut kick = None;
        let seen = cpu.events.len();
        let word = |b: &mut dyn FnMut() -> u8| (0..8).fold(0u64, |w, i| w | u64::from(b()) << (8 * i));
        let outcome = match op & 7 {
            0 => {
                let base = match arg() % 8 {
                    0 => super::layout::UART_BASE,
                    1 => vgic::GICD_BASE,
                    n @ 2..=5 => vgic::GICR_BASE + u64::from(n - 2) * 0x1_0000,
                    6 => vgic::GICR_BASE + 2 * vgic::GICR_SIZE,
                    _ => RAM + (64 << 20),
                };
                let offset = u64::from(u16::from_le_bytes([arg(), arg()]));
                let shape = arg();
                let (write, reg) = (shape & 4 != 0, arg() % 32);
                let (sign, sixty_four) = (shape & 8 != 0, shape & 16 != 0);
                r.set_x(reg, word(&mut arg));
                before = (r.x, r.pc);
                let ipa = base + offset;
                let esr = (0x24 << 26)
                    | (1 << 25)
                    | (1 << 24)
                    | (u64::from(shape & 3) << 22)
                    | (u64::from(sign) << 21)
                    | (u64::from(reg) << 16)
                    | (u64::from(sixty_four) << 15)
                    | (u64::from(write) << 6)
                    | 0x07;
                // A load writes its register; a store writes none.
                if let Some(x) = may_change.get_mut(usize::from(reg)) {
                    *x = !write;
                }
                handle_sync(vcpu, r, cpu, esr, ipa, (ipa >> 12) << 4)
            }
            1 => {
                let fids = [
                    psci::PSCI_VERSION,
                    psci::PSCI_FEATURES,
                    psci::CPU_ON_64,
                    psci::CPU_ON_32,
                    psci::AFFINITY_INFO_64,
                    psci::AFFINITY_INFO_32,
                    psci::CPU_OFF,
                    psci::SYSTEM_OFF,
                    psci::SYSTEM_RESET,
                    psci::CPU_SUSPEND_64,
                    psci::MIGRATE_INFO_TYPE,
                ];
                let pick = arg();
                let fid = fids.get(usize::from(pick) % 16).copied().map_or_else(|| word(&mut arg), u64::from);
                // x1: a target (CPU_ON, AFFINITY_INFO), a function ID (FEATURES), or anything (a
                // power state for CPU_SUSPEND); x2: the entry point, 0 (AFFINITY_INFO's lowest
                // affinity level), or anything.
                let sel = arg();
                let x1 = match sel % 4 {
                    0 | 1 => u64::from(sel >> 2) % 4,
                    2 => fids.get(usize::from(sel >> 2) % fids.len()).copied().map_or(0, u64::from),
                    _ => word(&mut arg),
                };
                let x2 = match arg() % 4 {
                    0 | 1 => KERNEL,
                    2 => 0,
                    _ => word(&mut arg),
                };
                r.x[..4].copy_from_slice(&[fid, x1, x2, u64::from(arg())]);
                before = (r.x, r.pc);
                // PSCI answers in x0; Labyrinth's own calls (a random word may be one) in x0-x3.
                let results = if super::hypercall::is_ours(fid) { 4 } else { 1 };
                may_change[..results].fill(true);
                handle_sync(vcpu, r, cpu, (0x16 << 26) | (1 << 25), 0, 0)
            }
            2 => {
                let encodings = [
                    vtimer::sysreg_encoding(3, 0, 12, 11, 5),
                    vtimer::sysreg_encoding(3, 0, 12, 11, 6),
                    vtimer::sysreg_encoding(3, 0, 12, 11, 7),
                    vtimer::CNTP_CTL_EL0,
                    vtimer::CNTP_CVAL_EL0,
                    vtimer::CNTP_TVAL_EL0,
                ];
                let pick = arg();
                let encoding = encodings
                    .get(usize::from(pick) % 8)
                    .copied()
                    .unwrap_or_else(|| u32::from_le_bytes([arg(), arg(), arg(), 0]) & 0x3f_fc1e);
                let (read, reg) = (arg() & 1 != 0, arg() % 32);
                r.set_x(reg, word(&mut arg));
                before = (r.x, r.pc);
                // A read (MRS) writes its register; a write (MSR) writes none.
                if let Some(x) = may_change.get_mut(usize::from(reg)) {
                    *x = read;
                }
                let esr =
                    (0x18 << 26) | (1 << 25) | u64::from(encoding) | (u64::from(reg) << 5) | u64::from(read);
                handle_sync(vcpu, r, cpu, esr, 0, 0)
            }
            3 => {
                let irqs = [host_irq::KICK, host_irq::MAINTENANCE, host_irq::VTIMER, host_irq::HYP_TIMER];
                let pick = arg();
                cpu.pending.push(irqs.get(usize::from(pick) % 5).copied().unwrap_or(u32::from(pick)));
                handle_irq(vcpu, cpu)
            }
            7 => {
                // A device drives an interrupt line (an SPI, a PPI of either vCPU, or past the
                // last SPI): an edge or a level. The vCPU that must see it is kicked, as the
                // hypervisor does; this vCPU then takes whatever interrupt it has.
                let (which, how) = (arg(), arg());
                let intid = 16 + u32::from(which) % (16 + vgic::NR_SPIS as u32 + 8);
                let on = usize::from(how >> 2 & 1);
                let to = match how & 3 {
                    0 => g.raise_spi(intid),
                    1 => g.raise(on, intid),
                    n => g.set_line_level(on, intid, n == 2),
                };
                match to {
                    Some(t) if t == v => cpu.pending.push(host_irq::KICK),
                    Some(t) => kick = Some(t),
                    None => {}
                }
                handle_irq(vcpu, cpu)
            }
            4 => {
                cpu.now += u64::from(arg()) * 1000;
                let ctl = u64::from(arg() & 7);
                cpu.vtimer = (ctl, cpu.now.wrapping_add_signed(i64::from(arg() as i8) * 100));
                Outcome::Resume
            }
            5 => {
                // The guest acknowledges (pending to active) or completes (active to invalid).
                let lr = &mut cpu.lrs[usize::from(arg() % 4)];
                if *lr & vgic::LR_ACTIVE != 0 && *lr & vgic::LR_PENDING == 0 {
                    *lr &= !vgic::LR_ACTIVE;
                } else if *lr & vgic::LR_PENDING != 0 {
                    *lr = (*lr & !vgic::LR_PENDING) | vgic::LR_ACTIVE;
                }
                Outcome::Resume
            }
            _ => {
                let _ = vm.power.enter(v);
                Outcome::Resume
            }
        };
        // Registers: only those the trap may write changed; the PC by 0 or 4.
        let pc_moved = r.pc.wrapping_sub(before.1);
        ensure!(pc_moved == 0 || pc_moved == 4, "op {op:#x}: PC moved by {pc_moved:#x}");
        for (i, (&now, &was)) in r.x.iter().zip(before.0.iter()).enumerate() {
            ensure!(now == was || may_change[i], "op {op:#x}: x{i} changed from {was:#x} to {now:#x}");
        }
        // Kicks the exit path sent (a distributor write making another vCPU's SPI pending)
        // arrive at their vCPU's CPU as the kick interrupt, as the device's kick above does.
        let sent = cpus[v].events[seen..].iter().filter_map(|e| match e {
            Event::Kick(c) => c.checked_sub(vm.cpu_of(0)),
            _ => None,
        });
        for t in sent.chain(kick).collect::<Vec<_>>() {
            if let Some(cpu) = cpus.get_mut(t) {
                cpu.pending.push(host_irq::KICK);
            }
        }
        // One place for every interrupt.
        for (c, cpu) in cpus.iter().enumerate() {
            let held: Vec<(u32, u64)> =
                cpu.lrs.iter().filter(|&&lr| lr & vgic::LR_STATE != 0).map(|&lr| (lr as u32, lr)).collect();
            for (i, &(intid, lr)) in held.iter().enumerate() {
                ensure!((intid as usize) < vgic::NR_IRQS, "cpu {c}: INTID {intid} in a list register");
                ensure!(
                    !held[i + 1..].iter().any(|&(other, _)| other == intid),
                    "cpu {c}: INTID {intid} in two list registers"
                );
                // A vCPU with a kick still to take has not synced what a device raised meanwhile.
                if lr & vgic::LR_STATE == vgic::LR_PENDING && !cpu.pending.contains(&host_irq::KICK) {
                    ensure!(
                        !g.is_pending(c, intid),
                        "vCPU {c}: INTID {intid} pending in a list register and the model"
                    );
                }
                if intid >= 32 {
                    let other = &cpus[1 - c].lrs;
                    ensure!(
                        !other.iter().any(|&l| l & vgic::LR_STATE != 0 && l as u32 == intid),
                        "SPI {intid} in both vCPUs' list registers"
                    );
                }
            }
        }
        match outcome {
            Outcome::Stop(_) => break,
            Outcome::Reset => {
                g.reset();
                cpus = [FakeCpu::default(), FakeCpu::default()];
                ensure!(vm.boot_vcpu0(), "vCPU 0 restarts after a reset");
            }
            _ => {}
        }
    }
    Ok(())
}

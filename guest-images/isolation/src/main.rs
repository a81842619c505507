//! `isolation`: tries to reach what a guest must not, one line per attempt (see README.md):
//! `isolation: <what> at <addr>: denied (<exception class>)` or `...: ALLOWED (...)`.
#![no_std]
#![no_main]

use guest_rt::bootargs::parse_hex;
use guest_rt::dt::BootInfo;
use guest_rt::exception;
use guest_rt::{println, psci, PAGE};

guest_rt::entry!(main);

const GICD: u64 = 0x0800_0000;
const FOUR_GIB: u64 = 0x1_0000_0000;
const UART: u64 = 0x0900_0000;
/// "ARM\x64", the arm64 Image magic, as a little-endian word at offset 0x38.
const IMAGE_MAGIC: u32 = 0x644d_5241;
const MAX_PROBES: usize = 16;
/// An MPIDR no CPU has (Aff3 = Aff2 = Aff1 = Aff0 = 0xff).
const BOGUS_MPIDR: u64 = 0xff_00ff_ffff;

#[derive(Default)]
struct Tally {
    attempts: u32,
    denied: u32,
    allowed: u32,
}

impl Tally {
    fn denied(&mut self) {
        self.attempts += 1;
        self.denied += 1;
    }

    fn allowed(&mut self) {
        self.attempts += 1;
        self.allowed += 1;
    }

    /// A 32-bit read of `addr`; the value if it was allowed.
    fn read(&mut self, what: &str, addr: u64) -> Option<u32> {
        // SAFETY: probing is the point; every outcome is recovered.
        match unsafe { exception::probe_read32(addr) } {
            Err(f) => {
                self.denied();
                println!("isolation: read {} at {:#x}: denied ({})", what, addr, f);
                None
            }
            Ok(v) => {
                self.allowed();
                println!("isolation: read {} at {:#x}: ALLOWED (value {:#x})", what, addr, v);
                Some(v)
            }
        }
    }

    /// A 32-bit write to `addr` of `value` (what a read returned: no harm if it goes through).
    fn write(&mut self, what: &str, addr: u64, value: u32) {
        // SAFETY: as read.
        match unsafe { exception::probe_write32(addr, value) } {
            Err(f) => {
                self.denied();
                println!("isolation: write {} at {:#x}: denied ({})", what, addr, f);
            }
            Ok(()) => {
                self.allowed();
                println!("isolation: write {} at {:#x}: ALLOWED (wrote {:#x})", what, addr, value);
            }
        }
    }

    fn read_write(&mut self, what: &str, addr: u64) {
        let v = self.read(what, addr).unwrap_or(0);
        self.write(what, addr, v);
    }

    /// `blr addr`: only an instruction abort is a denial.
    fn execute(&mut self, what: &str, addr: u64) {
        // SAFETY: as read; the handler returns to x30 whatever happens at addr.
        match unsafe { exception::probe_exec(addr) } {
            Err(f) if matches!(f.ec(), 0x20 | 0x21) => {
                self.denied();
                println!("isolation: execute {} at {:#x}: denied ({})", what, addr, f);
            }
            Err(f) => {
                self.allowed();
                println!(
                    "isolation: execute {} at {:#x}: ALLOWED (fetched, then {} at {:#x})",
                    what, addr, f, f.elr
                );
            }
            Ok(()) => {
                self.allowed();
                println!("isolation: execute {} at {:#x}: ALLOWED (returned)", what, addr);
            }
        }
    }

    /// An hvc that must fail with a negative PSCI error.
    fn hvc_must_fail(&mut self, what: &str, fid: u32, a1: u64, a2: u64, a3: u64) {
        match exception::probe_call(false, fid, a1, a2, a3) {
            Ok(r) if (r as i64) < 0 => {
                self.denied();
                println!(
                    "isolation: hvc {} {:#x}: denied (returned {} {})",
                    what,
                    fid,
                    r as i64,
                    psci::error_name(r as i64)
                );
            }
            Ok(r) => {
                self.allowed();
                println!("isolation: hvc {} {:#x}: ALLOWED (returned {:#x})", what, fid, r);
            }
            Err(f) => {
                self.denied();
                println!("isolation: hvc {} {:#x}: denied ({})", what, fid, f);
            }
        }
    }

    /// A probe address inside the guest's RAM: it is the guest's own memory, which must not
    /// hold somebody else's arm64 Image (magic at offset 0x38 of the page).
    fn inside_ram(&mut self, addr: u64) {
        let page = addr & !(PAGE - 1);
        if page == guest_rt::boot::image().start {
            self.denied();
            println!("isolation: probe {:#x} inside RAM: own memory (own image)", addr);
            return;
        }
        // SAFETY: guest RAM; a probe in case the hypervisor refuses it anyway.
        match unsafe { exception::probe_read32(page + 0x38) } {
            Ok(IMAGE_MAGIC) => {
                self.allowed();
                println!(
                    "isolation: probe {:#x} inside RAM: FOREIGN DATA (arm64 Image magic at {:#x})",
                    addr,
                    page + 0x38
                );
            }
            Ok(_) => {
                self.denied();
                println!("isolation: probe {:#x} inside RAM: own memory (no foreign image)", addr);
            }
            Err(f) => {
                self.denied();
                println!("isolation: probe {:#x} inside RAM: own memory (read faulted: {})", addr, f);
            }
        }
    }
}

fn main(boot: &BootInfo) -> ! {
    let args = boot.bootargs();
    let span = boot.ram_span();
    let in_ram = |a: u64| boot.memory.as_slice().iter().any(|r| r.contains(a));
    println!("isolation: ram {}, image {}, dtb {}", span, guest_rt::boot::image(), boot.dtb);

    let mut t = Tally::default();
    t.read_write("past end of RAM", span.end);
    t.read_write("4 GiB", FOUR_GIB);
    t.read_write("address zero", 0);
    t.read_write("GIC distributor", GICD);

    let mut probes = [0u64; MAX_PROBES];
    let mut nprobes = 0;
    for s in args.value("isolation.probe").unwrap_or("").split(',').filter(|s| !s.is_empty()) {
        match parse_hex(s) {
            Some(a) if nprobes < MAX_PROBES => {
                probes[nprobes] = a & !3;
                nprobes += 1;
            }
            Some(_) => println!("isolation: more than {} probe addresses: {} ignored", MAX_PROBES, s),
            None => println!("isolation: bad probe address \"{}\" ignored", s),
        }
    }
    for &a in &probes[..nprobes] {
        if in_ram(a) {
            t.inside_ram(a);
        } else {
            t.read_write("probe", a);
        }
    }

    t.execute("past end of RAM", span.end);
    t.execute("GIC distributor", GICD);

    // Odd console accesses: either outcome is acceptable, hanging is not. Each line is printed
    // whole after its access, in case the hypervisor logs something about it meanwhile.
    // Without SCTLR_EL1.A, so that QEMU 7.2 (which does not check Device alignment with the
    // MMU off) hands the access to the hypervisor; hardware faults at EL1 either way.
    guest_rt::boot::set_alignment_check(false);
    // SAFETY: a read of the UART's data register, unaligned on purpose.
    let r = unsafe { exception::probe_read32(UART + 1) };
    guest_rt::boot::set_alignment_check(true);
    match r {
        Ok(v) => {
            println!("isolation: unaligned 32-bit uart read at {:#x}: completed (value {:#x})", UART + 1, v)
        }
        Err(f) => println!("isolation: unaligned 32-bit uart read at {:#x}: faulted ({})", UART + 1, f),
    }
    // A newline: harmless on the console if the byte store goes through.
    // SAFETY: a byte store to the UART's data register.
    match unsafe { exception::probe_write8(UART, b'\n') } {
        Ok(()) => println!("isolation: 8-bit uart store at {:#x}: completed", UART),
        Err(f) => println!("isolation: 8-bit uart store at {:#x}: faulted ({})", UART, f),
    }

    t.hvc_must_fail("wild function", 0xdead_beef, 0, 0, 0);
    t.hvc_must_fail("cpu_on bogus target", psci::CPU_ON_64, BOGUS_MPIDR, guest_rt::boot::image().start, 0);

    match exception::probe_call(true, psci::PSCI_VERSION, 0, 0, 0) {
        Ok(r) if r as i64 == psci::NOT_SUPPORTED => {
            println!("isolation: smc psci_version: NOT_SUPPORTED (-1)")
        }
        Ok(r) if r >> 31 == 0 => {
            println!("isolation: smc psci_version: works (version {}.{})", r >> 16, r & 0xffff)
        }
        Ok(r) => println!("isolation: smc psci_version: UNEXPECTED (returned {:#x})", r),
        Err(f) => println!("isolation: smc psci_version: faulted ({})", f),
    }

    // With `shm.side=`: the data exchange through the shared region (the probes around it
    // come from `isolation.probe`).
    guest_rt::shm::run_from_bootargs(boot, "isolation");

    if exception::stray_faults() > 0 {
        println!("isolation: unexpected aborts: {}", exception::stray_faults());
    }
    println!("isolation: {} attempts, {} denied, {} allowed", t.attempts, t.denied, t.allowed);
    println!("isolation: done");
    psci::system_off()
}

//! `stress`: demand-faults the guest's free RAM and checks what it reads back.
//!
//! 1. 4 KiB first touch: every free page above the image (the device tree, `/memreserve/`,
//!    an initrd and `/reserved-memory` excluded) is read whole (it must be zero: fresh frames
//!    are) then one word, at a page-dependent offset (the page's *slot*), is written with a
//!    pattern of its address; the pass is timed with CNTVCT, then run again, identically, on
//!    the now-mapped pages. The difference is the cost of the faults.
//! 2. with `stress.blocks`: pass 1 covers only the lower half of RAM; in the upper half the
//!    first 4 KiB of each fully free 2 MiB-aligned block is touched the same way.
//! 3. random reads and writes (xorshift64, `stress.seed`) over every touched page, against an
//!    expected value per page (a table in bss for the first 16384 touched pages = 64 MiB; pages
//!    beyond it are only rewritten with and checked against their address pattern), then a full
//!    verification: in every touched page the slot holds its expected value, every other word 0.
//! 3b. with `shm.side=owner|borrower`: the data exchange through the device tree's shared
//!    memory region (`guest_rt::shm`), then the verification of step 3 again.
//! 4. hvc round trip: 1000 PSCI_VERSION calls timed against the same loop with a `nop`; with
//!    `stress.bench=mmio` also 1000 32-bit loads of the PL011's FR and (with a GICv3 in the
//!    device tree) of GICD_IIDR, timed the same way.
//! 5. `stress: done` and SYSTEM_OFF; with `stress.reset`, a first boot instead leaves a marker
//!    and asks for SYSTEM_RESET (see README.md for how the next boot knows it follows a reset).
//!
//! With more than one CPU in the device tree, or `stress.mode=` given, passes 1-3 are replaced
//! by the multi-CPU modes of [`smp`].
#![no_std]
#![no_main]

mod echo;
mod memory;
mod smp;

use core::arch::asm;
use core::ptr::{addr_of_mut, read_volatile, write_volatile};

use guest_rt::bootargs::parse_u64;
use guest_rt::dt::BootInfo;
use guest_rt::ranges::{Range, RangeSet};
use guest_rt::timer::{frequency, now, ticks_to_ns_per};
use guest_rt::{align_down, align_up, console, exception, println, psci, PAGE};

guest_rt::entry!(main);

const BLOCK: u64 = 2 << 20;
const WORDS: u64 = PAGE / 8;
/// Touched pages with an expected value of their own: 64 MiB worth.
const TABLE_PAGES: usize = 16384;
/// The reset marker ("LABYRSET").
const MARKER: u64 = 0x5445_5352_5942_414c;
const DEFAULT_SEED: u64 = 0x9e37_79b9_7f4a_7c15;
const HVC_CALLS: u64 = 1000;
/// Loads per timed MMIO loop (`stress.bench=mmio`).
const MMIO_READS: u64 = 1000;
/// The PL011's flag register and the GIC distributor's implementer ID (offsets).
const UART_FR: u64 = 0x18;
const GICD_IIDR: u64 = 0x8;
const MAX_SEGS: usize = 32;

/// Expected slot values of the first TABLE_PAGES touched pages; 0 = still the address pattern
/// (xorshift64 never yields 0, so a written value is never 0).
static mut EXPECTED: [u64; TABLE_PAGES] = [0; TABLE_PAGES];

fn expected_get(i: u64) -> u64 {
    // SAFETY: i < TABLE_PAGES (callers check); one CPU.
    unsafe { read_volatile(addr_of_mut!(EXPECTED).cast::<u64>().add(i as usize)) }
}

fn expected_set(i: u64, v: u64) {
    // SAFETY: as expected_get.
    unsafe { write_volatile(addr_of_mut!(EXPECTED).cast::<u64>().add(i as usize), v) }
}

/// `count` pages, `stride` apart, from `start`.
#[derive(Clone, Copy, Default)]
struct Seg {
    start: u64,
    count: u64,
    stride: u64,
}

#[derive(Clone, Copy)]
struct Touched {
    segs: [Seg; MAX_SEGS],
    n: usize,
}

impl Touched {
    fn new() -> Self {
        Touched { segs: [Seg::default(); MAX_SEGS], n: 0 }
    }

    fn push(&mut self, s: Seg) {
        if s.count > 0 && self.n < MAX_SEGS {
            self.segs[self.n] = s;
            self.n += 1;
        }
    }

    fn slice(&self) -> &[Seg] {
        &self.segs[..self.n]
    }

    fn pages(&self) -> u64 {
        self.slice().iter().map(|s| s.count).sum()
    }

    /// The address of touched page number `i`.
    fn page(&self, mut i: u64) -> u64 {
        for s in self.slice() {
            if i < s.count {
                return s.start + i * s.stride;
            }
            i -= s.count;
        }
        unreachable!()
    }
}

/// The byte offset, inside its page, of the word the passes write (8-byte aligned).
fn slot(page: u64) -> u64 {
    ((page >> 12).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 52) & 0xff8
}

/// The first-touch value of the word at `addr`: never 0.
fn pattern(addr: u64) -> u64 {
    addr ^ (addr << 32) ^ 0xa5a5_5a5a_0000_0000
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Reads the whole page (1 if any word is not 0, branch-free), then writes its slot's pattern.
#[inline(always)]
unsafe fn touch_page(page: u64) -> u64 {
    let p = page as *const u64;
    let mut acc = 0;
    for i in 0..WORDS as usize {
        acc |= read_volatile(p.add(i));
    }
    let w = page + slot(page);
    write_volatile(w as *mut u64, pattern(w));
    (acc != 0) as u64
}

/// One pass over `segs`; the same instructions whether the pages are mapped or not. Returns the
/// number of pages that were not all zero.
#[inline(never)]
fn touch_pass(segs: &[Seg]) -> u64 {
    let mut nonzero = 0;
    for s in segs {
        let mut a = s.start;
        for _ in 0..s.count {
            // SAFETY: free guest RAM (see main).
            nonzero += unsafe { touch_page(a) };
            a += s.stride;
        }
    }
    nonzero
}

/// Times the first and the second touch of `segs`: (first, second, non-zero pages).
fn timed_passes(segs: &[Seg]) -> (u64, u64, u64) {
    let t0 = now();
    let nonzero = touch_pass(segs);
    let t1 = now();
    touch_pass(segs);
    let t2 = now();
    (t1 - t0, t2 - t1, nonzero)
}

fn expected(idx: u64, page: u64) -> u64 {
    let v = if idx < TABLE_PAGES as u64 { expected_get(idx) } else { 0 };
    if v != 0 {
        v
    } else {
        pattern(page + slot(page))
    }
}

/// (address, wanted, got) of the first wrong word.
type Mismatch = (u64, u64, u64);

fn random_ops(all: &Touched, ops: u64, seed: u64) -> Option<Mismatch> {
    let total = all.pages();
    if total == 0 {
        return None;
    }
    let mut rng = seed;
    for _ in 0..ops {
        let r = xorshift(&mut rng);
        let idx = (r >> 16) % total;
        let page = all.page(idx);
        let s = slot(page);
        if r & 1 == 0 {
            let w = ((r >> 1) & (WORDS - 1)) * 8;
            let want = if w == s { expected(idx, page) } else { 0 };
            // SAFETY: a touched page.
            let got = unsafe { read_volatile((page + w) as *const u64) };
            if got != want {
                return Some((page + w, want, got));
            }
        } else if idx < TABLE_PAGES as u64 {
            let v = xorshift(&mut rng);
            // SAFETY: a touched page's slot.
            unsafe { write_volatile((page + s) as *mut u64, v) };
            expected_set(idx, v);
        } else {
            // SAFETY: as above.
            unsafe { write_volatile((page + s) as *mut u64, pattern(page + s)) };
        }
    }
    None
}

fn verify(all: &Touched) -> Option<Mismatch> {
    let mut idx = 0;
    for seg in all.slice() {
        for k in 0..seg.count {
            let page = seg.start + k * seg.stride;
            let s = slot(page);
            let want_slot = expected(idx, page);
            for w in 0..WORDS {
                let a = page + w * 8;
                let want = if w * 8 == s { want_slot } else { 0 };
                // SAFETY: a touched page.
                let got = unsafe { read_volatile(a as *const u64) };
                if got != want {
                    return Some((a, want, got));
                }
            }
            idx += 1;
        }
    }
    None
}

/// Ticks for `n` PSCI_VERSION `hvc`s (`with_hvc`) or the same loop with a `nop` instead.
#[inline(never)]
fn call_loop(n: u64, with_hvc: bool) -> u64 {
    let t0 = now();
    // SAFETY: PSCI_VERSION has no side effect; x0-x17 are clobbered as SMCCC allows.
    unsafe {
        if with_hvc {
            asm!("2: mov w0, #0x84000000", "hvc #0", "subs x20, x20, #1", "b.ne 2b",
                inout("x20") n => _, clobber_abi("C"), options(nostack));
        } else {
            asm!("2: mov w0, #0x84000000", "nop", "subs x20, x20, #1", "b.ne 2b",
                inout("x20") n => _, clobber_abi("C"), options(nostack));
        }
    }
    now() - t0
}

/// Ticks for `n` (> 0) 32-bit loads of `addr` into w1 (`with_load`) or the same loop with a
/// `nop`. The destination is a low register: a hypervisor may serve x0-x18 on a path that saves
/// fewer registers than x19-x29 need.
#[inline(never)]
fn mmio_loop(addr: u64, n: u64, with_load: bool) -> u64 {
    let t0 = now();
    // SAFETY: a device register of the device tree's UART or GIC, read only (no side effect);
    // the loop's registers are declared.
    unsafe {
        if with_load {
            asm!("2: ldr w1, [{a}]", "subs {n}, {n}, #1", "b.ne 2b",
                a = in(reg) addr, n = inout(reg) n => _, out("x1") _, options(nostack));
        } else {
            asm!("2: nop", "subs {n}, {n}, #1", "b.ne 2b",
                n = inout(reg) n => _, out("x1") _, options(nostack));
        }
    }
    now() - t0
}

/// What `stress.bench=mmio` reads besides the UART: the GIC distributor, if there is one.
#[derive(Clone, Copy)]
struct MmioBench {
    gicd: Option<u64>,
}

/// The MMIO read costs: `stress: mmio {what} read={F} instructions`.
fn mmio_bench(bench: MmioBench) {
    let cost = |addr: u64| {
        let with = mmio_loop(addr, MMIO_READS, true);
        let without = mmio_loop(addr, MMIO_READS, false);
        ticks_to_ns_per(with as i64 - without as i64, MMIO_READS)
    };
    println!("stress: mmio uart-fr read={} instructions", cost(console::UART_BASE as u64 + UART_FR));
    match bench.gicd {
        Some(d) => println!("stress: mmio gicd-iidr read={} instructions", cost(d + GICD_IIDR)),
        None => println!("stress: mmio gicd-iidr skipped: no GICv3 in the device tree"),
    }
}

fn main(boot: &BootInfo) -> ! {
    let args = boot.bootargs();
    let seed = args.value("stress.seed").and_then(parse_u64).filter(|&s| s != 0).unwrap_or(DEFAULT_SEED);
    let blocks = args.has("stress.blocks");
    let reset = args.has("stress.reset");
    let mmio = args
        .value("stress.bench")
        .is_some_and(|b| b.split(',').any(|x| x == "mmio"))
        .then_some(MmioBench { gicd: boot.gic.map(|g| g.distributor.start) });
    let image = guest_rt::boot::image();
    let span = boot.ram_span();
    let v = psci::version();
    println!(
        "stress: ram {} ({} MiB), image {}, dtb {}, cntfrq={} Hz, psci {}.{}, seed={}",
        span,
        span.len() >> 20,
        image,
        boot.dtb,
        frequency(),
        v >> 16,
        v & 0xffff,
        seed
    );

    let mut free = boot.free_ram(image);

    // stress.reset: the first free page holds the marker and is left out of the passes.
    let mut marker_page = None;
    let mut after_reset = false;
    if reset {
        match free.as_slice().first() {
            Some(r) => {
                let m = r.start;
                free.subtract(Range::new(m, m + PAGE));
                // SAFETY: free guest RAM.
                let survived = unsafe { read_volatile(m as *const u64) } == MARKER;
                if survived || boot.reset_count > 0 {
                    after_reset = true;
                    println!("stress: after reset fresh={}", if survived { "no" } else { "yes" });
                    // SAFETY: as above.
                    unsafe { write_volatile(m as *mut u64, 0) };
                }
                marker_page = Some(m);
            }
            None => println!("stress: no free page for the reset marker"),
        }
    }

    if args.has("stress.echo") {
        echo::run(boot, args.value("stress.echo-cpu") == Some("1"));
    }
    if let Some(secret) = args.value("stress.secret").and_then(parse_u64) {
        let pages = memory::fill_secret(&free, secret);
        println!("stress: secret {:#x} written to {} pages", secret, pages);
        psci::system_off();
    }
    if args.has("stress.giveback") {
        memory::give_back(&free, span, boot.cpu_count);
        finish(exception::stray_faults(), None, false, None);
    }
    if args.has("stress.wait-memory") {
        let pages = free.as_slice().iter().map(|r| r.len() / PAGE).sum();
        let secs = args.value("stress.timeout").and_then(parse_u64).filter(|&s| s > 0).unwrap_or(60);
        memory::wait_for(pages, guest_rt::smp::seconds(secs));
    }

    // The passes' pages: with stress.blocks, 4 KiB pages below the middle of RAM and 2 MiB
    // blocks above it.
    let mid = if blocks { align_down(span.start + span.len() / 2, BLOCK) } else { u64::MAX };
    let mut small = Touched::new();
    let mut large = Touched::new();
    for r in free.as_slice() {
        let lo = r.intersect(&Range::new(0, mid));
        if !lo.is_empty() {
            small.push(Seg { start: lo.start, count: lo.len() / PAGE, stride: PAGE });
        }
        let hi = r.intersect(&Range::new(mid, u64::MAX)).shrink_to(BLOCK);
        if blocks && !hi.is_empty() {
            large.push(Seg { start: hi.start, count: hi.len() / BLOCK, stride: BLOCK });
        }
    }

    if boot.cpu_count > 1 || args.value("stress.mode").is_some() {
        let mut plan = smp::Plan {
            pages: Touched::new(),
            modes: [smp::Mode::Partitioned, smp::Mode::Overlapped, smp::Mode::Staggered],
            n_modes: 0,
            cpus: boot.cpu_count,
            timeout: guest_rt::smp::seconds(
                args.value("stress.timeout").and_then(parse_u64).filter(|&s| s > 0).unwrap_or(60),
            ),
            sabotage: args.has("stress.sabotage"),
            interleave: args.has("stress.interleave"),
        };
        for r in free.as_slice() {
            plan.pages.push(Seg { start: r.start, count: r.len() / PAGE, stride: PAGE });
        }
        for name in args.value("stress.mode").unwrap_or("").split(',').filter(|m| !m.is_empty()) {
            match smp::Mode::parse(name) {
                Some(m) if plan.n_modes < smp::MAX_MODES => {
                    plan.modes[plan.n_modes] = m;
                    plan.n_modes += 1;
                }
                _ => println!("stress: mode \"{}\" ignored", name),
            }
        }
        if plan.n_modes == 0 {
            plan.n_modes = smp::MAX_MODES;
        }
        if boot.cpus_dropped > 0 {
            println!("stress: {} cpus beyond the first {} left off", boot.cpus_dropped, boot.cpu_count);
        }
        match smp::run(&plan) {
            Some(stray) => finish(stray, marker_page, after_reset, mmio),
            None => psci::system_off(),
        }
    }

    let n = small.pages();
    let (first, second, mut nonzero) = timed_passes(small.slice());
    println!(
        "stress: 4k first-touch pages={} first={} second={} ticks, fault={} instructions/page",
        n,
        first,
        second,
        ticks_to_ns_per(first as i64 - second as i64, n)
    );
    if blocks {
        let n = large.pages();
        let (first, second, nz) = timed_passes(large.slice());
        nonzero += nz;
        println!(
            "stress: 2m first-touch blocks={} first={} second={} ticks, fault={} instructions/block",
            n,
            first,
            second,
            ticks_to_ns_per(first as i64 - second as i64, n)
        );
    }
    println!("stress: fresh pages not zero: {}", nonzero);

    let mut all = small;
    for s in large.slice() {
        all.push(*s);
    }
    let ops = args.value("stress.ops").and_then(parse_u64).unwrap_or(4 * all.pages());
    match random_ops(&all, ops, seed).or_else(|| verify(&all)) {
        None => println!("stress: random ops={} verify=ok", ops),
        Some((a, want, got)) => println!("stress: verify FAILED at {:#x} want {:#x} got {:#x}", a, want, got),
    }
    // With `shm.side=`: the exchange through the shared region, then every touched page of the
    // guest's own RAM checked again: whatever the other guest did, it stayed as written.
    if args.value("shm.side").is_some() {
        guest_rt::shm::run_from_bootargs(boot, "stress");
        match verify(&all) {
            None => println!("stress: private memory after the exchange verify=ok"),
            Some((a, want, got)) => {
                println!(
                    "stress: private memory after the exchange FAILED at {:#x} want {:#x} got {:#x}",
                    a, want, got
                )
            }
        }
    }

    finish(exception::stray_faults(), marker_page, after_reset, mmio)
}

/// The hvc round trip (and the MMIO reads if asked), the stray aborts, then reset or power off.
fn finish(stray: u64, marker_page: Option<u64>, after_reset: bool, mmio: Option<MmioBench>) -> ! {
    let with = call_loop(HVC_CALLS, true);
    let without = call_loop(HVC_CALLS, false);
    println!(
        "stress: hvc psci_version round trip={} instructions",
        ticks_to_ns_per(with as i64 - without as i64, HVC_CALLS)
    );
    if let Some(bench) = mmio {
        mmio_bench(bench);
    }

    if stray > 0 {
        println!("stress: unexpected aborts: {}", stray);
    }
    if let (Some(m), false) = (marker_page, after_reset) {
        // SAFETY: the marker page, free guest RAM.
        unsafe { write_volatile(m as *mut u64, MARKER) };
        println!("stress: requesting reset");
        psci::system_reset();
    }
    println!("stress: done");
    psci::system_off()
}

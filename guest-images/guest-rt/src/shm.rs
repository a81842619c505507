//! A data exchange through a static shared memory region ([`crate::dt::SharedRegion`]) between
//! two guests, each running one side: both write a pattern into their own half, raise a flag,
//! wait (bounded) for the other's flag, and check every word of the other's half.
//!
//! Layout: word 0 is the owner's flag, word 1 the borrower's, words 2 and 3 their "done" flags
//! (raised once a side has read the other's half); the first page is flags only;
//! the owner's words fill the rest of the lower half, the borrower's the upper half. With the
//! MMU off every access is to Device memory, uncached on both sides, so plain stores and loads
//! with a `DSB` between the data and its flag order them.

use core::ptr::{read_volatile, write_volatile};

use crate::dt::SharedRegion;
use crate::timer::{frequency, now};
use crate::PAGE;

/// Which side this guest runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Owner,
    Borrower,
}

impl Side {
    pub fn name(self) -> &'static str {
        match self {
            Side::Owner => "owner",
            Side::Borrower => "borrower",
        }
    }

    fn other(self) -> Side {
        match self {
            Side::Owner => Side::Borrower,
            Side::Borrower => Side::Owner,
        }
    }

    /// The side's flag value ("SHMOWNER", "SHMBORRW" in ASCII).
    fn magic(self) -> u64 {
        match self {
            Side::Owner => 0x5245_4e57_4f4d_4853,
            Side::Borrower => 0x5752_524f_424d_4853,
        }
    }

    fn flag_word(self) -> u64 {
        match self {
            Side::Owner => 0,
            Side::Borrower => 1,
        }
    }

    fn done_word(self) -> u64 {
        self.flag_word() + 2
    }

    /// The side's words: `[first, end)` word indices.
    fn words(self, size: u64) -> (u64, u64) {
        let half = size / 2 / 8;
        match self {
            Side::Owner => (PAGE / 8, half),
            Side::Borrower => (half, size / 8),
        }
    }

    /// What the side writes into word `i` of the region: from the offset, never the guest
    /// address (each guest may map the region at its own).
    fn pattern(self, i: u64) -> u64 {
        self.magic().rotate_left(13) ^ (i << 3).wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }
}

/// How an exchange went.
#[derive(Clone, Copy, Debug, Default)]
pub struct Outcome {
    /// Words of the side's own half that held its pattern before it wrote (a region kept
    /// across this guest's reset, or across a restart of the exchange).
    pub kept: u64,
    pub written: u64,
    /// Words of the other side's half read (0 if its flag never came).
    pub read: u64,
    pub mismatches: u64,
    /// The first word that did not hold the other side's pattern: address, found.
    pub first_bad: Option<(u64, u64)>,
    /// The other side's flag came within the timeout.
    pub other_ready: bool,
}

/// Runs `side` of the exchange in `region` (at least 2 pages), waiting at most `timeout_s`
/// seconds of the counter for the other side. `late`: read the other's half only after it
/// said it is done, and 2 s more (long enough for it to have stopped).
pub fn exchange(region: &SharedRegion, side: Side, timeout_s: u64, late: bool) -> Outcome {
    let base = region.range.start;
    let size = region.range.len() & !(2 * PAGE - 1);
    let word = |i: u64| (base + i * 8) as *mut u64;
    let mut out = Outcome::default();
    let (first, end) = side.words(size);
    for i in first..end {
        let want = side.pattern(i);
        // SAFETY: inside the shared region the device tree gave, 8-byte aligned.
        if unsafe { read_volatile(word(i)) } == want {
            out.kept += 1;
        }
        // SAFETY: as above.
        unsafe { write_volatile(word(i), want) };
        out.written += 1;
    }
    // SAFETY: a barrier; the data is visible before the flag that announces it.
    unsafe { core::arch::asm!("dsb sy", options(nostack, preserves_flags)) };
    // SAFETY: the side's flag word, inside the region.
    unsafe { write_volatile(word(side.flag_word()), side.magic()) };
    let other = side.other();
    let deadline = now() + frequency() * timeout_s;
    // SAFETY: the other side's flag word.
    while unsafe { read_volatile(word(other.flag_word())) } != other.magic() {
        if now() > deadline {
            return out;
        }
        core::hint::spin_loop();
    }
    out.other_ready = true;
    if late {
        // SAFETY: the other side's done flag.
        while unsafe { read_volatile(word(other.done_word())) } != other.magic() {
            if now() > deadline {
                return out;
            }
            core::hint::spin_loop();
        }
        crate::timer::delay_us(2_000_000);
    }
    // SAFETY: as above: its data was written before its flag.
    unsafe { core::arch::asm!("dsb sy", options(nostack, preserves_flags)) };
    let (first, end) = other.words(size);
    for i in first..end {
        let addr = base + i * 8;
        // SAFETY: inside the region.
        let v = unsafe { read_volatile(word(i)) };
        out.read += 1;
        if v != other.pattern(i) {
            out.mismatches += 1;
            out.first_bad.get_or_insert((addr, v));
        }
    }
    // SAFETY: the side's done flag.
    unsafe { write_volatile(word(side.done_word()), side.magic()) };
    out
}

/// Runs the exchange named by the command line (`shm.side=owner|borrower`, and `shm.late` to
/// read only once the other side is done) on the tree's first shared region, printing one line
/// per step for the boot tests; nothing without `shm.side`.
pub fn run_from_bootargs(boot: &crate::dt::BootInfo, who: &str) {
    let side = match boot.bootargs().value("shm.side") {
        Some("owner") => Side::Owner,
        Some("borrower") => Side::Borrower,
        Some(other) => {
            crate::println!("{}: shm.side={} unknown (owner or borrower)", who, other);
            return;
        }
        None => return,
    };
    let Some(region) = boot.shared().first() else {
        crate::println!("{}: shm {}: no xen,shared-memory-v1 region in the device tree", who, side.name());
        return;
    };
    crate::println!(
        "{}: shm region \"{}\" at {} (xen,offset {:#x}), {}",
        who,
        region.id(),
        region.range,
        region.offset,
        side.name()
    );
    let out = exchange(region, side, 60, boot.bootargs().has("shm.late"));
    if out.kept > 0 {
        crate::println!("{}: shm {}: {} of its words were already there", who, side.name(), out.kept);
    }
    if !out.other_ready {
        crate::println!(
            "{}: shm {}: wrote {} words, the {} never came",
            who,
            side.name(),
            out.written,
            side.other().name()
        );
        return;
    }
    match out.first_bad {
        None => crate::println!(
            "{}: shm {}: wrote {} words, read {} words of the {}: ok",
            who,
            side.name(),
            out.written,
            out.read,
            side.other().name()
        ),
        Some((addr, v)) => crate::println!(
            "{}: shm {}: {} of {} words of the {} WRONG, first at {:#x}: {:#x}",
            who,
            side.name(),
            out.mismatches,
            out.read,
            side.other().name(),
            addr,
            v
        ),
    }
}

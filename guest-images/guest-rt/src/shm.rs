//! A data exchange through a static shared memory region ([`crate::dt::SharedRegion`]) between
//! two guests, each running one side: both write a pattern into their own half, raise a flag,
//! wait (bounded) for the other's flag, and check every word of the other's half.
//!
//! Layout: word 0 is the owner's flag, word 1 the borrower's, words 2 and 3 their "done" flags
//! (raised once a side has read the other's half), words 4 and 5 how many exchanges each side
//! finished (kept across a reset), word 6 the owner's "stopping" word (written once it is done
//! with the region: the hypervisor revokes the region from every borrower when its owner
//! stops); the first page is flags only; the owner's words fill the rest of the lower half, the
//! borrower's the upper half. The owner keeps the region until the borrower has finished
//! `shm.rounds` exchanges (default 1). With the MMU off every access is to Device memory,
//! uncached on both sides, so plain stores and loads with a `DSB` between the data and its flag
//! order them.

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

    fn rounds_word(self) -> u64 {
        self.flag_word() + 4
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

/// The owner's "stopping" word ("SHMSTOPS"), and where it is.
const STOPPING: u64 = 0x5350_4f54_534d_4853;
const STOPPING_WORD: u64 = 6;

/// Runs `side` of the exchange in `region` (at least 2 pages), waiting at most `timeout_s`
/// seconds of the counter for the other side at each step. The owner returns only once the
/// borrower has finished `rounds` exchanges (it may stop after, which revokes the region).
pub fn exchange(region: &SharedRegion, side: Side, timeout_s: u64, rounds: u64) -> Outcome {
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
    // SAFETY: the side's done flag and its count of exchanges.
    unsafe {
        write_volatile(word(side.done_word()), side.magic());
        let n = read_volatile(word(side.rounds_word()));
        write_volatile(word(side.rounds_word()), n.wrapping_add(1));
    }
    if side == Side::Owner {
        let deadline = now() + frequency() * timeout_s;
        // SAFETY: the borrower's count, inside the region.
        while unsafe { read_volatile(word(other.rounds_word())) } < rounds {
            if now() > deadline {
                break;
            }
            core::hint::spin_loop();
        }
    }
    out
}

/// The owner is done with the region: it says so in the "stopping" word.
fn say_stopping(region: &SharedRegion) {
    // SAFETY: a barrier, then the word inside the region.
    unsafe {
        core::arch::asm!("dsb sy", options(nostack, preserves_flags));
        write_volatile((region.range.start + STOPPING_WORD * 8) as *mut u64, STOPPING);
    }
}

/// A borrower reads the owner's "stopping" word until it says so, then the region, page after
/// page, until a read is refused (the owner's stop revoked the region) or `timeout_s` pass.
/// Every read is a probe: the owner may stop (and the region go) before its word is seen.
/// Whether the word was seen, the page reads after it, and the abort if one came.
fn read_until_revoked(region: &SharedRegion, timeout_s: u64) -> (bool, u64, Option<crate::exception::Fault>) {
    let base = region.range.start;
    let pages = (region.range.len() / PAGE).max(1);
    let deadline = now() + frequency() * timeout_s;
    let (mut seen, mut reads) = (false, 0);
    while now() <= deadline {
        let addr = if seen { base + (reads % pages) * PAGE } else { base + STOPPING_WORD * 8 };
        // SAFETY: a probe inside the region: a value while it is mapped, an abort once revoked.
        match unsafe { crate::exception::probe_read32(addr) } {
            Ok(v) if !seen => seen = v == STOPPING as u32,
            Ok(_) => reads += 1,
            Err(fault) => return (seen, reads, Some(fault)),
        }
    }
    (seen, reads, None)
}

/// What a borrower read before the region went, for its line.
struct Reads(bool, u64);

impl core::fmt::Display for Reads {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Reads(true, n) => write!(f, "{} reads after the owner said it is stopping", n),
            Reads(false, _) => f.write_str("before the owner's stopping word was read"),
        }
    }
}

/// Runs the exchange named by the command line (`shm.side=owner|borrower`; `shm.rounds=N`: the
/// owner keeps the region until the borrower finished N exchanges; `shm.revoke`: the borrower
/// then waits for the owner's "stopping" word and reads the region until a read is refused)
/// on the tree's first shared region, printing one line per step for the boot tests; nothing
/// without `shm.side`.
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
    let rounds = boot.bootargs().value("shm.rounds").and_then(crate::bootargs::parse_u64).unwrap_or(1);
    let out = exchange(region, side, 60, rounds);
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
    match side {
        Side::Owner => say_stopping(region),
        Side::Borrower if boot.bootargs().has("shm.revoke") => match read_until_revoked(region, 120) {
            (seen, reads, Some(fault)) => crate::println!(
                "{}: shm borrower: the region was revoked ({}): {} at {:#x}",
                who,
                Reads(seen, reads),
                fault,
                fault.far
            ),
            (seen, reads, None) => crate::println!(
                "{}: shm borrower: the region still readable after 120 s ({})",
                who,
                Reads(seen, reads)
            ),
        },
        Side::Borrower => {}
    }
}

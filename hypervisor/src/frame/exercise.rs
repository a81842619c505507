//! The frame fuzz harness: a byte string becomes a sequence of operations on a real
//! [`FrameManager`] (three CPUs' pools, the buddy allocator, the database over two RAM banks
//! with a hole), each checked against a simple model: the state of every frame, the order of
//! every pool, the buddy allocator's free count, the promises and the unpromised count, what
//! every frame holds. The `frame_ops` fuzz target and the host tests both run it; a divergence
//! is an `Err` (the fuzz target panics on it).
//!
//! The model predicts every result exactly: which frame an atomic allocation pops (the pools
//! are stacks, other CPUs' surplus is taken in a fixed order), what a refill adds, when the
//! buddy allocator has no block of a size (it merges buddies, so it has one exactly when an
//! aligned run of that many free frames exists), which refusals happen. After every operation
//! the frames and pools it touched are compared with the database and the pools, and the
//! counts with the manager's; every [`FULL_EVERY`] operations and at the end, everything, and
//! at the end the ownership audit, count by count.
//!
//! Guests draw pages through budgets built from [`take_if_there`] and the manager's
//! [`super::Unpromised`] count, as `vm::budget` does: while nothing else takes free frames, a
//! draw the budget allowed must find its frame (the promise `FrameManager::commit` made).

use core::cell::Cell;
use core::fmt::Write as _;
use core::sync::atomic::{AtomicUsize, Ordering};
use std::format;
use std::string::String;
use std::vec::Vec;

use super::tag::{HEAD, TAG_TAIL};
use super::{
    take_if_there, AtomicError, AuditReport, Claimed, FrameDb, FrameError, FrameManager, FrameScrubber,
    FrameState, GuestFrames, HeapSink, Owner, Pfn, PoolConfig, Promise, TagCell, VmId, BLOCK_FRAMES,
    FRAME_SIZE,
};

/// The first frame of RAM: QEMU virt's, 2 MiB aligned.
const BASE: u64 = 0x40000;
/// Bank A (6 MiB), a 2 MiB hole, bank B (2 MiB): small, since every run boots the manager
/// over it and checks all of it at the end.
const BANK_A: u64 = 1536;
const HOLE: u64 = 512;
const BANK_B: u64 = 512;
const SPAN: usize = (BANK_A + HOLE + BANK_B) as usize;
const BLOCKS: usize = SPAN / BLOCK_FRAMES;
/// The hypervisor's image and the firmware's frames, at the start of bank A.
const HYP_FRAMES: u64 = 8;
const RESERVED_FRAMES: u64 = 2;
const CPUS: usize = 3;
const GUESTS: usize = 3;
/// Allocations remembered as targets for later operations.
const MAX_TARGETS: usize = 32;
/// What RAM holds before anyone scrubs it.
const GARBAGE: u64 = 0x5a5a_5a5a_5a5a_5a5a;
/// Operations one input may encode (4 bytes each, after the configuration byte).
pub const MAX_OPS: usize = 64;
/// Audits an input may ask for (one more runs at the end).
const MAX_AUDITS: usize = 2;
/// The full comparison runs after this many operations, and at the end.
pub const FULL_EVERY: usize = 32;

/// The pool configurations the first byte chooses from: a block pool of one, of two (block
/// refills of a 2-block chunk) and none; stealing from one, two or every other CPU.
const CONFIGS: [PoolConfig; 3] = [
    PoolConfig {
        page_capacity: 16,
        page_low: 4,
        page_high: 12,
        block_capacity: 1,
        block_low: 1,
        block_high: 1,
        steal_victims: 2,
    },
    PoolConfig {
        page_capacity: 8,
        page_low: 2,
        page_high: 8,
        block_capacity: 2,
        block_low: 1,
        block_high: 2,
        steal_victims: 1,
    },
    PoolConfig {
        page_capacity: 12,
        page_low: 1,
        page_high: 6,
        block_capacity: 0,
        block_low: 0,
        block_high: 0,
        steal_victims: 3,
    },
];

/// A bug to plant, to prove the checks catch it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Sabotage {
    #[default]
    None,
    /// The atomic page allocation hands out the page it handed out last, again, storing the
    /// new owner's tag over the old one's (a claim by plain store, not compare-and-swap).
    HandOutTwice,
    /// A release gives its frames to the buddy allocator with their tags unchanged (the
    /// transitions through Scrubbing to Free skipped).
    FreeStillTagged,
    /// The scrubber zeroes nothing after boot.
    SkipScrub,
    /// A refused release scrubs the frames before it checks their owner.
    ScrubRefused,
    /// Promises forget what the pools can hold: a guest is promised every free frame not
    /// yet promised.
    OverPromise,
}

/// Fails the check with a message, like `assert!` but as an `Err`.
macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

/// The span's index of `pfn`, if the database covers it.
fn idx(pfn: u64) -> Option<usize> {
    let i = pfn.wrapping_sub(BASE) as usize;
    (i < SPAN).then_some(i)
}

fn pfn_of(i: usize) -> Pfn {
    Pfn(BASE + i as u64)
}

/// Fake RAM, one word per frame (the scrubber zeroes it, owners write it).
struct Ram {
    words: Vec<Cell<u64>>,
    skip: Cell<bool>,
}

impl Ram {
    fn read(&self, i: usize) -> u64 {
        self.words[i].get()
    }
}

impl FrameScrubber for Ram {
    fn scrub(&self, first: Pfn, frames: usize) {
        if self.skip.get() {
            return;
        }
        for k in 0..frames as u64 {
            if let Some(i) = idx(first.0 + k) {
                self.words[i].set(0);
            }
        }
    }

    fn reads_zero(&self, pfn: Pfn) -> bool {
        idx(pfn.0).is_some_and(|i| self.words[i].get() == 0)
    }
}

/// The heap's side of `grow_heap`: remembers the range it was given.
#[derive(Default)]
struct Heap {
    last: Option<(u64, u64)>,
}

impl HeapSink for Heap {
    fn add_region(&mut self, start: u64, end: u64) {
        self.last = Some((start, end));
    }
}

/// One frame in the model.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum St {
    Absent,
    Reserved,
    Buddy,
    PagePool(u8),
    BlockPool(u8),
    Owned(Owner),
}

impl St {
    fn state(self) -> FrameState {
        match self {
            St::Absent => FrameState::Absent,
            St::Reserved => FrameState::Reserved,
            St::Buddy | St::PagePool(_) | St::BlockPool(_) => FrameState::Free,
            St::Owned(o) => o.state(),
        }
    }
}

/// What the manager must hold, frame by frame and count by count.
struct Model {
    st: Vec<St>,
    /// The word each frame must read.
    stamp: Vec<u64>,
    /// 1 + the guest whose budget drew the frame, or 0.
    budgeted: Vec<u8>,
    /// 2 MiB blocks held or owned as one unit (a head tag and 511 tails).
    compound: [bool; BLOCKS],
    /// Frames of each block in the buddy allocator.
    buddy_in_block: [u16; BLOCKS],
    buddy_free: usize,
    pages: [Vec<u64>; CPUS],
    blocks: [Vec<u64>; CPUS],
    retired: [bool; CPUS],
    committed: usize,
    unpromised: usize,
    /// The pools' capacity set aside when the unpromised frames were opened (what remains).
    aside: usize,
    open: bool,
    /// Nothing but the budgets took free frames while promises stood, so every draw a budget
    /// allowed must succeed.
    promises_hold: bool,
}

impl Model {
    fn set(&mut self, i: usize, s: St) {
        if self.st[i] == St::Buddy {
            self.buddy_free -= 1;
            self.buddy_in_block[i / BLOCK_FRAMES] -= 1;
        }
        if s == St::Buddy {
            self.buddy_free += 1;
            self.buddy_in_block[i / BLOCK_FRAMES] += 1;
        }
        self.st[i] = s;
    }

    fn pooled(&self) -> usize {
        (0..CPUS).map(|c| self.pages[c].len() + self.blocks[c].len() * BLOCK_FRAMES).sum()
    }

    fn free(&self) -> usize {
        self.buddy_free + self.pooled()
    }

    /// What the active CPUs' pools can hold (set aside from every promise).
    fn capacity(&self, cfg: &PoolConfig) -> usize {
        let active = self.retired.iter().filter(|r| !**r).count();
        active * (cfg.page_capacity + cfg.block_capacity * BLOCK_FRAMES)
    }

    /// `(state, frames from here on in the same unit)`, as `FrameDb::unit` answers.
    fn unit(&self, i: usize) -> (FrameState, u64) {
        let run = if self.compound[i / BLOCK_FRAMES] { (BLOCK_FRAMES - i % BLOCK_FRAMES) as u64 } else { 1 };
        (self.st[i].state(), run)
    }

    /// The tag the database must hold for frame `i` (a compound block's head carries its
    /// state with the head bit, its tails say "as my head").
    fn raw_tag(&self, i: usize) -> u16 {
        let tag = self.st[i].state().tag();
        match (self.compound[i / BLOCK_FRAMES], i % BLOCK_FRAMES) {
            (false, _) => tag,
            (true, 0) => tag | HEAD,
            (true, _) => TAG_TAIL,
        }
    }

    fn free_blocks(&self) -> usize {
        self.buddy_in_block.iter().filter(|&&n| n as usize == BLOCK_FRAMES).count()
    }

    /// Whether the buddy allocator holds an aligned run of `frames` (a power of two).
    fn has_buddy_run(&self, frames: usize) -> bool {
        if frames >= BLOCK_FRAMES {
            let per = frames / BLOCK_FRAMES;
            return self
                .buddy_in_block
                .chunks_exact(per)
                .any(|run| run.iter().all(|&n| n as usize == BLOCK_FRAMES));
        }
        self.st.chunks_exact(frames).any(|run| run.iter().all(|&s| s == St::Buddy))
    }
}

/// An allocation, remembered so that later operations can aim at it (it may be gone by then:
/// the operation is then a refusal to check).
#[derive(Clone, Copy, Debug)]
struct Target {
    first: u64,
    frames: usize,
    owner: Owner,
}

/// A guest's budget, as `vm::budget::MemoryBudget` keeps it: pages left in its promise (the
/// count under test, taken with [`take_if_there`]) and pages drawn beyond it.
struct Budget {
    vm: VmId,
    promised: usize,
    left: AtomicUsize,
    /// The model of `left`.
    left_m: usize,
    beyond: usize,
    frames: Vec<u64>,
    /// The manager's promises to it, withdrawn when its budget is.
    promises: Vec<Promise>,
}

struct Exercise<'m, 'a> {
    mgr: &'m FrameManager<'a>,
    ram: &'m Ram,
    cfg: PoolConfig,
    m: Model,
    targets: Vec<Target>,
    guests: [Budget; GUESTS],
    sabotage: Sabotage,
    last_page: Option<u64>,
    /// Frame ranges and CPUs (bits) the current operation touched.
    touched: Vec<(u64, usize)>,
    touched_cpus: u8,
    next_stamp: u64,
    audits: usize,
    scratch: Vec<u64>,
    text: String,
}

/// Runs the operations `data` encodes, checking as it goes; panics on the first divergence.
pub fn run(data: &[u8]) {
    if let Err(e) = run_checked(data, Sabotage::None) {
        panic!("frame exercise: {e}");
    }
}

/// Runs the operations `data` encodes with `sabotage` planted; the first divergence, if any.
pub fn run_checked(data: &[u8], sabotage: Sabotage) -> Result<(), String> {
    let Some((&config, ops)) = data.split_first() else { return Ok(()) };
    let cfg = CONFIGS[config as usize % CONFIGS.len()];
    let tags: Vec<TagCell> = (0..SPAN).map(|_| TagCell::new(0)).collect();
    let frame = |n: u64| (BASE + n) * FRAME_SIZE;
    let banks = [(frame(0), frame(BANK_A)), (frame(BANK_A + HOLE), frame(SPAN as u64))];
    let mut db = FrameDb::new(&tags, Pfn(BASE), &banks).map_err(|e| format!("database: {e}"))?;
    db.mark_hypervisor((frame(0), frame(HYP_FRAMES))).map_err(|e| format!("boot: {e}"))?;
    db.mark_reserved((frame(HYP_FRAMES), frame(HYP_FRAMES + RESERVED_FRAMES)))
        .map_err(|e| format!("boot: {e}"))?;
    let ram = Ram { words: (0..SPAN).map(|_| Cell::new(GARBAGE)).collect(), skip: Cell::new(false) };
    let free_ranges = [(frame(HYP_FRAMES + RESERVED_FRAMES), frame(BANK_A)), banks[1]];
    let mgr = FrameManager::new(db, &free_ranges, CPUS, cfg, &ram).map_err(|e| format!("manager: {e}"))?;
    ram.skip.set(sabotage == Sabotage::SkipScrub);

    let mut ex = Exercise::new(&mgr, &ram, cfg, sabotage);
    for (n, op) in ops.chunks_exact(4).take(MAX_OPS).enumerate() {
        ex.step(op[0], op[1], op[2], op[3]).map_err(|e| format!("op {n} ({:02x?}): {e}", op))?;
        ex.check_step().map_err(|e| format!("after op {n} ({:02x?}): {e}", op))?;
        if (n + 1) % FULL_EVERY == 0 {
            ex.check_full().map_err(|e| format!("after op {n}: {e}"))?;
        }
    }
    // Unless the last operation's full check just ran.
    let done = (ops.len() / 4).min(MAX_OPS);
    if done == 0 || done % FULL_EVERY != 0 {
        ex.check_full().map_err(|e| format!("at the end: {e}"))?;
    }
    ex.check_audit(false).map_err(|e| format!("at the end: {e}"))
}

/// The CPU an operand names: one of the three, now and then one that does not exist.
fn cpu_of(b: u8) -> usize {
    if b % 8 == 7 {
        CPUS
    } else {
        b as usize % CPUS
    }
}

fn vm_of(b: u8) -> VmId {
    VmId::new(u16::from(b & 3)).unwrap_or(VmId::new(0).expect("0 fits"))
}

/// An owner an operand names: a guest's memory (most often), its tables, its shared memory
/// or the hypervisor.
fn owner_of(b: u8) -> Owner {
    let vm = vm_of(b);
    match (b >> 2) & 3 {
        0 | 1 => Owner::guest(vm),
        2 => Owner::page_table(vm),
        _ if b & 0x10 != 0 => Owner::HYPERVISOR,
        _ => Owner::shared(vm),
    }
}

/// A frame count: a power of two up to 512, now and then 3 or 0 (refused).
fn count_of(b: u8) -> usize {
    match b % 12 {
        10 => 3,
        11 => 0,
        n => 1 << n,
    }
}

fn vm_in(owner: Owner) -> Option<VmId> {
    match owner.state() {
        FrameState::Guest(vm) | FrameState::PageTable(vm) | FrameState::SharedOwned(vm) => Some(vm),
        _ => None,
    }
}

impl<'m, 'a> Exercise<'m, 'a> {
    fn new(mgr: &'m FrameManager<'a>, ram: &'m Ram, cfg: PoolConfig, sabotage: Sabotage) -> Self {
        let mut m = Model {
            st: Vec::with_capacity(SPAN),
            stamp: Vec::with_capacity(SPAN),
            budgeted: std::vec![0; SPAN],
            compound: [false; BLOCKS],
            buddy_in_block: [0; BLOCKS],
            buddy_free: 0,
            pages: Default::default(),
            blocks: Default::default(),
            retired: [false; CPUS],
            committed: 0,
            unpromised: 0,
            aside: 0,
            open: false,
            promises_hold: true,
        };
        for i in 0..SPAN as u64 {
            let (s, stamp) = match i {
                _ if i < HYP_FRAMES => (St::Owned(Owner::HYPERVISOR), GARBAGE),
                _ if i < HYP_FRAMES + RESERVED_FRAMES => (St::Reserved, GARBAGE),
                _ if (BANK_A..BANK_A + HOLE).contains(&i) => (St::Absent, GARBAGE),
                _ => (St::Absent, 0),
            };
            m.st.push(s);
            m.stamp.push(stamp);
            if stamp == 0 {
                m.set(i as usize, St::Buddy);
            }
        }
        // Every whole 2 MiB block of a free range starts out as one unit.
        for b in 0..BLOCKS {
            m.compound[b] = m.buddy_in_block[b] as usize == BLOCK_FRAMES;
        }
        let guests = [1u16, 2, 3].map(|n| Budget {
            vm: VmId::new(n).expect("small id"),
            promised: 0,
            left: AtomicUsize::new(0),
            left_m: 0,
            beyond: 0,
            frames: Vec::new(),
            promises: Vec::new(),
        });
        Exercise {
            mgr,
            ram,
            cfg,
            m,
            targets: Vec::new(),
            guests,
            sabotage,
            last_page: None,
            touched: Vec::new(),
            touched_cpus: 0,
            next_stamp: 1,
            audits: 0,
            scratch: Vec::new(),
            text: String::new(),
        }
    }

    fn touch(&mut self, first: u64, frames: usize) {
        self.touched.push((first, frames));
    }

    fn touch_cpu(&mut self, cpu: usize) {
        self.touched_cpus |= 1 << cpu;
    }

    fn target(&self, pick: u8) -> Option<Target> {
        (!self.targets.is_empty()).then(|| self.targets[pick as usize % self.targets.len()])
    }

    fn remember(&mut self, t: Target) {
        if self.targets.len() < MAX_TARGETS {
            self.targets.push(t);
        } else {
            let i = t.first as usize % MAX_TARGETS;
            self.targets[i] = t;
        }
    }

    /// A free frame was taken while promises stood, by something other than a budget: the
    /// promises no longer bind the manager.
    fn took_unbudgeted(&mut self) {
        if self.m.committed > 0 || self.m.open {
            self.m.promises_hold = false;
        }
    }

    /// One operation: `op` chooses it, `a`, `b` and `c` are its operands.
    fn step(&mut self, op: u8, a: u8, b: u8, c: u8) -> Result<(), String> {
        match op % 21 {
            0 => {
                if self.alloc_page(cpu_of(a), owner_of(b))?.is_some() {
                    self.took_unbudgeted();
                }
            }
            1 => self.alloc_block(cpu_of(a), owner_of(b))?,
            2 => self.own_pool_page(cpu_of(a), vm_of(b))?,
            3 => self.own_pool_block(cpu_of(a), vm_of(b))?,
            4 => self.contiguous(count_of(a), Some(owner_of(b)))?,
            5 => self.contiguous(count_of(a), None)?,
            6 => {
                let Some(t) = self.target(a) else { return Ok(()) };
                let (first, frames) = sub_range(&t, b);
                let owner = if c & 3 == 3 { owner_of(c >> 2) } else { t.owner };
                if self.release(first, frames, owner)? && frames == t.frames {
                    self.targets.retain(|x| x.first != t.first);
                }
            }
            7 => {
                let raw = u16::from_le_bytes([a, b]);
                let first = if raw & 0x8000 != 0 {
                    BASE - 1 - u64::from(raw & 0xf)
                } else {
                    BASE + u64::from(raw) % (SPAN as u64 + 32)
                };
                let frames = if c & 0x20 != 0 { BLOCK_FRAMES } else { (c & 0x1f) as usize };
                let owner = match c >> 6 {
                    0 => match idx(first).map(|i| self.m.st[i]) {
                        Some(St::Owned(o)) => o,
                        _ => Owner::HYPERVISOR,
                    },
                    1 => Owner::HYPERVISOR,
                    2 => Owner::guest(vm_of(1)),
                    _ => Owner::page_table(vm_of(2)),
                };
                self.release(first, frames, owner)?;
            }
            8 => {
                let Some(t) = self.target(a) else { return Ok(()) };
                let owner = if c & 3 == 3 { owner_of(c >> 2) } else { t.owner };
                self.return_unused(t.first, cpu_of(b), owner)?;
            }
            9 => {
                let Some(t) = self.target(a) else { return Ok(()) };
                let (first, frames) = sub_range(&t, b);
                let vm = match vm_in(t.owner) {
                    Some(vm) if c & 3 != 3 => vm,
                    _ => vm_of(c >> 2),
                };
                self.share(first, frames, vm, &t)?;
            }
            10 => {
                let pfn = if a & 0x80 != 0 {
                    BASE + u64::from(a & 7) * BLOCK_FRAMES as u64 + u64::from(b)
                } else {
                    match self.target(a) {
                        Some(t) => t.first,
                        None => return Ok(()),
                    }
                };
                let owner = match self.target(a) {
                    Some(t) if c & 3 != 3 => t.owner,
                    _ => owner_of(c >> 2),
                };
                self.split_block(pfn, owner)?;
            }
            11 => {
                let Some(t) = self.target(a) else { return Ok(()) };
                self.write(t);
            }
            12 => {
                self.refill(cpu_of(a))?;
            }
            13 => self.drain(cpu_of(a))?,
            14 => self.retire(cpu_of(a))?,
            15 => {
                let wanted = u16::from_le_bytes([b, c]);
                let wanted = if wanted == u16::MAX { usize::MAX } else { wanted as usize };
                self.promise(a as usize % GUESTS, wanted)?;
            }
            16 => self.open()?,
            17 => {
                if c & 0x80 != 0 {
                    self.budget_transient(a as usize % GUESTS, (c & 0x7f) as usize)?;
                } else {
                    self.budget_draw(a as usize % GUESTS, b as usize % CPUS)?;
                }
            }
            18 => self.budget_give(a as usize % GUESTS, b)?,
            19 => self.budget_reclaim(a as usize % GUESTS, c & 1 != 0)?,
            // An audit walks all of RAM: two an input show it between operations, more would
            // only slow the run.
            _ if self.audits < MAX_AUDITS => {
                self.audits += 1;
                self.check_audit(true)?;
            }
            _ => {}
        }
        Ok(())
    }

    // ---- Allocations ----

    /// The pool the atomic path takes from for `cpu`: its own if it holds any, else the first
    /// of the next `steal_victims` CPUs whose pool is above its low watermark.
    fn source(&self, cpu: usize, blocks: bool) -> Option<usize> {
        let pools = if blocks { &self.m.blocks } else { &self.m.pages };
        if !pools[cpu].is_empty() {
            return Some(cpu);
        }
        let low = if blocks { self.cfg.block_low } else { self.cfg.page_low };
        (1..CPUS.min(self.cfg.steal_victims.saturating_add(1)))
            .map(|step| (cpu + step) % CPUS)
            .find(|&v| pools[v].len() > low)
    }

    /// The atomic path's page allocation for `owner` on `cpu`: the frame, or `None` if it
    /// was refused as the model expected.
    fn alloc_page(&mut self, cpu: usize, owner: Owner) -> Result<Option<u64>, String> {
        let expect = if cpu >= CPUS {
            Err(AtomicError::InvalidCpu)
        } else {
            self.source(cpu, false)
                .map(|c| (c, self.m.pages[c][self.m.pages[c].len() - 1]))
                .ok_or(AtomicError::Empty)
        };
        let got = match (self.sabotage, self.last_page) {
            (Sabotage::HandOutTwice, Some(last)) if cpu < CPUS => {
                if let Some(cell) = self.mgr.db().cell(last) {
                    cell.store(owner.tag(), Ordering::Relaxed);
                }
                Ok(Pfn(last))
            }
            _ => self.mgr.alloc_page_atomic_exclusive(cpu, owner),
        };
        self.took_page(got, expect, owner, "atomic page allocation")
    }

    /// The fault fast path's page allocation: this CPU's own pool only, with its claim.
    fn own_pool_page(&mut self, cpu: usize, vm: VmId) -> Result<(), String> {
        let Some(handle) = self.mgr.cpu(cpu) else {
            ensure!(cpu >= CPUS, "no handle for CPU {cpu}");
            return Ok(());
        };
        ensure!(
            handle.index() == cpu && core::ptr::eq(handle.manager(), self.mgr),
            "CPU {cpu}'s handle is another's"
        );
        let expect = self.m.pages[cpu].last().map(|&p| (cpu, p)).ok_or(AtomicError::Empty);
        let got = claimed(handle.alloc_guest_page_own_pool(vm), vm)?;
        if self.took_page(got, expect, Owner::guest(vm), "own-pool page allocation")?.is_some() {
            self.took_unbudgeted();
        }
        Ok(())
    }

    fn took_page(
        &mut self,
        got: Result<Pfn, AtomicError>,
        expect: Result<(usize, u64), AtomicError>,
        owner: Owner,
        what: &str,
    ) -> Result<Option<u64>, String> {
        let pfn = match got {
            Ok(pfn) => pfn,
            Err(e) => {
                ensure!(
                    expect == Err(e),
                    "{what} for {owner:?}: refused ({e:?}), the model expected {expect:?}"
                );
                return Ok(None);
            }
        };
        let i = idx(pfn.0).ok_or_else(|| format!("{what}: {pfn} is outside RAM"))?;
        if let St::Owned(o) = self.m.st[i] {
            return Err(format!("{what}: handed {pfn} to {owner:?}, but it is {o:?}'s: a frame owned twice"));
        }
        let Ok((cpu, top)) = expect else {
            return Err(format!("{what}: handed out {pfn}, the model expected {expect:?}"));
        };
        ensure!(
            top == pfn.0,
            "{what}: handed out {pfn}, the model expected the top of CPU {cpu}'s pool, {top:#x}"
        );
        ensure!(self.ram.read(i) == 0, "{what}: {pfn} handed out dirty ({:#x})", self.ram.read(i));
        self.m.pages[cpu].pop();
        self.m.set(i, St::Owned(owner));
        self.touch(pfn.0, 1);
        self.touch_cpu(cpu);
        self.last_page = Some(pfn.0);
        self.remember(Target { first: pfn.0, frames: 1, owner });
        Ok(Some(pfn.0))
    }

    fn alloc_block(&mut self, cpu: usize, owner: Owner) -> Result<(), String> {
        let expect = if cpu >= CPUS {
            Err(AtomicError::InvalidCpu)
        } else if owner.block_tag().is_none() {
            Err(AtomicError::NotOwner)
        } else {
            self.source(cpu, true)
                .map(|c| (c, self.m.blocks[c][self.m.blocks[c].len() - 1]))
                .ok_or(AtomicError::Empty)
        };
        let got = self.mgr.alloc_block_atomic_exclusive(cpu, owner);
        self.took_block(got, expect, owner, "atomic block allocation")
    }

    fn own_pool_block(&mut self, cpu: usize, vm: VmId) -> Result<(), String> {
        let Some(handle) = self.mgr.cpu(cpu) else { return Ok(()) };
        let expect = self.m.blocks[cpu].last().map(|&p| (cpu, p)).ok_or(AtomicError::Empty);
        ensure!(
            handle.needs_block_refill() == (self.m.blocks[cpu].len() < self.cfg.block_low),
            "CPU {cpu}'s block pool: needs_block_refill disagrees with its {} blocks",
            self.m.blocks[cpu].len()
        );
        let got = claimed(handle.alloc_guest_block_own_pool(vm), vm)?;
        self.took_block(got, expect, Owner::guest(vm), "own-pool block allocation")
    }

    fn took_block(
        &mut self,
        got: Result<Pfn, AtomicError>,
        expect: Result<(usize, u64), AtomicError>,
        owner: Owner,
        what: &str,
    ) -> Result<(), String> {
        let head = match got {
            Ok(head) => head,
            Err(e) => {
                ensure!(
                    expect == Err(e),
                    "{what} for {owner:?}: refused ({e:?}), the model expected {expect:?}"
                );
                return Ok(());
            }
        };
        ensure!(
            expect.map(|(_, top)| top) == Ok(head.0),
            "{what}: handed out {head}, the model expected {expect:?}"
        );
        let (cpu, _) = expect.map_err(|_| String::new())?;
        let i = idx(head.0).ok_or_else(|| format!("{what}: {head} is outside RAM"))?;
        for k in i..i + BLOCK_FRAMES {
            ensure!(self.m.st[k] == St::BlockPool(cpu as u8), "{what}: {} was not in the pool", pfn_of(k));
            self.m.set(k, St::Owned(owner));
        }
        self.m.blocks[cpu].pop();
        self.touch(head.0, BLOCK_FRAMES);
        self.touch_cpu(cpu);
        self.remember(Target { first: head.0, frames: BLOCK_FRAMES, owner });
        self.took_unbudgeted();
        Ok(())
    }

    /// `alloc_contiguous` for `owner`, or `grow_heap` (owner `None`).
    fn contiguous(&mut self, frames: usize, owner: Option<Owner>) -> Result<(), String> {
        let mut heap = Heap::default();
        let got = match owner {
            Some(owner) => self.mgr.alloc_contiguous(frames, owner),
            None => self.mgr.grow_heap(frames, &mut heap).map(|(start, _)| Pfn(start / FRAME_SIZE)),
        };
        let owner = owner.unwrap_or(Owner::HYPERVISOR);
        let what = format!("{frames} contiguous frames for {owner:?}");
        let first = match got {
            Ok(first) => first,
            Err(FrameError::BadFrameCount(n)) => {
                ensure!(n == frames && !frames.is_power_of_two(), "{what}: refused as a bad count");
                return Ok(());
            }
            Err(FrameError::OutOfFrames) => {
                ensure!(
                    frames.is_power_of_two() && !self.m.has_buddy_run(frames),
                    "{what}: out of frames, but the buddy allocator holds an aligned run of them"
                );
                return Ok(());
            }
            Err(e) => return Err(format!("{what}: {e}")),
        };
        ensure!(frames.is_power_of_two(), "{what}: granted");
        ensure!(first.0.is_multiple_of(frames as u64), "{what}: {first} is not aligned to the count");
        if let Some((start, end)) = heap.last {
            ensure!(
                start == first.phys() && end == first.add(frames as u64).phys(),
                "{what}: the heap was given {start:#x}..{end:#x}"
            );
        }
        let i = idx(first.0).ok_or_else(|| format!("{what}: {first} is outside RAM"))?;
        ensure!(i + frames <= SPAN, "{what}: {first} runs past RAM");
        for k in i..i + frames {
            ensure!(
                self.m.st[k] == St::Buddy,
                "{what}: {} was {:?}, not in the buddy allocator",
                pfn_of(k),
                self.m.st[k]
            );
            self.m.set(k, St::Owned(owner));
        }
        // Taken for per-frame use: the blocks they come from are split.
        for b in i / BLOCK_FRAMES..(i + frames).div_ceil(BLOCK_FRAMES) {
            self.m.compound[b] = false;
        }
        self.touch(first.0, frames);
        self.remember(Target { first: first.0, frames, owner });
        self.took_unbudgeted();
        Ok(())
    }

    // ---- Giving back ----

    /// Whether `release(first, frames, owner)` must succeed: every frame in RAM and `owner`'s.
    fn owned_by(&self, first: u64, frames: usize, owner: Owner) -> bool {
        let Some(i) = idx(first) else { return false };
        frames > 0 && i + frames <= SPAN && self.m.st[i..i + frames].iter().all(|&s| s == St::Owned(owner))
    }

    /// `release`, checked; whether it succeeded.
    fn release(&mut self, first: u64, frames: usize, owner: Owner) -> Result<bool, String> {
        let ok = self.owned_by(first, frames, owner);
        if let Some(i) = idx(first) {
            self.touch(first, frames.min(SPAN - i));
        }
        let got = match self.sabotage {
            Sabotage::FreeStillTagged if ok => {
                self.ram.scrub(Pfn(first), frames);
                self.mgr.give_back_untagged_for_test(Pfn(first), frames)
            }
            Sabotage::ScrubRefused if !ok => {
                self.ram.scrub(Pfn(first), frames);
                self.mgr.release(Pfn(first), frames, owner, self.ram)
            }
            _ => self.mgr.release(Pfn(first), frames, owner, self.ram),
        };
        let what = format!("release of {frames} frames from {:#x} as {owner:?}", first * FRAME_SIZE);
        match got {
            Ok(()) => ensure!(ok, "{what}: accepted"),
            Err(e) => {
                ensure!(!ok, "{what}: refused ({e})");
                // Errors print (the log line a refusal leaves).
                self.text.clear();
                let _ = write!(self.text, "{e}");
                return Ok(false);
            }
        }
        let i = idx(first).ok_or_else(|| format!("{what}: outside RAM"))?;
        for k in i..i + frames {
            self.m.set(k, St::Buddy);
            self.m.stamp[k] = 0;
            self.unbudget(k);
        }
        // A block released only in part goes back to per-frame tags; one released whole stays
        // one unit.
        for edge in [i, i + frames] {
            if edge % BLOCK_FRAMES != 0 {
                self.m.compound[edge / BLOCK_FRAMES] = false;
            }
        }
        Ok(true)
    }

    /// Frame `i` left its budget's guest without the budget being told.
    fn unbudget(&mut self, i: usize) {
        self.m.budgeted[i] = 0;
    }

    fn return_unused(&mut self, pfn: u64, cpu: usize, owner: Owner) -> Result<(), String> {
        let Some(i) = idx(pfn) else { return Ok(()) };
        // Only a frame never written may come back this way (the caller's contract).
        if self.m.stamp[i] != 0 {
            return Ok(());
        }
        let expect = if cpu >= CPUS {
            Err(AtomicError::InvalidCpu)
        } else if self.m.pages[cpu].len() >= self.cfg.page_capacity {
            Err(AtomicError::Full)
        } else if self.m.st[i] != St::Owned(owner) || self.m.compound[i / BLOCK_FRAMES] {
            Err(AtomicError::NotOwner)
        } else {
            Ok(())
        };
        let got = self.mgr.return_unused_page_atomic(cpu, Pfn(pfn), owner);
        self.touch(pfn, 1);
        ensure!(
            got == expect,
            "return of {pfn:#x} as {owner:?} to CPU {cpu}: {got:?}, the model expected {expect:?}"
        );
        if got.is_ok() {
            self.m.set(i, St::PagePool(cpu as u8));
            self.m.pages[cpu].push(pfn);
            self.unbudget(i);
            self.touch_cpu(cpu);
            // A frame in a retired CPU's pool is free but out of every allocation's reach.
            if self.m.retired[cpu] {
                self.m.promises_hold = false;
            }
        }
        Ok(())
    }

    fn share(&mut self, first: u64, frames: usize, vm: VmId, t: &Target) -> Result<(), String> {
        let ok = self.owned_by(first, frames, Owner::guest(vm));
        let got = self.mgr.share(Pfn(first), frames, vm);
        self.touch(first, frames);
        let what = format!("share of {frames} frames from {:#x} as VM {}'s", first * FRAME_SIZE, vm.get());
        ensure!(
            got.is_ok() == ok,
            "{what}: {got:?}, the model expected {}",
            if ok { "success" } else { "a refusal" }
        );
        if ok {
            let i = idx(first).ok_or_else(|| format!("{what}: outside RAM"))?;
            for k in i..i + frames {
                self.m.set(k, St::Owned(Owner::shared(vm)));
            }
            for b in i / BLOCK_FRAMES..(i + frames).div_ceil(BLOCK_FRAMES) {
                self.m.compound[b] = false;
            }
            if frames == t.frames {
                if let Some(x) = self.targets.iter_mut().find(|x| x.first == t.first) {
                    x.owner = Owner::shared(vm);
                }
            }
        }
        Ok(())
    }

    fn split_block(&mut self, pfn: u64, owner: Owner) -> Result<(), String> {
        let got = self.mgr.split_block(Pfn(pfn), owner);
        let expect = match idx(pfn) {
            None => Ok(false),
            Some(i) if !self.m.compound[i / BLOCK_FRAMES] => Ok(false),
            Some(i) if self.m.st[i] == St::Owned(owner) && owner.block_tag().is_some() => Ok(true),
            Some(_) => Err(()),
        };
        ensure!(
            got.map_err(|_| ()) == expect,
            "split of the block around {pfn:#x} as {owner:?}: {got:?}, the model expected {expect:?}"
        );
        if let Some(i) = idx(pfn) {
            let head = i - i % BLOCK_FRAMES;
            self.touch(pfn_of(head).0, BLOCK_FRAMES);
            if got == Ok(true) {
                self.m.compound[head / BLOCK_FRAMES] = false;
            }
        }
        Ok(())
    }

    /// The owner writes into the frames it still owns.
    fn write(&mut self, t: Target) {
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        let Some(i) = idx(t.first) else { return };
        for k in i..(i + t.frames).min(SPAN) {
            if matches!(self.m.st[k], St::Owned(_)) {
                self.m.stamp[k] = stamp;
                self.ram.words[k].set(stamp);
            }
        }
        self.touch(t.first, t.frames);
    }

    // ---- Pools ----

    /// `refill(cpu)`, checked; whether it ran.
    fn refill(&mut self, cpu: usize) -> Result<bool, String> {
        let got = self.mgr.refill(cpu);
        if cpu >= CPUS || self.m.retired[cpu] {
            ensure!(
                got == Err(FrameError::InvalidCpu(cpu)),
                "refill of CPU {cpu}: {got:?}, expected InvalidCpu"
            );
            return Ok(false);
        }
        let report = got.map_err(|e| format!("refill of CPU {cpu}: {e}"))?;
        self.touch_cpu(cpu);
        let mut seen = core::mem::take(&mut self.scratch);
        let pages_short = self.refilled(cpu, false, report.pages_added, &mut seen);
        let blocks_short = self.refilled(cpu, true, report.blocks_added, &mut seen);
        self.scratch = seen;
        let (pages_short, blocks_short) = (pages_short?, blocks_short?);
        ensure!(
            report.exhausted == (pages_short || blocks_short),
            "refill of CPU {cpu} says exhausted: {}, the model {}",
            report.exhausted,
            pages_short || blocks_short
        );
        Ok(true)
    }

    /// The entries a refill of `cpu` pushed on its page (or block) pool, `added` of them: as
    /// many as the model expects, taken from the buddy allocator, on top of what was there.
    /// Whether the pool stayed short of its high watermark.
    fn refilled(
        &mut self,
        cpu: usize,
        blocks: bool,
        added: usize,
        seen: &mut Vec<u64>,
    ) -> Result<bool, String> {
        let cfg = self.cfg;
        let (low, high, frames, there) = match blocks {
            false => (cfg.page_low, cfg.page_high, 1, self.m.buddy_free),
            true => (cfg.block_low, cfg.block_high, BLOCK_FRAMES, self.m.free_blocks()),
        };
        let held = if blocks { &self.m.blocks[cpu] } else { &self.m.pages[cpu] };
        let old = held.len();
        let want = if old < low { (high - old).min(there) } else { 0 };
        ensure!(
            added == want,
            "refill of CPU {cpu} added {added} entries (blocks: {blocks}), the model {want}"
        );
        self.mgr.pool_snapshot_for_test(cpu, blocks, seen);
        ensure!(
            seen.len() == old + want && seen[..old] == held[..],
            "refill of CPU {cpu}: pool {seen:x?}, the model had {held:x?} and added {want}"
        );
        for &first in &seen[old..] {
            let i = idx(first).filter(|i| i % frames == 0 && i + frames <= SPAN);
            let i = i.ok_or_else(|| {
                format!("refill of CPU {cpu} pooled {first:#x}: not {frames} frames of RAM")
            })?;
            for k in i..i + frames {
                let was = self.m.st[k];
                ensure!(was == St::Buddy, "refill of CPU {cpu} pooled {}, which was {was:?}", pfn_of(k));
                self.m.set(k, if blocks { St::BlockPool(cpu as u8) } else { St::PagePool(cpu as u8) });
            }
            // Pages are taken for per-frame use (their block is split), blocks as one unit.
            self.m.compound[i / BLOCK_FRAMES] = blocks;
            if blocks { &mut self.m.blocks[cpu] } else { &mut self.m.pages[cpu] }.push(first);
            self.touch(first, frames);
        }
        Ok(old < low && want < high - old)
    }

    /// Everything in `cpu`'s pools goes back to the buddy allocator (in the model).
    fn empty_pools(&mut self, cpu: usize) -> usize {
        let mut moved = 0;
        for p in core::mem::take(&mut self.m.pages[cpu]) {
            self.m.set(p as usize - BASE as usize, St::Buddy);
            self.touch(p, 1);
            moved += 1;
        }
        for head in core::mem::take(&mut self.m.blocks[cpu]) {
            let i = head as usize - BASE as usize;
            for k in i..i + BLOCK_FRAMES {
                self.m.set(k, St::Buddy);
            }
            self.touch(head, BLOCK_FRAMES);
            moved += BLOCK_FRAMES;
        }
        self.touch_cpu(cpu);
        moved
    }

    fn drain(&mut self, cpu: usize) -> Result<(), String> {
        let got = self.mgr.drain(cpu);
        if cpu >= CPUS {
            ensure!(got == Err(FrameError::InvalidCpu(cpu)), "drain of CPU {cpu}: {got:?}");
            return Ok(());
        }
        let moved = self.empty_pools(cpu);
        ensure!(got == Ok(moved), "drain of CPU {cpu}: {got:?}, the model moved {moved}");
        Ok(())
    }

    fn retire(&mut self, cpu: usize) -> Result<(), String> {
        let got = self.mgr.retire(cpu);
        if cpu >= CPUS || self.m.retired[cpu] {
            ensure!(
                got == Err(FrameError::InvalidCpu(cpu)),
                "retire of CPU {cpu}: {got:?}, expected InvalidCpu"
            );
            return Ok(());
        }
        self.m.retired[cpu] = true;
        let moved = self.empty_pools(cpu);
        ensure!(got == Ok(moved), "retire of CPU {cpu}: {got:?}, the model moved {moved}");
        if self.m.open {
            // What was set aside for pools that can no longer hold it.
            let kept = self.m.aside.min(self.m.capacity(&self.cfg));
            self.m.unpromised += self.m.aside - kept;
            self.m.aside = kept;
        }
        Ok(())
    }

    // ---- Promises and budgets ----

    fn promise(&mut self, g: usize, wanted: usize) -> Result<(), String> {
        let free = self.m.free();
        let expect = wanted.min(free.saturating_sub(self.m.committed + self.m.capacity(&self.cfg)));
        let promise = self.mgr.commit(wanted);
        let granted = promise.frames();
        ensure!(granted == expect, "commit of {wanted}: granted {granted}, the model {expect} ({free} free)");
        let promised = if self.sabotage == Sabotage::OverPromise {
            wanted.min(free.saturating_sub(self.m.committed))
        } else {
            granted
        };
        if self.m.open {
            // The unpromised count already has these frames.
            self.m.promises_hold = false;
        }
        self.m.committed += granted;
        let b = &mut self.guests[g];
        b.promises.push(promise);
        b.promised += promised;
        b.left_m += promised;
        b.left.fetch_add(promised, Ordering::Relaxed);
        Ok(())
    }

    fn open(&mut self) -> Result<(), String> {
        let reserved: usize = self.guests.iter().map(|b| b.left_m).sum();
        let beyond = self.m.free().saturating_sub(reserved);
        let aside = beyond.min(self.m.capacity(&self.cfg));
        let expect = beyond - aside;
        let got = self.mgr.open_unpromised(reserved);
        ensure!(got == expect, "open_unpromised({reserved}): {got}, the model {expect}");
        if self.m.open {
            // Counted again from scratch: what guests drew beyond their promises is counted twice.
            self.m.promises_hold = false;
        }
        self.m.open = true;
        self.m.unpromised = expect;
        self.m.aside = aside;
        Ok(())
    }

    /// Counts `n` pages for guest `g`: from its promise, else from the unpromised frames.
    /// `Some(false)`: from the promise, `Some(true)`: beyond it, `None`: out of memory.
    fn budget_take(&mut self, g: usize, n: usize) -> Result<Option<bool>, String> {
        let b = &mut self.guests[g];
        let took = take_if_there(&b.left, n);
        ensure!(took == (b.left_m >= n), "guest {}: took {n} of {} left: {took}", b.vm.get(), b.left_m);
        if took {
            b.left_m -= n;
            return Ok(Some(false));
        }
        let drew = self.mgr.unpromised().draw(n);
        ensure!(drew == (self.m.unpromised >= n), "unpromised draw of {n} of {}: {drew}", self.m.unpromised);
        if !drew {
            return Ok(None);
        }
        self.m.unpromised -= n;
        self.guests[g].beyond += n;
        Ok(Some(true))
    }

    /// Uncounts `n` pages of guest `g`, paying off what it drew beyond its promise first.
    fn budget_untake(&mut self, g: usize, n: usize) {
        let b = &mut self.guests[g];
        let k = n.min(b.beyond);
        b.beyond -= k;
        if k > 0 {
            self.mgr.unpromised().give(k);
            self.m.unpromised += k;
        }
        let rest = n - k;
        if rest > 0 {
            let cap = b.promised;
            let _ = b.left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| Some((l + rest).min(cap)));
            b.left_m = (b.left_m + rest).min(cap);
        }
    }

    /// A count taken and handed straight back (a vCPU that lost its race): what the guest
    /// can draw stays the same, though a count taken from the promise may come back as a
    /// payment of what it drew beyond it (given back to the unpromised frames).
    fn budget_transient(&mut self, g: usize, n: usize) -> Result<(), String> {
        let drawable = |ex: &Self| ex.guests[g].left_m + ex.m.unpromised;
        let before = (drawable(self), self.guests[g].beyond);
        if self.budget_take(g, n)?.is_some() {
            self.budget_untake(g, n);
            let b = &self.guests[g];
            ensure!(
                drawable(self) == before.0 && b.beyond <= before.1,
                "guest {}: taking and untaking {n} moved the counts",
                b.vm.get()
            );
        }
        Ok(())
    }

    /// A guest's page fault: the budget first, then the fast path's own pool, the general
    /// path (other CPUs' surplus), a refill and a second try.
    fn budget_draw(&mut self, g: usize, cpu: usize) -> Result<(), String> {
        let Some(beyond) = self.budget_take(g, 1)? else { return Ok(()) };
        let vm = self.guests[g].vm;
        let owner = Owner::guest(vm);
        let handle = self.mgr.cpu(cpu).ok_or_else(|| format!("no handle for CPU {cpu}"))?;
        let expect = self.m.pages[cpu].last().map(|&p| (cpu, p)).ok_or(AtomicError::Empty);
        let got = claimed(handle.alloc_guest_page_own_pool(vm), vm)?;
        let mut pfn = self.took_page(got, expect, owner, "budgeted page allocation")?;
        if pfn.is_none() {
            pfn = self.alloc_page(cpu, owner)?;
        }
        if pfn.is_none() && self.refill(cpu)? {
            pfn = self.alloc_page(cpu, owner)?;
        }
        let Some(pfn) = pfn else {
            ensure!(
                !self.m.promises_hold || self.m.retired[cpu],
                "guest {}'s page fault on CPU {cpu} found no frame, though its {} covered it \
                 ({} free, {} in the buddy allocator, {} committed, {} unpromised)",
                vm.get(),
                if beyond { "unpromised draw" } else { "promise" },
                self.m.free(),
                self.m.buddy_free,
                self.m.committed,
                self.m.unpromised
            );
            self.budget_untake(g, 1);
            return Ok(());
        };
        let i = pfn as usize - BASE as usize;
        self.m.budgeted[i] = g as u8 + 1;
        self.guests[g].frames.push(pfn);
        Ok(())
    }

    /// The next frame guest `g`'s budget drew that it still owns (as memory or lent), with its
    /// owner; frames that left it otherwise are forgotten.
    fn budget_frame(&mut self, g: usize, pick: usize) -> Option<(usize, u64, Owner)> {
        let vm = self.guests[g].vm;
        while !self.guests[g].frames.is_empty() {
            let k = pick % self.guests[g].frames.len();
            let pfn = self.guests[g].frames[k];
            let i = pfn as usize - BASE as usize;
            match self.m.st[i] {
                St::Owned(o) if self.m.budgeted[i] == g as u8 + 1 && vm_in(o) == Some(vm) => {
                    return Some((k, pfn, o))
                }
                _ => {
                    self.guests[g].frames.swap_remove(k);
                }
            }
        }
        None
    }

    /// The guest gives one page back.
    fn budget_give(&mut self, g: usize, pick: u8) -> Result<(), String> {
        let Some((k, pfn, owner)) = self.budget_frame(g, pick as usize) else { return Ok(()) };
        ensure!(
            self.release(pfn, 1, owner)?,
            "guest {}'s page {pfn:#x}: release refused",
            self.guests[g].vm.get()
        );
        self.guests[g].frames.swap_remove(k);
        self.budget_untake(g, 1);
        Ok(())
    }

    /// The guest is reset (its memory reclaimed, its budget whole again) or, with `withdraw`,
    /// gone (its promise withdrawn too).
    fn budget_reclaim(&mut self, g: usize, withdraw: bool) -> Result<(), String> {
        while let Some((k, pfn, owner)) = self.budget_frame(g, 0) {
            ensure!(
                self.release(pfn, 1, owner)?,
                "reclaiming guest {}'s {pfn:#x}: refused",
                self.guests[g].vm.get()
            );
            self.guests[g].frames.swap_remove(k);
        }
        let b = &mut self.guests[g];
        self.mgr.unpromised().give(b.beyond);
        self.m.unpromised += b.beyond;
        b.beyond = 0;
        b.left.store(b.promised, Ordering::Relaxed);
        b.left_m = b.promised;
        if withdraw {
            // Each promise goes back once, to the unpromised frames too once they are open.
            let granted: usize = b.promises.iter().map(Promise::frames).sum();
            let withdrawn: usize = b.promises.iter().map(|p| self.mgr.withdraw(p)).sum();
            ensure!(withdrawn == granted, "withdrawing {granted} promised frames: {withdrawn}");
            ensure!(
                b.promises.iter().map(|p| self.mgr.withdraw(p)).sum::<usize>() == 0,
                "a promise withdrawn twice gave frames back again"
            );
            b.promises.clear();
            self.m.committed = self.m.committed.saturating_sub(withdrawn);
            if self.m.open {
                self.m.unpromised += withdrawn;
            }
            b.promised = 0;
            b.left.store(0, Ordering::Relaxed);
            b.left_m = 0;
        }
        Ok(())
    }

    // ---- Checks ----

    fn check_frame(&self, i: usize) -> Result<(), String> {
        let pfn = pfn_of(i);
        let want = self.m.unit(i);
        let got = self.mgr.db().unit(pfn);
        if got != Ok(want) {
            let held = self.m.st[i];
            return Err(match got {
                Ok((found, _)) if want.0 == FrameState::Free && found != FrameState::Free => {
                    format!("{pfn} is free in the model ({held:?}) but still tagged {found}")
                }
                _ => format!("{pfn}: the database says {got:?}, the model {want:?} ({held:?})"),
            });
        }
        let (word, stamp) = (self.ram.read(i), self.m.stamp[i]);
        if word != stamp {
            return Err(if stamp == 0 {
                format!("{pfn} ({}) reads {word:#x}, not zero: not scrubbed", want.0)
            } else {
                format!("{pfn} ({}) lost its contents {stamp:#x} (reads {word:#x})", want.0)
            });
        }
        Ok(())
    }

    fn check_pool(&mut self, cpu: usize) -> Result<(), String> {
        let mut seen = core::mem::take(&mut self.scratch);
        for blocks in [false, true] {
            self.mgr.pool_snapshot_for_test(cpu, blocks, &mut seen);
            let want = if blocks { &self.m.blocks[cpu] } else { &self.m.pages[cpu] };
            ensure!(
                seen == *want,
                "CPU {cpu}'s {} pool holds {seen:x?}, the model {want:x?}",
                if blocks { "block" } else { "page" }
            );
        }
        self.scratch = seen;
        Ok(())
    }

    fn check_counts(&self) -> Result<(), String> {
        let free = self.mgr.free_frames();
        ensure!(free == self.m.free(), "{free} free frames, the model {}", self.m.free());
        let committed = self.mgr.committed_frames();
        ensure!(
            committed == self.m.committed,
            "{committed} frames committed, the model {}",
            self.m.committed
        );
        let unpromised = self.mgr.unpromised().available();
        ensure!(unpromised == self.m.unpromised, "{unpromised} unpromised, the model {}", self.m.unpromised);
        for b in &self.guests {
            let left = b.left.load(Ordering::Relaxed);
            ensure!(
                left == b.left_m,
                "guest {}: {left} pages left in its promise, the model {}",
                b.vm.get(),
                b.left_m
            );
        }
        Ok(())
    }

    /// Frames `start..end`: raw tags and contents (one load and compare each); a difference
    /// is explained by `check_frame`, through `FrameDb::unit`.
    fn check_tags(&self, start: usize, end: usize) -> Result<(), String> {
        let tags = &self.mgr.db().tags()[start..end];
        for (i, cell) in (start..end).zip(tags) {
            let tag = cell.load(Ordering::Relaxed);
            if tag != self.m.raw_tag(i) || self.ram.read(i) != self.m.stamp[i] {
                self.check_frame(i)?;
                return Err(format!("{}: tag {tag:#06x}, the model {:#06x}", pfn_of(i), self.m.raw_tag(i)));
            }
        }
        Ok(())
    }

    /// What the operation touched, and the counts.
    fn check_step(&mut self) -> Result<(), String> {
        let touched = core::mem::take(&mut self.touched);
        for &(first, frames) in &touched {
            let Some(start) = idx(first) else { continue };
            // `FrameDb::unit` for the first frame, raw tags (as `check_full`) for the rest.
            self.check_frame(start)?;
            self.check_tags(start, (start + frames).min(SPAN))?;
        }
        self.touched = touched;
        self.touched.clear();
        for cpu in 0..CPUS {
            if self.touched_cpus & (1 << cpu) != 0 {
                self.check_pool(cpu)?;
            }
        }
        self.touched_cpus = 0;
        self.check_counts()
    }

    /// Every frame, every pool, every block head, the watermarks.
    fn check_full(&mut self) -> Result<(), String> {
        self.check_tags(0, SPAN)?;
        for cpu in 0..CPUS {
            self.check_pool(cpu)?;
            let low =
                self.m.pages[cpu].len() < self.cfg.page_low || self.m.blocks[cpu].len() < self.cfg.block_low;
            ensure!(self.mgr.needs_refill(cpu) == low, "CPU {cpu}: needs_refill is not {low}");
            let handle = self.mgr.cpu(cpu).ok_or_else(|| format!("no handle for CPU {cpu}"))?;
            ensure!(handle.needs_refill() == low, "CPU {cpu}'s handle: needs_refill is not {low}");
        }
        ensure!(!self.mgr.needs_refill(CPUS) && self.mgr.cpu(CPUS).is_none(), "a CPU that does not exist");
        for b in 0..BLOCKS {
            let head = b * BLOCK_FRAMES;
            let state = self.m.st[head].state();
            let one = self.mgr.db().is_block_in(pfn_of(head), state);
            let want = self.m.compound[b] && state.owner().is_none_or(|o| o.block_tag().is_some());
            ensure!(one == want, "block {}: one unit in {state}: {one}, the model {want}", pfn_of(head));
            ensure!(
                self.mgr.db().is_in(pfn_of(head + 1), self.m.st[head + 1].state()),
                "{}",
                pfn_of(head + 1)
            );
        }
        ensure!(self.mgr.cpus() == CPUS && *self.mgr.config() == self.cfg, "the manager's shape changed");
        self.check_counts()
    }

    /// The ownership audit: exact, and every count the model's.
    fn check_audit(&mut self, print: bool) -> Result<(), String> {
        let r = self.mgr.audit(Some(self.ram));
        ensure!(r.is_exact(), "audit: {r}");
        let mut want = AuditReport { frames: SPAN, ..AuditReport::default() };
        let mut guests: [GuestFrames; 4] = core::array::from_fn(|vm| GuestFrames {
            vm: vm_of(vm as u8),
            memory: 0,
            page_tables: 0,
            shared: 0,
        });
        for &s in &self.m.st {
            match s.state() {
                FrameState::Absent => want.absent += 1,
                FrameState::Free => want.free += 1,
                FrameState::Reserved => want.reserved += 1,
                FrameState::Hypervisor => want.hypervisor += 1,
                FrameState::Scrubbing => want.scrubbing += 1,
                FrameState::Guest(vm) => guests[vm.get() as usize].memory += 1,
                FrameState::PageTable(vm) => guests[vm.get() as usize].page_tables += 1,
                FrameState::SharedOwned(vm) => {
                    want.shared += 1;
                    guests[vm.get() as usize].shared += 1;
                }
            }
        }
        want.guests = guests.into_iter().filter(|g| g.memory + g.page_tables + g.shared > 0).collect();
        want.compound_blocks = self.m.compound.iter().filter(|c| **c).count();
        want.free_in_buddy = self.m.buddy_free;
        want.free_in_page_pools = self.m.pages.iter().map(Vec::len).sum();
        want.free_in_block_pools = self.m.blocks.iter().map(|b| b.len() * BLOCK_FRAMES).sum();
        ensure!(r == want, "audit: {r}\nthe model: {want}");
        if print {
            self.text.clear();
            let _ = write!(self.text, "{r}");
        }
        Ok(())
    }
}

/// The frame a claim of the fast path proves, which must be for `vm`.
fn claimed<const N: usize>(
    got: Result<Claimed<N>, AtomicError>,
    vm: VmId,
) -> Result<Result<Pfn, AtomicError>, String> {
    let Ok(claim) = got else { return Ok(got.map(|c| c.pfn())) };
    ensure!(claim.vm() == vm, "a claim for VM {} came back for VM {}", vm.get(), claim.vm().get());
    Ok(Ok(claim.pfn()))
}

/// The frames of `t` an operand picks: all of them, or a run inside them.
fn sub_range(t: &Target, b: u8) -> (u64, usize) {
    if b & 0x80 == 0 || t.frames == 1 {
        return (t.first, t.frames);
    }
    let start = (b & 7) as usize * t.frames / 8;
    let len = (1 + ((b >> 3) & 0xf) as usize).min(t.frames - start);
    (t.first + start as u64, len)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Config 0; allocations of every kind, refills, a release, a share, returns, splits,
    /// promises, budget draws beyond the promise, an audit.
    const SCRIPT: &[u8] = &[
        0x00, // config 0
        12, 0, 0, 0, // refill CPU 0
        0, 0, 0x01, 0, // page for guest 1 on CPU 0
        0, 1, 0x08, 0, // page for guest 0's tables on CPU 1 (steals from CPU 0? no: CPU 0 at low)
        1, 0, 0x02, 0, // block for guest 2 on CPU 0
        4, 3, 0x03, 0, // 8 contiguous frames for guest 3
        5, 2, 0, 0, // heap grows by 4 frames
        11, 0, 0, 0, // guest 1 writes its page
        6, 0, 0, 3, // release guest 1's page as someone else: refused
        9, 2, 0x83, 0, // share part of guest 2's block
        10, 2, 0, 0, // split guest 2's block
        8, 1, 1, 0, // return the table page to CPU 1
        6, 3, 0, 0, // release the 8 frames
        15, 0, 0x40, 0, // promise 64 frames to guest 1
        16, 0, 0, 0, // open the unpromised frames
        17, 0, 1, 0, // guest 1 draws a page on CPU 1
        17, 0, 2, 0, // and on CPU 2
        18, 0, 0, 0, // gives one back
        17, 0, 0, 0x85, // takes 5 and hands them back
        14, 2, 0, 0, // retire CPU 2
        19, 0, 0, 1, // guest 1 is gone
        13, 0, 0, 0, // drain CPU 0
        20, 0, 0, 0, // audit
    ];

    #[test]
    fn a_scripted_sequence_passes() {
        run(SCRIPT);
    }

    #[test]
    fn replays_the_checked_in_corpus_and_regressions() {
        for dir in ["corpus", "regressions"] {
            let dir = format!("{}/fuzz/{dir}/frame_ops", env!("CARGO_MANIFEST_DIR"));
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for e in entries.flatten() {
                let data = std::fs::read(e.path()).expect("readable corpus file");
                if let Err(err) = run_checked(&data, Sabotage::None) {
                    panic!("{}: {err}", e.path().display());
                }
            }
        }
    }

    /// Runs `ops` with `bug` planted and expects a finding mentioning `what`.
    fn caught(bug: Sabotage, ops: &[u8], what: &str) {
        let err = run_checked(ops, bug).expect_err("the planted bug went unnoticed");
        assert!(err.contains(what), "{bug:?} caught, but as: {err}");
    }

    #[test]
    fn a_frame_handed_out_twice_is_caught() {
        // Guest 1 then guest 2 take a page on CPU 0: the second gets the first's.
        caught(Sabotage::HandOutTwice, &[0, 12, 0, 0, 0, 0, 0, 1, 0, 0, 0, 2, 0], "owned twice");
    }

    #[test]
    fn a_frame_freed_while_still_tagged_is_caught() {
        // Guest 1 takes a page and releases it.
        caught(Sabotage::FreeStillTagged, &[0, 12, 0, 0, 0, 0, 0, 1, 0, 6, 0, 0, 0], "still tagged");
        // Guest 2's block, released whole.
        caught(Sabotage::FreeStillTagged, &[0, 12, 0, 0, 0, 1, 0, 2, 0, 6, 0, 0, 0], "still tagged");
    }

    #[test]
    fn a_release_without_scrubbing_is_caught() {
        // Guest 1 takes a page, writes it, releases it.
        caught(Sabotage::SkipScrub, &[0, 12, 0, 0, 0, 0, 0, 1, 0, 11, 0, 0, 0, 6, 0, 0, 0], "not scrubbed");
    }

    #[test]
    fn a_refused_release_that_scrubs_is_caught() {
        // Guest 1 takes a page and writes it; guest 2 tries to release it.
        caught(
            Sabotage::ScrubRefused,
            &[0, 12, 0, 0, 0, 0, 0, 1, 0, 11, 0, 0, 0, 6, 0, 0, 0x0b],
            "lost its contents",
        );
    }

    #[test]
    fn operations_past_the_bound_are_ignored() {
        // A frame handed out twice after `fillers` operations that change nothing.
        let ops = |fillers: usize| {
            let mut ops = std::vec![0];
            for _ in 0..fillers {
                ops.extend_from_slice(&[13, 7, 0, 0]);
            }
            ops.extend_from_slice(&[12, 0, 0, 0, 0, 0, 1, 0, 0, 0, 2, 0]);
            ops
        };
        assert!(run_checked(&ops(MAX_OPS - 3), Sabotage::HandOutTwice).is_err());
        assert!(run_checked(&ops(MAX_OPS - 2), Sabotage::HandOutTwice).is_ok());
    }

    /// Free memory cut down to 30 frames (contiguous allocations of 512 x 3, 256, 128, 64, 16
    /// and 8), guest 1 promised all it can get, CPUs 1 and 2 refilled (12 pages each, 4 of
    /// which stay out of reach below their low watermarks), then 23 page faults on CPU 0.
    fn squeezed() -> Vec<u8> {
        let mut ops = std::vec![0];
        for count in [9, 9, 9, 8, 7, 6, 4, 3] {
            ops.extend_from_slice(&[4, count, 1, 0]);
        }
        ops.extend_from_slice(&[15, 0, 0xff, 0xff, 12, 1, 0, 0, 12, 2, 0, 0]);
        for _ in 0..23 {
            ops.extend_from_slice(&[17, 0, 0, 0]);
        }
        ops
    }

    #[test]
    fn a_promise_beyond_the_reachable_frames_is_caught() {
        // As it is, the pools' capacity (1,584 frames) leaves nothing to promise: every fault
        // is refused by the budget. Promised the 30 free frames, the guest runs out after 22.
        run(&squeezed());
        caught(Sabotage::OverPromise, &squeezed(), "found no frame");
    }

    /// Pseudo-random inputs: none diverges without a bug; each planted bug is caught by some.
    #[test]
    fn random_sequences_pass_and_catch_every_planted_bug() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let bugs =
            [Sabotage::HandOutTwice, Sabotage::FreeStillTagged, Sabotage::SkipScrub, Sabotage::ScrubRefused];
        let mut caught = [0; 4];
        for _ in 0..300 {
            let len = 1 + 4 * (next() % 48) as usize;
            let data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if let Err(e) = run_checked(&data, Sabotage::None) {
                panic!("{data:02x?}: {e}");
            }
            for (n, bug) in bugs.iter().enumerate() {
                caught[n] += usize::from(run_checked(&data, *bug).is_err());
            }
        }
        assert!(caught.iter().all(|&n| n > 0), "caught per bug: {caught:?}");
    }
}

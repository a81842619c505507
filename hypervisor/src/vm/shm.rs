//! Static shared memory between guests (Xen's dom0less binding, read by `dt::shm`): which
//! guests may use which region, and a region's frames and users once it exists.
//!
//! It owns the checks across guests, made before any guest is built ([`plan`]): a region lies
//! outside the guest's RAM and devices and inside its IPA space, every guest naming an id gives
//! it the same size, at most one guest owns it, at most [`MAX_REGIONS`] ids exist; and after
//! the guests are built ([`refuse_orphans`]) that a region whose owner did not start has no
//! borrower left. A refusal names the guest and the region, and only that guest is not started.
//!
//! A region lives from the creation of its guests until its owner stops, or, when Labyrinth
//! owns it (no guest does: Xen's DOMID_IO), until its last user stops: its frames are tagged
//! shared-owned by the owner (VM 0 for Labyrinth), mapped into the owner as shared-owned and
//! into each borrower as shared-borrowed, resets included. A borrower that stops removes only
//! its view; an owner that stops first revokes every borrower's ([`Registry::leave`] says
//! which, the caller unmaps them live with [`unmap_view`] and records them in the borrower's
//! [`Revocations`]), then the frames go (`docs/memory.md`, "Shared memory").

use alloc::vec::Vec;
use core::fmt;

use super::layout::{RAM_BASE, UART_BASE, UART_SIZE};
use super::vgic::GICD_BASE;
use crate::dt::{GuestConfig, Region, SharedMem, ShmRole, MAX_SHARED};
use crate::frame::{Pfn, Promise, VmId, FRAME_SIZE};
use crate::stage2::{Attrs, Stage2, Stage2Env, Stage2Error};

/// Distinct shared regions on the machine.
pub const MAX_REGIONS: usize = 8;
/// The guest physical window of the devices every guest may be given (GIC, redistributors,
/// PL011): no shared region may overlap it, virtual GIC or not.
pub const DEVICES: (u64, u64) = (GICD_BASE, UART_BASE + UART_SIZE);
/// The owner of a region no guest owns: Labyrinth (no guest has VM id 0).
pub const LABYRINTH: VmId = match VmId::new(0) {
    Some(id) => id,
    None => panic!(),
};

/// Why a guest's shared memory cannot be set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShmProblem<'a> {
    /// The region overlaps the guest's RAM.
    OverlapsRam { ram_end: u64 },
    /// The region overlaps the devices' window ([`DEVICES`]).
    OverlapsDevices,
    /// The region ends beyond the guest's IPA space.
    BeyondIpa { ipa_bits: u32 },
    /// Another guest named the id first with another size.
    SizeMismatch { first: &'a str, first_size: u64 },
    /// Another guest owns the region already.
    SecondOwner { owner: &'a str },
    /// [`MAX_REGIONS`] ids exist already.
    TooManyRegions,
    /// The guest that owns the region was not started.
    OwnerNotStarted { owner: &'a str },
    /// The host range of Xen's older form is not all inside host RAM.
    HostNotRam { host: u64 },
    /// Another guest named the id first with another host address.
    HostMismatch { host: u64, first: &'a str, first_host: u64 },
    /// No host memory left for the region.
    OutOfMemory,
    /// The region could not be mapped (a stage-2 error).
    Map(Stage2Error),
}

/// A guest refused for its shared memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShmRefusal<'a> {
    pub guest: &'a str,
    pub id: &'a str,
    pub guest_addr: u64,
    pub size: u64,
    pub problem: ShmProblem<'a>,
}

impl fmt::Display for ShmRefusal<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (end, size) = (self.guest_addr.saturating_add(self.size), self.size);
        write!(
            f,
            "guest {}: shared memory \"{}\" at {:#x}-{:#x}: ",
            self.guest, self.id, self.guest_addr, end
        )?;
        match self.problem {
            ShmProblem::OverlapsRam { ram_end } => {
                write!(f, "overlaps its RAM {RAM_BASE:#x}-{ram_end:#x}")
            }
            ShmProblem::OverlapsDevices => {
                write!(f, "overlaps the devices' window {:#x}-{:#x} (GIC, PL011)", DEVICES.0, DEVICES.1)
            }
            ShmProblem::BeyondIpa { ipa_bits } => write!(f, "ends beyond the {ipa_bits}-bit IPA space"),
            ShmProblem::SizeMismatch { first, first_size } => write!(
                f,
                "{size:#x} bytes, but guest {first} gives the same id {first_size:#x} bytes: one id is one region"
            ),
            ShmProblem::SecondOwner { owner } => {
                write!(f, "role \"owner\", but guest {owner} owns it already: a region has one owner")
            }
            ShmProblem::TooManyRegions => write!(f, "more than {MAX_REGIONS} shared regions on the machine"),
            ShmProblem::OwnerNotStarted { owner } => {
                write!(f, "a borrower without an owner: its owner, guest {owner}, was not started")
            }
            ShmProblem::HostNotRam { host } => write!(
                f,
                "host address {host:#x}-{:#x} is not all inside host RAM (the host device tree's memory nodes)",
                host.saturating_add(size)
            ),
            ShmProblem::HostMismatch { host, first, first_host } => write!(
                f,
                "host address {host:#x}, but guest {first} gives the same id host address {first_host:#x}: \
                 one id is one region"
            ),
            ShmProblem::OutOfMemory => write!(f, "no host memory left for its {} KiB", size >> 10),
            ShmProblem::Map(e) => write!(f, "cannot be mapped: {e}"),
        }
    }
}

/// One region as the configuration describes it, in configuration order of first mention.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionPlan<'a> {
    pub id: &'a str,
    pub size: u64,
    /// The guest (index into `plan`'s input) whose node says `role = "owner"`, if one does,
    /// even if that guest was refused: its borrowers are then orphans.
    pub owner: Option<usize>,
    /// The guests (indices) that may use it, owner included, with where it appears in each.
    pub users: Vec<(usize, SharedMem<'a>)>,
    /// The host address Xen's older form names (every user naming one names the same) and
    /// the first user naming it: checked, not used (Labyrinth places the region itself).
    pub host: Option<(u64, usize)>,
}

impl RegionPlan<'_> {
    /// The VM id whose tag the region's frames carry: the owner guest's, or [`LABYRINTH`].
    pub fn owner_vm(&self, vm_of: impl Fn(usize) -> VmId) -> VmId {
        self.owner.map_or(LABYRINTH, vm_of)
    }

    /// Pages in the region.
    pub fn pages(&self) -> usize {
        (self.size / FRAME_SIZE) as usize
    }
}

/// Whether `[base, base + size)` lies inside the union of `banks` (which may be unsorted and
/// adjacent, as memory nodes come).
pub fn in_host_ram(banks: &[Region], base: u64, size: u64) -> bool {
    let Some(end) = base.checked_add(size) else { return false };
    let mut at = base;
    // Each step moves past one bank: at most `banks.len()` steps.
    for _ in 0..=banks.len() {
        if at >= end {
            return true;
        }
        match banks.iter().find(|b| b.base() <= at && at < b.end()) {
            Some(b) => at = b.end(),
            None => return false,
        }
    }
    at >= end
}

/// Checks every guest's shared memory nodes against its own layout and against the other
/// guests' (`guests` in configuration order, the well-formed ones), and a host address (Xen's
/// older form) against the host's RAM banks `host_ram`; returns the regions with their users
/// and, per guest, `None` or why it is refused. A guest is checked whole before any of its
/// nodes joins a region, so a refused guest uses no region.
pub fn plan<'a>(
    guests: &[GuestConfig<'a>],
    ipa_bits: u32,
    host_ram: &[Region],
) -> (Vec<RegionPlan<'a>>, Vec<Option<ShmRefusal<'a>>>) {
    let mut regions: Vec<RegionPlan<'a>> = Vec::new();
    // Owners first: a borrower named before its owner still knows who owns the region.
    for (g, cfg) in guests.iter().enumerate() {
        for s in cfg.shared.iter().filter(|s| s.role == ShmRole::Owner) {
            if !regions.iter().any(|r| r.id == s.id) && regions.len() < MAX_REGIONS {
                regions.push(RegionPlan {
                    id: s.id,
                    size: s.size,
                    owner: Some(g),
                    users: Vec::new(),
                    host: None,
                });
            }
        }
    }
    let mut verdicts = Vec::with_capacity(guests.len());
    for (g, cfg) in guests.iter().enumerate() {
        let verdict = cfg.shared.iter().find_map(|s| {
            let refuse = |problem| {
                Some(ShmRefusal {
                    guest: cfg.name,
                    id: s.id,
                    guest_addr: s.guest_addr,
                    size: s.size,
                    problem,
                })
            };
            let ram_end = RAM_BASE.saturating_add(cfg.memory_bytes());
            if s.guest_addr < ram_end && RAM_BASE < s.guest_end() {
                return refuse(ShmProblem::OverlapsRam { ram_end });
            }
            if s.guest_addr < DEVICES.1 && DEVICES.0 < s.guest_end() {
                return refuse(ShmProblem::OverlapsDevices);
            }
            if ipa_bits < 64 && s.guest_end() > 1u64 << ipa_bits {
                return refuse(ShmProblem::BeyondIpa { ipa_bits });
            }
            if let Some(host) = s.host_addr {
                if !in_host_ram(host_ram, host, s.size) {
                    return refuse(ShmProblem::HostNotRam { host });
                }
                let first = regions.iter().find(|r| r.id == s.id).and_then(|r| r.host);
                if let Some((first_host, first)) = first.filter(|&(h, _)| h != host) {
                    return refuse(ShmProblem::HostMismatch { host, first: guests[first].name, first_host });
                }
            }
            match regions.iter().find(|r| r.id == s.id) {
                Some(r) if r.owner.is_some_and(|o| o != g) && s.role == ShmRole::Owner => {
                    let owner = guests[r.owner.unwrap_or(g)].name;
                    refuse(ShmProblem::SecondOwner { owner })
                }
                Some(r) if r.size != s.size => {
                    // The first guest to name it sets the size (its owner, if it has one).
                    let first = r.users.first().map_or(r.owner.unwrap_or(g), |u| u.0);
                    refuse(ShmProblem::SizeMismatch { first: guests[first].name, first_size: r.size })
                }
                Some(_) => None,
                None => {
                    let new_ids = cfg.shared.iter().filter(|t| !regions.iter().any(|r| r.id == t.id)).count();
                    if regions.len() + new_ids > MAX_REGIONS {
                        refuse(ShmProblem::TooManyRegions)
                    } else {
                        None
                    }
                }
            }
        });
        if verdict.is_none() {
            for s in cfg.shared.iter() {
                let host = s.host_addr.map(|h| (h, g));
                match regions.iter_mut().find(|r| r.id == s.id) {
                    Some(r) => {
                        r.users.push((g, *s));
                        r.host = r.host.or(host);
                    }
                    None => regions.push(RegionPlan {
                        id: s.id,
                        size: s.size,
                        owner: None,
                        users: alloc::vec![(g, *s)],
                        host,
                    }),
                }
            }
        }
        verdicts.push(verdict);
    }
    // An owner refused here still leaves its id owned: its borrowers are orphans, refused once
    // the started guests are known (`refuse_orphans`).
    (regions, verdicts)
}

/// After the guests were built (`started(g)`): every user of a region whose owner did not
/// start is refused; refusing one may orphan the regions it owns, so this runs to a fixed
/// point. Returns the refusals with the guests' indices, each guest once.
pub fn refuse_orphans<'a>(
    regions: &[RegionPlan<'a>],
    names: &[&'a str],
    started: &mut [bool],
) -> Vec<(usize, ShmRefusal<'a>)> {
    let mut refused = Vec::new();
    loop {
        let mut changed = false;
        for r in regions {
            let Some(owner) = r.owner else { continue };
            if started.get(owner).copied().unwrap_or(false) {
                continue;
            }
            for &(g, s) in &r.users {
                if g != owner && started.get(g).copied().unwrap_or(false) {
                    started[g] = false;
                    changed = true;
                    let problem = ShmProblem::OwnerNotStarted { owner: names[owner] };
                    let refusal = ShmRefusal {
                        guest: names[g],
                        id: r.id,
                        guest_addr: s.guest_addr,
                        size: s.size,
                        problem,
                    };
                    refused.push((g, refusal));
                }
            }
        }
        if !changed {
            return refused;
        }
    }
}

/// One guest a new region is mapped into: its index in the configuration, its node, its VM.
pub type User<'a> = (usize, SharedMem<'a>, VmId);

/// Why a region that was made is used by no guest that will run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unused<'a> {
    /// Its owner could not map it: the owner and every borrower are refused.
    OwnerCannotMap { owner: &'a str },
    /// No guest could map it (a region Labyrinth owns).
    NobodyCanMap,
}

impl fmt::Display for Unused<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unused::OwnerCannotMap { owner } => write!(f, "its owner, guest {owner}, cannot map it"),
            Unused::NobodyCanMap => write!(f, "no guest can map it"),
        }
    }
}

/// What mapping a new region into its users came to ([`map_users`]).
#[derive(Debug, PartialEq, Eq)]
pub struct Mapping<'a> {
    /// The users refused (configuration index, reason), in the order they were.
    pub refused: Vec<(usize, ShmRefusal<'a>)>,
    /// `Some` when no guest that will run uses the region.
    pub unused: Option<Unused<'a>>,
}

/// Maps the new `region` (its frames, owner and promise, no view yet) into each of `users`,
/// its owner first, with `map(i, frames, as_owner)` (the stage-2 mapping of the region at
/// `users[i]`'s guest address in its space), and
/// adds a view for every user it was tried in, mapped in full or in part (a map that fails
/// keeps the pages it mapped): so the registry releases the frames only after each of those
/// spaces lost its view or is gone ([`Registry::leave`]), whatever order the refused guests
/// are taken down in. A user whose map fails is refused; when it is the owner, the region is
/// not mapped into any borrower and every borrower is refused too (it would start with the
/// region revoked). `names`: the guests' names by configuration index.
pub fn map_users<'a>(
    region: &mut LiveRegion<'a>,
    users: &[User<'a>],
    names: &[&'a str],
    mut map: impl FnMut(usize, &[Pfn], bool) -> Result<(), Stage2Error>,
) -> Mapping<'a> {
    let mut refused = Vec::new();
    let refusal = |k: usize, s: &SharedMem<'a>, problem| ShmRefusal {
        guest: names[k],
        id: region.id,
        guest_addr: s.guest_addr,
        size: s.size,
        problem,
    };
    let owner = users.iter().position(|u| u.2 == region.owner);
    let borrowers = (0..users.len()).filter(|&i| Some(i) != owner);
    let mut unused = None;
    for i in owner.into_iter().chain(borrowers) {
        let (k, s, vm) = users[i];
        let as_owner = Some(i) == owner;
        if let Some(Unused::OwnerCannotMap { owner }) = unused {
            refused.push((k, refusal(k, &s, ShmProblem::OwnerNotStarted { owner })));
            continue;
        }
        let done = map(i, &region.frames, as_owner);
        region.views.push(View { vm, guest_addr: s.guest_addr, owner: as_owner, mapped: true });
        if let Err(e) = done {
            refused.push((k, refusal(k, &s, ShmProblem::Map(e))));
            if as_owner {
                unused = Some(Unused::OwnerCannotMap { owner: names[k] });
            }
        }
    }
    if unused.is_none() && refused.len() == users.len() {
        unused = Some(Unused::NobodyCanMap);
    }
    Mapping { refused, unused }
}

/// One guest's view of a live region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct View {
    pub vm: VmId,
    pub guest_addr: u64,
    /// The guest owns the region (its leaves are shared-owned, else shared-borrowed).
    pub owner: bool,
    /// The region is in the guest's stage-2 space (or being put there): `false` from the
    /// start of the guest's reset (its space emptied) until the region is mapped again.
    pub mapped: bool,
}

/// A region that exists: its frames (tagged shared-owned by `owner`), the frames promised for
/// it (withdrawn once its frames are released), and the guests still using it.
#[derive(Debug)]
pub struct LiveRegion<'a> {
    pub id: &'a str,
    pub owner: VmId,
    pub frames: Vec<Pfn>,
    pub promise: Promise,
    pub views: Vec<View>,
}

impl LiveRegion<'_> {
    /// The region's frames as runs of contiguous frames (first, count), ascending: what the
    /// release takes at once.
    pub fn runs(&self) -> Vec<(Pfn, usize)> {
        let mut sorted = self.frames.clone();
        sorted.sort_unstable();
        let mut runs: Vec<(Pfn, usize)> = Vec::new();
        for pfn in sorted {
            match runs.last_mut() {
                Some((first, n)) if first.add(*n as u64) == pfn => *n += 1,
                _ => runs.push((pfn, 1)),
            }
        }
        runs
    }

    /// Bytes in the region.
    pub fn size(&self) -> u64 {
        self.frames.len() as u64 * FRAME_SIZE
    }
}

/// A region that left the registry when a guest left it.
#[derive(Debug)]
pub struct Departure<'a> {
    /// Its `views` are the ones still there: none when its last user left; when its owner
    /// left, the borrowers' it is taken from (revoked).
    pub region: LiveRegion<'a>,
    /// The guest that left owns it: every view left is revoked.
    pub owner_left: bool,
}

/// The regions that exist, each until its owner or its last user leaves.
#[derive(Debug, Default)]
pub struct Registry<'a> {
    regions: Vec<LiveRegion<'a>>,
}

impl<'a> Registry<'a> {
    pub const fn new() -> Self {
        Registry { regions: Vec::new() }
    }

    pub fn add(&mut self, region: LiveRegion<'a>) {
        self.regions.push(region);
    }

    /// Every view guest `vm` has, with the region's frames.
    pub fn views_of(&self, vm: VmId) -> impl Iterator<Item = (&[Pfn], View)> + '_ {
        self.regions.iter().flat_map(move |r| {
            r.views.iter().filter(move |v| v.vm == vm).map(move |v| (r.frames.as_slice(), *v))
        })
    }

    /// Guest `vm`'s space is about to be emptied (a reset): its views are no longer mapped,
    /// so a revocation meanwhile has nothing to unmap there.
    pub fn suspend(&mut self, vm: VmId) {
        for v in self.regions.iter_mut().flat_map(|r| r.views.iter_mut()).filter(|v| v.vm == vm) {
            v.mapped = false;
        }
    }

    /// Maps guest `vm`'s views again after its reset (`map(frames, view)`), each marked mapped
    /// before `map` runs: a region revoked while the guest reset is not among them. Stops at
    /// the first error.
    pub fn remap<E>(
        &mut self,
        vm: VmId,
        mut map: impl FnMut(&[Pfn], View) -> Result<(), E>,
    ) -> Result<(), E> {
        for r in &mut self.regions {
            for v in r.views.iter_mut().filter(|v| v.vm == vm) {
                v.mapped = true;
                map(&r.frames, *v)?;
            }
        }
        Ok(())
    }

    /// Guest `vm` stops using its regions (its space is about to go). The regions it owns
    /// leave the registry with every borrower's view (to revoke); the regions it was the last
    /// user of leave with none. The caller unmaps what is revoked, then, once `vm`'s own
    /// space is gone too, releases the frames and withdraws the promise. A region Labyrinth
    /// owns ([`LABYRINTH`]) stays until its last user leaves.
    pub fn leave(&mut self, vm: VmId) -> Vec<Departure<'a>> {
        let mut gone = Vec::new();
        let mut i = 0;
        while i < self.regions.len() {
            let r = &mut self.regions[i];
            let before = r.views.len();
            r.views.retain(|v| v.vm != vm);
            let owner_left = r.owner == vm && r.owner != LABYRINTH;
            if owner_left || (before != r.views.len() && r.views.is_empty()) {
                gone.push(Departure { region: self.regions.swap_remove(i), owner_left });
            } else {
                i += 1;
            }
        }
        gone
    }

    pub fn len(&self) -> usize {
        self.regions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }
}

/// Which of a guest's shared memory nodes lost their region because its owner stopped, with
/// that owner's name: written once per node by the revocation, read without a lock by the
/// abort path, which then says why the access is refused.
#[derive(Debug)]
pub struct Revocations {
    owners: [spin::Once<&'static str>; MAX_SHARED],
}

impl Default for Revocations {
    fn default() -> Self {
        Self::new()
    }
}

impl Revocations {
    pub const fn new() -> Self {
        Revocations { owners: [const { spin::Once::new() }; MAX_SHARED] }
    }

    /// The node of `shared` (the guest's nodes) at `guest_addr` lost its region, whose owner
    /// `owner` stopped; `false` if no node is there.
    pub fn revoke(&self, shared: &[SharedMem<'_>], guest_addr: u64, owner: &'static str) -> bool {
        match shared.iter().position(|s| s.guest_addr == guest_addr) {
            Some(i) if i < MAX_SHARED => {
                self.owners[i].call_once(|| owner);
                true
            }
            _ => false,
        }
    }

    /// The revoked node of `shared` whose guest range holds `ipa`: its index, id and the
    /// owner that stopped.
    pub fn at<'s>(&self, shared: &[SharedMem<'s>], ipa: u64) -> Option<(usize, &'s str, &'static str)> {
        let i = shared.iter().position(|s| s.guest_addr <= ipa && ipa < s.guest_end())?;
        let owner = self.owners.get(i)?.get()?;
        Some((i, shared[i].id, owner))
    }
}

/// Unmaps a region of `size` bytes at `guest_addr` from `s2` while the guest's vCPUs may run
/// (break-before-make, the VMID's TLB entries invalidated in every CPU before this returns):
/// its shared leaves are never released by the guest (`Stage2` hands back only its own
/// frames), so nothing is freed here. Returns how many frames the unmap handed back (0, or a
/// bug in the caller: the range held memory of the guest's own).
pub fn unmap_view(
    s2: &Stage2,
    env: &mut impl Stage2Env,
    guest_addr: u64,
    size: u64,
) -> Result<u64, Stage2Error> {
    let mut handed_back = 0;
    s2.unmap_live(env, guest_addr, size, &mut |_, bytes| handed_back += bytes / FRAME_SIZE)?;
    Ok(handed_back)
}

/// Maps the region's `frames` (in order, one 4 KiB page each) at `guest_addr` in `s2`, as its
/// owner (`owner`: shared-owned) or a borrower (shared-borrowed). On an error the pages mapped
/// so far stay (the caller tears the guest down). Every vCPU of the guest out of it.
pub fn map_region(
    s2: &Stage2,
    env: &mut impl Stage2Env,
    frames: &[Pfn],
    guest_addr: u64,
    owner: bool,
) -> Result<(), Stage2Error> {
    let attrs = if owner { Attrs::SHARED_OWNED } else { Attrs::SHARED_BORROWED };
    for (i, pfn) in frames.iter().enumerate() {
        s2.map(env, guest_addr + i as u64 * FRAME_SIZE, pfn.phys(), 3, attrs)?;
    }
    Ok(())
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::dt::Region;
    use crate::frame::FrameState;
    use crate::stage2::model::ModelEnv;
    use crate::stage2::Geometry;
    use crate::vm::exercise::guest_config as guest;

    fn shm(id: &'static str, role: ShmRole, guest_addr: u64, size: u64) -> SharedMem<'static> {
        SharedMem { id, role, guest_addr, size, host_addr: None, node: id }
    }

    fn at_host(s: SharedMem<'static>, host: u64) -> SharedMem<'static> {
        SharedMem { host_addr: Some(host), ..s }
    }

    /// Host RAM as QEMU's virt machine with 1 GiB describes it, in two adjacent banks.
    const HOST_RAM: &[Region] = &[
        match Region::new(0x6000_0000, 0x2000_0000) {
            Some(r) => r,
            None => panic!(),
        },
        match Region::new(0x4000_0000, 0x2000_0000) {
            Some(r) => r,
            None => panic!(),
        },
    ];

    /// Each guest's refusal reason, if any.
    fn problems<'a>(verdicts: &[Option<ShmRefusal<'a>>]) -> Vec<Option<ShmProblem<'a>>> {
        verdicts.iter().map(|v| v.map(|r| r.problem)).collect()
    }

    const AT: u64 = 0x1000_0000;
    const MIB2: u64 = 2 << 20;
    use ShmRole::{Borrower, Owner};

    // An owner and a borrower (named first) make one region, owned by the owner; an id nobody
    // owns is Labyrinth's.
    #[test]
    fn regions_gather_their_users_and_owner() {
        let guests = [
            guest("b", 64, &[shm("ring", Borrower, AT, MIB2), shm("free", Borrower, 0x2000_0000, 0x1000)]),
            guest("o", 64, &[shm("ring", Owner, 0x3000_0000, MIB2)]),
            guest("c", 64, &[shm("free", Borrower, 0x2000_0000, 0x1000)]),
        ];
        let (regions, verdicts) = plan(&guests, 40, HOST_RAM);
        assert_eq!(verdicts, vec![None, None, None]);
        assert_eq!(regions.len(), 2);
        let ring = &regions[0];
        assert_eq!((ring.id, ring.size, ring.owner, ring.pages()), ("ring", MIB2, Some(1), 512));
        assert_eq!(
            ring.users.iter().map(|u| (u.0, u.1.guest_addr)).collect::<Vec<_>>(),
            vec![(0, AT), (1, 0x3000_0000)]
        );
        let vm = |g: usize| VmId::new(g as u16 + 1).unwrap();
        assert_eq!(ring.owner_vm(vm), vm(1));
        assert_eq!(regions[1].owner, None);
        assert_eq!(regions[1].owner_vm(vm), LABYRINTH);
        assert_eq!(regions[1].users.len(), 2);
    }

    // Each refusal names the guest, the region and the reason; the other guests keep theirs.
    #[test]
    fn refusals_name_guest_region_and_reason() {
        let guests = [
            guest("o", 64, &[shm("ring", Owner, AT, MIB2)]),
            guest("ram", 64, &[shm("ring", Borrower, 0x4000_0000 + (63 << 20), MIB2)]),
            guest("dev", 64, &[shm("ring", Borrower, 0x0900_0000, MIB2)]),
            guest("far", 64, &[shm("ring", Borrower, 0xff_fff0_0000, MIB2)]),
            guest("size", 64, &[shm("ring", Borrower, AT, 0x1000)]),
            guest("two", 64, &[shm("ring", Owner, AT, MIB2)]),
            guest("fine", 64, &[shm("ring", Borrower, 0x8000_0000, MIB2)]),
        ];
        let (regions, verdicts) = plan(&guests, 40, HOST_RAM);
        let problems = problems(&verdicts);
        assert_eq!(
            problems,
            vec![
                None,
                Some(ShmProblem::OverlapsRam { ram_end: 0x4400_0000 }),
                Some(ShmProblem::OverlapsDevices),
                Some(ShmProblem::BeyondIpa { ipa_bits: 40 }),
                Some(ShmProblem::SizeMismatch { first: "o", first_size: MIB2 }),
                Some(ShmProblem::SecondOwner { owner: "o" }),
                None,
            ]
        );
        assert_eq!(regions[0].users.iter().map(|u| u.0).collect::<Vec<_>>(), vec![0, 6]);
        assert_eq!(
            verdicts[4].unwrap().to_string(),
            "guest size: shared memory \"ring\" at 0x10000000-0x10001000: 0x1000 bytes, but guest o gives the \
             same id 0x200000 bytes: one id is one region"
        );
        assert_eq!(
            verdicts[2].unwrap().to_string(),
            "guest dev: shared memory \"ring\" at 0x9000000-0x9200000: overlaps the devices' window \
             0x8000000-0x9001000 (GIC, PL011)"
        );
    }

    // At most MAX_REGIONS ids: the guest that would add more is refused whole.
    #[test]
    fn too_many_regions_refuse_the_guest_that_adds_them() {
        const IDS: [&str; 10] = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"];
        let g = |n: &'static str, ids: &[&'static str]| {
            let list: Vec<_> = ids
                .iter()
                .enumerate()
                .map(|(i, id)| shm(id, Borrower, AT + i as u64 * MIB2, 0x1000))
                .collect();
            guest(n, 64, &list)
        };
        let guests = [g("g1", &IDS[0..4]), g("g2", &IDS[4..8]), g("g3", &IDS[8..10]), g("g4", &IDS[0..2])];
        let (regions, verdicts) = plan(&guests, 40, HOST_RAM);
        assert_eq!(regions.len(), MAX_REGIONS);
        let problems = problems(&verdicts);
        assert_eq!(problems, vec![None, None, Some(ShmProblem::TooManyRegions), None]);
    }

    // A borrower whose owner did not start is refused, and so, in turn, are the borrowers of
    // the regions it owns; a region nobody owns needs no owner.
    #[test]
    fn orphans_are_refused_to_a_fixed_point() {
        let guests = [
            guest("o", 64, &[shm("r1", Owner, AT, 0x1000)]),
            guest("b1", 64, &[shm("r1", Borrower, AT, 0x1000), shm("r2", Owner, 0x2000_0000, 0x1000)]),
            guest("b2", 64, &[shm("r2", Borrower, AT, 0x1000), shm("free", Borrower, 0x3000_0000, 0x1000)]),
            guest("b3", 64, &[shm("free", Borrower, 0x3000_0000, 0x1000)]),
        ];
        let (regions, verdicts) = plan(&guests, 40, HOST_RAM);
        assert!(verdicts.iter().all(Option::is_none));
        let names: Vec<_> = guests.iter().map(|g| g.name).collect();
        let mut started = [false, true, true, true];
        let refused = refuse_orphans(&regions, &names, &mut started);
        assert_eq!(
            refused.iter().map(|(g, r)| (*g, r.guest, r.id)).collect::<Vec<_>>(),
            vec![(1, "b1", "r1"), (2, "b2", "r2")]
        );
        assert_eq!(started, [false, false, false, true]);
        assert_eq!(
            refused[0].1.to_string(),
            "guest b1: shared memory \"r1\" at 0x10000000-0x10001000: a borrower without an owner: its \
             owner, guest o, was not started"
        );
        let mut all = [true; 4];
        assert!(refuse_orphans(&regions, &names, &mut all).is_empty());
    }

    // From a host device tree as a bootloader writes it (scripts/guestcfg.py: QEMU's tree with
    // four guests, the third in Xen's older form with a host address): the parser and the plan
    // together, against the tree's own RAM, then against a smaller RAM the host range misses.
    #[test]
    fn a_host_tree_with_shared_memory_plans_its_regions() {
        let blob = include_bytes!("../../fuzz/corpus/dt_parse/qemu-virt-shared-memory.dtb");
        let p = crate::dt::parse(blob).unwrap();
        assert_eq!(p.guests().len(), 4);
        let configs: Vec<_> = p.guests().iter().map(|g| *g.as_ref().unwrap()).collect();
        assert_eq!(configs[2].shared[0].host_addr, Some(0x6000_0000));
        let (regions, verdicts) = plan(&configs, 40, p.memory());
        assert!(verdicts.iter().all(Option::is_none));
        let got: Vec<_> = regions.iter().map(|r| (r.id, r.size, r.owner, r.users.len(), r.host)).collect();
        assert_eq!(
            got,
            [
                ("ring", 0x20_0000, Some(0), 2, None),
                ("nobody", 0x1000, None, 2, None),
                ("x", 0x1000, None, 1, Some((0x6000_0000, 2)))
            ]
        );
        let small = [Region::new(0x4000_0000, 0x1000_0000).unwrap()];
        let (regions, verdicts) = plan(&configs, 40, &small);
        assert_eq!(verdicts[2].map(|v| v.problem), Some(ShmProblem::HostNotRam { host: 0x6000_0000 }));
        assert_eq!(regions.len(), 2);
    }

    // Xen's older form: the host range must lie in host RAM (banks may be adjacent, in any
    // order), and every guest naming the id with a host address names the same one; a guest
    // without one joins whatever the others name. The first to name one sets it.
    #[test]
    fn host_addresses_are_checked_across_guests() {
        let guests = [
            guest("plain", 64, &[shm("ring", Borrower, AT, MIB2)]),
            guest("o", 64, &[at_host(shm("ring", Owner, AT, MIB2), 0x5ff0_0000)]),
            guest("same", 64, &[at_host(shm("ring", Borrower, 0x2000_0000, MIB2), 0x5ff0_0000)]),
            guest("other", 64, &[at_host(shm("ring", Borrower, AT, MIB2), 0x7000_0000)]),
            guest("out", 64, &[at_host(shm("far", Borrower, AT, MIB2), 0x7ff0_0000)]),
            guest("below", 64, &[at_host(shm("low", Borrower, AT, 0x1000), 0x3fff_f000)]),
        ];
        let (regions, verdicts) = plan(&guests, 40, HOST_RAM);
        let problems = problems(&verdicts);
        assert_eq!(
            problems,
            vec![
                None,
                None,
                None,
                Some(ShmProblem::HostMismatch { host: 0x7000_0000, first: "o", first_host: 0x5ff0_0000 }),
                Some(ShmProblem::HostNotRam { host: 0x7ff0_0000 }),
                Some(ShmProblem::HostNotRam { host: 0x3fff_f000 }),
            ]
        );
        assert_eq!(regions.len(), 1);
        assert_eq!((regions[0].host, regions[0].users.len()), (Some((0x5ff0_0000, 1)), 3));
        assert_eq!(
            verdicts[3].unwrap().to_string(),
            "guest other: shared memory \"ring\" at 0x10000000-0x10200000: host address 0x70000000, but guest o \
             gives the same id host address 0x5ff00000: one id is one region"
        );
        assert_eq!(
            verdicts[4].unwrap().to_string(),
            "guest out: shared memory \"far\" at 0x10000000-0x10200000: host address 0x7ff00000-0x80100000 is \
             not all inside host RAM (the host device tree's memory nodes)"
        );
    }

    // The union of the banks, whatever their order; a range that wraps is never inside.
    #[test]
    fn host_ram_is_the_union_of_the_banks() {
        assert!(in_host_ram(HOST_RAM, 0x4000_0000, 0x4000_0000));
        assert!(in_host_ram(HOST_RAM, 0x5fff_f000, 0x2000));
        assert!(!in_host_ram(HOST_RAM, 0x7fff_f000, 0x2000));
        assert!(!in_host_ram(HOST_RAM, 0x3fff_f000, 0x1000));
        assert!(!in_host_ram(&[], 0x4000_0000, 0x1000));
        assert!(!in_host_ram(HOST_RAM, u64::MAX - 0xfff, 0x2000));
        let gap = [Region::new(0x4000_0000, 0x1000).unwrap(), Region::new(0x4000_2000, 0x1000).unwrap()];
        assert!(!in_host_ram(&gap, 0x4000_0000, 0x3000));
    }

    fn vm(n: u16) -> VmId {
        VmId::new(n).unwrap()
    }

    fn live(id: &'static str, owner: u16, frames: &[u64], users: &[u16]) -> LiveRegion<'static> {
        LiveRegion {
            id,
            owner: vm(owner),
            frames: frames.iter().map(|&f| Pfn(f)).collect(),
            promise: Promise::unbacked(frames.len()),
            views: users
                .iter()
                .map(|&u| View { vm: vm(u), guest_addr: AT, owner: u == owner, mapped: true })
                .collect(),
        }
    }

    // A region nobody owns leaves the registry with its last user; a guest that uses nothing
    // changes nothing.
    #[test]
    fn a_region_nobody_owns_goes_with_its_last_user() {
        let mut reg = Registry::new();
        reg.add(live("b", 0, &[20], &[2, 3]));
        assert!(reg.leave(vm(7)).is_empty());
        assert!(reg.leave(vm(2)).is_empty());
        assert_eq!(reg.views_of(vm(3)).count(), 1);
        let gone = reg.leave(vm(3));
        assert_eq!(gone.len(), 1);
        assert_eq!((gone[0].region.id, gone[0].region.owner, gone[0].owner_left), ("b", LABYRINTH, false));
        assert!(gone[0].region.views.is_empty());
        assert!(reg.is_empty());
    }

    // An owner that stops first takes its region with it, and every borrower's view with it
    // (two borrowers here): the caller revokes them. The owner's other region (borrowed) and a
    // region it does not use stay.
    #[test]
    fn an_owner_that_leaves_first_revokes_every_borrower() {
        let mut reg = Registry::new();
        reg.add(live("a", 1, &[10, 11], &[1, 2, 3]));
        reg.add(live("c", 4, &[30], &[4, 1]));
        reg.add(live("d", 5, &[40], &[5, 6]));
        let gone = reg.leave(vm(1));
        assert_eq!(gone.len(), 1);
        let d = &gone[0];
        assert_eq!((d.region.id, d.owner_left), ("a", true));
        assert_eq!(
            d.region.views.iter().map(|v| (v.vm, v.owner, v.mapped)).collect::<Vec<_>>(),
            vec![(vm(2), false, true), (vm(3), false, true)]
        );
        assert_eq!(reg.len(), 2);
        assert_eq!(reg.views_of(vm(2)).count(), 0);
        assert_eq!(reg.views_of(vm(4)).count(), 1);
        // "c" lost its borrower 1 and stays for its owner, which then leaves with nothing to revoke.
        let gone = reg.leave(vm(4));
        assert_eq!((gone[0].region.id, gone[0].owner_left, gone[0].region.views.len()), ("c", true, 0));
        assert_eq!(reg.len(), 1);
    }

    // A borrower that stops first removes only its view; the owner's later stop then has no
    // one to revoke.
    #[test]
    fn a_borrower_that_leaves_first_removes_only_its_view() {
        let mut reg = Registry::new();
        reg.add(live("a", 1, &[10, 11], &[1, 2]));
        assert!(reg.leave(vm(2)).is_empty());
        assert_eq!(reg.views_of(vm(1)).count(), 1);
        let gone = reg.leave(vm(1));
        assert_eq!((gone[0].owner_left, gone[0].region.views.len()), (true, 0));
        assert!(reg.is_empty());
    }

    // A borrower resetting when its owner stops: its view, unmapped by the reset, is revoked
    // without an unmap, and its remap after the reset no longer finds the region. The owner's
    // reset keeps the region (same frames) and maps it again.
    #[test]
    fn a_reset_suspends_views_and_remaps_what_is_left() {
        let mut reg = Registry::new();
        reg.add(live("a", 1, &[10, 11], &[1, 2]));
        reg.suspend(vm(1));
        assert!(reg.views_of(vm(1)).all(|(_, v)| !v.mapped));
        let mut mapped = Vec::new();
        let r: Result<(), ()> = reg.remap(vm(1), |f, v| {
            mapped.push((f.to_vec(), v.guest_addr, v.owner));
            Ok(())
        });
        assert!(r.is_ok());
        assert_eq!(mapped, vec![(vec![Pfn(10), Pfn(11)], AT, true)]);
        assert!(reg.views_of(vm(1)).all(|(_, v)| v.mapped));
        reg.suspend(vm(2));
        let gone = reg.leave(vm(1));
        assert_eq!(
            gone[0].region.views.iter().map(|v| (v.vm, v.mapped)).collect::<Vec<_>>(),
            vec![(vm(2), false)]
        );
        let mut calls = 0;
        let r: Result<(), ()> = reg.remap(vm(2), |_, _| {
            calls += 1;
            Ok(())
        });
        assert!(r.is_ok());
        assert_eq!(calls, 0);
        // A remap error stops the remap and is returned.
        reg.add(live("e", 1, &[50], &[1]));
        reg.add(live("f", 1, &[60], &[1]));
        let mut seen = 0;
        assert_eq!(
            reg.remap(vm(1), |_, _| {
                seen += 1;
                Err("no table page")
            }),
            Err("no table page")
        );
        assert_eq!(seen, 1);
    }

    // The revocation is recorded per node, once (the first owner's name stays), and found by
    // any address inside the node's guest range only.
    #[test]
    fn revocations_are_found_by_address() {
        let shared = [shm("ring", Borrower, 0x2000_0000, MIB2), shm("other", Borrower, AT, 0x1000)];
        let r = Revocations::new();
        assert_eq!(r.at(&shared, 0x2000_0000), None);
        assert!(!r.revoke(&shared, 0x3000_0000, "x"));
        assert!(r.revoke(&shared, 0x2000_0000, "isolation"));
        assert!(r.revoke(&shared, 0x2000_0000, "later"));
        assert_eq!(r.at(&shared, 0x2000_0000), Some((0, "ring", "isolation")));
        assert_eq!(r.at(&shared, 0x2000_0000 + MIB2 - 4), Some((0, "ring", "isolation")));
        assert_eq!(r.at(&shared, 0x2000_0000 + MIB2), None);
        assert_eq!(r.at(&shared, AT), None);
    }

    // Frames go back in contiguous runs, whatever order they were allocated in.
    #[test]
    fn runs_merge_contiguous_frames() {
        let r = live("a", 1, &[7, 3, 4, 5, 9, 8, 12], &[1]);
        assert_eq!(r.runs(), vec![(Pfn(3), 3), (Pfn(7), 3), (Pfn(12), 1)]);
        let views: Vec<_> =
            Registry { regions: vec![r] }.views_of(vm(1)).map(|(f, v)| (f.len(), v.owner)).collect();
        assert_eq!(views, vec![(7, true)]);
    }

    // The owner maps the region shared-owned, the borrower shared-borrowed, the same frames.
    #[test]
    fn map_region_maps_both_sides() {
        let mut env = ModelEnv::new(0x40000, 256);
        let geo = Geometry::for_pa_bits(40);
        let (o, b) = (VmId::new(1).unwrap(), VmId::new(2).unwrap());
        let owner = Stage2::new(&mut env, o, 1, geo).unwrap();
        let borrower = Stage2::new(&mut env, b, 2, geo).unwrap();
        let frames: Vec<Pfn> = (0..3).map(|_| env.claim_frame(FrameState::SharedOwned(o)).unwrap()).collect();
        map_region(&owner, &mut env, &frames, AT, true).unwrap();
        map_region(&borrower, &mut env, &frames, 0x2000_0000, false).unwrap();
        let m = borrower.translate(&env, 0x2000_2010).unwrap();
        assert_eq!((m.pa, m.attrs), (frames[2].phys(), Attrs::SHARED_BORROWED));
        assert_eq!(owner.translate(&env, AT).unwrap().attrs, Attrs::SHARED_OWNED);
        // The borrower cannot map it as its owner.
        assert!(map_region(&borrower, &mut env, &frames, 0x3000_0000, true).is_err());
    }

    // The owner stops first: both borrowers' views are unmapped live (nothing handed back, no
    // TLB entry left behind), the owner's space then goes, and only then does no leaf map
    // the frames: they may be scrubbed and freed.
    #[test]
    fn revoking_unmaps_every_borrower_before_the_frames_go() {
        let mut env = ModelEnv::new(0x40000, 256);
        let geo = Geometry::for_pa_bits(40);
        let o = Stage2::new(&mut env, vm(1), 1, geo).unwrap();
        let b1 = Stage2::new(&mut env, vm(2), 2, geo).unwrap();
        let b2 = Stage2::new(&mut env, vm(3), 3, geo).unwrap();
        for (vmid, s2) in [(1, &o), (2, &b1), (3, &b2)] {
            env.add_root(vmid, Pfn(s2.vttbr() >> 12 & ((1 << 36) - 1)), geo.start_level);
        }
        let frames: Vec<Pfn> =
            (0..3).map(|_| env.claim_frame(FrameState::SharedOwned(vm(1))).unwrap()).collect();
        map_region(&o, &mut env, &frames, AT, true).unwrap();
        map_region(&b1, &mut env, &frames, 0x2000_0000, false).unwrap();
        map_region(&b2, &mut env, &frames, AT, false).unwrap();
        // Each borrower has walked the region (its TLB may hold every page).
        for (s2, at) in [(&b1, 0x2000_0000), (&b2, AT)] {
            for i in 0..3 {
                assert!(s2.translate(&env, at + i * FRAME_SIZE).is_some());
            }
        }
        assert_eq!(env.leaves_mapping(frames[0]), 3);
        let size = frames.len() as u64 * FRAME_SIZE;
        assert_eq!(unmap_view(&b1, &mut env, 0x2000_0000, size), Ok(0));
        assert_eq!(unmap_view(&b2, &mut env, AT, size), Ok(0));
        env.check_quiescent();
        assert!(env.violations.is_empty(), "{:?}", env.violations);
        assert!(
            b1.translate(&env, 0x2000_0000).is_none() && b2.translate(&env, AT + 2 * FRAME_SIZE).is_none()
        );
        assert!(frames.iter().all(|&f| env.leaves_mapping(f) == 1));
        assert_eq!(env.frames_in(FrameState::SharedOwned(vm(1))), 3);
        let mut released = 0;
        let _ = o.destroy(&mut env, &mut |_, _| released += 1);
        assert_eq!(released, 0, "shared frames are not the owner's space's to free");
        assert!(frames.iter().all(|&f| env.leaves_mapping(f) == 0));
        // Unmapping a range that holds nothing (a view revoked twice) is harmless.
        assert_eq!(unmap_view(&b1, &mut env, 0x2000_0000, size), Ok(0));
    }

    /// Three spaces (VMs 1, 2, 3, configuration indices 0, 1, 2, named o, b1, b2) and a
    /// 3-page region tagged shared-owned by `owner`, each space's root known to the model.
    fn three_spaces(owner: VmId) -> (ModelEnv, [Stage2; 3], LiveRegion<'static>) {
        let mut env = ModelEnv::new(0x40000, 256);
        let geo = Geometry::for_pa_bits(40);
        let spaces = [1, 2, 3].map(|n| Stage2::new(&mut env, vm(n), n, geo).unwrap());
        for (vmid, s2) in (1..).zip(&spaces) {
            env.add_root(vmid, Pfn(s2.vttbr() >> 12 & ((1 << 36) - 1)), geo.start_level);
        }
        let frames = (0..3).map(|_| env.claim_frame(FrameState::SharedOwned(owner)).unwrap()).collect();
        let region =
            LiveRegion { id: "ring", owner, frames, promise: Promise::unbacked(3), views: Vec::new() };
        (env, spaces, region)
    }

    const NAMES: [&str; 3] = ["o", "b1", "b2"];

    /// The users: o (VM 1) owns the region at [`AT`] unless `owner` is false, b1 and b2
    /// borrow it at 0x2000_0000 and [`AT`]; b1 is named first.
    fn users(owner: bool) -> [User<'static>; 3] {
        let role = if owner { Owner } else { Borrower };
        [
            (1, shm("ring", Borrower, 0x2000_0000, 3 * FRAME_SIZE), vm(2)),
            (0, shm("ring", role, AT, 3 * FRAME_SIZE), vm(1)),
            (2, shm("ring", Borrower, AT, 3 * FRAME_SIZE), vm(3)),
        ]
    }

    /// Maps the region for `users[i]` as `map_region` does, except in `failing`: there it maps
    /// the first page only and fails as when no table page is left (what a map that fails
    /// part-way leaves).
    fn map_or_fail(
        env: &mut ModelEnv,
        spaces: &[Stage2; 3],
        user: &User<'static>,
        frames: &[Pfn],
        as_owner: bool,
        failing: VmId,
    ) -> Result<(), Stage2Error> {
        let s2 = &spaces[usize::from(user.2.get()) - 1];
        if user.2 != failing {
            return map_region(s2, env, frames, user.1.guest_addr, as_owner);
        }
        map_region(s2, env, &frames[..1], user.1.guest_addr, as_owner)?;
        Err(Stage2Error::OutOfMemory)
    }

    /// Guest `n` (VM n, space n - 1) leaves the registry as a refused guest does at creation:
    /// what it owns revoked from the borrowers, its space destroyed. The regions that left.
    fn take_down(reg: &mut Registry<'static>, env: &mut ModelEnv, spaces: &[Stage2; 3], n: u16) -> usize {
        let gone = reg.leave(vm(n));
        for v in gone.iter().flat_map(|d| &d.region.views) {
            let b = &spaces[usize::from(v.vm.get()) - 1];
            assert_eq!(
                unmap_view(b, env, v.guest_addr, 3 * FRAME_SIZE),
                Ok(0),
                "nothing of the borrower's own"
            );
        }
        let mut own = 0;
        let _ = spaces[usize::from(n) - 1].destroy(env, &mut |_, bytes| own += bytes / FRAME_SIZE);
        assert_eq!(own, 0, "a refused guest owns nothing but the region's view here");
        gone.len()
    }

    // The owner's map fails part-way: it is refused, the borrowers are not mapped and are
    // refused as borrowers without an owner, and the region is used by nobody. The owner's
    // view (one page mapped) stays until the owner leaves, whenever the borrowers leave;
    // then no leaf maps the frames: they can be released, once.
    #[test]
    fn an_owner_that_cannot_map_its_region_takes_it_and_its_borrowers_down() {
        let (mut env, spaces, mut region) = three_spaces(vm(1));
        let users = users(true);
        let mut mapped_in = Vec::new();
        let m = map_users(&mut region, &users, &NAMES, |i, frames, as_owner| {
            mapped_in.push((users[i].2, as_owner));
            map_or_fail(&mut env, &spaces, &users[i], frames, as_owner, vm(1))
        });
        assert_eq!(mapped_in, vec![(vm(1), true)], "the owner first, and no borrower after it failed");
        assert_eq!(m.unused, Some(Unused::OwnerCannotMap { owner: "o" }));
        let refused: Vec<_> = m.refused.iter().map(|(k, r)| (*k, r.guest, r.problem)).collect();
        let no_owner = ShmProblem::OwnerNotStarted { owner: "o" };
        assert_eq!(
            refused,
            vec![
                (0, "o", ShmProblem::Map(Stage2Error::OutOfMemory)),
                (1, "b1", no_owner),
                (2, "b2", no_owner)
            ]
        );
        assert_eq!(
            m.refused[1].1.to_string(),
            "guest b1: shared memory \"ring\" at 0x20000000-0x20003000: a borrower without an owner: its owner, \
             guest o, was not started"
        );
        assert_eq!(m.unused.unwrap().to_string(), "its owner, guest o, cannot map it");
        assert_eq!(region.views.iter().map(|v| (v.vm, v.owner)).collect::<Vec<_>>(), vec![(vm(1), true)]);
        assert_eq!(region.frames.iter().map(|&f| env.leaves_mapping(f)).collect::<Vec<_>>(), vec![1, 0, 0]);
        let mut reg = Registry::new();
        reg.add(region);
        assert_eq!(take_down(&mut reg, &mut env, &spaces, 2), 0);
        assert_eq!(take_down(&mut reg, &mut env, &spaces, 3), 0);
        let gone = reg.leave(vm(1));
        assert_eq!(gone.len(), 1, "the region goes with its owner");
        let mut own = 0;
        let _ = spaces[0].destroy(&mut env, &mut |_, bytes| own += bytes / FRAME_SIZE);
        assert_eq!(own, 0, "the region's page is not the owner's space's to free");
        let region = &gone[0].region;
        assert!(region.frames.iter().all(|&f| env.leaves_mapping(f) == 0), "no leaf maps the frames");
        assert_eq!(
            (region.frames.len(), region.promise.frames(), region.promise.is_withdrawn()),
            (3, 3, false)
        );
        assert!(reg.is_empty());
    }

    // A borrower whose map fails is refused alone (the region is used) and keeps a view of
    // what it mapped: if the owner is taken down first (refused for another region, say), that
    // partial view is revoked (unmapped) like any other, so the frames go only once no leaf
    // maps them.
    #[test]
    fn a_borrower_that_cannot_map_is_refused_alone_and_its_part_is_unmapped() {
        let (mut env, spaces, mut region) = three_spaces(vm(1));
        let users = users(true);
        let m = map_users(&mut region, &users, &NAMES, |i, frames, as_owner| {
            map_or_fail(&mut env, &spaces, &users[i], frames, as_owner, vm(2))
        });
        assert_eq!(m.unused, None);
        let refused: Vec<_> = m.refused.iter().map(|(k, r)| (*k, r.problem)).collect();
        assert_eq!(refused, vec![(1, ShmProblem::Map(Stage2Error::OutOfMemory))]);
        assert_eq!(region.views.iter().map(|v| v.vm).collect::<Vec<_>>(), vec![vm(1), vm(2), vm(3)]);
        assert_eq!(
            region.frames.iter().map(|&f| env.leaves_mapping(f)).collect::<Vec<_>>(),
            vec![3, 2, 2],
            "b1 maps the first page"
        );
        let mut reg = Registry::new();
        reg.add(region);
        // The owner is taken down first (refused for another region, say).
        let frames = reg.regions[0].frames.clone();
        assert_eq!(take_down(&mut reg, &mut env, &spaces, 1), 1);
        assert!(reg.is_empty());
        assert!(frames.iter().all(|&f| env.leaves_mapping(f) == 0), "no leaf maps the frames");
        env.check_quiescent();
        assert!(env.violations.is_empty(), "{:?}", env.violations);
        assert_eq!(spaces[1].translate(&env, 0x2000_0000), None, "b1's partial view is gone");
        assert_eq!(spaces[2].translate(&env, AT), None, "b2's view is revoked");
    }

    // A region Labyrinth owns that no user can map is used by nobody, and it still leaves the
    // registry with the last of them (with no view it would stay there for good).
    #[test]
    fn a_region_nobody_can_map_goes_with_the_last_refused_user() {
        let (mut env, spaces, mut region) = three_spaces(LABYRINTH);
        let users = users(false);
        let m = map_users(&mut region, &users, &NAMES, |_, _, _| Err(Stage2Error::OutOfMemory));
        assert_eq!(m.unused, Some(Unused::NobodyCanMap));
        assert_eq!(
            m.refused.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
            vec![1, 0, 2],
            "in the users' order"
        );
        assert_eq!(region.views.len(), 3);
        let mut reg = Registry::new();
        reg.add(region);
        assert_eq!(take_down(&mut reg, &mut env, &spaces, 1), 0);
        assert_eq!(take_down(&mut reg, &mut env, &spaces, 2), 0);
        assert_eq!(take_down(&mut reg, &mut env, &spaces, 3), 1, "released with the last user");
        assert!(reg.is_empty());
    }

    mod registry_props {
        use super::*;
        use proptest::prelude::*;

        /// (id, owner, users): guest 1 owns "a", Labyrinth owns "b", guest 4 owns "c".
        const REGIONS: [(&str, u16, &[u16]); 3] =
            [("a", 1, &[1, 2, 3]), ("b", 0, &[2, 3, 4]), ("c", 4, &[4, 1])];

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            // Guests stopping in any order (the registry's lock makes any interleaving of stops
            // a sequence), with resets (suspend, then remap) between them: each region leaves
            // once; with its owner (every view still there handed over to revoke, mapped unless
            // its guest was resetting) or, if Labyrinth owns it, with its last user; and a
            // remap never brings back a region that left.
            #[test]
            fn regions_leave_once_with_their_owner_or_last_user(
                order in Just(vec![1u16, 2, 3, 4]).prop_shuffle(),
                resets in proptest::collection::vec((1u16..=4, any::<bool>()), 0..12),
            ) {
                let mut reg = Registry::new();
                for (id, owner, users) in REGIONS {
                    reg.add(live(id, owner, &[u64::from(owner) * 10], users));
                }
                let (mut left, mut suspended, mut departed) = (Vec::new(), Vec::new(), Vec::new());
                let mut resets = resets.into_iter();
                for g in order {
                    for (r, finish) in resets.by_ref().take(3) {
                        if left.contains(&r) {
                            continue;
                        }
                        reg.suspend(vm(r));
                        suspended.push(r);
                        if finish {
                            let mut mapped = Vec::new();
                            let remapped = reg.remap(vm(r), |f, _| {
                                mapped.push(f[0]);
                                Ok::<(), ()>(())
                            });
                            prop_assert!(remapped.is_ok());
                            suspended.retain(|&s| s != r);
                            // Only regions still there (a region's one frame is its owner * 10).
                            let gone: Vec<Pfn> = departed
                                .iter()
                                .filter_map(|(id, _): &(&str, u16)| REGIONS.iter().find(|x| x.0 == *id))
                                .map(|x| Pfn(u64::from(x.1) * 10))
                                .collect();
                            prop_assert!(mapped.iter().all(|p| !gone.contains(p)), "{:?} remapped", mapped);
                        }
                    }
                    for d in reg.leave(vm(g)) {
                        let (id, owner, users) = REGIONS.iter().find(|r| r.0 == d.region.id).copied().unwrap();
                        prop_assert!(!departed.iter().any(|(i, _)| *i == id), "{} left twice", id);
                        prop_assert!(users.contains(&g));
                        let others: Vec<u16> = users.iter().copied().filter(|u| *u != g && !left.contains(u)).collect();
                        if owner == g {
                            prop_assert!(d.owner_left);
                            let got: Vec<(VmId, bool)> = d.region.views.iter().map(|v| (v.vm, v.mapped)).collect();
                            let want: Vec<(VmId, bool)> =
                                others.iter().map(|&u| (vm(u), !suspended.contains(&u))).collect();
                            prop_assert_eq!(got, want);
                        } else {
                            prop_assert!(!d.owner_left && others.is_empty() && d.region.views.is_empty());
                            prop_assert_eq!(owner, 0);
                        }
                        departed.push((id, g));
                    }
                    left.push(g);
                    suspended.retain(|&s| s != g);
                    prop_assert_eq!(reg.views_of(vm(g)).count(), 0);
                }
                prop_assert!(reg.is_empty());
                prop_assert_eq!(departed.len(), REGIONS.len());
            }
        }
    }
}

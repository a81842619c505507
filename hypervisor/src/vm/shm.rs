//! Static shared memory between guests (Xen's dom0less binding, read by `dt::shm`): which
//! guests may use which region, and a region's frames and users once it exists.
//!
//! It owns the checks across guests, made before any guest is built ([`plan`]): a region lies
//! outside the guest's RAM and devices and inside its IPA space, every guest naming an id gives
//! it the same size, at most one guest owns it, at most [`MAX_REGIONS`] ids exist; and after
//! the guests are built ([`refuse_orphans`]) that a region whose owner did not start has no
//! borrower left. A refusal names the guest and the region, and only that guest is not started.
//!
//! A region lives from the creation of its guests until its last user stops: its frames are
//! tagged shared-owned by the owner (or by VM 0, Labyrinth itself, when no guest owns it: Xen's
//! DOMID_IO), mapped into the owner as shared-owned and into each borrower as shared-borrowed,
//! for the guests' whole lives, resets included. An owner that stops leaves them in place; the
//! last user to stop releases them (`docs/memory.md`, "Shared memory", says why).

use alloc::vec::Vec;
use core::fmt;

use super::layout::{RAM_BASE, UART_BASE, UART_SIZE};
use super::vgic::GICD_BASE;
use crate::dt::{GuestConfig, SharedMem, ShmRole};
use crate::frame::{Pfn, VmId, FRAME_SIZE};
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

/// Checks every guest's shared memory nodes against its own layout and against the other
/// guests' (`guests` in configuration order, the well-formed ones), and returns the regions
/// with their users and, per guest, `None` or why it is refused. A guest is checked whole
/// before any of its nodes joins a region, so a refused guest uses no region.
pub fn plan<'a>(
    guests: &[GuestConfig<'a>],
    ipa_bits: u32,
) -> (Vec<RegionPlan<'a>>, Vec<Option<ShmRefusal<'a>>>) {
    let mut regions: Vec<RegionPlan<'a>> = Vec::new();
    // Owners first: a borrower named before its owner still knows who owns the region.
    for (g, cfg) in guests.iter().enumerate() {
        for s in cfg.shared.iter().filter(|s| s.role == ShmRole::Owner) {
            if !regions.iter().any(|r| r.id == s.id) && regions.len() < MAX_REGIONS {
                regions.push(RegionPlan { id: s.id, size: s.size, owner: Some(g), users: Vec::new() });
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
                match regions.iter_mut().find(|r| r.id == s.id) {
                    Some(r) => r.users.push((g, *s)),
                    None => regions.push(RegionPlan {
                        id: s.id,
                        size: s.size,
                        owner: None,
                        users: alloc::vec![(g, *s)],
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

/// One guest's view of a live region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct View {
    pub vm: VmId,
    pub guest_addr: u64,
    /// The guest owns the region (its leaves are shared-owned, else shared-borrowed).
    pub owner: bool,
}

/// A region that exists: its frames (tagged shared-owned by `owner`), the frames promised for
/// it, and the guests still using it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveRegion<'a> {
    pub id: &'a str,
    pub owner: VmId,
    pub frames: Vec<Pfn>,
    pub promised: usize,
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
}

/// The regions that exist, each until its last user leaves.
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

    /// Every view guest `vm` has, with the region's frames: what a reset maps again.
    pub fn views_of(&self, vm: VmId) -> impl Iterator<Item = (&[Pfn], View)> + '_ {
        self.regions.iter().flat_map(move |r| {
            r.views.iter().filter(move |v| v.vm == vm).map(move |v| (r.frames.as_slice(), *v))
        })
    }

    /// Guest `vm` stops using its regions (its space is gone): the regions it was the last user
    /// of leave the registry and are returned, for the caller to release their frames and
    /// withdraw their promise. An owner leaving before its borrowers leaves its regions here.
    pub fn leave(&mut self, vm: VmId) -> Vec<LiveRegion<'a>> {
        let mut gone = Vec::new();
        let mut i = 0;
        while i < self.regions.len() {
            let r = &mut self.regions[i];
            let before = r.views.len();
            r.views.retain(|v| v.vm != vm);
            if before != r.views.len() && r.views.is_empty() {
                gone.push(self.regions.swap_remove(i));
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
    use crate::dt::{FixedList, Module, ModuleKind, Region};
    use crate::frame::FrameState;
    use crate::stage2::model::ModelEnv;
    use crate::stage2::Geometry;

    fn shm(id: &'static str, role: ShmRole, guest_addr: u64, size: u64) -> SharedMem<'static> {
        SharedMem { id, role, guest_addr, size, node: id }
    }

    fn guest(name: &'static str, mib: u64, shared: &[SharedMem<'static>]) -> GuestConfig<'static> {
        let kernel =
            Module { kind: ModuleKind::Kernel, region: Region::new(0x5000_0000, 0x1000).unwrap(), node: "k" };
        let mut list = FixedList::filled(SharedMem::NONE);
        for s in shared {
            list.push(*s).unwrap();
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
        let (regions, verdicts) = plan(&guests, 40);
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
        let (regions, verdicts) = plan(&guests, 40);
        let problems: Vec<_> = verdicts.iter().map(|v| v.map(|r| r.problem)).collect();
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
        let (regions, verdicts) = plan(&guests, 40);
        assert_eq!(regions.len(), MAX_REGIONS);
        let problems: Vec<_> = verdicts.iter().map(|v| v.map(|r| r.problem)).collect();
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
        let (regions, verdicts) = plan(&guests, 40);
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
    // four guests): the parser and the plan together.
    #[test]
    fn a_host_tree_with_shared_memory_plans_its_regions() {
        let blob = include_bytes!("../../fuzz/corpus/dt_parse/qemu-virt-shared-memory.dtb");
        let p = crate::dt::parse(blob).unwrap();
        assert_eq!(p.guests().len(), 4);
        let host = p.guests()[2].unwrap_err();
        assert!(matches!(host.problem, crate::dt::GuestProblem::BadShm { .. }), "{host}");
        let configs: Vec<_> = p.guests().iter().filter_map(|g| g.as_ref().ok().copied()).collect();
        let (regions, verdicts) = plan(&configs, 40);
        assert!(verdicts.iter().all(Option::is_none));
        let got: Vec<_> = regions.iter().map(|r| (r.id, r.size, r.owner, r.users.len())).collect();
        assert_eq!(got, [("ring", 0x20_0000, Some(0), 2), ("nobody", 0x1000, None, 2)]);
    }

    fn vm(n: u16) -> VmId {
        VmId::new(n).unwrap()
    }

    fn live(id: &'static str, owner: u16, frames: &[u64], users: &[u16]) -> LiveRegion<'static> {
        LiveRegion {
            id,
            owner: vm(owner),
            frames: frames.iter().map(|&f| Pfn(f)).collect(),
            promised: frames.len(),
            views: users.iter().map(|&u| View { vm: vm(u), guest_addr: AT, owner: u == owner }).collect(),
        }
    }

    // A region leaves the registry with its last user, whoever stops first (the owner
    // included); a guest that uses nothing changes nothing.
    #[test]
    fn the_last_user_takes_the_region_with_it() {
        let mut reg = Registry::new();
        reg.add(live("a", 1, &[10, 11], &[1, 2]));
        reg.add(live("b", 0, &[20], &[2, 3]));
        assert!(reg.leave(vm(7)).is_empty());
        // The owner of "a" stops first: the region stays for its borrower.
        assert!(reg.leave(vm(1)).is_empty());
        assert_eq!(reg.views_of(vm(2)).count(), 2);
        assert_eq!(reg.views_of(vm(1)).count(), 0);
        let gone = reg.leave(vm(2));
        assert_eq!(gone.iter().map(|r| r.id).collect::<Vec<_>>(), vec!["a"]);
        assert_eq!(reg.len(), 1);
        let gone = reg.leave(vm(3));
        assert_eq!((gone[0].id, gone[0].owner), ("b", LABYRINTH));
        assert!(reg.is_empty());
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
}

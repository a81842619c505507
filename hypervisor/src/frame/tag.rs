//! The ownership tag: what one frame database entry says about its frame, in 16 bits.
//!
//! Encoding (`kind << 12 | vm`):
//!
//! | tag              | state                    | meaning                                          |
//! |------------------|--------------------------|--------------------------------------------------|
//! | `0x0000`         | [`FrameState::Absent`]   | not RAM (a hole between banks): no transition    |
//! | `0x1000`         | [`FrameState::Free`]     | zeroed and clean, held by the buddy or one pool  |
//! | `0x2000`         | [`FrameState::Reserved`] | firmware, device tree, reserved-memory: forever  |
//! | `0x3000`         | [`FrameState::Hypervisor`] | the hypervisor's own: never mapped into a guest |
//! | `0x4000`         | [`FrameState::Scrubbing`] | released, being zeroed by the releasing path    |
//! | `0x5000 \| vm`   | [`FrameState::Guest`]    | guest memory of VM `vm`                          |
//! | `0x6000 \| vm`   | [`FrameState::PageTable`] | a stage-2 table page of VM `vm`                 |
//! | `0x7000`         | tail of a 2 MiB block    | its state is its head's, at `pfn & !511`         |
//! | `0xa000 \| vm`   | [`FrameState::SharedOwned`] | shared memory owned by VM `vm` (0: Labyrinth) |
//! | `0x9000`         | head of a free block     | [`FrameState::Free`], for all 512 frames         |
//! | `0xc000`         | head of a scrubbing block | [`FrameState::Scrubbing`], for all 512 frames   |
//! | `0xd000 \| vm`   | head of a guest block    | [`FrameState::Guest`], for all 512 frames        |
//!
//! A 2 MiB-aligned block held or owned as one unit (a compound block) is one head tag (the
//! single-frame tag with bit 15 set) and 511 tail tags: it changes hands with one
//! compare-and-swap on the head, and a tail's owner is one more load away, so every frame still
//! has exactly one owner, answered in O(1). Only Free, Scrubbing and Guest have a head form.
//!
//! Shared-owned (`0xa`) is a single-frame kind with bit 15 set: [`Shape::of`] decodes it before
//! it looks for a head. A shared frame has one owner, the guest that lends it (or VM 0,
//! Labyrinth itself, for a region no guest owns: Xen's DOMID_IO); the guests that borrow it say
//! so in their own stage-2 entries (`stage2::PageState::SharedBorrowed`), not in the tag.
//!
//! Every other value is corrupt and is reported by the audit. Absent is zero so that storage
//! nobody initialised makes nothing usable. This module never reads or writes a tag cell: it
//! only encodes and decodes.

/// Bits of the tag that carry the VM id.
const VM_BITS: u32 = 12;
const VM_MASK: u16 = (1 << VM_BITS) - 1;

pub(crate) const TAG_ABSENT: u16 = 0x0000;
pub(crate) const TAG_FREE: u16 = 0x1000;
pub(crate) const TAG_RESERVED: u16 = 0x2000;
pub(crate) const TAG_HYPERVISOR: u16 = 0x3000;
pub(crate) const TAG_SCRUBBING: u16 = 0x4000;
const KIND_GUEST: u16 = 0x5;
const KIND_PAGE_TABLE: u16 = 0x6;
/// Shared memory: not a head form, though bit 15 is set (see [`Shape::of`]).
const KIND_SHARED: u16 = 0xa;
/// A tail frame of a compound block: "my state is the head's, at `pfn & !511`".
pub(crate) const TAG_TAIL: u16 = 0x7000;
/// Set on the head frame of a compound block, over the tag of the state all 512 frames are in.
pub(crate) const HEAD: u16 = 0x8000;
pub(crate) const TAG_FREE_HEAD: u16 = TAG_FREE | HEAD;

/// How one tag describes its frame.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Shape {
    /// A frame on its own, in this state.
    Frame(FrameState),
    /// The head of a compound block: it and its 511 tails are in this state.
    Head(FrameState),
    /// A tail of the compound block headed at `pfn & !511`.
    Tail,
}

impl Shape {
    /// Decodes any tag; `None` for a value no transition writes.
    pub(crate) const fn of(tag: u16) -> Option<Shape> {
        if tag == TAG_TAIL {
            return Some(Shape::Tail);
        }
        if tag & HEAD == 0 || tag >> VM_BITS == KIND_SHARED {
            return match FrameState::from_tag(tag) {
                Some(s) => Some(Shape::Frame(s)),
                None => None,
            };
        }
        match head_form(tag & !HEAD) {
            Some(_) => match FrameState::from_tag(tag & !HEAD) {
                Some(s) => Some(Shape::Head(s)),
                None => None,
            },
            None => None,
        }
    }
}

/// The head tag of a compound block whose frames are in single-frame state `tag`: only Free,
/// Scrubbing and Guest blocks exist (pooled, being released, mapped as one 2 MiB block).
#[inline(always)]
pub(crate) const fn head_form(tag: u16) -> Option<u16> {
    match tag {
        TAG_FREE | TAG_SCRUBBING => Some(tag | HEAD),
        _ if tag >> VM_BITS == KIND_GUEST => Some(tag | HEAD),
        _ => None,
    }
}

/// A guest (VM) number as the frame database records it: 12 bits, 0..=4095.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct VmId(u16);

impl VmId {
    /// The largest VM id a tag can carry.
    pub const MAX: u16 = VM_MASK;

    /// `None` when `id` does not fit the tag's 12 bits.
    pub const fn new(id: u16) -> Option<VmId> {
        if id <= VM_MASK {
            Some(VmId(id))
        } else {
            None
        }
    }

    pub const fn get(self) -> u16 {
        self.0
    }
}

/// Someone a frame can be handed to: the hypervisor, a guest's memory, or a guest's stage-2
/// tables. It is the encoded tag itself, so the atomic path stores it without converting.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[repr(transparent)]
pub struct Owner(u16);

impl Owner {
    pub const HYPERVISOR: Owner = Owner(TAG_HYPERVISOR);

    pub const fn guest(vm: VmId) -> Owner {
        Owner(KIND_GUEST << VM_BITS | vm.0)
    }

    pub const fn page_table(vm: VmId) -> Owner {
        Owner(KIND_PAGE_TABLE << VM_BITS | vm.0)
    }

    /// Shared memory lent by VM `vm` (VM 0: by Labyrinth, for a region no guest owns).
    pub const fn shared(vm: VmId) -> Owner {
        Owner(KIND_SHARED << VM_BITS | vm.0)
    }

    /// The tag a frame owned by `self` carries.
    #[inline(always)]
    pub const fn tag(self) -> u16 {
        self.0
    }

    /// The head tag of a 2 MiB block owned by `self` as one unit; only guests own blocks.
    #[inline(always)]
    pub const fn block_tag(self) -> Option<u16> {
        if self.0 >> VM_BITS == KIND_GUEST {
            Some(self.0 | HEAD)
        } else {
            None
        }
    }

    pub fn state(self) -> FrameState {
        // Owner values are only built by the constructors above, all of which decode.
        FrameState::from_tag(self.0).unwrap_or(FrameState::Absent)
    }
}

/// What the frame database says about one frame.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum FrameState {
    Absent,
    Free,
    Reserved,
    Hypervisor,
    Scrubbing,
    Guest(VmId),
    PageTable(VmId),
    /// Shared memory owned by this VM (0: Labyrinth), mapped into it and its borrowers.
    SharedOwned(VmId),
}

impl FrameState {
    /// Decodes a tag; `None` for a value no transition ever writes (corruption).
    pub const fn from_tag(tag: u16) -> Option<FrameState> {
        let vm = VmId(tag & VM_MASK);
        match tag >> VM_BITS {
            KIND_GUEST => Some(FrameState::Guest(vm)),
            KIND_PAGE_TABLE => Some(FrameState::PageTable(vm)),
            KIND_SHARED => Some(FrameState::SharedOwned(vm)),
            _ => match tag {
                TAG_ABSENT => Some(FrameState::Absent),
                TAG_FREE => Some(FrameState::Free),
                TAG_RESERVED => Some(FrameState::Reserved),
                TAG_HYPERVISOR => Some(FrameState::Hypervisor),
                TAG_SCRUBBING => Some(FrameState::Scrubbing),
                _ => None,
            },
        }
    }

    pub const fn tag(self) -> u16 {
        match self {
            FrameState::Absent => TAG_ABSENT,
            FrameState::Free => TAG_FREE,
            FrameState::Reserved => TAG_RESERVED,
            FrameState::Hypervisor => TAG_HYPERVISOR,
            FrameState::Scrubbing => TAG_SCRUBBING,
            FrameState::Guest(vm) => Owner::guest(vm).0,
            FrameState::PageTable(vm) => Owner::page_table(vm).0,
            FrameState::SharedOwned(vm) => Owner::shared(vm).0,
        }
    }

    /// The owner, for the states a frame is handed out in.
    pub const fn owner(self) -> Option<Owner> {
        match self {
            FrameState::Hypervisor => Some(Owner::HYPERVISOR),
            FrameState::Guest(vm) => Some(Owner::guest(vm)),
            FrameState::PageTable(vm) => Some(Owner::page_table(vm)),
            FrameState::SharedOwned(vm) => Some(Owner::shared(vm)),
            _ => None,
        }
    }
}

impl core::fmt::Display for FrameState {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            FrameState::Absent => f.write_str("absent"),
            FrameState::Free => f.write_str("free"),
            FrameState::Reserved => f.write_str("reserved"),
            FrameState::Hypervisor => f.write_str("hypervisor"),
            FrameState::Scrubbing => f.write_str("scrubbing"),
            FrameState::Guest(vm) => write!(f, "guest {}", vm.0),
            FrameState::PageTable(vm) => write!(f, "page table of guest {}", vm.0),
            FrameState::SharedOwned(VmId(0)) => f.write_str("shared memory owned by Labyrinth"),
            FrameState::SharedOwned(vm) => write!(f, "shared memory owned by guest {}", vm.0),
        }
    }
}

/// Decodes a single-frame tag for an error message: corrupt values show as absent, which no
/// transition accepts either.
pub(crate) fn state_of(tag: u16) -> FrameState {
    FrameState::from_tag(tag).unwrap_or(FrameState::Absent)
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn vm(id: u16) -> VmId {
        VmId::new(id).unwrap()
    }

    // Every state encodes to a distinct tag that decodes back to the same state.
    #[test]
    fn every_state_round_trips_through_its_tag() {
        let states = [
            FrameState::Absent,
            FrameState::Free,
            FrameState::Reserved,
            FrameState::Hypervisor,
            FrameState::Scrubbing,
            FrameState::Guest(vm(0)),
            FrameState::Guest(vm(VmId::MAX)),
            FrameState::PageTable(vm(0)),
            FrameState::PageTable(vm(7)),
            FrameState::SharedOwned(vm(0)),
            FrameState::SharedOwned(vm(VmId::MAX)),
        ];
        for (i, a) in states.iter().enumerate() {
            assert_eq!(FrameState::from_tag(a.tag()), Some(*a));
            for b in &states[i + 1..] {
                assert_ne!(a.tag(), b.tag(), "{a} and {b} share a tag");
            }
        }
    }

    // Storage that was never written (all zero) means "not RAM", never "free".
    #[test]
    fn zero_tag_is_absent() {
        assert_eq!(FrameState::from_tag(0), Some(FrameState::Absent));
    }

    // Values no transition writes decode as corrupt, as single frames and in any shape.
    #[test]
    fn unused_encodings_are_corrupt() {
        for tag in [0x0001, 0x1001, 0x3fff, 0x4001, 0x7001, 0x8000, 0x9001, 0xb000, 0xe000, 0xf000, 0xffff] {
            assert_eq!(FrameState::from_tag(tag & !HEAD).filter(|_| tag & HEAD == 0), None, "{tag:#x}");
            assert_eq!(Shape::of(tag), None, "{tag:#x}");
        }
    }

    // Heads exist for free, scrubbing and guest blocks only, and decode to their state; the
    // tail is one exact value.
    #[test]
    fn compound_shapes_decode() {
        assert_eq!(Shape::of(TAG_TAIL), Some(Shape::Tail));
        assert_eq!(Shape::of(TAG_FREE_HEAD), Some(Shape::Head(FrameState::Free)));
        assert_eq!(Shape::of(TAG_SCRUBBING | HEAD), Some(Shape::Head(FrameState::Scrubbing)));
        let g = Owner::guest(vm(9));
        assert_eq!(g.block_tag().and_then(Shape::of), Some(Shape::Head(FrameState::Guest(vm(9)))));
        assert_eq!(Owner::page_table(vm(9)).block_tag(), None);
        assert_eq!(Owner::HYPERVISOR.block_tag(), None);
        assert_eq!(head_form(TAG_RESERVED), None);
        assert_eq!(Shape::of(TAG_FREE), Some(Shape::Frame(FrameState::Free)));
        // Shared memory has bit 15 set and is still a single frame, never a head.
        let shared = Owner::shared(vm(3));
        assert_eq!(Shape::of(shared.tag()), Some(Shape::Frame(FrameState::SharedOwned(vm(3)))));
        assert_eq!(shared.block_tag(), None);
        assert_eq!(head_form(shared.tag()), None);
    }

    // VM ids are limited to the 12 bits the tag has room for.
    #[test]
    fn vm_id_must_fit_twelve_bits() {
        assert_eq!(VmId::new(4095).map(VmId::get), Some(4095));
        assert_eq!(VmId::new(4096), None);
    }

    // An owner's tag is the tag of the state it owns in, and back.
    #[test]
    fn owner_matches_its_state() {
        for owner in [Owner::HYPERVISOR, Owner::guest(vm(3)), Owner::page_table(vm(3)), Owner::shared(vm(3))]
        {
            assert_eq!(owner.state().tag(), owner.tag());
            assert_eq!(owner.state().owner(), Some(owner));
        }
        assert_eq!(FrameState::Free.owner(), None);
        assert_eq!(FrameState::Reserved.owner(), None);
    }
}

//! The stage-2 descriptor format (VMSAv8-64, 4 KiB granule): what a table, block or page entry
//! holds, and the attributes Labyrinth gives guest memory. Pure encoding; no table access.

use tock_registers::{register_bitfields, LocalRegisterCopy};

use crate::frame::Pfn;

register_bitfields! {u64,
    pub S2DESC [
        VALID OFFSET(0) NUMBITS(1) [],
        /// Levels 0-2: 1 = next-level table, 0 = block. Level 3: must be 1 (page).
        TABLE_OR_PAGE OFFSET(1) NUMBITS(1) [],
        /// MemAttr[3:0] with `HCR_EL2.FWB` = 0: outer[3:2], inner[1:0].
        MEMATTR OFFSET(2) NUMBITS(4) [
            DeviceNGnRE = 0b0001,
            NormalWriteBack = 0b1111
        ],
        /// S2AP: bit 6 grants reads, bit 7 writes.
        S2AP_R OFFSET(6) NUMBITS(1) [],
        S2AP_W OFFSET(7) NUMBITS(1) [],
        SH OFFSET(8) NUMBITS(2) [
            Non = 0b00,
            Inner = 0b11
        ],
        AF OFFSET(10) NUMBITS(1) [],
        /// XN[1] (bit 54): execute-never at EL1 and EL0.
        XN OFFSET(54) NUMBITS(1) [],
        /// Software bits [56:55]: the page's sharing state (pKVM's scheme): owned, shared and
        /// owned (lent to other guests), shared and borrowed (another's: never freed by us).
        SW_STATE OFFSET(55) NUMBITS(2) [
            Owned = 0b00,
            SharedOwned = 0b01,
            SharedBorrowed = 0b10
        ],
        /// Software bit 58, set only in an *invalid* descriptor (VALID = 0, where the hardware
        /// ignores bits [63:1]): a structural change holds the entry (see [`LOCKED`]).
        SW_LOCK OFFSET(58) NUMBITS(1) []
    ]
}

/// An invalid descriptor held by a structural change (break-before-make, a table page leaving
/// the tree): no walker translates through it, and a fault's compare-and-swap from 0 cannot
/// succeed on it, so the fault re-enters the guest instead of writing.
pub const LOCKED: u64 = 1 << 58;

/// Whether `raw` is an invalid descriptor held by a structural change.
#[inline(always)]
pub const fn is_locked(raw: u64) -> bool {
    raw & (LOCKED | 1) == LOCKED
}

/// A locked descriptor that also carries `payload` (< 2^57) in bits [57:1]: how a table page
/// waiting to be freed links the list it waits in, while every entry of it stays locked.
#[inline(always)]
pub const fn locked_with(payload: u64) -> u64 {
    LOCKED | ((payload << 1) & (LOCKED - 2))
}

/// The payload of a [`locked_with`] descriptor.
#[inline(always)]
pub const fn locked_payload(raw: u64) -> u64 {
    (raw & (LOCKED - 2)) >> 1
}

/// Output-address bits [47:12] of a descriptor.
pub const OA_MASK: u64 = 0x0000_ffff_ffff_f000;

/// What kind of memory a guest mapping is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MemType {
    /// RAM: Normal, write-back, inner shareable.
    Normal,
    /// MMIO passed through: Device-nGnRE.
    Device,
}

/// The sharing state recorded in a leaf's software bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PageState {
    /// Exclusively owned by this guest: its own memory, freed when it is unmapped.
    Owned,
    /// Shared memory this guest lends (the frame is tagged shared-owned by it): unmapping it
    /// frees nothing, the region is released when its last user is gone.
    SharedOwned,
    /// Shared memory borrowed from another guest (or from Labyrinth): "not ours", unmapped on a
    /// teardown or reset but never freed, never given back by this guest.
    SharedBorrowed,
}

impl PageState {
    /// Whether the page is shared memory (either side): not this guest's to free or give back.
    pub const fn is_shared(self) -> bool {
        !matches!(self, PageState::Owned)
    }
}

/// Whether the raw descriptor `raw` is a valid leaf carrying shared memory (either side):
/// the give-back hypercall's refusal test, one load and two compares.
#[inline(always)]
pub const fn is_shared_leaf(raw: u64) -> bool {
    const SW_STATE: u64 = 0b11 << 55;
    raw & 1 == 1 && raw & SW_STATE != 0
}

/// The attributes of a leaf (page or block) mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Attrs {
    pub mem: MemType,
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    pub state: PageState,
}

impl Attrs {
    /// Guest RAM: read, write, execute, exclusively owned.
    pub const RAM: Attrs =
        Attrs { mem: MemType::Normal, read: true, write: true, exec: true, state: PageState::Owned };

    /// Shared memory as its owner maps it: Normal, read and write, never executed.
    pub const SHARED_OWNED: Attrs =
        Attrs { mem: MemType::Normal, read: true, write: true, exec: false, state: PageState::SharedOwned };

    /// Shared memory as a borrower maps it: as the owner does, marked borrowed.
    pub const SHARED_BORROWED: Attrs = Attrs { state: PageState::SharedBorrowed, ..Attrs::SHARED_OWNED };

    /// Whether the mapping is shared memory (either side).
    pub const fn is_shared(&self) -> bool {
        self.state.is_shared()
    }

    /// Whether `self` allows everything `other` does (same memory type).
    pub fn covers(&self, other: &Attrs) -> bool {
        self.mem == other.mem
            && (self.read || !other.read)
            && (self.write || !other.write)
            && (self.exec || !other.exec)
    }
}

/// A decoded stage-2 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    Invalid,
    /// Points to the next-level table in frame `Pfn`.
    Table(Pfn),
    /// Maps a page (level 3) or block (levels 1-2) at physical address `pa`.
    Leaf {
        pa: u64,
        attrs: Attrs,
    },
}

impl Entry {
    /// Decodes a raw descriptor found at `level`.
    #[inline(always)]
    pub fn decode(raw: u64, level: usize) -> Entry {
        let d = LocalRegisterCopy::<u64, S2DESC::Register>::new(raw);
        if !d.is_set(S2DESC::VALID) {
            return Entry::Invalid;
        }
        let table_bit = d.is_set(S2DESC::TABLE_OR_PAGE);
        if level < 3 && table_bit {
            return Entry::Table(Pfn((raw & OA_MASK) >> 12));
        }
        if level == 3 && !table_bit {
            // Reserved encoding at level 3: treat as invalid (we never write it).
            return Entry::Invalid;
        }
        let mem = if d.matches_all(S2DESC::MEMATTR::DeviceNGnRE) { MemType::Device } else { MemType::Normal };
        let state = match d.read(S2DESC::SW_STATE) {
            0b01 => PageState::SharedOwned,
            0b10 => PageState::SharedBorrowed,
            _ => PageState::Owned,
        };
        let attrs = Attrs {
            mem,
            read: d.is_set(S2DESC::S2AP_R),
            write: d.is_set(S2DESC::S2AP_W),
            exec: !d.is_set(S2DESC::XN),
            state,
        };
        Entry::Leaf { pa: raw & OA_MASK, attrs }
    }

    /// Encodes for `level`.
    #[inline(always)]
    pub fn encode(self, level: usize) -> u64 {
        match self {
            Entry::Invalid => 0,
            Entry::Table(pfn) => (pfn.0 << 12) | (S2DESC::VALID::SET + S2DESC::TABLE_OR_PAGE::SET).value,
            Entry::Leaf { pa, attrs } => {
                let mut v = S2DESC::VALID::SET + S2DESC::AF::SET;
                if level == 3 {
                    v += S2DESC::TABLE_OR_PAGE::SET;
                }
                v += match attrs.mem {
                    MemType::Normal => S2DESC::MEMATTR::NormalWriteBack + S2DESC::SH::Inner,
                    MemType::Device => S2DESC::MEMATTR::DeviceNGnRE + S2DESC::SH::Non,
                };
                if attrs.read {
                    v += S2DESC::S2AP_R::SET;
                }
                if attrs.write {
                    v += S2DESC::S2AP_W::SET;
                }
                if !attrs.exec {
                    v += S2DESC::XN::SET;
                }
                v += match attrs.state {
                    PageState::Owned => S2DESC::SW_STATE::Owned,
                    PageState::SharedOwned => S2DESC::SW_STATE::SharedOwned,
                    PageState::SharedBorrowed => S2DESC::SW_STATE::SharedBorrowed,
                };
                (pa & OA_MASK) | v.value
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaf_round_trips_at_every_level() {
        let ro_dev =
            Attrs { mem: MemType::Device, read: true, write: false, exec: false, state: PageState::Owned };
        for level in 1..=3 {
            for attrs in [Attrs::RAM, ro_dev] {
                let e = Entry::Leaf { pa: 0x8020_0000, attrs };
                assert_eq!(Entry::decode(e.encode(level), level), e, "level {level}");
            }
        }
    }

    #[test]
    fn table_round_trips_and_is_not_a_leaf_at_level_3() {
        let t = Entry::Table(Pfn(0x12345));
        assert_eq!(Entry::decode(t.encode(2), 2), t);
        // The same bits at level 3 are a page, not a table.
        assert!(matches!(Entry::decode(t.encode(2), 3), Entry::Leaf { .. }));
    }

    #[test]
    fn ram_is_normal_write_back_inner_shareable_with_access_flag() {
        let raw = Entry::Leaf { pa: 0x4000_0000, attrs: Attrs::RAM }.encode(3);
        assert_eq!(raw & 0b11, 0b11);
        assert_eq!((raw >> 2) & 0xf, 0b1111);
        assert_eq!((raw >> 6) & 0b11, 0b11);
        assert_eq!((raw >> 8) & 0b11, 0b11);
        assert_ne!(raw & (1 << 10), 0);
        assert_eq!(raw & (1 << 54), 0);
    }

    #[test]
    fn level_3_with_table_bit_clear_is_invalid() {
        assert_eq!(Entry::decode(0x4000_0001, 3), Entry::Invalid);
    }

    #[test]
    fn a_locked_entry_is_invalid_and_carries_its_payload() {
        assert_eq!(S2DESC::SW_LOCK::SET.value, LOCKED);
        assert_eq!(Entry::decode(LOCKED, 3), Entry::Invalid);
        assert!(is_locked(LOCKED) && !is_locked(0));
        let leaf = Entry::Leaf { pa: 0x4000_0000, attrs: Attrs::RAM }.encode(3);
        assert!(!is_locked(leaf | LOCKED), "a valid entry is never locked");
        let w = locked_with(0x1_2345_6789);
        assert!(is_locked(w) && w != 0);
        assert_eq!(Entry::decode(w, 2), Entry::Invalid);
        assert_eq!(locked_payload(w), 0x1_2345_6789);
    }

    #[test]
    fn shared_states_round_trip_and_are_told_apart_from_the_raw_descriptor() {
        for attrs in [Attrs::RAM, Attrs::SHARED_OWNED, Attrs::SHARED_BORROWED] {
            for level in [2, 3] {
                let raw = Entry::Leaf { pa: 0x4020_0000, attrs }.encode(level);
                assert_eq!(Entry::decode(raw, level), Entry::Leaf { pa: 0x4020_0000, attrs });
                assert_eq!(is_shared_leaf(raw), attrs.is_shared(), "{attrs:?}");
                assert!(!is_shared_leaf(raw & !1), "an invalid entry is never shared");
            }
        }
        let raw = Entry::Leaf { pa: 0, attrs: Attrs::SHARED_BORROWED }.encode(3);
        assert_eq!((raw >> 55) & 0b11, 0b10);
        assert!(!Attrs::RAM.is_shared() && Attrs::SHARED_OWNED.is_shared());
    }

    #[test]
    fn covers_is_a_permission_subset() {
        let ro = Attrs { write: false, ..Attrs::RAM };
        assert!(Attrs::RAM.covers(&ro));
        assert!(!ro.covers(&Attrs::RAM));
    }
}

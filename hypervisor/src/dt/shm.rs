//! Static shared memory nodes inside a guest node: Xen's dom0less binding
//! (`compatible = "xen,domain-shared-memory-v1"`), read into [`SharedMem`].
//!
//! ```dts
//! domU1 {
//!     compatible = "xen,domain";
//!     #address-cells = <1>;                 // the cells of xen,shared-mem, as for modules
//!     #size-cells = <1>;
//!     shared-mem@10000000 {
//!         compatible = "xen,domain-shared-memory-v1";
//!         xen,shm-id = "my-shared-mem-0";   // 1 to 15 characters, names the region
//!         role = "owner";                    // optional: "owner" or "borrower" (the default)
//!         xen,shared-mem = <0x10000000 0x200000>;   // guest address, size
//!         // or Xen's older form, host address first: <0x60000000 0x10000000 0x200000>
//!     };
//! };
//! ```
//!
//! This module owns what one node says and the checks that need only the node: the id, the
//! role, `xen,shared-mem` in either form (guest address and size, page-aligned, not empty, not
//! wrapping; a host address, when given, page-aligned and not wrapping either). The checks
//! across guests (same size and host address everywhere, one owner, no overlap with the
//! guest's RAM and devices, the host range inside host RAM) are `vm::shm`'s.

use core::fmt;

use super::prop::Cells;
use super::tree::Node;

/// Shared regions one guest may use.
pub const MAX_SHARED: usize = 4;
/// Longest `xen,shm-id`, in bytes: Xen keeps 16 with the terminating NUL.
pub const SHM_ID_MAX: usize = 15;
/// The compatible string of a shared memory node inside a guest node.
pub const SHM_COMPATIBLE: &str = "xen,domain-shared-memory-v1";
/// Guest-address alignment and size granule: one 4 KiB page.
const PAGE: u64 = 4096;

/// Who holds the region's frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ShmRole {
    /// `role = "owner"`: the region is this guest's memory, lent to the borrowers.
    Owner,
    /// `role = "borrower"`, or no `role` (Xen's default): mapped from the owner; when no guest
    /// of the id is the owner, Labyrinth itself owns it (Xen's DOMID_IO).
    Borrower,
}

impl fmt::Display for ShmRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ShmRole::Owner => "owner",
            ShmRole::Borrower => "borrower",
        })
    }
}

/// One shared memory node of a guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedMem<'a> {
    /// `xen,shm-id`: the region's name, the same in every guest that uses it.
    pub id: &'a str,
    pub role: ShmRole,
    /// Where the region appears in this guest's physical (IPA) space.
    pub guest_addr: u64,
    pub size: u64,
    /// The host physical address Xen's older form names first (before 4.19 it was required):
    /// checked, never used to place the region (Labyrinth allocates its frames itself).
    pub host_addr: Option<u64>,
    /// The node's name.
    pub node: &'a str,
}

impl SharedMem<'_> {
    /// A placeholder for unused list slots.
    pub const NONE: SharedMem<'static> =
        SharedMem { id: "", role: ShmRole::Borrower, guest_addr: 0, size: 0, host_addr: None, node: "" };

    /// One past the region's last guest address (checked not to wrap when parsed).
    pub fn guest_end(&self) -> u64 {
        self.guest_addr + self.size
    }

    /// Whether the guest ranges of `self` and `other` share an address.
    pub fn overlaps(&self, other: &SharedMem<'_>) -> bool {
        self.guest_addr < other.guest_end() && other.guest_addr < self.guest_end()
    }
}

/// What is wrong with one shared memory node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShmProblem {
    /// No `xen,shm-id`.
    MissingId,
    /// `xen,shm-id` is not a string of 1 to [`SHM_ID_MAX`] characters (`len`: its bytes).
    BadId { len: usize },
    /// `role` is neither "owner" nor "borrower".
    BadRole,
    /// No `xen,shared-mem`.
    MissingSharedMem,
    /// `xen,shared-mem` is neither `<guest size>` nor `<host guest size>` in the node's cells
    /// (`expected`: the bytes of the first).
    BadSharedMemLength { len: usize, expected: usize },
    /// The host address of the older form is not a multiple of 4 KiB.
    HostUnaligned { host: u64 },
    /// Host address + size does not fit 64 bits.
    HostOverflow { host: u64, size: u64 },
    /// The guest address or the size is not a multiple of 4 KiB.
    Unaligned { guest_addr: u64, size: u64 },
    /// The size is 0.
    ZeroSize,
    /// Guest address + size does not fit 64 bits.
    Overflow { guest_addr: u64, size: u64 },
}

impl fmt::Display for ShmProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ShmProblem::MissingId => f.write_str("xen,shm-id is missing"),
            ShmProblem::BadId { len } => {
                write!(f, "xen,shm-id ({len} bytes) is not a string of 1 to {SHM_ID_MAX} characters")
            }
            ShmProblem::BadRole => f.write_str("role is neither \"owner\" nor \"borrower\""),
            ShmProblem::MissingSharedMem => f.write_str("xen,shared-mem is missing"),
            ShmProblem::BadSharedMemLength { len, expected } => {
                write!(
                    f,
                    "xen,shared-mem is {len} bytes, expected {expected} (guest address, size), or one \
                     address more (host address first)"
                )
            }
            ShmProblem::HostUnaligned { host } => {
                write!(f, "xen,shared-mem names host address {host:#x}, not 4 KiB-aligned")
            }
            ShmProblem::HostOverflow { host, size } => {
                write!(f, "xen,shared-mem names host address {host:#x} of {size:#x} bytes: wraps around")
            }
            ShmProblem::Unaligned { guest_addr, size } => {
                write!(f, "xen,shared-mem at {guest_addr:#x} of {size:#x} bytes is not 4 KiB-aligned")
            }
            ShmProblem::ZeroSize => f.write_str("xen,shared-mem has size 0"),
            ShmProblem::Overflow { guest_addr, size } => {
                write!(f, "xen,shared-mem at {guest_addr:#x} of {size:#x} bytes wraps around")
            }
        }
    }
}

/// Whether a guest node's child is a shared memory node.
pub(crate) fn is_shm_node(node: &Node<'_>) -> bool {
    node.is_compatible(SHM_COMPATIBLE)
}

/// Reads one shared memory node whose `xen,shared-mem` uses `cells` (the guest node's).
pub(crate) fn parse_shm<'a>(node: &Node<'a>, cells: Cells) -> Result<SharedMem<'a>, ShmProblem> {
    let id = node.property("xen,shm-id").ok_or(ShmProblem::MissingId)?;
    let id_value = id.as_str().filter(|s| !s.is_empty() && s.len() <= SHM_ID_MAX);
    let id = id_value.ok_or(ShmProblem::BadId { len: id.value.len() })?;
    let role = match node.property("role") {
        None => ShmRole::Borrower,
        Some(p) => match p.as_str() {
            Some("owner") => ShmRole::Owner,
            Some("borrower") => ShmRole::Borrower,
            _ => return Err(ShmProblem::BadRole),
        },
    };
    let mem = node.property("xen,shared-mem").ok_or(ShmProblem::MissingSharedMem)?;
    let (a, s) = (cells.address as usize * 4, cells.size as usize * 4);
    let read = |pos: usize, bytes: usize| -> Option<u64> {
        match bytes {
            4 => super::token::be32(mem.value, pos).map(u64::from),
            8 => super::token::be64(mem.value, pos),
            _ => None,
        }
    };
    let bad_length = ShmProblem::BadSharedMemLength { len: mem.value.len(), expected: a + s };
    // Xen 4.19's form, <guest size>, or the older one with the host address first (Xen reads
    // both addresses with the node's address cells).
    let (host_addr, g) = match mem.value.len() {
        n if n == a + s => (None, 0),
        n if n == 2 * a + s => (Some(read(0, a).ok_or(bad_length)?), a),
        _ => return Err(bad_length),
    };
    let (guest_addr, size) = (read(g, a).ok_or(bad_length)?, read(g + a, s).ok_or(bad_length)?);
    if size == 0 {
        return Err(ShmProblem::ZeroSize);
    }
    if !guest_addr.is_multiple_of(PAGE) || !size.is_multiple_of(PAGE) {
        return Err(ShmProblem::Unaligned { guest_addr, size });
    }
    if guest_addr.checked_add(size).is_none() {
        return Err(ShmProblem::Overflow { guest_addr, size });
    }
    if let Some(host) = host_addr {
        if !host.is_multiple_of(PAGE) {
            return Err(ShmProblem::HostUnaligned { host });
        }
        if host.checked_add(size).is_none() {
            return Err(ShmProblem::HostOverflow { host, size });
        }
    }
    Ok(SharedMem { id, role, guest_addr, size, host_addr, node: node.name() })
}

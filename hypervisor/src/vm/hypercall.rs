//! Labyrinth's own hypercalls: SMCCC calls in the vendor-specific hypervisor service range
//! (owning entity 6), beside PSCI (owning entity 4, [`super::vpsci`]). A guest finds them by
//! the range's standard queries (call UID, revision) and uses them to learn its memory
//! figures and to give pages back.
//!
//! It owns the calls' numbers, their arguments' checks and their return values, as plain
//! functions; what needs the machine (unmapping and freeing the pages given back) is left to
//! the caller as a [`Call::GiveBack`]. It never trusts an argument: every range is checked
//! against the guest's RAM before anything changes.

use core::ops::Range;

/// The vendor-specific hypervisor service range's call UID query (SMC32, fast).
pub const CALL_UID: u32 = 0x8600_ff01;
/// Its revision query.
pub const REVISION: u32 = 0x8600_ff03;
/// Memory figures, in 4 KiB pages: x1 promised, x2 held (within the promise and beyond it),
/// x3 drawable now beyond the promise (free and unpromised).
pub const MEMORY_INFO: u32 = 0xc600_0001;
/// Gives back the guest pages in `[x1, x1 + x2)` (page-aligned, inside its RAM): unmapped,
/// scrubbed and freed; a later touch faults in a fresh zeroed page. x0 = 0 and x1 = the
/// frames freed (what was mapped), or an error in x0 and nothing changed.
pub const GIVE_BACK: u32 = 0xc600_0002;

/// SMCCC return codes.
pub const SUCCESS: i64 = 0;
pub const NOT_SUPPORTED: i64 = -1;
pub const INVALID_PARAMETER: i64 = -3;
/// Labyrinth's own: the change needs a stage-2 table page and none is left (nothing changed).
pub const NO_MEMORY: i64 = -4;

/// "Labyrinth" in the UID's four registers' low words, as the range's UID query returns it.
pub const UID: [u32; 4] = [0x7962_614c, 0x6e69_7279, 0x6d20_6874, 0x6d65_6d00];
/// Major and minor revision of these calls.
pub const REVISION_MAJOR: u64 = 1;
pub const REVISION_MINOR: u64 = 0;

const PAGE: u64 = 4096;

/// What a call to this range means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    /// Answered by its registers x0-x3 alone.
    Return([u64; 4]),
    /// The memory figures: the caller fills them in.
    MemoryInfo,
    /// Give back `[ipa, ipa + len)`, checked to be page-aligned guest RAM.
    GiveBack { ipa: u64, len: u64 },
}

/// Whether `fid` is in the vendor-specific hypervisor service range (SMC32 or SMC64).
pub fn is_ours(fid: u64) -> bool {
    (fid & 0xbfff_0000) == 0x8600_0000 && fid >> 32 == 0
}

/// Decodes a call in this range with arguments x1, x2; `ram` is the guest's RAM.
pub fn decode(fid: u64, x1: u64, x2: u64, ram: Range<u64>) -> Call {
    let err = |code: i64| Call::Return([code as u64, 0, 0, 0]);
    match fid as u32 {
        CALL_UID => Call::Return(UID.map(u64::from)),
        REVISION => Call::Return([REVISION_MAJOR, REVISION_MINOR, 0, 0]),
        MEMORY_INFO => Call::MemoryInfo,
        GIVE_BACK => match give_back_range(x1, x2, ram) {
            Some(r) => Call::GiveBack { ipa: r.start, len: r.end - r.start },
            None => err(INVALID_PARAMETER),
        },
        _ => err(NOT_SUPPORTED),
    }
}

/// `[ipa, ipa + len)` if it is a non-empty, page-aligned range inside `ram`.
fn give_back_range(ipa: u64, len: u64, ram: Range<u64>) -> Option<Range<u64>> {
    if len == 0 || !ipa.is_multiple_of(PAGE) || !len.is_multiple_of(PAGE) {
        return None;
    }
    let end = ipa.checked_add(len)?;
    (ipa >= ram.start && end <= ram.end).then_some(ipa..end)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RAM: Range<u64> = 0x4000_0000..0x4800_0000;

    #[test]
    fn only_the_vendor_hypervisor_range_is_ours() {
        assert!(is_ours(0x8600_ff01) && is_ours(0xc600_0002) && is_ours(0x8600_0000));
        assert!(!is_ours(0x8400_0000), "PSCI");
        assert!(!is_ours(0xc500_0001), "vendor-specific, not the hypervisor's");
        assert!(!is_ours(0x1_c600_0002), "upper bits set");
        assert!(!is_ours(0x0600_0001), "not a fast call");
    }

    #[test]
    fn queries_answer_from_registers() {
        assert_eq!(decode(u64::from(CALL_UID), 0, 0, RAM), Call::Return(UID.map(u64::from)));
        assert_eq!(decode(u64::from(REVISION), 0, 0, RAM), Call::Return([1, 0, 0, 0]));
        assert_eq!(decode(u64::from(MEMORY_INFO), 7, 7, RAM), Call::MemoryInfo);
        assert_eq!(decode(0xc600_0099, 0, 0, RAM), Call::Return([NOT_SUPPORTED as u64, 0, 0, 0]));
    }

    #[test]
    fn give_back_takes_only_page_aligned_guest_ram() {
        let gb = |ipa, len| decode(u64::from(GIVE_BACK), ipa, len, RAM);
        let bad = Call::Return([INVALID_PARAMETER as u64, 0, 0, 0]);
        assert_eq!(gb(0x4000_0000, 0x1000), Call::GiveBack { ipa: 0x4000_0000, len: 0x1000 });
        assert_eq!(gb(0x47ff_f000, 0x1000), Call::GiveBack { ipa: 0x47ff_f000, len: 0x1000 });
        assert_eq!(gb(0x4000_0000, 0x800_0000), Call::GiveBack { ipa: 0x4000_0000, len: 0x800_0000 });
        assert_eq!(gb(0x4000_0800, 0x1000), bad, "unaligned start");
        assert_eq!(gb(0x4000_0000, 0x800), bad, "unaligned length");
        assert_eq!(gb(0x4000_0000, 0), bad, "empty");
        assert_eq!(gb(0x3fff_f000, 0x2000), bad, "starts below RAM");
        assert_eq!(gb(0x47ff_f000, 0x2000), bad, "ends past RAM");
        assert_eq!(gb(0x0900_0000, 0x1000), bad, "MMIO (the UART)");
        assert_eq!(gb(0xffff_ffff_ffff_f000, 0x2000), bad, "wraps");
        assert_eq!(gb(0x4000_0000, !0xfff), bad, "larger than the address space");
    }
}

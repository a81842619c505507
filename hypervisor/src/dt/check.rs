//! The gatekeeper: validates a whole flattened device tree before anything reads it.
//!
//! It owns the header rules (magic, sizes, versions, block placement), the memory reservation
//! block's termination, and the grammar of the structure block (one root, balanced nodes,
//! properties before children, names and values inside their blocks, a depth limit, END last).
//! Once [`check`] returns a [`Checked`], the tree walker can trust every offset it meets. This
//! module must never read outside the slice it was given, never trust an offset or length before
//! a checked add, and never hand the blob to code that could panic.

use super::error::{Block, DtError};
use super::token::{be32, be64, Blocks, Token};
use super::tree::Tree;

/// The FDT magic, 0xd00dfeed.
pub const MAGIC: u32 = 0xd00d_feed;
/// Size of a version 17 header (the only one ever written today).
pub const HEADER_SIZE: usize = 40;
/// Size of a version 16 header (no `size_dt_struct`).
const HEADER_SIZE_V16: usize = 36;
/// Deepest nesting accepted: the root plus 15 levels. Real trees use fewer than 8; the limit
/// bounds the walker's fixed-size ancestor stack.
pub const MAX_DEPTH: usize = 16;

/// A blob that passed [`check`]: its blocks are in bounds and its structure is well formed.
#[derive(Debug, Clone, Copy)]
pub struct Checked<'a> {
    blob: &'a [u8],
    blocks: Blocks<'a>,
    memreserve: &'a [u8],
    version: u32,
    boot_cpuid_phys: u32,
}

impl<'a> Checked<'a> {
    /// The blob's `totalsize`: how many bytes from its start belong to it.
    pub fn total_size(&self) -> usize {
        self.blob.len()
    }

    /// The header's `version`.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The header's `boot_cpuid_phys` (the boot CPU's `reg`, i.e. its MPIDR affinity).
    pub fn boot_cpuid_phys(&self) -> u32 {
        self.boot_cpuid_phys
    }

    /// The /memreserve/ entries as (address, size), without the 0,0 terminator. Each entry's end
    /// fits in 64 bits (checked).
    pub fn memreserve(&self) -> impl Iterator<Item = (u64, u64)> + 'a {
        let bytes = self.memreserve;
        (0..bytes.len() / 16).filter_map(move |i| {
            let pos = i.checked_mul(16)?;
            Some((be64(bytes, pos)?, be64(bytes, pos.checked_add(8)?)?))
        })
    }

    /// The node tree, for walking.
    pub fn tree(&self) -> Tree<'a> {
        Tree::new(self.blocks)
    }
}

/// The fields of the header, in file order.
struct Header {
    totalsize: u32,
    off_dt_struct: u32,
    off_dt_strings: u32,
    off_mem_rsvmap: u32,
    version: u32,
    last_comp_version: u32,
    boot_cpuid_phys: u32,
    size_dt_strings: u32,
    size_dt_struct: u32,
}

/// Reads the magic and the header fields from the first 40 bytes.
fn read_header(blob: &[u8]) -> Result<Header, DtError<'static>> {
    let too_short = DtError::TooShort { len: blob.len() };
    let field = |i: usize| be32(blob, i * 4).ok_or(too_short);
    let magic = field(0)?;
    if magic != MAGIC {
        return Err(DtError::BadMagic { found: magic });
    }
    if blob.len() < HEADER_SIZE {
        return Err(too_short);
    }
    Ok(Header {
        totalsize: field(1)?,
        off_dt_struct: field(2)?,
        off_dt_strings: field(3)?,
        off_mem_rsvmap: field(4)?,
        version: field(5)?,
        last_comp_version: field(6)?,
        boot_cpuid_phys: field(7)?,
        size_dt_strings: field(8)?,
        size_dt_struct: field(9)?,
    })
}

/// The blob's `totalsize` from its first bytes, so a caller holding only a pointer knows how
/// many bytes to hand to [`check`] or `parse`. Needs at least the 40-byte header; checks the
/// magic and that `totalsize` covers the header, nothing else.
pub fn total_size(header: &[u8]) -> Result<usize, DtError<'static>> {
    let h = read_header(header)?;
    if (h.totalsize as usize) < HEADER_SIZE_V16 {
        return Err(DtError::TotalSizeTooSmall { totalsize: h.totalsize });
    }
    Ok(h.totalsize as usize)
}

/// A block's `[start, end)` inside the blob, after checking it lies after the header and within
/// `totalsize`.
fn block_range(
    block: Block,
    offset: u32,
    size: u32,
    header_size: usize,
    totalsize: u32,
) -> Result<(usize, usize), DtError<'static>> {
    if (offset as usize) < header_size {
        return Err(DtError::BlockInHeader { block, offset });
    }
    let end = u64::from(offset) + u64::from(size);
    if end > u64::from(totalsize) {
        return Err(DtError::BlockBeyondTotalSize { block, offset, size: u64::from(size), totalsize });
    }
    Ok((offset as usize, end as usize))
}

/// True when two non-empty ranges share bytes.
fn overlap(a: (usize, usize), b: (usize, usize)) -> bool {
    a.0 < a.1 && b.0 < b.1 && a.0 < b.1 && b.0 < a.1
}

/// Validates the whole blob (header, memory reservations, structure) and returns a view that the
/// tree walker can trust. `blob` may be longer than the device tree; only `totalsize` bytes are
/// used.
pub fn check(blob: &[u8]) -> Result<Checked<'_>, DtError<'static>> {
    let h = read_header(blob)?;
    if h.version < 16 || h.last_comp_version > 17 {
        return Err(DtError::UnsupportedVersion {
            version: h.version,
            last_comp_version: h.last_comp_version,
        });
    }
    let header_size = if h.version >= 17 { HEADER_SIZE } else { HEADER_SIZE_V16 };
    if (h.totalsize as usize) < header_size {
        return Err(DtError::TotalSizeTooSmall { totalsize: h.totalsize });
    }
    let blob = blob
        .get(..h.totalsize as usize)
        .ok_or(DtError::TotalSizeBeyondBlob { totalsize: h.totalsize, len: blob.len() })?;

    let memreserve = check_memreserve(blob, &h, header_size)?;

    if !h.off_dt_struct.is_multiple_of(4) {
        return Err(DtError::BlockMisaligned { block: Block::Struct, offset: h.off_dt_struct, align: 4 });
    }
    let strings = block_range(Block::Strings, h.off_dt_strings, h.size_dt_strings, header_size, h.totalsize)?;
    let structs = if h.version >= 17 {
        if !h.size_dt_struct.is_multiple_of(4) {
            return Err(DtError::BlockMisaligned {
                block: Block::Struct,
                offset: h.size_dt_struct,
                align: 4,
            });
        }
        block_range(Block::Struct, h.off_dt_struct, h.size_dt_struct, header_size, h.totalsize)?
    } else {
        // Version 16 has no struct size: the block runs to the strings block (if after it) or
        // to totalsize, and is trimmed to its END token below.
        let limit = if h.off_dt_strings > h.off_dt_struct { h.off_dt_strings } else { h.totalsize };
        let size = limit.saturating_sub(h.off_dt_struct);
        block_range(Block::Struct, h.off_dt_struct, size, header_size, h.totalsize)?
    };
    let rsv = (h.off_mem_rsvmap as usize, h.off_mem_rsvmap as usize + memreserve.len() + 16);
    if overlap(structs, strings) {
        return Err(DtError::BlocksOverlap { a: Block::Struct, b: Block::Strings });
    }
    if overlap(rsv, structs) {
        return Err(DtError::BlocksOverlap { a: Block::MemReserve, b: Block::Struct });
    }
    if overlap(rsv, strings) {
        return Err(DtError::BlocksOverlap { a: Block::MemReserve, b: Block::Strings });
    }

    let blocks = Blocks {
        structs: blob.get(structs.0..structs.1).unwrap_or_default(),
        strings: blob.get(strings.0..strings.1).unwrap_or_default(),
        struct_offset: h.off_dt_struct,
    };
    let end = check_structure(&blocks, h.version >= 17)?;
    let blocks = Blocks { structs: blocks.structs.get(..end).unwrap_or_default(), ..blocks };
    Ok(Checked { blob, blocks, memreserve, version: h.version, boot_cpuid_phys: h.boot_cpuid_phys })
}

/// Checks the memory reservation block and returns its entries (without the terminator).
fn check_memreserve<'a>(
    blob: &'a [u8],
    h: &Header,
    header_size: usize,
) -> Result<&'a [u8], DtError<'static>> {
    let off = h.off_mem_rsvmap;
    if (off as usize) < header_size {
        return Err(DtError::BlockInHeader { block: Block::MemReserve, offset: off });
    }
    if !off.is_multiple_of(8) {
        return Err(DtError::BlockMisaligned { block: Block::MemReserve, offset: off, align: 8 });
    }
    let start = off as usize;
    let mut pos = start;
    loop {
        let at = u32::try_from(pos).unwrap_or(u32::MAX);
        let unterminated = DtError::MemReserveUnterminated { offset: off };
        let address = be64(blob, pos).ok_or(unterminated)?;
        let size = be64(blob, pos.checked_add(8).ok_or(unterminated)?).ok_or(unterminated)?;
        if address == 0 && size == 0 {
            return Ok(blob.get(start..pos).unwrap_or_default());
        }
        if address.checked_add(size).is_none() {
            return Err(DtError::MemReserveOverflow { offset: at, address, size });
        }
        pos = pos.checked_add(16).ok_or(unterminated)?;
    }
}

/// Walks every token of the structure block and enforces its grammar:
/// `NOP* BEGIN_NODE("") body END_NODE NOP* END`, where `body` is `(PROP | NOP)*` followed by
/// `(child | NOP)*`. Returns the struct-block length up to and including END.
fn check_structure(blocks: &Blocks<'_>, exact_size: bool) -> Result<usize, DtError<'static>> {
    let mut pos = 0usize;
    // Number of open nodes; `child_seen[d]` says the open node at depth d already had a child.
    let mut depth = 0usize;
    let mut child_seen = [false; MAX_DEPTH + 1];
    let mut root_seen = false;
    loop {
        if pos >= blocks.structs.len() {
            return Err(DtError::NoEnd);
        }
        let offset = blocks.at(pos);
        let (token, next) = blocks.token(pos)?;
        match token {
            Token::BeginNode { name } => {
                if depth == 0 {
                    if root_seen {
                        return Err(DtError::SecondRoot { offset });
                    }
                    if !name.is_empty() {
                        return Err(DtError::BadNodeName { offset, why: "is the root's and must be empty" });
                    }
                    root_seen = true;
                } else if name.is_empty() {
                    return Err(DtError::BadNodeName { offset, why: "is empty" });
                }
                if depth >= MAX_DEPTH {
                    return Err(DtError::TooDeep { offset, max: MAX_DEPTH });
                }
                if let Some(seen) = child_seen.get_mut(depth) {
                    *seen = true;
                }
                depth += 1;
                if let Some(seen) = child_seen.get_mut(depth) {
                    *seen = false;
                }
            }
            Token::EndNode => {
                depth = depth.checked_sub(1).ok_or(DtError::UnbalancedEndNode { offset })?;
            }
            Token::Prop { .. } => {
                if depth == 0 {
                    return Err(DtError::PropertyOutsideNode { offset });
                }
                if child_seen.get(depth).copied().unwrap_or(true) {
                    return Err(DtError::PropertyAfterChild { offset });
                }
            }
            Token::Nop => {}
            Token::End => {
                if depth != 0 {
                    return Err(DtError::EndInsideNode { offset, open: depth });
                }
                if !root_seen {
                    return Err(DtError::NoRoot);
                }
                if exact_size && next != blocks.structs.len() {
                    return Err(DtError::DataAfterEnd { offset: blocks.at(next) });
                }
                return Ok(next);
            }
        }
        pos = next;
    }
}

//! The device-tree errors: every way a blob can be refused, each with a message that names what
//! is wrong and where (blob offsets for structural faults, node paths for content faults).
//!
//! This module owns only the vocabulary and its `Display`. It must never allocate: messages are
//! formatted on demand from the numbers and borrowed names each error carries.

use core::fmt;

use super::tree::NodePath;

/// The four parts of a flattened device tree, as named in error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Block {
    /// The 40-byte header.
    Header,
    /// The memory reservation block (/memreserve/ entries).
    MemReserve,
    /// The structure block (nodes and properties).
    Struct,
    /// The strings block (property names).
    Strings,
}

impl fmt::Display for Block {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Block::Header => "header",
            Block::MemReserve => "memory reservation block",
            Block::Struct => "struct block",
            Block::Strings => "strings block",
        })
    }
}

/// What is wrong with one property's value. Displayed after the property's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Problem {
    /// The property is required here and absent.
    Missing,
    /// The value has the wrong length.
    WrongLength { len: usize, expected: usize },
    /// The value is not one NUL-terminated UTF-8 string.
    NotString,
    /// A `#address-cells`/`#size-cells` value outside what this use supports.
    UnsupportedCells { value: u32, min: u32, max: u32 },
    /// A `reg`/`ranges` value whose length is not a whole number of entries.
    LengthNotMultiple { len: usize, entry: usize },
    /// A value that must hold at least one entry holds none.
    Empty,
    /// `address + size` does not fit in 64 bits.
    Overflow { address: u64, size: u64 },
    /// An entry describes zero bytes where a real range is needed.
    ZeroSize { address: u64 },
    /// No `ranges` entry of an ancestor bus maps the address to the CPU's address space.
    NotTranslatable { address: u64 },
    /// Fewer entries than the binding requires.
    TooFewEntries { have: usize, need: usize },
    /// A value outside the ones the binding allows (the string says which are allowed).
    Unexpected { allowed: &'static str },
    /// Two CPUs share an MPIDR.
    DuplicateMpidr { mpidr: u64 },
    /// An MPIDR with bits set outside Aff3..Aff0.
    MpidrReservedBits { mpidr: u64 },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Problem::Missing => f.write_str("is missing"),
            Problem::WrongLength { len, expected } => {
                write!(f, "is {len} bytes, expected {expected}")
            }
            Problem::NotString => f.write_str("is not a NUL-terminated UTF-8 string"),
            Problem::UnsupportedCells { value, min, max } => {
                write!(f, "= {value} is not supported (expected {min} to {max})")
            }
            Problem::LengthNotMultiple { len, entry } => {
                write!(f, "length {len} not a multiple of {entry}")
            }
            Problem::Empty => f.write_str("is empty"),
            Problem::Overflow { address, size } => {
                write!(f, "entry {address:#x} + {size:#x} overflows the 64-bit address space")
            }
            Problem::ZeroSize { address } => write!(f, "entry at {address:#x} has size 0"),
            Problem::NotTranslatable { address } => {
                write!(f, "address {address:#x} is not mapped by the parent buses' ranges")
            }
            Problem::TooFewEntries { have, need } => {
                write!(f, "has {have} entries, needs at least {need}")
            }
            Problem::Unexpected { allowed } => write!(f, "must be {allowed}"),
            Problem::DuplicateMpidr { mpidr } => write!(f, "{mpidr:#x} is used by two CPUs"),
            Problem::MpidrReservedBits { mpidr } => {
                write!(f, "{mpidr:#x} has bits set outside the MPIDR affinity fields")
            }
        }
    }
}

/// Why a device tree was refused.
///
/// Structural variants carry offsets from the start of the blob; content variants name the node
/// (and property) at fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DtError<'a> {
    /// Shorter than the header.
    TooShort { len: usize },
    /// The first word is not 0xd00dfeed.
    BadMagic { found: u32 },
    /// `totalsize` is smaller than the header it is part of.
    TotalSizeTooSmall { totalsize: u32 },
    /// `totalsize` claims more bytes than were handed over.
    TotalSizeBeyondBlob { totalsize: u32, len: usize },
    /// A version this parser does not read (needs version >= 16, last_comp_version <= 17).
    UnsupportedVersion { version: u32, last_comp_version: u32 },
    /// A block does not lie within `totalsize`.
    BlockBeyondTotalSize { block: Block, offset: u32, size: u64, totalsize: u32 },
    /// A block starts inside the header.
    BlockInHeader { block: Block, offset: u32 },
    /// A block offset (or the struct block size) breaks the format's alignment.
    BlockMisaligned { block: Block, offset: u32, align: u32 },
    /// Two blocks share bytes.
    BlocksOverlap { a: Block, b: Block },
    /// The memory reservation block has no 0,0 terminator before `totalsize`.
    MemReserveUnterminated { offset: u32 },
    /// A /memreserve/ entry whose end does not fit in 64 bits.
    MemReserveOverflow { offset: u32, address: u64, size: u64 },
    /// The struct block ends in the middle of the token at `offset`.
    TruncatedToken { offset: u32 },
    /// A token value that is not BEGIN_NODE, END_NODE, PROP, NOP or END.
    BadToken { offset: u32, token: u32 },
    /// A node name with no NUL before the end of the struct block.
    NodeNameUnterminated { offset: u32 },
    /// A node name that is empty, not UTF-8, or contains '/' (or a root with a name).
    BadNodeName { offset: u32, why: &'static str },
    /// A property value running past the end of the struct block.
    PropertyBeyondStruct { offset: u32, len: u32 },
    /// A property name offset outside the strings block.
    PropertyNameOutsideStrings { offset: u32, nameoff: u32, strings_size: u32 },
    /// A property name that is unterminated, empty or not UTF-8.
    BadPropertyName { offset: u32, nameoff: u32, why: &'static str },
    /// A property outside any node.
    PropertyOutsideNode { offset: u32 },
    /// A property after the node's first child (the crate and the spec both forbid it).
    PropertyAfterChild { offset: u32 },
    /// END_NODE with no open node.
    UnbalancedEndNode { offset: u32 },
    /// A second top-level node after the root closed.
    SecondRoot { offset: u32 },
    /// The struct block holds no node at all.
    NoRoot,
    /// END while `open` nodes are still open.
    EndInsideNode { offset: u32, open: usize },
    /// The struct block ends without an END token.
    NoEnd,
    /// Tokens after END inside the struct block.
    DataAfterEnd { offset: u32 },
    /// Nodes nested deeper than this parser's limit.
    TooDeep { offset: u32, max: usize },
    /// No /cpus node.
    NoCpusNode,
    /// /cpus has no cpu nodes.
    NoCpuNodes,
    /// No memory node with `device_type = "memory"` describes any RAM.
    NoMemory,
    /// A property of a node is wrong.
    Property { node: NodePath<'a>, prop: &'static str, problem: Problem },
    /// More items than the fixed-size tables hold.
    TooMany { what: &'static str, max: usize },
}

impl fmt::Display for DtError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            DtError::TooShort { len } => {
                write!(f, "device tree is {len} bytes, shorter than its 40-byte header")
            }
            DtError::BadMagic { found } => {
                write!(f, "bad device tree magic {found:#010x} (expected 0xd00dfeed)")
            }
            DtError::TotalSizeTooSmall { totalsize } => {
                write!(f, "totalsize {totalsize:#x} is smaller than the header")
            }
            DtError::TotalSizeBeyondBlob { totalsize, len } => {
                write!(f, "totalsize {totalsize:#x} beyond the {len:#x} bytes available")
            }
            DtError::UnsupportedVersion { version, last_comp_version } => write!(
                f,
                "device tree version {version} (last compatible {last_comp_version}) not \
                 supported: need version >= 16 and last_comp_version <= 17"
            ),
            DtError::BlockBeyondTotalSize { block, offset, size, totalsize } => {
                write!(f, "{block} offset {offset:#x} size {size:#x} beyond totalsize {totalsize:#x}")
            }
            DtError::BlockInHeader { block, offset } => {
                write!(f, "{block} offset {offset:#x} lies inside the header")
            }
            DtError::BlockMisaligned { block, offset, align } => {
                write!(f, "{block} offset/size {offset:#x} not {align}-byte aligned")
            }
            DtError::BlocksOverlap { a, b } => write!(f, "{a} and {b} overlap"),
            DtError::MemReserveUnterminated { offset } => {
                write!(f, "memory reservation block at {offset:#x} has no 0,0 terminator before totalsize")
            }
            DtError::MemReserveOverflow { offset, address, size } => write!(
                f,
                "/memreserve/ entry at {offset:#x}: {address:#x} + {size:#x} overflows the \
                 64-bit address space"
            ),
            DtError::TruncatedToken { offset } => {
                write!(f, "struct block ends inside the token at {offset:#x}")
            }
            DtError::BadToken { offset, token } => {
                write!(f, "unknown struct token {token:#x} at {offset:#x}")
            }
            DtError::NodeNameUnterminated { offset } => {
                write!(f, "node name at {offset:#x} has no NUL before the end of the struct block")
            }
            DtError::BadNodeName { offset, why } => write!(f, "node name at {offset:#x} {why}"),
            DtError::PropertyBeyondStruct { offset, len } => {
                write!(f, "property at {offset:#x} with length {len:#x} runs past the struct block")
            }
            DtError::PropertyNameOutsideStrings { offset, nameoff, strings_size } => write!(
                f,
                "property at {offset:#x}: name offset {nameoff:#x} outside the {strings_size:#x}-byte \
                 strings block"
            ),
            DtError::BadPropertyName { offset, nameoff, why } => {
                write!(f, "property at {offset:#x}: name at strings offset {nameoff:#x} {why}")
            }
            DtError::PropertyOutsideNode { offset } => {
                write!(f, "property at {offset:#x} outside any node")
            }
            DtError::PropertyAfterChild { offset } => {
                write!(f, "property at {offset:#x} follows a child node")
            }
            DtError::UnbalancedEndNode { offset } => {
                write!(f, "END_NODE at {offset:#x} closes no node")
            }
            DtError::SecondRoot { offset } => {
                write!(f, "second top-level node at {offset:#x} (only one root allowed)")
            }
            DtError::NoRoot => f.write_str("struct block holds no root node"),
            DtError::EndInsideNode { offset, open } => {
                write!(f, "END token at {offset:#x} with {open} node(s) still open")
            }
            DtError::NoEnd => f.write_str("struct block has no END token"),
            DtError::DataAfterEnd { offset } => {
                write!(f, "struct block continues after END (at {offset:#x})")
            }
            DtError::TooDeep { offset, max } => {
                write!(f, "node at {offset:#x} nested deeper than {max} levels")
            }
            DtError::NoCpusNode => f.write_str("no /cpus node"),
            DtError::NoCpuNodes => f.write_str("/cpus has no cpu nodes"),
            DtError::NoMemory => f.write_str("no memory node (device_type = \"memory\") describes any RAM"),
            DtError::Property { node, prop, problem } => write!(f, "{node}: {prop} {problem}"),
            DtError::TooMany { what, max } => write!(f, "more than {max} {what}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structural_messages_name_the_fault() {
        let e = DtError::BlockBeyondTotalSize {
            block: Block::Struct,
            offset: 0x2000,
            size: 0x10,
            totalsize: 0x1000,
        };
        assert_eq!(e.to_string(), "struct block offset 0x2000 size 0x10 beyond totalsize 0x1000");
        assert_eq!(DtError::NoCpusNode.to_string(), "no /cpus node");
        assert_eq!(
            Problem::LengthNotMultiple { len: 12, entry: 16 }.to_string(),
            "length 12 not a multiple of 16"
        );
    }
}

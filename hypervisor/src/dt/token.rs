//! Decoding of one structure-block token (BEGIN_NODE, END_NODE, PROP, NOP, END), the single
//! place that turns struct-block bytes into names and values.
//!
//! It owns the byte-level rules of the format: big-endian words, NUL-terminated names, 4-byte
//! padding, property names looked up in the strings block. It must never index out of bounds or
//! overflow an offset: every step is a checked `get` or a checked add, and every failure is a
//! [`DtError`] naming the blob offset.

use super::error::DtError;

/// FDT_BEGIN_NODE.
pub(crate) const BEGIN_NODE: u32 = 0x1;
/// FDT_END_NODE.
pub(crate) const END_NODE: u32 = 0x2;
/// FDT_PROP.
pub(crate) const PROP: u32 = 0x3;
/// FDT_NOP.
pub(crate) const NOP: u32 = 0x4;
/// FDT_END (0x9 in the specification; fdt 0.1.5 wrongly uses 5).
pub(crate) const END: u32 = 0x9;

/// One decoded token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Token<'a> {
    BeginNode { name: &'a str },
    EndNode,
    Prop { name: &'a str, value: &'a [u8] },
    Nop,
    End,
}

/// One token as [`Blocks::skim`] sees it: names left raw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Skim<'a> {
    BeginNode { raw_name: &'a [u8] },
    EndNode,
    Prop { nameoff: u32, value: &'a [u8] },
    Nop,
    End,
}

/// The big-endian word at `pos`, if four bytes are there.
pub(crate) fn be32(bytes: &[u8], pos: usize) -> Option<u32> {
    let word = bytes.get(pos..pos.checked_add(4)?)?;
    Some(u32::from_be_bytes(word.try_into().ok()?))
}

/// The big-endian double word at `pos`, if eight bytes are there.
pub(crate) fn be64(bytes: &[u8], pos: usize) -> Option<u64> {
    let word = bytes.get(pos..pos.checked_add(8)?)?;
    Some(u64::from_be_bytes(word.try_into().ok()?))
}

/// `pos` rounded up to a multiple of 4, if that fits.
fn align4(pos: usize) -> Option<usize> {
    Some(pos.checked_add(3)? & !3)
}

/// The struct and strings blocks of a blob, and where the struct block starts (for messages).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Blocks<'a> {
    pub structs: &'a [u8],
    pub strings: &'a [u8],
    pub struct_offset: u32,
}

impl<'a> Blocks<'a> {
    /// The blob offset of struct-block position `pos`, for error messages.
    pub fn at(&self, pos: usize) -> u32 {
        let abs = u64::from(self.struct_offset).saturating_add(pos as u64);
        u32::try_from(abs).unwrap_or(u32::MAX)
    }

    /// Decodes the token at struct-block position `pos`; returns it and the position of the next
    /// token (already past any padding).
    pub fn token(&self, pos: usize) -> Result<(Token<'a>, usize), DtError<'static>> {
        let truncated = DtError::TruncatedToken { offset: self.at(pos) };
        let tag = be32(self.structs, pos).ok_or(truncated)?;
        let after_tag = pos.checked_add(4).ok_or(truncated)?;
        match tag {
            BEGIN_NODE => {
                let rest = self.structs.get(after_tag..).ok_or(truncated)?;
                let len = rest
                    .iter()
                    .position(|&b| b == 0)
                    .ok_or(DtError::NodeNameUnterminated { offset: self.at(pos) })?;
                let raw = rest.get(..len).ok_or(truncated)?;
                let name = core::str::from_utf8(raw)
                    .map_err(|_| DtError::BadNodeName { offset: self.at(pos), why: "is not UTF-8" })?;
                if name.contains('/') {
                    return Err(DtError::BadNodeName { offset: self.at(pos), why: "contains '/'" });
                }
                let next = after_tag
                    .checked_add(len)
                    .and_then(|p| p.checked_add(1))
                    .and_then(align4)
                    .ok_or(truncated)?;
                Ok((Token::BeginNode { name }, next))
            }
            END_NODE => Ok((Token::EndNode, after_tag)),
            NOP => Ok((Token::Nop, after_tag)),
            END => Ok((Token::End, after_tag)),
            PROP => {
                let len = be32(self.structs, after_tag).ok_or(truncated)?;
                let nameoff = be32(self.structs, after_tag.wrapping_add(4)).ok_or(truncated)?;
                let value_start = after_tag.checked_add(8).ok_or(truncated)?;
                let beyond = DtError::PropertyBeyondStruct { offset: self.at(pos), len };
                let value_end = value_start.checked_add(len as usize).ok_or(beyond)?;
                let value = self.structs.get(value_start..value_end).ok_or(beyond)?;
                let next = align4(value_end).ok_or(beyond)?;
                let name = self.property_name(pos, nameoff)?;
                Ok((Token::Prop { name, value }, next))
            }
            token => Err(DtError::BadToken { offset: self.at(pos), token }),
        }
    }

    /// Decodes the token at `pos` without validating names (no UTF-8 check, no strings-block
    /// lookup): for walking a blob that [`super::check`] already validated. `None` where
    /// `token` would have returned an error about sizes or offsets.
    pub fn skim(&self, pos: usize) -> Option<(Skim<'a>, usize)> {
        let tag = be32(self.structs, pos)?;
        let after_tag = pos.checked_add(4)?;
        match tag {
            BEGIN_NODE => {
                let rest = self.structs.get(after_tag..)?;
                let len = rest.iter().position(|&b| b == 0)?;
                let next = align4(after_tag.checked_add(len)?.checked_add(1)?)?;
                Some((Skim::BeginNode { raw_name: rest.get(..len)? }, next))
            }
            END_NODE => Some((Skim::EndNode, after_tag)),
            NOP => Some((Skim::Nop, after_tag)),
            END => Some((Skim::End, after_tag)),
            PROP => {
                let len = be32(self.structs, after_tag)? as usize;
                let nameoff = be32(self.structs, after_tag.checked_add(4)?)?;
                let value_start = after_tag.checked_add(8)?;
                let value_end = value_start.checked_add(len)?;
                let value = self.structs.get(value_start..value_end)?;
                Some((Skim::Prop { nameoff, value }, align4(value_end)?))
            }
            _ => None,
        }
    }

    /// The property name at `nameoff`, as `token` would return it.
    pub fn name_at(&self, nameoff: u32) -> Option<&'a str> {
        let rest = self.strings.get(nameoff as usize..)?;
        let len = rest.iter().position(|&b| b == 0)?;
        core::str::from_utf8(rest.get(..len)?).ok()
    }

    /// True when the property name at `nameoff` is exactly `name` (compared as bytes).
    pub fn name_is(&self, nameoff: u32, name: &str) -> bool {
        let start = nameoff as usize;
        let Some(end) = start.checked_add(name.len()) else { return false };
        self.strings.get(start..end) == Some(name.as_bytes()) && self.strings.get(end) == Some(&0)
    }

    /// The property name at strings-block offset `nameoff`, for the PROP token at `pos`.
    fn property_name(&self, pos: usize, nameoff: u32) -> Result<&'a str, DtError<'static>> {
        let offset = self.at(pos);
        let outside = DtError::PropertyNameOutsideStrings {
            offset,
            nameoff,
            strings_size: u32::try_from(self.strings.len()).unwrap_or(u32::MAX),
        };
        let start = nameoff as usize;
        if start >= self.strings.len() {
            return Err(outside);
        }
        let rest = self.strings.get(start..).ok_or(outside)?;
        let bad = |why| DtError::BadPropertyName { offset, nameoff, why };
        let len =
            rest.iter().position(|&b| b == 0).ok_or(bad("has no NUL before the end of the strings block"))?;
        if len == 0 {
            return Err(bad("is empty"));
        }
        let raw = rest.get(..len).ok_or(outside)?;
        core::str::from_utf8(raw).map_err(|_| bad("is not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocks<'a>(structs: &'a [u8], strings: &'a [u8]) -> Blocks<'a> {
        Blocks { structs, strings, struct_offset: 0x38 }
    }

    #[test]
    fn decodes_begin_node_with_padding() {
        let s = [0, 0, 0, 1, b'a', b'b', b'c', 0, 0, 0, 0, 2];
        let (tok, next) = blocks(&s, b"").token(0).unwrap();
        assert_eq!(tok, Token::BeginNode { name: "abc" });
        assert_eq!(next, 8);
        let s = [0, 0, 0, 1, b'a', b'b', b'c', b'd', 0, 0, 0, 0];
        assert_eq!(blocks(&s, b"").token(0).unwrap().1, 12);
    }

    #[test]
    fn decodes_prop_and_its_name() {
        let s = [0, 0, 0, 3, 0, 0, 0, 2, 0, 0, 0, 4, 0xab, 0xcd, 0, 0];
        let (tok, next) = blocks(&s, b"reg\0foo\0").token(0).unwrap();
        assert_eq!(tok, Token::Prop { name: "foo", value: &[0xab, 0xcd] });
        assert_eq!(next, 16);
    }

    #[test]
    fn rejects_what_would_run_off_the_blocks() {
        // Value longer than the block.
        let s = [0, 0, 0, 3, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0];
        assert_eq!(
            blocks(&s, b"a\0").token(0),
            Err(DtError::PropertyBeyondStruct { offset: 0x38, len: u32::MAX })
        );
        // Name offset past the strings block.
        let s = [0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 2];
        assert!(matches!(
            blocks(&s, b"a\0").token(0),
            Err(DtError::PropertyNameOutsideStrings { nameoff: 2, .. })
        ));
        // Name without NUL.
        assert!(matches!(blocks(&s, b"a\0bc").token(0), Err(DtError::BadPropertyName { nameoff: 2, .. })));
        // Node name without NUL.
        let s = [0, 0, 0, 1, b'a', b'b'];
        assert_eq!(blocks(&s, b"").token(0), Err(DtError::NodeNameUnterminated { offset: 0x38 }));
        // Half a tag.
        assert_eq!(blocks(&[0, 0], b"").token(0), Err(DtError::TruncatedToken { offset: 0x38 }));
        // Unknown tag.
        assert_eq!(blocks(&[0, 0, 0, 5], b"").token(0), Err(DtError::BadToken { offset: 0x38, token: 5 }));
        // Position past the end.
        assert!(blocks(&[0, 0, 0, 9], b"").token(usize::MAX - 1).is_err());
    }

    #[test]
    fn rejects_bad_names() {
        let s = [0, 0, 0, 1, 0xff, 0xfe, 0, 0];
        assert!(matches!(blocks(&s, b"").token(0), Err(DtError::BadNodeName { .. })));
        let s = [0, 0, 0, 1, b'a', b'/', 0, 0];
        assert!(matches!(blocks(&s, b"").token(0), Err(DtError::BadNodeName { .. })));
        let s = [0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0];
        assert!(matches!(blocks(&s, b"\xff\0").token(0), Err(DtError::BadPropertyName { .. })));
        assert!(matches!(blocks(&s, b"\0").token(0), Err(DtError::BadPropertyName { .. })));
    }
}

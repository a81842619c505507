//! The Linux arm64 `Image` header of a guest kernel: where in the guest's RAM it must go and how
//! much room it needs. Pure parsing of untrusted bytes: it never panics and never reads past
//! the slice.

pub const HEADER_SIZE: usize = 64;
const MAGIC: u32 = 0x644d_5241; // "ARM\x64"
/// `text_offset` of kernels too old to say (image_size = 0), per the boot protocol.
const LEGACY_TEXT_OFFSET: u64 = 0x8_0000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageHeader {
    /// Offset from a 2 MiB-aligned base of RAM where the image must be loaded.
    pub text_offset: u64,
    /// Bytes from the load address the image needs (bss included); at least the file size.
    pub effective_size: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageError {
    TooShort { len: usize },
    BadMagic { found: u32 },
    BigEndian,
}

impl core::fmt::Display for ImageError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ImageError::TooShort { len } => {
                write!(f, "kernel image is {len} bytes, shorter than its 64-byte header")
            }
            ImageError::BadMagic { found } => {
                write!(f, "kernel image has no arm64 Image magic (found {found:#x})")
            }
            ImageError::BigEndian => f.write_str("kernel image is big-endian"),
        }
    }
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut v = [0u8; 8];
    if let Some(s) = b.get(off..off + 8) {
        v.copy_from_slice(s);
    }
    u64::from_le_bytes(v)
}

/// Reads the header of an image of `data.len()` bytes.
pub fn parse(data: &[u8]) -> Result<ImageHeader, ImageError> {
    if data.len() < HEADER_SIZE {
        return Err(ImageError::TooShort { len: data.len() });
    }
    let magic = u64_at(data, 56) as u32;
    if magic != MAGIC {
        return Err(ImageError::BadMagic { found: magic });
    }
    let (text_offset, image_size, flags) = (u64_at(data, 8), u64_at(data, 16), u64_at(data, 24));
    if image_size == 0 {
        return Ok(ImageHeader { text_offset: LEGACY_TEXT_OFFSET, effective_size: data.len() as u64 });
    }
    if flags & 1 != 0 {
        return Err(ImageError::BigEndian);
    }
    Ok(ImageHeader { text_offset, effective_size: image_size.max(data.len() as u64) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(text_offset: u64, image_size: u64, flags: u64) -> Vec<u8> {
        let mut h = vec![0u8; 64];
        h[8..16].copy_from_slice(&text_offset.to_le_bytes());
        h[16..24].copy_from_slice(&image_size.to_le_bytes());
        h[24..32].copy_from_slice(&flags.to_le_bytes());
        h[56..60].copy_from_slice(b"ARM\x64");
        h
    }

    #[test]
    fn reads_text_offset_and_size() {
        let h = parse(&header(0x8_0000, 0x20_0000, 0xa)).unwrap();
        assert_eq!(h, ImageHeader { text_offset: 0x8_0000, effective_size: 0x20_0000 });
    }

    #[test]
    fn legacy_images_get_the_default_offset() {
        let h = parse(&header(0x1234, 0, 0)).unwrap();
        assert_eq!(h, ImageHeader { text_offset: 0x8_0000, effective_size: 64 });
    }

    #[test]
    fn rejects_short_foreign_and_big_endian_images() {
        assert_eq!(parse(&[0; 10]), Err(ImageError::TooShort { len: 10 }));
        let mut h = header(0, 0x1000, 0);
        h[56] = b'X';
        assert!(matches!(parse(&h), Err(ImageError::BadMagic { .. })));
        assert_eq!(parse(&header(0, 0x1000, 1)), Err(ImageError::BigEndian));
    }

    #[test]
    fn any_bytes_parse_without_panicking() {
        for len in 0..80 {
            let _ = parse(&vec![0xff; len]);
        }
    }
}

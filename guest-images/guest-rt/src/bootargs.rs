//! The kernel command line (`/chosen/bootargs`): whitespace-separated tokens, each a flag
//! (`stress.blocks`) or `key=value` (`stress.seed=7`).

#[derive(Clone, Copy, Debug, Default)]
pub struct Bootargs<'a>(pub &'a str);

impl<'a> Bootargs<'a> {
    pub fn tokens(&self) -> impl Iterator<Item = &'a str> {
        self.0.split_ascii_whitespace()
    }

    /// True if `flag` appears as a token on its own or as the key of a `key=value` token.
    pub fn has(&self, flag: &str) -> bool {
        self.tokens().any(|t| t == flag || t.split_once('=').is_some_and(|(k, _)| k == flag))
    }

    /// The value of the last `key=value` token with this key.
    pub fn value(&self, key: &str) -> Option<&'a str> {
        self.tokens().filter_map(|t| t.split_once('=')).filter(|(k, _)| *k == key).map(|(_, v)| v).last()
    }
}

/// A number: decimal, or hexadecimal with `0x`.
pub fn parse_u64(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => parse_hex(h),
        None if !s.is_empty() => s.bytes().try_fold(0u64, |acc, b| {
            let d = (b as char).to_digit(10)?;
            acc.checked_mul(10)?.checked_add(d as u64)
        }),
        None => None,
    }
}

/// Hexadecimal, with or without `0x`; `_` separators allowed (`0x4000_0000`).
pub fn parse_hex(s: &str) -> Option<u64> {
    let s = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")).unwrap_or(s);
    let mut any = false;
    let v = s.bytes().filter(|&b| b != b'_').try_fold(0u64, |acc, b| {
        any = true;
        let d = (b as char).to_digit(16)?;
        acc.checked_mul(16)?.checked_add(d as u64)
    })?;
    any.then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_and_values() {
        let a = Bootargs("console=ttyAMA0  stress.seed=7 stress.blocks\tisolation.probe=0x1,2");
        assert!(a.has("stress.blocks"));
        assert!(a.has("stress.seed"));
        assert!(!a.has("stress"));
        assert!(!a.has("stress.reset"));
        assert_eq!(a.value("stress.seed"), Some("7"));
        assert_eq!(a.value("isolation.probe"), Some("0x1,2"));
        assert_eq!(a.value("stress.blocks"), None);
        assert_eq!(Bootargs("a=1 a=2").value("a"), Some("2"));
        assert!(!Bootargs("").has("x"));
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_u64("7"), Some(7));
        assert_eq!(parse_u64("0x10"), Some(16));
        assert_eq!(parse_u64(""), None);
        assert_eq!(parse_u64("0x"), None);
        assert_eq!(parse_u64("12a"), None);
        assert_eq!(parse_u64("18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_u64("18446744073709551616"), None);
        assert_eq!(parse_hex("4000_0000"), Some(0x4000_0000));
        assert_eq!(parse_hex("0x48000000"), Some(0x4800_0000));
        assert_eq!(parse_hex("DEADbeef"), Some(0xdead_beef));
        assert_eq!(parse_hex("g"), None);
        assert_eq!(parse_hex("1_0000_0000_0000_0000"), None);
    }
}

//! Which guest the console's input goes to, and the escape that moves it: Ctrl-A three times
//! in a row, as Xen's console does it.
//!
//! It owns the focus (an index into the guests, in configuration order) and the count of
//! Ctrl-As typed so far; it decides, byte by byte, what reaches the focused guest. A Ctrl-A
//! or two followed by anything else are the guest's (held back, then delivered before that
//! byte), so a guest still gets the Ctrl-A its own programs use. It touches no device.

/// Ctrl-A.
pub const ESCAPE: u8 = 0x01;
/// Ctrl-As in a row that move the focus.
pub const ESCAPE_COUNT: u8 = 3;

/// What one typed byte does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Typed {
    /// Nothing yet (a Ctrl-A held back).
    Held,
    /// These bytes go to the focused guest: `len` of `bytes`.
    Deliver { bytes: [u8; ESCAPE_COUNT as usize], len: usize },
    /// The escape is complete: the focus moves on.
    Switch,
}

/// The input focus among `guests` guests.
#[derive(Clone, Copy, Debug)]
pub struct InputFocus {
    focus: usize,
    escapes: u8,
}

impl InputFocus {
    /// The first guest has the focus.
    pub const fn new() -> Self {
        InputFocus { focus: 0, escapes: 0 }
    }

    /// The guest with the focus.
    pub fn focus(&self) -> usize {
        self.focus
    }

    /// One byte typed.
    pub fn typed(&mut self, b: u8) -> Typed {
        if b == ESCAPE {
            self.escapes += 1;
            if self.escapes == ESCAPE_COUNT {
                self.escapes = 0;
                return Typed::Switch;
            }
            return Typed::Held;
        }
        let mut bytes = [ESCAPE; ESCAPE_COUNT as usize];
        let held = core::mem::take(&mut self.escapes) as usize;
        bytes[held] = b;
        Typed::Deliver { bytes, len: held + 1 }
    }

    /// Moves the focus to the next of `guests` guests (in order, wrapping) for which `live`
    /// holds; `None` (focus unchanged) if none does but the current one.
    pub fn next(&mut self, guests: usize, live: impl Fn(usize) -> bool) -> Option<usize> {
        let next = (1..=guests).map(|k| (self.focus + k) % guests).find(|&g| g != self.focus && live(g))?;
        self.focus = next;
        Some(next)
    }
}

impl Default for InputFocus {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deliver(s: &[u8]) -> Typed {
        let mut bytes = [ESCAPE; 3];
        bytes[..s.len()].copy_from_slice(s);
        Typed::Deliver { bytes, len: s.len() }
    }

    #[test]
    fn three_ctrl_a_switch_and_fewer_reach_the_guest() {
        let mut f = InputFocus::new();
        assert_eq!(f.typed(b'x'), deliver(b"x"));
        assert_eq!(f.typed(ESCAPE), Typed::Held);
        assert_eq!(f.typed(ESCAPE), Typed::Held);
        assert_eq!(f.typed(b'c'), deliver(&[ESCAPE, ESCAPE, b'c']), "two Ctrl-As are the guest's");
        assert_eq!(f.typed(ESCAPE), Typed::Held, "the count started again");
        assert_eq!(f.typed(ESCAPE), Typed::Held);
        assert_eq!(f.typed(ESCAPE), Typed::Switch);
        assert_eq!(f.typed(ESCAPE), Typed::Held, "a fourth starts a new escape");
        assert_eq!(f.typed(b'\r'), deliver(&[ESCAPE, b'\r']));
    }

    #[test]
    fn the_focus_moves_to_the_next_live_guest_and_wraps() {
        let mut f = InputFocus::new();
        assert_eq!(f.next(3, |_| true), Some(1));
        assert_eq!(f.next(3, |g| g != 2), Some(0), "the stopped guest is skipped, the order wraps");
        assert_eq!(f.next(3, |g| g == 0), None, "nobody else is live: the focus stays");
        assert_eq!(f.focus(), 0);
        assert_eq!(f.next(1, |_| true), None, "one guest: nowhere to go");
    }
}

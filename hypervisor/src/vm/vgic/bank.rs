//! The per-INTID state of a run of interrupts, 32 to a word: a redistributor's SGIs and PPIs
//! (one word) or the distributor's SPIs. Plain bitmaps and the rules that tie them together
//! (software pending, line levels, resampling); no locking and no notion of who owns the bank.

/// The word and bit of the `n`th interrupt of a bank.
pub(super) const fn bit(n: u32) -> (usize, u32) {
    ((n / 32) as usize, 1 << (n % 32))
}

/// Which interrupt groups the distributor forwards (`GICD_CTLR.EnableGrp0/1`).
#[derive(Clone, Copy, Debug)]
pub(super) struct GroupEnables {
    pub g0: bool,
    pub g1: bool,
}

/// The state of `32 * W` interrupts. Bit `n % 32` of word `n / 32` is the bank's `n`th INTID.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Bank<const W: usize> {
    /// IGROUPR: group 1 (else group 0).
    pub group: [u32; W],
    pub enabled: [u32; W],
    /// The pending state while the interrupt is not in a list register (or waits beside an
    /// active one there).
    pub pending: [u32; W],
    /// The active state while the interrupt is not in a list register.
    pub active: [u32; W],
    /// ICFGR's Int_config[1]: edge-triggered, else level-sensitive.
    pub edge: [u32; W],
    /// In a list register (of the bank's vCPU; for SPIs, of the distributor's `holder`).
    pub in_lr: [u32; W],
    /// Driven by a line whose level the caller reports (`VGic::set_line_level`).
    pub driven: [u32; W],
    /// That line's last reported level.
    pub line: [u32; W],
    /// A pending state set by software (ISPENDR) on a driven level-sensitive interrupt: it
    /// holds, whatever the line does, until the guest acknowledges it or ICPENDR clears it.
    pub latched: [u32; W],
    /// The latched pending states that went into a list register with the pending state.
    pub latched_in_lr: [u32; W],
    pub priority: [[u8; 32]; W],
}

impl<const W: usize> Bank<W> {
    /// Everything disabled, group 0, priority 0, level-sensitive, not driven.
    pub const fn new() -> Self {
        Bank {
            group: [0; W],
            enabled: [0; W],
            pending: [0; W],
            active: [0; W],
            edge: [0; W],
            in_lr: [0; W],
            driven: [0; W],
            line: [0; W],
            latched: [0; W],
            latched_in_lr: [0; W],
            priority: [[0; 32]; W],
        }
    }

    /// The interrupts of word `w` whose pending state follows a line.
    fn level_driven(&self, w: usize) -> u32 {
        self.driven[w] & !self.edge[w]
    }

    /// ISPENDR (or an edge raised by a device model or an SGI): pending, latched for driven
    /// level-sensitive interrupts.
    pub fn set_pending(&mut self, w: usize, bits: u32) {
        self.pending[w] |= bits;
        self.latched[w] |= bits & self.level_driven(w);
    }

    /// ICPENDR: not pending, unless a line still holds it high.
    pub fn clear_pending(&mut self, w: usize, bits: u32) {
        self.latched[w] &= !bits;
        self.pending[w] &= !(bits & !(self.level_driven(w) & self.line[w]));
    }

    /// A line's new level. An edge-triggered interrupt becomes pending on a rising edge; a
    /// level-sensitive one is pending exactly while the line is high (or a latch holds it).
    /// While the interrupt is in a list register only the level is noted: the owner's next
    /// sync resamples it. Returns whether the owner must sync for the guest to see the change.
    pub fn set_line(&mut self, w: usize, b: u32, level: bool) -> bool {
        let was_high = self.line[w] & b != 0;
        self.driven[w] |= b;
        if level {
            self.line[w] |= b;
        } else {
            self.line[w] &= !b;
        }
        if self.edge[w] & b != 0 {
            if level && !was_high {
                self.pending[w] |= b;
                return true;
            }
            return false;
        }
        if self.in_lr[w] & b != 0 {
            return level != was_high;
        }
        let was_pending = self.pending[w] & b != 0;
        if level {
            self.pending[w] |= b;
        } else if self.latched[w] & b == 0 {
            self.pending[w] &= !b;
        }
        level && !was_pending
    }

    /// Gives every driven level-sensitive interrupt that is not in a list register the pending
    /// state its line (or latch) says: how a pending state latched while the guest could not
    /// take it follows the line back down.
    pub fn resample(&mut self) {
        for w in 0..W {
            let lv = self.level_driven(w) & !self.in_lr[w];
            self.pending[w] = (self.pending[w] & !lv) | (lv & (self.line[w] | self.latched[w]));
        }
    }

    /// Takes an interrupt back from a list register whose state bits were `pending`/`active`.
    pub fn fold(&mut self, w: usize, b: u32, pending: bool, active: bool) {
        self.in_lr[w] &= !b;
        if pending {
            self.pending[w] |= b;
            self.latched[w] |= self.latched_in_lr[w] & b;
        }
        self.latched_in_lr[w] &= !b;
        if active {
            self.active[w] |= b;
        }
    }

    /// Marks the interrupts `mask` of word `w` out of any list register (the LRs were emptied;
    /// a latch that went into one with its pending state was consumed unless folded back).
    pub fn release_all(&mut self, w: usize, mask: u32) {
        self.in_lr[w] &= !mask;
        self.latched_in_lr[w] &= !mask;
    }

    /// Moves an interrupt's state into a list register: its active state, and its pending
    /// state when `pending` (the caller decided the guest can take it). Returns the LR's state
    /// bits as (pending, active).
    pub fn take(&mut self, w: usize, b: u32, pending: bool) -> (bool, bool) {
        let active = self.active[w] & b != 0;
        self.active[w] &= !b;
        if pending {
            self.pending[w] &= !b;
            self.latched_in_lr[w] |= self.latched[w] & b;
            self.latched[w] &= !b;
        }
        self.in_lr[w] |= b;
        (pending, active)
    }

    /// Whether the interrupt is a driven level-sensitive one (its LR asks for an EOI
    /// maintenance interrupt so the line can be resampled when the guest is done with it).
    pub fn is_level_driven(&self, w: usize, b: u32) -> bool {
        self.level_driven(w) & b != 0
    }

    /// Whether ICFGR may make it edge- or level-triggered.
    pub fn set_edge(&mut self, w: usize, edge: u32, writable: u32) {
        self.edge[w] = (self.edge[w] & !writable) | (edge & writable);
    }

    /// Interrupts of word `w` that want a list register and are not in one: active ones, and
    /// pending ones the guest can take.
    pub fn wanting_lr(&self, w: usize, groups: GroupEnables) -> u32 {
        let grp = (if groups.g1 { self.group[w] } else { 0 }) | (if groups.g0 { !self.group[w] } else { 0 });
        (self.active[w] | (self.pending[w] & self.enabled[w] & grp)) & !self.in_lr[w]
    }

    /// Whether a pending interrupt can be taken by the guest now.
    pub fn deliverable(&self, w: usize, b: u32, groups: GroupEnables) -> bool {
        let grp_enabled = if self.group[w] & b != 0 { groups.g1 } else { groups.g0 };
        self.pending[w] & self.enabled[w] & b != 0 && grp_enabled
    }
}

//! Test-only: a tiny flattened-device-tree writer, so tests can build exactly the (mal)formed
//! blob they need, and the header field offsets they corrupt.

/// Header field byte offsets (version 17 layout).
pub const OFF_TOTALSIZE: usize = 4;
pub const OFF_DT_STRUCT: usize = 8;
pub const OFF_DT_STRINGS: usize = 12;
pub const OFF_MEM_RSVMAP: usize = 16;
pub const OFF_VERSION: usize = 20;
pub const OFF_LAST_COMP: usize = 24;
pub const OFF_SIZE_DT_STRINGS: usize = 32;
pub const OFF_SIZE_DT_STRUCT: usize = 36;

/// Writes a device tree token by token.
#[derive(Default, Clone)]
pub struct FdtWriter {
    structs: Vec<u8>,
    strings: Vec<u8>,
    rsv: Vec<(u64, u64)>,
    boot_cpuid: u32,
    no_end: bool,
}

impl FdtWriter {
    pub fn new() -> Self {
        Self::default()
    }

    fn word(&mut self, w: u32) -> &mut Self {
        self.structs.extend_from_slice(&w.to_be_bytes());
        self
    }

    fn pad(&mut self) {
        while !self.structs.len().is_multiple_of(4) {
            self.structs.push(0);
        }
    }

    pub fn begin(&mut self, name: &str) -> &mut Self {
        self.begin_raw(name.as_bytes())
    }

    pub fn begin_raw(&mut self, name: &[u8]) -> &mut Self {
        self.word(1);
        self.structs.extend_from_slice(name);
        self.structs.push(0);
        self.pad();
        self
    }

    pub fn end(&mut self) -> &mut Self {
        self.word(2)
    }

    pub fn nop(&mut self) -> &mut Self {
        self.word(4)
    }

    pub fn raw_word(&mut self, w: u32) -> &mut Self {
        self.word(w)
    }

    /// The strings-block offset of `name`, adding it if new.
    pub fn name_offset(&mut self, name: &str) -> u32 {
        let mut needle = name.as_bytes().to_vec();
        needle.push(0);
        let mut start = 0;
        while start < self.strings.len() {
            let end = start + self.strings[start..].iter().position(|&b| b == 0).unwrap();
            if self.strings[start..=end] == needle[..] {
                return start as u32;
            }
            start = end + 1;
        }
        let off = self.strings.len() as u32;
        self.strings.extend_from_slice(&needle);
        off
    }

    pub fn prop_raw_nameoff(&mut self, nameoff: u32, value: &[u8]) -> &mut Self {
        self.word(3);
        self.word(value.len() as u32);
        self.word(nameoff);
        self.structs.extend_from_slice(value);
        self.pad();
        self
    }

    pub fn prop(&mut self, name: &str, value: &[u8]) -> &mut Self {
        let off = self.name_offset(name);
        self.prop_raw_nameoff(off, value)
    }

    pub fn prop_empty(&mut self, name: &str) -> &mut Self {
        self.prop(name, &[])
    }

    pub fn prop_u32(&mut self, name: &str, v: u32) -> &mut Self {
        self.prop(name, &v.to_be_bytes())
    }

    pub fn prop_cells(&mut self, name: &str, cells: &[u32]) -> &mut Self {
        let bytes: Vec<u8> = cells.iter().flat_map(|c| c.to_be_bytes()).collect();
        self.prop(name, &bytes)
    }

    /// A `reg` of (address, size) pairs in 2+2 cells.
    pub fn reg64(&mut self, name: &str, entries: &[(u64, u64)]) -> &mut Self {
        let cells: Vec<u32> = entries
            .iter()
            .flat_map(|&(a, s)| [(a >> 32) as u32, a as u32, (s >> 32) as u32, s as u32])
            .collect();
        self.prop_cells(name, &cells)
    }

    pub fn prop_str(&mut self, name: &str, s: &str) -> &mut Self {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        self.prop(name, &v)
    }

    pub fn prop_strs(&mut self, name: &str, list: &[&str]) -> &mut Self {
        let mut v = Vec::new();
        for s in list {
            v.extend_from_slice(s.as_bytes());
            v.push(0);
        }
        self.prop(name, &v)
    }

    pub fn memreserve(&mut self, address: u64, size: u64) -> &mut Self {
        self.rsv.push((address, size));
        self
    }

    pub fn boot_cpuid(&mut self, id: u32) -> &mut Self {
        self.boot_cpuid = id;
        self
    }

    /// Leave out the END token.
    pub fn without_end(&mut self) -> &mut Self {
        self.no_end = true;
        self
    }

    /// Header (40 bytes), memory reservation block, struct block (+END), strings block.
    pub fn build(&self) -> Vec<u8> {
        let mut structs = self.structs.clone();
        if !self.no_end {
            structs.extend_from_slice(&9u32.to_be_bytes());
        }
        let rsv_off = 40usize;
        let rsv_len = (self.rsv.len() + 1) * 16;
        let struct_off = rsv_off + rsv_len;
        let strings_off = struct_off + structs.len();
        let total = strings_off + self.strings.len();
        let mut out = Vec::with_capacity(total);
        for w in [
            0xd00d_feed,
            total as u32,
            struct_off as u32,
            strings_off as u32,
            rsv_off as u32,
            17,
            16,
            self.boot_cpuid,
            self.strings.len() as u32,
            structs.len() as u32,
        ] {
            out.extend_from_slice(&u32::to_be_bytes(w));
        }
        for &(a, s) in self.rsv.iter().chain(std::iter::once(&(0, 0))) {
            out.extend_from_slice(&a.to_be_bytes());
            out.extend_from_slice(&s.to_be_bytes());
        }
        out.extend_from_slice(&structs);
        out.extend_from_slice(&self.strings);
        out
    }
}

/// Reads the header word at `off`.
pub fn get_word(blob: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(blob[off..off + 4].try_into().unwrap())
}

/// Overwrites the header word at `off`.
pub fn set_word(blob: &mut [u8], off: usize, value: u32) {
    blob[off..off + 4].copy_from_slice(&value.to_be_bytes());
}

/// Writes the nodes every platform needs (root cells 2/2, 1 GiB at 0x40000000, two CPUs, PSCI
/// over SMC, a PL011 at 0x9000000, a GICv3), with `chosen` (if given) written inside /chosen.
pub fn platform_tree(w: &mut FdtWriter, chosen: impl FnOnce(&mut FdtWriter)) {
    w.begin("")
        .prop_u32("#address-cells", 2)
        .prop_u32("#size-cells", 2)
        .prop_str("compatible", "linux,dummy-virt");
    w.begin("psci")
        .prop_strs("compatible", &["arm,psci-1.0", "arm,psci-0.2", "arm,psci"])
        .prop_str("method", "smc")
        .end();
    w.begin("memory@40000000")
        .prop_str("device_type", "memory")
        .reg64("reg", &[(0x4000_0000, 0x4000_0000)])
        .end();
    w.begin("pl011@9000000")
        .prop_strs("compatible", &["arm,pl011", "arm,primecell"])
        .reg64("reg", &[(0x900_0000, 0x1000)])
        .end();
    w.begin("intc@8000000")
        .prop_str("compatible", "arm,gic-v3")
        .reg64("reg", &[(0x800_0000, 0x1_0000), (0x80a_0000, 0xf6_0000)])
        .end();
    w.begin("cpus").prop_u32("#address-cells", 1).prop_u32("#size-cells", 0);
    w.begin("cpu@0").prop_str("device_type", "cpu").prop_u32("reg", 0).end();
    w.begin("cpu@1").prop_str("device_type", "cpu").prop_u32("reg", 1).end();
    w.end();
    w.begin("chosen").prop_str("stdout-path", "/pl011@9000000");
    chosen(w);
    w.end();
    w.end();
}

/// [`platform_tree`] as a blob.
pub fn platform_blob(chosen: impl FnOnce(&mut FdtWriter)) -> Vec<u8> {
    let mut w = FdtWriter::new();
    platform_tree(&mut w, chosen);
    w.build()
}

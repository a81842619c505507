//! The device tree Labyrinth writes for a guest: what the guest may assume about its machine
//! (RAM, one cpu node per vCPU started through PSCI over HVC, the emulated PL011, its command
//! line and ramdisk). Only what Labyrinth really provides appears in it: the GICv3 (one
//! redistributor per vCPU) and the timer's interrupts only for a guest given a virtual GIC
//! (`vm::vgic`). It writes; it never decides what a guest gets.

use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;

use super::layout::{Layout, UART_BASE, UART_SIZE};
use super::vgic::{GICD_BASE, GICD_SIZE, GICR_BASE, GICR_SIZE, UART_INTID};
use crate::dt::SharedMem;
use crate::dt::MAX_VCPUS;

/// Why a device tree could not be written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FdtGenError {
    /// A vCPU count of 0 or above `dt::MAX_VCPUS` (the configuration refuses those first).
    VcpuCount { vcpus: usize },
    /// The writer refused (an internal limit: every input is checked).
    Writer,
}

impl From<vm_fdt::Error> for FdtGenError {
    fn from(_: vm_fdt::Error) -> Self {
        FdtGenError::Writer
    }
}

impl core::fmt::Display for FdtGenError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            FdtGenError::VcpuCount { vcpus } => write!(f, "{vcpus} vCPUs: a guest has 1 to {MAX_VCPUS}"),
            FdtGenError::Writer => f.write_str("the device-tree writer failed"),
        }
    }
}

const APB_PCLK_PHANDLE: u32 = 1;
const GIC_PHANDLE: u32 = 2;
/// Interrupt specifier cells (arm,gic-v3 binding): type, number, flags.
const GIC_SPI: u32 = 0;
const GIC_PPI: u32 = 1;
/// Level-sensitive, as QEMU's own GICv3 tree says for the timer and devices. The GICv2 binding's
/// PPI CPU mask (flag bits 15:8) has no meaning for a GICv3 and stays zero.
const IRQ_LEVEL_HIGH: u32 = 4;
/// The architected timer's PPIs in the order the arm,armv8-timer binding lists them: secure
/// physical, non-secure physical, virtual, hypervisor (INTIDs 29, 30, 27, 26).
const TIMER_PPIS: [u32; 4] = [13, 14, 11, 10];

/// The guest's redistributor region: one 128 KiB redistributor (RD and SGI frames) per vCPU,
/// contiguous from `GICR_BASE`, vCPU `i`'s at `GICR_BASE + i * GICR_SIZE`.
pub fn redistributor_region(vcpus: usize) -> (u64, u64) {
    (GICR_BASE, vcpus as u64 * GICR_SIZE)
}

// The largest redistributor region ends below the UART, the next thing in the guest's map.
const _: () = assert!(GICR_BASE + MAX_VCPUS as u64 * GICR_SIZE <= UART_BASE);

/// Writes the guest's device tree blob for `vcpus` vCPUs (cpu node `i` has `reg = <i>`, the
/// MPIDR Aff0 vCPU `i` reads). `resets` (how many times the guest was reset) goes to
/// `/chosen/labyrinth,reset-count`: a guest's RAM is fresh after a reset, so this is the only
/// way it can tell a reboot from a first boot. `gic`: the guest has a virtual GICv3, so the
/// tree describes it (one redistributor per vCPU), the architected timer's four PPIs and the
/// UART's SPI. `shared`: the static shared memory regions, described as Xen describes them
/// (Xen 4.19): each a bank of `/memory` and a `/reserved-memory/xen-shmem@ADDR` child
/// (`compatible = "xen,shared-memory-v1"`, `reg`, `xen,id`, `xen,offset` = 0), so that the
/// guest leaves it out of its own allocations and a driver finds it by its id.
pub fn generate(
    layout: &Layout,
    vcpus: usize,
    bootargs: Option<&str>,
    resets: u32,
    gic: bool,
    shared: &[SharedMem<'_>],
) -> Result<Vec<u8>, FdtGenError> {
    if !(1..=MAX_VCPUS).contains(&vcpus) {
        return Err(FdtGenError::VcpuCount { vcpus });
    }
    let mut w = vm_fdt::FdtWriter::new()?;
    let root = w.begin_node("")?;
    w.property_string("compatible", "linux,dummy-virt")?;
    w.property_u32("#address-cells", 2)?;
    w.property_u32("#size-cells", 2)?;
    if gic {
        w.property_u32("interrupt-parent", GIC_PHANDLE)?;
    }

    let chosen = w.begin_node("chosen")?;
    w.property_string("bootargs", bootargs.unwrap_or(""))?;
    w.property_string("stdout-path", "/pl011@9000000")?;
    w.property_u32("labyrinth,reset-count", resets)?;
    if let Some((start, size)) = layout.ramdisk {
        w.property_u64("linux,initrd-start", start)?;
        w.property_u64("linux,initrd-end", start + size)?;
    }
    w.end_node(chosen)?;

    let mem = w.begin_node(&node_name("memory", layout.ram_base))?;
    w.property_string("device_type", "memory")?;
    let mut banks = vec![layout.ram_base, layout.ram_size];
    for s in shared {
        banks.extend_from_slice(&[s.guest_addr, s.size]);
    }
    w.property_array_u64("reg", &banks)?;
    w.end_node(mem)?;

    if !shared.is_empty() {
        let resv = w.begin_node("reserved-memory")?;
        w.property_u32("#address-cells", 2)?;
        w.property_u32("#size-cells", 2)?;
        w.property_null("ranges")?;
        for s in shared {
            let shm = w.begin_node(&node_name("xen-shmem", s.guest_addr))?;
            w.property_string("compatible", "xen,shared-memory-v1")?;
            w.property_array_u64("reg", &[s.guest_addr, s.size])?;
            w.property_string("xen,id", s.id)?;
            // The offset in the owner's region a borrower's mapping starts at: always 0 here,
            // as in Xen (every guest maps the whole region).
            w.property_u64("xen,offset", 0)?;
            w.end_node(shm)?;
        }
        w.end_node(resv)?;
    }

    let cpus = w.begin_node("cpus")?;
    w.property_u32("#address-cells", 1)?;
    w.property_u32("#size-cells", 0)?;
    for i in 0..vcpus {
        let cpu = w.begin_node(&node_name("cpu", i as u64))?;
        w.property_string("device_type", "cpu")?;
        w.property_string("compatible", "arm,armv8")?;
        w.property_u32("reg", i as u32)?;
        w.property_string("enable-method", "psci")?;
        w.end_node(cpu)?;
    }
    w.end_node(cpus)?;

    let psci = w.begin_node("psci")?;
    w.property_string_list("compatible", vec!["arm,psci-1.0".to_string(), "arm,psci-0.2".to_string()])?;
    w.property_string("method", "hvc")?;
    w.end_node(psci)?;

    let clk = w.begin_node("apb-pclk")?;
    w.property_string("compatible", "fixed-clock")?;
    w.property_u32("#clock-cells", 0)?;
    w.property_u32("clock-frequency", 24_000_000)?;
    w.property_string("clock-output-names", "clk24mhz")?;
    w.property_phandle(APB_PCLK_PHANDLE)?;
    w.end_node(clk)?;

    let uart = w.begin_node(&node_name("pl011", UART_BASE))?;
    w.property_string_list("compatible", vec!["arm,pl011".to_string(), "arm,primecell".to_string()])?;
    w.property_array_u64("reg", &[UART_BASE, UART_SIZE])?;
    w.property_array_u32("clocks", &[APB_PCLK_PHANDLE, APB_PCLK_PHANDLE])?;
    w.property_string_list("clock-names", vec!["uartclk".to_string(), "apb_pclk".to_string()])?;
    if gic {
        // Linux's PL011 driver requests its interrupt when the console is opened; the model
        // never raises it (transmit always completes at once, nothing is ever received).
        w.property_array_u32("interrupts", &[GIC_SPI, UART_INTID - 32, IRQ_LEVEL_HIGH])?;
    }
    w.end_node(uart)?;

    if gic {
        let intc = w.begin_node(&node_name("intc", GICD_BASE))?;
        w.property_string("compatible", "arm,gic-v3")?;
        w.property_u32("#interrupt-cells", 3)?;
        w.property_null("interrupt-controller")?;
        w.property_u32("#redistributor-regions", 1)?;
        let (gicr_base, gicr_size) = redistributor_region(vcpus);
        w.property_array_u64("reg", &[GICD_BASE, GICD_SIZE, gicr_base, gicr_size])?;
        w.property_phandle(GIC_PHANDLE)?;
        w.end_node(intc)?;

        let timer = w.begin_node("timer")?;
        w.property_string("compatible", "arm,armv8-timer")?;
        let mut irqs = Vec::new();
        for ppi in TIMER_PPIS {
            irqs.extend_from_slice(&[GIC_PPI, ppi, IRQ_LEVEL_HIGH]);
        }
        w.property_array_u32("interrupts", &irqs)?;
        w.property_null("always-on")?;
        w.end_node(timer)?;
    }

    w.end_node(root)?;
    Ok(w.finish()?)
}

fn node_name(base: &str, unit: u64) -> String {
    use core::fmt::Write;
    let mut s = String::new();
    let _ = write!(s, "{base}@{unit:x}");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::image::ImageHeader;
    use crate::vm::layout::plan;

    #[test]
    fn the_guest_tree_describes_memory_cpus_psci_uart_and_chosen() {
        let k = ImageHeader { text_offset: 0x8_0000, effective_size: 0x10_0000 };
        let layout = plan(64 << 20, 40, &k, Some(0x1000)).unwrap();
        let blob = generate(&layout, 1, Some("console=ttyAMA0 stress.seed=3"), 2, false, &[]).unwrap();
        // Read it back with Labyrinth's own checked parser and with the fdt crate.
        let p = crate::dt::parse(&blob).unwrap();
        assert_eq!(p.memory()[0].base(), 0x4000_0000);
        assert_eq!(p.memory()[0].size(), 64 << 20);
        assert_eq!(p.cpus().len(), 1);
        assert_eq!(p.bootargs(), Some("console=ttyAMA0 stress.seed=3"));
        assert_eq!(p.uart().unwrap().region.base(), 0x0900_0000);
        assert_eq!(p.psci().unwrap().conduit, crate::dt::Conduit::Hvc);
        let f = fdt::Fdt::new(&blob).unwrap();
        let chosen = f.find_node("/chosen").unwrap();
        let start = chosen.property("linux,initrd-start").unwrap().as_usize().unwrap() as u64;
        assert_eq!(start, layout.ramdisk.unwrap().0);
        assert_eq!(chosen.property("labyrinth,reset-count").unwrap().as_usize(), Some(2));
    }

    #[test]
    fn a_virtual_gic_brings_the_gic_timer_and_uart_interrupt_nodes() {
        let k = ImageHeader { text_offset: 0, effective_size: 0x100_0000 };
        let layout = plan(128 << 20, 40, &k, None).unwrap();
        let without = generate(&layout, 1, None, 0, false, &[]).unwrap();
        let f = fdt::Fdt::new(&without).unwrap();
        assert!(f.find_compatible(&["arm,gic-v3"]).is_none(), "test kernels see no GIC");
        assert!(f.find_compatible(&["arm,armv8-timer"]).is_none());

        let blob = generate(&layout, 1, None, 0, true, &[]).unwrap();
        let f = fdt::Fdt::new(&blob).unwrap();
        let gic = f.find_compatible(&["arm,gic-v3"]).unwrap();
        assert_eq!(gic.property("#interrupt-cells").unwrap().as_usize(), Some(3));
        assert!(gic.property("interrupt-controller").is_some());
        let reg: Vec<_> =
            gic.reg().unwrap().map(|r| (r.starting_address as u64, r.size.unwrap() as u64)).collect();
        assert_eq!(reg, [(0x0800_0000, 0x1_0000), (0x080a_0000, 0x2_0000)]);
        let phandle = gic.property("phandle").unwrap().as_usize().unwrap();
        assert_eq!(f.find_node("/").unwrap().property("interrupt-parent").unwrap().as_usize(), Some(phandle));
        let timer = f.find_compatible(&["arm,armv8-timer"]).unwrap();
        let cells: Vec<u32> = timer
            .property("interrupts")
            .unwrap()
            .value
            .chunks(4)
            .map(|c| u32::from_be_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(cells, [1, 13, 4, 1, 14, 4, 1, 11, 4, 1, 10, 4], "PPI 11 = INTID 27, the virtual timer");
        let uart = f.find_compatible(&["arm,pl011"]).unwrap();
        let cells: Vec<u32> = uart
            .property("interrupts")
            .unwrap()
            .value
            .chunks(4)
            .map(|c| u32::from_be_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(cells, [0, 1, 4], "SPI 1");
        // Labyrinth's own checked parser accepts it and finds the GIC.
        let p = crate::dt::parse(&blob).unwrap();
        assert_eq!(p.gic().unwrap().distributor.base(), 0x0800_0000);
    }

    fn cells(prop: &[u8]) -> Vec<u32> {
        prop.chunks(4).map(|c| u32::from_be_bytes(c.try_into().unwrap())).collect()
    }

    #[test]
    fn one_cpu_node_and_one_redistributor_per_vcpu() {
        let k = ImageHeader { text_offset: 0, effective_size: 0x100_0000 };
        let layout = plan(128 << 20, 40, &k, None).unwrap();
        for vcpus in [1, 2, 3, 4, MAX_VCPUS] {
            let blob = generate(&layout, vcpus, Some("console=ttyAMA0"), 0, true, &[]).unwrap();
            let f = fdt::Fdt::new(&blob).unwrap();
            let cpus: Vec<_> = f.find_node("/cpus").unwrap().children().collect();
            assert_eq!(cpus.len(), vcpus);
            for (i, cpu) in cpus.iter().enumerate() {
                assert_eq!(cpu.name, alloc::format!("cpu@{i:x}"));
                assert_eq!(cpu.property("reg").unwrap().as_usize(), Some(i), "reg = MPIDR Aff0 = vCPU index");
                assert_eq!(cpu.property("enable-method").unwrap().as_str(), Some("psci"));
                assert_eq!(cpu.property("device_type").unwrap().as_str(), Some("cpu"));
                assert_eq!(cpu.compatible().unwrap().first(), "arm,armv8");
            }
            let psci = f.find_node("/psci").unwrap();
            assert_eq!(psci.property("method").unwrap().as_str(), Some("hvc"));
            assert!(psci.compatible().unwrap().all().any(|c| c == "arm,psci-1.0"));

            let gic = f.find_compatible(&["arm,gic-v3"]).unwrap();
            assert_eq!(gic.property("#redistributor-regions").unwrap().as_usize(), Some(1));
            let reg: Vec<_> =
                gic.reg().unwrap().map(|r| (r.starting_address as u64, r.size.unwrap() as u64)).collect();
            assert_eq!(
                reg,
                [(0x0800_0000, 0x1_0000), (0x080a_0000, vcpus as u64 * 128 * 1024)],
                "{vcpus} vCPUs"
            );
            let timer = f.find_compatible(&["arm,armv8-timer"]).unwrap();
            assert_eq!(
                cells(timer.property("interrupts").unwrap().value),
                [1, 13, 4, 1, 14, 4, 1, 11, 4, 1, 10, 4]
            );

            // Labyrinth's own checked parser reads the same CPUs and redistributor region.
            let p = crate::dt::parse(&blob).unwrap();
            let mpidrs: Vec<u64> = p.cpus().iter().map(|c| c.mpidr).collect();
            assert_eq!(mpidrs, (0..vcpus as u64).collect::<Vec<_>>());
            let gic = p.gic().unwrap();
            assert_eq!(gic.redistributors.len(), 1);
            assert_eq!(gic.redistributors[0].size(), vcpus as u64 * 0x2_0000);
        }
    }

    #[test]
    fn a_vcpu_count_the_configuration_refuses_is_refused_here_too() {
        let k = ImageHeader { text_offset: 0, effective_size: 0x10_0000 };
        let layout = plan(64 << 20, 40, &k, None).unwrap();
        assert_eq!(generate(&layout, 0, None, 0, true, &[]), Err(FdtGenError::VcpuCount { vcpus: 0 }));
        let e = generate(&layout, MAX_VCPUS + 1, None, 0, false, &[]).unwrap_err();
        assert_eq!(e, FdtGenError::VcpuCount { vcpus: 17 });
        assert_eq!(e.to_string(), "17 vCPUs: a guest has 1 to 16");
        assert!(generate(&layout, MAX_VCPUS, None, 0, false, &[]).is_ok());
    }

    // Shared memory appears as Xen 4.19 writes it: a /memory bank and a /reserved-memory child
    // with its id and offset; Labyrinth's own parser and the fdt crate both read it back.
    #[test]
    fn shared_memory_is_described_as_xen_does() {
        use crate::dt::ShmRole;
        let k = ImageHeader { text_offset: 0, effective_size: 0x10_0000 };
        let layout = plan(64 << 20, 40, &k, None).unwrap();
        let shared = [
            SharedMem {
                id: "ring",
                role: ShmRole::Owner,
                guest_addr: 0x1000_0000,
                size: 0x20_0000,
                host_addr: None,
                node: "n",
            },
            SharedMem {
                id: "b",
                role: ShmRole::Borrower,
                guest_addr: 0x8000_0000,
                size: 0x1000,
                host_addr: Some(0x6000_0000),
                node: "m",
            },
        ];
        let blob = generate(&layout, 1, None, 0, false, &shared).unwrap();
        let p = crate::dt::parse(&blob).unwrap();
        let banks: Vec<_> = p.memory().iter().map(|r| (r.base(), r.size())).collect();
        assert!(
            banks.contains(&(0x4000_0000, 64 << 20)) && banks.contains(&(0x1000_0000, 0x20_0000)),
            "{banks:x?}"
        );
        let resv: Vec<_> = p
            .reserved_memory()
            .iter()
            .map(|r| (r.name, r.region.base(), r.region.size(), r.no_map))
            .collect();
        assert_eq!(
            resv,
            [
                ("xen-shmem@10000000", 0x1000_0000, 0x20_0000, false),
                ("xen-shmem@80000000", 0x8000_0000, 0x1000, false)
            ]
        );
        let f = fdt::Fdt::new(&blob).unwrap();
        let node = f.find_node("/reserved-memory/xen-shmem@10000000").unwrap();
        assert_eq!(node.compatible().unwrap().first(), "xen,shared-memory-v1");
        assert_eq!(node.property("xen,id").unwrap().as_str(), Some("ring"));
        assert_eq!(node.property("xen,offset").unwrap().value, [0u8; 8]);
        assert!(f.find_node("/reserved-memory").unwrap().property("ranges").is_some());
        // No shared memory: no /reserved-memory at all.
        let blob = generate(&layout, 1, None, 0, false, &[]).unwrap();
        assert!(fdt::Fdt::new(&blob).unwrap().find_node("/reserved-memory").is_none());
    }

    #[test]
    fn a_bare_guest_with_two_vcpus_has_cpus_and_psci_but_no_gic() {
        let k = ImageHeader { text_offset: 0, effective_size: 0x10_0000 };
        let layout = plan(64 << 20, 40, &k, None).unwrap();
        let blob = generate(&layout, 2, None, 0, false, &[]).unwrap();
        let f = fdt::Fdt::new(&blob).unwrap();
        assert_eq!(f.find_node("/cpus").unwrap().children().count(), 2);
        assert!(f.find_compatible(&["arm,gic-v3"]).is_none());
        assert!(f.find_compatible(&["arm,armv8-timer"]).is_none());
        assert!(f.find_node("/").unwrap().property("interrupt-parent").is_none());
        assert!(f.find_compatible(&["arm,pl011"]).unwrap().property("interrupts").is_none());
    }
}

use super::lr::LR_STATE;
use super::*;

const D: Frame = Frame::Distributor;
const RD0: Frame = Frame::Redistributor { vcpu: 0 };
const SGI0: Frame = Frame::Sgi { vcpu: 0 };

fn rd(vcpu: usize) -> Frame {
    Frame::Redistributor { vcpu }
}

fn sgi_frame(vcpu: usize) -> Frame {
    Frame::Sgi { vcpu }
}

/// A GIC of one vCPU, as the single-vCPU guests had.
fn one() -> VGic {
    VGic::new(1).unwrap()
}

/// What Linux's irq-gic-v3 does before it takes interrupts, on every vCPU: enable the
/// distributor with affinity routing, wake each redistributor, group 1 and a priority for
/// everything; then its drivers enable the SPIs they request (here all of them).
fn linux_like(vcpus: usize) -> VGic {
    let g = VGic::new(vcpus).unwrap();
    assert!(g
        .write(D, 0, 4, u64::from(regs::CTLR_ARE | regs::CTLR_ENABLE_G1 | regs::CTLR_ENABLE_G0))
        .is_some());
    for v in 0..vcpus {
        assert!(g.write(rd(v), 0x14, 4, 0).is_some());
        assert!(g.write(sgi_frame(v), 0x80, 4, 0xffff_ffff).is_some());
        for off in (0x400..0x420).step_by(4) {
            assert!(g.write(sgi_frame(v), off, 4, 0xa0a0_a0a0).is_some());
        }
    }
    assert!(g.write(D, 0x84, 4, 0xffff_ffff).is_some());
    assert!(g.write(D, 0x88, 4, 0xffff_ffff).is_some());
    assert!(g.write(D, 0x104, 4, 0xffff_ffff).is_some());
    assert!(g.write(D, 0x108, 4, 0xffff_ffff).is_some());
    for off in (0x420..0x460).step_by(4) {
        assert!(g.write(D, off, 4, 0xa0a0_a0a0).is_some());
    }
    g
}

/// The model's state, for comparisons.
fn snapshot(g: &VGic) -> (Distributor, Vec<Redistributor>, Vec<bool>) {
    (
        g.dist.lock().clone(),
        g.redists.iter().map(|r| r.lock().clone()).collect(),
        (0..MAX_VCPUS).map(|v| g.has_mail(v)).collect(),
    )
}

fn intids(lrs: &[u64]) -> Vec<u32> {
    let mut v: Vec<u32> = lrs.iter().filter(|&&l| l & LR_STATE != 0).map(|&l| l as u32).collect();
    v.sort();
    v
}

#[test]
fn identification_as_linux_probes_it() {
    let g = one();
    assert_eq!(g.read(D, 0xffe8, 4), Some(0x3b), "GICD_PIDR2.ArchRev must say GICv3");
    assert_eq!(g.read(RD0, 0xffe8, 4).map(|v| v & 0xf0), Some(0x30));
    let typer = g.read(D, 4, 4).unwrap();
    assert_eq!(typer & 0x1f, 2, "96 INTIDs: ITLinesNumber 2");
    assert_eq!((typer >> 19) & 0x1f, 15);
    assert_eq!(typer & (1 << 17), 0, "no LPIs");
    let ctlr = g.read(D, 0, 4).unwrap();
    assert_ne!(ctlr & u64::from(regs::CTLR_DS), 0);
    assert_ne!(ctlr & u64::from(regs::CTLR_ARE), 0);
    assert_eq!(ctlr & 1 << 31, 0, "RWP never set");
}

#[test]
fn new_refuses_no_vcpus_or_too_many() {
    assert!(VGic::new(0).is_none());
    assert!(VGic::new(MAX_VCPUS + 1).is_none());
    assert_eq!(VGic::new(MAX_VCPUS).map(|g| g.vcpus()), Some(MAX_VCPUS));
}

#[test]
fn redistributor_typer_says_last_with_the_vcpu_affinity() {
    let g = one();
    let t = g.read(RD0, 8, 8).unwrap();
    assert_eq!(t >> 32, 0);
    assert_ne!(t & (1 << 4), 0, "Last");
    assert_eq!(t & 1, 0, "no physical LPIs");
    assert_eq!(g.read(RD0, 8, 4), Some(t & 0xffff_ffff));
    assert_eq!(g.read(RD0, 0xc, 4), Some(t >> 32));
}

#[test]
fn one_redistributor_per_vcpu_with_its_affinity_and_last_on_the_last() {
    let g = VGic::new(4).unwrap();
    for v in 0..4 {
        let t = g.read(rd(v), 8, 8).unwrap();
        assert_eq!(t >> 32, v as u64, "Aff0 = vCPU index, Aff1..3 = 0");
        assert_eq!((t >> 8) & 0xffff, v as u64, "Processor_Number");
        assert_eq!(t & (1 << 4) != 0, v == 3, "Last only on vCPU 3");
    }
    assert_eq!(g.read(rd(4), 8, 8), None, "no fifth redistributor");
    assert!(g.write(sgi_frame(4), 0x100, 4, 1).is_none());
}

#[test]
fn redistributors_are_laid_out_contiguously() {
    assert_eq!(frame_of(0x080a_0014, 1), Some((RD0, 0x14)));
    assert_eq!(frame_of(0x080b_0100, 1), Some((SGI0, 0x100)));
    assert_eq!(frame_of(0x080c_0000, 1), None, "only one redistributor");
    assert_eq!(frame_of(0x080c_0008, 3), Some((rd(1), 8)));
    assert_eq!(frame_of(0x080d_fffc, 3), Some((sgi_frame(1), 0xfffc)));
    assert_eq!(frame_of(0x080e_0000, 3), Some((rd(2), 0)));
    assert_eq!(frame_of(0x0810_0000, 3), None, "past the third");
    assert_eq!(frame_of(0x081a_0000 - 4, 8), Some((sgi_frame(7), 0xfffc)));
    let past_the_last = GICR_BASE + MAX_VCPUS as u64 * GICR_SIZE;
    assert_eq!(frame_of(past_the_last - 4, 99), Some((sgi_frame(MAX_VCPUS - 1), 0xfffc)));
    assert_eq!(frame_of(past_the_last, 99), None, "never more than MAX_VCPUS");
    assert_eq!(frame_of(0x0800_0004, 2), Some((D, 4)));
    assert_eq!(frame_of(0x0801_0000, 2), None);
    assert_eq!(frame_of(0x0809_ffff, 2), None);
    assert_eq!(gicr_region_size(3), 0x6_0000);
}

#[test]
fn any_vcpu_may_reach_another_vcpus_redistributor() {
    let g = linux_like(2);
    // vCPU 0 enables and pends PPI 20 in vCPU 1's SGI frame: vCPU 1 must sync.
    assert_eq!(g.write(sgi_frame(1), 0x100, 4, 1 << 20), Some(VcpuSet::only(1)));
    assert_eq!(g.write(sgi_frame(1), 0x200, 4, 1 << 20), Some(VcpuSet::only(1)));
    assert!(g.is_pending(1, 20) && !g.is_pending(0, 20));
    let mut lrs = [0u64; 4];
    assert!(!g.sync_lrs(0, &mut lrs));
    assert_eq!(intids(&lrs), [] as [u32; 0]);
    g.sync_lrs(1, &mut lrs);
    assert_eq!(intids(&lrs), [20]);
}

#[test]
fn waker_children_follow_processor_sleep() {
    let g = VGic::new(2).unwrap();
    assert_eq!(g.read(RD0, 0x14, 4), Some(0b110));
    g.write(RD0, 0x14, 4, 0);
    assert_eq!(g.read(RD0, 0x14, 4), Some(0));
    assert_eq!(g.read(rd(1), 0x14, 4), Some(0b110), "each redistributor wakes on its own");
}

#[test]
fn enable_set_and_clear_registers() {
    let g = one();
    g.write(D, 0x104, 4, 0b1010); // SPIs 1 and 3 (INTIDs 33, 35)
    assert!(g.is_enabled(0, 33) && g.is_enabled(0, 35) && !g.is_enabled(0, 34));
    g.write(D, 0x184, 4, 0b1000);
    assert_eq!(g.read(D, 0x104, 4), Some(0b10));
    assert_eq!(g.read(D, 0x184, 4), Some(0b10), "ICENABLER reads the enables too");
    g.write(SGI0, 0x100, 4, 1 << 27);
    assert!(g.is_enabled(0, 27));
    // INTIDs 0-31 through the distributor are RAZ/WI under affinity routing.
    g.write(D, 0x100, 4, 1 << 26);
    assert!(!g.is_enabled(0, 26));
    assert_eq!(g.read(D, 0x100, 4), Some(0));
}

#[test]
fn pending_and_active_through_mmio() {
    let g = one();
    g.write(SGI0, 0x200, 4, 1 << 3);
    assert!(g.is_pending(0, 3));
    g.write(SGI0, 0x280, 4, 1 << 3);
    assert!(!g.is_pending(0, 3));
    g.write(D, 0x304, 4, 1);
    assert_eq!(g.read(D, 0x304, 4), Some(1));
    g.write(D, 0x384, 4, 1);
    assert_eq!(g.read(D, 0x304, 4), Some(0));
}

#[test]
fn priorities_by_byte_and_word() {
    let g = one();
    g.write(D, 0x421, 1, 0x80); // INTID 33
    assert_eq!(g.read(D, 0x420, 4), Some(0x8000));
    g.write(SGI0, 0x418, 4, 0x1122_3344); // INTIDs 24-27
    assert_eq!(g.read(SGI0, 0x41b, 1), Some(0x11));
    assert_eq!(g.redists[0].lock().irqs.priority[0][27], 0x11);
    assert_eq!(g.read(D, 0x418, 4), Some(0), "the distributor's view of INTIDs 0-31 is RAZ");
}

#[test]
fn config_sgis_stay_edge_spis_writable() {
    let g = one();
    g.write(SGI0, 0xc00, 4, 0);
    assert_eq!(g.read(SGI0, 0xc00, 4), Some(0xaaaa_aaaa));
    assert_eq!(g.read(SGI0, 0xc04, 4), Some(0), "PPIs level at reset");
    g.write(SGI0, 0xc04, 4, 0xffff_ffff);
    assert_eq!(g.read(SGI0, 0xc04, 4), Some(0xaaaa_aaaa));
    g.write(D, 0xc08, 4, 0xffff_ffff);
    assert_eq!(g.read(D, 0xc08, 4), Some(0xaaaa_aaaa));
    g.write(D, 0xc14, 4, 0x8);
    assert_eq!(g.read(D, 0xc14, 4), Some(0x8), "SPI 81 (INTID 81 = 16 * 5 + 1)");
    assert_eq!(g.dist.lock().spis.edge[1], 1 << (81 - 64));
}

#[test]
fn irouter_64_and_32_bit() {
    let g = one();
    assert!(g.write(D, 0x6100 + 8, 8, 0xff_0000_0102).is_some());
    assert_eq!(g.read(D, 0x6108, 8), Some(0xff_0000_0102));
    assert!(g.write(D, 0x6108, 4, 0x3).is_some());
    assert_eq!(g.read(D, 0x6108, 8), Some(0xff_0000_0003));
    assert!(g.write(D, 0x610c, 4, 0x12).is_some());
    assert_eq!(g.read(D, 0x6108, 8), Some(0x12_0000_0003), "the upper half alone");
    assert_eq!(g.read(D, 0x610c, 4), Some(0x12));
    assert_eq!(g.read(D, 0x6008, 8), Some(0), "no IROUTER for INTIDs below 32");
}

#[test]
fn bad_sizes_and_alignment_are_refused() {
    let g = one();
    assert_eq!(g.read(D, 2, 4), None);
    assert_eq!(g.read(D, 0, 2), None);
    assert_eq!(g.read(D, 0x100, 1), None, "bytes only for priorities");
    assert_eq!(g.read(D, 0x100, 8), None);
    assert!(g.write(SGI0, 0x100, 8, 0).is_none());
    assert!(g.read(D, 0x401, 1).is_some());
    assert!(g.read(RD0, 8, 8).is_some());
}

#[test]
fn unknown_offsets_read_zero_and_ignore_writes() {
    let g = linux_like(2);
    let before = snapshot(&g);
    for off in [0x10u64, 0x40, 0x800, 0xd00, 0xe00, 0xf00, 0x5000, 0xfffc] {
        assert_eq!(g.read(D, off, 4), Some(0), "{off:#x}");
        assert_eq!(g.write(D, off, 4, 0xffff_ffff), Some(VcpuSet::EMPTY));
    }
    assert!(g.write(RD0, 0x70, 8, u64::MAX).is_some());
    assert_eq!(g.read(RD0, 0x70, 8), Some(0));
    assert!(snapshot(&g) == before);
    // Every aligned word of all the frames is answered without panicking.
    let scratch = linux_like(2);
    for frame in [D, RD0, SGI0, rd(1), sgi_frame(1)] {
        for off in (0..0x1_0000).step_by(4) {
            let _ = g.read(frame, off, 4);
            assert!(scratch.write(frame, off, 4, u64::MAX).is_some());
        }
    }
}

#[test]
fn a_raised_enabled_interrupt_goes_to_a_free_lr_and_leaves_the_model() {
    let g = linux_like(1);
    g.write(SGI0, 0x100, 4, 1 << VTIMER_INTID);
    assert_eq!(g.raise(0, VTIMER_INTID), Some(0));
    let mut lrs = [0u64; 4];
    assert!(!g.sync_lrs(0, &mut lrs));
    assert_eq!(lrs[0], LR_PENDING | LR_GROUP1 | (0xa0 << 48) | 27);
    assert!(!g.is_pending(0, VTIMER_INTID), "the LR owns it now");
    assert_eq!(&lrs[1..], &[0, 0, 0]);
}

#[test]
fn disabled_or_group_disabled_interrupts_wait() {
    let g = linux_like(1);
    g.raise(0, VTIMER_INTID);
    let mut lrs = [0u64; 4];
    assert!(!g.sync_lrs(0, &mut lrs), "disabled: not deliverable, not left out");
    assert_eq!(lrs, [0; 4]);
    assert!(g.is_pending(0, VTIMER_INTID));
    g.write(SGI0, 0x100, 4, 1 << VTIMER_INTID);
    assert_eq!(g.write(D, 0, 4, 0), Some(VcpuSet::only(0)), "group enables concern every vCPU");
    g.sync_lrs(0, &mut lrs);
    assert_eq!(lrs, [0; 4]);
    g.write(D, 0, 4, u64::from(regs::CTLR_ENABLE_G1));
    g.sync_lrs(0, &mut lrs);
    assert_eq!(lrs[0] & 0xffff_ffff, 27);
}

#[test]
fn fold_takes_back_what_the_guest_has_not_completed() {
    let g = linux_like(1);
    g.write(SGI0, 0x100, 4, 0xffff_ffff);
    g.raise(0, 1);
    g.raise(0, VTIMER_INTID);
    let mut lrs = [0u64; 4];
    g.sync_lrs(0, &mut lrs);
    // The guest acknowledged the timer (active) and completed SGI 1 (LR invalid).
    let timer = lrs.iter().position(|l| l & 0xffff_ffff == 27).unwrap();
    let sgi = lrs.iter().position(|l| l & 0xffff_ffff == 1).unwrap();
    lrs[timer] = (lrs[timer] & !LR_PENDING) | LR_ACTIVE;
    lrs[sgi] &= !LR_STATE;
    g.sync_lrs(0, &mut lrs);
    assert_eq!(lrs[0], LR_ACTIVE | LR_GROUP1 | (0xa0 << 48) | 27, "still active, back in an LR");
    assert_eq!(&lrs[1..], &[0, 0, 0]);
    assert!(!g.is_pending(0, 1) && !g.is_pending(0, 27));
    assert_eq!(g.read(SGI0, 0x300, 4), Some(0), "the active state is the LR's, not the model's");
    // Raised again while active: in one LR as pending and active.
    g.raise(0, VTIMER_INTID);
    g.sync_lrs(0, &mut lrs);
    assert_eq!(lrs[0] >> 62, 0b11);
    assert_eq!(lrs[1], 0);
}

#[test]
fn overflow_is_reported_and_priority_decides() {
    let g = linux_like(1);
    g.write(SGI0, 0x100, 4, 0xffff);
    g.write(SGI0, 0x404, 4, 0x1010_1010); // SGIs 4-7 most urgent
    for i in 0..8 {
        g.raise(0, i);
    }
    let mut lrs = [0u64; 4];
    assert!(g.sync_lrs(0, &mut lrs), "four left over");
    assert_eq!(intids(&lrs), [4, 5, 6, 7]);
    // The guest completes two: two more go in, two still wait.
    lrs[0] = 0;
    lrs[2] = 0;
    assert!(g.sync_lrs(0, &mut lrs));
    assert_eq!(intids(&lrs), [0, 1, 5, 7]);
}

#[test]
fn raising_unknown_intids_or_vcpus_is_ignored() {
    let g = one();
    let before = snapshot(&g);
    assert_eq!(g.raise(0, NR_IRQS as u32), None);
    assert_eq!(g.raise(0, 1023), None);
    assert_eq!(g.raise(0, u32::MAX), None);
    assert_eq!(g.raise(1, 3), None, "no vCPU 1");
    assert_eq!(g.raise_spi(3), None, "not an SPI");
    assert_eq!(g.set_line_level(0, 5, true), None, "SGIs have no line");
    assert_eq!(g.set_line_level(0, 500, true), None);
    assert!(!g.sync_lrs(3, &mut [0; 4]));
    assert!(snapshot(&g) == before);
}

// --- SGIs between vCPUs --------------------------------------------------------------------

const IRM: u64 = 1 << 40;

fn sgir(intid: u64, list: u64) -> u64 {
    (intid << 24) | list
}

#[test]
fn sgi_decoding() {
    // (sender, value, vCPUs, INTID, targets)
    let table: &[(usize, u64, usize, u32, u32)] = &[
        (0, sgir(5, 1), 1, 5, 0b1),                           // to self
        (0, sgir(5, 2), 1, 5, 0),                             // Aff0 = 1: no such vCPU
        (0, sgir(5, 0b1110), 4, 5, 0b1110),                   // a list
        (2, sgir(15, 0b1111), 4, 15, 0b1111),                 // the sender among them
        (0, sgir(3, 0xffff), 3, 3, 0b111),                    // beyond the last vCPU: dropped
        (1, sgir(5, 0) | IRM, 4, 5, 0b1101),                  // all but self
        (0, sgir(5, 0xffff) | IRM, 1, 5, 0),                  // all but self, alone: no one
        (3, sgir(7, 0) | IRM | (1 << 16), 8, 7, 0b1111_0111), // IRM ignores the affinity fields
        (0, sgir(5, 1) | (1 << 16), 4, 5, 0),                 // Aff1 = 1: nobody here
        (0, sgir(5, 1) | (1 << 32), 4, 5, 0),                 // Aff2 = 1
        (0, sgir(5, 1) | (1 << 48), 4, 5, 0),                 // Aff3 = 1
        (0, sgir(5, 1) | (1 << 44), 8, 5, 0),                 // RS 1: Aff0 16
        (0, sgir(9, 0xff) | (0xf << 44), 8, 9, 0),            // RS 15: Aff0 240-247
        (0, (0xff << 56) | sgir(4, 1), 2, 4, 0b1),            // RES0 bits above Aff3 ignored
        (0, sgir(0xf, 0b1000_0000), 8, 15, 0b1000_0000),      // vCPU 7
    ];
    for &(sender, value, vcpus, intid, targets) in table {
        let (i, t) = sgi_targets(sender, value, vcpus);
        assert_eq!((i, t.bits()), (intid, targets), "sender {sender}, value {value:#x}, {vcpus} vCPUs");
    }
}

#[test]
fn a_cross_vcpu_sgi_goes_through_the_mailbox_to_the_targets_lrs_only() {
    let g = linux_like(3);
    for v in 0..3 {
        g.write(sgi_frame(v), 0x100, 4, 0xffff);
    }
    let targets = g.send_sgi(0, sgir(6, 0b110));
    assert_eq!(targets, VcpuSet::only(1).with(2));
    assert!(g.has_mail(1) && g.has_mail(2) && !g.has_mail(0));
    assert!(!g.is_pending(1, 6), "in flight: the model has not seen it yet");
    let mut lrs = [[0u64; 4]; 3];
    for (v, l) in lrs.iter_mut().enumerate() {
        g.sync_lrs(v, l);
    }
    assert_eq!(intids(&lrs[0]), [] as [u32; 0], "not the sender's");
    assert_eq!(intids(&lrs[1]), [6]);
    assert_eq!(intids(&lrs[2]), [6]);
    assert!(!g.has_mail(1) && !g.is_pending(1, 6), "drained into the LR");
    // Sent twice before the target syncs: one pending SGI, as on a GIC.
    g.send_sgi(2, sgir(3, 0b1));
    g.send_sgi(1, sgir(3, 0b1));
    g.sync_lrs(0, &mut lrs[0]);
    assert_eq!(intids(&lrs[0]), [3]);
    // Sent again while the previous one is in an LR: they merge there.
    g.send_sgi(1, sgir(3, 0b1));
    g.sync_lrs(0, &mut lrs[0]);
    assert_eq!(intids(&lrs[0]), [3]);
    assert_eq!(lrs[0].iter().filter(|&&l| l & LR_STATE != 0).count(), 1);
}

#[test]
fn a_disabled_sgi_waits_in_the_targets_model() {
    let g = linux_like(2);
    g.send_sgi(0, sgir(2, 0b10));
    let mut lrs = [0u64; 4];
    assert!(!g.sync_lrs(1, &mut lrs));
    assert_eq!(lrs, [0; 4]);
    assert!(g.is_pending(1, 2), "drained into vCPU 1's redistributor");
    assert_eq!(g.read(sgi_frame(1), 0x200, 4), Some(1 << 2));
    g.write(sgi_frame(1), 0x100, 4, 1 << 2);
    g.sync_lrs(1, &mut lrs);
    assert_eq!(intids(&lrs), [2]);
}

#[test]
fn reset_forgets_everything_in_flight() {
    let g = linux_like(2);
    g.send_sgi(0, sgir(2, 0b10));
    g.raise_spi(40);
    g.reset();
    let fresh = VGic::new(2).unwrap();
    assert!(snapshot(&g) == snapshot(&fresh));
}

// --- SPIs and their routing ----------------------------------------------------------------

fn route(g: &VGic, intid: u64, value: u64) -> VcpuSet {
    g.write(D, 0x6000 + 8 * intid, 8, value).unwrap()
}

#[test]
fn spis_follow_irouter() {
    let g = linux_like(4);
    assert_eq!(g.raise_spi(UART_INTID), Some(0), "IROUTER resets to vCPU 0");
    assert_eq!(route(&g, 33, 2), VcpuSet::only(0).with(2), "old and new owners resync");
    assert_eq!(g.raise_spi(UART_INTID), Some(2));
    let mut lrs = [[0u64; 4]; 4];
    for (v, l) in lrs.iter_mut().enumerate() {
        g.sync_lrs(v, l);
    }
    assert_eq!(intids(&lrs[2]), [33]);
    assert!(lrs.iter().enumerate().all(|(v, l)| v == 2 || intids(l).is_empty()), "in vCPU 2's LRs only");
    // Routed nowhere (Aff1 set, or a vCPU that does not exist): stays pending.
    route(&g, 40, 1 << 8);
    route(&g, 41, 7);
    assert_eq!(g.raise_spi(40), None);
    assert_eq!(g.raise_spi(41), None);
    for (v, l) in lrs.iter_mut().enumerate() {
        g.sync_lrs(v, l);
        assert!(!intids(l).contains(&40) && !intids(l).contains(&41));
    }
    assert!(g.is_pending(0, 40) && g.is_pending(0, 41));
    // IRM = 1 ("any"): vCPU 0.
    assert_eq!(route(&g, 41, 1 << 31), VcpuSet::only(0));
    g.sync_lrs(0, &mut lrs[0]);
    assert!(intids(&lrs[0]).contains(&41));
}

#[test]
fn enabling_a_pending_spi_names_its_owner() {
    let g = linux_like(3);
    g.write(D, 0x184, 4, 1 << 4); // disable SPI 4 (INTID 36)
    route(&g, 36, 1);
    g.raise_spi(36);
    assert_eq!(g.write(D, 0x104, 4, 1 << 4), Some(VcpuSet::only(1)));
    assert_eq!(g.write(D, 0x424, 1, 0x10), Some(VcpuSet::only(1)), "its priority too");
}

#[test]
fn an_acknowledged_spi_stays_with_its_vcpu_when_rerouted() {
    let g = linux_like(2);
    route(&g, 34, 1);
    g.raise_spi(34);
    let mut lrs = [[0u64; 4]; 2];
    g.sync_lrs(1, &mut lrs[1]);
    assert_eq!(intids(&lrs[1]), [34]);
    // The guest on vCPU 1 acknowledges it, moves it to vCPU 0, and it fires again.
    lrs[1][0] = (lrs[1][0] & !LR_PENDING) | LR_ACTIVE;
    route(&g, 34, 0);
    assert_eq!(g.raise_spi(34), Some(1), "vCPU 1 holds it");
    g.sync_lrs(0, &mut lrs[0]);
    assert!(intids(&lrs[0]).is_empty(), "not in two vCPUs' LRs");
    g.sync_lrs(1, &mut lrs[1]);
    assert_eq!(lrs[1][0] >> 62, 0b11, "active and pending on vCPU 1");
    // Completed on vCPU 1: the pending state then goes where IROUTER points.
    lrs[1][0] &= !LR_ACTIVE;
    lrs[1][0] &= !LR_PENDING;
    g.sync_lrs(1, &mut lrs[1]);
    assert!(intids(&lrs[1]).is_empty());
    // It had been pending in that LR and the guest took it; raise again for vCPU 0.
    assert_eq!(g.raise_spi(34), Some(0));
    g.sync_lrs(0, &mut lrs[0]);
    assert_eq!(intids(&lrs[0]), [34]);
}

// --- Level-sensitive lines and the timers ----------------------------------------------------

#[test]
fn a_masked_timer_that_fires_then_is_disabled_is_not_taken_when_unmasked() {
    use crate::vm::vtimer;
    let g = linux_like(2);
    let (v, cval) = (1, 1000);
    let mut ctl = vtimer::CTL_ENABLE;
    let mut lrs = [0u64; 4];
    // The guest masks PPI 27 in its redistributor.
    g.write(sgi_frame(v), 0x180, 4, 1 << VTIMER_INTID);
    g.sync_lrs(v, &mut lrs);
    // Its timer fires: the line goes high while the PPI is masked.
    assert_eq!(g.set_line_level(v, VTIMER_INTID, vtimer::line_level(ctl, cval, 1001)), Some(v));
    g.sync_lrs(v, &mut lrs);
    assert!(g.is_pending(v, VTIMER_INTID) && intids(&lrs).is_empty());
    // It disables the timer, then unmasks the PPI: the caller resamples the line first.
    ctl = 0;
    g.write(sgi_frame(v), 0x100, 4, 1 << VTIMER_INTID);
    g.set_line_level(v, VTIMER_INTID, vtimer::line_level(ctl, cval, 1002));
    g.sync_lrs(v, &mut lrs);
    assert!(intids(&lrs).is_empty(), "no interrupt for a timer that is off");
    assert!(!g.is_pending(v, VTIMER_INTID));
}

#[test]
fn a_level_interrupt_in_an_lr_follows_its_line_at_the_next_sync() {
    let g = linux_like(1);
    g.write(SGI0, 0x100, 4, 1 << 30);
    let mut lrs = [0u64; 4];
    assert_eq!(g.set_line_level(0, PTIMER_INTID, true), Some(0));
    g.sync_lrs(0, &mut lrs);
    assert_eq!(intids(&lrs), [30]);
    assert_ne!(lrs[0] & LR_EOI, 0, "a line-driven level interrupt asks for EOI maintenance");
    // The line drops before the guest acknowledged it: it leaves the LR at the next sync.
    assert_eq!(g.set_line_level(0, PTIMER_INTID, false), Some(0), "the LR's copy must go");
    g.sync_lrs(0, &mut lrs);
    assert!(intids(&lrs).is_empty());
    // High again, acknowledged, still high when the guest is done: pending again.
    g.set_line_level(0, PTIMER_INTID, true);
    g.sync_lrs(0, &mut lrs);
    lrs[0] = (lrs[0] & !LR_PENDING) | LR_ACTIVE;
    g.sync_lrs(0, &mut lrs);
    assert_eq!(lrs[0] >> 62, 0b11, "active, and pending while the line is high");
    // Dropped while active: the active state stays, the pending one goes.
    g.set_line_level(0, PTIMER_INTID, false);
    g.sync_lrs(0, &mut lrs);
    assert_eq!(lrs[0] >> 62, 0b10);
    lrs[0] &= !LR_STATE;
    g.sync_lrs(0, &mut lrs);
    assert!(intids(&lrs).is_empty());
}

#[test]
fn ispendr_latches_a_level_interrupt_until_acknowledged() {
    let g = linux_like(1);
    g.write(SGI0, 0x100, 4, 1 << 30);
    g.set_line_level(0, 30, false);
    g.write(SGI0, 0x200, 4, 1 << 30);
    let mut lrs = [0u64; 4];
    g.sync_lrs(0, &mut lrs);
    assert_eq!(intids(&lrs), [30], "software pending holds with the line low");
    g.sync_lrs(0, &mut lrs);
    assert_eq!(intids(&lrs), [30], "still, until the guest takes it");
    lrs[0] = (lrs[0] & !LR_PENDING) | LR_ACTIVE;
    g.sync_lrs(0, &mut lrs);
    lrs[0] &= !LR_STATE;
    g.sync_lrs(0, &mut lrs);
    assert!(intids(&lrs).is_empty(), "acknowledged: the latch is gone");
    // ICPENDR clears a latch but not a high line.
    g.write(SGI0, 0x200, 4, 1 << 30);
    g.write(SGI0, 0x280, 4, 1 << 30);
    assert!(!g.is_pending(0, 30));
    g.set_line_level(0, 30, true);
    g.write(SGI0, 0x280, 4, 1 << 30);
    assert!(g.is_pending(0, 30));
}

#[test]
fn an_edge_triggered_line_pends_on_rising_edges_only() {
    let g = linux_like(1);
    g.write(SGI0, 0xc04, 4, 2 << (2 * (30 - 16)));
    assert_eq!(g.set_line_level(0, 30, true), Some(0));
    assert_eq!(g.set_line_level(0, 30, true), None, "no new edge");
    assert_eq!(g.set_line_level(0, 30, false), None);
    assert!(g.is_pending(0, 30), "an edge's pending state stays when the line drops");
}

#[test]
fn spi_lines_follow_their_routing() {
    let g = linux_like(2);
    route(&g, 33, 1);
    assert_eq!(g.set_line_level(0, UART_INTID, true), Some(1), "vcpu ignored for SPIs");
    let mut lrs = [0u64; 4];
    g.sync_lrs(1, &mut lrs);
    assert_eq!(intids(&lrs), [33]);
    g.set_line_level(0, UART_INTID, false);
    g.sync_lrs(1, &mut lrs);
    assert!(intids(&lrs).is_empty());
}

// --- Concurrency ---------------------------------------------------------------------------

/// vCPUs on their own threads send each other SGIs while each syncs its list registers and
/// its "guest" takes whatever is there: every SGI arrives at its target only, a pending SGI is
/// never taken twice for one send, and none is lost (each (target, SGI) sent is taken at least
/// once, and after the senders stop, at least once after the last send).
#[test]
fn sgis_between_threads_are_neither_lost_nor_duplicated() {
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    use std::sync::{Arc, Barrier};
    const N: usize = 4;
    const ROUNDS: usize = 3000;
    let g = Arc::new(linux_like(N));
    for v in 0..N {
        g.write(sgi_frame(v), 0x100, 4, 0xffff);
    }
    // sent[t][s]: sends of SGI s (= sender index) to t; taken[t][s]: acknowledged by t.
    let sent: Arc<Vec<AtomicUsize>> = Arc::new((0..N * N).map(|_| AtomicUsize::new(0)).collect());
    let taken: Arc<Vec<AtomicUsize>> = Arc::new((0..N * N).map(|_| AtomicUsize::new(0)).collect());
    let done = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(Barrier::new(N));
    let seed = Arc::new(AtomicU64::new(0x9e37_79b9_7f4a_7c15));
    let threads: Vec<_> = (0..N)
        .map(|me| {
            let (g, sent, taken, done, barrier, seed) =
                (g.clone(), sent.clone(), taken.clone(), done.clone(), barrier.clone(), seed.clone());
            std::thread::spawn(move || {
                let mut x = seed.fetch_add(0x1234_5678_9abc_def1, Ordering::Relaxed) | 1;
                let mut lrs = [0u64; 4];
                let take = |lrs: &mut [u64; 4]| {
                    g.sync_lrs(me, lrs);
                    for lr in lrs.iter_mut().filter(|l| **l & LR_PENDING != 0) {
                        let s = (*lr & 0xf) as usize;
                        assert!(s < N, "SGI {s} was never sent");
                        let n = taken[me * N + s].fetch_add(1, Ordering::SeqCst) + 1;
                        assert!(n <= sent[me * N + s].load(Ordering::SeqCst), "taken more than sent");
                        *lr = 0; // acknowledged and completed
                    }
                };
                barrier.wait();
                for _ in 0..ROUNDS {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let list = (x as u16 as u64) & ((1 << N) - 1);
                    for t in (0..N).filter(|t| list & (1 << t) != 0) {
                        sent[t * N + me].fetch_add(1, Ordering::SeqCst);
                    }
                    assert_eq!(g.send_sgi(me, sgir(me as u64, list)).bits() as u64, list);
                    if x & 3 != 0 {
                        take(&mut lrs);
                    }
                }
                done.fetch_add(1, Ordering::SeqCst);
                // Keep taking until every sender stopped, then once more for the last sends.
                while done.load(Ordering::SeqCst) < N {
                    take(&mut lrs);
                }
                take(&mut lrs);
                assert!(intids(&lrs).is_empty() && !g.has_mail(me));
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    for i in 0..N * N {
        let (s, t) = (sent[i].load(Ordering::SeqCst), taken[i].load(Ordering::SeqCst));
        assert!(t <= s && (s == 0) == (t == 0), "target {} SGI {}: sent {s}, taken {t}", i / N, i % N);
    }
    for v in 0..N {
        assert_eq!(g.redists[v].lock().irqs.pending[0], 0);
    }
}

// --- Property: no access sequence breaks the model, on several vCPUs -------------------------

/// One thing a guest (or the hardware on its behalf) can do to its virtual GIC.
#[derive(Clone, Debug)]
enum Op {
    Read {
        frame: u8,
        vcpu: usize,
        offset: u64,
        size: u8,
    },
    Write {
        frame: u8,
        vcpu: usize,
        offset: u64,
        size: u8,
        value: u64,
    },
    Raise {
        vcpu: usize,
        intid: u32,
    },
    Line {
        vcpu: usize,
        intid: u32,
        level: bool,
    },
    Sgi {
        sender: usize,
        value: u64,
    },
    /// The guest on `vcpu` acknowledges (pending -> active) or completes (active -> invalid)
    /// the interrupt in list register `lr`, then Labyrinth syncs that vCPU.
    Guest {
        vcpu: usize,
        lr: usize,
        complete: bool,
    },
    /// Labyrinth syncs a vCPU (an interrupt, a kick, a trap), whether or not it was told to.
    Sync {
        vcpu: usize,
    },
}

const VCPUS: usize = 3;

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    // Mostly the registers that change delivery (CTLR, group, enable, pending, active,
    // priority, IROUTER), aligned, so interrupts really flow; some accesses anywhere, any size.
    let key = prop_oneof![
        Just(0u64),
        Just(0x80),
        Just(0x100),
        Just(0x180),
        Just(0x200),
        Just(0x280),
        Just(0x300),
        Just(0x380),
        Just(0x400),
        Just(0xc00)
    ];
    let offset = prop_oneof![
        6 => (key, 0u64..3).prop_map(|(k, word)| k + word * 4),
        3 => (0u64..8).prop_map(|spi| 0x6100 + 8 * spi),
        1 => 0x6000u64..0x6400,
        1 => 0u64..0x1_0000,
    ];
    let size = prop_oneof![6 => Just(4u8), 1 => Just(1), 1 => Just(8), 1 => 0u8..=16];
    let value = prop_oneof![Just(u64::MAX), Just(0), 0u64..4, any::<u64>()];
    let vcpu = prop_oneof![8 => 0usize..VCPUS, 1 => 0usize..16];
    let intid = prop_oneof![4 => 25u32..40, 1 => 0u32..NR_IRQS as u32 + 8, 1 => any::<u32>()];
    prop_oneof![
        1 => (0u8..3, vcpu.clone(), offset.clone(), size.clone())
            .prop_map(|(frame, vcpu, offset, size)| Op::Read { frame, vcpu, offset, size }),
        1 => (0u8..3, vcpu.clone(), offset, size, value).prop_map(|(frame, vcpu, offset, size, value)| Op::Write {
            frame,
            vcpu,
            offset,
            size,
            value
        }),
        1 => (vcpu.clone(), intid.clone()).prop_map(|(vcpu, intid)| Op::Raise { vcpu, intid }),
        1 => (vcpu.clone(), intid, any::<bool>()).prop_map(|(vcpu, intid, level)| Op::Line { vcpu, intid, level }),
        1 => (0usize..VCPUS, prop_oneof![(0u64..16, 0u64..16).prop_map(|(i, l)| sgir(i, l)), any::<u64>()])
            .prop_map(|(sender, value)| Op::Sgi { sender, value }),
        1 => (0usize..VCPUS, 0usize..4, any::<bool>()).prop_map(|(vcpu, lr, complete)| Op::Guest { vcpu, lr, complete }),
        2 => (0usize..VCPUS).prop_map(|vcpu| Op::Sync { vcpu }),
    ]
}

fn frame_n(n: u8, vcpu: usize) -> Frame {
    match n {
        0 => Frame::Distributor,
        1 => Frame::Redistributor { vcpu },
        _ => Frame::Sgi { vcpu },
    }
}

/// After vCPU `v` synced: an INTID in its list registers is there once, neither active in the
/// model nor pending there unless the LR carries only the active state and the guest cannot
/// take the pending one; its mailbox is empty; no SPI is in two vCPUs' list registers.
fn check(g: &VGic, v: usize, lrs: &[[u64; 4]; VCPUS]) -> Result<(), proptest::test_runner::TestCaseError> {
    use proptest::{prop_assert, prop_assert_eq};
    prop_assert!(!g.has_mail(v), "vCPU {}'s mailbox drained", v);
    let rd = g.redists[v].lock();
    let d = g.dist.lock();
    let groups = d.groups();
    let live: Vec<u64> = lrs[v].iter().copied().filter(|&l| l & LR_STATE != 0).collect();
    for (i, &lr) in live.iter().enumerate() {
        let intid = lr as u32;
        prop_assert!((intid as usize) < NR_IRQS);
        prop_assert!(
            !live[i + 1..].iter().any(|&o| o as u32 == intid),
            "INTID {} in two list registers",
            intid
        );
        let (bank_active, bank_pending, in_lr, deliverable) = match intid.checked_sub(32) {
            Some(spi) => {
                let (w, b) = bank::bit(spi);
                prop_assert_eq!(
                    usize::from(d.holder[spi as usize]),
                    v,
                    "SPI {} held by its LR's vCPU",
                    intid
                );
                (
                    d.spis.active[w] & b,
                    d.spis.pending[w] & b,
                    d.spis.in_lr[w] & b,
                    d.spis.deliverable(w, b, groups),
                )
            }
            None => {
                let b = 1 << intid;
                (
                    rd.irqs.active[0] & b,
                    rd.irqs.pending[0] & b,
                    rd.irqs.in_lr[0] & b,
                    rd.irqs.deliverable(0, b, groups),
                )
            }
        };
        prop_assert!(in_lr != 0, "INTID {} in an LR but not marked so", intid);
        prop_assert!(bank_active == 0, "INTID {} active both in an LR and in the model", intid);
        prop_assert!(
            bank_pending == 0 || (lr & LR_PENDING == 0 && !deliverable),
            "INTID {} pending both in an LR and in the model",
            intid
        );
    }
    for (a, la) in lrs.iter().enumerate() {
        for (b, lb) in lrs.iter().enumerate().skip(a + 1) {
            for spi in intids(la).into_iter().filter(|&i| i >= 32) {
                prop_assert!(!intids(lb).contains(&spi), "SPI {} in vCPUs {} and {}", spi, a, b);
            }
        }
    }
    Ok(())
}

proptest::proptest! {
    // Whatever the guest's vCPUs write or read, in any order, with any size or alignment, and
    // whatever SGIs they send and lines move: nothing panics, and an interrupt's state lives
    // in one place only.
    #[test]
    fn no_access_sequence_breaks_the_model(ops in proptest::collection::vec(op(), 1..200)) {
        let g = VGic::new(VCPUS).unwrap();
        let mut lrs = [[0u64; 4]; VCPUS];
        // The vCPU whose guest acknowledged each SPI still active (an MMIO write of the
        // active bits makes this unknown).
        let mut acked: [Option<usize>; NR_IRQS] = [None; NR_IRQS];
        for op in ops {
            // Whom the model asks to sync is left to later Sync ops: it must hold whichever
            // vCPUs sync, whenever.
            let sync = match op {
                Op::Read { frame, vcpu, offset, size } => {
                    let _ = g.read(frame_n(frame, vcpu), offset, size);
                    None
                }
                Op::Write { frame, vcpu, offset, size, value } => {
                    if frame == 0 && (0x300..0x400).contains(&offset) {
                        acked = [None; NR_IRQS];
                    }
                    let _ = g.write(frame_n(frame, vcpu), offset, size, value);
                    None
                }
                Op::Raise { vcpu, intid } => {
                    let _ = g.raise(vcpu, intid);
                    None
                }
                Op::Line { vcpu, intid, level } => {
                    let _ = g.set_line_level(vcpu, intid, level);
                    None
                }
                Op::Sgi { sender, value } => {
                    let _ = g.send_sgi(sender, value);
                    None
                }
                Op::Guest { vcpu, lr, complete } => {
                    let l = &mut lrs[vcpu][lr];
                    let intid = (*l & LR_INTID) as usize;
                    if complete && *l & LR_ACTIVE != 0 {
                        *l &= !LR_ACTIVE;
                        acked[intid] = None;
                    } else if *l & LR_PENDING != 0 {
                        *l = (*l & !LR_PENDING) | LR_ACTIVE;
                        acked[intid] = Some(vcpu);
                    }
                    Some(vcpu)
                }
                Op::Sync { vcpu } => Some(vcpu),
            };
            if let Some(v) = sync {
                g.sync_lrs(v, &mut lrs[v]);
                check(&g, v, &lrs)?;
                for &lr in lrs[v].iter().filter(|&&l| l & LR_ACTIVE != 0 && l as u32 >= 32) {
                    let intid = lr as u32 as usize;
                    proptest::prop_assert!(
                        acked[intid].is_none_or(|a| a == v),
                        "SPI {} acknowledged on vCPU {:?} active on vCPU {}", intid, acked[intid], v
                    );
                }
            }
        }
    }
}

// The registers read without the lock read as the locked path does, before and after a
// guest set the GIC up; nothing a write changes is among them.
#[test]
fn constant_reads_agree_with_the_distributor() {
    for g in [one(), linux_like(4)] {
        let mut constant = 0;
        for offset in (0..0x1_0000u64).step_by(4) {
            for size in [1u8, 4, 8] {
                if let Some(v) = VGic::read_constant(D, offset, size) {
                    constant += 1;
                    assert_eq!(Some(v), g.read(D, offset, size), "offset {offset:#x} size {size}");
                }
            }
        }
        assert_eq!(constant, 3, "TYPER, IIDR, PIDR2");
    }
    assert_eq!(VGic::read_constant(D, 0, 4), None, "GICD_CTLR changes with writes");
    assert_eq!(VGic::read_constant(RD0, 0xffe8, 4), None, "the redistributors keep the locked path");
}

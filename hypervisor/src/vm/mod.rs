//! Guests: their physical layout, kernel images, the devices and firmware calls Labyrinth
//! emulates for them, and the decoding of their traps. All policy and no machine: the arch's
//! vCPU code runs guests and calls in here to decide what a trap means.

pub mod budget;
/// Fuzz harnesses for trap decoding and the PL011 (tests and the fuzz crate only).
#[cfg(any(test, feature = "model"))]
pub mod exercise;
pub mod exit;
pub mod fdt_gen;
pub mod guest;
pub mod hypercall;
pub mod image;
pub mod input_focus;
pub mod layout;
pub mod lifecycle;
pub mod shm;
pub mod trap;
pub mod vcpu;
pub mod vcpu_set;
pub mod vgic;
pub mod vpl011;
pub mod vpsci;
pub mod vtimer;

mod sync;

#[cfg(all(test, not(loom)))]
mod exit_tests;

pub use guest::{StopCause, Vm};
pub use vcpu::Vcpu;
pub use vcpu_set::VcpuSet;

//! The Labyrinth binary: boot, the aarch64 edge (`arch`), and the wiring of the core.
#![cfg_attr(target_os = "none", no_std)]
#![cfg_attr(target_os = "none", no_main)]

#[cfg(target_os = "none")]
mod arch;

#[cfg(target_os = "none")]
mod hyp {
    use crate::arch;

    pub fn primary_main(dtb: u64, dtb_size: u64) -> ! {
        arch::install_fallback_console();
        log::info!("Labyrinth: dtb {dtb:#x} size {dtb_size:#x}");
        arch::power_off()
    }

    #[no_mangle]
    extern "C" fn secondary_main(cpu: usize) -> ! {
        log::info!("cpu {cpu} online");
        arch::power_off()
    }

    #[panic_handler]
    fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
        arch::emergency_line(format_args!("panic: {info}"));
        arch::power_off()
    }
}

#[cfg(target_os = "none")]
use hyp::primary_main;

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("labyrinth runs at EL2 on aarch64: build it with scripts/build.sh");
    std::process::exit(2);
}

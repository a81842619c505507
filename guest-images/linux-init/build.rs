// A Linux user program, not a guest kernel: no guest.ld. A static, non-PIE ELF at the usual
// user base; Linux maps its PT_LOAD segments, so they must be page-aligned in the file.
fn main() {
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("none") {
        for arg in
            ["-static", "--no-pie", "-z", "max-page-size=4096", "--image-base=0x400000", "-e", "_start"]
        {
            println!("cargo:rustc-link-arg={arg}");
        }
    }
}

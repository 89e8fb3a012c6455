//! Optimized builds of the proxy link with `hot-code.ld`, which puts the functions the
//! proxy runs ahead of those it never runs (see `scripts/hot-code.py`): the code pages a
//! proxy maps, and so its resident memory, hold code in use rather than everything
//! sharing a 64 KiB run with it. They also pack their relative relocations (RELR):
//! the table the loader reads at start shrinks from 540 KiB to a few, which needs
//! glibc 2.36 or later (Debian 12) where the proxy runs.

fn main() {
    println!("cargo:rerun-if-changed=hot-code.ld");
    let optimized = std::env::var("PROFILE").as_deref() == Ok("release");
    let linux = std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux");
    if optimized && linux {
        let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
        println!("cargo:rustc-link-arg-bin=tessera-proxy=-Wl,-T,{dir}/hot-code.ld");
        println!("cargo:rustc-link-arg-bin=tessera-proxy=-Wl,-z,pack-relative-relocs");
    }
}

//! The shipped build (`scripts/build-proxy.sh`, which sets `TESSERA_PROXY_SHIPPED`) links
//! the proxy with `hot-code.ld`, which puts the functions the proxy runs ahead of those it
//! never runs (`scripts/hot-code.py`): the code pages a proxy maps, and so its resident
//! memory, hold code in use. It also packs relative relocations (RELR), which needs
//! glibc 2.36 or later where the proxy runs. Every other build is an ordinary binary.
//! PERFORMANCE.md ("Optimized builds") has the figures.

fn main() {
    println!("cargo:rerun-if-changed=hot-code.ld");
    println!("cargo:rerun-if-env-changed=TESSERA_PROXY_SHIPPED");
    let shipped = std::env::var_os("TESSERA_PROXY_SHIPPED").is_some();
    let linux = std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux");
    if shipped && linux {
        let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
        println!("cargo:rustc-link-arg-bin=tessera-proxy=-Wl,-T,{dir}/hot-code.ld");
        println!("cargo:rustc-link-arg-bin=tessera-proxy=-Wl,-z,pack-relative-relocs");
    }
}

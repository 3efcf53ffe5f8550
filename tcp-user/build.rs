//! Points the agent at the eBPF object that xtask built (see xtask/src/build.rs for why the
//! object is built by xtask and not from here).

use std::{env, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=TCPSCOPE_EBPF_OBJ");
    let path = env::var_os("TCPSCOPE_EBPF_OBJ").map_or_else(
        || {
            PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"))
                .join("../target/ebpf/bpfel-unknown-none/release/tcp-ebpf")
        },
        PathBuf::from,
    );
    assert!(
        path.is_file(),
        "the eBPF object {} does not exist: build through `cargo xtask build` (or `cargo xtask \
         run` / `cargo xtask test`), which builds it first with the pinned nightly and bpf-linker",
        path.display()
    );
    let path = path.canonicalize().expect("existing file");
    println!("cargo:rerun-if-changed={}", path.display());
    println!("cargo:rustc-env=TCPSCOPE_EBPF_OBJ={}", path.display());
}

//! Points the agent at the eBPF object that xtask built (see xtask/src/build.rs for why the
//! object is built by xtask and not from here), and names the commit it is built from.

use std::{env, path::PathBuf, process::Command};

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
    println!("cargo:rustc-env=TCPSCOPE_REVISION={}", revision());
}

/// The checked-out commit (12 digits), or `unknown` outside a git checkout. Rebuilt when HEAD
/// moves: the files git keeps HEAD and the current branch in are watched.
fn revision() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let Some(commit) = git(&["rev-parse", "--short=12", "HEAD"]) else {
        return "unknown".to_owned();
    };
    let branch = git(&["symbolic-ref", "-q", "HEAD"]);
    for file in ["HEAD", "packed-refs"].into_iter().chain(branch.as_deref()) {
        // Only files that exist: cargo would take a missing one as changed on every build.
        if let Some(p) = git(&["rev-parse", "--path-format=absolute", "--git-path", file])
            .filter(|p| std::path::Path::new(p).is_file())
        {
            println!("cargo:rerun-if-changed={p}");
        }
    }
    commit
}

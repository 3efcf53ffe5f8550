//! Building the eBPF object and the agent.
//!
//! Why an xtask step and not aya-build in `tcp-user/build.rs`: the eBPF object needs a
//! different toolchain (pinned nightly, build-std) and a private bpf-linker that may have to
//! be built first, which is set-up a build script must not do (it runs under cargo's lock,
//! inside every `cargo check`/`clippy`, with no way to report progress). Here the set-up is
//! explicit and idempotent, the object always comes from a release build with BTF, and it
//! goes to its own target directory so the two toolchains never share build artifacts.
//! `tcp-user/build.rs` only embeds the result, and says how to build it when it is missing.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;

use crate::{cmd, toolchain};

/// Options of `cargo xtask build`.
#[derive(Debug, Args)]
pub struct Options {
    /// Build the agent with the release profile.
    #[arg(long)]
    pub release: bool,
}

/// Flags of the eBPF build (see [`build_ebpf`]).
const EBPF_RUSTFLAGS: &[&str] = &["-Cdebuginfo=2", "-Clink-arg=--btf"];

/// Target directory of the eBPF build.
pub fn ebpf_target_dir() -> PathBuf {
    cmd::workspace_root().join("target/ebpf")
}

/// Builds the eBPF object (always release, with BTF) and returns its path.
pub fn build_ebpf() -> Result<PathBuf> {
    let tc = toolchain::ensure_ebpf_toolchain()?;
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![tc.bpf_linker_bin_dir.clone()];
    paths.extend(std::env::split_paths(&path));
    let mut c = cmd::cargo();
    c.arg(&tc.cargo_toolchain_arg)
        .args([
            "build",
            "--package",
            "tcp-ebpf",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--target-dir",
        ])
        .arg(ebpf_target_dir())
        .env("PATH", std::env::join_paths(paths)?)
        // Debug info is what bpf-linker turns into BTF (needed for BTF maps, spin locks,
        // CO-RE and readable verifier logs).
        .env("CARGO_ENCODED_RUSTFLAGS", EBPF_RUSTFLAGS.join("\x1f"));
    cmd::run(&mut c)?;
    Ok(ebpf_target_dir().join("bpfel-unknown-none/release/tcp-ebpf"))
}

/// Builds the eBPF object, then the agent embedding it; returns the agent binary's path.
pub fn build(opts: &Options) -> Result<PathBuf> {
    let object = build_ebpf()?;
    build_agent(&object, opts.release)
}

/// Builds the agent embedding `object` (the release profile when `release`); returns the
/// binary's path.
pub fn build_agent(object: &Path, release: bool) -> Result<PathBuf> {
    let mut c = toolchain::cargo_stable()?;
    c.args(["build", "--package", "tcp-user", "--bin", "tcpscope"])
        .env("TCPSCOPE_EBPF_OBJ", object);
    if release {
        c.arg("--release");
    }
    cmd::run(&mut c)?;
    let profile = if release { "release" } else { "debug" };
    Ok(cmd::workspace_root()
        .join("target")
        .join(profile)
        .join("tcpscope"))
}

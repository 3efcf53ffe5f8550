//! The pinned eBPF toolchain: nightly + rust-src and a private bpf-linker built against that
//! nightly's own LLVM.
//!
//! apt has no LLVM 23, but every nightly ships its own `libLLVM.so.*`; bpf-linker links
//! against it through `LLVM_PREFIX` (a directory whose `lib/` holds `libLLVM.so` and the
//! versioned name, both pointing at the nightly's library). The binary records that directory
//! as its RUNPATH, so the prefix is kept next to it.
//!
//! Everything lives under `$TCPSCOPE_CACHE` (default `$XDG_CACHE_HOME/tcpscope`, else
//! `~/.cache/tcpscope`), in a directory named after the bpf-linker version and the nightly's
//! exact commit: the user's own `~/.cargo/bin` is never touched, and a new pinned nightly
//! gets a fresh build.

use std::{
    env, fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::cmd;

/// Stable toolchain for the agent and tests (aya 0.16 needs 1.98).
pub const STABLE: &str = "1.98.0";
/// Nightly used for the eBPF crate (build-std, bpfel target).
pub const NIGHTLY: &str = "nightly-2026-10-30";
/// bpf-linker release.
pub const BPF_LINKER_VERSION: &str = "0.13.0";
/// Feature of bpf-linker that selects the LLVM major version of the nightly above.
const BPF_LINKER_LLVM_FEATURE: &str = "llvm-23";

/// What the eBPF build needs, ready to use.
pub struct EbpfToolchain {
    /// `+<nightly>` argument for cargo.
    pub cargo_toolchain_arg: String,
    /// Directory holding the `bpf-linker` binary.
    pub bpf_linker_bin_dir: PathBuf,
}

/// Root of everything xtask caches outside the repository.
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = env::var_os("TCPSCOPE_CACHE") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = env::var_os("XDG_CACHE_HOME") {
        return Ok(PathBuf::from(dir).join("tcpscope"));
    }
    let home = env::var_os("HOME").context("HOME is not set; set TCPSCOPE_CACHE")?;
    Ok(PathBuf::from(home).join(".cache/tcpscope"))
}

fn nightly_rustc() -> Command {
    let mut c = Command::new("rustup");
    c.args(["run", NIGHTLY, "rustc"]);
    c
}

/// Installs the nightly and rust-src when missing.
fn ensure_nightly() -> Result<PathBuf> {
    if cmd::stdout_of(nightly_rustc().arg("--version")).is_none() {
        cmd::run(Command::new("rustup").args([
            "toolchain",
            "install",
            NIGHTLY,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    }
    let sysroot = cmd::stdout_of(nightly_rustc().args(["--print", "sysroot"]))
        .with_context(|| format!("{NIGHTLY} is installed but `rustc --print sysroot` fails"))?;
    let sysroot = PathBuf::from(sysroot);
    if !sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        cmd::run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            NIGHTLY,
        ]))?;
    }
    Ok(sysroot)
}

/// The nightly's own LLVM shared library (the real file, not the linker-script alias).
fn nightly_libllvm(sysroot: &Path) -> Result<PathBuf> {
    let lib = sysroot.join("lib");
    let mut found = Vec::new();
    for entry in fs::read_dir(&lib).with_context(|| format!("listing {}", lib.display()))? {
        let path = entry?.path();
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if name.starts_with("libLLVM.so.") {
            found.push(path);
        }
    }
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!("{NIGHTLY} ships no libLLVM.so.* in {}", lib.display()),
        many => bail!("{NIGHTLY} ships several LLVM libraries: {many:?}"),
    }
}

/// Builds bpf-linker into the cache unless a working one is already there.
fn ensure_bpf_linker(sysroot: &Path) -> Result<PathBuf> {
    let verbose = cmd::stdout_of(nightly_rustc().arg("-vV")).context("rustc -vV")?;
    let commit = verbose
        .lines()
        .find_map(|l| l.strip_prefix("commit-hash: "))
        .unwrap_or("unknown");
    let short = commit.get(..12).unwrap_or(commit);
    let root = cache_dir()?.join(format!("bpf-linker-{BPF_LINKER_VERSION}-{NIGHTLY}-{short}"));
    let bin_dir = root.join("bin");
    let bin = bin_dir.join("bpf-linker");
    if cmd::stdout_of(Command::new(&bin).arg("--version"))
        .is_some_and(|v| v.ends_with(BPF_LINKER_VERSION))
    {
        return Ok(bin_dir);
    }
    let libllvm = nightly_libllvm(sysroot)?;
    let prefix = root.join("llvm");
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    let versioned = libllvm.file_name().context("library name")?.to_owned();
    for name in [std::ffi::OsString::from("libLLVM.so"), versioned] {
        let link = prefix_lib.join(name);
        let _ = fs::remove_file(&link);
        symlink(&libllvm, &link).with_context(|| format!("linking {}", link.display()))?;
    }
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against {NIGHTLY}'s LLVM into {} \
         (once; takes a minute or two)",
        root.display()
    );
    let mut install = cmd::cargo();
    install
        .args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
            "--force",
            "--no-default-features",
            "--features",
            BPF_LINKER_LLVM_FEATURE,
            "--root",
        ])
        .arg(&root)
        .env("LLVM_PREFIX", &prefix)
        // Build outside the workspace so its rust-toolchain.toml and target dir stay ours.
        .current_dir(&root);
    // The stable toolchain pinned for userspace builds it.
    ensure_stable()?;
    install.env("RUSTUP_TOOLCHAIN", STABLE);
    cmd::run(&mut install)?;
    if cmd::stdout_of(Command::new(&bin).arg("--version")).is_none() {
        bail!("bpf-linker was built but does not run: {}", bin.display());
    }
    Ok(bin_dir)
}

/// Installs the pinned stable toolchain when missing.
///
/// The pin lives here rather than in a `rust-toolchain.toml`: rustup may be configured not to
/// install toolchains on demand (`RUSTUP_AUTO_INSTALL=0`), and then a pinned file would make
/// the very first `cargo xtask` fail before xtask could install anything. xtask itself builds
/// with whatever toolchain is the default; everything else builds with this one.
pub fn ensure_stable() -> Result<()> {
    let mut probe = Command::new("rustup");
    probe.args(["run", STABLE, "rustc", "--version"]);
    if cmd::stdout_of(&mut probe).is_none() {
        cmd::run(Command::new("rustup").args([
            "toolchain",
            "install",
            STABLE,
            "--profile",
            "minimal",
            "--component",
            "clippy,rustfmt",
        ]))?;
    }
    // A directory override for this checkout, so that plain `cargo build` / `cargo test` here
    // use the pinned toolchain too. Not a rust-toolchain.toml: with rustup's on-demand installs
    // off (`RUSTUP_AUTO_INSTALL=0`) that would stop the very first `cargo xtask` on a machine
    // without the toolchain, before xtask could install it.
    let root = cmd::workspace_root();
    let overrides = cmd::stdout_of(Command::new("rustup").args(["override", "list"]));
    let set = overrides.is_some_and(|list| {
        list.lines().any(|l| {
            let mut words = l.split_whitespace();
            words.next() == Some(&*root.to_string_lossy())
                && words.next().is_some_and(|t| t.starts_with(STABLE))
        })
    });
    if !set {
        cmd::run(
            Command::new("rustup")
                .args(["override", "set", STABLE, "--path"])
                .arg(&root),
        )?;
    }
    Ok(())
}

/// Ensures the nightly, rust-src and bpf-linker are in place (fast when they are).
pub fn ensure_ebpf_toolchain() -> Result<EbpfToolchain> {
    let sysroot = ensure_nightly()?;
    let bpf_linker_bin_dir = ensure_bpf_linker(&sysroot)?;
    Ok(EbpfToolchain {
        cargo_toolchain_arg: format!("+{NIGHTLY}"),
        bpf_linker_bin_dir,
    })
}

/// Ensures the pinned stable toolchain has the standard library of `target`.
pub fn ensure_stable_target(target: &str) -> Result<()> {
    ensure_stable()?;
    let installed = cmd::stdout_of(Command::new("rustup").args([
        "target",
        "list",
        "--installed",
        "--toolchain",
        STABLE,
    ]));
    if !installed.is_some_and(|list| list.lines().any(|l| l.trim() == target)) {
        cmd::run(Command::new("rustup").args(["target", "add", "--toolchain", STABLE, target]))?;
    }
    Ok(())
}

/// A `cargo` command of the pinned stable toolchain ([`STABLE`]), installed if missing.
pub fn cargo_stable() -> Result<Command> {
    ensure_stable()?;
    let mut c = cmd::cargo();
    c.arg(format!("+{STABLE}"));
    Ok(c)
}

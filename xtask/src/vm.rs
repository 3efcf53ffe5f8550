//! `cargo xtask vm`: the kernel-facing tests on another kernel, in a QEMU guest.
//!
//! Production hosts run older kernels than a developer's machine (Debian 12: 6.1, Debian 13:
//! 6.12). This task boots one of Debian's stock cloud kernels, unmodified and pinned to an exact
//! build (see [`kernels`]), with an initramfs holding busybox, the iproute2 tools, the agent and
//! the kernel-facing test binaries, and runs those tests inside; it fails when any of them does.
//!
//! - The kernel package is fetched into the cache, checked against its pinned SHA-256 and
//!   unpacked there; nothing is installed on the host.
//! - QEMU runs with TCG (software emulation): hardware virtualization is not available
//!   everywhere (nested guests), TCG is. A hard timeout bounds every boot.
//! - Binaries keep their absolute host paths inside the guest, with the shared libraries `ldd`
//!   lists; the test binaries, run from `/tests`, find the agent by its host path in
//!   `TCPSCOPE_AGENT`, which the init script sets; the release archive of `cargo xtask dist`
//!   (for the dist tests) likewise, in `TCPSCOPE_DIST`.
//! - The guest's PID 1 is `vm-init.sh`; it prints one `tcpscope-vm:` line per test binary and
//!   a final verdict line, which is what this task reads back.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::Args;

use crate::{
    build, cmd, dist, host,
    kernels::{self, Kernel},
    toolchain,
};

/// Test targets of `tcp-tests` run in the guest: every one that loads the programs into the
/// kernel, except the latency tests (their oracle, tshark, brings 160 MB of libraries, and
/// their timing tolerances are for real CPUs, not an emulated one) and `web_config` (TLS and
/// basic auth of the metrics server do not depend on the kernel).
pub const VM_TESTS: &[&str] = &[
    "test_run",
    "attach",
    "ss_agreement",
    "exporter",
    "syn_flood",
    "mirror_replay",
    "lifecycle",
    "reliability",
    "dist",
    "events",
];

/// Host programs copied into the guest (glibc builds; busybox's `ip` has no netns support).
const GUEST_TOOLS: &[&str] = &[
    "/usr/sbin/ip",
    "/usr/sbin/tc",
    "/usr/bin/ss",
    "/usr/sbin/ethtool",
    "/usr/bin/prometheus",
    "/usr/bin/promtool",
    "/usr/sbin/hping3",
    "/usr/bin/tcpreplay",
    "/usr/sbin/nft",
    "/usr/bin/tcpdump",
];

/// Kernel modules the tests need that Debian builds as modules: veth pairs, the `clsact`
/// qdisc and `cls_bpf` for TC attach without TCX, nf_tables for the tests' nft rules (the
/// `inet` family, filter chains and the payload, compare and bitwise expressions are all in
/// its core; `limit` is a module of its own), and `tcp_diag` for sock_diag (the agent's
/// reconciliation; `ss` falls back to /proc without it, the agent does not). Their own
/// dependencies are added from each module's `depends=` field.
const MODULES: &[&str] = &[
    "veth",
    "sch_ingress",
    "cls_bpf",
    "nf_tables",
    "nft_limit",
    "tcp_diag",
];

/// The guest's init script.
const INIT: &str = include_str!("vm-init.sh");

/// A full run takes about 26 min (6.1: 1,543 s on 2026-11-30) under TCG on 2 CPUs; the
/// limit leaves a third as much again for slower hosts.
const DEFAULT_TIMEOUT_SECS: u64 = 2100;
/// The default flow tables take about 70 MiB; the tests and their tools fit in the rest.
const DEFAULT_MEMORY_MIB: u32 = 2048;

/// Options of `cargo xtask vm`.
#[derive(Debug, Args)]
pub struct Options {
    /// Pinned kernel to boot (see xtask/src/kernels.rs): 6.1 (Debian 12, the oldest kernel
    /// supported) or 6.12 (Debian 13).
    #[arg(long, default_value = kernels::PINS[0].series, value_name = "SERIES", value_parser = series)]
    pub kernel: String,
    /// Boot this Debian kernel package instead of a pinned one (fetched with apt; its SHA-256
    /// is printed, for pinning).
    #[arg(long, value_name = "NAME=VERSION", conflicts_with = "kernel")]
    pub kernel_package: Option<String>,
    /// Hard limit on the guest's run, boot included, in seconds.
    #[arg(long, default_value_t = DEFAULT_TIMEOUT_SECS, value_name = "SECS")]
    pub timeout: u64,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = DEFAULT_MEMORY_MIB, value_name = "MIB")]
    pub memory: u32,
    /// Only run tests whose name contains this string.
    #[arg(last = true)]
    pub filter: Option<String>,
}

/// `--kernel` values: the pinned series.
fn series(s: &str) -> Result<String, String> {
    kernels::pin(s)
        .map(|p| p.series.to_owned())
        .map_err(|e| format!("{e:#}"))
}

impl Options {
    /// The options of a run of the pinned kernel `series` (`cargo xtask test`).
    pub fn pinned(series: &str, filter: Option<String>) -> Self {
        Self {
            kernel: series.to_owned(),
            kernel_package: None,
            timeout: DEFAULT_TIMEOUT_SECS,
            memory: DEFAULT_MEMORY_MIB,
            filter,
        }
    }
}

/// Runs the kernel-facing tests in a guest; fails when the guest does not report success.
pub fn vm(opts: &Options) -> Result<()> {
    host::ensure_packages(host::Task::Vm)?;
    let choice = match &opts.kernel_package {
        Some(arg) => kernels::Choice::package(arg)?,
        None => kernels::Choice::Pinned(kernels::pin(&opts.kernel)?),
    };
    eprintln!("xtask: guest kernel {}", choice.describe());
    let kernel = kernels::fetch(&choice)?;
    let object = build::build_ebpf()?;
    let agent = build::build_agent(&object, false)?;
    let archive = dist::native_archive()?;
    let tests = build_tests(&object)?;
    let work = cmd::workspace_root().join("target/vm");
    let initramfs = build_initramfs(
        &work,
        &kernel,
        &agent,
        &archive,
        &tests,
        opts.filter.as_deref(),
    )?;
    boot(&work, &kernel, &initramfs, opts)
}

/// Builds the [`VM_TESTS`] binaries; returns `(target name, executable)`.
fn build_tests(object: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut c = toolchain::cargo_stable()?;
    c.args([
        "test",
        "--no-run",
        "--message-format=json",
        "-p",
        "tcp-tests",
    ])
    .env("TCPSCOPE_EBPF_OBJ", object)
    .stdout(Stdio::piped());
    for t in VM_TESTS {
        c.args(["--test", t]);
    }
    let out = cmd::output(&mut c)?;
    if !out.status.success() {
        bail!(
            "building the VM tests failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut tests = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(name), Some(exe)) = (
            msg.pointer("/target/name").and_then(|v| v.as_str()),
            msg.get("executable").and_then(|v| v.as_str()),
        ) else {
            continue;
        };
        if VM_TESTS.contains(&name) {
            tests.push((name.to_owned(), PathBuf::from(exe)));
        }
    }
    if tests.len() != VM_TESTS.len() {
        bail!(
            "cargo reported {} of {} VM test binaries",
            tests.len(),
            VM_TESTS.len()
        );
    }
    Ok(tests)
}

/// Writes the initramfs (a gzipped newc cpio archive) and returns its path.
fn build_initramfs(
    work: &Path,
    kernel: &Kernel,
    agent: &Path,
    archive: &Path,
    tests: &[(String, PathBuf)],
    filter: Option<&str>,
) -> Result<PathBuf> {
    let root = work.join("rootfs");
    let _ = fs::remove_dir_all(&root);
    for dir in [
        "bin",
        "dev",
        "proc",
        "sys",
        "run",
        "tmp",
        "etc",
        "tests",
        "lib/modules",
    ] {
        fs::create_dir_all(root.join(dir))?;
    }
    copy(Path::new("/bin/busybox"), &root.join("bin/busybox"))?;
    fs::write(root.join("init"), INIT)?;
    chmod_x(&root.join("init"))?;
    fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    fs::write(root.join("etc/group"), "root:x:0:\n")?;

    let mut binaries: Vec<PathBuf> = GUEST_TOOLS.iter().map(PathBuf::from).collect();
    binaries.push(agent.to_path_buf());
    for bin in &binaries {
        copy(bin, &under(&root, bin))?;
    }
    let mut run_list = String::new();
    for (name, exe) in tests {
        copy(exe, &root.join("tests").join(name))?;
        binaries.push(exe.clone());
        run_list.push_str(name);
        run_list.push('\n');
    }
    fs::write(root.join("tests/list"), run_list)?;
    fs::write(
        root.join("tests/agent"),
        agent.as_os_str().as_encoded_bytes(),
    )?;
    // The release archive and its checksums, at their host paths too.
    let sums = archive.with_file_name("SHA256SUMS");
    for file in [archive, sums.as_path()] {
        copy(file, &under(&root, file))?;
    }
    // Not `tests/dist`: that is the dist test binary.
    fs::write(
        root.join("tests/dist-archive"),
        archive.as_os_str().as_encoded_bytes(),
    )?;
    // The capture tests find `../shared/pcaps` from the workspace root, by the path compiled
    // into them (tcp-testbed's): both exist under the same names in the guest.
    fs::create_dir_all(under(&root, &cmd::workspace_root()))?;
    let pcaps = host::pcaps_dir();
    if pcaps.is_dir() {
        let normal = lexically_normal(&pcaps);
        copy_tree(&pcaps, &under(&root, &normal))?;
    }
    fs::write(root.join("tests/filter"), filter.unwrap_or(""))?;
    fs::write(
        root.join("tests/allow_skip"),
        std::env::var(host::ALLOW_SKIP).unwrap_or_default(),
    )?;
    for lib in shared_libraries(&binaries)? {
        copy(&lib, &under(&root, &lib))?;
    }

    let mut list = String::new();
    for (name, bytes) in modules(kernel, MODULES)? {
        let file = format!("{name}.ko");
        fs::write(root.join("lib/modules").join(&file), bytes)?;
        list.push_str(&format!("/lib/modules/{file}\n"));
    }
    fs::write(root.join("lib/modules/list"), list)?;

    let image = work.join("initramfs.cpio.gz");
    let script = format!(
        "cd {} && find . -print0 | cpio --null -o -H newc --quiet | gzip -1 > {}",
        shell_quote(&root),
        shell_quote(&image)
    );
    cmd::run(Command::new("sh").args(["-c", &script]))?;
    Ok(image)
}

/// `path` (absolute) re-rooted under `root`.
fn under(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// The modules `wanted` and everything they depend on, dependencies first, uncompressed
/// (busybox `insmod` loads plain ELF objects; Debian 13 ships `.ko.xz`). The packages carry no
/// `modules.dep` (depmod writes it at install time), so dependencies come from each module's
/// own `depends=` field.
fn modules(kernel: &Kernel, wanted: &[&str]) -> Result<Vec<(String, Vec<u8>)>> {
    let mut files = std::collections::BTreeMap::new();
    index_modules(&kernel.modules_dir()?.join("kernel"), &mut files)?;
    let mut out: Vec<(String, Vec<u8>)> = Vec::new();
    let mut pending: Vec<(String, bool)> = wanted
        .iter()
        .rev()
        .map(|m| ((*m).to_owned(), false))
        .collect();
    while let Some((name, deps_done)) = pending.pop() {
        if out.iter().any(|(n, _)| *n == name) {
            continue;
        }
        let path = files
            .get(&name)
            .with_context(|| format!("{} has no module {name}", kernel.package))?;
        let bytes = read_module(path)?;
        let deps = module_depends(&bytes);
        if deps_done || deps.iter().all(|d| out.iter().any(|(n, _)| n == d)) {
            out.push((name, bytes));
        } else {
            pending.push((name, true));
            pending.extend(deps.into_iter().map(|d| (d, false)));
        }
    }
    Ok(out)
}

/// Module name (`veth`; `-` and `_` are the same to the kernel) → file, under `dir`.
fn index_modules(dir: &Path, out: &mut std::collections::BTreeMap<String, PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            index_modules(&path, out)?;
            continue;
        }
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if let Some(stem) = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
            .iter()
            .find_map(|ext| name.strip_suffix(ext))
        {
            out.insert(stem.replace('-', "_"), path.clone());
        }
    }
    Ok(())
}

/// A module file's ELF bytes.
fn read_module(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        Some("xz")
    } else if name.ends_with(".zst") {
        Some("zstd")
    } else if name.ends_with(".gz") {
        Some("gzip")
    } else {
        None
    };
    match tool {
        None => fs::read(path).with_context(|| format!("reading {}", path.display())),
        Some(tool) => {
            let out = cmd::output(Command::new(tool).arg("-dc").arg(path))?;
            if !out.status.success() {
                bail!(
                    "{tool} -dc {} failed: {}",
                    path.display(),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            Ok(out.stdout)
        }
    }
}

/// The `depends=` field of a module's `.modinfo` (NUL-separated `key=value` strings).
fn module_depends(elf: &[u8]) -> Vec<String> {
    const KEY: &[u8] = b"\0depends=";
    let Some(at) = elf.windows(KEY.len()).position(|w| w == KEY) else {
        return Vec::new();
    };
    let rest = &elf[at + KEY.len()..];
    let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .filter(|d| !d.is_empty())
        .map(|d| d.replace('-', "_"))
        .collect()
}

/// The shared libraries (and the dynamic loader) `ldd` lists for `binaries`.
fn shared_libraries(binaries: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut libs = Vec::new();
    for bin in binaries {
        let out = cmd::output(Command::new("ldd").arg(bin))?;
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" or "/lib64/ld-linux-x86-64.so.2 (0x…)"
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next(),
                None => line.split_whitespace().next(),
            };
            if let Some(p) = path.filter(|p| p.starts_with('/')) {
                libs.push(PathBuf::from(p));
            }
        }
    }
    libs.sort();
    libs.dedup();
    Ok(libs)
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent)?;
    }
    // Follows symlinks: the guest gets the file under the name the binary asks for.
    fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    Ok(())
}

/// `path` with `.` and `..` components resolved by name, as the kernel resolves a path whose
/// directories all exist (no symlinks involved).
fn lexically_normal(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// Copies the regular files under `from` to `to`, following symlinks.
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    for entry in fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let path = entry?.path();
        let target = to.join(path.file_name().expect("directory entries have names"));
        if path.is_dir() {
            copy_tree(&path, &target)?;
        } else {
            copy(&path, &target)?;
        }
    }
    Ok(())
}

fn chmod_x(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

fn shell_quote(path: &Path) -> String {
    format!("'{}'", path.to_string_lossy().replace('\'', "'\\''"))
}

/// Boots the guest, echoes its console, and fails unless it reports success in time.
fn boot(work: &Path, kernel: &Kernel, initramfs: &Path, opts: &Options) -> Result<()> {
    let vmlinuz = kernel.vmlinuz();
    let log_path = work.join(format!("console-{}.log", kernel.release));
    let mut log = fs::File::create(&log_path)?;
    let mut c = Command::new("timeout");
    c.args([
        "--kill-after=10",
        &opts.timeout.to_string(),
        "qemu-system-x86_64",
    ])
    .args(["-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2"])
    .args(["-m", &opts.memory.to_string()])
    .arg("-kernel")
    .arg(&vmlinuz)
    .arg("-initrd")
    .arg(initramfs)
    .args([
        "-append",
        "console=ttyS0 panic=-1 loglevel=4",
        "-nodefaults",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    eprintln!(
        "xtask: booting {} ({}) under QEMU/TCG (timeout {} s); console in {}",
        kernel.release,
        kernel.package,
        opts.timeout,
        log_path.display()
    );
    let start = Instant::now();
    let mut child = c.spawn().context("starting qemu-system-x86_64")?;
    let stdout = child.stdout.take().expect("piped stdout");
    let mut verdict = None;
    let mut summary = Vec::new();
    let mut tests_started = None;
    let mut booted = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap_or_default();
        let line = line.trim_end_matches('\r');
        let elapsed = start.elapsed();
        println!("vm [{:7.2}] {line}", elapsed.as_secs_f64());
        writeln!(log, "[{:7.2}] {line}", elapsed.as_secs_f64())?;
        if let Some(rest) = line.strip_prefix("tcpscope-vm: ") {
            if let Some(k) = rest.strip_prefix("kernel ") {
                tests_started = Some(elapsed);
                booted = k.split(',').next().map(str::to_owned);
            }
            if let Some(v) = rest.strip_prefix("verdict ") {
                verdict = Some(v.to_owned());
            }
            summary.push(rest.to_owned());
        }
    }
    let status = child.wait()?;
    let total = start.elapsed();
    eprintln!(
        "xtask: vm summary ({}, {}):",
        kernel.release, kernel.package
    );
    for s in &summary {
        eprintln!("xtask:   {s}");
    }
    let boot = tests_started.unwrap_or(total);
    eprintln!(
        "xtask: vm boot {:.1} s, tests {:.1} s, total {:.1} s",
        boot.as_secs_f64(),
        (total - boot).as_secs_f64(),
        total.as_secs_f64()
    );
    if let Some(booted) = &booted
        && *booted != kernel.release
    {
        bail!("the guest runs {booted}, not {}", kernel.release);
    }
    match verdict.as_deref() {
        Some("pass") => Ok(()),
        Some(v) => bail!("tests failed in the {} guest ({v})", kernel.release),
        None if status.code() == Some(124) || total >= Duration::from_secs(opts.timeout) => bail!(
            "the {} guest did not finish within {} s (see {})",
            kernel.release,
            opts.timeout,
            log_path.display()
        ),
        None => bail!(
            "the {} guest stopped without a verdict ({status}; see {})",
            kernel.release,
            log_path.display()
        ),
    }
}

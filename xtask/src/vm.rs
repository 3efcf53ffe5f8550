//! `cargo xtask vm`: the kernel-facing tests on another kernel, in a QEMU guest.
//!
//! Production hosts run older kernels than a developer's machine (Debian 12: 6.1). This task
//! boots Debian's stock cloud kernel of a series, unmodified, with an initramfs holding
//! busybox, the iproute2 tools, the agent and the kernel-facing test binaries, and runs those
//! tests inside; it fails when any of them does.
//!
//! - The kernel package is fetched with `apt-get download` into the cache and unpacked there;
//!   nothing is installed on the host.
//! - QEMU runs with TCG (software emulation): hardware virtualization is not available
//!   everywhere (nested guests), TCG is. A hard timeout bounds every boot.
//! - Binaries keep their absolute host paths inside the guest (`env!("CARGO_BIN_EXE_…")` in
//!   the tests names the agent by its host path), with the shared libraries `ldd` lists.
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

use crate::{build, cmd, test, toolchain};

/// Test targets of `tcp-user` run in the guest: every one that loads the programs into the
/// kernel, except the latency tests (their oracle, tshark, brings 160 MB of libraries, and
/// their timing tolerances are for real CPUs, not an emulated one).
pub const VM_TESTS: &[&str] = &[
    "test_run",
    "attach",
    "ss_agreement",
    "exporter",
    "syn_flood",
    "mirror_replay",
];

/// Host packages this task uses, each with a binary that proves it is installed.
const PACKAGES: &[(&str, &str)] = &[
    ("qemu-system-x86", "/usr/bin/qemu-system-x86_64"),
    ("busybox-static", "/bin/busybox"),
    ("cpio", "/usr/bin/cpio"),
    ("iproute2", "/usr/sbin/ip"),
    ("ethtool", "/usr/sbin/ethtool"),
    ("prometheus", "/usr/bin/promtool"),
    ("hping3", "/usr/sbin/hping3"),
    ("tcpreplay", "/usr/bin/tcpreplay"),
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
];

/// Kernel modules the tests need that Debian builds as modules (veth pairs, the `clsact`
/// qdisc and `cls_bpf` for TC attach without TCX). None depends on another.
const MODULES: &[&str] = &[
    "drivers/net/veth.ko",
    "net/sched/sch_ingress.ko",
    "net/sched/cls_bpf.ko",
];

/// The guest's init script.
const INIT: &str = include_str!("vm-init.sh");

/// Debian 12's kernel series, the oldest the tracker supports.
const DEFAULT_SERIES: &str = "6.1";
/// A full run takes about 4 min under TCG on 2 CPUs; the limit leaves room for slower hosts.
const DEFAULT_TIMEOUT_SECS: u64 = 900;
/// The default flow tables take about 70 MiB; the tests and their tools fit in the rest.
const DEFAULT_MEMORY_MIB: u32 = 2048;

/// Options of `cargo xtask vm`.
#[derive(Debug, Args)]
pub struct Options {
    /// Kernel series: Debian's newest `linux-image-<SERIES>.0-*-cloud-amd64-unsigned`.
    #[arg(long, default_value = DEFAULT_SERIES, value_name = "SERIES")]
    pub kernel: String,
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

impl Default for Options {
    fn default() -> Self {
        Self {
            kernel: DEFAULT_SERIES.into(),
            timeout: DEFAULT_TIMEOUT_SECS,
            memory: DEFAULT_MEMORY_MIB,
            filter: None,
        }
    }
}

/// A kernel unpacked from its Debian package.
struct Kernel {
    /// `uname -r` of the kernel, e.g. `6.1.0-56-cloud-amd64`.
    release: String,
    /// Root of the unpacked package (`boot/`, `lib/modules/`).
    root: PathBuf,
}

/// Runs the kernel-facing tests in a guest; fails when the guest does not report success.
pub fn vm(opts: &Options) -> Result<()> {
    test::ensure_packages(PACKAGES)?;
    let kernel = fetch_kernel(&opts.kernel)?;
    let object = build::build_ebpf()?;
    let tests = build_tests(&object)?;
    let work = cmd::workspace_root().join("target/vm");
    let initramfs = build_initramfs(&work, &kernel, &tests, opts.filter.as_deref())?;
    boot(&work, &kernel, &initramfs, opts)
}

/// The newest package of `series` apt knows, downloaded and unpacked into the cache once.
fn fetch_kernel(series: &str) -> Result<Kernel> {
    if !series.chars().all(|c| c.is_ascii_digit() || c == '.') || series.is_empty() {
        bail!("--kernel takes a series such as 6.1, not {series:?}");
    }
    let cache = toolchain::cache_dir()?.join("vm");
    let pattern = format!(
        "^linux-image-{}\\.0-[0-9]+-cloud-amd64-unsigned$",
        series.replace('.', "\\.")
    );
    let search = || {
        cmd::stdout_of(Command::new("apt-cache").args(["search", "--names-only", &pattern]))
            .unwrap_or_default()
    };
    let mut found = search();
    if found.is_empty() {
        // A fresh machine may have no package lists yet.
        cmd::run(Command::new("apt-get").args(["update", "-q"]))?;
        found = search();
    }
    let package = found
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .max_by_key(|name| abi_number(name))
        .with_context(|| format!("apt knows no Debian cloud kernel of series {series}"))?
        .to_owned();
    let release = package
        .strip_prefix("linux-image-")
        .and_then(|s| s.strip_suffix("-unsigned"))
        .context("unexpected kernel package name")?
        .to_owned();
    let root = cache.join(&release);
    if root
        .join("boot")
        .join(format!("vmlinuz-{release}"))
        .exists()
    {
        return Ok(Kernel { release, root });
    }
    let debs = cache.join("debs");
    fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
    let deb = |dir: &Path| -> Option<PathBuf> {
        fs::read_dir(dir)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb"))
            })
    };
    if deb(&debs).is_none() {
        cmd::run(
            Command::new("apt-get")
                .args(["download", "-q", &package])
                .current_dir(&debs),
        )?;
    }
    let deb = deb(&debs).context("apt-get download left no .deb")?;
    let partial = cache.join(format!("{release}.partial"));
    let _ = fs::remove_dir_all(&partial);
    cmd::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial))?;
    fs::rename(&partial, &root).with_context(|| format!("moving into {}", root.display()))?;
    Ok(Kernel { release, root })
}

/// The ABI number of a package name (`linux-image-6.1.0-56-…` → 56).
fn abi_number(name: &str) -> u32 {
    name.split('-')
        .nth(3)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Builds the agent and the [`VM_TESTS`] binaries; returns `(target name, executable)`.
fn build_tests(object: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut c = cmd::cargo_stable()?;
    c.args([
        "test",
        "--no-run",
        "--message-format=json",
        "-p",
        "tcp-user",
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

    let agent = cmd::workspace_root().join("target/debug/tcpscope");
    let mut binaries: Vec<PathBuf> = GUEST_TOOLS.iter().map(PathBuf::from).collect();
    binaries.push(agent);
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
    // The capture tests find `../shared/pcaps` from the crate's directory, by the path
    // compiled into them: both exist under the same names in the guest.
    let crate_dir = cmd::workspace_root().join("tcp-user");
    fs::create_dir_all(under(&root, &crate_dir))?;
    let pcaps = cmd::workspace_root().join("../shared/pcaps");
    if pcaps.is_dir() {
        let normal = lexically_normal(&pcaps);
        copy_tree(&pcaps, &under(&root, &normal))?;
    }
    fs::write(root.join("tests/filter"), filter.unwrap_or(""))?;
    for lib in shared_libraries(&binaries)? {
        copy(&lib, &under(&root, &lib))?;
    }

    let modules = kernel
        .root
        .join("lib/modules")
        .join(&kernel.release)
        .join("kernel");
    let mut list = String::new();
    for m in MODULES {
        let name = Path::new(m).file_name().expect("module path has a name");
        copy(&modules.join(m), &root.join("lib/modules").join(name))?;
        list.push_str(&format!("/lib/modules/{}\n", name.to_string_lossy()));
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
    let vmlinuz = kernel
        .root
        .join("boot")
        .join(format!("vmlinuz-{}", kernel.release));
    let log_path = work.join("console.log");
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
        "xtask: booting {} under QEMU/TCG (timeout {} s); console in {}",
        kernel.release,
        opts.timeout,
        log_path.display()
    );
    let start = Instant::now();
    let mut child = c.spawn().context("starting qemu-system-x86_64")?;
    let stdout = child.stdout.take().expect("piped stdout");
    let mut verdict = None;
    let mut summary = Vec::new();
    let mut tests_started = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap_or_default();
        let line = line.trim_end_matches('\r');
        let elapsed = start.elapsed();
        println!("vm [{:7.2}] {line}", elapsed.as_secs_f64());
        writeln!(log, "[{:7.2}] {line}", elapsed.as_secs_f64())?;
        if let Some(rest) = line.strip_prefix("tcpscope-vm: ") {
            if rest.starts_with("kernel ") {
                tests_started = Some(elapsed);
            }
            if let Some(v) = rest.strip_prefix("verdict ") {
                verdict = Some(v.to_owned());
            }
            summary.push(rest.to_owned());
        }
    }
    let status = child.wait()?;
    let total = start.elapsed();
    eprintln!("xtask: vm summary ({}):", kernel.release);
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

//! `cargo xtask test`: every test tier.
//!
//! 1. pure unit and property tests (tcp-common, the agent's helpers);
//! 2. the loaded programs fed crafted frames through `BPF_PROG_TEST_RUN`;
//! 3. root integration tests: real attach, real TCP between network namespaces;
//! 4. the kernel-facing tests of tier 2 and 3 again, in a QEMU guest running Debian 12's stock
//!    6.1 kernel (`cargo xtask vm`), the oldest kernel the tracker supports.
//!
//! Tiers 2 and 3 need root. As root, missing Debian packages are installed and bpffs is
//! mounted; otherwise the test binaries run through `sudo -n`, and a missing package list is
//! printed for the user to install.

use std::{fs, process::Command};

use anyhow::{Context as _, Result, bail};
use clap::Args;

use crate::{build, cmd, vm};

/// Debian packages the tests use, each with a binary that proves it is installed.
const PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "/usr/sbin/ip"),
    ("ethtool", "/usr/sbin/ethtool"),
    ("tcpreplay", "/usr/bin/tcpreplay"),
    // prometheus (with promtool): the real scraper of the exporter tests.
    ("prometheus", "/usr/bin/promtool"),
    ("hping3", "/usr/sbin/hping3"),
    // tshark: handshake-latency oracle (tcp.analysis.initial_rtt).
    ("tshark", "/usr/bin/tshark"),
];

/// Options of `cargo xtask test`.
#[derive(Debug, Args)]
pub struct Options {
    /// Only run tests whose name contains this string (in the VM tier too).
    pub filter: Option<String>,
    /// Skip the VM tier (tier 4).
    #[arg(long)]
    pub no_vm: bool,
}

fn root_prefix() -> Vec<&'static str> {
    if cmd::is_root() {
        vec![]
    } else {
        vec!["sudo", "-n"]
    }
}

fn command(argv: &[&str]) -> Command {
    let mut all = root_prefix();
    all.extend_from_slice(argv);
    let mut c = Command::new(all[0]);
    c.args(&all[1..]);
    c
}

/// Installs those of `packages` (name, binary that proves it) that are missing.
pub fn ensure_packages(packages: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(_, probe)| !std::path::Path::new(probe).exists())
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let can_root =
        cmd::is_root() || cmd::stdout_of(Command::new("sudo").args(["-n", "true"])).is_some();
    if !can_root {
        bail!(
            "missing Debian packages: {}; install them with \
             `sudo apt-get install -y {}` (or run as root)",
            missing.join(" "),
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    let mut install = vec!["apt-get", "install", "-y", "-q", "--no-install-recommends"];
    install.extend_from_slice(&missing);
    let first = cmd::output(command(&install).env("DEBIAN_FRONTEND", "noninteractive"))?;
    if !first.status.success() {
        // Fresh machines have no package lists yet.
        cmd::run(&mut command(&["apt-get", "update", "-q"]))?;
        cmd::run(command(&install).env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    Ok(())
}

/// Mounts bpffs on /sys/fs/bpf when it is not there.
pub fn ensure_bpffs() -> Result<()> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    if mounts.lines().any(|l| {
        l.split_whitespace().nth(1) == Some("/sys/fs/bpf")
            && l.split_whitespace().nth(2) == Some("bpf")
    }) {
        return Ok(());
    }
    cmd::run(&mut command(&["mount", "-t", "bpf", "bpf", "/sys/fs/bpf"]))
}

/// Runs every tier.
pub fn test(opts: &Options) -> Result<()> {
    ensure_packages(PACKAGES)?;
    ensure_bpffs()?;
    let object = build::build_ebpf()?;
    let mut c = cmd::cargo_stable()?;
    c.args(["test", "--no-fail-fast"])
        .env("TCPSCOPE_EBPF_OBJ", &object);
    if !cmd::is_root() {
        eprintln!("xtask: not root: test binaries run through `sudo -n -E`");
        c.env("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER", "sudo -n -E");
    }
    // Root tiers share kernel state (interfaces, namespaces, the 2 CPUs' time): one test at
    // a time keeps them independent and their timing honest.
    c.args(["--", "--test-threads=1"]);
    if let Some(filter) = &opts.filter {
        c.arg(filter);
    }
    let host = cmd::run(&mut c);
    if opts.no_vm {
        return host;
    }
    // The VM tier runs even when a host test failed: both verdicts are worth having.
    let guest = vm::vm(&vm::Options {
        filter: opts.filter.clone(),
        ..vm::Options::default()
    });
    match (host, guest) {
        (Ok(()), Ok(())) => Ok(()),
        (Err(e), Ok(())) => Err(e),
        (Ok(()), Err(e)) => Err(e.context("the VM tier failed")),
        (Err(h), Err(g)) => bail!("{h:#}; the VM tier failed too: {g:#}"),
    }
}

//! `cargo xtask test`: every test tier.
//!
//! 1. pure unit and property tests (tcp-common, the agent's helpers): what plain `cargo test`
//!    runs, without root;
//! 2. the loaded programs fed crafted frames through `BPF_PROG_TEST_RUN`;
//! 3. root integration tests: real attach, real TCP between network namespaces;
//! 4. the kernel-facing tests of tier 2 and 3 again, in QEMU guests running each pinned Debian
//!    kernel (`cargo xtask vm`): 6.1, the oldest the tracker supports, and 6.12.
//!
//! Tiers 2 and 3 are the `tcp-tests` package, outside the workspace's default members; this
//! task tests the whole workspace (the eBPF crate excepted), the agent those tests run built
//! first and named to them in `TCPSCOPE_AGENT` (the tests of one package cannot name another
//! package's binary at compile time).
//!
//! Tiers 2 and 3 need root. As root, missing Debian packages are installed and bpffs is
//! mounted; otherwise the test binaries run through `sudo -n`, and a missing package list is
//! printed for the user to install.
//!
//! No silent passes: what the tests need from the machine ([`PREREQUISITES`]) is checked up
//! front, and a missing one fails the run unless `TCPSCOPE_ALLOW_SKIP` names it; the tests that
//! depend on it then skip, and the summary says so.

use anyhow::{Result, bail};
use clap::Args;

use crate::{
    build, cmd, dist,
    host::{self, AGENT, ALLOW_SKIP, DIST, pcaps_dir},
    kernels, toolchain, vm,
};

/// A prerequisite of the tests that xtask cannot provide.
struct Prerequisite {
    /// Its name in [`ALLOW_SKIP`].
    name: &'static str,
    /// What the tests lose without it.
    needed_by: &'static str,
    /// `None` when met, else what is missing.
    check: fn() -> Option<String>,
}

/// Everything the tests need that set-up cannot install.
const PREREQUISITES: &[Prerequisite] = &[
    Prerequisite {
        name: "pcaps",
        needed_by: "replay_truth, mirror_replay and the latency capture test",
        check: || {
            let dir = pcaps_dir();
            (!dir.join("truth").is_dir() || !dir.join("captures").is_dir())
                .then(|| format!("the public captures are not at {}", dir.display()))
        },
    },
    Prerequisite {
        name: "cpus",
        needed_by: "the two-CPU streaming test of ss_agreement",
        check: || {
            let n = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
            (n < 2).then(|| format!("this machine has {n} CPU, the tests need 2"))
        },
    },
];

/// Checks [`PREREQUISITES`]; returns those skipped on request, as lines for the summary.
fn check_prerequisites() -> Result<Vec<String>> {
    let allowed = std::env::var(ALLOW_SKIP).unwrap_or_default();
    let allowed: Vec<&str> = allowed.split(',').map(str::trim).collect();
    let mut skipped = Vec::new();
    let mut missing = Vec::new();
    for p in PREREQUISITES {
        let Some(why) = (p.check)() else { continue };
        if allowed.contains(&p.name) {
            skipped.push(format!("{} ({why}): {} skip", p.name, p.needed_by));
        } else {
            missing.push(format!(
                "{why} (needed by {}; {ALLOW_SKIP}={} skips them)",
                p.needed_by, p.name
            ));
        }
    }
    if !missing.is_empty() {
        bail!("missing test prerequisites: {}", missing.join("; "));
    }
    Ok(skipped)
}

/// Options of `cargo xtask test`.
#[derive(Debug, Args)]
pub struct Options {
    /// Only run tests whose name contains this string (in the VM tier too).
    pub filter: Option<String>,
    /// Skip the VM tier (tier 4).
    #[arg(long)]
    pub no_vm: bool,
}

/// Runs every tier.
pub fn test(opts: &Options) -> Result<()> {
    let skipped = check_prerequisites()?;
    host::ensure_packages(host::Task::Test)?;
    host::ensure_bpffs()?;
    let object = build::build_ebpf()?;
    let agent = build::build_agent(&object, false)?;
    let archive = dist::native_archive()?;
    let mut c = toolchain::cargo_stable()?;
    c.args([
        "test",
        "--workspace",
        "--exclude",
        "tcp-ebpf",
        "--no-fail-fast",
    ])
    .env("TCPSCOPE_EBPF_OBJ", &object)
    .env(AGENT, &agent)
    .env(DIST, &archive);
    if !host::is_root() {
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
    // The VM tiers run even when a host test failed: every verdict is worth having.
    let mut failures = Vec::new();
    if let Err(e) = host {
        failures.push(format!("{e:#}"));
    }
    if !opts.no_vm {
        for pin in kernels::PINS {
            let guest = vm::vm(&vm::Options::pinned(pin.series, opts.filter.clone()));
            if let Err(e) = guest {
                failures.push(format!("the {} VM tier failed: {e:#}", pin.series));
            }
        }
    }
    for s in &skipped {
        eprintln!("xtask: SKIPPED on request ({ALLOW_SKIP}): {s}");
    }
    if failures.is_empty() {
        Ok(())
    } else {
        bail!("{}", failures.join("; "))
    }
}

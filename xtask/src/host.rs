//! What the tasks need from the machine, and setting it up: Debian packages (one list, each
//! with the tasks that need it), bpffs, root, and the names the tests read from the
//! environment. Idempotent: a machine that has everything is left as it is.

use std::{fs, path::PathBuf, process::Command};

use anyhow::{Context as _, Result, bail};

use crate::cmd;

/// A task that needs packages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    /// `cargo xtask test` (host tiers).
    Test,
    /// `cargo xtask vm` (the guests get the host's tools).
    Vm,
    /// `cargo xtask bench`.
    Bench,
    /// `cargo xtask dist` for an architecture other than this machine's (a C cross compiler
    /// for ring, the TLS library's crypto).
    DistCross,
}

/// A Debian package, the binary that proves it is installed, and the tasks that need it.
struct Package {
    name: &'static str,
    probe: &'static str,
    tasks: &'static [Task],
}

use Task::{Bench, DistCross, Test, Vm};

/// Every Debian package a task uses.
const PACKAGES: &[Package] = &[
    // ring's C and assembly for aarch64-unknown-linux-musl (the link is rustc's lld).
    Package {
        name: "gcc-aarch64-linux-gnu",
        probe: "/usr/bin/aarch64-linux-gnu-gcc",
        tasks: &[DistCross],
    },
    Package {
        name: "iproute2",
        probe: "/usr/sbin/ip",
        tasks: &[Test, Vm, Bench],
    },
    Package {
        name: "ethtool",
        probe: "/usr/sbin/ethtool",
        tasks: &[Test, Vm, Bench],
    },
    Package {
        name: "tcpreplay",
        probe: "/usr/bin/tcpreplay",
        tasks: &[Test, Vm],
    },
    // prometheus (with promtool): the real scraper of the exporter tests.
    Package {
        name: "prometheus",
        probe: "/usr/bin/promtool",
        tasks: &[Test, Vm],
    },
    Package {
        name: "hping3",
        probe: "/usr/sbin/hping3",
        tasks: &[Test, Vm],
    },
    // curl and openssl: the metrics endpoint's TLS and basic-auth tests (the client, and the
    // test's certificates); host tiers only.
    Package {
        name: "curl",
        probe: "/usr/bin/curl",
        tasks: &[Test],
    },
    Package {
        name: "openssl",
        probe: "/usr/bin/openssl",
        tasks: &[Test],
    },
    // tshark: handshake-latency oracle (tcp.analysis.initial_rtt); host tiers only.
    Package {
        name: "tshark",
        probe: "/usr/bin/tshark",
        tasks: &[Test],
    },
    // nft: the life-cycle tests drop chosen segments (there is no netem here); the bench's
    // conntrack comparison adds a native nft rule.
    Package {
        name: "nftables",
        probe: "/usr/sbin/nft",
        tasks: &[Test, Vm, Bench],
    },
    // tcpdump: the life-cycle tests record what the agent saw, for replay.
    Package {
        name: "tcpdump",
        probe: "/usr/bin/tcpdump",
        tasks: &[Test, Vm],
    },
    // The deployment tests (`deploy`, host only): `systemd-analyze verify` and
    // `systemd-sysusers` on the unit's files; the image built FROM scratch with podman, and
    // run with runc (crun refuses on machines whose rlimits cannot be raised or whose cgroups
    // are hybrid).
    Package {
        name: "systemd",
        probe: "/usr/bin/systemd-analyze",
        tasks: &[Test],
    },
    Package {
        name: "podman",
        probe: "/usr/bin/podman",
        tasks: &[Test],
    },
    Package {
        name: "runc",
        probe: "/usr/sbin/runc",
        tasks: &[Test],
    },
    // The guests: the emulator, their userland and initramfs.
    Package {
        name: "qemu-system-x86",
        probe: "/usr/bin/qemu-system-x86_64",
        tasks: &[Vm],
    },
    Package {
        name: "busybox-static",
        probe: "/bin/busybox",
        tasks: &[Vm],
    },
    Package {
        name: "cpio",
        probe: "/usr/bin/cpio",
        tasks: &[Vm],
    },
    // Debian 13 ships its modules xz-compressed.
    Package {
        name: "xz-utils",
        probe: "/usr/bin/xz",
        tasks: &[Vm],
    },
    // The conntrack comparison: an iptables rule, flushing the table.
    Package {
        name: "iptables",
        probe: "/usr/sbin/iptables",
        tasks: &[Bench],
    },
    Package {
        name: "conntrack",
        probe: "/usr/sbin/conntrack",
        tasks: &[Bench],
    },
];

/// Lists the prerequisites a test run may skip (comma-separated); the tests read it too.
pub const ALLOW_SKIP: &str = "TCPSCOPE_ALLOW_SKIP";

/// Names the agent binary to the tests (and to the benchmark): tcp-testbed reads it.
pub const AGENT: &str = "TCPSCOPE_AGENT";
/// Names the release archive the dist tests take (tcp-testbed's `dist::DIST_ENV`).
pub const DIST: &str = "TCPSCOPE_DIST";

/// Where the public captures live: beside the repository.
pub fn pcaps_dir() -> PathBuf {
    cmd::workspace_root().join("../shared/pcaps")
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    cmd::stdout_of(Command::new("id").arg("-u")).as_deref() == Some("0")
}

/// `argv` as root: itself when root, else through `sudo -n`.
fn as_root(argv: &[&str]) -> Command {
    let mut all: Vec<&str> = if is_root() {
        vec![]
    } else {
        vec!["sudo", "-n"]
    };
    all.extend_from_slice(argv);
    let mut c = Command::new(all[0]);
    c.args(&all[1..]);
    c
}

/// Installs the packages `task` needs that are missing.
pub fn ensure_packages(task: Task) -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|p| p.tasks.contains(&task) && !std::path::Path::new(p.probe).exists())
        .map(|p| p.name)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let can_root = is_root() || cmd::stdout_of(Command::new("sudo").args(["-n", "true"])).is_some();
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
    let first = cmd::output(as_root(&install).env("DEBIAN_FRONTEND", "noninteractive"))?;
    if !first.status.success() {
        // Fresh machines have no package lists yet, or old ones.
        cmd::run(&mut as_root(&["apt-get", "update", "-q"]))?;
        cmd::run(as_root(&install).env("DEBIAN_FRONTEND", "noninteractive"))?;
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
    cmd::run(&mut as_root(&["mount", "-t", "bpf", "bpf", "/sys/fs/bpf"]))
}

//! Errors at the library boundary, each with what went wrong and the cause behind it.

use thiserror::Error;

/// What can fail while loading, attaching or reading the tracker.
#[derive(Debug, Error)]
pub enum Error {
    /// The kernel rejected the eBPF object (verifier, BTF, missing privileges).
    #[error("loading the eBPF object failed")]
    Load(#[source] aya::EbpfError),
    /// The running kernel is older than the oldest one the tracker supports.
    #[error("Linux {found} is too old: tcpscope needs {minimum} or newer ({missing})")]
    KernelTooOld {
        /// The running kernel's version.
        found: String,
        /// The oldest supported version.
        minimum: String,
        /// What an older kernel lacks.
        missing: &'static str,
    },
    /// The directory for pinned maps cannot be created.
    #[error(
        "creating the pin directory {dir:?} failed (is bpffs mounted on /sys/fs/bpf? `ip netns exec` remounts /sys without it: use `nsenter --net=/run/netns/NAME` or --pin-dir on a mounted bpffs)"
    )]
    PinDir {
        /// The directory.
        dir: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A directory of the pin path is not safe to pin in.
    #[error("refusing the pin directory {dir:?}: {why}")]
    PinDirUnsafe {
        /// The directory.
        dir: std::path::PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// Another agent holds the pin directory.
    #[error(
        "the pin directory {dir:?} is held by another tcpscope agent ({holder}): stop it, or give this one its own --pin-dir"
    )]
    PinDirBusy {
        /// The directory.
        dir: std::path::PathBuf,
        /// The holder, as far as `/proc/locks` tells.
        holder: String,
    },
    /// The kernel's socket table (sock_diag) could not be read.
    #[error("reading the kernel's socket table (sock_diag)")]
    SocketTable {
        /// Why.
        source: std::io::Error,
    },
    /// No tracker's maps are pinned where asked.
    #[error("no flow table pinned at {path:?} (is `tcpscope run` running with the same --pin-dir?{})", if found.is_empty() { String::new() } else { format!(" found there: {found}") })]
    NotPinned {
        /// Where the table was looked for.
        path: std::path::PathBuf,
        /// What the pin directory holds instead.
        found: String,
    },
    /// A program or map the agent expects is not in the object.
    #[error("the eBPF object has no {kind} named {name}")]
    Missing {
        /// "program" or "map".
        kind: &'static str,
        /// Its name.
        name: &'static str,
    },
    /// The verifier or the kernel refused a program.
    #[error("loading program {name} failed")]
    Program {
        /// Program name.
        name: &'static str,
        /// The kernel's answer.
        #[source]
        source: aya::programs::ProgramError,
    },
    /// No such network interface in this namespace.
    #[error("no network interface named {0:?}")]
    UnknownInterface(String),
    /// Attaching to an interface failed.
    #[error("attaching {hook} to {iface} failed")]
    Attach {
        /// Interface name.
        iface: String,
        /// Which hook, e.g. "XDP (native)".
        hook: String,
        /// The kernel's answer.
        #[source]
        source: aya::programs::ProgramError,
    },
    /// Reading a map failed.
    #[error("reading map {name} failed")]
    Map {
        /// Map name.
        name: &'static str,
        /// The kernel's answer.
        #[source]
        source: aya::maps::MapError,
    },
}

/// An error and its causes on one line.
#[must_use]
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

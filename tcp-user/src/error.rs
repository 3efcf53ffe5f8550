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
    /// The pin directory is not on bpffs, and it is not one this can mount.
    #[error(
        "the pin directory {dir:?} is not on bpffs ({checked:?} is on another filesystem; `ip netns exec` mounts a /sys without it): run this with `nsenter --net=/run/netns/NAME`, mount bpffs (`mount -t bpf bpf DIR`), or give --pin-dir on a mounted bpffs"
    )]
    NotBpffs {
        /// The pin directory.
        dir: std::path::PathBuf,
        /// Its nearest existing ancestor, which was checked.
        checked: std::path::PathBuf,
    },
    /// Mounting bpffs failed.
    #[error("mounting bpffs on {target:?} failed")]
    MountBpffs {
        /// The mount point.
        target: std::path::PathBuf,
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
        /// Whether that hook was native XDP (which the driver may lack).
        native_xdp: bool,
        /// The kernel's answer.
        #[source]
        source: aya::programs::ProgramError,
    },
    /// Another `tcpscope events` reads the event stream.
    #[error(
        "another `tcpscope events` is reading this agent's events ({holder}): a ring buffer has one reader"
    )]
    EventsBusy {
        /// The reader, as far as `/proc/locks` tells.
        holder: String,
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

impl Error {
    /// The OS error (errno) at the root of this error's causes, if any.
    #[must_use]
    pub fn os_error(&self) -> Option<i32> {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(c) = cause {
            let errno = if let Some(io) = c.downcast_ref::<std::io::Error>() {
                io.raw_os_error()
            } else if let Some(netlink) = c.downcast_ref::<aya::sys::NetlinkError>() {
                netlink.raw_os_error()
            } else {
                None
            };
            if errno.is_some() {
                return errno;
            }
            cause = c.source();
        }
        None
    }

    /// What to do about this error when its usual cause is known, to follow its message
    /// (empty otherwise).
    #[must_use]
    pub fn hint(&self) -> &'static str {
        let errno = self.os_error();
        match self {
            _ if errno == Some(libc::EPERM) => {
                " (run as root, or grant CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON)"
            }
            Self::Attach { .. } if matches!(errno, Some(libc::EBUSY | libc::EEXIST)) => {
                " (another XDP program, perhaps another tcpscope agent's, is attached to this \
                 interface: `ip link show` names it)"
            }
            Self::Attach {
                native_xdp: true, ..
            } => " (the driver may lack native XDP: try --xdp-mode skb)",
            _ => "",
        }
    }
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

#[cfg(test)]
mod tests {
    use aya::{programs::ProgramError, sys::SyscallError};

    use super::*;

    fn attach(native_xdp: bool, errno: i32) -> Error {
        Error::Attach {
            iface: "eth0".to_owned(),
            hook: "XDP".to_owned(),
            native_xdp,
            source: ProgramError::SyscallError(SyscallError {
                call: "bpf_link_create",
                io_error: std::io::Error::from_raw_os_error(errno),
            }),
        }
    }

    #[test]
    fn hints_follow_the_variant_and_the_errno_not_the_message() {
        assert_eq!(attach(false, libc::EBUSY).os_error(), Some(libc::EBUSY));
        assert!(
            attach(false, libc::EBUSY)
                .hint()
                .contains("another XDP program")
        );
        assert!(
            attach(true, libc::EEXIST)
                .hint()
                .contains("another XDP program")
        );
        assert!(attach(true, libc::EPERM).hint().contains("run as root"));
        assert!(attach(true, libc::EINVAL).hint().contains("--xdp-mode skb"));
        assert_eq!(attach(false, libc::EINVAL).hint(), "");
        // A refusal by the verifier (EACCES) is not a privilege problem.
        assert_eq!(attach(false, libc::EACCES).hint(), "");
        let missing = Error::UnknownInterface("eth9".to_owned());
        assert_eq!((missing.os_error(), missing.hint()), (None, ""));
    }
}

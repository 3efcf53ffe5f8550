//! Network namespaces: created and deleted, commands and threads run inside them, nft rules.

use std::{
    ffi::CString,
    fs::File,
    os::{
        fd::{AsRawFd as _, OwnedFd},
        unix::process::CommandExt as _,
    },
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
};

use anyhow::{Context as _, Result, bail};

use crate::{
    cmd::{try_run, try_sh, unique},
    procfs::TcpCounters,
};

/// A network namespace (`ip netns add`), deleted on drop with everything in it: interfaces,
/// routes, iptables/nft rules, conntrack entries.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    /// Creates a namespace named [`unique`]`(prefix)`, its loopback up.
    pub fn try_new(prefix: &str) -> Result<Self> {
        let ns = Self {
            name: unique(prefix),
        };
        try_sh(&["ip", "netns", "add", &ns.name])?;
        try_sh(&["ip", "-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// [`Self::try_new`], panicking on failure.
    pub fn new(prefix: &str) -> Self {
        Self::try_new(prefix).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// The namespace file (what `setns` takes).
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs `argv` inside the namespace (through `ip netns exec`: for tools that do not touch
    /// bpffs, which `ip netns exec` hides); its stdout if it exits 0.
    pub fn try_sh(&self, argv: &[&str]) -> Result<String> {
        let mut all = vec!["ip", "netns", "exec", &self.name];
        all.extend_from_slice(argv);
        try_sh(&all)
    }

    /// [`Self::try_sh`], panicking unless the command exits 0.
    pub fn sh(&self, argv: &[&str]) -> String {
        self.try_sh(argv).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// A command that runs `program` in this network namespace only. Unlike `ip netns exec`,
    /// the mount namespace stays the caller's, so bpffs at /sys/fs/bpf (the agent's pins)
    /// stays visible; the child execs `program` in place, so its pid is the program's own.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let path = CString::new(self.path().into_os_string().into_encoded_bytes())
            .expect("no NUL in a namespace path");
        let mut c = Command::new(program);
        // SAFETY: the closure only calls async-signal-safe functions (open, setns, close).
        unsafe {
            c.pre_exec(move || {
                let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let rc = libc::setns(fd, libc::CLONE_NEWNET);
                libc::close(fd);
                if rc != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        c
    }

    /// Runs `f` on a thread that has entered the namespace, and returns its result.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn(f)
            .join()
            .expect("thread inside the namespace panicked")
    }

    /// Starts `f` on a thread inside the namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> thread::JoinHandle<T> {
        let path = self.path();
        thread::spawn(move || {
            enter_netns(&path);
            f()
        })
    }

    /// Moves the calling thread into the namespace until the guard is dropped. Only this
    /// thread moves: sockets it opens meanwhile, and what it reads under `/proc/thread-self/net`,
    /// belong to the namespace.
    pub fn enter_thread(&self) -> Result<NetnsGuard> {
        let original = File::open("/proc/thread-self/ns/net").context("opening own netns")?;
        try_enter_netns(&self.path())?;
        Ok(NetnsGuard {
            original: original.into(),
        })
    }

    /// The namespace's TCP counters (Tcp: from /proc/net/snmp, TcpExt: from /proc/net/netstat).
    pub fn tcp_counters(&self) -> TcpCounters {
        let snmp = self.sh(&["cat", "/proc/net/snmp"]);
        let netstat = self.sh(&["cat", "/proc/net/netstat"]);
        TcpCounters::parse(&(snmp + &netstat))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = try_run(&["ip", "netns", "del", &self.name]);
    }
}

/// Moves the calling thread into the network namespace at `path`.
pub fn try_enter_netns(path: &Path) -> Result<()> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: `f` is an open namespace file; setns changes only this thread's namespace.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!(
            "setns {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// [`try_enter_netns`], panicking on failure.
pub fn enter_netns(path: impl AsRef<Path>) {
    try_enter_netns(path.as_ref()).unwrap_or_else(|e| panic!("{e:#}"));
}

/// The calling thread is in another namespace while this lives; dropping it moves it back.
pub struct NetnsGuard {
    original: OwnedFd,
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        // SAFETY: `original` is the namespace file this thread came from.
        let rc = unsafe { libc::setns(self.original.as_raw_fd(), libc::CLONE_NEWNET) };
        // Staying in the wrong namespace would silently falsify everything after: stop.
        assert_eq!(
            rc,
            0,
            "returning to the original network namespace: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Applies an nft ruleset in `ns`.
pub fn nft(ns: &NetNs, rules: &str) {
    use std::io::Write as _;
    let mut child = ns
        .command("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("nft");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(rules.as_bytes())
        .expect("nft rules");
    assert!(child.wait().expect("nft").success(), "nft -f: {rules}");
}

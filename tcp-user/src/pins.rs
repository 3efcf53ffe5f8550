//! The pin directory: where an agent pins its maps, and who may use it.
//!
//! - **One per network namespace by default**: `/sys/fs/bpf/tcpscope/netns-<inode>`, the
//!   inode of the agent's network namespace (what `ls -iL /proc/self/ns/net` prints). Agents in
//!   two namespaces never share tables, so a 4-tuple present in both stays two records; `flows`
//!   and `stats` run in the same namespace find the same directory. (The kernel may give a
//!   namespace created later the inode of a deleted one, which then finds its pins.)
//! - **Safe**: every directory the agent creates on the way is 0700 whatever the umask, and
//!   an existing one below the bpffs mount that is owned by another user or writable by group
//!   or others is refused (whoever can write it can unlink the pins, or plant maps of their
//!   own for the agent to use); so is a symbolic link. The mount point itself (`/sys/fs/bpf`,
//!   0700 as systemd mounts it, 1777 with the sticky bit elsewhere) is not checked.
//! - **Held by one agent at a time**: an exclusive `flock` on the directory, which the kernel
//!   drops when the agent exits, however it exits. A second agent exits naming the first's
//!   process (from `/proc/locks`); `flows` and `stats` say when no agent holds the directory.
//! - **A failed start leaves nothing behind**: [`PinDir::discard`] removes the directories
//!   (and the pins in them) that this start created; a directory that was already there
//!   (an earlier run's tables) is left as it was.

use std::{
    fs::File,
    io,
    os::{
        fd::AsRawFd as _,
        unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _},
    },
    path::{Path, PathBuf},
};

use crate::error::Error;

/// Where the per-namespace default directories live.
pub const PIN_ROOT: &str = "/sys/fs/bpf/tcpscope";

/// The default pin directory of this process's network namespace.
///
/// # Errors
/// When `/proc/self/ns/net` cannot be read (no procfs).
pub fn default_dir() -> Result<PathBuf, Error> {
    let ns = std::fs::metadata("/proc/self/ns/net").map_err(|source| Error::PinDir {
        dir: PathBuf::from("/proc/self/ns/net"),
        source,
    })?;
    Ok(Path::new(PIN_ROOT).join(format!("netns-{}", ns.ino())))
}

/// A pin directory held by this process.
#[derive(Debug)]
pub struct PinDir {
    /// The locked directory (the lock lives as long as this descriptor).
    _lock: File,
    /// Directories this start created, outermost first.
    created: Vec<PathBuf>,
}

impl PinDir {
    /// Creates (0700) or checks every directory from below the bpffs mount down to this
    /// build's layout directory under `base`, then locks `base`.
    ///
    /// # Errors
    /// [`Error::PinDir`] when a directory cannot be created or read, [`Error::PinDirUnsafe`]
    /// for one owned by another user or writable by others, [`Error::PinDirBusy`] when another
    /// agent holds `base`.
    pub fn acquire(base: &Path) -> Result<Self, Error> {
        let layout = layout_dir(base);
        let mut missing = Vec::new();
        let mut at = Some(layout.as_path());
        while let Some(dir) = at.filter(|d| !d.exists()) {
            missing.push(dir.to_path_buf());
            at = dir.parent();
        }
        let mut created = Vec::new();
        let prepared = (|| {
            for dir in missing.iter().rev() {
                match std::fs::DirBuilder::new().mode(0o700).create(dir) {
                    Ok(()) => {
                        created.push(dir.clone());
                        // The umask may have taken the owner's bits too: set them exactly.
                        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                            .map_err(|source| io_err(dir, source))?;
                    }
                    // Created meanwhile by someone else: checked below like any other.
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(source) => return Err(io_err(dir, source)),
                }
            }
            check_path(&layout)
        })();
        if let Err(e) = prepared {
            remove(&created);
            return Err(e);
        }
        // No clean-up when another agent holds the directory: what this start created, that
        // agent may have found and used meanwhile.
        let lock = lock(base)?;
        Ok(Self {
            _lock: lock,
            created,
        })
    }

    /// Removes the directories this start created, with the pins in them, innermost first
    /// (for a start that failed: nothing of it stays behind).
    pub fn discard(self) {
        remove(&self.created);
    }
}

/// Removes `dirs` (outermost first, as created), innermost first: the innermost with what it
/// holds (the layout directory and this start's pins), the others only if empty by then (an
/// agent of another namespace may have made its own directory in one meanwhile).
fn remove(dirs: &[PathBuf]) {
    let Some((innermost, outer)) = dirs.split_last() else {
        return;
    };
    let _ = std::fs::remove_dir_all(innermost);
    for dir in outer.iter().rev() {
        let _ = std::fs::remove_dir(dir);
    }
}

/// Takes the exclusive lock on `base`.
fn lock(base: &Path) -> Result<File, Error> {
    let f = File::open(base).map_err(|source| io_err(base, source))?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(f);
    }
    let source = io::Error::last_os_error();
    if source.kind() == io::ErrorKind::WouldBlock {
        return Err(Error::PinDirBusy {
            dir: base.to_path_buf(),
            holder: holder_description(base),
        });
    }
    Err(io_err(base, source))
}

fn io_err(dir: &Path, source: io::Error) -> Error {
    Error::PinDir {
        dir: dir.to_path_buf(),
        source,
    }
}

/// Checks `dir` and its ancestors down from below the mount point of `dir`'s filesystem:
/// each must be owned by this user and not writable by group or others.
fn check_path(dir: &Path) -> Result<(), Error> {
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let mut at = Some(dir);
    while let Some(d) = at {
        // Not following symbolic links: a link is refused (below), whatever it points to.
        let meta = std::fs::symlink_metadata(d).map_err(|source| io_err(d, source))?;
        let parent = d.parent();
        let is_mount_root = match parent {
            None => true,
            Some(p) => std::fs::metadata(p).map_or(true, |pm| pm.dev() != meta.dev()),
        };
        if is_mount_root {
            break;
        }
        if !meta.is_dir() {
            return Err(Error::PinDirUnsafe {
                dir: d.to_path_buf(),
                why: "not a directory (symbolic links are not followed)".to_owned(),
            });
        }
        if meta.uid() != me {
            return Err(Error::PinDirUnsafe {
                dir: d.to_path_buf(),
                why: format!("owned by uid {}, not by this user (uid {me})", meta.uid()),
            });
        }
        if meta.mode() & 0o022 != 0 {
            return Err(Error::PinDirUnsafe {
                dir: d.to_path_buf(),
                why: format!(
                    "writable by group or others (mode {:o}): `chmod 0700` it if it is yours",
                    meta.mode() & 0o7777
                ),
            });
        }
        at = parent;
    }
    Ok(())
}

/// The process holding `dir`'s lock, as "pid N (COMMAND)", from `/proc/locks`.
pub(crate) fn holder_description(dir: &Path) -> String {
    holder_pid(dir).map_or_else(
        || "another process".to_owned(),
        |pid| {
            let cmd = std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                .map(|c| c.replace('\0', " ").trim().to_owned())
                .unwrap_or_default();
            if cmd.is_empty() {
                format!("pid {pid}")
            } else {
                format!("pid {pid}: {cmd}")
            }
        },
    )
}

/// The pid that holds a `flock` on `dir`, if `/proc/locks` shows one.
pub(crate) fn holder_pid(dir: &Path) -> Option<u32> {
    let meta = std::fs::metadata(dir).ok()?;
    let dev = meta.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let want = format!("{major:02x}:{minor:02x}:{}", meta.ino());
    std::fs::read_to_string("/proc/locks")
        .ok()?
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // "1: FLOCK  ADVISORY  WRITE 9091 00:27:1451677 0 EOF"
            (f.get(1) == Some(&"FLOCK") && f.get(5) == Some(&want.as_str()))
                .then(|| f.get(4)?.parse().ok())
                .flatten()
        })
}

/// Whether an agent holds `dir` now, as `/proc/locks` shows (read only: taking even a shared
/// lock to find out could make an agent starting at that moment fail). `None` when the
/// directory does not exist.
#[must_use]
pub fn held_by_an_agent(dir: &Path) -> Option<bool> {
    dir.exists().then(|| holder_pid(dir).is_some())
}

/// Where the maps of this build's layout are pinned under `base`: a directory per layout
/// version, so that an agent never opens maps written by an incompatible build.
#[must_use]
pub fn layout_dir(base: &Path) -> PathBuf {
    base.join(format!("v{}", tcp_common::LAYOUT_VERSION))
}

/// The layout directories under `base` other than this build's (`v2`, ...).
pub(crate) fn other_layouts(base: &Path) -> Vec<String> {
    let ours = layout_dir(base);
    let Ok(entries) = std::fs::read_dir(base) else {
        return Vec::new();
    };
    let mut found: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|e| e.path() != ours)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            n.strip_prefix('v')
                .is_some_and(|v| v.parse::<u32>().is_ok())
        })
        .collect();
    found.sort();
    found
}

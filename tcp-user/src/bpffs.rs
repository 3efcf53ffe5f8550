//! Making sure the pin directory is on bpffs, as bpftool and Cilium do.
//!
//! `ip netns exec NS …` runs its command in a mount namespace of its own where `/sys` is a
//! fresh sysfs: `/sys/fs/bpf` is then an empty directory of sysfs, not bpffs. When the pin
//! directory is under `/sys/fs/bpf` and that is not bpffs, `run` mounts a new bpffs (mode 0700)
//! there and says so. The mount is in the agent's mount namespace only (the kernel lets no
//! process mount another namespace's bpffs): its pins last as long as that namespace, so the
//! agent still tracks and serves metrics, but a restart starts from empty tables and `flows` /
//! `stats` started by another `ip netns exec` do not see them (`nsenter --net=/run/netns/NS`
//! keeps the host's mounts and has neither limit).
//!
//! On a host that simply has no bpffs mounted (the agent in pid 1's mount namespace), the new
//! bpffs stays mounted after the agent, as bpftool's does, and the pins persist.
//!
//! A pin directory elsewhere that is not on bpffs is refused with a clear error, as is one
//! under an unmounted `/sys/fs/bpf` for the commands that only read pins.

use std::{
    ffi::CString,
    io,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use crate::error::Error;

/// Where bpffs is mounted by convention.
pub const MOUNT_POINT: &str = "/sys/fs/bpf";

/// `statfs.f_type` of bpffs (`BPF_FS_MAGIC` in linux/magic.h).
const BPF_FS_MAGIC: u64 = 0xcafe_4a11;

/// What [`ensure`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mounted {
    /// Nothing: the directory was on bpffs.
    Already,
    /// Mounted a new bpffs on [`MOUNT_POINT`], in a mount namespace of this process's own
    /// (`ip netns exec`): its pins go with the process.
    NewBpffs,
    /// Mounted a new bpffs on [`MOUNT_POINT`] in pid 1's mount namespace (the host had none):
    /// it stays, as bpftool's does.
    NewHostBpffs,
}

/// Whether `path` (which must exist) is on bpffs.
fn on_bpffs(path: &Path) -> io::Result<bool> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: all-zero is a valid `statfs` (integers), which the call fills.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a `statfs` owned by this frame.
    if unsafe { libc::statfs(c.as_ptr(), &raw mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(
        clippy::unnecessary_cast,
        reason = "f_type is i64 with glibc, u64 with musl"
    )]
    Ok(st.f_type as u64 == BPF_FS_MAGIC)
}

/// The nearest ancestor of `dir` that exists (`dir` itself when it does).
fn existing_ancestor(dir: &Path) -> &Path {
    dir.ancestors()
        .find(|d| d.exists())
        .unwrap_or_else(|| Path::new("/"))
}

fn mount_bpffs() -> io::Result<()> {
    let source = CString::new("bpf").expect("no NUL");
    let target = CString::new(MOUNT_POINT).expect("no NUL");
    let fstype = CString::new("bpf").expect("no NUL");
    let data = CString::new("mode=0700").expect("no NUL");
    // SAFETY: NUL-terminated strings alive for the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            data.as_ptr().cast(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Makes sure `dir` (a pin directory, which may not exist yet) is on bpffs: when `mount_new`
/// (the agent), mounts a new bpffs on [`MOUNT_POINT`] when `dir` is below it and it is missing
/// there (see the module's text).
///
/// # Errors
/// [`Error::NotBpffs`] when `dir` is not on bpffs and this cannot mount it,
/// [`Error::MountBpffs`] when mounting fails.
pub fn ensure(dir: &Path, mount_new: bool) -> Result<Mounted, Error> {
    let at = existing_ancestor(dir);
    let not_bpffs = || Error::NotBpffs {
        dir: dir.to_path_buf(),
        checked: at.to_path_buf(),
    };
    if on_bpffs(at).map_err(|source| Error::PinDir {
        dir: at.to_path_buf(),
        source,
    })? {
        return Ok(Mounted::Already);
    }
    let mount_point = Path::new(MOUNT_POINT);
    // Only the conventional place, and only when nothing of the pin path exists below it
    // yet (a directory there on another filesystem is someone's, not a missing mount).
    if !mount_new || !dir.starts_with(mount_point) || at != mount_point {
        return Err(not_bpffs());
    }
    let failed = |source| Error::MountBpffs {
        target: PathBuf::from(MOUNT_POINT),
        source,
    };
    mount_bpffs().map_err(failed)?;
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
    if ns("self").is_some() && ns("self") == ns("1") {
        Ok(Mounted::NewHostBpffs)
    } else {
        Ok(Mounted::NewBpffs)
    }
}

/// The line to log for what [`ensure`] did (none when it did nothing).
#[must_use]
pub fn describe(mounted: &Mounted) -> Option<String> {
    let why = "bpffs was not mounted on /sys/fs/bpf in this mount namespace (`ip netns exec` \
               mounts a fresh /sys)";
    match mounted {
        Mounted::Already => None,
        Mounted::NewHostBpffs => Some(
            "bpffs was not mounted on /sys/fs/bpf: mounted a new bpffs there (it stays after \
             the agent, for its pins)"
                .to_owned(),
        ),
        Mounted::NewBpffs => Some(format!(
            "{why}: mounted a new bpffs there, in this mount namespace only: the pins last as \
             long as this agent, and `flows` / `stats` see them only from this mount namespace \
             (start the agent with `nsenter --net=/run/netns/NAME` to keep the host's bpffs)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pin_directory_off_bpffs_elsewhere_is_refused_not_mounted() {
        let dir = std::env::temp_dir().join("tcpscope-not-bpffs/pins");
        match ensure(&dir, true) {
            Err(Error::NotBpffs { checked, .. }) => assert!(checked.exists()),
            other => panic!("{other:?}"),
        }
    }
}

//! What a run needs from the machine: root, the public captures, a second CPU; and the
//! prerequisites a run may go without when asked to ([`ALLOW_SKIP`]).

use std::{
    num::NonZero,
    path::{Path, PathBuf},
    thread,
};

/// Names the prerequisites a run may go without (comma-separated: `pcaps`, `cpus`); set by
/// whoever runs the suite, reported by `cargo xtask test`.
pub const ALLOW_SKIP: &str = "TCPSCOPE_ALLOW_SKIP";

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Panics unless running as root (xtask runs these tests as root).
pub fn require_root() {
    assert!(
        is_root(),
        "root integration tests need root: run them through `cargo xtask test`"
    );
}

/// `Ok(())` when the prerequisite `name` is met (`missing` is `None`). When it is not, the test
/// fails, unless [`ALLOW_SKIP`] names it: then it prints SKIPPED and the caller returns.
fn prerequisite(name: &str, missing: Option<String>) -> Result<(), ()> {
    let Some(why) = missing else { return Ok(()) };
    let allowed = std::env::var(ALLOW_SKIP).unwrap_or_default();
    assert!(
        allowed.split(',').any(|a| a.trim() == name),
        "{why}; set {ALLOW_SKIP}={name} to skip the tests that need it"
    );
    eprintln!("SKIPPED ({ALLOW_SKIP}={name}): {why}");
    Err(())
}

/// The public captures and their truth, beside the repository (`../shared/pcaps`); `None`
/// only when they are absent and skipping was asked for.
///
/// The path is compiled in from the workspace root, the same as `cargo xtask vm` gives the
/// captures in its guest.
pub fn pcaps_dir() -> Option<PathBuf> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tcp-testbed is inside the workspace");
    let dir = workspace.join("../shared/pcaps");
    let present = dir.join("truth").is_dir() && dir.join("captures").is_dir();
    let missing = (!present).then(|| format!("the public captures are not at {}", dir.display()));
    prerequisite("pcaps", missing).ok().map(|()| dir)
}

/// Whether the machine has two CPUs (false only when skipping was asked for).
pub fn two_cpus() -> bool {
    let n = thread::available_parallelism().map_or(1, NonZero::get);
    let missing = (n < 2).then(|| format!("this test needs two CPUs, the machine has {n}"));
    prerequisite("cpus", missing).is_ok()
}

//! Running commands, and the names and temporary directories of one test or benchmark process.

use std::{
    path::PathBuf,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, Result, bail};

/// A name unique to this process and call: `<prefix><pid>x<n>`. With a prefix of up to 4 bytes
/// it fits an interface name (15 bytes) for any pid (at most 7 digits: `pid_max` ≤ 2^22) and
/// the first 1,000 names of a process. The whole pid is kept so that [`crate::remove_stale`] can
/// tell whether the process that made a name still runs.
pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}x{n}", std::process::id())
}

/// Runs a command and returns its output, whatever the exit status; fails only when it cannot
/// be started.
pub fn try_run(argv: &[&str]) -> Result<Output> {
    Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .with_context(|| format!("starting {argv:?}"))
}

/// [`try_run`], panicking when the command cannot be started.
pub fn run(argv: &[&str]) -> Output {
    try_run(argv).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Runs a command; its stdout if it exits 0, else an error carrying its status and output.
pub fn try_sh(argv: &[&str]) -> Result<String> {
    let out = try_run(argv)?;
    if !out.status.success() {
        bail!(
            "{argv:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// [`try_sh`], panicking unless the command exits 0; returns its stdout.
pub fn sh(argv: &[&str]) -> String {
    try_sh(argv).unwrap_or_else(|e| panic!("{e:#}"))
}

/// A directory removed (with its contents) on drop.
pub struct RemoveOnDrop(pub PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

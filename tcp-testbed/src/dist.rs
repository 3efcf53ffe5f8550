//! The release archive of `cargo xtask dist`, as the tests take it: named in [`DIST_ENV`]
//! (which `cargo xtask test` and `cargo xtask vm` set), checked against its `SHA256SUMS`, and
//! extracted once per test process. Its static binary is what a deployment runs: the tests of
//! `deploy/` (the systemd unit's capabilities, the container image) run it too.

use std::{
    path::{Path, PathBuf},
    sync::OnceLock,
};

use anyhow::{Context as _, Result, ensure};

use crate::cmd::{RemoveOnDrop, try_run, unique};

/// Names the archive (`target/dist/tcpscope-VERSION-TARGET.tar.gz`).
pub const DIST_ENV: &str = "TCPSCOPE_DIST";

/// An extracted archive.
pub struct Dist {
    /// The archive.
    pub archive: PathBuf,
    /// Its top directory, once extracted (removed when the process ends).
    pub root: PathBuf,
    _cleanup: RemoveOnDrop,
}

impl Dist {
    /// The static binary.
    pub fn binary(&self) -> PathBuf {
        self.root.join("tcpscope")
    }
}

/// The archive [`DIST_ENV`] names, with `SHA256SUMS` checked and extracted under /tmp.
fn try_extract() -> Result<Dist> {
    let archive = PathBuf::from(std::env::var_os(DIST_ENV).with_context(|| {
        format!(
            "{DIST_ENV} is not set: run the tests through `cargo xtask test` (or `cargo xtask \
             dist --target x86_64-unknown-linux-musl` and name the archive in {DIST_ENV})"
        )
    })?);
    ensure!(archive.is_file(), "{} does not exist", archive.display());
    let dir = archive.parent().context("the archive's directory")?;
    let name = archive
        .file_name()
        .context("a file name")?
        .to_string_lossy();
    // Check this archive's line of SHA256SUMS (which may list other targets' too).
    let sums = std::fs::read_to_string(dir.join("SHA256SUMS")).context("reading SHA256SUMS")?;
    let line = sums
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(&*name))
        .with_context(|| format!("SHA256SUMS has no line for {name}"))?;
    let work = std::env::temp_dir().join(unique("tcpscope-dist-"));
    std::fs::create_dir_all(&work)?;
    let cleanup = RemoveOnDrop(work.clone());
    std::fs::write(work.join("SHA256SUMS"), format!("{line}\n"))?;
    std::fs::copy(&archive, work.join(&*name))?;
    let check = std::process::Command::new("sha256sum")
        .args(["-c", "SHA256SUMS"])
        .current_dir(&work)
        .output()
        .context("running sha256sum")?;
    ensure!(
        check.status.success(),
        "{name} does not match SHA256SUMS: {}",
        String::from_utf8_lossy(&check.stdout)
    );
    let out = try_run(&[
        "tar",
        "-xzf",
        &work.join(&*name).to_string_lossy(),
        "-C",
        &work.to_string_lossy(),
    ])?;
    ensure!(
        out.status.success(),
        "extracting {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stem = name.trim_end_matches(".tar.gz");
    let root = work.join(stem);
    ensure!(
        root.join("tcpscope").is_file(),
        "{name} has no {stem}/tcpscope"
    );
    Ok(Dist {
        archive,
        root,
        _cleanup: cleanup,
    })
}

/// The extracted archive (extracted at the first call; panics with the reason when it cannot
/// be).
pub fn dist() -> &'static Dist {
    static DIST: OnceLock<Dist> = OnceLock::new();
    DIST.get_or_init(|| try_extract().unwrap_or_else(|e| panic!("{e:#}")))
}

/// The archive's static binary ([`dist`]).
pub fn dist_binary() -> PathBuf {
    dist().binary()
}

/// Whether the ELF file at `path` is statically linked (see [`has_interpreter`]); panics when
/// it cannot be read or is no 64-bit little-endian ELF file.
pub fn is_static_elf(path: &Path) -> bool {
    !has_interpreter(path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()))
}

/// Whether the ELF file at `path` asks for a dynamic loader (has a `PT_INTERP` header): a
/// static binary does not.
pub fn has_interpreter(path: &Path) -> Result<bool> {
    let elf = std::fs::read(path)?;
    ensure!(
        elf.len() > 64 && elf[..4] == *b"\x7fELF" && elf[4] == 2 && elf[5] == 1,
        "{} is not a 64-bit little-endian ELF file",
        path.display()
    );
    let u16_at = |o: usize| usize::from(u16::from_le_bytes([elf[o], elf[o + 1]]));
    let u64_at = |o: usize| {
        usize::try_from(u64::from_le_bytes(
            elf[o..o + 8].try_into().expect("8 bytes"),
        ))
        .expect("fits")
    };
    let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    const PT_INTERP: u32 = 3;
    Ok((0..phnum).any(|i| {
        let at = phoff + i * phentsize;
        elf.get(at..at + 4)
            .is_some_and(|t| u32::from_le_bytes(t.try_into().expect("4 bytes")) == PT_INTERP)
    }))
}

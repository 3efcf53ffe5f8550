//! The binary a deployment runs: the static release build `cargo xtask dist` packs, named in
//! [`DIST_ENV`]; the tests of `deploy/` (the systemd unit's capabilities, the container image)
//! run it.

use std::path::PathBuf;

use crate::agent::agent_binary;

/// Names the dist binary (the `tcpscope` of the dist tarball).
pub const DIST_ENV: &str = "TCPSCOPE_DIST_BIN";

/// The dist binary: [`DIST_ENV`] when set (it must exist), else the agent the other tests run
/// ([`agent_binary`]), with a note on stderr.
pub fn dist_binary() -> PathBuf {
    if let Some(path) = std::env::var_os(DIST_ENV) {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "{DIST_ENV} names {}, which does not exist",
            path.display()
        );
        return path;
    }
    let path = agent_binary();
    eprintln!(
        "note: {DIST_ENV} is not set: using the agent binary {} in place of the dist binary",
        path.display()
    );
    path
}

/// Whether the ELF file at `path` is statically linked: it has no `PT_INTERP` program header
/// (no dynamic loader to name). Panics when it cannot be read or is no 64-bit little-endian ELF.
pub fn is_static_elf(path: &std::path::Path) -> bool {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    assert!(
        bytes.len() >= 64 && bytes[..4] == *b"\x7fELF" && bytes[4] == 2 && bytes[5] == 1,
        "{} is no 64-bit little-endian ELF file",
        path.display()
    );
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]);
    let u64_at =
        |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().expect("8 bytes")) as usize;
    const PT_INTERP: u32 = 3;
    let (phoff, phentsize, phnum) = (u64_at(0x20), usize::from(u16_at(0x36)), u16_at(0x38));
    (0..usize::from(phnum)).all(|i| {
        let at = phoff + i * phentsize;
        let kind = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        kind != PT_INTERP
    })
}

//! The guest kernels of the VM tier, pinned, and how they are fetched.
//!
//! A test run must boot the same kernel build on every machine, whatever day it is and whatever
//! the local apt index holds: "the newest 6.1 apt knows" changed under the suite once already
//! (a point release of 6.1 changed how `BPF_PROG_TEST_RUN` treats runt frames). So each series
//! names one exact Debian package, version and SHA-256, written once in [`PINS`].
//!
//! Fetching, in order, until a file with the pinned SHA-256 is in the cache:
//! 1. the cache itself (`~/.cache/tcpscope/vm/debs/`);
//! 2. the archive paths the pin lists, on `deb.debian.org`, fetched by apt's own downloader
//!    (`apt-helper download-file`, which honours the machine's apt proxy settings): this works
//!    whatever the local apt sources and index say, so a bookworm host fetches trixie's kernel;
//! 3. `apt-get download NAME=VERSION` through the local sources, after one `apt-get update`
//!    when the index does not know that version (a machine behind its own mirror).
//!
//! Moving a pin: take the new package's `Filename` and `SHA256` from the suite's `Packages`
//! index (`apt-cache show NAME=VERSION` prints both for a suite in the local sources), replace
//! the entry below, and run `cargo xtask vm --kernel SERIES`. `--kernel-package NAME=VERSION`
//! tries any build without editing anything and prints the fields a pin needs.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{cmd, toolchain};

/// Where the archive paths of [`Pin::paths`] are fetched from.
const MIRROR: &str = "http://deb.debian.org/";

/// One pinned kernel build.
#[derive(Clone, Copy, Debug)]
pub struct Pin {
    /// What `--kernel` calls it.
    pub series: &'static str,
    /// The Debian release that ships it (for messages).
    pub distribution: &'static str,
    /// Binary package name.
    pub package: &'static str,
    /// Package version.
    pub version: &'static str,
    /// SHA-256 of the `.deb`, from the archive's `Packages` index.
    pub sha256: &'static str,
    /// Paths of the `.deb` under [`MIRROR`], tried in order (the main archive keeps a version
    /// until the next point release; the security archive's pool keeps it longer).
    pub paths: &'static [&'static str],
}

/// The pinned guest kernels, oldest first. The first is the default of `cargo xtask vm`;
/// `cargo xtask test` boots every one.
pub const PINS: &[Pin] = &[
    Pin {
        series: "6.1",
        distribution: "Debian 12 (bookworm)",
        package: "linux-image-6.1.0-57-cloud-amd64-unsigned",
        version: "6.1.192-3",
        sha256: "e31a28be852fe1faec3cdbb0d19a25818f3b951d15dc13e331aeca4f991c52fe",
        paths: &[
            "debian-security/pool/updates/main/l/linux/linux-image-6.1.0-57-cloud-amd64-unsigned_6.1.192-3_amd64.deb",
        ],
    },
    Pin {
        series: "6.12",
        distribution: "Debian 13 (trixie)",
        package: "linux-image-6.12.117+deb13-cloud-amd64-unsigned",
        version: "6.12.117-1",
        sha256: "4113a615a1f1535ed4356ca03d428c74536b00f6ccb58e049a2ffd6a1cb3f1ad",
        paths: &[
            "debian/pool/main/l/linux/linux-image-6.12.117+deb13-cloud-amd64-unsigned_6.12.117-1_amd64.deb",
            "debian-security/pool/updates/main/l/linux/linux-image-6.12.117+deb13-cloud-amd64-unsigned_6.12.117-1_amd64.deb",
        ],
    },
];

/// The pin of `series`.
///
/// # Errors
/// When no kernel of that series is pinned.
pub fn pin(series: &str) -> Result<&'static Pin> {
    PINS.iter().find(|p| p.series == series).with_context(|| {
        let known: Vec<&str> = PINS.iter().map(|p| p.series).collect();
        format!(
            "no pinned kernel of series {series:?}; pinned: {} (or try any build with \
             --kernel-package NAME=VERSION)",
            known.join(", ")
        )
    })
}

/// Which build to boot.
#[derive(Clone, Debug)]
pub enum Choice {
    /// A pinned build.
    Pinned(&'static Pin),
    /// Any `NAME=VERSION` apt can fetch (unverified: its SHA-256 is printed, not checked).
    Package { name: String, version: String },
}

impl Choice {
    /// `NAME=VERSION` of `--kernel-package`.
    ///
    /// # Errors
    /// When the argument is not of that form or names no cloud kernel image.
    pub fn package(arg: &str) -> Result<Self> {
        let (name, version) = arg
            .split_once('=')
            .filter(|(n, v)| !n.is_empty() && !v.is_empty())
            .with_context(|| format!("--kernel-package takes NAME=VERSION, not {arg:?}"))?;
        if release_of(name).is_none() {
            bail!(
                "--kernel-package: {name:?} is not a Debian kernel image package \
                 (linux-image-…-cloud-amd64-unsigned)"
            );
        }
        Ok(Self::Package {
            name: name.to_owned(),
            version: version.to_owned(),
        })
    }

    /// `NAME=VERSION`, for messages.
    #[must_use]
    pub fn describe(&self) -> String {
        match self {
            Self::Pinned(p) => format!("{}={} (pinned, {})", p.package, p.version, p.distribution),
            Self::Package { name, version } => format!("{name}={version} (--kernel-package)"),
        }
    }

    fn name(&self) -> &str {
        match self {
            Self::Pinned(p) => p.package,
            Self::Package { name, .. } => name,
        }
    }

    fn version(&self) -> &str {
        match self {
            Self::Pinned(p) => p.version,
            Self::Package { version, .. } => version,
        }
    }
}

/// A kernel unpacked from its Debian package.
pub struct Kernel {
    /// `uname -r` of the kernel, e.g. `6.1.0-57-cloud-amd64`.
    pub release: String,
    /// Root of the unpacked package (`boot/`, `lib/modules/` or `usr/lib/modules/`).
    pub root: PathBuf,
    /// `NAME=VERSION` it came from.
    pub package: String,
}

impl Kernel {
    /// The kernel image.
    #[must_use]
    pub fn vmlinuz(&self) -> PathBuf {
        self.root
            .join("boot")
            .join(format!("vmlinuz-{}", self.release))
    }

    /// The directory of its modules (`lib/modules/<release>`; merged-/usr packages, trixie on,
    /// ship them under `usr/lib/modules/<release>`).
    pub fn modules_dir(&self) -> Result<PathBuf> {
        ["lib/modules", "usr/lib/modules"]
            .iter()
            .map(|d| self.root.join(d).join(&self.release))
            .find(|d| d.is_dir())
            .with_context(|| {
                format!(
                    "{} holds no modules directory for {}",
                    self.package, self.release
                )
            })
    }
}

/// `uname -r` of a kernel image package (`linux-image-6.1.0-57-cloud-amd64-unsigned` →
/// `6.1.0-57-cloud-amd64`).
fn release_of(package: &str) -> Option<&str> {
    package
        .strip_prefix("linux-image-")?
        .strip_suffix("-unsigned")
        .filter(|r| r.ends_with("-cloud-amd64"))
}

/// The kernel of `choice`, downloaded, verified and unpacked into the cache once.
///
/// # Errors
/// When no source yields the package (with the pinned SHA-256, for a pin).
pub fn fetch(choice: &Choice) -> Result<Kernel> {
    let release = release_of(choice.name())
        .context("not a kernel image package")?
        .to_owned();
    let cache = toolchain::cache_dir()?.join("vm");
    let package = format!("{}={}", choice.name(), choice.version());
    // One directory per exact build: a re-pin of the same ABI name never reuses old files.
    let root = cache.join(format!("{}_{}", choice.name(), choice.version()));
    let kernel = Kernel {
        release,
        root,
        package,
    };
    if kernel.vmlinuz().is_file() {
        return Ok(kernel);
    }
    let debs = cache.join("debs");
    fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
    let deb = match choice {
        Choice::Pinned(pin) => fetch_pinned(pin, &debs)?,
        Choice::Package { name, version } => fetch_with_apt(name, version, &debs)?,
    };
    let partial = cache.join(format!("{}_{}.partial", choice.name(), choice.version()));
    let _ = fs::remove_dir_all(&partial);
    cmd::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial))?;
    // What an interrupted or failed run left there.
    let _ = fs::remove_dir_all(&kernel.root);
    fs::rename(&partial, &kernel.root)
        .with_context(|| format!("moving into {}", kernel.root.display()))?;
    if !kernel.vmlinuz().is_file() {
        bail!("{} has no {}", kernel.package, kernel.vmlinuz().display());
    }
    Ok(kernel)
}

/// The pinned `.deb`, verified, in `debs`.
fn fetch_pinned(pin: &Pin, debs: &Path) -> Result<PathBuf> {
    let file = debs.join(deb_name(pin.package, pin.version));
    if file.is_file() && sha256(&file)? == pin.sha256 {
        return Ok(file);
    }
    let _ = fs::remove_file(&file);
    let mut tried = Vec::new();
    for path in pin.paths {
        let url = format!("{MIRROR}{path}");
        // apt's own downloader, told the hash: it refuses a file that does not match.
        let fetched = cmd::run(
            Command::new("/usr/lib/apt/apt-helper")
                .args(["-o", "APT::Sandbox::User=root", "download-file", &url])
                .arg(&file)
                .arg(format!("SHA256:{}", pin.sha256)),
        );
        match fetched {
            Ok(()) if sha256(&file)? == pin.sha256 => return Ok(file),
            Ok(()) => tried.push(format!("{url}: SHA-256 differs")),
            Err(e) => tried.push(format!("{url}: {e:#}")),
        }
        let _ = fs::remove_file(&file);
    }
    // A machine that reaches Debian only through its own mirror: ask apt.
    match fetch_with_apt(pin.package, pin.version, debs) {
        Ok(deb) if sha256(&deb)? == pin.sha256 => return Ok(deb),
        Ok(deb) => tried.push(format!(
            "apt-get download: {} has SHA-256 {}, the pin says {}",
            deb.display(),
            sha256(&deb)?,
            pin.sha256
        )),
        Err(e) => tried.push(format!("apt-get download: {e:#}")),
    }
    bail!(
        "cannot fetch the pinned {} kernel {}={} ({}); if the archive dropped it, move the pin in \
         xtask/src/kernels.rs (README, Kernels)",
        pin.series,
        pin.package,
        pin.version,
        tried.join("; ")
    )
}

/// `NAME=VERSION` through the local apt sources (updating the index once if it does not know
/// the version, or if the download fails: a stale index points at files the mirror dropped),
/// into `debs`; prints the SHA-256 and archive path a pin would need.
fn fetch_with_apt(name: &str, version: &str, debs: &Path) -> Result<PathBuf> {
    let file = debs.join(deb_name(name, version));
    if !file.is_file() {
        let spec = format!("{name}={version}");
        let known =
            || cmd::stdout_of(Command::new("apt-cache").args(["show", "--no-all-versions", &spec]));
        let update = || cmd::run(Command::new("apt-get").args(["update", "-q"]));
        let download = || {
            cmd::run(
                Command::new("apt-get")
                    .args(["-o", "APT::Sandbox::User=root", "download", "-q", &spec])
                    .current_dir(debs),
            )
        };
        let mut updated = false;
        if known().is_none() {
            eprintln!("xtask: apt does not know {spec}: updating its index once");
            update()?;
            updated = true;
        }
        if known().is_none() {
            bail!("apt knows no {spec}, even after apt-get update");
        }
        if let Err(e) = download() {
            if updated {
                return Err(e);
            }
            eprintln!("xtask: apt-get download {spec} failed: updating its index once, then again");
            update()?;
            download()?;
        }
        let Some(fields) = known() else {
            bail!("apt knows no {spec} after apt-get update");
        };
        for line in fields.lines() {
            if line.starts_with("Filename:") || line.starts_with("SHA256:") {
                eprintln!("xtask: {spec}: {line}");
            }
        }
    }
    if !file.is_file() {
        bail!("apt-get download left no {}", file.display());
    }
    eprintln!("xtask: {}: SHA-256 {}", file.display(), sha256(&file)?);
    Ok(file)
}

/// The file name apt gives a package's `.deb` (an epoch's `:` is escaped as `%3a`).
fn deb_name(name: &str, version: &str) -> String {
    format!("{name}_{}_amd64.deb", version.replace(':', "%3a"))
}

/// Lower-case hex SHA-256 of a file.
fn sha256(file: &Path) -> Result<String> {
    let out = cmd::stdout_of(Command::new("sha256sum").arg(file))
        .with_context(|| format!("sha256sum {}", file.display()))?;
    out.split_whitespace()
        .next()
        .map(str::to_owned)
        .context("sha256sum printed nothing")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_are_complete_and_distinct() {
        for (i, p) in PINS.iter().enumerate() {
            assert_eq!(p.sha256.len(), 64, "{}", p.series);
            assert!(p.sha256.bytes().all(|b| b.is_ascii_hexdigit()));
            assert!(release_of(p.package).is_some(), "{}", p.package);
            assert!(!p.paths.is_empty());
            for path in p.paths {
                assert!(path.ends_with(&deb_name(p.package, p.version)), "{path}");
            }
            assert!(PINS[..i].iter().all(|q| q.series != p.series));
        }
    }

    #[test]
    fn package_arguments_are_checked() {
        assert!(Choice::package("linux-image-6.1.0-48-cloud-amd64-unsigned=6.1.172-1").is_ok());
        assert!(Choice::package("linux-image-6.1.0-48-cloud-amd64-unsigned").is_err());
        assert!(Choice::package("bash=5.2").is_err());
        assert_eq!(
            release_of("linux-image-6.12.117+deb13-cloud-amd64-unsigned"),
            Some("6.12.117+deb13-cloud-amd64")
        );
    }
}

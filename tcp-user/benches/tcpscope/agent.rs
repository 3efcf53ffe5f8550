//! The real agent binary (`tcpscope run`) as a child process inside a network namespace.
//!
//! Started with `nsenter --net=`, not `ip netns exec`: the latter remounts /sys and so hides
//! bpffs, where the agent pins its maps. `nsenter` execs the agent in place, so the child's
//! pid is the agent's own (what its /proc/<pid>/stat and fdinfo are read from).

use std::{
    io::{BufRead as _, BufReader, Read as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::sys::{Netns, PinDir};

/// How long an agent may take to load, attach and say so.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an agent may take to detach and exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// A running agent with its own pin directory; killed and its pins removed on drop.
pub struct Agent {
    child: Child,
    stderr: mpsc::Receiver<String>,
    log: Vec<String>,
    // Dropped after `child` is gone (see Drop).
    pin_dir: PinDir,
}

/// What a stopped agent printed.
pub struct Exit {
    /// Its per-hook summary lines (stdout).
    pub summary: String,
}

impl Agent {
    /// Starts `tcpscope run --iface <iface> --pin-dir <fresh dir> <args>` in `netns` and waits
    /// until it tracks.
    pub fn start(bin: &Path, netns: &Netns, iface: &str, args: &[&str]) -> Result<Self> {
        let pin_dir = PinDir::new();
        let mut child = Command::new("nsenter")
            .arg(format!("--net={}", netns.path().display()))
            .arg(bin)
            .args(["run", "--iface", iface, "--pin-dir"])
            .arg(pin_dir.path())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stderr = child.stderr.take().context("piped stderr")?;
        let (tx, rx) = mpsc::channel();
        // Drained to the end, so that the agent never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut agent = Self {
            child,
            stderr: rx,
            log: Vec::new(),
            pin_dir,
        };
        agent.wait_for("tracking;")?;
        Ok(agent)
    }

    /// Waits (bounded) for a log line containing `needle`.
    fn wait_for(&mut self, needle: &str) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.stderr.recv_timeout(left) {
                Ok(line) => {
                    let found = line.contains(needle);
                    self.log.push(line);
                    if found {
                        return Ok(());
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => break,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    bail!("the agent exited early; log:\n{}", self.log.join("\n"))
                }
            }
        }
        bail!(
            "the agent did not log {needle:?} within {START_TIMEOUT:?}; log:\n{}",
            self.log.join("\n")
        )
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The base pin directory it was given.
    pub fn pin_dir(&self) -> &Path {
        self.pin_dir.path()
    }

    /// Its log lines so far.
    pub fn log(&mut self) -> &[String] {
        while let Ok(line) = self.stderr.try_recv() {
            self.log.push(line);
        }
        &self.log
    }

    /// SIGTERM, then its summary; fails unless it exits 0 in time.
    pub fn stop(mut self) -> Result<Exit> {
        // SAFETY: kill has no memory-safety preconditions; the pid is our child's, not yet
        // reaped (so not reused).
        if unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) } != 0 {
            bail!("SIGTERM to the agent: {}", std::io::Error::last_os_error());
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                bail!("the agent did not exit within {STOP_TIMEOUT:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut summary = String::new();
        if let Some(mut out) = self.child.stdout.take() {
            out.read_to_string(&mut summary)?;
        }
        if !status.success() {
            let log = self.log().join("\n");
            bail!("the agent exited with {status}; log:\n{log}");
        }
        Ok(Exit { summary })
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // A no-op after `stop` (the child is reaped: kill fails with InvalidInput).
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Exit {
    /// Counter `key` of the summary line of `hook` (`xdp_ingress packets=… tcp=…`).
    pub fn counter(&self, hook: &str, key: &str) -> Option<u64> {
        let line = self
            .summary
            .lines()
            .find(|l| l.split_whitespace().next() == Some(hook))?;
        line.split_whitespace()
            .filter_map(|w| w.split_once('='))
            .find(|(k, _)| *k == key)
            .and_then(|(_, v)| v.parse().ok())
    }
}

/// The agent binary: `TCPSCOPE_AGENT`, else the one cargo built next to this benchmark.
pub fn binary() -> PathBuf {
    std::env::var_os("TCPSCOPE_AGENT").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_tcpscope")),
        PathBuf::from,
    )
}

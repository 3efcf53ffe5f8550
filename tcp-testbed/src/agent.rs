//! The `tcpscope` agent as a child process inside a network namespace, and the binary's other
//! commands run for their JSON.
//!
//! Which binary: [`AGENT_ENV`] when set (`cargo xtask test`, `vm` and `bench` set it to the
//! agent they built), else `tcpscope` in the target directory of the running test or
//! benchmark executable, where `cargo xtask build` puts it (see [`try_agent_binary`]). A test
//! crate cannot name another package's binary at compile time (`CARGO_BIN_EXE_*` exists only
//! for the binaries of the test's own package), and the VM tier runs the test executables
//! away from their target directory.

use std::{
    collections::HashMap,
    ffi::{OsStr, OsString},
    io::{BufRead as _, BufReader, Read as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc::{self, RecvTimeoutError},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{cmd::unique, netns::NetNs};

/// Names the agent binary to run (overrides the one next to the executable).
pub const AGENT_ENV: &str = "TCPSCOPE_AGENT";

/// How long an agent may take to log an awaited line: the start (the verifier checking the
/// programs) takes a few seconds on a real CPU, and many times that in the VM tier's emulated
/// one.
const WAIT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an agent may take to detach and exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// The agent binary: [`AGENT_ENV`] when set, else `tcpscope` in the directory cargo builds
/// binaries into, found from the running executable (`target/<profile>/deps/NAME-HASH` →
/// `target/<profile>/tcpscope`, `cargo test` and `cargo bench` alike). Fails when the file
/// does not exist, saying how to build it.
pub fn try_agent_binary() -> Result<PathBuf> {
    let path = match std::env::var_os(AGENT_ENV) {
        Some(path) => PathBuf::from(path),
        None => {
            let exe = std::env::current_exe().context("the running executable's path")?;
            exe.parent()
                .and_then(Path::parent)
                .with_context(|| format!("no target directory above {}", exe.display()))?
                .join("tcpscope")
        }
    };
    ensure!(
        path.is_file(),
        "the agent binary {} does not exist: build it with `cargo xtask build` (or `cargo xtask \
         build --release` for a release-profile run), or name it in {AGENT_ENV}",
        path.display()
    );
    Ok(path)
}

/// [`try_agent_binary`], panicking when there is none.
pub fn agent_binary() -> PathBuf {
    try_agent_binary().unwrap_or_else(|e| panic!("{e:#}"))
}

/// The JSON that `tcpscope ARGS` prints; panics unless it succeeds.
pub fn tcpscope_json<S: AsRef<OsStr> + std::fmt::Debug>(args: &[S]) -> serde_json::Value {
    let out = Command::new(agent_binary())
        .args(args)
        .output()
        .expect("run tcpscope");
    assert!(
        out.status.success(),
        "tcpscope {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("tcpscope {args:?}: {e}"))
}

/// Whether a flow of `tcpscope flows --json` has an endpoint on `port`.
pub fn on_port(flow: &serde_json::Value, port: u16) -> bool {
    let suffix = format!(":{port}");
    flow["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .any(|e| e["address"].as_str().is_some_and(|a| a.ends_with(&suffix)))
}

/// What a stopped agent printed on stdout: per hook (`xdp_ingress`, …), its counters
/// (`packets=…`).
pub type Summary = HashMap<String, HashMap<String, u64>>;

/// The agent running in a namespace with its own pin directory; killed (and the pins removed,
/// unless [`Self::keep_pins`]) on drop.
pub struct Agent {
    child: Child,
    stderr: mpsc::Receiver<String>,
    log: Vec<String>,
    /// How many lines of `log` [`Self::wait_for`] has looked at.
    scanned: usize,
    /// Its pin directory (the base `--pin-dir`).
    pub pin_dir: PathBuf,
    /// Leave the pins behind on drop (for the next agent of a restart test).
    pub keep_pins: bool,
}

impl Agent {
    /// Starts `tcpscope run --pin-dir <fresh dir> ARGS` in `ns`.
    pub fn start(ns: &NetNs, args: &[&str]) -> Self {
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{}", unique("tcpscope-test-")));
        Self::spawn(ns, Some(pin_dir), args)
    }

    /// Starts it on the pins of an earlier agent (a restart).
    pub fn start_on_pins(ns: &NetNs, pin_dir: &Path, args: &[&str]) -> Self {
        Self::spawn(ns, Some(pin_dir.to_path_buf()), args)
    }

    /// Starts it without `--pin-dir`: its pins go to the namespace's default directory.
    pub fn start_default_pins(ns: &NetNs, args: &[&str]) -> Self {
        Self::spawn(ns, None, args)
    }

    /// The default pin directory of the agents in `ns`.
    pub fn default_pin_dir(ns: &NetNs) -> PathBuf {
        use std::os::unix::fs::MetadataExt as _;
        let ino = std::fs::metadata(ns.path()).expect("namespace file").ino();
        PathBuf::from(format!("/sys/fs/bpf/tcpscope/netns-{ino}"))
    }

    fn spawn(ns: &NetNs, pin_dir: Option<PathBuf>, args: &[&str]) -> Self {
        Self::try_spawn(ns, pin_dir, args).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Starts `tcpscope run [--pin-dir DIR] ARGS` in `ns` (without `--pin-dir` when `pin_dir`
    /// is `None`: then its pins go to the namespace's default directory). Its stderr is read
    /// to the end by a thread of its own, so that the agent never blocks on a full pipe.
    pub fn try_spawn(ns: &NetNs, pin_dir: Option<PathBuf>, args: &[&str]) -> Result<Self> {
        Self::try_spawn_binary(&try_agent_binary()?, ns, pin_dir, args)
    }

    /// [`Self::try_spawn`] with the binary `bin` (e.g. the release archive's).
    pub fn try_spawn_binary(
        bin: &Path,
        ns: &NetNs,
        pin_dir: Option<PathBuf>,
        args: &[&str],
    ) -> Result<Self> {
        let mut command = ns.command(bin);
        command.arg("run");
        if let Some(dir) = &pin_dir {
            command.arg("--pin-dir").arg(dir);
        }
        command.args(args);
        let pin_dir = pin_dir.unwrap_or_else(|| Self::default_pin_dir(ns));
        Self::try_from_command(command, pin_dir)
    }

    /// Starts an agent through a command of the caller's making (one that ends by exec'ing
    /// `tcpscope run …` in place, so that the child's pid is the agent's: `setpriv`, `nsenter`
    /// and `unshare` without `--fork` do). `pin_dir` is where it pins, removed on drop unless
    /// [`Self::keep_pins`].
    pub fn try_from_command(mut command: Command, pin_dir: PathBuf) -> Result<Self> {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {:?}", command.get_program()))?;
        let stderr = child.stderr.take().context("piped stderr")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            child,
            stderr: rx,
            log: Vec::new(),
            scanned: 0,
            pin_dir,
            keep_pins: false,
        })
    }

    /// Waits (bounded, 60 s) for a log line containing `needle`, after the lines earlier waits
    /// looked at; returns it. Fails when the agent exits or the time is up first.
    pub fn try_wait_for(&mut self, needle: &str) -> Result<String> {
        let deadline = Instant::now() + WAIT_TIMEOUT;
        loop {
            while let Some(line) = self.log.get(self.scanned) {
                self.scanned += 1;
                if line.contains(needle) {
                    return Ok(line.clone());
                }
            }
            let left = deadline.checked_duration_since(Instant::now());
            match left.map_or(Err(RecvTimeoutError::Timeout), |left| {
                self.stderr.recv_timeout(left)
            }) {
                Ok(line) => self.log.push(line),
                Err(RecvTimeoutError::Timeout) => bail!(
                    "tcpscope never logged {needle:?} within {WAIT_TIMEOUT:?}; log so far:\n{}",
                    self.log.join("\n")
                ),
                Err(RecvTimeoutError::Disconnected) => bail!(
                    "tcpscope exited without logging {needle:?}; log:\n{}",
                    self.log.join("\n")
                ),
            }
        }
    }

    /// [`Self::try_wait_for`], panicking when the line does not come.
    pub fn wait_for(&mut self, needle: &str) -> String {
        self.try_wait_for(needle)
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Every line it has logged so far.
    pub fn log(&mut self) -> &[String] {
        while let Ok(line) = self.stderr.try_recv() {
            self.log.push(line);
        }
        &self.log
    }

    /// Its process id (the agent's own: [`NetNs::command`] execs it in place).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The JSON that `tcpscope ARGS --pin-dir <its pins>` prints; panics unless it succeeds.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all: Vec<OsString> = args.iter().map(Into::into).collect();
        all.extend(["--pin-dir".into(), self.pin_dir.clone().into_os_string()]);
        tcpscope_json(&all)
    }

    /// Every flow it tracks, from `tcpscope flows --json` on its pins.
    pub fn flows(&self) -> Vec<serde_json::Value> {
        self.json(&["flows", "--json"])
            .as_array()
            .expect("array of flows")
            .clone()
    }

    /// SIGKILL: it dies at once, leaving its pins (and, where the kernel has no links, its
    /// netlink attachments) behind.
    pub fn sigkill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then the summary it printed; fails unless it exits 0 within 20 s.
    pub fn try_stop(mut self) -> Result<Summary> {
        // SAFETY: kill has no memory-safety preconditions; the pid is our child's, not yet
        // reaped (so not reused).
        if unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) } != 0 {
            bail!("SIGTERM to tcpscope: {}", std::io::Error::last_os_error());
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        let status = loop {
            if let Some(status) = self.child.try_wait().context("waiting for tcpscope")? {
                break status;
            }
            ensure!(
                Instant::now() < deadline,
                "tcpscope did not exit within {STOP_TIMEOUT:?} of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        while let Ok(line) = self.stderr.recv_timeout(Duration::from_millis(200)) {
            self.log.push(line);
        }
        let mut out = String::new();
        if let Some(mut stdout) = self.child.stdout.take() {
            stdout
                .read_to_string(&mut out)
                .context("tcpscope's stdout")?;
        }
        ensure!(
            status.success(),
            "tcpscope exited with {status}; log:\n{}",
            self.log.join("\n")
        );
        Ok(parse_summary(&out))
    }

    /// [`Self::try_stop`], panicking unless it exits 0 in time.
    pub fn stop(self) -> Summary {
        self.try_stop().unwrap_or_else(|e| panic!("{e:#}"))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // A no-op after `stop` or `sigkill` (the child is reaped: kill fails).
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !self.keep_pins {
            let _ = std::fs::remove_dir_all(&self.pin_dir);
        }
    }
}

/// The summary lines (`HOOK key=value …`), by hook.
fn parse_summary(out: &str) -> Summary {
    out.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let hook = words.next()?.to_owned();
            let kv = words
                .filter_map(|w| {
                    let (k, v) = w.split_once('=')?;
                    Some((k.to_owned(), v.parse().ok()?))
                })
                .collect();
            Some((hook, kv))
        })
        .collect()
}

/// `tcpscope events -o ndjson --pin-dir DIR ARGS` in a namespace: its stdout lines parsed as
/// JSON and its stderr lines, each read by a thread of its own; killed on drop.
pub struct EventsReader {
    child: Child,
    events: mpsc::Receiver<serde_json::Value>,
    stderr: mpsc::Receiver<String>,
    /// Every event received so far.
    pub seen: Vec<serde_json::Value>,
    /// Every stderr line so far.
    pub log: Vec<String>,
}

impl EventsReader {
    /// Starts the reader on `pin_dir` (an agent's `--pin-dir`) and waits (bounded) until it
    /// says it reads.
    pub fn start(ns: &NetNs, pin_dir: &Path, args: &[&str]) -> Self {
        let bin = agent_binary();
        let mut child = ns
            .command(&bin)
            .args(["events", "-o", "ndjson", "--pin-dir"])
            .arg(pin_dir)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {} events: {e}", bin.display()));
        let stdout = child.stdout.take().expect("piped stdout");
        let errout = child.stderr.take().expect("piped stderr");
        let (tx, events) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let v = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("not a JSON line: {line:?}: {e}"));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        let (tx, stderr) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(errout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut reader = Self {
            child,
            events,
            stderr,
            seen: Vec::new(),
            log: Vec::new(),
        };
        reader.wait_log("reading the state changes", WAIT_TIMEOUT);
        reader
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits (bounded) for a stderr line containing `needle`; returns it.
    pub fn wait_log(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut scanned = 0;
        loop {
            while let Some(line) = self.log.get(scanned) {
                scanned += 1;
                if line.contains(needle) {
                    return line.clone();
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) => self.log.push(line),
                Err(_) => panic!(
                    "tcpscope events never said {needle:?} within {timeout:?}; stderr:\n{}",
                    self.log.join("\n")
                ),
            }
        }
    }

    /// Collects events until `done` holds for those seen so far (bounded); returns them.
    pub fn wait_until(
        &mut self,
        timeout: Duration,
        done: impl Fn(&[serde_json::Value]) -> bool,
    ) -> &[serde_json::Value] {
        let deadline = Instant::now() + timeout;
        while !done(&self.seen) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(v) => self.seen.push(v),
                Err(_) => panic!(
                    "the awaited events did not come within {timeout:?}; got:\n{}",
                    self.seen
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("\n")
                ),
            }
        }
        &self.seen
    }

    /// Collects what arrives within `quiet` of the last event (at most `limit`).
    pub fn settle(&mut self, quiet: Duration, limit: Duration) -> &[serde_json::Value] {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            match self.events.recv_timeout(quiet) {
                Ok(v) => self.seen.push(v),
                Err(_) => break,
            }
        }
        &self.seen
    }

    /// Sends `signal` to it.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill has no memory-safety preconditions; the pid is our child's, not yet
        // reaped.
        let rc = unsafe { libc::kill(self.child.id() as i32, signal) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    }

    /// SIGKILL, and waits for it to die.
    pub fn sigkill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGINT; waits (bounded) for it to exit and returns its exit status's success, after
    /// collecting the rest of its output.
    pub fn interrupt(&mut self) -> bool {
        self.signal(libc::SIGINT);
        let deadline = Instant::now() + STOP_TIMEOUT;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("waiting for tcpscope events") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "tcpscope events did not exit within {STOP_TIMEOUT:?} of SIGINT"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        while let Ok(v) = self.events.recv_timeout(Duration::from_millis(200)) {
            self.seen.push(v);
        }
        while let Ok(line) = self.stderr.recv_timeout(Duration::from_millis(200)) {
            self.log.push(line);
        }
        status.success()
    }
}

impl Drop for EventsReader {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

//! The `tcpscope` agent as a child process of a test.

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader, Read as _},
    process::{Child, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use super::NetNs;

/// The agent running in a namespace, with its own pin directory; killed (and the pins
/// removed) on drop.
pub struct Agent {
    child: Child,
    stderr: mpsc::Receiver<String>,
    log: Vec<String>,
    pub pin_dir: std::path::PathBuf,
    /// Leave the pins behind on drop (for the next agent of a restart test).
    pub keep_pins: bool,
}

impl Agent {
    pub fn start(ns: &NetNs, args: &[&str]) -> Self {
        let pin_dir =
            std::path::PathBuf::from(format!("/sys/fs/bpf/{}", super::unique("tcpscope-test-")));
        Self::spawn(ns, Some(pin_dir), args)
    }

    /// Starts it on the pins of an earlier agent (a restart).
    pub fn start_on_pins(ns: &NetNs, pin_dir: &std::path::Path, args: &[&str]) -> Self {
        Self::spawn(ns, Some(pin_dir.to_path_buf()), args)
    }

    /// Starts it without `--pin-dir`: its pins go to the namespace's default directory.
    pub fn start_default_pins(ns: &NetNs, args: &[&str]) -> Self {
        Self::spawn(ns, None, args)
    }

    /// The default pin directory of the agents in `ns`.
    pub fn default_pin_dir(ns: &NetNs) -> std::path::PathBuf {
        use std::os::unix::fs::MetadataExt as _;
        let ino = std::fs::metadata(format!("/run/netns/{}", ns.name))
            .expect("namespace file")
            .ino();
        std::path::PathBuf::from(format!("/sys/fs/bpf/tcpscope/netns-{ino}"))
    }

    fn spawn(ns: &NetNs, pin_dir: Option<std::path::PathBuf>, args: &[&str]) -> Self {
        let mut command = ns.command(env!("CARGO_BIN_EXE_tcpscope"));
        command.arg("run");
        if let Some(dir) = &pin_dir {
            command.arg("--pin-dir").arg(dir);
        }
        let mut child = command
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting tcpscope");
        let pin_dir = pin_dir.unwrap_or_else(|| Self::default_pin_dir(ns));
        let stderr = child.stderr.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            stderr: rx,
            log: Vec::new(),
            pin_dir,
            keep_pins: false,
        }
    }

    /// Waits (bounded) for a log line containing `needle`; returns it. Bounded at 60 s: the
    /// start (the verifier checking the programs) takes a few seconds on a real CPU, and many
    /// times that in the VM tier's emulated one.
    pub fn wait_for(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.stderr.recv_timeout(left) {
                Ok(line) => {
                    self.log.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => break,
            }
        }
        panic!(
            "tcpscope never logged {needle:?}; log so far:\n{}",
            self.log.join("\n")
        );
    }

    /// The lines of its log read so far (by [`Self::wait_for`]).
    pub fn log(&self) -> &[String] {
        &self.log
    }

    /// The JSON that `tcpscope ARGS --pin-dir <its pins>` prints; panics unless it succeeds.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all: Vec<std::ffi::OsString> = args.iter().map(Into::into).collect();
        all.extend(["--pin-dir".into(), self.pin_dir.clone().into_os_string()]);
        super::tcpscope_json(&all)
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

    /// SIGTERM, then the summary lines it printed, by hook.
    pub fn stop(mut self) -> HashMap<String, HashMap<String, u64>> {
        // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
        let rc = unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        assert_eq!(rc, 0, "SIGTERM to tcpscope");
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("waiting for tcpscope") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "tcpscope did not exit within 20 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        while let Ok(line) = self.stderr.recv_timeout(Duration::from_millis(200)) {
            self.log.push(line);
        }
        let mut out = String::new();
        self.child
            .stdout
            .take()
            .expect("piped")
            .read_to_string(&mut out)
            .expect("stdout");
        assert!(
            status.success(),
            "tcpscope exited with {status}; log:\n{}",
            self.log.join("\n")
        );
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
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !self.keep_pins {
            let _ = std::fs::remove_dir_all(&self.pin_dir);
        }
    }
}

//! Captures and crafted frames: tcpdump recording an interface, raw frames sent through an
//! AF_PACKET socket.

use crate::{cmd::unique, netns::NetNs};

/// A capture written by tcpdump running in a namespace; stopped and its file removed on drop.
pub struct Tcpdump {
    child: std::process::Child,
    stderr: std::io::BufReader<std::process::ChildStderr>,
    pub file: std::path::PathBuf,
}

impl Tcpdump {
    /// Starts `tcpdump -w FILE ARGS` in `ns` and waits until it listens. Every packet is kept
    /// whole (snaplen 9000) and written as it comes (`--immediate-mode`), with a 64 MiB ring:
    /// with the default snaplen of 256 KiB a slot per packet leaves the ring a handful of
    /// slots, and the `any` device then drops most of a burst.
    pub fn start(ns: &NetNs, args: &[&str]) -> Self {
        use std::io::BufRead as _;
        let file = std::env::temp_dir().join(format!("{}.pcap", unique("tcpscope-cap-")));
        let mut child = ns
            .command("tcpdump")
            // -Z root: Debian's tcpdump otherwise drops to its own user before writing.
            .args([
                "-n",
                "-s",
                "9000",
                "-B",
                "65536",
                "-U",
                "--immediate-mode",
                "-Z",
                "root",
            ])
            .arg("-w")
            .arg(&file)
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("starting tcpdump");
        let mut stderr = std::io::BufReader::new(child.stderr.take().expect("piped"));
        let mut line = String::new();
        // tcpdump says "listening on IFACE" once its socket is bound (it exits if it cannot).
        while !line.contains("listening on") {
            line.clear();
            let n = stderr.read_line(&mut line).expect("tcpdump's stderr");
            assert!(n > 0, "tcpdump {args:?} exited before listening");
        }
        Self {
            child,
            stderr,
            file,
        }
    }

    /// Stops the capture (SIGINT: tcpdump flushes and exits); the file stays until drop.
    /// Panics if the kernel dropped any packet of it (a capture with holes would make any
    /// comparison with it meaningless).
    pub fn stop(&mut self) {
        use std::io::Read as _;
        // SAFETY: a signal to a child this guard owns and has not reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let status = self.child.wait().expect("tcpdump");
        let mut summary = String::new();
        let _ = self.stderr.read_to_string(&mut summary);
        assert!(status.success(), "tcpdump: {status}: {summary}");
        assert!(
            summary
                .lines()
                .any(|l| l.trim() == "0 packets dropped by kernel"),
            "the capture lost packets: {summary}"
        );
    }
}

impl Drop for Tcpdump {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.file);
    }
}

/// Sends raw Ethernet frames out of `iface` (from inside the caller's namespace) through an
/// AF_PACKET socket.
pub fn send_raw_frames(iface: &str, frames: &[Vec<u8>]) {
    let name = std::ffi::CString::new(iface).expect("interface name");
    // SAFETY: plain socket/bind/sendto calls on a socket this function owns and closes;
    // every pointer passed points to a live, correctly sized value.
    unsafe {
        let ifindex = libc::if_nametoindex(name.as_ptr());
        assert_ne!(ifindex, 0, "no interface {iface}");
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex as i32;
        addr.sll_halen = 6;
        for frame in frames {
            let sent = libc::sendto(
                fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            assert_eq!(
                sent,
                frame.len() as isize,
                "sendto: {}",
                std::io::Error::last_os_error()
            );
        }
        libc::close(fd);
    }
}

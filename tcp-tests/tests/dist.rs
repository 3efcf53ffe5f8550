//! The release archive (`cargo xtask dist`), as a user gets it: checked against its
//! SHA256SUMS, extracted, and its static binary run — `--version`, `replay` against the
//! captures' truth, and `run` attached to a veth serving metrics, also when started the way
//! `ip netns exec` starts it (no bpffs on /sys/fs/bpf). Runs on the host and in the VM guests.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use tcp_testbed::{
    Link,
    agent::{Agent, agent_binary},
    dist::{dist, has_interpreter},
    metrics::{http_get, parse, sample},
    unique,
};

const PORT: u16 = 9300;

fn stdout_of(bin: &Path, args: &[&str]) -> String {
    let out = Command::new(bin).args(args).output().expect("run tcpscope");
    assert!(
        out.status.success(),
        "tcpscope {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

/// The commands `--help` lists (without `help`).
fn commands(bin: &Path) -> Vec<String> {
    stdout_of(bin, &["--help"])
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_archive_holds_a_static_binary_its_pages_completions_and_deploy_files() {
    let d = dist();
    let bin = d.binary();
    assert!(
        !has_interpreter(&bin).expect("an ELF file"),
        "{} asks for a dynamic loader: not a static binary",
        bin.display()
    );
    // The same version and commit as the development build of this tree.
    let version = stdout_of(&bin, &["--version"]);
    assert!(
        version.starts_with(&format!("tcpscope {} (", env!("CARGO_PKG_VERSION"))),
        "{version}"
    );
    assert_eq!(version, stdout_of(&agent_binary(), &["--version"]));
    for file in [
        "README.md",
        "LICENSE-MIT",
        "LICENSE-APACHE",
        "THIRD-PARTY-LICENSES",
        "man/tcpscope.1",
        "completions/tcpscope.bash",
        "completions/_tcpscope",
        "completions/tcpscope.fish",
    ] {
        let path = d.root.join(file);
        let len = std::fs::metadata(&path).map_or(0, |m| m.len());
        assert!(len > 0, "{} is missing or empty", path.display());
    }
    // The notices name the C library and the crates linked in, with their licence texts.
    let notices = std::fs::read_to_string(d.root.join("THIRD-PARTY-LICENSES")).expect("notices");
    for needle in [
        "musl libc",
        "- aya 0.",
        "- rustls 0.",
        "- tokio 1.",
        "Apache License",
    ] {
        assert!(
            notices.contains(needle),
            "THIRD-PARTY-LICENSES lacks {needle:?}"
        );
    }
    // A page per command, and the main page names them all.
    let main_page = std::fs::read_to_string(d.root.join("man/tcpscope.1")).expect("tcpscope.1");
    assert!(main_page.contains(".TH tcpscope 1"), "{main_page}");
    let commands = commands(&bin);
    assert!(commands.iter().any(|c| c == "run"), "{commands:?}");
    for c in &commands {
        let page = d.root.join(format!("man/tcpscope-{c}.1"));
        let text =
            std::fs::read_to_string(&page).unwrap_or_else(|e| panic!("{}: {e}", page.display()));
        assert!(
            text.contains(&format!(".TH tcpscope-{c} 1")),
            "{}",
            page.display()
        );
        assert!(
            main_page.contains(c.as_str()),
            "tcpscope.1 does not name {c}"
        );
    }
    // The bash completion completes a command and a flag of `run`.
    if Path::new("/bin/bash").exists() {
        let script = d.root.join("completions/tcpscope.bash");
        // As bash calls it: COMP_WORDS and COMP_CWORD set; the command, the word being
        // completed and the one before it as arguments.
        let complete = |words: &str| {
            let all: Vec<&str> = words.split(' ').collect();
            let (cur, prev) = (all[all.len() - 1], all[all.len() - 2]);
            let line = format!(
                "source {}; COMP_WORDS=({words}); COMP_CWORD={}; _tcpscope tcpscope {cur} \
                 {prev}; echo \"${{COMPREPLY[*]}}\"",
                script.display(),
                all.len() - 1
            );
            let out = Command::new("/bin/bash")
                .args(["-c", &line])
                .output()
                .expect("bash");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        assert!(
            complete("tcpscope ru")
                .split_whitespace()
                .any(|w| w == "run")
        );
        assert!(
            complete("tcpscope run --pin")
                .split_whitespace()
                .any(|w| w == "--pin-dir")
        );
    } else {
        eprintln!("no bash here (the VM guest): the completion script is not exercised");
    }
}

#[test]
fn replay_gives_the_development_builds_answer_and_the_truth() {
    let Some(pcaps) = tcp_testbed::pcaps_dir() else {
        return;
    };
    let bin = dist().binary();
    for name in ["ppa__http_ip4and6", "ppa__tcp_handshake"] {
        let capture = ["pcapng", "pcap"]
            .iter()
            .map(|ext| pcaps.join(format!("captures/{name}.{ext}")))
            .find(|p| p.is_file())
            .unwrap_or_else(|| panic!("no capture {name}"));
        let capture = capture.to_str().expect("UTF-8 path");
        let args = ["replay", "--format", "json", capture];
        let released = stdout_of(&bin, &args);
        assert_eq!(released, stdout_of(&agent_binary(), &args), "{name}");
        let json: serde_json::Value = serde_json::from_str(&released).expect("JSON");
        let truth: serde_json::Value = serde_json::from_slice(
            &std::fs::read(pcaps.join(format!("truth/{name}.json"))).expect("truth"),
        )
        .expect("truth JSON");
        let summary = &truth["summary"];
        for (ours, theirs) in [
            ("handshakes_completed", "handshakes_complete"),
            ("closed_by_fin", "closed_by_fin"),
            ("closed_by_rst", "closed_by_rst"),
            ("syn", "syn_packets"),
        ] {
            assert_eq!(
                json["counters"][ours].as_u64(),
                summary[theirs].as_u64(),
                "{name}: {ours}"
            );
        }
    }
}

/// Runs connections past `agent` (listening on 127.0.0.1:`port` in the server namespace) and
/// checks what it serves: the handshakes, the agent's own metrics and the build.
fn check_serves_metrics(link: &Link, port: u16) {
    const N: usize = 4;
    link.exchange(PORT, N, false);
    let addr = format!("127.0.0.1:{port}");
    let uname = Command::new("uname").arg("-r").output().expect("uname");
    let kernel = String::from_utf8_lossy(&uname.stdout).trim().to_owned();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, text) = link.server.enter({
            let addr = addr.clone();
            move || http_get(&addr, "/metrics")
        });
        assert_eq!(status, 200, "{text}");
        let samples = parse(&text);
        let handshakes = sample(&samples, "tcpscope_handshakes_completed_total");
        // The reaper's first cycle comes within a second of the start.
        let reaps = sample(&samples, "tcpscope_reap_duration_seconds_count");
        if handshakes >= N as f64 && reaps >= 1.0 {
            assert_eq!(handshakes, N as f64, "{text}");
            assert!(sample(&samples, "tcpscope_scrape_duration_seconds_count") >= 1.0);
            assert!(sample(&samples, "process_resident_memory_bytes") > 0.0);
            assert!(sample(&samples, "process_cpu_seconds_total") > 0.0);
            let info = text
                .lines()
                .find(|l| l.starts_with("tcpscope_build_info{"))
                .expect("tcpscope_build_info");
            assert!(info.contains(&format!("kernel=\"{kernel}\"")), "{info}");
            assert!(
                info.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))),
                "{info}"
            );
            let version = stdout_of(&agent_binary(), &["--version"]);
            let revision = version
                .split(['(', ')'])
                .nth(1)
                .expect("--version names the revision");
            assert!(info.contains(&format!("revision=\"{revision}\"")), "{info}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{handshakes} of {N} handshakes, {reaps} reap cycles:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn the_static_binary_attaches_and_serves_metrics() {
    tcp_testbed::require_root();
    let link = Link::new();
    let bin = dist().binary();
    let mut agent = Agent::try_spawn_binary(
        &bin,
        &link.server,
        Some(Path::new("/sys/fs/bpf").join(unique("tcpscope-dist-"))),
        &["--iface", &link.server_if, "--listen", "127.0.0.1:9977"],
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    agent.wait_for("tracking;");
    check_serves_metrics(&link, 9977);
    agent.stop();
}

#[test]
fn ip_netns_exec_works_by_mounting_bpffs() {
    tcp_testbed::require_root();
    let link = Link::new();
    let bin = dist().binary();
    // `ip netns exec` gives the command a fresh /sys, without bpffs: the agent mounts one in
    // its own mount namespace, says so, and tracks (with the default pin directory).
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", &link.server.name])
        .arg(&bin)
        .args([
            "run",
            "--iface",
            &link.server_if,
            "--listen",
            "127.0.0.1:9978",
        ]);
    let mut agent = Agent::try_from_command(command, Agent::default_pin_dir(&link.server))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let line = agent.wait_for("bpffs");
    assert!(line.contains("mounted a new bpffs"), "{line}");
    agent.wait_for("tracking;");
    check_serves_metrics(&link, 9978);
    // The host's bpffs is untouched: the agent's pins were in its own mount namespace.
    assert!(!Agent::default_pin_dir(&link.server).exists());
    agent.stop();
}

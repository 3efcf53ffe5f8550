//! The deployment files of `deploy/`, each checked by what would run it: the systemd unit by
//! `systemd-analyze verify` and by starting the dist binary under the unit's user and
//! capabilities alone; the Kubernetes manifests by their parsed contents (there is no cluster
//! here); the image by `podman build` (and `podman run`); the Prometheus rules by `promtool
//! check rules` and `promtool test rules`; and every query of the Grafana dashboard and of the
//! rules by a real Prometheus scraping a real agent that sees real traffic.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use tcp_testbed::{
    Link, NetNs, RemoveOnDrop,
    agent::Agent,
    dist::{dist_binary, is_static_elf},
    metrics::{AGENT, http_get, scrape, sum},
    nft,
    prometheus::Prometheus,
    run, sh, unique,
};

/// `deploy/` of this workspace.
fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tcp-tests is inside the workspace")
        .join("deploy")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// A fresh directory under the temporary directory, removed on drop, that every user may read
/// and traverse (the unit's user runs a binary from it).
fn temp_dir(prefix: &str) -> RemoveOnDrop {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = std::env::temp_dir().join(unique(prefix));
    std::fs::create_dir_all(&dir).expect("temporary directory");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    RemoveOnDrop(dir)
}

// ---------------------------------------------------------------------------------------------
// systemd

/// The `[Service]` settings of a unit file, in order (a key may repeat: `ExecStartPre=`).
fn service_settings(unit: &str) -> Vec<(String, String)> {
    let mut section = "";
    let mut out = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with('[') {
            section = line;
            continue;
        }
        if section == "[Service]" {
            let (k, v) = line.split_once('=').expect("Key=Value");
            out.push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    out
}

/// The single value of `key`.
fn setting<'a>(settings: &'a [(String, String)], key: &str) -> &'a str {
    let all: Vec<&str> = settings
        .iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(all.len(), 1, "{key}= is set {} times", all.len());
    all[0]
}

/// The capabilities of a `AmbientCapabilities=` style list, as setpriv names them (`bpf`).
fn cap_names(list: &str) -> Vec<String> {
    let mut caps: Vec<String> = list
        .split_whitespace()
        .map(|c| {
            c.strip_prefix("CAP_")
                .unwrap_or_else(|| panic!("{c}: not a capability name"))
                .to_ascii_lowercase()
        })
        .collect();
    caps.sort();
    caps
}

fn unit_path() -> PathBuf {
    deploy_dir().join("systemd/tcpscope.service")
}

/// `systemd-analyze verify` accepts the unit without a word, with its `ExecStart=` binary
/// rewritten to the dist binary (verify requires the binary to exist, and the unit names where
/// it is installed, `/usr/local/bin/tcpscope`, absent here). The unit grants exactly the three
/// capabilities, ambient, to a dedicated user, with the hardening the README promises; the
/// sysusers file creates that user.
#[test]
fn systemd_unit_passes_verify_and_grants_three_capabilities_only() {
    let unit = read(&unit_path());
    let settings = service_settings(&unit);
    let three = ["bpf", "net_admin", "perfmon"].map(str::to_owned).to_vec();
    assert_eq!(cap_names(setting(&settings, "AmbientCapabilities")), three);
    assert_eq!(
        cap_names(setting(&settings, "CapabilityBoundingSet")),
        three
    );
    for (key, value) in [
        ("User", "tcpscope"),
        ("Group", "tcpscope"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("Restart", "on-failure"),
    ] {
        assert_eq!(setting(&settings, key), value, "{key}=");
    }
    let exec_start = setting(&settings, "ExecStart");
    let installed = "/usr/local/bin/tcpscope";
    assert!(
        exec_start.starts_with(&format!("{installed} run")),
        "{exec_start}"
    );

    let dir = temp_dir("tcpscope-unit-");
    let copy = dir.0.join("tcpscope.service");
    let bin = dist_binary();
    std::fs::write(
        &copy,
        unit.replace(
            &format!("ExecStart={installed} "),
            &format!("ExecStart={} ", bin.display()),
        ),
    )
    .expect("unit copy");
    let out = run(&["systemd-analyze", "verify", &copy.to_string_lossy()]);
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify ({}): {said}",
        out.status
    );
    // The same unit with the binary where the unit names it fails verify here: the check
    // looks at the binary, so the rewrite above is what makes it pass.
    let original = dir.0.join("original.service");
    std::fs::write(&original, &unit).expect("unit copy");
    if !Path::new(installed).exists() {
        assert!(
            !run(&["systemd-analyze", "verify", &original.to_string_lossy()])
                .status
                .success(),
            "verify accepts a missing binary: it proves nothing"
        );
    }

    // The sysusers file makes the unit's user, in an empty root.
    let root = dir.0.join("root");
    std::fs::create_dir_all(root.join("etc")).expect("root/etc");
    let sysusers = deploy_dir().join("systemd/tcpscope.sysusers");
    sh(&[
        "systemd-sysusers",
        &format!("--root={}", root.display()),
        &sysusers.to_string_lossy(),
    ]);
    let passwd = read(&root.join("etc/passwd"));
    assert!(
        passwd
            .lines()
            .any(|l| l.starts_with("tcpscope:") && l.ends_with(":/usr/sbin/nologin")),
        "{passwd}"
    );
}

/// A system user made for one test, deleted (with its group) on drop.
struct TestUser {
    name: String,
    uid: u32,
    gid: u32,
}

impl TestUser {
    fn new() -> Self {
        let name = unique("tcps");
        sh(&[
            "useradd",
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            &name,
        ]);
        let id =
            |flag: &str| -> u32 { sh(&["id", flag, &name]).trim().parse().expect("numeric id") };
        let (uid, gid) = (id("-u"), id("-g"));
        assert_ne!(uid, 0);
        Self { name, uid, gid }
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = run(&["userdel", &self.name]);
        let _ = run(&["groupdel", &self.name]);
    }
}

/// Quotes a word for `sh`.
fn quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// The command that starts `tcpscope run ARGS` the way the unit does: in a mount namespace of
/// its own holding a fresh bpffs on /sys/fs/bpf mounted 0700, as systemd mounts it (so the
/// host's bpffs and its modes are left alone, and the pins vanish with the namespace); then
/// the unit's `ExecStartPre=+` lines as root; then the unit's `ExecStart=` in `ns` under
/// `setpriv` with the unit's user, no supplementary groups, `caps` as the inheritable, ambient
/// and bounding sets, and no_new_privs when the unit sets `NoNewPrivileges=`. Each program in
/// the chain execs the next in place, so the child's pid is the agent's.
///
/// What this does not reproduce: the unit's file-system sandboxing (`ProtectSystem=`, …), which
/// only systemd applies (there is no systemd running here); `systemd-analyze verify` checks
/// those settings.
fn as_the_unit(
    settings: &[(String, String)],
    user: &TestUser,
    caps: &[String],
    bin: &Path,
    ns: &NetNs,
    args: &[&str],
) -> Command {
    let mut script = vec!["mount -t bpf -o mode=0700 bpf /sys/fs/bpf".to_owned()];
    for (key, value) in settings {
        if key == "ExecStartPre" {
            let line = value
                .strip_prefix('+')
                .unwrap_or_else(|| panic!("ExecStartPre={value}: expected to run as root (+)"));
            let words: Vec<String> = line
                .split_whitespace()
                .map(|w| quote(&w.replace("%u", &user.name).replace("%g", &user.name)))
                .collect();
            script.push(words.join(" "));
        }
    }
    let caps = caps
        .iter()
        .map(|c| format!("+{c}"))
        .collect::<Vec<_>>()
        .join(",");
    let caps = format!("-all{}{caps}", if caps.is_empty() { "" } else { "," });
    let mut exec = vec![
        "exec".to_owned(),
        "nsenter".to_owned(),
        format!("--net={}", ns.path().display()),
        "setpriv".to_owned(),
        format!("--reuid={}", user.uid),
        format!("--regid={}", user.gid),
        "--clear-groups".to_owned(),
        format!("--inh-caps={caps}"),
        format!("--ambient-caps={caps}"),
        format!("--bounding-set={caps}"),
    ];
    if setting(settings, "NoNewPrivileges") == "yes" {
        exec.push("--no-new-privs".to_owned());
    }
    let exec_start: Vec<&str> = setting(settings, "ExecStart").split_whitespace().collect();
    exec.push(quote(&bin.to_string_lossy()));
    for word in &exec_start[1..] {
        if *word == "$TCPSCOPE_ARGS" {
            exec.extend(args.iter().map(|a| quote(a)));
        } else {
            exec.push(quote(word));
        }
    }
    script.push(exec.join(" "));
    let mut c = Command::new("unshare");
    c.args(["--mount", "--propagation", "private", "sh", "-e", "-c"])
        .arg(script.join("\n"));
    c
}

/// The capability bits of `names` (setpriv's names), as /proc/PID/status shows them.
fn cap_mask(names: &[String]) -> u64 {
    names
        .iter()
        .map(|n| match n.as_str() {
            "net_admin" => 1u64 << 12,
            "perfmon" => 1 << 38,
            "bpf" => 1 << 39,
            other => panic!("capability {other}: add its bit"),
        })
        .fold(0, |a, b| a | b)
}

/// The dist binary, started as the unit starts it (its user, its three capabilities, its
/// `ExecStartPre=` preparing the pins on a bpffs mounted as systemd mounts it), attaches to a
/// veth in a test namespace, holds exactly those capabilities, pins its maps in a directory
/// its user owns, serves /healthz and /metrics, and counts real connections. Without any one
/// of the three capabilities it fails to start, so none is superfluous.
#[test]
fn dist_binary_attaches_under_the_units_user_and_three_capabilities() {
    tcp_testbed::require_root();
    let settings = service_settings(&read(&unit_path()));
    let caps = cap_names(setting(&settings, "AmbientCapabilities"));
    let user = TestUser::new();
    // A copy its user can reach (the target directory may be private to root).
    let dir = temp_dir("tcpscope-cap-");
    let bin = dir.0.join("tcpscope");
    std::fs::copy(dist_binary(), &bin).expect("copy of the binary");
    let link = Link::new();
    let args = [
        "--iface",
        link.server_if.as_str(),
        "--listen",
        AGENT,
        "--log-level",
        "info",
    ];

    let command = as_the_unit(&settings, &user, &caps, &bin, &link.server, &args);
    let pin_dir = Agent::default_pin_dir(&link.server);
    let mut agent = Agent::try_from_command(command, pin_dir.clone()).expect("starting");
    // The pins live in the private bpffs, which goes away with the agent's mount namespace;
    // the host's directory of that name is not the agent's.
    agent.keep_pins = true;
    let attached = agent.wait_for(&format!("attached {}:", link.server_if));
    assert!(attached.contains("XDP ingress"), "{attached}");
    agent.wait_for("tracking;");

    // The running agent: the unit's user, exactly the three capabilities, no_new_privs.
    let status = read(Path::new(&format!("/proc/{}/status", agent.pid())));
    let field = |name: &str| -> String {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .unwrap_or_else(|| panic!("{name} in /proc/PID/status"))
            .trim()
            .to_owned()
    };
    let mask = format!("{:016x}", cap_mask(&caps));
    for f in ["CapPrm", "CapEff", "CapAmb", "CapBnd"] {
        assert_eq!(field(f), mask, "{f}");
    }
    let uid = user.uid.to_string();
    assert!(
        field("Uid").split_whitespace().all(|u| u == uid),
        "{}",
        field("Uid")
    );
    assert_eq!(field("NoNewPrivs"), "1");
    // Its pins: in the directory the unit prepared, owned by its user, seen through its own
    // mount namespace.
    let layout = PathBuf::from(format!("/proc/{}/root", agent.pid()))
        .join(pin_dir.strip_prefix("/").expect("absolute"))
        .join(format!("v{}", tcp_common::LAYOUT_VERSION));
    {
        use std::os::unix::fs::MetadataExt as _;
        let meta =
            std::fs::metadata(&layout).unwrap_or_else(|e| panic!("{}: {e}", layout.display()));
        assert_eq!(meta.uid(), user.uid, "owner of {}", layout.display());
        let pins = std::fs::read_dir(&layout).expect("pins").count();
        assert!(pins > 0, "no pins in {}", layout.display());
    }
    // The kernel shows the XDP program on the interface.
    let shown = link
        .server
        .sh(&["ip", "link", "show", "dev", &link.server_if]);
    assert!(shown.contains("xdp"), "{shown}");

    // Real connections, counted.
    const CONNECTIONS: usize = 5;
    let (v4, _) = link.server_addrs(9600);
    let listener = link
        .server
        .enter(move || TcpListener::bind(v4).expect("listener"));
    let server = link.server.spawn(move || {
        for _ in 0..CONNECTIONS {
            let (mut s, _) = listener.accept().expect("accept");
            let mut b = [0u8; 2];
            s.read_exact(&mut b).expect("request");
            s.write_all(b"ok").expect("answer");
        }
    });
    link.client.enter(move || {
        for _ in 0..CONNECTIONS {
            let mut c = TcpStream::connect(v4).expect("connect");
            c.write_all(b"hi").expect("request");
            let mut b = [0u8; 2];
            c.read_exact(&mut b).expect("answer");
        }
    });
    server.join().expect("server");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = scrape(&link.server);
        let done = sum(&m, "tcpscope_handshakes_completed_total", &[]);
        if done == CONNECTIONS as f64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{done} handshakes counted, {CONNECTIONS} made"
        );
        thread::sleep(Duration::from_millis(100));
    }
    let (health, body) = link.server.enter(|| http_get(AGENT, "/healthz"));
    assert_eq!(health, 200, "{body}");
    let summary = agent.stop();
    assert!(summary["xdp_ingress"]["tcp"] > 0 && summary["tc_egress"]["tcp"] > 0);

    // Each capability is needed: without it the start fails, in one line.
    for missing in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != missing).cloned().collect();
        let command = as_the_unit(&settings, &user, &fewer, &bin, &link.server, &args);
        let out = Command::new("timeout")
            .arg("60")
            .arg(command.get_program())
            .args(command.get_args())
            .stdin(Stdio::null())
            .output()
            .expect("start without a capability");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && out.status.code() != Some(124),
            "started without CAP_{}: {} {stderr}",
            missing.to_uppercase(),
            out.status
        );
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(
            errors.len(),
            1,
            "without CAP_{}: {stderr}",
            missing.to_uppercase()
        );
        eprintln!("without CAP_{}: {}", missing.to_uppercase(), errors[0]);
    }
}

// ---------------------------------------------------------------------------------------------
// Kubernetes and the image

/// The YAML documents of a file, as JSON values.
fn yaml_documents(path: &Path) -> Vec<Value> {
    use serde::Deserialize as _;
    serde_yaml_ng::Deserializer::from_str(&read(path))
        .map(|doc| {
            let v = serde_yaml_ng::Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            serde_json::to_value(v).expect("YAML as JSON")
        })
        .collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|s| s.as_str().expect("string").to_owned())
        .collect()
}

/// No cluster here: the manifests are parsed and held to what the agent needs. The DaemonSet
/// runs on the host's network with the host's bpffs, with exactly the three capabilities added
/// and every other dropped, not privileged; a readiness probe on /healthz of the port the
/// agent listens on, which the scrape annotations (and the PodMonitor) name; resources set.
/// The Containerfile builds FROM scratch and its entry point is the binary it copies.
#[test]
fn kubernetes_manifests_give_the_agent_what_it_needs_and_no_more() {
    let dir = deploy_dir().join("kubernetes");
    let docs = yaml_documents(&dir.join("daemonset.yaml"));
    let ds = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .expect("a DaemonSet");
    assert_eq!(ds["apiVersion"], "apps/v1");
    let namespace = ds["metadata"]["namespace"].as_str().expect("namespace");
    assert!(
        docs.iter()
            .any(|d| d["kind"] == "Namespace" && d["metadata"]["name"] == namespace),
        "the namespace {namespace} is created too"
    );
    let selector = &ds["spec"]["selector"]["matchLabels"];
    let template = &ds["spec"]["template"];
    for (k, v) in selector.as_object().expect("matchLabels") {
        assert_eq!(&template["metadata"]["labels"][k], v, "label {k}");
    }
    let pod = &template["spec"];
    assert_eq!(pod["hostNetwork"], true);
    let containers = pod["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1);
    let c = &containers[0];

    // bpffs: the host's, mounted where the agent pins.
    let volume = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["hostPath"]["path"] == "/sys/fs/bpf")
        .expect("a hostPath volume of /sys/fs/bpf");
    assert!(
        c["volumeMounts"]
            .as_array()
            .expect("volumeMounts")
            .iter()
            .any(|m| m["name"] == volume["name"] && m["mountPath"] == "/sys/fs/bpf"),
        "/sys/fs/bpf mounted at /sys/fs/bpf"
    );

    // Capabilities: the three, nothing else.
    let sc = &c["securityContext"];
    let mut added = strings(&sc["capabilities"]["add"]);
    added.sort();
    assert_eq!(added, ["BPF", "NET_ADMIN", "PERFMON"]);
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);

    // The port: the one --listen names, the probe's, the scrape annotations'.
    let args = strings(&c["args"]);
    assert_eq!(args[0], "run");
    let listen = args
        .iter()
        .position(|a| a == "--listen")
        .map(|i| args[i + 1].clone())
        .expect("--listen in args");
    let port: u64 = listen
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .expect("ADDR:PORT");
    let ports = c["ports"].as_array().expect("ports");
    let metrics = ports
        .iter()
        .find(|p| p["containerPort"] == port)
        .expect("the listening port declared");
    let name = metrics["name"].as_str().expect("port name");
    let probe = &c["readinessProbe"]["httpGet"];
    assert_eq!(probe["path"], "/healthz");
    assert!(
        probe["port"] == name || probe["port"] == port,
        "probe port {}",
        probe["port"]
    );
    let annotations = &template["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], port.to_string());
    assert_eq!(annotations["prometheus.io/path"], "/metrics");
    for kind in ["requests", "limits"] {
        assert!(
            c["resources"][kind]["memory"].is_string(),
            "resources.{kind}.memory"
        );
    }
    assert!(c["resources"]["requests"]["cpu"].is_string());

    // The PodMonitor: the same pods, the same port.
    let pm = yaml_documents(&dir.join("podmonitor.yaml"));
    let pm = pm
        .iter()
        .find(|d| d["kind"] == "PodMonitor")
        .expect("PodMonitor");
    assert_eq!(&pm["spec"]["selector"]["matchLabels"], selector);
    assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["port"], name);
    assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["path"], "/metrics");

    // The Containerfile: FROM scratch, the binary copied where the entry point runs it.
    let (copied, entry) = containerfile_binary();
    assert_eq!(copied, entry);
    assert_eq!(
        c["image"].as_str().map(|i| i.starts_with("tcpscope")),
        Some(true)
    );
}

/// The Containerfile's stages, checked: one stage FROM scratch; where it copies `tcpscope`,
/// and its entry point.
fn containerfile_binary() -> (String, String) {
    let file = read(&deploy_dir().join("kubernetes/Containerfile"));
    let lines: Vec<&str> = file
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let from: Vec<&&str> = lines.iter().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(from, [&"FROM scratch"]);
    let copy = lines
        .iter()
        .find_map(|l| l.strip_prefix("COPY tcpscope "))
        .expect("COPY tcpscope DEST");
    let entry = lines
        .iter()
        .find_map(|l| l.strip_prefix("ENTRYPOINT "))
        .expect("ENTRYPOINT");
    let entry: Vec<String> = serde_json::from_str(entry).expect("ENTRYPOINT in exec form");
    (copy.trim().to_owned(), entry[0].clone())
}

/// A podman image, removed on drop.
struct Image(String);

impl Drop for Image {
    fn drop(&mut self) {
        let _ = run(&["podman", "rmi", "--force", &self.0]);
    }
}

/// `podman build` makes the image FROM scratch out of the Containerfile and the dist binary
/// (no network: `--network=none`), and the image holds that binary, byte for byte, where its
/// entry point runs it, and nothing else. `podman run` of `--version` where this machine lets
/// containers run (with runc and rlimits no higher than the caller's). FROM scratch has no
/// loader or libc: the binary must be static, which the dist tests check too.
#[test]
fn container_image_from_scratch_holds_the_dist_binary() {
    tcp_testbed::require_root();
    let bin = dist_binary();
    assert!(is_static_elf(&bin), "{} is not static", bin.display());
    let (inside, _) = containerfile_binary();
    let context = temp_dir("tcpscope-image-");
    std::fs::copy(&bin, context.0.join("tcpscope")).expect("binary into the context");
    let image = Image(format!("localhost/{}:test", unique("tcpscope-image-")));
    let containerfile = deploy_dir().join("kubernetes/Containerfile");
    sh(&[
        "podman",
        "build",
        "--network=none",
        "--file",
        &containerfile.to_string_lossy(),
        "--tag",
        &image.0,
        &context.0.to_string_lossy(),
    ]);
    let inspect: Value =
        serde_json::from_str(&sh(&["podman", "image", "inspect", &image.0])).expect("JSON");
    let config = &inspect[0]["Config"];
    assert_eq!(
        strings(&config["Entrypoint"]),
        std::slice::from_ref(&inside)
    );
    assert_eq!(
        inspect[0]["RootFS"]["Layers"].as_array().map(Vec::len),
        Some(1)
    );

    // Its files: exactly the binary (export a created, never started, container).
    let container = sh(&["podman", "create", &image.0]).trim().to_owned();
    let tar = run(&["podman", "export", &container]);
    let _ = run(&["podman", "rm", "--force", &container]);
    assert!(tar.status.success(), "podman export");
    let listing = context.0.join("export.tar");
    std::fs::write(&listing, &tar.stdout).expect("export");
    let files: Vec<String> = sh(&["tar", "-tf", &listing.to_string_lossy()])
        .lines()
        .filter(|l| !l.ends_with('/'))
        .map(str::to_owned)
        .collect();
    let member = inside.trim_start_matches('/');
    assert!(files.iter().any(|f| f == member), "{files:?}");
    let out = context.0.join("out");
    std::fs::create_dir_all(&out).expect("out");
    sh(&[
        "tar",
        "-xf",
        &listing.to_string_lossy(),
        "-C",
        &out.to_string_lossy(),
        member,
    ]);
    assert!(
        std::fs::read(out.join(member)).expect("extracted") == std::fs::read(&bin).expect("bin"),
        "the image's binary is the dist binary"
    );

    // Running it: crun refuses here (it raises rlimits this machine lets no one raise, and
    // does not run on hybrid cgroups); runc with the caller's own limits runs it.
    let version = sh(&[&bin.to_string_lossy(), "--version"]);
    let ran = run(&[
        "podman",
        "run",
        "--rm",
        "--network=none",
        "--runtime",
        "runc",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1024:1024",
        &image.0,
        "--version",
    ]);
    assert!(
        ran.status.success(),
        "podman run: {}",
        String::from_utf8_lossy(&ran.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&ran.stdout), version);
}

// ---------------------------------------------------------------------------------------------
// Prometheus rules and the Grafana dashboard

fn rules_path() -> PathBuf {
    deploy_dir().join("prometheus/tcpscope.rules.yml")
}

/// `promtool check rules` accepts the rules file and `promtool test rules` passes its unit
/// tests (input series, expected alerts and recorded values).
#[test]
fn prometheus_rules_pass_promtool_check_and_unit_tests() {
    let check = run(&[
        "promtool",
        "check",
        "rules",
        &rules_path().to_string_lossy(),
    ]);
    assert!(
        check.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let tests = deploy_dir().join("prometheus/tcpscope.rules.test.yml");
    let test = run(&["promtool", "test", "rules", &tests.to_string_lossy()]);
    let said =
        String::from_utf8_lossy(&test.stdout).into_owned() + &String::from_utf8_lossy(&test.stderr);
    assert!(test.status.success(), "promtool test rules: {said}");
    assert!(said.contains("SUCCESS"), "{said}");
}

/// Every rule of the rules file: (name, expression, is an alert).
fn rules() -> Vec<(String, String, bool)> {
    let doc = yaml_documents(&rules_path()).remove(0);
    doc["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules").clone())
        .map(|r| {
            let expr = r["expr"].as_str().expect("expr").to_owned();
            match (r["record"].as_str(), r["alert"].as_str()) {
                (Some(name), None) => (name.to_owned(), expr, false),
                (None, Some(name)) => (name.to_owned(), expr, true),
                _ => panic!("a rule is a record or an alert: {r}"),
            }
        })
        .collect()
}

/// The range the test gives Grafana's `$__rate_interval`: longer than the test, so every
/// counter's increase since the traffic began is in it.
const RATE_INTERVAL: &str = "2m";

/// Every query of the dashboard: (panel title, expression with Grafana's variables replaced:
/// `$__rate_interval` by [`RATE_INTERVAL`], the template variables, all used as regular
/// expressions (`=~"$var"`), by `.*`, as "All" selects).
fn dashboard_queries(dashboard: &Value) -> Vec<(String, String)> {
    let variables: Vec<String> = dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
        .iter()
        .filter(|v| v["type"] != "datasource")
        .map(|v| v["name"].as_str().expect("name").to_owned())
        .collect();
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        let title = panel["title"].as_str().expect("title");
        let Some(targets) = panel["targets"].as_array() else {
            assert_eq!(panel["type"], "row", "{title}: a panel without queries");
            continue;
        };
        assert!(!targets.is_empty(), "{title}: no queries");
        assert_eq!(panel["datasource"]["uid"], "${DS_PROMETHEUS}", "{title}");
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${DS_PROMETHEUS}", "{title}");
            let mut expr = t["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("{title}: a target without expr"))
                .replace("$__rate_interval", RATE_INTERVAL);
            for v in &variables {
                let used = format!("=~\"${v}\"");
                expr = expr.replace(&used, "=~\".*\"");
            }
            assert!(
                !expr.contains('$'),
                "{title}: a variable not used as `=~\"$var\"` in {expr}"
            );
            out.push((title.to_owned(), expr));
        }
    }
    out
}

/// The panels the dashboard must have, by what their queries read.
#[test]
fn dashboard_has_every_panel_the_deployment_needs() {
    let dashboard: Value =
        serde_json::from_str(&read(&deploy_dir().join("grafana/tcpscope.json"))).expect("JSON");
    assert!(dashboard["schemaVersion"].as_u64().expect("schemaVersion") >= 36);
    assert_eq!(dashboard["__inputs"][0]["name"], "DS_PROMETHEUS");
    let queries = dashboard_queries(&dashboard);
    let has = |what: &str, needles: &[&str]| {
        assert!(
            queries
                .iter()
                .any(|(_, q)| needles.iter().all(|n| q.contains(n))),
            "no panel for {what}: {needles:?}"
        );
    };
    has(
        "TIME-WAIT per side",
        &["tcpscope_endpoints", "time_wait", "by (side"],
    );
    has(
        "local endpoints per state",
        &["by (state)", "side=\"local\""],
    );
    has(
        "remote endpoints per state",
        &["by (state)", "side=\"remote\""],
    );
    has(
        "SYN floods per port",
        &["tcpscope_syn_flood_active", "by (port)"],
    );
    has(
        "handshake heatmap",
        &[
            "increase(tcpscope_handshake_duration_seconds_bucket",
            "by (le)",
        ],
    );
    for q in ["0.5", "0.9", "0.99"] {
        has("handshake quantiles", &[&format!("histogram_quantile({q}")]);
    }
    has(
        "table pressure",
        &["tcpscope_flows", "/ tcpscope_flow_table_capacity"],
    );
    has(
        "refused records",
        &["tcpscope_flow_table_insert_failures_total"],
    );
    has(
        "invalid segments",
        &["tcpscope_invalid_segments_total", "by (reason)"],
    );
    let heatmaps = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .filter(|p| p["type"] == "heatmap")
        .count();
    assert_eq!(heatmaps, 1);
}

const PORT: u16 = 9700;

/// A child process killed (and reaped) on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `q` (bounded) until Prometheus answers it with at least one series of a finite value;
/// returns the series. The query must parse (a 400 fails at once).
fn returns_data(prom: &Prometheus, what: &str, q: &str, within: Duration) -> Vec<(Value, f64)> {
    let deadline = Instant::now() + within;
    loop {
        let r = prom.query(q);
        if r.iter().any(|(_, v)| v.is_finite()) {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: `{q}` returned no data within {within:?}: {r:?}"
        );
        thread::sleep(Duration::from_millis(500));
    }
}

/// The state Prometheus gives each alerting rule (`inactive`, `pending`, `firing`) and each
/// rule's health, from `/api/v1/rules`.
fn rule_states(prom: &Prometheus) -> BTreeMap<String, (String, String)> {
    let data = prom.api("/api/v1/rules");
    let mut out = BTreeMap::new();
    for g in data["groups"].as_array().expect("groups") {
        for r in g["rules"].as_array().expect("rules") {
            let name = r["name"].as_str().expect("name").to_owned();
            let state = r["state"].as_str().unwrap_or("recording").to_owned();
            let health = r["health"].as_str().expect("health").to_owned();
            out.insert(name, (state, health));
        }
    }
    out
}

/// A real Prometheus, with the rules file loaded, scrapes a real agent while real traffic
/// runs: closed connections leave TIME-WAIT on both sides and fill the handshake histograms;
/// held connections overfill a 32-slot established table (records refused); SYN+FIN segments
/// are invalid; a spoofed-source SYN flood (198.18.0.0/15, which this test owns, into a
/// namespace that drops it after the hook saw it, so no SYN-ACK ever answers) fills a 256-slot
/// half-open table whose records expire unanswered every 3 s, and raises the SYN-flood flag.
/// Then every query of the dashboard, every rule's expression and every recorded series must
/// parse and return data through the HTTP API, and every alert's condition holds: `SynFlood`
/// fires (its `for: 30s` elapses during the flood); the others, whose `for:` (1 or 5 min) is
/// longer than a test should run, are pending. Bounded: the flood stops after 60 s at most.
#[test]
fn every_dashboard_and_rule_query_returns_data_from_a_real_prometheus() {
    tcp_testbed::require_root();
    let started = Instant::now();
    let link = Link::new();
    // The flood's SYNs are seen by the hook (XDP, before the stack) and dropped by the stack.
    nft(
        &link.server,
        "table inet flood {\n  chain input {\n    type filter hook input priority 0;\n    \
         ip saddr 198.18.0.0/15 drop\n  }\n}\n",
    );
    let mut agent = Agent::start(
        &link.server,
        &[
            "--iface",
            &link.server_if,
            "--listen",
            AGENT,
            "--flows-capacity",
            "32",
            "--half-open-capacity",
            "256",
            "--half-open-secs",
            "3",
            "--time-wait-secs",
            "300",
        ],
    );
    agent.wait_for("tracking;");
    let prom = Prometheus::start_with_rules(&link.server, AGENT, &[&rules_path()]);
    prom.wait_for(
        "up{job=\"tcpscope\"}",
        |v| v == 1.0,
        Duration::from_secs(20),
    );

    // Completed and closed connections, from either side.
    let (v4, _) = link.server_addrs(PORT);
    let listener = link
        .server
        .enter(move || TcpListener::bind(v4).expect("listener"));
    link.exchange_on(&listener, 10, false);
    link.exchange_on(&listener, 6, true);
    // Held connections: 16 TIME-WAIT records and 24 more connections overfill 32 slots.
    let holder = {
        let listener = listener.try_clone().expect("listener");
        link.server.spawn(move || {
            (0..24)
                .map(|_| listener.accept().expect("accept").0)
                .collect::<Vec<_>>()
        })
    };
    let held: Vec<TcpStream> = link.client.enter(move || {
        (0..24)
            .map(|_| {
                let mut c = TcpStream::connect(v4).expect("connect");
                c.write_all(b"h").expect("hello");
                c
            })
            .collect()
    });
    let held_server_side = holder.join().expect("holder");
    // Impossible flags: SYN+FIN (unanswered: hping3 then exits 1).
    let server_ip = link.server_v4();
    let out = link
        .client
        .command("hping3")
        .args([
            "-c",
            "3",
            "-i",
            "u10000",
            "-S",
            "-F",
            "-p",
            &PORT.to_string(),
            &server_ip,
        ])
        .output()
        .expect("hping3 (Debian package hping3)");
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("3 packets transmitted"), "hping3: {said}");
    // Let the connections' handshakes leave the flood rule's window (5 s), so the flood alone
    // is judged.
    thread::sleep(Duration::from_secs(5));

    let flood_started = Instant::now();
    let flood = Killed(
        link.client
            .command("timeout")
            .args([
                "60",
                "hping3",
                "-q",
                "-S",
                "-p",
                &PORT.to_string(),
                "-a",
                "198.18.7.7",
                "-i",
                "u1000",
                "-c",
                "60000",
                &server_ip,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("hping3 (Debian package hping3)"),
    );
    // SynFlood fires once the flag has held for its `for: 30s`.
    let deadline = Instant::now() + Duration::from_secs(55);
    loop {
        let states = rule_states(&prom);
        if states.get("SynFlood").map(|(s, _)| s.as_str()) == Some("firing") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "SynFlood never fired: {states:?}; syn_flood_active: {:?}",
            prom.query("tcpscope_syn_flood_active")
        );
        thread::sleep(Duration::from_millis(500));
    }
    eprintln!(
        "SynFlood firing {:?} after the flood began",
        flood_started.elapsed()
    );

    // Every query of the dashboard.
    let dashboard: Value =
        serde_json::from_str(&read(&deploy_dir().join("grafana/tcpscope.json"))).expect("JSON");
    let queries = dashboard_queries(&dashboard);
    let within = Duration::from_secs(10);
    for (title, q) in &queries {
        let r = returns_data(&prom, title, q, within);
        eprintln!("dashboard {title:?}: {} series, `{q}`", r.len());
    }
    // The instance variable's values (Grafana's label_values(tcpscope_build_info, instance)).
    let instances = prom.api("/api/v1/label/instance/values?match[]=tcpscope_build_info");
    assert_eq!(instances.as_array().map(Vec::len), Some(1), "{instances}");

    // Every rule's expression, every recorded series; every alert's condition holds.
    let rules = rules();
    for (name, expr, is_alert) in &rules {
        let r = returns_data(&prom, name, expr, within);
        eprintln!("rule {name}: {} series from its expression", r.len());
        if !is_alert {
            returns_data(&prom, name, name, within);
        }
    }
    let deadline = Instant::now() + within;
    loop {
        let states = rule_states(&prom);
        let unhealthy: Vec<_> = states.iter().filter(|(_, (_, h))| h != "ok").collect();
        assert!(unhealthy.is_empty(), "rules not evaluated: {unhealthy:?}");
        assert_eq!(states.len(), rules.len(), "{states:?}");
        let inactive: Vec<&String> = rules
            .iter()
            .filter(|(name, _, is_alert)| *is_alert && states[name].0 == "inactive")
            .map(|(name, _, _)| name)
            .collect();
        if inactive.is_empty() {
            eprintln!(
                "alerts: {:?}",
                states
                    .iter()
                    .filter(|(_, (s, _))| s != "recording")
                    .map(|(n, (s, _))| format!("{n} {s}"))
                    .collect::<Vec<_>>()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "alerts whose condition never held: {inactive:?}"
        );
        thread::sleep(Duration::from_millis(500));
    }
    drop(flood);

    // What the data says matches the traffic: both sides have TIME-WAIT, SYN+FIN was counted,
    // unanswered SYNs on the flooded port, records refused by both tables.
    let q = |q: &str| prom.query(q);
    let tw = q("sum by (side) (tcpscope_endpoints{state=\"time_wait\"})");
    for side in ["local", "remote"] {
        assert!(
            tw.iter().any(|(l, v)| l["side"] == side && *v > 0.0),
            "TIME-WAIT on the {side} side: {tw:?}"
        );
    }
    assert!(
        prom.scalar("tcpscope_invalid_segments_total{reason=\"bad_flags\"}")
            .expect("bad_flags")
            >= 3.0
    );
    let unanswered = q(&format!(
        "tcpscope_unanswered_syns_total{{port=\"{PORT}\"}}"
    ));
    assert!(unanswered.iter().any(|(_, v)| *v > 0.0), "{unanswered:?}");
    let refused = q("tcpscope_flow_table_insert_failures_total > 0");
    for (table, family) in [("established", "ipv4"), ("half_open", "all")] {
        assert!(
            refused
                .iter()
                .any(|(l, _)| l["table"] == table && l["family"] == family),
            "{table} {family} refused no record: {refused:?}"
        );
    }
    drop(held);
    drop(held_server_side);
    drop(listener);
    agent.stop();
    eprintln!("took {:?}", started.elapsed());
}

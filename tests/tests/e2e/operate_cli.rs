//! Command-line conventions, run through the real binary: where the config
//! comes from (`--config`, `GRIDPROXY_CONFIG`), the exit codes, and logs a
//! service manager can store (JSON lines or plain text, never colour escapes
//! when not on a terminal, no status lines on a piped stdout).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use gridproxy_tests::bench::temp_dir;

use crate::operate_site::gridproxy_bin;

/// A proxy config that starts without any peer: the pool is a closed
/// loopback port (retried in the background), the listener takes any port.
const CONFIG: &str =
    "[[pools]]\nname = \"p\"\naddress = \"127.0.0.1:9\"\nprotocol = \"sv1\"\nuser = \"u\"\n\n\
                      [listen]\nsv1 = \"127.0.0.1:0\"\n";

#[test]
fn the_config_comes_from_the_flag_the_positional_or_the_environment() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    let bin = gridproxy_bin();
    let dir = temp_dir("operate-cli-config");
    let path = dir.join("gp.toml");
    std::fs::write(&path, CONFIG).unwrap();
    let ok = |args: &[&str], env: Option<&std::path::Path>| {
        let mut c = Command::new(&bin);
        c.args(args).env_remove("GRIDPROXY_CONFIG");
        if let Some(e) = env {
            c.env("GRIDPROXY_CONFIG", e);
        }
        c.output().unwrap()
    };
    let p = path.to_str().unwrap();
    for (args, env) in [
        (vec!["check-config", p], None),
        (vec!["check-config", "--config", p], None),
        (vec!["check-config", "-c", p], None),
        (vec!["check-config"], Some(path.as_path())),
    ] {
        let out = ok(&args, env);
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?} env {env:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("ok (1 pools"), "{args:?}: {text}");
    }
    // --config beats the environment; a missing file is a config error (2)
    // that names the file.
    let missing = dir.join("missing.toml");
    let out = ok(&["check-config", "--config", p], Some(&missing));
    assert_eq!(out.status.code(), Some(0));
    for args in [vec!["check-config"], vec!["run"]] {
        let out = ok(&args, Some(&missing));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("missing.toml"), "{args:?}: {err}");
    }
    // A token file is read relative to the config's folder, whatever the
    // working directory, and check-config refuses one that is missing.
    let with_token = format!(
        "{CONFIG}\n[api]\nlisten = \"127.0.0.1:0\"\n\n[[api.tokens]]\nname = \"ops\"\nrole = \"operate\"\ntoken_file = \"ops.token\"\n"
    );
    let tpath = dir.join("with-token.toml");
    std::fs::write(&tpath, with_token).unwrap();
    let t = tpath.to_str().unwrap();
    let out = ok(&["check-config", t], None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "missing token file accepted: {err}"
    );
    assert!(
        err.contains("token_file") && err.contains("ops.token"),
        "{err}"
    );
    std::fs::write(dir.join("ops.token"), "0123456789abcdef0123\n").unwrap();
    let out = Command::new(&bin)
        .args(["check-config", t])
        .current_dir("/")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Usage errors are 2 as well: a positional path next to --config, an
    // unknown log format, a log filter that does not parse.
    for args in [
        vec!["check-config", p, "--config", p],
        vec!["--log-format", "xml", "check-config", p],
        vec!["--log-level", "gridproxy=loud", "check-config", p],
    ] {
        let out = ok(&args, None);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Start `gridproxy run` with piped output, wait for its start-up lines,
/// stop it with SIGTERM and return (exit code, stdout, stderr).
fn run_piped(args: &[&str], config: &std::path::Path) -> (Option<i32>, String, String) {
    let mut child = Command::new(gridproxy_bin())
        .args(args)
        .env("GRIDPROXY_CONFIG", config)
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    let out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line.clone());
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let err = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(err), &mut s);
        s
    });
    // Started once it names its SV1 listener.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.contains("SV1 miners ->") => break,
            Ok(_) => {}
            Err(_) => {
                let _ = child.kill();
                panic!("gridproxy run did not start in 30 s");
            }
        }
    }
    // Long enough for the pool to be tried (and refused) and logged.
    std::thread::sleep(Duration::from_millis(1500));
    // SIGTERM, as a service manager stops it.
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = child.wait().unwrap();
    (
        status.code(),
        reader.join().unwrap(),
        err_reader.join().unwrap(),
    )
}

#[test]
fn piped_logs_are_plain_or_json_and_a_piped_stdout_gets_no_status_lines() {
    let _gate = gridproxy_tests::module_gate(module_path!());
    let dir = temp_dir("operate-cli-logs");
    let path = dir.join("gp.toml");
    std::fs::write(&path, CONFIG).unwrap();

    let (code, stdout, stderr) = run_piped(&["--log-format", "json", "run"], &path);
    assert_eq!(code, Some(0), "exit after SIGTERM; stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "no log lines at all");
    for l in &lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("a log line is not JSON ({e}): {l}"));
        assert!(
            v.get("level").is_some() && v.get("timestamp").is_some(),
            "{l}"
        );
    }
    assert!(
        !stdout.contains("miners="),
        "status line on a pipe: {stdout}"
    );

    // Text logs: readable, no colour escapes on a pipe; the status line
    // comes back when asked for.
    let (code, stdout, stderr) = run_piped(&["run", "--status-every", "1"], &path);
    assert_eq!(code, Some(0), "stderr: {stderr}");
    assert!(!stderr.is_empty(), "no log lines at all");
    assert!(
        !stderr.contains('\u{1b}'),
        "colour escapes in a piped log: {stderr:?}"
    );
    assert!(stderr.contains("INFO"), "{stderr}");
    assert!(
        stdout.lines().any(|l| l.starts_with("miners=")),
        "--status-every 1 printed no status line: {stdout}"
    );
}

/// `Type=notify`: the datagrams `gridproxy run` sends to `NOTIFY_SOCKET`
/// (what systemd would get), through start, watchdog, reload and stop.
#[test]
fn run_tells_the_service_manager_ready_reloading_watchdog_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let _gate = gridproxy_tests::module_gate(module_path!());
    let dir = temp_dir("operate-cli-notify");
    let path = dir.join("gp.toml");
    std::fs::write(&path, CONFIG).unwrap();
    let sock_path = dir.join("notify.sock");
    let _ = std::fs::remove_file(&sock_path);
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut child = Command::new(gridproxy_bin())
        .args(["run", "--config"])
        .arg(&path)
        .env("NOTIFY_SOCKET", &sock_path)
        // 400 ms: pinged every 200 ms.
        .env("WATCHDOG_USEC", "400000")
        .env_remove("WATCHDOG_PID")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id().to_string();
    let mut buf = [0u8; 4096];
    let mut next = |what: &str| -> String {
        loop {
            let n = sock
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("no notification while waiting for {what}: {e}"));
            let m = String::from_utf8_lossy(&buf[..n]).to_string();
            if m.lines().any(|l| l == what) {
                return m;
            }
        }
    };
    let ready = next("READY=1");
    assert!(ready.contains("STATUS=running: SV1 miners ->"), "{ready}");
    next("WATCHDOG=1");
    next("WATCHDOG=1");
    let kill = |sig: &str| {
        assert!(Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success())
    };
    kill("-HUP");
    let reloading = next("RELOADING=1");
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    let again = next("READY=1");
    assert!(again.contains("STATUS=reloaded"), "{again}");
    kill("-TERM");
    next("STOPPING=1");
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}

//! The `regguard` command line an operator meets: version, help, config
//! precedence (flags > REGGUARD_* env > file > defaults), and start-up errors.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{free_port, poll_until, Proc};

fn regguard() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_regguard"));
    for (k, _) in std::env::vars() {
        if k.starts_with("REGGUARD_") {
            c.env_remove(k);
        }
    }
    c
}

#[test]
fn version_and_help_are_readable() {
    let out = regguard().arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("regguard {}", env!("CARGO_PKG_VERSION"))
    );
    let out = regguard().args(["serve", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--config",
        "--listen",
        "--upstream",
        "--admin-listen",
        "--tls-cert",
        "--tls-key",
        "--log-format",
        "--idle-timeout",
        "--drain-timeout",
    ] {
        assert!(help.contains(flag), "help lacks {flag}:\n{help}");
    }
    assert!(
        help.contains("REGGUARD_LISTEN"),
        "help names the env variables:\n{help}"
    );
    assert!(help.contains("0.0.0.0:5050") && help.contains("http://registry-private:5000"));
}

#[test]
fn bad_config_fails_at_start_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("regguard.toml");
    std::fs::write(&file, "upstream = \"ftp://registry:5000\"\n").unwrap();
    let out = regguard()
        .args(["serve", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`upstream`"), "{err}");

    std::fs::write(&file, "idle_timout = \"5s\"\n").unwrap();
    let out = regguard()
        .args(["serve", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("idle_timout"));

    let out = regguard()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:1",
            "--admin-listen",
            "127.0.0.1:2",
            "--tls-cert",
            "/nonexistent/cert.pem",
            "--tls-key",
            "/nonexistent/key.pem",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/cert.pem"));
}

/// Starts `regguard serve` with the given extra args/env and returns the port it listens on
/// among `candidates`.
fn listening_port(args: &[&str], env: &[(&str, String)], candidates: &[u16]) -> u16 {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let mut cmd = regguard();
    cmd.arg("serve")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let _proc = Proc {
        child: Some(cmd.spawn().unwrap()),
        log,
    };
    poll_until(Duration::from_secs(20), "regguard to listen", || {
        candidates
            .iter()
            .copied()
            .find(|p| TcpStream::connect(("127.0.0.1", *p)).is_ok())
    })
}

#[test]
fn flags_beat_environment_beats_file() {
    let (file_port, env_port, flag_port) = (free_port(), free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("regguard.toml");
    std::fs::write(
        &file,
        format!("listen = \"127.0.0.1:{file_port}\"\nadmin_listen = \"127.0.0.1:{}\"\nupstream = \"http://127.0.0.1:9\"\n", free_port()),
    )
    .unwrap();
    let config = file.to_str().unwrap();
    let all = [file_port, env_port, flag_port];
    let env = [("REGGUARD_LISTEN", format!("127.0.0.1:{env_port}"))];
    assert_eq!(listening_port(&["--config", config], &[], &all), file_port);
    assert_eq!(listening_port(&["--config", config], &env, &all), env_port);
    let flag = format!("127.0.0.1:{flag_port}");
    assert_eq!(
        listening_port(&["--config", config, "--listen", &flag], &env, &all),
        flag_port
    );
}

//! The `regguard` command line an operator meets: version, help, config
//! precedence (flags > REGGUARD_* env > file > defaults), and start-up errors.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{poll_until, regguard_bound, Proc};

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

/// Starts `regguard serve` with the given extra args/env and returns the address its public
/// listener bound, from its start-up line.
fn listening_addr(args: &[&str], env: &[(&str, String)]) -> SocketAddr {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("regguard.log");
    let mut cmd = regguard();
    cmd.arg("serve")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let proc = Proc::adopt(cmd.spawn().unwrap(), log);
    let (public, _admin) = poll_until(Duration::from_secs(20), "regguard to listen", || {
        regguard_bound(&proc.log_text())
    });
    assert!(
        proc.listening().contains(&public),
        "regguard holds the socket it logged"
    );
    public
}

#[test]
fn flags_beat_environment_beats_file() {
    // Each source names its own loopback address, with port 0: which one regguard bound
    // tells which source won, with no port picked in advance.
    let (file_ip, env_ip, flag_ip) = ("127.0.0.11", "127.0.0.12", "127.0.0.13");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("regguard.toml");
    std::fs::write(
        &file,
        format!("listen = \"{file_ip}:0\"\nadmin_listen = \"127.0.0.2:0\"\nupstream = \"http://127.0.0.1:9\"\n"),
    )
    .unwrap();
    let config = file.to_str().unwrap();
    let env = [("REGGUARD_LISTEN", format!("{env_ip}:0"))];
    let ip = |a: SocketAddr| a.ip().to_string();
    assert_eq!(ip(listening_addr(&["--config", config], &[])), file_ip);
    assert_eq!(ip(listening_addr(&["--config", config], &env)), env_ip);
    let flag = format!("{flag_ip}:0");
    assert_eq!(
        ip(listening_addr(
            &["--config", config, "--listen", &flag],
            &env
        )),
        flag_ip
    );
}

//! Configuration an operator can discover: the README's table is the code's key table, every
//! `REGGUARD_*` name the README gives is one regguard reads, `--help` lists every key, and
//! `regguard config check` validates a file and prints what is in effect; a missing TLS file,
//! a bad duration or an unknown variable stop start-up with exit 2 naming the key; the access
//! log's `duration_ms` has two decimals.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{Read, Write};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{poll_until, regguard_bound, Proc};
use regguard::config::keys::{self, KEYS};

const TABLE_START: &str = "<!-- config-table:";
const TABLE_END: &str = "<!-- /config-table -->";

fn regguard() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_regguard"));
    for (k, _) in std::env::vars() {
        if k.starts_with("REGGUARD_") {
            c.env_remove(k);
        }
    }
    c
}

/// Runs a command that must exit by itself; one that starts serving instead (the check under
/// test is broken) is stopped and fails the test rather than hanging it.
fn output_within(cmd: &mut Command) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "still running after 20s: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap()
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The README's configuration table is generated from the key table. After adding a key, run
/// this test with `CONFIG_TABLE_BLESS=1` to write the new table into the README.
#[test]
fn readme_table_is_the_key_table() {
    let readme = readme();
    let start = readme
        .find(TABLE_START)
        .expect("README has the table marker");
    let body = start + readme[start..].find('\n').unwrap() + 1;
    let end = readme
        .find(TABLE_END)
        .expect("README has the table end marker");
    let expected = keys::markdown_table();
    if readme[body..end] != expected {
        if std::env::var_os("CONFIG_TABLE_BLESS").is_some() {
            let updated = format!("{}{expected}{}", &readme[..body], &readme[end..]);
            std::fs::write(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"), updated).unwrap();
            return;
        }
        panic!(
            "README's configuration table differs from src/config/keys.rs; \
             run with CONFIG_TABLE_BLESS=1 to regenerate it. Expected:\n{expected}"
        );
    }
    for section in [
        "[gate] mode",
        "[gate] on_check_error",
        "[gate] depth",
        "[gate] max_references",
        "[gate] max_buffered_mib",
    ] {
        assert!(
            readme[body..end].contains(&format!("`{section}`")),
            "{section}"
        );
    }
}

/// Every `REGGUARD_*` name in the README: `REGGUARD_X` exactly, `REGGUARD_X_<KEY>` as a prefix.
fn readme_env_names() -> Vec<(String, bool)> {
    let readme = readme();
    let mut names = Vec::new();
    let mut rest = readme.as_str();
    while let Some(i) = rest.find("REGGUARD_") {
        let tail = &rest[i..];
        let len = tail
            .find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        // `REGGUARD_GATE_<KEY>`, `REGGUARD_*`: a family, not a name.
        let is_prefix = tail[len..].starts_with('<') || tail[..len].ends_with('_');
        names.push((tail[..len].to_string(), is_prefix));
        rest = &tail[len..];
    }
    names.sort();
    names.dedup();
    names
}

#[test]
fn every_variable_the_readme_names_is_read() {
    let names = readme_env_names();
    assert!(names.len() > 30, "{names:?}");
    let known = keys::known_env();
    for (name, is_prefix) in &names {
        if *is_prefix {
            assert!(
                known.iter().any(|k| k.starts_with(name.as_str())),
                "README's {name}<...> names no variable"
            );
        } else {
            assert!(
                keys::env_is_known(name),
                "README names {name}, which regguard does not read"
            );
        }
    }
    // And the binary takes each key's variable: all of them at once, each at its default,
    // pass `config check`, which reports each as coming from the environment.
    let mut cmd = regguard();
    cmd.args(["config", "check"]);
    for k in KEYS {
        if let keys::Default::Value(v) = k.default {
            cmd.env(k.env(), v);
        }
    }
    let out = cmd.output().unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    for k in KEYS {
        if let keys::Default::Value(_) = k.default {
            assert!(
                stdout.contains(&format!("  # {}\n", k.env())),
                "{} not taken:\n{stdout}",
                k.env()
            );
        }
    }
}

#[test]
fn unknown_variable_stops_start_up_naming_it() {
    for cmd in [vec!["serve"], vec!["config", "check"]] {
        let out = output_within(
            regguard()
                .args(&cmd)
                .env("REGGUARD_VALIDATE_OK_TLL", "5m")
                .env("REGGUARD_LISTEN", "127.0.0.1:0")
                .env("REGGUARD_ADMIN_LISTEN", "127.0.0.1:0"),
        );
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{cmd:?}: {stderr}");
        assert!(
            stderr.contains("REGGUARD_VALIDATE_OK_TLL")
                && stderr.contains("did you mean REGGUARD_VALIDATE_OK_TTL"),
            "{stderr}"
        );
    }
}

#[test]
fn help_lists_every_key_with_its_variable_and_default() {
    for args in [["serve", "--help"], ["config", "--help"]] {
        let out = regguard().args(args).output().unwrap();
        let (help, _) = text(&out);
        assert!(out.status.success());
        for k in KEYS {
            let default = match k.default {
                keys::Default::Value(v) | keys::Default::Unset(v) => v,
            };
            let line = help
                .lines()
                .find(|l| l.contains(&format!(" {} ", k.env())))
                .unwrap_or_else(|| panic!("{args:?} lacks {}:\n{help}", k.env()));
            assert!(
                line.contains(k.name()) && line.trim_end().ends_with(default),
                "{line}"
            );
        }
    }
}

#[test]
fn config_check_prints_effective_settings_or_names_the_bad_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("regguard.toml");
    std::fs::write(
        &file,
        "listen = \"127.0.0.1:7000\"\n[gate]\nmode = \"audit\"\n",
    )
    .unwrap();
    let out = regguard()
        .args(["config", "check"])
        .arg(&file)
        .args(["--admin-listen", "127.0.0.1:7001"])
        .env("REGGUARD_VALIDATE_OK_TTL", "2m")
        .env("REGGUARD_SCAN_USER", "scanner")
        .env("REGGUARD_SCAN_PASSWORD", "pa55word")
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    for line in [
        "listen = \"127.0.0.1:7000\"  # file",
        "admin_listen = \"127.0.0.1:7001\"  # --admin-listen",
        "mode = \"audit\"  # file",
        "ok_ttl = \"2m\"  # REGGUARD_VALIDATE_OK_TTL",
        "idle_timeout = \"900s\"  # default",
        "# REGGUARD_SCAN_PASSWORD = ********",
    ] {
        assert!(stdout.contains(line), "lacks {line:?}:\n{stdout}");
    }
    assert!(!stdout.contains("pa55word"), "{stdout}");

    for (toml, key) in [
        (
            "[gate]\nmode = \"strict\"\n",
            "`gate.mode`: \"strict\" is not one of enforce, audit, off",
        ),
        ("[scan]\nrate = 0\n", "`scan.rate`: must be at least 1"),
        (
            "[validate]\nworkrs = 2\n",
            "unknown key `workrs` in `[validate]` (did you mean `workers`?)",
        ),
        (
            "[validate]\nok_ttl = \"-5\"\n",
            "`validate.ok_ttl`: \"-5\" is not a duration (use 30s, 15m, 1h)",
        ),
    ] {
        std::fs::write(&file, toml).unwrap();
        let out = regguard()
            .args(["config", "check"])
            .arg(&file)
            .output()
            .unwrap();
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{toml}: {stderr}");
        assert!(stderr.contains(key), "{toml}: {stderr}");
        assert!(stdout.is_empty());
    }
}

#[test]
fn bad_duration_in_the_environment_reads_as_documented() {
    let out = output_within(
        regguard()
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
            ])
            .env("REGGUARD_VALIDATE_OK_TTL", "-5"),
    );
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        stderr.trim(),
        "regguard: configuration error: `validate.ok_ttl`: \"-5\" is not a duration (use 30s, 15m, 1h)"
    );
}

#[test]
fn missing_or_unreadable_certificate_is_exit_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key.pem");
    std::fs::write(&key, "not used").unwrap();
    let missing = dir.path().join("missing.pem");
    let a_dir = dir.path().to_path_buf();
    for (cert, key, named) in [
        (&missing, &key, "`tls_cert`: cannot read"),
        (&a_dir, &key, "`tls_cert`: cannot read"),
        (&key, &missing, "`tls_key`: cannot read"),
    ] {
        let out = output_within(
            regguard()
                .args(["serve", "--listen", "127.0.0.1:0"])
                .args(["--admin-listen", "127.0.0.1:0"])
                .arg("--tls-cert")
                .arg(cert)
                .arg("--tls-key")
                .arg(key),
        );
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(named), "{stderr}");
    }
}

/// `duration_ms=2.71`: two decimals at most, never float noise.
#[test]
fn access_log_duration_has_two_decimals() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("regguard.log");
    let child = regguard()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .args(["--upstream", "http://127.0.0.1:9"])
        .env("REGGUARD_VALIDATE_ENABLED", "false")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let proc = Proc::adopt(child, log);
    let (public, _) = poll_until(Duration::from_secs(20), "regguard to listen", || {
        regguard_bound(&proc.log_text())
    });
    let mut conn = std::net::TcpStream::connect(public).unwrap();
    conn.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    let _ = conn.read_to_string(&mut answer);
    let value = poll_until(Duration::from_secs(10), "the access log line", || {
        let text = proc.log_text();
        let line = text
            .lines()
            .find(|l| l.contains("duration_ms="))?
            .to_string();
        let start = line.find("duration_ms=")? + "duration_ms=".len();
        Some(line[start..].split(' ').next()?.to_string())
    });
    let (whole, decimals) = value.split_once('.').unwrap_or((&value, ""));
    assert!(
        whole.chars().all(|c| c.is_ascii_digit()) && !decimals.is_empty() && decimals.len() <= 2,
        "duration_ms={value}"
    );
}

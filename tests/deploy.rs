//! The deployment files: alert rules checked and proven with promtool, the dashboard and
//! alerts referring only to metrics regguard really exports, and the Dockerfile, compose file,
//! Kubernetes manifests and systemd unit parsing and pointing at files that exist.
//! (No Docker engine runs on this kind of machine, so the image is not built here.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{oci, poll_until, require_tool, Regguard, RegguardOptions, Registry};

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo_file(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Metric names (histogram suffixes stripped) mentioned in a PromQL-bearing text.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for prefix in ["regguard_", "registry_manifest_integrity_"] {
        let mut rest = text;
        while let Some(i) = rest.find(prefix) {
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            let name = &tail[..end];
            let base = ["_bucket", "_count", "_sum"]
                .iter()
                .fold(name, |n, s| n.strip_suffix(s).unwrap_or(n));
            out.insert(base.to_string());
            rest = &tail[end..];
        }
    }
    out
}

#[test]
fn alert_rules_pass_promtool_and_every_alert_is_proven_to_fire() {
    let promtool = require_tool("promtool", "prometheus");
    let dir = repo_file("deploy/prometheus");
    let check = Command::new(&promtool)
        .args(["check", "rules", "regguard-alerts.yml"])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let test = Command::new(&promtool)
        .args(["test", "rules", "regguard-alerts.test.yml"])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(
        test.status.success(),
        "{}{}",
        String::from_utf8_lossy(&test.stdout),
        String::from_utf8_lossy(&test.stderr)
    );

    let rules: serde_yaml::Value =
        serde_yaml::from_str(&read("deploy/prometheus/regguard-alerts.yml")).unwrap();
    let tests = read("deploy/prometheus/regguard-alerts.test.yml");
    let mut alerts = Vec::new();
    for g in rules["groups"].as_sequence().unwrap() {
        for r in g["rules"].as_sequence().unwrap() {
            alerts.push(r["alert"].as_str().unwrap().to_string());
        }
    }
    for name in [
        "RegistryManifestIntegrityFailure",
        "RegistryIntegrityProbeStale",
        "RegistryCatalogInaccessible",
        "RegistryIndexChildMissing",
    ] {
        assert!(alerts.contains(&name.to_string()), "missing alert {name}");
    }
    for a in &alerts {
        assert!(
            tests.contains(&format!("alertname: {a}")),
            "alert {a} has no promtool test"
        );
    }
}

#[test]
fn dashboard_and_alerts_only_use_metrics_regguard_exports() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/regguard-dashboard.json")).unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 10);
    let mut exprs = String::new();
    for p in panels {
        for t in p["targets"].as_array().unwrap() {
            exprs.push_str(t["expr"].as_str().unwrap());
            exprs.push('\n');
        }
    }
    let mut used = metric_names(&exprs);
    used.extend(metric_names(&read("deploy/prometheus/regguard-alerts.yml")));
    used.extend(
        metric_names(&read("README.md"))
            .into_iter()
            .filter(|n| !n.ends_with('_')),
    );

    // A regguard with the scan, TLS and the vault on, over a registry with one broken reference,
    // exports everything (the certificate metrics exist only with TLS).
    let cert = common::TestCert::generate();
    let reg = Registry::start();
    let img = oci::multi_arch("deploy");
    oci::push_multi_arch(&reg.url(), "deploy/app", "v1", &img, &[]);
    reg.remove_revision_link("deploy/app", &img.image("amd64").manifest.digest);
    // And with a vault: its metrics and heal's exist only then.
    let vault = tempfile::tempdir().unwrap();
    let rg = Regguard::start_with(
        &reg.url(),
        RegguardOptions {
            env: vec![
                ("REGGUARD_SCAN_ENABLED".into(), "true".into()),
                (
                    "REGGUARD_VAULT_URL".into(),
                    vault.path().display().to_string(),
                ),
            ],
            tls: Some((cert.cert_pem.clone(), cert.key_pem.clone())),
            ..Default::default()
        },
    );
    let metrics = poll_until(Duration::from_secs(60), "the first scan", || {
        let m = rg.metrics();
        m.contains("regguard_broken_reference_info{").then_some(m)
    });
    let exported: BTreeSet<String> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_owned)
        .collect();
    let missing: Vec<&String> = used.iter().filter(|n| !exported.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "referenced but not exported: {missing:?}"
    );
}

#[test]
fn dockerfile_builds_from_files_that_exist_and_runs_as_non_root() {
    let text = read("deploy/Dockerfile");
    let stages = text.lines().filter(|l| l.starts_with("FROM ")).count();
    assert!(stages >= 2, "multi-stage");
    let mut last_user = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("COPY ") {
            if rest.starts_with("--from") {
                continue;
            }
            let parts: Vec<&str> = rest.split_whitespace().collect();
            for src in &parts[..parts.len() - 1] {
                assert!(repo_file(src).exists(), "COPY source {src} does not exist");
            }
        }
        if let Some(u) = line.strip_prefix("USER ") {
            last_user = Some(u.trim().to_string());
        }
    }
    let user = last_user.expect("a USER line");
    assert!(user != "root" && user != "0", "runs as {user}");
    assert!(read(".dockerignore").lines().any(|l| l.trim() == "target"));
    // The config the image ships parses.
    regguard::config::Settings::from_toml(&read("deploy/regguard.toml")).unwrap();
}

/// True when an image reference names an exact release: a tag with a version of three
/// numbers (`2.8.3`, `1.95.0-bookworm`) or a date (`bookworm-20250630-slim`), or a digest.
fn pinned(image: &str) -> bool {
    if image.contains("@sha256:") {
        return true;
    }
    let Some((_, tag)) = image.rsplit_once(':') else {
        return false;
    };
    let dotted = tag
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .any(|w| w.split('.').count() == 3 && w.split('.').all(|n| !n.is_empty()));
    let dated = tag
        .split(|c: char| !c.is_ascii_digit())
        .any(|w| w.len() == 8);
    dotted || dated
}

/// The Dockerfile's `HEALTHCHECK ... CMD [...]`, as its argument vector.
fn dockerfile_healthcheck() -> Vec<String> {
    let text = read("deploy/Dockerfile").replace("\\\n", " ");
    let line = text
        .lines()
        .find(|l| l.starts_with("HEALTHCHECK "))
        .expect("a HEALTHCHECK");
    let json = &line[line.find("CMD [").expect("exec-form CMD") + 4..];
    serde_json::from_str(json).unwrap()
}

/// Every `key: value` of `sub` is in `labels`.
fn selects(sub: &serde_yaml::Value, labels: &serde_yaml::Value) -> bool {
    let sub = sub.as_mapping().expect("a label map");
    !sub.is_empty() && sub.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[test]
fn dockerfile_and_compose_pin_images_publish_admin_on_loopback_and_health_checks_work() {
    for line in read("deploy/Dockerfile").lines() {
        if let Some(from) = line.strip_prefix("FROM ") {
            let image = from.split_whitespace().next().unwrap();
            assert!(pinned(image), "Dockerfile: {image} is not pinned");
        }
    }
    let compose: serde_yaml::Value =
        serde_yaml::from_str(&read("deploy/docker-compose.yml")).unwrap();
    let services = compose["services"].as_mapping().unwrap();
    for (name, svc) in services {
        let image = svc["image"].as_str().unwrap_or_default();
        assert!(
            pinned(image),
            "compose: {name:?} image {image:?} is not pinned"
        );
        assert!(
            svc["healthcheck"]["test"].is_sequence(),
            "compose: {name:?} has no healthcheck"
        );
    }
    let rg = &compose["services"]["regguard"];
    let context = repo_file("deploy").join(rg["build"]["context"].as_str().unwrap());
    assert!(context
        .join(rg["build"]["dockerfile"].as_str().unwrap())
        .exists());
    for v in rg["volumes"].as_sequence().unwrap() {
        let host = v.as_str().unwrap().split(':').next().unwrap();
        if host.starts_with('.') {
            assert!(
                repo_file("deploy").join(host).exists(),
                "compose mounts {host}, which does not exist"
            );
        }
    }
    assert_eq!(
        rg["depends_on"]["registry-private"]["condition"],
        "service_healthy"
    );
    let ports: Vec<&str> = rg["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert!(ports.contains(&"5050:5050"), "{ports:?}");
    for p in ports.iter().filter(|p| p.contains("9090")) {
        assert!(
            p.starts_with("127.0.0.1:"),
            "the admin port is published beyond loopback: {p}"
        );
    }
    assert!(ports.iter().any(|p| p.ends_with(":9090")), "{ports:?}");

    // One health check, in the image and in compose.
    let check = dockerfile_healthcheck();
    let compose_check: Vec<String> = rg["healthcheck"]["test"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(compose_check[0], "CMD");
    assert_eq!(compose_check[1..], check[..]);
    assert_eq!(check[..2], ["bash", "-c"]);
    assert!(check[2].contains("/dev/tcp/127.0.0.1/9090"));

    // And it works: healthy against a running regguard's admin port, unhealthy once it is gone.
    let reg = Registry::start();
    let mut proxy = Regguard::start(&reg.url());
    let script = check[2].replace(
        "/dev/tcp/127.0.0.1/9090",
        &format!("/dev/tcp/127.0.0.1/{}", proxy.admin.port()),
    );
    let run = || {
        Command::new("bash")
            .args(["-c", &script])
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(run(), "the health check fails against a healthy regguard");
    proxy.proc.stop();
    assert!(!run(), "the health check passes with regguard stopped");
}

#[test]
fn kubernetes_scans_once_per_registry_with_probes_admin_service_monitor_and_budget() {
    let docs: Vec<serde_yaml::Value> =
        serde_yaml::Deserializer::from_str(&read("deploy/kubernetes/regguard.yaml"))
            .map(|d| serde::Deserialize::deserialize(d).unwrap())
            .collect();
    let get = |kind: &str, name: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
    };
    let toml = get("ConfigMap", "regguard")["data"]["regguard.toml"]
        .as_str()
        .unwrap();
    let s = regguard::config::Settings::from_toml(toml).unwrap();
    assert_eq!(s.admin_listen.port(), 9090);
    assert_eq!(s.listen.port(), 5050);
    assert!(!s.scan.enabled, "the shared config must leave the scan off");

    let serve = get("Deployment", "regguard");
    let scan = get("Deployment", "regguard-scan");
    let env_of = |d: &serde_yaml::Value, name: &str| {
        d["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .map(|e| e["value"].as_str().unwrap_or_default().to_string())
    };
    for d in [serve, scan] {
        let name = d["metadata"]["name"].as_str().unwrap();
        let tmpl_labels = &d["spec"]["template"]["metadata"]["labels"];
        assert!(
            selects(&d["spec"]["selector"]["matchLabels"], tmpl_labels),
            "{name}: selector does not match its pods"
        );
        let c = &d["spec"]["template"]["spec"]["containers"][0];
        assert!(
            pinned(c["image"].as_str().unwrap()),
            "{name}: image not pinned"
        );
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz", "{name}");
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz", "{name}");
        for probe in ["livenessProbe", "readinessProbe"] {
            assert_eq!(c[probe]["httpGet"]["port"], "admin", "{name} {probe}");
        }
        assert!(
            c["ports"]
                .as_sequence()
                .unwrap()
                .iter()
                .any(|p| p["name"] == "admin" && p["containerPort"] == 9090),
            "{name}: no admin port 9090"
        );
    }
    // The scan runs once per registry: one replica, never two during a rollout, and the
    // serving replicas leave it off.
    assert!(serve["spec"]["replicas"].as_u64().unwrap() >= 2);
    assert_eq!(env_of(serve, "REGGUARD_SCAN_ENABLED"), None);
    assert_eq!(scan["spec"]["replicas"], 1);
    assert_eq!(scan["spec"]["strategy"]["type"], "Recreate");
    assert_eq!(
        env_of(scan, "REGGUARD_SCAN_ENABLED").as_deref(),
        Some("true")
    );
    let serve_pods = &serve["spec"]["template"]["metadata"]["labels"];
    let scan_pods = &scan["spec"]["template"]["metadata"]["labels"];

    // Clients reach the serving replicas only.
    let svc = get("Service", "regguard");
    assert!(selects(&svc["spec"]["selector"], serve_pods));
    assert!(!selects(&svc["spec"]["selector"], scan_pods));
    assert_eq!(svc["spec"]["ports"][0]["port"], 5050);
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], "registry");

    // Prometheus scrapes every pod's admin port, the scanner's included.
    let admin = get("Service", "regguard-admin");
    assert!(selects(&admin["spec"]["selector"], serve_pods));
    assert!(selects(&admin["spec"]["selector"], scan_pods));
    let admin_port = &admin["spec"]["ports"][0];
    assert_eq!(admin_port["port"], 9090);
    assert_eq!(admin_port["targetPort"], "admin");
    let sm = get("ServiceMonitor", "regguard");
    assert_eq!(sm["apiVersion"], "monitoring.coreos.com/v1");
    assert!(selects(
        &sm["spec"]["selector"]["matchLabels"],
        &admin["metadata"]["labels"]
    ));
    assert!(
        !selects(
            &sm["spec"]["selector"]["matchLabels"],
            &svc["metadata"]["labels"]
        ),
        "the ServiceMonitor would also scrape the client Service"
    );
    assert_eq!(sm["spec"]["endpoints"][0]["port"], admin_port["name"]);
    assert_eq!(sm["spec"]["endpoints"][0]["path"], "/metrics");

    // A drain keeps a serving replica up, and can still proceed.
    let pdb = get("PodDisruptionBudget", "regguard");
    assert_eq!(pdb["apiVersion"], "policy/v1");
    assert!(selects(&pdb["spec"]["selector"]["matchLabels"], serve_pods));
    let min = pdb["spec"]["minAvailable"].as_u64().unwrap();
    assert!(min >= 1 && min < serve["spec"]["replicas"].as_u64().unwrap());
}

#[test]
fn systemd_unit_documentation_is_what_install_sh_installs() {
    let unit = read("deploy/systemd/regguard.service");
    for needed in [
        "ExecStart=/usr/local/bin/regguard serve",
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "[Install]",
    ] {
        assert!(unit.contains(needed), "unit lacks {needed}");
    }
    let dest = tempfile::tempdir().unwrap();
    let out = Command::new(repo_file("deploy/systemd/install.sh"))
        .env("DESTDIR", dest.path())
        .env("BIN", env!("CARGO_BIN_EXE_regguard"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "install.sh: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let installed = |abs: &str| dest.path().join(abs.trim_start_matches('/'));
    let docs: Vec<&str> = unit
        .lines()
        .filter_map(|l| l.strip_prefix("Documentation="))
        .flat_map(str::split_whitespace)
        .collect();
    assert!(!docs.is_empty(), "no Documentation=");
    for doc in docs {
        let path = doc
            .strip_prefix("file://")
            .unwrap_or_else(|| panic!("Documentation={doc} is not a file install.sh ships"));
        assert!(
            installed(path).is_file(),
            "Documentation={doc} is not installed"
        );
    }
    assert_eq!(
        std::fs::read_to_string(installed("/etc/systemd/system/regguard.service")).unwrap(),
        unit
    );
    assert!(installed("/usr/local/bin/regguard").is_file());
    regguard::config::Settings::from_toml(
        &std::fs::read_to_string(installed("/etc/regguard/regguard.toml")).unwrap(),
    )
    .unwrap();
    // The container image carries the same guide at the same place.
    assert!(read("deploy/Dockerfile").contains("COPY README.md /usr/share/doc/regguard/README.md"));
    regguard::config::Settings::from_toml(&read("nginx-compat/regguard.toml")).unwrap();
}

/// Runs `deploy/demo.sh ARGS` with the test's ports, state file and regguard binary.
struct Demo {
    state: tempfile::TempDir,
    ports: [u16; 3],
}

impl Demo {
    fn new() -> Self {
        // Three ports the kernel just handed out, released for the demo to bind.
        let listeners: Vec<std::net::TcpListener> = (0..3)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let ports = [0, 1, 2].map(|i| listeners[i].local_addr().unwrap().port());
        Demo {
            state: tempfile::tempdir().unwrap(),
            ports,
        }
    }

    fn state_file(&self) -> PathBuf {
        self.state.path().join("demo.state")
    }

    fn run(&self, arg: &str) -> String {
        let out = Command::new(repo_file("deploy/demo.sh"))
            .arg(arg)
            .env("REGGUARD_BIN", env!("CARGO_BIN_EXE_regguard"))
            .env("DEMO_STATE", self.state_file())
            .env("DEMO_REGISTRY_PORT", self.ports[0].to_string())
            .env("DEMO_PORT", self.ports[1].to_string())
            .env("DEMO_ADMIN_PORT", self.ports[2].to_string())
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "demo.sh {arg} failed:\n{text}");
        text
    }

    /// `key=value` from the state file of the running demo.
    fn state(&self, key: &str) -> String {
        let text = std::fs::read_to_string(self.state_file()).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key} in the state file:\n{text}"))
            .trim_matches('"')
            .to_string()
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if self.state_file().exists() {
            let _ = Command::new(repo_file("deploy/demo.sh"))
                .arg("stop")
                .env("DEMO_STATE", self.state_file())
                .output();
        }
    }
}

/// The value after `registry_manifest_integrity_failures{...}` on a metrics line in `text`.
fn printed_gauge(text: &str) -> Option<f64> {
    text.lines()
        .rev()
        .filter_map(|l| {
            l.trim_start_matches([' ', '|'])
                .strip_prefix("registry_manifest_integrity_failures{")
        })
        .find_map(|rest| rest.rsplit_once(' ')?.1.parse().ok())
}

#[test]
fn demo_starts_shows_the_incident_heals_and_stops_clean() {
    require_tool("docker-registry", "docker-registry");
    require_tool("skopeo", "skopeo");
    // The README's first two commands are the entry points; they stay as they are.
    let readme = read("README.md");
    for line in [
        "./deploy/demo.sh     # demo: registry + regguard + a sample multi-arch image; prints where the metrics are",
        "./tests/run          # the whole test suite (installs docker-registry, skopeo, nginx-light, prometheus, and moto's S3 server from PyPI, if missing)",
    ] {
        assert!(readme.contains(line), "README lost: {line}");
    }

    let demo = Demo::new();
    let started = demo.run("start");
    assert!(started.contains("regguard demo is up"), "{started}");
    // The first scan ran after the sample push: it saw the one tag.
    assert!(
        started.contains("registry_manifest_integrity_tags_checked{instance=\"demo\"} 1"),
        "{started}"
    );
    assert_eq!(printed_gauge(&started), Some(0.0), "{started}");
    let pids: Vec<common::process::ProcInfo> = demo
        .state("pids")
        .split_whitespace()
        .map(|p| common::process::ProcInfo::of(p.parse().unwrap()).unwrap())
        .collect();
    assert_eq!(pids.len(), 2, "{pids:?}");
    let work = PathBuf::from(demo.state("work"));
    assert!(work.is_dir());
    // Without DEMO_STATE, the state lives in the checkout, not at a fixed /tmp path.
    assert!(read("deploy/demo.sh")
        .contains(r#"state="${DEMO_STATE:-$PWD/target/regguard-demo.state}""#));
    let child = demo.state("child");
    assert!(child.starts_with("sha256:") && child.len() == 71, "{child}");

    let incident = demo.run("incident");
    // The broken child is named in every view: the pull's error, the info series, /integrity
    // and the WARN log line.
    assert!(
        incident.contains(&format!("reading manifest {child}"))
            && incident.contains("manifest unknown"),
        "the failing pull's error is not shown:\n{incident}"
    );
    assert!(
        incident.contains(&format!(
            "regguard_broken_reference_info{{child_digest=\"{child}\""
        )),
        "{incident}"
    );
    assert!(
        incident.contains(&format!("\"child_digest\": \"{child}\"")),
        "the /integrity entry is not shown:\n{incident}"
    );
    assert!(
        incident.lines().any(|l| l.contains(" WARN ")
            && l.contains(&child)
            && l.contains("platform=linux/amd64")),
        "the WARN line is not shown:\n{incident}"
    );
    // Through regguard the same pull succeeds, from the vault.
    assert!(
        incident.contains("the pull succeeds: regguard answered")
            && incident.contains("x-regguard-served-from: vault"),
        "{incident}"
    );
    let gauge = printed_gauge(&incident).expect("the gauge is printed");
    assert!(gauge >= 1.0, "{incident}");
    assert!(incident.contains("0 -> 1"), "{incident}");
    // The handful of lines, not hundreds of zeros.
    let metric_lines = incident
        .lines()
        .filter(|l| {
            l.trim_start_matches([' ', '|']).starts_with("regguard_")
                || l.trim_start_matches([' ', '|']).starts_with("registry_")
        })
        .count();
    assert!(metric_lines <= 6, "{incident}");

    let healed = demo.run("heal");
    assert!(
        healed.contains(&format!("REPAIRED demo/app@{child}")),
        "{healed}"
    );
    assert_eq!(printed_gauge(&healed), Some(0.0), "{healed}");

    let stopped = demo.run("stop");
    for p in &pids {
        assert!(
            stopped.contains(&format!("stopped pid {}", p.pid)),
            "{stopped}"
        );
        poll_until(
            Duration::from_secs(10),
            "the demo's processes to end",
            || (!p.is_alive()).then_some(()),
        );
    }
    assert!(!work.exists(), "stop left {} behind", work.display());
    assert!(!demo.state_file().exists(), "stop left its state file");
}

/// The alert names defined in the rules file, in order.
fn alert_names() -> Vec<String> {
    let rules: serde_yaml::Value =
        serde_yaml::from_str(&read("deploy/prometheus/regguard-alerts.yml")).unwrap();
    rules["groups"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_sequence().unwrap())
        .map(|r| r["alert"].as_str().unwrap().to_string())
        .collect()
}

/// The text of README section `heading`, up to the next heading of any level (a `#` line
/// inside a code block is not a heading).
fn readme_section(heading: &str) -> String {
    let readme = read("README.md");
    let mut lines = readme.lines().skip_while(|l| *l != heading);
    assert!(lines.next().is_some(), "README has no {heading}");
    let mut out = String::new();
    let mut in_code = false;
    for line in lines {
        if line.starts_with("```") {
            in_code = !in_code;
        } else if !in_code && line.starts_with('#') {
            break;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[test]
fn readme_alerts_are_the_rules_file_and_the_runbook_covers_every_alert() {
    let file = read("deploy/prometheus/regguard-alerts.yml");
    let section = readme_section("### Alerts");
    let block = section
        .split_once("```yaml\n")
        .and_then(|(_, rest)| rest.split_once("```\n"))
        .map(|(b, _)| b)
        .expect("a yaml block under ### Alerts");
    assert!(
        block == file,
        "README's alert rules differ from deploy/prometheus/regguard-alerts.yml; paste the file in"
    );

    // Every alert has a runbook row, and every runbook row is an alert that exists.
    let runbook = readme_section("### What fires, and what to do (runbook)");
    let rows: BTreeSet<String> = runbook
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split_once('`'))
        .map(|(name, _)| name.to_string())
        .collect();
    let alerts: BTreeSet<String> = alert_names().into_iter().collect();
    assert_eq!(rows, alerts, "runbook rows vs. alerts in the rules file");
}

#[test]
fn dashboard_filters_by_job_and_instance_and_shows_client_404s_beside_broken_references() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/regguard-dashboard.json")).unwrap();
    let vars = dashboard["templating"]["list"].as_array().unwrap();
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no ${name} variable"))
    };
    for name in ["job", "instance"] {
        assert_eq!(var(name)["type"], "query", "${name}");
        assert_eq!(var(name)["includeAll"], true, "${name}");
    }
    assert!(
        var("instance")["definition"]
            .as_str()
            .unwrap()
            .contains("$job"),
        "$instance should list the instances of the chosen $job"
    );

    let panels = dashboard["panels"].as_array().unwrap();
    let exprs: Vec<(&str, &str)> = panels
        .iter()
        .flat_map(|p| {
            p["targets"]
                .as_array()
                .unwrap()
                .iter()
                .map(move |t| (p["title"].as_str().unwrap(), t["expr"].as_str().unwrap()))
        })
        .collect();
    // Every metric selector is filtered by both variables.
    for (title, expr) in &exprs {
        for prefix in ["regguard_", "registry_manifest_integrity_"] {
            for (i, _) in expr.match_indices(prefix) {
                let rest = &expr[i..];
                let name_end = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len());
                let selector = rest[name_end..]
                    .strip_prefix('{')
                    .and_then(|s| s.split_once('}'))
                    .map(|(s, _)| s)
                    .unwrap_or_else(|| panic!("{title}: `{expr}` has an unfiltered metric"));
                assert!(
                    selector.contains(r#"job=~"$job""#)
                        && selector.contains(r#"instance=~"$instance""#),
                    "{title}: `{expr}` is not filtered by $job and $instance"
                );
            }
        }
    }
    // Panels do not overlap on the 24-column grid.
    let boxes: Vec<(u64, u64, u64, u64, &str)> = panels
        .iter()
        .map(|p| {
            let g = &p["gridPos"];
            let n = |k: &str| g[k].as_u64().unwrap();
            (n("x"), n("y"), n("w"), n("h"), p["title"].as_str().unwrap())
        })
        .collect();
    for (i, a) in boxes.iter().enumerate() {
        assert!(a.0 + a.2 <= 24, "{} is wider than the grid", a.4);
        for b in &boxes[i + 1..] {
            let apart =
                a.0 + a.2 <= b.0 || b.0 + b.2 <= a.0 || a.1 + a.3 <= b.1 || b.1 + b.3 <= a.1;
            assert!(apart, "{} overlaps {}", a.4, b.4);
        }
    }
    // Client-visible 404s sit right beside the broken references table, and the registry's
    // reachability is a stat at the top.
    let find = |pred: &dyn Fn(&serde_json::Value) -> bool, what: &str| {
        panels
            .iter()
            .find(|p| pred(p))
            .unwrap_or_else(|| panic!("no panel for {what}"))
    };
    let uses = |p: &serde_json::Value, needle: &str| {
        p["targets"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["expr"].as_str().unwrap().contains(needle))
    };
    let table = find(
        &|p| p["type"] == "table" && uses(p, "regguard_broken_reference_info"),
        "broken references",
    );
    let client_404s = find(
        &|p| {
            p["type"] == "timeseries"
                && uses(p, r#"regguard_client_not_found_total{referenced="true""#)
        },
        "client-visible 404s",
    );
    let (t, c) = (&table["gridPos"], &client_404s["gridPos"]);
    assert_eq!(t["y"], c["y"], "not in the same row");
    assert!(
        t["x"].as_u64().unwrap() + t["w"].as_u64().unwrap() == c["x"].as_u64().unwrap()
            || c["x"].as_u64().unwrap() + c["w"].as_u64().unwrap() == t["x"].as_u64().unwrap(),
        "not side by side"
    );
    let reachable = find(
        &|p| p["type"] == "stat" && uses(p, "regguard_upstream_up"),
        "registry reachable",
    );
    assert_eq!(reachable["gridPos"]["y"], 0);
    for metric in [
        "regguard_background_task_up",
        "regguard_manifest_bytes_held",
    ] {
        find(&|p| uses(p, metric), metric);
    }

    // Every expression is valid PromQL: promtool checks them as recording rules.
    let promtool = require_tool("promtool", "prometheus");
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (_, expr)) in exprs.iter().enumerate() {
        let expr = expr.replace("$job", ".*").replace("$instance", ".*");
        rules.push_str(&format!(
            "      - record: dashboard:expr{i}\n        expr: {}\n",
            serde_json::to_string(&expr).unwrap()
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("dashboard.yml"), rules).unwrap();
    let check = Command::new(&promtool)
        .args(["check", "rules", "dashboard.yml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
}

//! Test harness: real registry, real regguard binary, real nginx, real clients.
//!
//! Every server binds port 0 in its own temp dir and reports the address it got
//! (nginx, which refuses port 0, retries on a bind failure); no port is picked
//! free and hoped for. Each is stopped by PID when its handle drops, and the
//! test fails if a process it started outlives it (see `process`). A missing
//! tool fails the test with the Debian package to install; nothing is skipped.
#![allow(dead_code)]

pub mod fake;
pub mod http;
pub mod oci;
pub mod process;

pub use process::Proc;

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Fails the test unless `bin` exists, naming the Debian package that provides it.
pub fn require_tool(bin: &str, package: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/sbin", "/usr/local/bin", "/bin", "/sbin"] {
        let p = Path::new(dir).join(bin);
        if p.exists() {
            return p;
        }
    }
    panic!("`{bin}` is not installed: install the Debian package `{package}` (apt-get install -y {package}); .ci/run does this");
}

/// Waits until something accepts TCP connections on `addr`.
pub fn wait_for_port(addr: SocketAddr, what: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!(
        "{what} did not start listening on {addr} within 30s; its log:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

/// Polls `f` until it returns `Some`, failing after `limit` with `what`.
pub fn poll_until<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn spawn(cmd: &mut Command, log: PathBuf) -> Proc {
    let out = std::fs::File::create(&log).unwrap();
    let err = out.try_clone().unwrap();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    Proc::adopt(child, log)
}

/// A loopback address where nothing listens and nothing can start listening while this
/// lives: the port is bound (never listened on), so connecting is refused.
pub struct ClosedPort {
    pub addr: SocketAddr,
    _socket: tokio::net::TcpSocket,
}

impl ClosedPort {
    pub fn reserve() -> Self {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = socket.local_addr().unwrap();
        ClosedPort {
            addr,
            _socket: socket,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// A Basic `Authorization` value.
pub fn basic_auth(user: &str, pass: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

/// Options of a test registry.
#[derive(Default, Clone)]
pub struct RegistryOptions {
    /// htpasswd (bcrypt) auth with this user and password.
    pub auth: Option<(String, String)>,
}

/// A real CNCF distribution registry (Debian's `docker-registry`, 2.8) with
/// filesystem storage in a temp dir, delete enabled, blob descriptor cache off.
pub struct Registry {
    pub addr: SocketAddr,
    pub storage: PathBuf,
    pub proc: Proc,
    /// The config without its `http` section (kept to restart on the same address).
    config_base: String,
    config_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Registry {
    pub fn start() -> Self {
        Self::start_with(RegistryOptions::default())
    }

    pub fn start_with(opts: RegistryOptions) -> Self {
        let bin = require_tool("docker-registry", "docker-registry");
        let dir = tempfile::tempdir().unwrap();
        let storage = dir.path().join("storage");
        std::fs::create_dir_all(&storage).unwrap();
        let auth = match &opts.auth {
            Some((user, pass)) => {
                let hash = bcrypt::hash(pass, 4).unwrap();
                let path = dir.path().join("htpasswd");
                std::fs::write(&path, format!("{user}:{hash}\n")).unwrap();
                format!(
                    "auth:\n  htpasswd:\n    realm: regguard-test\n    path: {}\n",
                    path.display()
                )
            }
            None => String::new(),
        };
        // No `cache:` under storage: the blob descriptor cache would hide removed layer links.
        let config_base = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n  maintenance:\n    uploadpurging:\n      enabled: false\n{auth}",
            storage.display()
        );
        let config_path = dir.path().join("config.yml");
        std::fs::write(
            &config_path,
            format!("{config_base}http:\n  addr: 127.0.0.1:0\n"),
        )
        .unwrap();
        let log = dir.path().join("registry.log");
        let mut proc = spawn(
            Command::new(bin).arg("serve").arg(&config_path),
            log.clone(),
        );
        // Port 0: the kernel's choice, read back from /proc.
        let addr = wait_listening(&mut proc, "docker-registry", |a| {
            a.ip().to_string() == "127.0.0.1"
        });
        Registry {
            addr,
            storage,
            proc,
            config_base,
            config_path,
            _dir: dir,
        }
    }

    /// Replaces the htpasswd entry (takes effect when the registry starts again).
    pub fn set_password(&self, user: &str, pass: &str) {
        let hash = bcrypt::hash(pass, 4).unwrap();
        std::fs::write(
            self._dir.path().join("htpasswd"),
            format!("{user}:{hash}\n"),
        )
        .unwrap();
    }

    /// Stops the registry (SIGTERM, then waits), as an operator does before an offline GC.
    pub fn stop(&mut self) {
        self.proc.stop();
    }

    /// The registry's own offline `garbage-collect --delete-untagged` on its storage.
    pub fn garbage_collect(&self) -> String {
        let bin = require_tool("docker-registry", "docker-registry");
        let out = Command::new(bin)
            .args(["garbage-collect", "--delete-untagged"])
            .arg(&self.config_path)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "garbage-collect failed: {text}");
        text
    }

    /// Starts the registry again on the same address and storage, optionally sending its
    /// notifications (`notifications.endpoints`) to `notify_url`.
    pub fn start_again(&mut self, notify_url: Option<&str>) {
        let notifications = notify_url
            .map(|url| {
                format!(
                    "notifications:\n  endpoints:\n    - name: regguard\n      url: {url}\n      timeout: 2s\n      threshold: 3\n      backoff: 1s\n"
                )
            })
            .unwrap_or_default();
        std::fs::write(
            &self.config_path,
            format!(
                "{}{notifications}http:\n  addr: {}\n",
                self.config_base, self.addr
            ),
        )
        .unwrap();
        let bin = require_tool("docker-registry", "docker-registry");
        let log = self.proc.log.with_extension("again.log");
        self.proc = spawn(Command::new(bin).arg("serve").arg(&self.config_path), log);
        let addr = self.addr;
        wait_listening(&mut self.proc, "docker-registry", |a| *a == addr);
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn repo_dir(&self, repo: &str) -> PathBuf {
        self.storage
            .join("docker/registry/v2/repositories")
            .join(repo)
    }

    /// The failure mode of REFERENCE §2: the manifest's revision link is gone.
    pub fn remove_revision_link(&self, repo: &str, digest: &str) {
        let hex = digest.strip_prefix("sha256:").unwrap();
        let link = self
            .repo_dir(repo)
            .join("_manifests/revisions/sha256")
            .join(hex)
            .join("link");
        std::fs::remove_file(&link).unwrap_or_else(|e| panic!("remove {}: {e}", link.display()));
    }

    /// The second fault: a layer link gone from the repository.
    pub fn remove_layer_link(&self, repo: &str, digest: &str) {
        let hex = digest.strip_prefix("sha256:").unwrap();
        let link = self
            .repo_dir(repo)
            .join("_layers/sha256")
            .join(hex)
            .join("link");
        std::fs::remove_file(&link).unwrap_or_else(|e| panic!("remove {}: {e}", link.display()));
    }

    /// Whether the blob's data exists anywhere in storage (linked or not).
    pub fn blob_data_exists(&self, digest: &str) -> bool {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.storage
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
            .exists()
    }

    pub fn log_text(&self) -> String {
        self.proc.log_text()
    }

    /// Whether the registry holds `repo`'s manifest `reference` (tag or digest), asked with
    /// a HEAD that accepts every manifest type (registry 2.8 answers 404 for an OCI manifest
    /// unless asked for OCI types). Panics on any answer but 200 or 404.
    pub fn has_manifest(&self, repo: &str, reference: &str) -> bool {
        self.head(&format!("/v2/{repo}/manifests/{reference}"))
    }

    /// Whether the registry serves blob `digest` in `repo`, by HEAD. Panics on any answer
    /// but 200 or 404.
    pub fn has_blob(&self, repo: &str, digest: &str) -> bool {
        self.head(&format!("/v2/{repo}/blobs/{digest}"))
    }

    fn head(&self, path: &str) -> bool {
        let r = http::send(
            "HEAD",
            &format!("{}{path}", self.url()),
            &[("accept", oci::ACCEPT_ALL)],
            bytes::Bytes::new(),
        );
        match r.status {
            200 => true,
            404 => false,
            s => panic!("HEAD {path} on the registry answered {s}: cannot tell"),
        }
    }
}

/// Waits until `proc` listens on a TCP address `pick` accepts (from /proc) and returns it;
/// fails with its log if it exits first or takes over 30 s.
fn wait_listening(proc: &mut Proc, what: &str, pick: impl Fn(&SocketAddr) -> bool) -> SocketAddr {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(a) = proc.listening().into_iter().find(|a| pick(a)) {
            return a;
        }
        if let Some(status) = proc.try_exit() {
            panic!(
                "{what} exited ({status}) before listening; its log:\n{}",
                proc.log_text()
            );
        }
        if Instant::now() > deadline {
            panic!(
                "{what} did not listen within 30s; its log:\n{}",
                proc.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The public and admin addresses from regguard's start-up line (`regguard serving`, with
/// `listen` and `admin` fields), in the JSON or the text log format.
pub fn regguard_bound(log: &str) -> Option<(SocketAddr, SocketAddr)> {
    let line = log.lines().find(|l| l.contains("regguard serving"))?;
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
        let field = |k: &str| v[k].as_str()?.parse().ok();
        return Some((field("listen")?, field("admin")?));
    }
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))?
            .parse()
            .ok()
    };
    Some((field("listen")?, field("admin")?))
}

/// The regguard binary under test, started as an operator would start it.
pub struct Regguard {
    pub public: SocketAddr,
    pub admin: SocketAddr,
    pub proc: Proc,
    dir: tempfile::TempDir,
}

/// How to start regguard in a test.
#[derive(Default, Clone)]
pub struct RegguardOptions {
    /// PEM cert and key for TLS.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Extra `serve` flags.
    pub args: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
}

impl Regguard {
    pub fn start(upstream: &str) -> Self {
        Self::start_with(upstream, RegguardOptions::default())
    }

    pub fn start_with(upstream: &str, opts: RegguardOptions) -> Self {
        Self::start_bin(env!("CARGO_BIN_EXE_regguard").as_ref(), upstream, opts)
    }

    /// Starts another build of regguard (a benchmark's baseline binary).
    pub fn start_bin(bin: &Path, upstream: &str, opts: RegguardOptions) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("regguard.log");
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            // Port 0 for both: the OS picks, regguard reports what it bound.
            .args(["--listen", "127.0.0.1:0"])
            .args(["--admin-listen", "127.0.0.1:0"])
            .args(["--upstream", upstream])
            .args(["--log-format", "json"])
            .args(&opts.args)
            .env_remove("REGGUARD_CONFIG")
            .env("REGGUARD_LOG", "info");
        if let Some((cert, key)) = &opts.tls {
            cmd.arg("--tls-cert").arg(cert).arg("--tls-key").arg(key);
        }
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        let mut proc = spawn(&mut cmd, log.clone());
        // It logs the addresses once both listeners are bound.
        let deadline = Instant::now() + Duration::from_secs(30);
        let (public, admin) = loop {
            if let Some(bound) = regguard_bound(&proc.log_text()) {
                break bound;
            }
            if let Some(status) = proc.try_exit() {
                panic!(
                    "regguard exited ({status}) before serving; its log:\n{}",
                    proc.log_text()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "regguard logged no `regguard serving` line (INFO, with the bound addresses) within 30s; its log:\n{}",
                    proc.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Regguard {
            public,
            admin,
            proc,
            dir,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.public)
    }

    /// `host:port` of the public listener, as clients name it.
    pub fn host(&self) -> String {
        self.public.to_string()
    }

    pub fn metrics(&self) -> String {
        http::get_text(&format!("http://{}/metrics", self.admin))
    }

    /// The value of one exact series line (`name{labels}`). Panics, naming the series and the
    /// metric families present, when it is not exported: a misspelled series never reads 0.
    pub fn metric(&self, series: &str) -> f64 {
        metric_in(&self.metrics(), series)
    }

    /// The value of one exact series, or `None` when it is not exported.
    pub fn metric_opt(&self, series: &str) -> Option<f64> {
        metric_value(&self.metrics(), series)
    }

    pub fn log_text(&self) -> String {
        self.proc.log_text()
    }
}

/// The value of one exact series (`name{labels}`) in a Prometheus text exposition, or `None`
/// when no such series is exported.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| {
            value
                .parse()
                .unwrap_or_else(|e| panic!("series {series}: value `{value}` ({e})"))
        })
    })
}

/// The value of one exact series in a Prometheus text exposition. Panics when it is not
/// exported, naming the series, the other series of its family and the families present.
pub fn metric_in(text: &str, series: &str) -> f64 {
    metric_value(text, series).unwrap_or_else(|| {
        let family = series.split('{').next().unwrap_or(series);
        let siblings: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#') && l.starts_with(family))
            .collect();
        let families: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        panic!(
            "metric series `{series}` is not exported\n  series starting `{family}`: {}\n  families present: {}",
            siblings.join("; "),
            families.join(", ")
        )
    })
}

/// nginx configured from a file in `nginx-compat/`, with `@PLACEHOLDERS@` filled in.
pub struct Nginx {
    pub addr: SocketAddr,
    pub proc: Proc,
    _dir: tempfile::TempDir,
}

impl Nginx {
    /// Starts nginx with `nginx-compat/<template>` over plain HTTP.
    pub fn start(template: &str, upstream: SocketAddr) -> Self {
        Self::start_with(template, upstream, None)
    }

    /// Starts nginx with `nginx-compat/<template>`, with TLS from `tls` (cert, key) when given.
    pub fn start_with(template: &str, upstream: SocketAddr, tls: Option<(&Path, &Path)>) -> Self {
        let vars: Vec<(&str, String)> = match tls {
            Some((cert, key)) => vec![
                ("SSL", "ssl".into()),
                (
                    "TLS_LINES",
                    format!(
                        "ssl_certificate {};\n        ssl_certificate_key {};\n        ssl_protocols TLSv1.2 TLSv1.3;",
                        cert.display(),
                        key.display()
                    ),
                ),
            ],
            None => vec![("SSL", String::new()), ("TLS_LINES", String::new())],
        };
        let bin = require_tool("nginx", "nginx-light");
        let dir = tempfile::tempdir().unwrap();
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("nginx-compat")
                .join(template),
        )
        .unwrap();
        // nginx refuses `listen 127.0.0.1:0` ("invalid port"), so it cannot be given port 0:
        // pick a port the kernel just handed out and, if someone takes it before nginx binds
        // it, start again on another. Listening is confirmed on nginx's own sockets (/proc),
        // never by connecting, which would also succeed against whoever took the port.
        for attempt in 1..=5 {
            let addr = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .unwrap();
            let mut conf = text
                .replace("@LISTEN@", &addr.to_string())
                .replace("@UPSTREAM@", &upstream.to_string())
                .replace("@PREFIX@", &dir.path().display().to_string());
            for (k, v) in &vars {
                conf = conf.replace(&format!("@{k}@"), v);
            }
            let unfilled =
                conf.split('@').skip(1).step_by(2).find(|w| {
                    !w.is_empty() && w.chars().all(|c| c.is_ascii_uppercase() || c == '_')
                });
            assert!(
                unfilled.is_none(),
                "unfilled placeholder @{unfilled:?}@ in {template}"
            );
            let conf_path = dir.path().join("nginx.conf");
            std::fs::File::create(&conf_path)
                .unwrap()
                .write_all(conf.as_bytes())
                .unwrap();
            let log = dir.path().join("nginx.log");
            let mut proc = spawn(
                Command::new(&bin)
                    .arg("-p")
                    .arg(dir.path())
                    .arg("-c")
                    .arg(&conf_path)
                    .args(["-g", "daemon off;"]),
                log.clone(),
            );
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if proc.listening().contains(&addr) {
                    return Nginx {
                        addr,
                        proc,
                        _dir: dir,
                    };
                }
                if let Some(status) = proc.try_exit() {
                    let log = proc.log_text();
                    if log.contains("Address already in use") && attempt < 5 {
                        break;
                    }
                    panic!("nginx exited ({status}) on attempt {attempt}; its log:\n{log}");
                }
                if Instant::now() > deadline {
                    panic!(
                        "nginx did not listen on {addr} within 30s; its log:\n{}",
                        proc.log_text()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// Stops nginx: SIGTERM to the master (fast shutdown: it tells its workers to exit and
    /// waits for them; a graceful SIGQUIT could wait on a test client's open connection past
    /// the grace, and a master killed then leaves its workers behind); SIGKILL after 10 s.
    /// Fails the test if any worker outlives it.
    pub fn stop(&mut self) {
        self.proc.stop_with("TERM", Duration::from_secs(10));
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A self-signed certificate for `127.0.0.1` and `localhost`, written as PEM files.
pub struct TestCert {
    pub cert_pem: PathBuf,
    pub key_pem: PathBuf,
    pub cert_der: Vec<u8>,
    _dir: tempfile::TempDir,
}

impl TestCert {
    pub fn generate() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cert = rcgen::generate_simple_self_signed(vec![
            "127.0.0.1".to_string(),
            "localhost".to_string(),
        ])
        .unwrap();
        let cert_pem = dir.path().join("fullchain.pem");
        let key_pem = dir.path().join("privkey.pem");
        std::fs::write(&cert_pem, cert.cert.pem()).unwrap();
        std::fs::write(&key_pem, cert.signing_key.serialize_pem()).unwrap();
        TestCert {
            cert_pem,
            key_pem,
            cert_der: cert.cert.der().to_vec(),
            _dir: dir,
        }
    }
}

/// Runs skopeo with the given arguments, failing the test with its output on error.
pub fn skopeo(args: &[&str]) -> String {
    let bin = require_tool("skopeo", "skopeo");
    let out = Command::new(bin)
        .args(args)
        .env("HOME", std::env::temp_dir())
        .output()
        .expect("run skopeo");
    assert!(
        out.status.success(),
        "skopeo {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Pushes `img` to `dest` (a `docker://` reference) with `skopeo copy --all --preserve-digests`,
/// pulls it back into a fresh OCI layout, and asserts every blob and manifest came back with
/// the same digest and size. `push`/`pull` add transport flags (TLS, credentials).
/// Returns the dir holding the pulled layout (at `dst`).
pub fn skopeo_round_trip(
    img: &oci::MultiArch,
    dest: &str,
    push: &[&str],
    pull: &[&str],
) -> tempfile::TempDir {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let dst = work.path().join("dst");
    oci::write_layout(img, &src, "v1");
    let copy = ["copy", "--all", "--preserve-digests"];
    let (src_ref, dst_ref) = (
        format!("oci:{}:v1", src.display()),
        format!("oci:{}:v1", dst.display()),
    );
    let args: Vec<&str> = copy
        .iter()
        .copied()
        .chain(push.iter().copied())
        .chain([src_ref.as_str(), dest])
        .collect();
    skopeo(&args);
    let args: Vec<&str> = copy
        .iter()
        .copied()
        .chain(pull.iter().copied())
        .chain([dest, dst_ref.as_str()])
        .collect();
    skopeo(&args);
    assert_eq!(
        oci::layout_blobs(&src),
        oci::layout_blobs(&dst),
        "skopeo round trip through {dest}"
    );
    work
}

/// Runs the `regguard` CLI with `args`, isolated from the caller's credentials (no
/// `REGGUARD_USER`/`_PASSWORD`/`_REGISTRY`, no docker config) plus `env`; returns the
/// exit code, stdout and stderr. Every CLI message says "registry", never "upstream".
pub fn run_cli(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_regguard"));
    cmd.args(args)
        .env_remove("REGGUARD_USER")
        .env_remove("REGGUARD_PASSWORD")
        .env_remove("REGGUARD_REGISTRY")
        .env_remove("DOCKER_CONFIG")
        .env("HOME", "/nonexistent");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        !stdout.contains("upstream") && !stderr.contains("upstream"),
        "the CLI says `registry`, never `upstream`:\n{stdout}{stderr}"
    );
    (out.status.code(), stdout, stderr)
}

/// A real S3-protocol server (moto's `moto_server`, from PyPI) on a port the OS picks,
/// with one bucket. Requests without a signature are accepted, so tests can read and
/// damage objects behind regguard's back.
pub struct S3Server {
    pub url: String,
    pub bucket: String,
    pub proc: Proc,
    _dir: tempfile::TempDir,
}

impl S3Server {
    pub fn start(bucket: &str) -> Self {
        let bin = std::env::var("PATH")
            .unwrap_or_default()
            .split(':')
            .map(|d| Path::new(d).join("moto_server"))
            .find(|p| p.exists())
            .unwrap_or_else(|| {
                panic!("`moto_server` is not installed: install moto's server from PyPI (pip install 'moto[server]'); .ci/run does this")
            });
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("moto.log");
        let mut proc = spawn(Command::new(bin).args(["-H", "127.0.0.1", "-p", "0"]), log);
        let url = poll_until(Duration::from_secs(30), "moto_server to listen", || {
            if let Some(status) = proc.try_exit() {
                panic!("moto_server exited ({status}):\n{}", proc.log_text());
            }
            proc.log_text()
                .lines()
                .find_map(|l| l.split("Running on ").nth(1))
                .map(|u| u.trim().to_string())
        });
        let r = http::send("PUT", &format!("{url}/{bucket}"), &[], bytes::Bytes::new());
        assert_eq!(r.status, 200, "create bucket: {}", r.text());
        S3Server {
            url,
            bucket: bucket.to_string(),
            proc,
            _dir: dir,
        }
    }

    /// The environment regguard needs to use `s3://<bucket>/<prefix>` here.
    pub fn env(&self, prefix: &str) -> Vec<(String, String)> {
        [
            (
                "REGGUARD_VAULT_URL",
                format!("s3://{}/{prefix}", self.bucket),
            ),
            ("AWS_ENDPOINT", self.url.clone()),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", "test".into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    pub fn object_url(&self, key: &str) -> String {
        format!("{}/{}/{key}", self.url, self.bucket)
    }
}

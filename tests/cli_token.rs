//! `regguard check` and `regguard scan` against the real registry with token auth
//! (`auth: token:`), its tokens issued by a small in-process token server whose signing
//! certificate the registry trusts, and docker credential helpers found on PATH.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper_util::rt::TokioIo;

use common::{oci, require_tool, Proc};

const SERVICE: &str = "regguard-test";
const ISSUER: &str = "regguard-test-issuer";
const USER: (&str, &str) = ("alice", "s3cret");

fn b64url(data: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

/// Signs registry tokens (ES256, the certificate in `x5c`) the way distribution 2.8 verifies them.
struct Signer {
    key: ring::signature::EcdsaKeyPair,
    cert_der: Vec<u8>,
    cert_pem: String,
}

impl Signer {
    fn new() -> Self {
        let key = rcgen::KeyPair::generate().unwrap(); // P-256 by default
        let params = rcgen::CertificateParams::new(vec!["token-signer".to_string()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let key = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &key.serialize_der(),
            &ring::rand::SystemRandom::new(),
        )
        .unwrap();
        Signer {
            key,
            cert_der: cert.der().to_vec(),
            cert_pem: cert.pem(),
        }
    }

    /// A token for `sub` with `access` ([(type, name, actions)]).
    fn token(&self, sub: &str, access: &[(String, String, Vec<String>)]) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let header = serde_json::json!({
            "typ": "JWT", "alg": "ES256",
            "x5c": [base64::engine::general_purpose::STANDARD.encode(&self.cert_der)]
        });
        let access: Vec<_> = access
            .iter()
            .map(|(t, n, a)| serde_json::json!({"type": t, "name": n, "actions": a}))
            .collect();
        let claims = serde_json::json!({
            "iss": ISSUER, "sub": sub, "aud": SERVICE,
            "exp": now + 300, "nbf": now - 10, "iat": now,
            "jti": format!("{now}-{}", rand_suffix()), "access": access
        });
        let signing_input = format!(
            "{}.{}",
            b64url(header.to_string().as_bytes()),
            b64url(claims.to_string().as_bytes())
        );
        let sig = self
            .key
            .sign(&ring::rand::SystemRandom::new(), signing_input.as_bytes())
            .unwrap();
        format!("{signing_input}.{}", b64url(sig.as_ref()))
    }

    /// `Authorization` for a test push into `repo`.
    fn push_auth(&self, repo: &str) -> String {
        format!(
            "Bearer {}",
            self.token(
                "test",
                &[(
                    "repository".into(),
                    repo.into(),
                    vec!["pull".into(), "push".into()]
                )]
            )
        )
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// What the token server was asked: (account from Basic auth or "-", scope).
type Asked = Arc<Mutex<Vec<(String, String)>>>;

/// The token server: `alice:s3cret` gets what she asks for; anonymous callers get pull on
/// `public/*` only (and a token with no access for anything else, as docker's servers do);
/// a wrong password is 401.
struct TokenServer {
    addr: SocketAddr,
    asked: Asked,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TokenServer {
    fn start(signer: Arc<Signer>) -> Self {
        let listener = common::http::rt()
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let asked: Asked = Arc::default();
        let seen = asked.clone();
        let task = common::http::rt().spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    return;
                };
                let (signer, seen) = (signer.clone(), seen.clone());
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let answer = issue(&signer, &seen, &req);
                            async move { Ok::<_, Infallible>(answer) }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        TokenServer { addr, asked, task }
    }

    fn realm(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    fn asked(&self) -> Vec<(String, String)> {
        self.asked.lock().unwrap().clone()
    }
}

fn issue<B>(signer: &Signer, seen: &Asked, req: &Request<B>) -> Response<Full<Bytes>> {
    let query: HashMap<String, String> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), percent_decode(v)))
        .collect();
    let account = match req.headers().get("authorization") {
        None => None,
        Some(v) => {
            let decoded = v
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Basic "))
                .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            if decoded != format!("{}:{}", USER.0, USER.1) {
                return Response::builder()
                    .status(401)
                    .body(Full::new(Bytes::from_static(
                        b"{\"details\":\"incorrect username or password\"}",
                    )))
                    .unwrap();
            }
            Some(USER.0.to_string())
        }
    };
    let scope = query.get("scope").cloned().unwrap_or_default();
    seen.lock()
        .unwrap()
        .push((account.clone().unwrap_or_else(|| "-".into()), scope.clone()));
    let mut access = Vec::new();
    if let Some((kind, rest)) = scope.split_once(':') {
        if let Some((name, actions)) = rest.rsplit_once(':') {
            let granted =
                account.is_some() || (kind == "repository" && name.starts_with("public/"));
            if granted {
                access.push((
                    kind.to_string(),
                    name.to_string(),
                    actions.split(',').map(str::to_string).collect(),
                ));
            }
        }
    }
    let token = signer.token(account.as_deref().unwrap_or(""), &access);
    let body = serde_json::json!({"token": token, "access_token": token, "expires_in": 300});
    Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The real registry with `auth: token:` trusting the signer's certificate.
struct TokenRegistry {
    addr: SocketAddr,
    storage: PathBuf,
    _proc: Proc,
    _dir: tempfile::TempDir,
}

impl TokenRegistry {
    fn start(signer: &Signer, realm: &str) -> Self {
        let bin = require_tool("docker-registry", "docker-registry");
        let dir = tempfile::tempdir().unwrap();
        let storage = dir.path().join("storage");
        std::fs::create_dir_all(&storage).unwrap();
        let bundle = dir.path().join("token-signer.pem");
        std::fs::write(&bundle, &signer.cert_pem).unwrap();
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nauth:\n  token:\n    realm: {realm}\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {}\nhttp:\n  addr: 127.0.0.1:0\n",
                storage.display(),
                bundle.display()
            ),
        )
        .unwrap();
        let log = dir.path().join("registry.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(bin)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let mut proc = Proc::adopt(child, log);
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr = loop {
            if let Some(a) = proc.listening().into_iter().next() {
                break a;
            }
            if let Some(status) = proc.try_exit() {
                panic!("registry exited ({status}): {}", proc.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "registry did not listen: {}",
                proc.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        TokenRegistry {
            addr,
            storage,
            _proc: proc,
            _dir: dir,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn remove_revision_link(&self, repo: &str, digest: &str) {
        let link = self
            .storage
            .join("docker/registry/v2/repositories")
            .join(repo)
            .join("_manifests/revisions/sha256")
            .join(digest.strip_prefix("sha256:").unwrap())
            .join("link");
        std::fs::remove_file(&link).unwrap();
    }
}

/// A token registry holding `public/app:v1` and `private/app:v1` (healthy) and
/// `private/broken:v1` (its amd64 child's revision link gone).
struct Fixture {
    signer: Arc<Signer>,
    tokens: TokenServer,
    reg: TokenRegistry,
    img: oci::MultiArch,
}

fn fixture() -> Fixture {
    let signer = Arc::new(Signer::new());
    let tokens = TokenServer::start(signer.clone());
    let reg = TokenRegistry::start(&signer, &tokens.realm());
    let img = oci::multi_arch("token");
    for repo in ["public/app", "private/app", "private/broken"] {
        let auth = signer.push_auth(repo);
        oci::push_multi_arch(&reg.url(), repo, "v1", &img, &[("authorization", &auth)]);
    }
    reg.remove_revision_link("private/broken", &img.image("amd64").manifest.digest);
    Fixture {
        signer,
        tokens,
        reg,
        img,
    }
}

fn regguard(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    common::run_cli(args, env)
}

#[test]
fn check_and_scan_do_the_token_flow_with_credentials_or_anonymously() {
    let f = fixture();
    let host = f.reg.addr.to_string();
    let login = format!("{}:{}", USER.0, USER.1);

    // Anonymous: the token server grants pull on public/*.
    let (code, out, err) = regguard(
        &["check", "--insecure", &format!("{host}/public/app:v1")],
        &[],
    );
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("=> healthy"), "{out}");
    assert!(
        f.tokens
            .asked()
            .contains(&("-".into(), "repository:public/app:pull".into())),
        "{:?}",
        f.tokens.asked()
    );

    // Anonymous on a private repository: the registry refuses the empty token.
    let (code, _, err) = regguard(
        &["check", "--insecure", &format!("{host}/private/app:v1")],
        &[],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("401 Unauthorized from GET /v2/private/app/manifests/v1")
            && err.contains("no credentials")
            && err.contains("--user"),
        "{err}"
    );

    // With credentials: a token for the repository, then the whole tree.
    let image = format!("{host}/private/app:v1");
    let (code, out, err) = regguard(&["check", "--insecure", "--user", &login, &image], &[]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("attestation for linux/amd64"), "{out}");

    // A wrong password: the token server refuses it, and the message says what was sent.
    let (code, _, err) = regguard(
        &["check", "--insecure", "--user", "alice:wrong", &image],
        &[],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("401 Unauthorized from the token server")
            && err.contains("user `alice` (from --user)")
            && err.contains("refused"),
        "{err}"
    );

    // scan with credentials: catalog scope, then each repository's pull scope.
    let url = f.reg.url();
    let (code, out, err) = regguard(
        &[
            "scan",
            "--registry",
            &url,
            "--insecure",
            "--user",
            &login,
            "--format",
            "json",
        ],
        &[],
    );
    assert_eq!(code, Some(1), "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["report"]["repositories"], 3);
    assert_eq!(v["report"]["errors"], 0, "{out}");
    assert_eq!(v["broken"].as_array().unwrap().len(), 1, "{out}");
    assert_eq!(v["broken"][0]["repository"], "private/broken");
    assert_eq!(
        v["broken"][0]["child_digest"],
        f.img.image("amd64").manifest.digest.as_str()
    );
    let asked = f.tokens.asked();
    for scope in [
        "registry:catalog:*",
        "repository:private/broken:pull",
        "repository:public/app:pull",
    ] {
        assert!(
            asked.contains(&("alice".into(), scope.into())),
            "{scope}: {asked:?}"
        );
    }

    // scan anonymously: /v2/ is reachable, the catalog is not.
    let (code, _, err) = regguard(&["scan", "--registry", &url, "--insecure"], &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("401 Unauthorized from GET /v2/_catalog") && err.contains("--user"),
        "{err}"
    );
    drop(f.signer);
}

/// A `docker-credential-<name>` script answering for `host` only, logging what it was asked.
fn helper(dir: &Path, name: &str, host: &str, answer: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    let path = dir.join(format!("docker-credential-{name}"));
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\n[ \"$1\" = get ] || exit 3\nread -r asked\necho \"$asked\" >> \"{}/asked-{name}\"\nif [ \"$asked\" = \"{host}\" ]; then\n{answer}\nelse\n  echo 'credentials not found in native keychain'; exit 1\nfi\n",
            dir.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn docker_credential_helpers_and_creds_store_supply_the_login() {
    let f = fixture();
    let host = f.reg.addr.to_string();
    let image = format!("{host}/private/app:v1");
    let dir = tempfile::tempdir().unwrap();
    let good = format!(
        "  echo '{{\"ServerURL\":\"{host}\",\"Username\":\"{}\",\"Secret\":\"{}\"}}'",
        USER.0, USER.1
    );
    helper(dir.path(), "rgtest", &host, &good);
    helper(
        dir.path(),
        "rgbroken",
        &host,
        "  echo 'keychain locked' >&2; exit 1",
    );
    let path = format!(
        "{}:{}",
        dir.path().display(),
        std::env::var("PATH").unwrap()
    );
    let config_dir = tempfile::tempdir().unwrap();
    let config = |json: String| {
        std::fs::write(config_dir.path().join("config.json"), json).unwrap();
    };
    let env = [
        ("PATH", path.as_str()),
        ("DOCKER_CONFIG", config_dir.path().to_str().unwrap()),
    ];

    // credHelpers for this host.
    config(format!(r#"{{"credHelpers":{{"{host}":"rgtest"}}}}"#));
    let (code, out, err) = regguard(&["check", "--insecure", &image], &env);
    assert_eq!(code, Some(0), "{out}{err}");
    let asked = std::fs::read_to_string(dir.path().join("asked-rgtest")).unwrap();
    assert_eq!(
        asked.trim(),
        host,
        "the helper is asked for the registry's host"
    );

    // credsStore, the default store for every host.
    config(r#"{"credsStore":"rgtest"}"#.to_string());
    let (code, out, err) = regguard(&["check", "--insecure", &image], &env);
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, out, err) = regguard(&["scan", "--registry", &f.reg.url(), "--insecure"], &env);
    assert_eq!(
        code,
        Some(1),
        "scan with the store's login finds the broken child: {out}{err}"
    );

    // A store with nothing for this host name: `auths` still answers, its key written as
    // `docker login` writes it (with scheme and slash).
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", USER.0, USER.1));
    let local = format!("localhost:{}", f.reg.addr.port());
    config(format!(
        r#"{{"credsStore":"rgtest","auths":{{"http://{local}/":{{"auth":"{auth}"}}}}}}"#
    ));
    let other = image.replace(&host, &local);
    let (code, out, err) = regguard(&["check", "--insecure", &other], &env);
    assert_eq!(code, Some(0), "login from auths: {out}{err}");
    assert!(
        std::fs::read_to_string(dir.path().join("asked-rgtest"))
            .unwrap()
            .contains(&local),
        "the store was asked first"
    );
    config(format!(
        r#"{{"credsStore":"rgbroken","auths":{{"{host}":{{"auth":"{auth}"}}}}}}"#
    ));
    // A helper that fails: its credentials are unusable, and the message names it.
    let (code, _, err) = regguard(&["check", "--insecure", &image], &env);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("docker-credential-rgbroken") && err.contains("keychain locked"),
        "{err}"
    );
    // Not installed at all.
    config(r#"{"credsStore":"rgmissing"}"#.to_string());
    let (code, _, err) = regguard(&["check", "--insecure", &image], &env);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("docker-credential-rgmissing") && err.contains("PATH"),
        "{err}"
    );
    // `auths` with an `auth` that is not base64 of USER:PASSWORD.
    config(format!(
        r#"{{"auths":{{"{host}":{{"auth":"not base64!"}}}}}}"#
    ));
    let (code, _, err) = regguard(&["check", "--insecure", &image], &env);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("not base64") && err.contains("docker login"),
        "{err}"
    );
    drop((f.signer, f.tokens));
}

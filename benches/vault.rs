//! The content vault's cost, against the real registry, in one run: regguard with the vault
//! off vs on (manifests and configs) vs on with `vault.layers = true`, interleaved.
//!
//! `cargo bench --bench vault` (about three minutes on 2 cores). Prints a Markdown table
//! with ratios to the vault off, and the machine it ran on. Measures:
//! 1. blob GET throughput of a large layer (`BENCH_BLOB_MIB`, default 1024): a client's
//!    first pull of the image (manifest by tag, then the layer) through a fresh regguard
//!    with a fresh vault, so the vault really keeps what the pull shows it; regguard's CPU
//!    seconds per GiB pulled, counted until the vault has written everything the pull gave
//!    it (with layers: the filler's own fetch of the layer from the registry); then a
//!    second, warm pull of the same layer;
//! 2. push: a harness push of the multi-arch test image (10 blobs, 4 children, the index;
//!    every manifest PUT goes through the gate) and a `skopeo copy --all` push, time per
//!    push and regguard CPU per push (the vault's background writes included);
//! 3. manifest GET by tag at 32 connections: requests/s, p50, p99, regguard CPU per request
//!    (twice BENCH_ROUNDS load runs per mode: the registry-bound rate is the noisiest figure);
//! 4. serve-from-vault latency: an image pushed through regguard, its amd64 child's revision
//!    link removed from the registry's storage, then GETs of that child by digest through
//!    regguard (the registry answers 404, regguard answers from the vault) against GETs of a
//!    child the registry still has.
//!
//! Settings: BENCH_ROUNDS (default 5), BENCH_SECONDS per load run (default 3),
//! BENCH_BLOB_MIB (default 1024), BENCH_LATENCY_GETS per row of (4) (default 500);
//! BENCH_ONLY=blob|push|manifest|serve runs one part.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use support::{cpu_seconds, env_num, get_req, median};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::http::{self, send};
use common::oci::{self, ACCEPT_ALL, OCI_CONFIG, OCI_LAYER, OCI_MANIFEST};
use common::{skopeo, Regguard, RegguardOptions, Registry};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::json;

const MIB: u64 = 1024 * 1024;
const GIB: u64 = 1024 * MIB;
const MANIFEST_CONNECTIONS: usize = 32;
/// The header regguard sets on a response from its vault.
const SERVED_FROM: &str = "x-regguard-served-from";
const MANIFEST_WRITES: &str = r#"regguard_vault_writes_total{kind="manifest"}"#;
const BLOB_WRITES: &str = r#"regguard_vault_writes_total{kind="blob"}"#;
const SERVED_MANIFESTS: &str = r#"regguard_heal_served_total{kind="manifest"}"#;

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpu
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = mem
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|k| k.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
        / 1024.0;
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cores} vCPU ({model}), {mem_gib:.0} GiB, Linux {}, docker-registry 2.8.2, loopback; vault and registry storage on the same local disk",
        kernel.trim()
    )
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn connect(addr: SocketAddr) -> Sender {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

/// GETs a blob on a new connection, discarding it; returns (bytes, seconds).
async fn fetch(addr: SocketAddr, path: &str) -> (u64, f64) {
    let mut send = connect(addr).await;
    let start = Instant::now();
    let resp = send.send_request(get_req(addr, path, false)).await.unwrap();
    assert_eq!(resp.status(), 200, "GET {path} via {addr}");
    let mut body = resp.into_body();
    let mut n = 0u64;
    while let Some(f) = body.frame().await {
        if let Ok(d) = f.unwrap().into_data() {
            n += d.len() as u64;
        }
    }
    (n, start.elapsed().as_secs_f64())
}

struct Load {
    /// Every request sent, warm-up included.
    sent: usize,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// `MANIFEST_CONNECTIONS` keep-alive connections GETting `path` for `secs` (after 0.5 s of
/// warm-up, not counted).
async fn load(addr: SocketAddr, path: &str, secs: f64) -> Load {
    let mut tasks = Vec::new();
    let stop = Instant::now() + Duration::from_secs_f64(secs + 0.5);
    let warm = Instant::now() + Duration::from_millis(500);
    for _ in 0..MANIFEST_CONNECTIONS {
        let path = path.to_string();
        tasks.push(tokio::spawn(async move {
            let mut send = connect(addr).await;
            let mut lat = Vec::new();
            let mut sent = 0usize;
            loop {
                let t = Instant::now();
                if t >= stop {
                    break;
                }
                if send.ready().await.is_err() {
                    send = connect(addr).await;
                }
                let resp = match send.send_request(get_req(addr, &path, true)).await {
                    Ok(r) => r,
                    Err(_) => {
                        send = connect(addr).await;
                        continue;
                    }
                };
                assert_eq!(resp.status(), 200);
                resp.into_body().collect().await.unwrap();
                sent += 1;
                if t >= warm {
                    lat.push(t.elapsed().as_micros() as u32);
                }
            }
            (sent, lat)
        }));
    }
    let mut all = Vec::new();
    let mut sent = 0;
    for t in tasks {
        let (n, lat) = t.await.unwrap();
        sent += n;
        all.extend(lat);
    }
    all.sort_unstable();
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)] as f64 / 1000.0;
    Load {
        sent,
        rps: all.len() as f64 / secs,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
    }
}

fn pct(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

/// Median of `a` ÷ median of `b`, formatted.
fn ratio(a: &[f64], b: &[f64]) -> String {
    format!("{:.3}", median(a.to_vec()) / median(b.to_vec()))
}

/// The three ways regguard runs here.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Off,
    On,
    Layers,
}

const MODES: [Mode; 3] = [Mode::Off, Mode::On, Mode::Layers];

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Off => "vault off",
            Mode::On => "vault on (manifests + configs)",
            Mode::Layers => "vault on, layers = true",
        }
    }
}

/// regguard in one mode, with its vault directory (removed when this drops).
struct Instance {
    mode: Mode,
    rg: Regguard,
    vault: Option<tempfile::TempDir>,
}

impl Instance {
    fn start(reg: &Registry, mode: Mode, quiet: &RegguardOptions) -> Self {
        let mut opts = quiet.clone();
        let vault = (mode != Mode::Off).then(|| tempfile::tempdir().unwrap());
        let url = vault
            .as_ref()
            .map_or("none".to_string(), |d| d.path().display().to_string());
        opts.env.push(("REGGUARD_VAULT_URL".into(), url));
        opts.env.push((
            "REGGUARD_VAULT_LAYERS".into(),
            (mode == Mode::Layers).to_string(),
        ));
        Instance {
            mode,
            rg: Regguard::start_with(&reg.url(), opts),
            vault,
        }
    }

    fn pid(&self) -> u32 {
        self.rg.proc.pid()
    }

    /// Where the vault keeps `digest`'s bytes (they appear there only once verified).
    fn content_path(&self, digest: &str) -> Option<PathBuf> {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.vault
            .as_ref()
            .map(|d| d.path().join("blobs/sha256").join(&hex[..2]).join(hex))
    }

    /// The vault's write counters (manifests, blobs); zeros with the vault off.
    fn writes(&self) -> (f64, f64) {
        if self.mode == Mode::Off {
            return (0.0, 0.0);
        }
        let m = self.rg.metrics();
        (
            common::metric_in(&m, MANIFEST_WRITES),
            common::metric_in(&m, BLOB_WRITES),
        )
    }

    /// Waits (polling every 100 ms, so the polling itself costs regguard little) until the
    /// vault has written at least `manifests` and `blobs` objects; `false` after `limit`.
    fn wait_writes(&self, manifests: f64, blobs: f64, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            let (m, b) = self.writes();
            if m >= manifests && b >= blobs {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Waits until `path` exists (a vault object is renamed into place once verified), without
/// asking regguard anything. `false` after `limit`.
fn wait_file(path: &Path, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while !path.exists() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// A single-platform image whose one layer is a large pattern blob.
struct BigImage {
    repo: &'static str,
    tag: &'static str,
    size: u64,
    layer: String,
    config: oci::Blob,
}

fn push_big_image(reg: &Registry, size: u64) -> BigImage {
    let repo = "vault/big";
    let layer = oci::push_pattern_blob(&reg.url(), repo, size);
    let config = oci::Blob::json(
        OCI_CONFIG,
        &json!({
            "architecture": "amd64", "os": "linux", "config": {},
            "rootfs": {"type": "layers", "diff_ids": [layer]}
        }),
    );
    oci::push_blob(&reg.url(), repo, &config, &[]);
    let manifest = oci::Blob::json(
        OCI_MANIFEST,
        &json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": config.descriptor(),
            "layers": [{"mediaType": OCI_LAYER, "digest": layer, "size": size}]
        }),
    );
    assert_eq!(
        oci::put_manifest(&reg.url(), repo, "v1", &manifest, &[]).status,
        201
    );
    BigImage {
        repo,
        tag: "v1",
        size,
        layer,
        config,
    }
}

#[derive(Default)]
struct PullSamples {
    first_mibs: Vec<f64>,
    first_cpu_per_gib: Vec<f64>,
    registry_cpu_per_gib: Vec<f64>,
    /// Seconds from the manifest GET until the vault held everything the pull gave it.
    vault_done_s: Vec<f64>,
    warm_mibs: Vec<f64>,
    warm_cpu_per_gib: Vec<f64>,
    peak_rss_mib: Vec<f64>,
    /// What was missing from the vault after the wait, if anything.
    problems: Vec<String>,
}

/// (1) First and warm pull of the big image's layer, a fresh regguard and vault per sample.
fn blob_bench(
    rt: &tokio::runtime::Runtime,
    reg: &Registry,
    quiet: &RegguardOptions,
    big: &BigImage,
    rounds: u64,
) -> Vec<PullSamples> {
    let mut out: Vec<PullSamples> = MODES.iter().map(|_| PullSamples::default()).collect();
    let blob_path = format!("/v2/{}/blobs/{}", big.repo, big.layer);
    let gib = big.size as f64 / GIB as f64;
    for round in 0..rounds {
        for (m, mode) in MODES.iter().enumerate() {
            let inst = Instance::start(reg, *mode, quiet);
            let s = &mut out[m];
            let (c0, r0) = (cpu_seconds(inst.pid()), cpu_seconds(reg.proc.pid()));
            let t0 = Instant::now();
            let r = send(
                "GET",
                &format!("{}/v2/{}/manifests/{}", inst.rg.url(), big.repo, big.tag),
                &[("accept", ACCEPT_ALL)],
                Bytes::new(),
            );
            assert_eq!(r.status, 200, "manifest GET: {}", r.text());
            let (n, secs) = rt.block_on(fetch(inst.rg.public, &blob_path));
            assert_eq!(n, big.size);
            s.first_mibs.push(n as f64 / MIB as f64 / secs);
            // Everything the pull showed the vault, on disk: the config, and with layers the
            // layer (the filler's own GET of it from the registry, hashed and written).
            let mut wanted = vec![big.config.digest.clone()];
            if *mode == Mode::Layers {
                wanted.push(big.layer.clone());
            }
            if *mode != Mode::Off {
                for d in &wanted {
                    let path = inst.content_path(d).unwrap();
                    if !wait_file(&path, Duration::from_secs(120)) {
                        s.problems
                            .push(format!("round {round}: {d} not in the vault after 120 s"));
                    }
                }
                s.vault_done_s.push(t0.elapsed().as_secs_f64());
            }
            s.first_cpu_per_gib
                .push((cpu_seconds(inst.pid()) - c0) / gib);
            s.registry_cpu_per_gib
                .push((cpu_seconds(reg.proc.pid()) - r0) / gib);
            let c1 = cpu_seconds(inst.pid());
            let (n, secs) = rt.block_on(fetch(inst.rg.public, &blob_path));
            assert_eq!(n, big.size);
            s.warm_mibs.push(n as f64 / MIB as f64 / secs);
            s.warm_cpu_per_gib
                .push((cpu_seconds(inst.pid()) - c1) / gib);
            s.peak_rss_mib
                .push(inst.rg.proc.peak_rss_kib() as f64 / 1024.0);
            if *mode != Mode::Off {
                // The counters agree with the disk: one manifest, and the blobs waited for.
                let (wm, wb) = inst.writes();
                if wm < 1.0 || wb < wanted.len() as f64 {
                    s.problems.push(format!(
                        "round {round}: vault writes counted {wm} manifests, {wb} blobs; expected 1 and {}",
                        wanted.len()
                    ));
                }
            }
            eprintln!(
                "round {round} {:<32} first {:>6.0} MiB/s {:.3} CPU-s/GiB, warm {:>6.0} MiB/s",
                mode.name(),
                s.first_mibs.last().unwrap(),
                s.first_cpu_per_gib.last().unwrap(),
                s.warm_mibs.last().unwrap()
            );
        }
    }
    out
}

#[derive(Default)]
struct PushSamples {
    push_ms: Vec<f64>,
    child_ms: Vec<f64>,
    index_ms: Vec<f64>,
    skopeo_ms: Vec<f64>,
    cpu_ms_per_push: f64,
    /// Requests regguard itself made to the registry per push (gate and vault), by method.
    own_heads_per_push: f64,
    own_gets_per_push: f64,
    /// (manifests, blobs) the vault wrote vs expected.
    writes: ((f64, f64), (f64, f64)),
    settled: bool,
}

/// (2) Pushes through the gate: harness pushes and skopeo pushes, interleaved over the modes,
/// each of a distinct image (so the vault has new content to keep every time).
fn push_bench(reg: &Registry, insts: &[Instance], rounds: u64) -> Vec<PushSamples> {
    let mut out: Vec<PushSamples> = insts.iter().map(|_| PushSamples::default()).collect();
    let start: Vec<(f64, (f64, f64))> = insts
        .iter()
        .map(|i| (cpu_seconds(i.pid()), i.writes()))
        .collect();
    let pushes = rounds * 6;
    let skopeo_pushes = rounds * 2;
    for i in 0..pushes {
        for (t, inst) in insts.iter().enumerate() {
            let base = inst.rg.url();
            let repo = format!("push/h{i}m{t}");
            let img = oci::multi_arch(&format!("vaultpush{i}m{t}"));
            let s = &mut out[t];
            let t0 = Instant::now();
            for b in img.blobs() {
                oci::push_blob(&base, &repo, b, &[]);
            }
            for c in img.children() {
                let t1 = Instant::now();
                let r = oci::put_manifest(&base, &repo, &c.manifest.digest, &c.manifest, &[]);
                assert_eq!(r.status, 201, "child PUT: {}", r.text());
                s.child_ms.push(t1.elapsed().as_secs_f64() * 1000.0);
            }
            let t1 = Instant::now();
            let r = oci::put_manifest(&base, &repo, "v1", &img.index, &[]);
            assert_eq!(r.status, 201, "index PUT: {}", r.text());
            s.index_ms.push(t1.elapsed().as_secs_f64() * 1000.0);
            s.push_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        }
    }
    let work = tempfile::tempdir().unwrap();
    for i in 0..skopeo_pushes {
        for (t, inst) in insts.iter().enumerate() {
            let img = oci::multi_arch(&format!("vaultskopeo{i}m{t}"));
            let layout = work.path().join(format!("s{i}m{t}"));
            oci::write_layout(&img, &layout, "v1");
            let src = format!("oci:{}:v1", layout.display());
            let dest = format!("docker://{}/push/s{i}m{t}:v1", inst.rg.host());
            let t0 = Instant::now();
            skopeo(&[
                "copy",
                "--all",
                "--preserve-digests",
                "--dest-tls-verify=false",
                &src,
                &dest,
            ]);
            out[t].skopeo_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        }
    }
    // Each push: 5 manifests, 4 configs, 6 layers (all distinct); the vault keeps the
    // manifests and configs, with layers the layers too.
    let total = (pushes + skopeo_pushes) as f64;
    for (t, inst) in insts.iter().enumerate() {
        let (m0, b0) = start[t].1;
        let expected = match inst.mode {
            Mode::Off => (0.0, 0.0),
            Mode::On => (5.0 * total, 4.0 * total),
            Mode::Layers => (5.0 * total, 10.0 * total),
        };
        let settled = inst.wait_writes(m0 + expected.0, b0 + expected.1, Duration::from_secs(60));
        let (m1, b1) = inst.writes();
        let s = &mut out[t];
        s.settled = settled;
        s.writes = ((m1 - m0, b1 - b0), expected);
        s.cpu_ms_per_push = (cpu_seconds(inst.pid()) - start[t].0) / total * 1000.0;
    }
    std::thread::sleep(Duration::from_millis(300)); // the access log catches up
    let own = own_push_requests(reg);
    for (t, s) in out.iter_mut().enumerate() {
        s.own_heads_per_push = own[t].0 as f64 / total;
        s.own_gets_per_push = own[t].1 as f64 / total;
    }
    out
}

/// From the registry's access log: (HEAD, GET) requests regguard itself made to the push
/// repositories of each mode (`push/<h|s><i>m<mode>`).
fn own_push_requests(reg: &Registry) -> [(usize, usize); 3] {
    let mut by_mode = [(0, 0); 3];
    for line in reg.log_text().lines() {
        if !line.contains(" +0000] \"") || !line.trim_end().ends_with("\"regguard/0.1.0\"") {
            continue;
        }
        let Some(request) = line.split('"').nth(1) else {
            continue;
        };
        let mut words = request.split(' ');
        let (Some(method), Some(path)) = (words.next(), words.next()) else {
            continue;
        };
        let Some(repo) = path
            .strip_prefix("/v2/push/")
            .and_then(|p| p.split('/').next())
        else {
            continue;
        };
        let Some(mode) = repo
            .rsplit_once('m')
            .and_then(|(_, m)| m.parse::<usize>().ok())
            .filter(|m| *m < 3)
        else {
            continue;
        };
        match method {
            "HEAD" => by_mode[mode].0 += 1,
            "GET" => by_mode[mode].1 += 1,
            _ => {}
        }
    }
    by_mode
}

#[derive(Default)]
struct LoadSamples {
    rps: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    cpu_us_per_req: Vec<f64>,
}

/// (3) Manifest GET by tag at 32 connections, interleaved over the modes.
fn manifest_bench(
    rt: &tokio::runtime::Runtime,
    insts: &[Instance],
    path: &str,
    rounds: u64,
    secs: f64,
) -> Vec<LoadSamples> {
    for inst in insts {
        rt.block_on(load(inst.rg.public, path, 1.0)); // caches and the vault warm
    }
    let mut out: Vec<LoadSamples> = insts.iter().map(|_| LoadSamples::default()).collect();
    for round in 0..rounds {
        for (t, inst) in insts.iter().enumerate() {
            let c0 = cpu_seconds(inst.pid());
            let l = rt.block_on(load(inst.rg.public, path, secs));
            let cpu = cpu_seconds(inst.pid()) - c0;
            let s = &mut out[t];
            s.rps.push(l.rps);
            s.p50.push(l.p50_ms);
            s.p99.push(l.p99_ms);
            s.cpu_us_per_req.push(cpu / l.sent as f64 * 1e6);
            eprintln!(
                "round {round} {:<32} {:>6.0} req/s p50 {:.2} ms",
                inst.mode.name(),
                l.rps,
                l.p50_ms
            );
        }
    }
    out
}

/// One GET on a kept-alive connection: (status, served from the vault, body digest, ms).
async fn timed_get(send: &mut Sender, addr: SocketAddr, path: &str) -> (u16, bool, String, f64) {
    let t0 = Instant::now();
    let resp = send.send_request(get_req(addr, path, true)).await.unwrap();
    let status = resp.status().as_u16();
    let vault = resp
        .headers()
        .get(SERVED_FROM)
        .is_some_and(|v| v.as_bytes() == b"vault");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let ms = t0.elapsed().as_secs_f64() * 1000.0;
    (status, vault, http::sha256_digest(&body), ms)
}

struct Latency {
    name: String,
    ms: Vec<f64>,
}

struct ServeReport {
    rows: Vec<Latency>,
    served_counted: f64,
    gets: usize,
    /// Whether the registry still answered 404 for the lost child at the end.
    still_lost: bool,
    wait_ms: f64,
    problems: Vec<String>,
}

/// (4) Serve-from-vault latency of a manifest whose revision link the registry lost.
fn serve_bench(
    rt: &tokio::runtime::Runtime,
    reg: &Registry,
    inst: &Instance,
    gets: usize,
) -> ServeReport {
    let repo = "heal/app";
    let img = oci::multi_arch("vaultserve");
    let (m0, b0) = inst.writes();
    let t0 = Instant::now();
    oci::push_multi_arch(&inst.rg.url(), repo, "v1", &img, &[]);
    let mut problems = Vec::new();
    if !inst.wait_writes(m0 + 5.0, b0 + 4.0, Duration::from_secs(60)) {
        let (m, b) = inst.writes();
        problems.push(format!(
            "after the push the vault wrote {} manifests and {} blobs within 60 s, expected 5 and 4",
            m - m0,
            b - b0
        ));
    }
    let wait_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let lost = img.image("amd64").manifest.clone();
    let kept = img.image("arm64").manifest.clone();
    reg.remove_revision_link(repo, &lost.digest);
    assert!(
        !reg.has_manifest(repo, &lost.digest),
        "the registry still serves the child after its link was removed"
    );
    let served0 = inst.rg.metric(SERVED_MANIFESTS);
    let lost_path = format!("/v2/{repo}/manifests/{}", lost.digest);
    let kept_path = format!("/v2/{repo}/manifests/{}", kept.digest);
    let targets: [(String, SocketAddr, &str, &oci::Blob, u16, bool); 4] = [
        (
            "lost child, through regguard (registry 404 → vault)".into(),
            inst.rg.public,
            &lost_path,
            &lost,
            200,
            true,
        ),
        (
            "healthy child, through regguard (registry 200)".into(),
            inst.rg.public,
            &kept_path,
            &kept,
            200,
            false,
        ),
        (
            "lost child, registry direct (its 404)".into(),
            reg.addr,
            &lost_path,
            &lost,
            404,
            false,
        ),
        (
            "healthy child, registry direct".into(),
            reg.addr,
            &kept_path,
            &kept,
            200,
            false,
        ),
    ];
    let mut rows: Vec<Latency> = targets
        .iter()
        .map(|t| Latency {
            name: t.0.clone(),
            ms: Vec::new(),
        })
        .collect();
    rt.block_on(async {
        let mut senders = Vec::new();
        for t in &targets {
            senders.push(connect(t.1).await);
        }
        for i in 0..gets + 20 {
            for (k, (_, addr, path, blob, status, vault)) in targets.iter().enumerate() {
                let (s, v, digest, ms) = timed_get(&mut senders[k], *addr, path).await;
                if s != *status || v != *vault || (s == 200 && digest != blob.digest) {
                    problems.push(format!(
                        "GET {path} via {addr}: {s}, served from vault {v}, body {digest}; expected {status}, {vault}, {}",
                        blob.digest
                    ));
                    if problems.len() > 5 {
                        return;
                    }
                }
                if i >= 20 {
                    rows[k].ms.push(ms); // the first 20 of each: warm-up
                }
            }
        }
    });
    let served_counted = inst.rg.metric(SERVED_MANIFESTS) - served0;
    ServeReport {
        rows,
        served_counted,
        gets: gets + 20,
        still_lost: !reg.has_manifest(repo, &lost.digest),
        wait_ms,
        problems,
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` / criterion-style listing: nothing to list.
    }
    let rounds = env_num("BENCH_ROUNDS", 5);
    let secs = env_num("BENCH_SECONDS", 3) as f64;
    let blob_mib = env_num("BENCH_BLOB_MIB", 1024);
    let gets = env_num("BENCH_LATENCY_GETS", 500) as usize;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();

    // BENCH_ONLY=blob|push|manifest|serve runs one part (e.g. to profile it).
    let only = std::env::var("BENCH_ONLY").ok();
    let part = |name: &str| only.as_deref().is_none_or(|o| o == name);
    let reg = Registry::start();
    let img = oci::multi_arch("vaultbench");
    oci::push_multi_arch(&reg.url(), "vault/app", "v1", &img, &[]);
    let quiet = RegguardOptions {
        args: vec!["--access-log".into(), "false".into()],
        ..Default::default()
    };

    let pulls = part("blob").then(|| {
        let big = push_big_image(&reg, blob_mib * MIB);
        blob_bench(&rt, &reg, &quiet, &big, rounds)
    });
    let insts: Vec<Instance> = MODES
        .iter()
        .map(|m| Instance::start(&reg, *m, &quiet))
        .collect();
    let pushes = part("push").then(|| push_bench(&reg, &insts, rounds));
    let loads = part("manifest")
        .then(|| manifest_bench(&rt, &insts, "/v2/vault/app/manifests/v1", rounds * 2, secs));
    let serve = part("serve").then(|| serve_bench(&rt, &reg, &insts[1], gets));

    println!("\n## Vault benchmark\n\nMachine: {}\n", machine());
    println!(
        "Rounds: {rounds} (medians; manifest GET load: {}), interleaved over the three modes; load runs of {secs} s at {MANIFEST_CONNECTIONS} connections; regguard's defaults otherwise (validation on, gate enforcing, serve-from-vault on with a vault), access log off. Total run {:.0} s.",
        rounds * 2,
        started.elapsed().as_secs_f64()
    );
    let mut problems: Vec<String> = Vec::new();
    let mut bar: Vec<(&str, f64)> = Vec::new();
    if let Some(pulls) = &pulls {
        print_pulls(pulls, blob_mib);
        bar.push((
            "first-pull blob GET throughput",
            median(pulls[1].first_mibs.clone()) / median(pulls[0].first_mibs.clone()),
        ));
        bar.push((
            "first-pull blob GET: GiB per regguard CPU second",
            median(pulls[0].first_cpu_per_gib.clone()) / median(pulls[1].first_cpu_per_gib.clone()),
        ));
        for (mode, s) in MODES.iter().zip(pulls) {
            problems.extend(s.problems.iter().map(|p| format!("{}: {p}", mode.name())));
        }
    }
    if let Some(pushes) = &pushes {
        print_pushes(&insts, pushes, rounds);
        bar.push((
            "harness pushes per second (1 ÷ time per push)",
            median(pushes[0].push_ms.clone()) / median(pushes[1].push_ms.clone()),
        ));
        bar.push((
            "skopeo pushes per second",
            median(pushes[0].skopeo_ms.clone()) / median(pushes[1].skopeo_ms.clone()),
        ));
        for (inst, s) in insts.iter().zip(pushes) {
            if !s.settled {
                let ((m, b), (em, eb)) = s.writes;
                problems.push(format!(
                    "{}: after the pushes the vault wrote {m} manifests and {b} blobs, expected {em} and {eb}",
                    inst.mode.name()
                ));
            }
        }
    }
    if let Some(loads) = &loads {
        print_loads(&insts, loads);
        bar.push((
            "manifest GET req/s at 32 connections",
            median(loads[1].rps.clone()) / median(loads[0].rps.clone()),
        ));
        bar.push((
            "manifest GET: requests per regguard CPU second",
            median(loads[0].cpu_us_per_req.clone()) / median(loads[1].cpu_us_per_req.clone()),
        ));
    }
    if let Some(serve) = &serve {
        print_serve(serve);
        problems.extend(serve.problems.iter().cloned());
        if serve.served_counted as usize != serve.gets {
            problems.push(format!(
                "heal_served_total{{kind=\"manifest\"}} rose by {} for {} GETs answered from the vault",
                serve.served_counted, serve.gets
            ));
        }
        if !serve.still_lost {
            problems.push(
                "the registry had the lost child again at the end (repair is off by default)"
                    .into(),
            );
        }
    }

    // The issue's bar, and anything that went wrong.
    if !bar.is_empty() {
        println!("\n### Against the issue's bar (manifests/configs cost ≤ 3% throughput; vault on ÷ off, medians)\n");
        println!("| measure | ratio | within 3% |");
        println!("|---|---|---|");
        for (name, r) in &bar {
            let within = if *r >= 0.97 { "yes" } else { "**no**" };
            println!("| {name} | {r:.3} | {within} |");
        }
    }
    if let Some(pulls) = &pulls {
        let layers_ratio =
            median(pulls[2].first_mibs.clone()) / median(pulls[0].first_mibs.clone());
        let layers_cpu =
            median(pulls[2].first_cpu_per_gib.clone()) / median(pulls[0].first_cpu_per_gib.clone());
        println!(
            "\nWith layers = true, a first pull of a layer the vault lacks runs at {layers_ratio:.2}× the throughput of the vault off and costs regguard {layers_cpu:.2}× the CPU per GiB (the filler reads the layer from the registry a second time, hashes and writes it); the warm pull is in table 1."
        );
    }
    if !problems.is_empty() {
        println!("\n**Observed problems:**\n");
        for p in &problems {
            println!("- {p}");
        }
    }
}

fn print_pulls(pulls: &[PullSamples], blob_mib: u64) {
    println!(
        "\n### 1. Blob GET of a {blob_mib} MiB layer (a client's first pull of the image through a fresh regguard and vault, then a warm second pull)\n"
    );
    println!("| regguard | first pull MiB/s | ÷ off | regguard CPU-s/GiB (until the vault is done) | ÷ off | registry CPU-s/GiB | vault done after s | warm pull MiB/s | ÷ off | warm CPU-s/GiB | peak RSS MiB |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let off = &pulls[0];
    for (mode, s) in MODES.iter().zip(pulls) {
        let done = if s.vault_done_s.is_empty() {
            "–".to_string()
        } else {
            format!("{:.2}", median(s.vault_done_s.clone()))
        };
        println!(
            "| {} | {:.0} | {} | {:.3} | {} | {:.3} | {done} | {:.0} | {} | {:.3} | {:.1} |",
            mode.name(),
            median(s.first_mibs.clone()),
            ratio(&s.first_mibs, &off.first_mibs),
            median(s.first_cpu_per_gib.clone()),
            ratio(&s.first_cpu_per_gib, &off.first_cpu_per_gib),
            median(s.registry_cpu_per_gib.clone()),
            median(s.warm_mibs.clone()),
            ratio(&s.warm_mibs, &off.warm_mibs),
            median(s.warm_cpu_per_gib.clone()),
            median(s.peak_rss_mib.clone()),
        );
    }
}

fn print_pushes(insts: &[Instance], pushes: &[PushSamples], rounds: u64) {
    println!(
        "\n### 2. Push through the gate (multi-arch test image: 10 blobs, 4 children, index; {} harness pushes and {} `skopeo copy --all` pushes per mode, each of a new image)\n",
        rounds * 6,
        rounds * 2
    );
    println!("| regguard | harness push p50 ms | ÷ off | p99 ms | child PUT p50 ms | index PUT p50 ms | skopeo push p50 ms | ÷ off | regguard CPU ms per push | regguard's own registry requests per push (HEAD + GET) | vault writes (manifests, blobs) / expected |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let off = &pushes[0];
    for (inst, s) in insts.iter().zip(pushes) {
        let ((m, b), (em, eb)) = s.writes;
        println!(
            "| {} | {:.2} | {} | {:.2} | {:.2} | {:.2} | {:.0} | {} | {:.2} | {:.1} + {:.1} | {m:.0}, {b:.0} / {em:.0}, {eb:.0}{} |",
            inst.mode.name(),
            median(s.push_ms.clone()),
            ratio(&s.push_ms, &off.push_ms),
            pct(&s.push_ms, 0.99),
            median(s.child_ms.clone()),
            median(s.index_ms.clone()),
            median(s.skopeo_ms.clone()),
            ratio(&s.skopeo_ms, &off.skopeo_ms),
            s.cpu_ms_per_push,
            s.own_heads_per_push,
            s.own_gets_per_push,
            if s.settled { "" } else { " (not reached in 60 s)" }
        );
    }
}

fn print_loads(insts: &[Instance], loads: &[LoadSamples]) {
    println!(
        "\n### 3. Manifest GET by tag (multi-arch index), {MANIFEST_CONNECTIONS} connections\n"
    );
    println!(
        "| regguard | req/s | ÷ off | p50 ms | p99 ms | regguard CPU µs per request | ÷ off |"
    );
    println!("|---|---|---|---|---|---|---|");
    let off = &loads[0];
    for (inst, s) in insts.iter().zip(loads) {
        println!(
            "| {} | {:.0} | {} | {:.2} | {:.2} | {:.1} | {} |",
            inst.mode.name(),
            median(s.rps.clone()),
            ratio(&s.rps, &off.rps),
            median(s.p50.clone()),
            median(s.p99.clone()),
            median(s.cpu_us_per_req.clone()),
            ratio(&s.cpu_us_per_req, &off.cpu_us_per_req),
        );
    }
}

fn print_serve(serve: &ServeReport) {
    println!(
        "\n### 4. Serve-from-vault latency (manifest GET by digest, one kept-alive connection per row, {} GETs each after 20 of warm-up, interleaved)\n",
        serve.gets - 20
    );
    println!("| GET | p50 ms | p99 ms | max ms |");
    println!("|---|---|---|---|");
    for row in &serve.rows {
        if row.ms.is_empty() {
            println!("| {} | – | – | – |", row.name);
        } else {
            println!(
                "| {} | {:.3} | {:.3} | {:.3} |",
                row.name,
                pct(&row.ms, 0.5),
                pct(&row.ms, 0.99),
                pct(&row.ms, 1.0)
            );
        }
    }
    println!(
        "\nThe vault held the pushed image {:.0} ms after the push began (polled). `regguard_heal_served_total{{kind=\"manifest\"}}` rose by {:.0} for {} GETs of the lost child; the registry {} the child at the end.",
        serve.wait_ms,
        serve.served_counted,
        serve.gets,
        if serve.still_lost { "still lacked" } else { "had regained" }
    );
}

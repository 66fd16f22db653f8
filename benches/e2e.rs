//! End-to-end benchmark on loopback: direct to the registry vs the nginx
//! front (as deployed, and tuned) vs regguard, interleaved in one run.
//!
//! `cargo bench --bench e2e` (about 5 minutes on 2 cores). Prints a Markdown table
//! with ratios, and the machine it ran on. Measures:
//! (a) 1 GiB blob GET throughput and each proxy's CPU seconds per GiB (from
//!     /proc/<pid>/stat, all of a proxy's processes), over plain HTTP and TLS;
//! (b) manifest GET by tag at 32 connections: requests/s, p50, p99, and each proxy's
//!     CPU per request (µs, from /proc/<pid>/stat over the load run; the registry's too);
//! (c) (a) and (b) against a minimal in-process upstream, to show the proxies'
//!     own ceiling without the registry's CPU in the way;
//! (d) regguard's peak RSS while relaying 256 concurrent blob streams;
//! (e) serve-time validation on vs off, upstream amplification, detection latency
//!     (`BENCH_ONLY=validation` runs only this part);
//! (f) the push gate: time per manifest PUT, direct vs gate off vs enforce
//!     (`BENCH_ONLY=gate`).
//! `BENCH_ONLY=manifest` runs (b) alone against direct, tuned nginx and regguard (and, with
//! `BENCH_BASE_BIN=<path>`, another regguard build side by side); `BENCH_ONLY=hold` starts
//! them, prints their addresses and pids, and waits `BENCH_HOLD` seconds (for wrk, strace, perf).
//! Settings: BENCH_ROUNDS (default 5), BENCH_SECONDS per load run (default 3).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use support::{cpu_seconds, env_num, get_req, median};

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::http::{self, send};
use common::oci::{self, ACCEPT_ALL};
use common::{Nginx, Regguard, RegguardOptions, Registry, TestCert};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

const GIB: u64 = 1024 * 1024 * 1024;
const MANIFEST_CONNECTIONS: usize = 32;
const STREAMS: usize = 256;
const STREAM_BLOB: u64 = 16 * 1024 * 1024;

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn connect(addr: SocketAddr, tls: Option<&tokio_rustls::TlsConnector>) -> Sender {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    match tls {
        Some(c) => {
            let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
            let s = c.connect(name, tcp).await.unwrap();
            let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
                .await
                .unwrap();
            tokio::spawn(conn);
            send
        }
        None => {
            let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .unwrap();
            tokio::spawn(conn);
            send
        }
    }
}

/// GETs a blob, discarding it; returns (bytes, seconds).
async fn fetch(
    addr: SocketAddr,
    tls: Option<&tokio_rustls::TlsConnector>,
    path: &str,
) -> (u64, f64) {
    let mut send = connect(addr, tls).await;
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

/// `MANIFEST_CONNECTIONS` keep-alive connections GETting `path` for `secs`.
async fn load(addr: SocketAddr, path: &str, secs: f64) -> Load {
    load_n(addr, path, secs, MANIFEST_CONNECTIONS).await
}

/// `conns` keep-alive connections GETting `path` for `secs`.
async fn load_n(addr: SocketAddr, path: &str, secs: f64, conns: usize) -> Load {
    let mut tasks = Vec::new();
    let stop = Instant::now() + Duration::from_secs_f64(secs + 0.5);
    let warm = Instant::now() + Duration::from_millis(500);
    for _ in 0..conns {
        let path = path.to_string();
        tasks.push(tokio::spawn(async move {
            let mut send = connect(addr, None).await;
            let mut lat = Vec::new();
            let mut sent = 0usize;
            loop {
                let t = Instant::now();
                if t >= stop {
                    break;
                }
                // nginx closes a client connection after `keepalive_requests` (1000): reconnect.
                if send.ready().await.is_err() {
                    send = connect(addr, None).await;
                }
                let resp = match send.send_request(get_req(addr, &path, true)).await {
                    Ok(r) => r,
                    Err(_) => {
                        send = connect(addr, None).await;
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

/// A minimal upstream: answers manifests from memory and streams a 1 GiB blob of
/// one repeated 1 MiB buffer (zero-copy), to isolate the proxies' own cost.
fn minimal_upstream(rt: &tokio::runtime::Runtime, index: oci::Blob) -> SocketAddr {
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let chunk = http::pattern_chunk(7);
    rt.spawn(async move {
        loop {
            let (s, _) = listener.accept().await.unwrap();
            s.set_nodelay(true).unwrap();
            let (index, chunk) = (index.clone(), chunk.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let (index, chunk) = (index.clone(), chunk.clone());
                        async move {
                            let path = req.uri().path();
                            let resp = if path.contains("/manifests/") {
                                hyper::Response::builder()
                                    .header("content-type", oci::OCI_INDEX)
                                    .header("docker-content-digest", index.digest.as_str())
                                    .body(
                                        http_body_util::Full::new(index.data.clone())
                                            .map_err(|e| match e {})
                                            .boxed(),
                                    )
                            } else if path.contains("/blobs/") {
                                let frames = (0..1024).map(move |_| {
                                    Ok::<_, Infallible>(hyper::body::Frame::data(chunk.clone()))
                                });
                                hyper::Response::builder()
                                    .header("content-length", GIB.to_string())
                                    .body(
                                        http_body_util::StreamBody::new(IterStream(frames)).boxed(),
                                    )
                            } else {
                                hyper::Response::builder().body(
                                    http_body_util::Full::new(Bytes::from_static(b"{}"))
                                        .map_err(|e| match e {})
                                        .boxed(),
                                )
                            };
                            Ok::<_, Infallible>(resp.unwrap())
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

struct IterStream<I>(I);
impl<I: Iterator + Unpin> futures_core::Stream for IterStream<I> {
    type Item = I::Item;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<I::Item>> {
        std::task::Poll::Ready(self.0.next())
    }
}

#[derive(Default)]
struct Samples {
    mibs: Vec<f64>,
    cpu_per_gib: Vec<f64>,
    tls_mibs: Vec<f64>,
    tls_cpu_per_gib: Vec<f64>,
    rps: Vec<f64>,
    /// The proxy's CPU (user + system, µs) per manifest request of the 32-connection load.
    cpu_us_per_req: Vec<f64>,
    /// The registry's CPU (µs) per client request in that load.
    reg_cpu_us_per_req: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    /// One connection, no contention: the latency a proxy adds by itself.
    p50_1: Vec<f64>,
    p99_1: Vec<f64>,
}

struct Target {
    name: &'static str,
    plain: SocketAddr,
    tls: Option<SocketAddr>,
    pid: Option<u32>,
    samples: Samples,
}

impl Target {
    fn new(
        name: &'static str,
        plain: SocketAddr,
        tls: Option<SocketAddr>,
        pid: Option<u32>,
    ) -> Self {
        Target {
            name,
            plain,
            tls,
            pid,
            samples: Samples::default(),
        }
    }
}

fn run_suite(
    rt: &tokio::runtime::Runtime,
    targets: &mut [Target],
    connector: &tokio_rustls::TlsConnector,
    (blob_path, manifest_path): (&str, &str),
    registry_pid: Option<u32>,
    rounds: u64,
    secs: f64,
) {
    for round in 0..rounds {
        for t in targets.iter_mut() {
            let cpu0 = t.pid.map(cpu_seconds);
            let (n, s) = rt.block_on(fetch(t.plain, None, blob_path));
            assert_eq!(n, GIB);
            t.samples.mibs.push(n as f64 / (1024.0 * 1024.0) / s);
            if let (Some(pid), Some(c0)) = (t.pid, cpu0) {
                t.samples
                    .cpu_per_gib
                    .push((cpu_seconds(pid) - c0) / (n as f64 / GIB as f64));
            }
            if let Some(tls) = t.tls {
                let cpu0 = t.pid.map(cpu_seconds);
                let (n, s) = rt.block_on(fetch(tls, Some(connector), blob_path));
                assert_eq!(n, GIB);
                t.samples.tls_mibs.push(n as f64 / (1024.0 * 1024.0) / s);
                if let (Some(pid), Some(c0)) = (t.pid, cpu0) {
                    t.samples
                        .tls_cpu_per_gib
                        .push((cpu_seconds(pid) - c0) / (n as f64 / GIB as f64));
                }
            }
            let cpu0 = t.pid.map(cpu_seconds);
            let reg0 = registry_pid.map(cpu_seconds);
            let l = rt.block_on(load(t.plain, manifest_path, secs));
            if let (Some(pid), Some(c0)) = (t.pid, cpu0) {
                t.samples
                    .cpu_us_per_req
                    .push((cpu_seconds(pid) - c0) * 1e6 / l.sent as f64);
            }
            if let (Some(pid), Some(r0)) = (registry_pid, reg0) {
                t.samples
                    .reg_cpu_us_per_req
                    .push((cpu_seconds(pid) - r0) * 1e6 / l.sent as f64);
            }
            t.samples.rps.push(l.rps);
            t.samples.p50.push(l.p50_ms);
            t.samples.p99.push(l.p99_ms);
            let l1 = rt.block_on(load_n(t.plain, manifest_path, secs / 2.0, 1));
            t.samples.p50_1.push(l1.p50_ms);
            t.samples.p99_1.push(l1.p99_ms);
            eprintln!(
                "round {round} {:<14} {:>7.0} MiB/s {:>7.0} req/s {:>6.1} µs CPU/req",
                t.name,
                t.samples.mibs.last().unwrap(),
                l.rps,
                t.samples.cpu_us_per_req.last().copied().unwrap_or(f64::NAN)
            );
        }
    }
}

fn table(title: &str, targets: &[Target]) {
    println!("\n### {title}\n");
    println!("| path | blob GET MiB/s | proxy CPU-s/GiB | TLS blob GET MiB/s | TLS CPU-s/GiB | manifest req/s (32 conn) | proxy CPU µs/req | registry CPU µs/req | p50 ms | p99 ms | 1 conn p50 ms | 1 conn p99 ms |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let fmt = |v: &Vec<f64>, d: usize| {
        if v.is_empty() {
            "–".to_string()
        } else {
            format!("{:.*}", d, median(v.clone()))
        }
    };
    for t in targets {
        let s = &t.samples;
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            t.name,
            fmt(&s.mibs, 0),
            fmt(&s.cpu_per_gib, 2),
            fmt(&s.tls_mibs, 0),
            fmt(&s.tls_cpu_per_gib, 2),
            fmt(&s.rps, 0),
            fmt(&s.cpu_us_per_req, 1),
            fmt(&s.reg_cpu_us_per_req, 0),
            fmt(&s.p50, 2),
            fmt(&s.p99, 2),
            fmt(&s.p50_1, 3),
            fmt(&s.p99_1, 3)
        );
    }
    let get = |name: &str| targets.iter().find(|t| t.name == name).map(|t| &t.samples);
    let (Some(rg), Some(direct), Some(tuned), Some(front)) = (
        get("regguard"),
        get("direct"),
        get("nginx tuned"),
        get("nginx front"),
    ) else {
        return;
    };
    let ratio =
        |a: &Vec<f64>, b: &Vec<f64>| format!("{:.2}", median(a.clone()) / median(b.clone()));
    println!("\nRatios (regguard ÷ other, medians):\n");
    println!("| measure | ÷ direct | ÷ nginx front | ÷ nginx tuned |");
    println!("|---|---|---|---|");
    println!(
        "| blob GET throughput | {} | {} | {} |",
        ratio(&rg.mibs, &direct.mibs),
        ratio(&rg.mibs, &front.mibs),
        ratio(&rg.mibs, &tuned.mibs)
    );
    println!(
        "| CPU per GiB | – | {} | {} |",
        ratio(&rg.cpu_per_gib, &front.cpu_per_gib),
        ratio(&rg.cpu_per_gib, &tuned.cpu_per_gib)
    );
    println!(
        "| TLS blob GET throughput | – | {} | {} |",
        ratio(&rg.tls_mibs, &front.tls_mibs),
        ratio(&rg.tls_mibs, &tuned.tls_mibs)
    );
    println!(
        "| TLS CPU per GiB | – | {} | {} |",
        ratio(&rg.tls_cpu_per_gib, &front.tls_cpu_per_gib),
        ratio(&rg.tls_cpu_per_gib, &tuned.tls_cpu_per_gib)
    );
    println!(
        "| manifest req/s | {} | {} | {} |",
        ratio(&rg.rps, &direct.rps),
        ratio(&rg.rps, &front.rps),
        ratio(&rg.rps, &tuned.rps)
    );
    println!(
        "| CPU per manifest request | – | {} | {} |",
        ratio(&rg.cpu_us_per_req, &front.cpu_us_per_req),
        ratio(&rg.cpu_us_per_req, &tuned.cpu_us_per_req)
    );
    let added =
        |a: &Vec<f64>, b: &Vec<f64>| format!("{:+.3}", median(a.clone()) - median(b.clone()));
    println!(
        "| p99 added at 32 connections, registry saturated (ms) | {} | {} | {} |",
        added(&rg.p99, &direct.p99),
        added(&rg.p99, &front.p99),
        added(&rg.p99, &tuned.p99)
    );
    println!(
        "| p50 / p99 added at 1 connection (ms) | {} / {} | {} / {} | {} / {} |",
        added(&rg.p50_1, &direct.p50_1),
        added(&rg.p99_1, &direct.p99_1),
        added(&rg.p50_1, &front.p50_1),
        added(&rg.p99_1, &front.p99_1),
        added(&rg.p50_1, &tuned.p50_1),
        added(&rg.p99_1, &tuned.p99_1)
    );
}

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
    let nginx = std::process::Command::new("nginx")
        .arg("-v")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string())
        .unwrap_or_default();
    format!("{cores} vCPU ({model}), {mem_gib:.0} GiB, Linux {}, {nginx}, docker-registry 2.8.2, loopback", kernel.trim())
}

/// Access-log lines of the registry: (all requests, requests regguard made itself).
fn registry_requests(reg: &Registry) -> (usize, usize) {
    let log = reg.log_text();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains(" +0000] \"")).collect();
    let own = lines
        .iter()
        .filter(|l| l.ends_with("\"regguard/0.1.0\""))
        .count();
    (lines.len(), own)
}

/// (e) Serve-time validation: its cost on manifest GETs, its upstream amplification,
/// and how long a broken child takes to show up.
fn validation_bench(
    rt: &tokio::runtime::Runtime,
    reg: &Registry,
    quiet: &RegguardOptions,
    rounds: u64,
    secs: f64,
) {
    let manifest_path = "/v2/bench/app/manifests/v1";
    let on = Regguard::start_with(&reg.url(), quiet.clone());
    let mut off_opts = quiet.clone();
    off_opts
        .env
        .push(("REGGUARD_VALIDATE_ENABLED".into(), "false".into()));
    let off = Regguard::start_with(&reg.url(), off_opts);
    // Steady state: the first pull fills the caches.
    rt.block_on(load(on.public, manifest_path, 1.0));
    let mut rows: Vec<(&str, Samples, Vec<f64>)> = vec![
        ("validation off", Samples::default(), vec![]),
        ("validation on", Samples::default(), vec![]),
    ];
    for _ in 0..rounds {
        for (i, rg) in [&off, &on].into_iter().enumerate() {
            let (all0, _) = registry_requests(reg);
            let l = rt.block_on(load(rg.public, manifest_path, secs));
            std::thread::sleep(Duration::from_millis(300)); // let the access log catch up
            let (all1, _) = registry_requests(reg);
            let row = &mut rows[i];
            row.1.rps.push(l.rps);
            row.1.p50.push(l.p50_ms);
            row.1.p99.push(l.p99_ms);
            row.2.push((all1 - all0) as f64 / l.sent as f64);
            eprintln!("{} {:.0} req/s", row.0, l.rps);
        }
    }
    println!(
        "\n### Serve-time validation (manifest GET by tag of a healthy index, 32 connections)\n"
    );
    println!(
        "| regguard | manifest req/s | p50 ms | p99 ms | upstream requests per client request |"
    );
    println!("|---|---|---|---|---|");
    for (name, s, amp) in &rows {
        println!(
            "| {name} | {:.0} | {:.2} | {:.2} | {:.4} |",
            median(s.rps.clone()),
            median(s.p50.clone()),
            median(s.p99.clone()),
            median(amp.clone())
        );
    }
    println!(
        "\nValidation on ÷ off: {:.3}× requests/s, p50 {:+.2} ms.",
        median(rows[1].1.rps.clone()) / median(rows[0].1.rps.clone()),
        median(rows[1].1.p50.clone()) - median(rows[0].1.p50.clone())
    );

    // Detection latency: the incident of tests/validate.rs, repeated in fresh repositories.
    let mut lat = Vec::new();
    for i in 0..30 {
        let repo = format!("detect/r{i}");
        let img = oci::multi_arch(&format!("detect{i}"));
        oci::push_multi_arch(&reg.url(), &repo, "v1", &img, &[]);
        reg.remove_revision_link(&repo, &img.image("amd64").manifest.digest);
        let r = send(
            "GET",
            &format!("{}/v2/{repo}/manifests/v1", on.url()),
            &[("accept", ACCEPT_ALL)],
            Bytes::new(),
        );
        assert_eq!(r.status, 200);
        let t0 = Instant::now();
        let integrity = format!("http://{}/integrity", on.admin);
        loop {
            if http::get(&integrity).json()["count"].as_u64().unwrap() as usize > i {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "not detected");
        }
        lat.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let m = on.metrics();
    let mean = common::metric_in(&m, "regguard_detection_seconds_sum")
        / common::metric_in(&m, "regguard_detection_seconds_count")
        * 1000.0;
    println!(
        "\nDetection latency (index response to the client → broken child visible on /integrity, polled; 30 incidents): p50 {:.1} ms, p99 {:.1} ms; regguard's own `regguard_detection_seconds` mean {:.1} ms.",
        lat[lat.len() / 2],
        lat[(lat.len() * 99 / 100).min(lat.len() - 1)],
        mean
    );
}

/// (f) The push gate: time per manifest PUT, direct vs regguard with the gate off vs enforcing.
fn gate_bench(reg: &Registry, quiet: &RegguardOptions, rounds: u64) {
    let with_mode = |mode: &str| {
        let mut o = quiet.clone();
        o.env.push(("REGGUARD_GATE_MODE".into(), mode.into()));
        Regguard::start_with(&reg.url(), o)
    };
    let off = with_mode("off");
    let on = with_mode("enforce");
    let targets: [(&str, String); 3] = [
        ("direct", reg.url()),
        ("regguard, gate off", off.url()),
        ("regguard, gate enforce", on.url()),
    ];
    let mut child_ms: Vec<Vec<f64>> = vec![vec![]; 3];
    let mut index_ms: Vec<Vec<f64>> = vec![vec![]; 3];
    let mut heads_per_push = Vec::new();
    let pushes = rounds * 6;
    for i in 0..pushes {
        for (t, (_, base)) in targets.iter().enumerate() {
            let repo = format!("gate/p{i}t{t}");
            let img = oci::multi_arch(&format!("gatebench{i}"));
            for b in img.blobs() {
                oci::push_blob(base, &repo, b, &[]);
            }
            let (_, own0) = registry_requests(reg);
            for c in img.children() {
                let t0 = Instant::now();
                assert_eq!(
                    oci::put_manifest(base, &repo, &c.manifest.digest, &c.manifest, &[]).status,
                    201
                );
                child_ms[t].push(t0.elapsed().as_secs_f64() * 1000.0);
            }
            let t0 = Instant::now();
            assert_eq!(
                oci::put_manifest(base, &repo, "v1", &img.index, &[]).status,
                201
            );
            index_ms[t].push(t0.elapsed().as_secs_f64() * 1000.0);
            if t == 2 {
                std::thread::sleep(Duration::from_millis(100)); // access log catch-up
                let (_, own1) = registry_requests(reg);
                heads_per_push.push((own1 - own0) as f64);
            }
        }
    }
    println!("\n### Push gate (multi-arch test image: 4 children, 10 blobs; {pushes} pushes each, interleaved)\n");
    println!("| path | child manifest PUT p50 ms | index PUT p50 ms | index PUT p99 ms |");
    println!("|---|---|---|---|");
    let pct = |v: &Vec<f64>, p: f64| {
        let mut v = v.clone();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
    };
    for (t, (name, _)) in targets.iter().enumerate() {
        println!(
            "| {name} | {:.2} | {:.2} | {:.2} |",
            pct(&child_ms[t], 0.5),
            pct(&index_ms[t], 0.5),
            pct(&index_ms[t], 0.99)
        );
    }
    println!(
        "\nGate cost per index PUT (p50, enforce − off): {:+.2} ms; per child PUT: {:+.2} ms. Upstream requests the gate made per push (children + index): {:.0} (median).",
        pct(&index_ms[2], 0.5) - pct(&index_ms[1], 0.5),
        pct(&child_ms[2], 0.5) - pct(&child_ms[1], 0.5),
        median(heads_per_push)
    );
}

/// Manifest GET by tag at 32 connections only, interleaved: direct, tuned nginx, regguard
/// (its defaults) and, with `BENCH_BASE_BIN`, another regguard build for comparison.
/// Requests/s and each proxy's CPU per request (`BENCH_ONLY=manifest`).
fn manifest_bench(
    rt: &tokio::runtime::Runtime,
    reg: &Registry,
    quiet: &RegguardOptions,
    manifest_path: &str,
    rounds: u64,
    secs: f64,
) {
    let tuned = Nginx::start("front-tuned.conf", reg.addr);
    let rg = Regguard::start_with(&reg.url(), quiet.clone());
    let base = std::env::var("BENCH_BASE_BIN")
        .ok()
        .map(|bin| Regguard::start_bin(bin.as_ref(), &reg.url(), quiet.clone()));
    let mut targets = vec![
        Target::new("direct", reg.addr, None, None),
        Target::new("nginx tuned", tuned.addr, None, Some(tuned.proc.pid())),
        Target::new("regguard", rg.public, None, Some(rg.proc.pid())),
    ];
    if let Some(b) = &base {
        targets.push(Target::new(
            "regguard base",
            b.public,
            None,
            Some(b.proc.pid()),
        ));
    }
    // Steady state: the first pulls fill regguard's caches.
    for t in &targets {
        rt.block_on(load(t.plain, manifest_path, 1.0));
    }
    for round in 0..rounds {
        for t in targets.iter_mut() {
            let cpu0 = t.pid.map(cpu_seconds);
            let reg0 = cpu_seconds(reg.proc.pid());
            let l = rt.block_on(load(t.plain, manifest_path, secs));
            if let (Some(pid), Some(c0)) = (t.pid, cpu0) {
                t.samples
                    .cpu_us_per_req
                    .push((cpu_seconds(pid) - c0) * 1e6 / l.sent as f64);
            }
            t.samples
                .reg_cpu_us_per_req
                .push((cpu_seconds(reg.proc.pid()) - reg0) * 1e6 / l.sent as f64);
            t.samples.rps.push(l.rps);
            t.samples.p50.push(l.p50_ms);
            t.samples.p99.push(l.p99_ms);
            eprintln!(
                "round {round} {:<14} {:>7.0} req/s {:>6.1} µs CPU/req, registry {:>6.1}",
                t.name,
                l.rps,
                t.samples.cpu_us_per_req.last().copied().unwrap_or(f64::NAN),
                t.samples
                    .reg_cpu_us_per_req
                    .last()
                    .copied()
                    .unwrap_or(f64::NAN)
            );
        }
    }
    println!("\n### Manifest GET by tag, 32 connections ({rounds} rounds of {secs} s)\n");
    println!(
        "| path | req/s | ÷ direct | proxy CPU µs/req | registry CPU µs/req | p50 ms | p99 ms |"
    );
    println!("|---|---|---|---|---|---|---|");
    let direct = median(targets[0].samples.rps.clone());
    for t in &targets {
        let s = &t.samples;
        println!(
            "| {} | {:.0} | {:.3} | {:.1} | {:.0} | {:.2} | {:.2} |",
            t.name,
            median(s.rps.clone()),
            median(s.rps.clone()) / direct,
            median(s.cpu_us_per_req.clone()),
            median(s.reg_cpu_us_per_req.clone()),
            median(s.p50.clone()),
            median(s.p99.clone())
        );
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` / criterion-style listing: nothing to list.
    }
    let rounds = env_num("BENCH_ROUNDS", 5);
    let secs = env_num("BENCH_SECONDS", 3) as f64;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let upstream_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let cert = TestCert::generate();
    let connector = http::tls_connector(&cert.cert_der, b"http/1.1");

    // Real registry with a 1 GiB blob, a 16 MiB blob and the multi-arch test image.
    let reg = Registry::start();
    let digest = oci::push_pattern_blob(&reg.url(), "bench/app", GIB);
    let small = oci::push_pattern_blob(&reg.url(), "bench/app", STREAM_BLOB);
    let img = oci::multi_arch("bench");
    oci::push_multi_arch(&reg.url(), "bench/app", "v1", &img, &[]);

    let quiet = RegguardOptions {
        args: vec!["--access-log".into(), "false".into()],
        ..Default::default()
    };
    let tls_opts = RegguardOptions {
        tls: Some((cert.cert_pem.clone(), cert.key_pem.clone())),
        ..quiet.clone()
    };
    let tls_files = Some((cert.cert_pem.as_path(), cert.key_pem.as_path()));

    let blob_path = format!("/v2/bench/app/blobs/{digest}");
    let manifest_path = "/v2/bench/app/manifests/v1";
    if std::env::var("BENCH_ONLY").as_deref() == Ok("validation") {
        validation_bench(&rt, &reg, &quiet, rounds, secs);
        return;
    }
    if std::env::var("BENCH_ONLY").as_deref() == Ok("gate") {
        gate_bench(&reg, &quiet, rounds);
        return;
    }
    if std::env::var("BENCH_ONLY").as_deref() == Ok("hold") {
        let tuned = Nginx::start("front-tuned.conf", reg.addr);
        let rg = Regguard::start_with(&reg.url(), quiet.clone());
        let base = std::env::var("BENCH_BASE_BIN")
            .ok()
            .map(|bin| Regguard::start_bin(bin.as_ref(), &reg.url(), quiet.clone()));
        println!("HOLD direct {} pid {}", reg.addr, reg.proc.pid());
        println!("HOLD nginx {} pid {}", tuned.addr, tuned.proc.pid());
        println!("HOLD regguard {} pid {}", rg.public, rg.proc.pid());
        if let Some(b) = &base {
            println!("HOLD base {} pid {}", b.public, b.proc.pid());
        }
        use std::io::Write as _;
        std::io::stdout().flush().unwrap();
        std::thread::sleep(Duration::from_secs(env_num("BENCH_HOLD", 600)));
        return;
    }
    if std::env::var("BENCH_ONLY").as_deref() == Ok("manifest") {
        manifest_bench(&rt, &reg, &quiet, manifest_path, rounds, secs);
        return;
    }
    if std::env::var("BENCH_QUICK").is_ok() {
        let rg = Regguard::start_with(&reg.url(), quiet.clone());
        for _ in 0..3 {
            let c0 = cpu_seconds(rg.proc.pid());
            let (n, s) = rt.block_on(fetch(rg.public, None, &blob_path));
            println!(
                "quick: {:.0} MiB/s, {:.3} CPU-s/GiB",
                n as f64 / 1048576.0 / s,
                cpu_seconds(rg.proc.pid()) - c0
            );
        }
        let small_path = format!("/v2/bench/app/blobs/{small}");
        rt.block_on(async {
            let mut tasks = Vec::new();
            for _ in 0..STREAMS {
                let p = small_path.clone();
                let addr = rg.public;
                tasks.push(tokio::spawn(async move { fetch(addr, None, &p).await }));
            }
            for t in tasks {
                assert_eq!(t.await.unwrap().0, STREAM_BLOB);
            }
        });
        println!(
            "quick: peak RSS {:.1} MiB",
            rg.proc.peak_rss_kib() as f64 / 1024.0
        );
        for (name, addr) in [
            ("direct", reg.addr),
            ("regguard", rg.public),
            ("direct", reg.addr),
            ("regguard", rg.public),
        ] {
            let c0 = cpu_seconds(rg.proc.pid());
            let l = rt.block_on(load(addr, manifest_path, secs));
            println!(
                "quick: {name} {:.0} req/s p50 {:.2} p99 {:.2} regguard cpu {:.2}s",
                l.rps,
                l.p50_ms,
                l.p99_ms,
                cpu_seconds(rg.proc.pid()) - c0
            );
        }
        return;
    }
    {
        let front = Nginx::start("front.conf", reg.addr);
        let front_tls = Nginx::start_with("front.conf", reg.addr, tls_files);
        let tuned = Nginx::start("front-tuned.conf", reg.addr);
        let tuned_tls = Nginx::start_with("front-tuned.conf", reg.addr, tls_files);
        let rg = Regguard::start_with(&reg.url(), quiet.clone());
        let rg_tls = Regguard::start_with(&reg.url(), tls_opts.clone());
        // One process measured per target: the plain and TLS instances are separate processes,
        // so CPU is read from the plain one for plain runs; TLS runs read the TLS one below.
        let mut targets = vec![
            Target::new("direct", reg.addr, None, None),
            Target::new("nginx front", front.addr, None, Some(front.proc.pid())),
            Target::new("nginx tuned", tuned.addr, None, Some(tuned.proc.pid())),
            Target::new("regguard", rg.public, None, Some(rg.proc.pid())),
        ];
        let mut tls_targets = [
            Target::new(
                "nginx front",
                front_tls.addr,
                Some(front_tls.addr),
                Some(front_tls.proc.pid()),
            ),
            Target::new(
                "nginx tuned",
                tuned_tls.addr,
                Some(tuned_tls.addr),
                Some(tuned_tls.proc.pid()),
            ),
            Target::new(
                "regguard",
                rg_tls.public,
                Some(rg_tls.public),
                Some(rg_tls.proc.pid()),
            ),
        ];
        run_suite(
            &rt,
            &mut targets,
            &connector,
            (&blob_path, manifest_path),
            Some(reg.proc.pid()),
            rounds,
            secs,
        );
        // TLS: only the blob throughput and CPU (plain fields of these targets are unused).
        for _ in 0..rounds {
            for t in tls_targets.iter_mut() {
                let pid = t.pid.unwrap();
                let c0 = cpu_seconds(pid);
                let (n, s) = rt.block_on(fetch(t.tls.unwrap(), Some(&connector), &blob_path));
                assert_eq!(n, GIB);
                t.samples.tls_mibs.push(n as f64 / (1024.0 * 1024.0) / s);
                t.samples
                    .tls_cpu_per_gib
                    .push((cpu_seconds(pid) - c0) / (n as f64 / GIB as f64));
            }
        }
        for t in targets.iter_mut() {
            if let Some(tt) = tls_targets.iter_mut().find(|x| x.name == t.name) {
                t.samples.tls_mibs = std::mem::take(&mut tt.samples.tls_mibs);
                t.samples.tls_cpu_per_gib = std::mem::take(&mut tt.samples.tls_cpu_per_gib);
            }
        }

        // (d) 256 concurrent blob streams through regguard: peak RSS.
        let small_path = format!("/v2/bench/app/blobs/{small}");
        let before = rg.proc.peak_rss_kib();
        rt.block_on(async {
            let mut tasks = Vec::new();
            for _ in 0..STREAMS {
                let p = small_path.clone();
                let addr = rg.public;
                tasks.push(tokio::spawn(async move { fetch(addr, None, &p).await }));
            }
            for t in tasks {
                assert_eq!(t.await.unwrap().0, STREAM_BLOB);
            }
        });
        let peak = rg.proc.peak_rss_kib();

        println!("## regguard benchmark\n\nMachine: {}\n", machine());
        println!("Rounds: {rounds} (medians), load runs of {secs} s at {MANIFEST_CONNECTIONS} connections; access logs off on all proxies.");
        table(
            "Real registry upstream (1 GiB blob; manifest GET by tag)",
            &targets,
        );
        println!(
            "\nregguard peak RSS: {:.1} MiB before, {:.1} MiB after {STREAMS} concurrent {} MiB blob streams.",
            before as f64 / 1024.0,
            peak as f64 / 1024.0,
            STREAM_BLOB / 1024 / 1024
        );
    }

    validation_bench(&rt, &reg, &quiet, rounds, secs);
    gate_bench(&reg, &quiet, rounds);

    // (c) Minimal in-process upstream: the proxies' own ceiling. Its canned manifests do not
    // form a valid image, so validation is off here: this measures forwarding alone.
    let up = minimal_upstream(&upstream_rt, img.index.clone());
    let tuned = Nginx::start("front-tuned.conf", up);
    let tuned_tls = Nginx::start_with("front-tuned.conf", up, tls_files);
    let mut bare = quiet.clone();
    bare.env
        .push(("REGGUARD_VALIDATE_ENABLED".into(), "false".into()));
    let mut bare_tls = tls_opts.clone();
    bare_tls
        .env
        .push(("REGGUARD_VALIDATE_ENABLED".into(), "false".into()));
    let rg = Regguard::start_with(&format!("http://{up}"), bare);
    let rg_tls = Regguard::start_with(&format!("http://{up}"), bare_tls);
    let mut targets = vec![
        Target::new("direct", up, None, None),
        Target::new("nginx tuned", tuned.addr, None, Some(tuned.proc.pid())),
        Target::new("regguard", rg.public, None, Some(rg.proc.pid())),
    ];
    run_suite(
        &rt,
        &mut targets,
        &connector,
        ("/v2/min/blobs/sha256:x", manifest_path),
        None,
        rounds,
        secs,
    );
    for _ in 0..rounds {
        for (name, addr, pid) in [
            ("nginx tuned", tuned_tls.addr, tuned_tls.proc.pid()),
            ("regguard", rg_tls.public, rg_tls.proc.pid()),
        ] {
            let c0 = cpu_seconds(pid);
            let (n, s) = rt.block_on(fetch(addr, Some(&connector), "/v2/min/blobs/sha256:x"));
            let t = targets.iter_mut().find(|t| t.name == name).unwrap();
            t.samples.tls_mibs.push(n as f64 / (1024.0 * 1024.0) / s);
            t.samples
                .tls_cpu_per_gib
                .push((cpu_seconds(pid) - c0) / (n as f64 / GIB as f64));
        }
    }
    table(
        "Minimal in-process upstream (proxies' own ceiling)",
        &targets,
    );
}

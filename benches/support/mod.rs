//! Helpers both end-to-end benches use: settings from the environment, a process's CPU
//! time, the request they send, medians.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Empty;

use crate::common::oci::ACCEPT_ALL;

pub fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU seconds (user + system) of a process and all its children (nginx workers).
pub fn cpu_seconds(pid: u32) -> f64 {
    let tick = 100.0; // CLK_TCK on Linux x86_64 and arm64.
    let mut total = 0u64;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
        let this: u32 = entry.file_name().to_string_lossy().parse().unwrap_or(0);
        let ppid: u32 = fields[1].parse().unwrap_or(0);
        if this == pid || ppid == pid {
            total +=
                fields[11].parse::<u64>().unwrap_or(0) + fields[12].parse::<u64>().unwrap_or(0);
        }
    }
    total as f64 / tick
}

pub fn get_req(addr: SocketAddr, path: &str, accept: bool) -> hyper::Request<Empty<Bytes>> {
    let mut b = hyper::Request::get(path).header("host", addr.to_string());
    if accept {
        b = b.header("accept", ACCEPT_ALL);
    }
    b.body(Empty::new()).unwrap()
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

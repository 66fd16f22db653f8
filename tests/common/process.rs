//! Processes the tests start: stopped gracefully, found listening through
//! /proc, and checked to leave nothing behind.
//!
//! A background thread scans /proc every 50 ms and records every descendant of
//! every tracked process (PID, start time, command line), because a child whose
//! parent dies is reparented to init at once and can no longer be traced to it.
//! When a tracked process is stopped or reaped, a recorded descendant still
//! alive is killed and the test fails naming it. The bug this catches: nginx's
//! workers living on after their master was SIGKILLed.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long a process gets between SIGTERM and SIGKILL when a test drops it.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// How long descendants may take to follow their parent out. nginx's master usually exits
/// after its workers, but on a loaded 2-core machine a worker was seen still exiting 2 s
/// after its master: a poll, so a passing test does not wait for it.
const DESCENDANT_GRACE: Duration = Duration::from_secs(10);

/// One process seen in /proc. The start time tells a PID apart from a later reuse of it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ProcInfo {
    pub pid: u32,
    start: u64,
    pub cmdline: String,
}

impl ProcInfo {
    /// The process with this PID now, if there is one.
    pub fn of(pid: u32) -> Option<Self> {
        let st = read_stat(pid)?;
        Some(ProcInfo {
            pid,
            start: st.start,
            cmdline: cmdline(pid),
        })
    }

    /// Still running (not exited, not a zombie, and not a later process with the same PID).
    pub fn is_alive(&self) -> bool {
        read_stat(self.pid).is_some_and(|s| s.start == self.start && !matches!(s.state, 'Z' | 'X'))
    }
}

impl std::fmt::Display for ProcInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} `{}`", self.pid, self.cmdline)
    }
}

struct Stat {
    state: char,
    ppid: u32,
    start: u64,
}

/// Fields of /proc/PID/stat after the command name (which may hold spaces and parentheses).
fn read_stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = text.rsplit_once(')')?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(Stat {
        state: f.first()?.chars().next()?,
        ppid: f.get(1)?.parse().ok()?,
        // Field 22 of stat; field 3 (the state) is f[0].
        start: f.get(19)?.parse().ok()?,
    })
}

fn all_stats() -> BTreeMap<u32, Stat> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return BTreeMap::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| Some((pid, read_stat(pid)?)))
        .collect()
}

/// The command line of `pid`, arguments joined by spaces.
pub fn cmdline(pid: u32) -> String {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    String::from_utf8_lossy(&raw)
        .split('\0')
        .filter(|a| !a.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// TCP sockets in LISTEN state that `pid` holds open, from /proc/PID/fd and /proc/PID/net/tcp{,6}.
pub fn listening_addrs(pid: u32) -> Vec<SocketAddr> {
    let inodes: BTreeSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.filter_map(|e| {
                let target = std::fs::read_link(e.ok()?.path()).ok()?;
                let t = target.to_str()?;
                t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
            })
            .collect()
        })
        .unwrap_or_default();
    let mut out = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let (Some(local), Some(state), Some(inode)) = (f.get(1), f.get(3), f.get(9)) else {
                continue;
            };
            if *state != "0A" || !inode.parse().is_ok_and(|i: u64| inodes.contains(&i)) {
                continue;
            }
            if let Some(addr) = parse_proc_addr(local) {
                out.push(addr);
            }
        }
    }
    out
}

/// `0100007F:1F90` (IPv4) or 32 hex digits and a port (IPv6): each 32-bit word is printed
/// in the host's byte order, the port in hex.
fn parse_proc_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        Some(
            u32::from_str_radix(ip.get(i * 8..i * 8 + 8)?, 16)
                .ok()?
                .to_ne_bytes(),
        )
    };
    match ip.len() {
        8 => Some(SocketAddr::from((Ipv4Addr::from(word(0)?), port))),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            Some(SocketAddr::from((Ipv6Addr::from(b), port)))
        }
        _ => None,
    }
}

/// Descendants recorded per tracked root PID.
struct Tracker {
    trees: Mutex<BTreeMap<u32, Tree>>,
}

struct Tree {
    root_start: u64,
    seen: BTreeSet<ProcInfo>,
}

fn tracker() -> &'static Tracker {
    static T: OnceLock<Tracker> = OnceLock::new();
    T.get_or_init(|| {
        std::thread::Builder::new()
            .name("proc-tracker".into())
            .spawn(|| loop {
                std::thread::sleep(Duration::from_millis(50));
                tracker().scan();
            })
            .expect("start the process tracker thread");
        Tracker {
            trees: Mutex::new(BTreeMap::new()),
        }
    })
}

impl Tracker {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u32, Tree>> {
        // A test that panicked while holding the lock leaves the map usable.
        self.trees.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn track(&self, pid: u32) {
        if let Some(st) = read_stat(pid) {
            self.lock().insert(
                pid,
                Tree {
                    root_start: st.start,
                    seen: BTreeSet::new(),
                },
            );
        }
    }

    /// Records every live process descending from a live tracked root.
    fn scan(&self) {
        let mut trees = self.lock();
        if trees.is_empty() {
            return;
        }
        let stats = all_stats();
        let is_same = |pid: u32, start: u64| stats.get(&pid).is_some_and(|s| s.start == start);
        for (root, tree) in trees.iter_mut() {
            let mut parents: BTreeSet<u32> = BTreeSet::new();
            if is_same(*root, tree.root_start) {
                parents.insert(*root);
            }
            parents.extend(
                tree.seen
                    .iter()
                    .filter(|p| is_same(p.pid, p.start))
                    .map(|p| p.pid),
            );
            if parents.is_empty() {
                continue;
            }
            loop {
                let new: Vec<(u32, u64)> = stats
                    .iter()
                    .filter(|(pid, s)| parents.contains(&s.ppid) && !parents.contains(pid))
                    .map(|(pid, s)| (*pid, s.start))
                    .collect();
                if new.is_empty() {
                    break;
                }
                for (pid, start) in new {
                    parents.insert(pid);
                    if !tree.seen.iter().any(|p| p.pid == pid && p.start == start) {
                        tree.seen.insert(ProcInfo {
                            pid,
                            start,
                            cmdline: cmdline(pid),
                        });
                    }
                }
            }
        }
    }

    fn descendants(&self, root: u32) -> Vec<ProcInfo> {
        self.scan();
        self.lock()
            .get(&root)
            // The command line is read now: one recorded when the process was first seen
            // may predate its retitling (an nginx worker carries its master's title at first).
            .map(|t| {
                t.seen
                    .iter()
                    .filter(|p| p.is_alive())
                    .map(|p| ProcInfo {
                        cmdline: cmdline(p.pid),
                        ..p.clone()
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn untrack(&self, root: u32) -> Vec<ProcInfo> {
        self.lock()
            .remove(&root)
            .map(|t| t.seen.into_iter().collect())
            .unwrap_or_default()
    }
}

/// After `root` has exited and been reaped: fails the test (or, while already unwinding, reports)
/// if any process it started is still running, after killing them.
fn check_no_survivors(root: u32, what: &str) {
    let deadline = Instant::now() + DESCENDANT_GRACE;
    let mut alive: Vec<ProcInfo> = tracker()
        .untrack(root)
        .into_iter()
        .filter(ProcInfo::is_alive)
        .collect();
    while !alive.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        alive.retain(ProcInfo::is_alive);
    }
    if alive.is_empty() {
        return;
    }
    for p in &alive {
        if p.is_alive() {
            let _ = Command::new("kill")
                .args(["-KILL", &p.pid.to_string()])
                .status();
        }
    }
    // SIGKILL is delivered asynchronously: see them gone before the test moves on.
    let deadline = Instant::now() + DESCENDANT_GRACE;
    while alive.iter().any(ProcInfo::is_alive) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let list: Vec<String> = alive.iter().map(ToString::to_string).collect();
    let msg = format!(
        "processes started by {what} (pid {root}) outlived it (now killed): {}",
        list.join(", ")
    );
    if std::thread::panicking() {
        eprintln!("{msg}");
    } else {
        panic!("{msg}");
    }
}

/// A child process of the test. Dropping it stops it (SIGTERM, then SIGKILL after
/// [`STOP_GRACE`]) and fails the test if a process it started lives on.
pub struct Proc {
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    /// Wraps a started child; its descendants are recorded from now on.
    pub fn adopt(child: Child, log: PathBuf) -> Self {
        tracker().track(child.id());
        Proc {
            child: Some(child),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("process still owned").id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a signal by PID with kill(1).
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([format!("-{sig}"), self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} failed");
    }

    /// The processes it started that are running now.
    pub fn descendants(&self) -> Vec<ProcInfo> {
        tracker().descendants(self.pid())
    }

    /// TCP addresses it listens on now.
    pub fn listening(&self) -> Vec<SocketAddr> {
        listening_addrs(self.pid())
    }

    /// If it has exited: reaps it, checks that nothing it started lives on, and returns
    /// its status. `None` while it runs.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let status = child.try_wait().ok()??;
        let pid = child.id();
        self.child = None;
        check_no_survivors(pid, &self.what());
        Some(status)
    }

    /// Waits for the process to exit and returns its exit code; then checks that nothing it
    /// started lives on.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        assert!(self.child.is_some(), "process still owned");
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.try_exit() {
                return status.code();
            }
            if Instant::now() > deadline {
                panic!("process did not exit within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops it: SIGTERM, then SIGKILL after [`STOP_GRACE`].
    pub fn stop(&mut self) {
        self.stop_with("TERM", STOP_GRACE);
    }

    /// Stops it with `sig` (e.g. "QUIT" for nginx's graceful stop), SIGKILL after `grace`;
    /// then fails the test if a process it started is still running.
    pub fn stop_with(&mut self, sig: &str, grace: Duration) {
        let Some(child) = self.child.as_mut() else {
            return;
        };
        let pid = child.id();
        // The last look at its children before it can no longer be traced to them.
        tracker().scan();
        if matches!(child.try_wait(), Ok(None)) {
            let _ = Command::new("kill")
                .args([format!("-{sig}"), pid.to_string()])
                .status();
            let deadline = Instant::now() + grace;
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
            }
        }
        let _ = child.wait();
        let what = self.what();
        self.child = None;
        check_no_survivors(pid, &what);
    }

    /// Peak resident set size (VmHWM) in KiB, from /proc.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/<pid>/status")
    }

    fn what(&self) -> String {
        self.log.file_stem().map_or_else(
            || "a test process".into(),
            |s| s.to_string_lossy().into_owned(),
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

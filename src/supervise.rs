//! Supervision of regguard's long-running background tasks (the validation
//! dispatcher, the re-check loop, the scan): a task that ends or panics is
//! logged, restarted after a backoff, and visible while it is down (`/readyz`
//! fails naming it; `regguard_background_task_up{task}` is 0 and
//! `regguard_background_task_restarts_total{task}` counts). Knows nothing about
//! what the tasks do.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};

/// Where work handed over by the request path runs: the runtime that was current when the
/// component was built (the main runtime, in `server::serve`), not the serving thread that
/// happens to hand it over. A serving thread's runtime is single-threaded; a vault write or
/// a re-check spawned there would wait behind the connections it serves (and a layer copy
/// fall behind the pull it copies).
#[derive(Debug, Clone)]
pub struct Background(Option<tokio::runtime::Handle>);

impl Background {
    /// The runtime current now (none outside a runtime: then each spawn uses its caller's).
    pub fn here() -> Self {
        Background(tokio::runtime::Handle::try_current().ok())
    }

    /// Runs `task` on that runtime.
    pub fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match &self.0 {
            Some(handle) => handle.spawn(task),
            None => tokio::spawn(task),
        }
    }
}

/// First wait before a restart; doubled per consecutive failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// A task that keeps dying is retried at this pace, never faster.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A task that ran this long before ending starts its backoff afresh.
const STABLE_AFTER: Duration = Duration::from_secs(60);

/// One supervised task's state, read by `/readyz`.
struct Task {
    name: &'static str,
    up: AtomicBool,
}

/// The supervisor: its tasks and their metrics.
pub struct Supervisor {
    tasks: Mutex<Vec<Arc<Task>>>,
    up: IntGaugeVec,
    restarts: IntCounterVec,
    panics: IntCounterVec,
}

impl Supervisor {
    pub fn new(registry: &Registry) -> Result<Arc<Self>, prometheus::Error> {
        let up = IntGaugeVec::new(
            Opts::new(
                "regguard_background_task_up",
                "1 while a background task (dispatcher, recheck, scan) runs; 0 while it waits to be restarted",
            ),
            &["task"],
        )?;
        registry.register(Box::new(up.clone()))?;
        let restarts = IntCounterVec::new(
            Opts::new(
                "regguard_background_task_restarts_total",
                "Background tasks restarted after they ended or panicked",
            ),
            &["task"],
        )?;
        registry.register(Box::new(restarts.clone()))?;
        let panics = IntCounterVec::new(
            Opts::new(
                "regguard_background_panics_total",
                "Panics caught in background work (a task, or one validation job)",
            ),
            &["task"],
        )?;
        registry.register(Box::new(panics.clone()))?;
        Ok(Arc::new(Supervisor {
            tasks: Mutex::new(Vec::new()),
            up,
            restarts,
            panics,
        }))
    }

    /// Runs `make()` as a task for the life of the process, restarting it whenever it
    /// ends or panics.
    pub fn spawn<F, Fut>(self: &Arc<Self>, name: &'static str, make: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let task = Arc::new(Task {
            name,
            up: AtomicBool::new(true),
        });
        if let Ok(mut tasks) = self.tasks.lock() {
            tasks.push(task.clone());
        }
        let gauge = self.up.with_label_values(&[name]);
        let restarts = self.restarts.with_label_values(&[name]);
        let panics = self.panics.with_label_values(&[name]);
        tokio::spawn(async move {
            let mut backoff = FIRST_BACKOFF;
            loop {
                gauge.set(1);
                task.up.store(true, Ordering::Relaxed);
                let started = tokio::time::Instant::now();
                let ended = tokio::spawn(make()).await;
                task.up.store(false, Ordering::Relaxed);
                gauge.set(0);
                match ended {
                    Ok(()) => tracing::error!(task = name, "background task ended; restarting"),
                    Err(e) if e.is_panic() => {
                        panics.inc();
                        tracing::error!(task = name, error = %e, "background task panicked; restarting");
                    }
                    // Cancelled: the runtime is shutting down.
                    Err(_) => return,
                }
                if started.elapsed() >= STABLE_AFTER {
                    backoff = FIRST_BACKOFF;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                restarts.inc();
            }
        });
    }

    /// Counts a panic caught in one unit of background work (not a whole task).
    pub fn panicked(&self, name: &str) {
        self.panics.with_label_values(&[name]).inc();
    }

    /// The names of the tasks that are down now.
    pub fn down(&self) -> Vec<&'static str> {
        self.tasks
            .lock()
            .map(|tasks| {
                tasks
                    .iter()
                    .filter(|t| !t.up.load(Ordering::Relaxed))
                    .map(|t| t.name)
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    async fn until(what: &str, mut f: impl FnMut() -> bool) {
        for _ in 0..1000 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{what} did not happen within 10 s");
    }

    #[tokio::test]
    async fn a_task_that_panics_is_restarted_and_shown_down_meanwhile() {
        let registry = Registry::new();
        let sup = Supervisor::new(&registry).unwrap();
        let runs = Arc::new(AtomicUsize::new(0));
        let r = runs.clone();
        sup.spawn("flaky", move || {
            let r = r.clone();
            async move {
                if r.fetch_add(1, Ordering::SeqCst) == 0 {
                    panic!("first run fails");
                }
                std::future::pending::<()>().await;
            }
        });
        // The first run panics: the task is down during its backoff, then runs again.
        until("the task shown down", || sup.down() == vec!["flaky"]).await;
        until("the task restarted", || runs.load(Ordering::SeqCst) == 2).await;
        until("the task shown up", || sup.down().is_empty()).await;
        assert_eq!(sup.restarts.with_label_values(&["flaky"]).get(), 1);
        assert_eq!(sup.panics.with_label_values(&["flaky"]).get(), 1);
    }
}

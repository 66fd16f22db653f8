//! Prometheus metrics of the forwarding path.
//!
//! Every labelled handle is looked up once, here, at start-up: the request path
//! only indexes into vectors of ready counters. Label sets are bounded (method,
//! route kind, status class, error kind); no repository names.
//!
//! Features declare their own label sets with `labels!` and register their own
//! counters; this module knows none of them, only the forwarding path's.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::route::RouteKind;

/// Methods with their own label; anything else counts as `other`.
const METHODS: [&str; 8] = [
    "GET", "HEAD", "PUT", "POST", "PATCH", "DELETE", "OPTIONS", "other",
];
/// Status classes; `none` is a request that ended before any status was sent (client gone).
const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "none"];

/// A closed set of values of one metric label: an enum whose every value is a series,
/// registered at start-up. A value outside the set cannot be written, so nothing is
/// silently dropped. Declare one with `labels!`.
pub trait Label: Copy + 'static {
    /// Every value, in declaration order: a value's position here is its [`Label::index`].
    const ALL: &'static [Self];
    /// The label value as exported, and as serialised where the value travels as JSON.
    fn as_str(self) -> &'static str;
    /// The position of this value in [`Label::ALL`].
    fn index(self) -> usize;
}

/// Declares a fieldless enum as a [`Label`]: each variant with the string it is exported
/// (and serialised, and displayed) as. That string is written here and nowhere else.
macro_rules! labels {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident => $text:literal ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant ),+
        }

        impl $crate::metrics::Label for $name {
            const ALL: &'static [Self] = &[$($name::$variant),+];

            fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }

            fn index(self) -> usize {
                // Fieldless, default discriminants: 0, 1, … in declaration order, as in ALL.
                self as usize
            }
        }

        impl $name {
            /// The label value, as exported and serialised.
            pub fn as_str(self) -> &'static str {
                $crate::metrics::Label::as_str(self)
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl ::serde::Serialize for $name {
            fn serialize<S: ::serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
    };
}
pub(crate) use labels;

labels! {
    /// Forwarding failures by kind: the `kind` label of `regguard_upstream_errors_total`.
    pub enum ErrorKind {
        /// The upstream could not be connected to, or its TLS handshake failed.
        Unreachable => "unreachable",
        /// The upstream did not connect or answer in time.
        Timeout => "timeout",
        /// The client went away or broke its request body.
        ClientAborted => "client_aborted",
        /// The upstream's response body failed part way.
        UpstreamBody => "upstream_body",
        /// A body went silent for longer than `idle_timeout`.
        IdleTimeout => "idle_timeout",
    }
}

/// One counter per value of a single label, registered and looked up once.
/// `inc` indexes by the value's position: no hashing, no lock, no string compare.
pub struct CounterSet<L: Label> {
    counters: Vec<IntCounter>,
    label: std::marker::PhantomData<L>,
}

impl<L: Label> CounterSet<L> {
    /// Registers `name{label}` with every value of `L` present from the start (at 0).
    pub fn new(
        registry: &Registry,
        name: &str,
        help: &str,
        label: &str,
    ) -> Result<Self, prometheus::Error> {
        let vec = registered(
            registry,
            IntCounterVec::new(Opts::new(name, help), &[label])?,
        )?;
        let counters = L::ALL
            .iter()
            .map(|v| vec.get_metric_with_label_values(&[v.as_str()]))
            .collect::<Result<_, _>>()?;
        Ok(CounterSet {
            counters,
            label: std::marker::PhantomData,
        })
    }

    /// Counts one under `value`.
    pub fn inc(&self, value: L) {
        // Every value was registered in `new`: the lookup cannot miss.
        if let Some(c) = self.counters.get(value.index()) {
            c.inc();
        }
    }

    /// The current count under `value`.
    pub fn get(&self, value: L) -> u64 {
        self.counters.get(value.index()).map_or(0, |c| c.get())
    }
}

/// Index of a method in the `method` label set.
pub fn method_index(method: &http::Method) -> usize {
    METHODS
        .iter()
        .position(|m| *m == method.as_str())
        .unwrap_or(METHODS.len() - 1)
}

/// Index of a status in the `status_class` label set.
pub fn class_index(status: Option<http::StatusCode>) -> usize {
    match status {
        Some(s) => usize::from((s.as_u16() / 100).clamp(1, 5)) - 1,
        None => CLASSES.len() - 1,
    }
}

/// The proxy's metrics, registered in their own registry.
pub struct Metrics {
    registry: Registry,
    requests: Vec<IntCounter>,
    latency: Vec<Histogram>,
    bytes_in: Vec<IntCounter>,
    bytes_out: Vec<IntCounter>,
    upstream_errors: CounterSet<ErrorKind>,
    /// Client connections currently open, by listener (`public`).
    pub connections_open: IntGauge,
    /// Client connections accepted since start.
    pub connections_total: IntCounter,
    /// TLS handshakes that failed or timed out.
    pub tls_handshake_failures: IntCounter,
    /// Connections refused because `max_connections` were open.
    pub connections_refused: IntCounter,
    /// Failed `accept` calls on the public listener.
    pub accept_errors: IntCounter,
    /// Failed `accept` calls on the admin listener.
    pub admin_accept_errors: IntCounter,
    /// Connections closed for want of a request (`header_read_timeout`).
    pub connections_idle_closed: IntCounter,
    /// Connections cut because the client stopped reading (`idle_timeout`).
    pub connections_write_stalled: IntCounter,
}

fn registered<T: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    c: T,
) -> Result<T, prometheus::Error> {
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let requests = registered(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "regguard_requests_total",
                    "Client requests by method, route kind and response status class",
                ),
                &["method", "route", "status_class"],
            )?,
        )?;
        let latency = registered(
            &registry,
            prometheus::HistogramVec::new(
                HistogramOpts::new(
                    "regguard_response_header_seconds",
                    "Time from request arrival to response headers, by route kind",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0,
                ]),
                &["route"],
            )?,
        )?;
        let bytes_in = registered(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "regguard_request_body_bytes_total",
                    "Request body bytes received from clients and forwarded, by route kind",
                ),
                &["route"],
            )?,
        )?;
        let bytes_out = registered(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "regguard_response_body_bytes_total",
                    "Response body bytes sent to clients, by route kind",
                ),
                &["route"],
            )?,
        )?;
        let upstream_errors = CounterSet::new(
            &registry,
            "regguard_upstream_errors_total",
            "Forwarding failures by kind (unreachable, timeout, client_aborted, upstream_body, idle_timeout)",
            "kind",
        )?;
        let connections = registered(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "regguard_client_connections",
                    "Client connections currently open (accepted, TLS handshakes included)",
                ),
                &["listener"],
            )?,
        )?;
        let connections_total = registered(
            &registry,
            IntCounter::new(
                "regguard_client_connections_total",
                "Client connections accepted since start",
            )?,
        )?;
        let tls_handshake_failures = registered(
            &registry,
            IntCounter::new(
                "regguard_tls_handshake_failures_total",
                "TLS handshakes that failed or timed out",
            )?,
        )?;
        let connections_refused = registered(
            &registry,
            IntCounter::new(
                "regguard_client_connections_refused_total",
                "Client connections refused because max_connections were open",
            )?,
        )?;
        let accept_errors = registered(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "regguard_accept_errors_total",
                    "Failed accept calls (for example out of file descriptors), by listener",
                ),
                &["listener"],
            )?,
        )?;
        let timeouts = registered(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "regguard_client_connection_timeouts_total",
                    "Client connections closed by a deadline: idle (no request for header_read_timeout) or write_stall (client not reading for idle_timeout)",
                ),
                &["reason"],
            )?,
        )?;
        let build_info = registered(
            &registry,
            IntGaugeVec::new(
                Opts::new("regguard_build_info", "regguard version; always 1"),
                &["version"],
            )?,
        )?;
        build_info.with_label_values(&[crate::VERSION]).set(1);

        let mut request_handles =
            Vec::with_capacity(METHODS.len() * RouteKind::ALL.len() * CLASSES.len());
        for m in METHODS {
            for r in RouteKind::ALL {
                for c in CLASSES {
                    request_handles.push(requests.get_metric_with_label_values(&[
                        m,
                        r.as_str(),
                        c,
                    ])?);
                }
            }
        }
        let per_route = |vec: &IntCounterVec| -> Result<Vec<IntCounter>, prometheus::Error> {
            RouteKind::ALL
                .iter()
                .map(|r| vec.get_metric_with_label_values(&[r.as_str()]))
                .collect()
        };
        Ok(Metrics {
            requests: request_handles,
            latency: RouteKind::ALL
                .iter()
                .map(|r| latency.get_metric_with_label_values(&[r.as_str()]))
                .collect::<Result<_, _>>()?,
            bytes_in: per_route(&bytes_in)?,
            bytes_out: per_route(&bytes_out)?,
            upstream_errors,
            connections_open: connections.get_metric_with_label_values(&["public"])?,
            connections_total,
            tls_handshake_failures,
            connections_refused,
            accept_errors: accept_errors.get_metric_with_label_values(&["public"])?,
            admin_accept_errors: accept_errors.get_metric_with_label_values(&["admin"])?,
            connections_idle_closed: timeouts.get_metric_with_label_values(&["idle"])?,
            connections_write_stalled: timeouts.get_metric_with_label_values(&["write_stall"])?,
            registry,
        })
    }

    /// Counts one finished exchange.
    pub fn observe_exchange(
        &self,
        method: usize,
        route: RouteKind,
        status: Option<http::StatusCode>,
        bytes_in: u64,
        bytes_out: u64,
    ) {
        let idx =
            (method * RouteKind::ALL.len() + route.index()) * CLASSES.len() + class_index(status);
        if let Some(c) = self.requests.get(idx) {
            c.inc();
        }
        if let Some(c) = self.bytes_in.get(route.index()) {
            c.inc_by(bytes_in);
        }
        if let Some(c) = self.bytes_out.get(route.index()) {
            c.inc_by(bytes_out);
        }
    }

    /// Records the time to response headers.
    pub fn observe_header_latency(&self, route: RouteKind, seconds: f64) {
        if let Some(h) = self.latency.get(route.index()) {
            h.observe(seconds);
        }
    }

    /// Counts a forwarding failure of the given kind.
    pub fn upstream_error(&self, kind: ErrorKind) {
        self.upstream_errors.inc(kind);
    }

    /// The registry, for callers (later subsystems) that add their own metrics.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Renders the Prometheus text exposition.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec cannot fail on I/O; a failure would be a malformed metric family.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exchange_counts_land_in_the_right_series() {
        let m = Metrics::new().unwrap();
        m.observe_exchange(
            method_index(&http::Method::PATCH),
            RouteKind::Upload,
            Some(http::StatusCode::ACCEPTED),
            10,
            0,
        );
        m.observe_exchange(
            method_index(&http::Method::from_bytes(b"PROPFIND").unwrap()),
            RouteKind::Other,
            None,
            0,
            0,
        );
        let text = String::from_utf8(m.render()).unwrap();
        assert!(text.contains(
            "regguard_requests_total{method=\"PATCH\",route=\"upload\",status_class=\"2xx\"} 1"
        ));
        assert!(text.contains(
            "regguard_requests_total{method=\"other\",route=\"other\",status_class=\"none\"} 1"
        ));
        assert!(text.contains("regguard_request_body_bytes_total{route=\"upload\"} 10"));
    }

    labels! {
        enum TestResult {
            Ok => "ok",
            Bad => "bad",
        }
    }

    #[test]
    fn counter_set_counts_each_value_and_registers_all_at_zero() {
        // An unknown value used to be ignored here; now it cannot be written at all.
        let reg = Registry::new();
        let set: CounterSet<TestResult> = CounterSet::new(&reg, "t_total", "t", "result").unwrap();
        set.inc(TestResult::Bad);
        set.inc(TestResult::Bad);
        assert_eq!((set.get(TestResult::Ok), set.get(TestResult::Bad)), (0, 2));
        let mut out = Vec::new();
        TextEncoder::new().encode(&reg.gather(), &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("t_total{result=\"ok\"} 0"), "{text}");
        assert!(text.contains("t_total{result=\"bad\"} 2"), "{text}");
    }

    #[test]
    fn label_positions_follow_declaration_order() {
        for (i, k) in ErrorKind::ALL.iter().enumerate() {
            assert_eq!(k.index(), i);
        }
        assert_eq!(ErrorKind::ClientAborted.to_string(), "client_aborted");
        assert_eq!(
            serde_json::to_string(&ErrorKind::UpstreamBody).unwrap(),
            "\"upstream_body\""
        );
    }

    #[test]
    fn status_classes() {
        assert_eq!(class_index(Some(http::StatusCode::CONTINUE)), 0);
        assert_eq!(class_index(Some(http::StatusCode::NOT_FOUND)), 3);
        assert_eq!(class_index(Some(http::StatusCode::BAD_GATEWAY)), 4);
        assert_eq!(class_index(None), 5);
    }
}

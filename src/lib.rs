//! regguard: a streaming reverse proxy in front of a Docker/OCI registry.
//!
//! The request path is a short sequence of phases over one per-request context
//! (see `proxy`): classify the route, forward to the upstream with the header
//! rewrites the nginx front did, stream the response back, then log and count
//! when the exchange ends. Modules are named after what they own.
//!
//! Dependencies point one way: vocabulary (`oci`, `route`, `error`, `metrics`) below
//! `config`, below `upstream`, below the checker and the integrity state, below the features
//! (`validate`, `gate`, `scan`, `inspect`), below `proxy`, `server` and `cli`. A lower module
//! never names a type of a higher one; events travel up through hooks.
#![forbid(unsafe_code)]
// Parsers here read what clients and the registry send: an index or a slice that can
// panic is a way to stop the proxy. Use `get`, `split_once`, iterators.
#![deny(clippy::indexing_slicing, clippy::string_slice)]

pub mod admin;
pub mod body;
pub mod budget;
pub mod checker;
pub mod cli;
pub mod config;
pub mod conn;
pub mod error;
pub mod gate;
pub mod gojson;
pub mod h1;
pub mod heal;
pub mod inspect;
pub mod integrity;
pub mod metrics;
pub mod oci;
pub mod proxy;
pub mod route;
pub mod scan;
pub mod server;
pub mod supervise;
pub mod tls;
pub mod upstream;
pub mod validate;
pub mod vault;
pub mod watch;

/// The version string reported by `--version`, `/metrics` and the upstream User-Agent.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

//! The request and response head rewrites of the forwarding path: what the nginx
//! front's `proxy_set_header` lines did, minus its weaknesses, and RFC 9110's
//! hop-by-hop fields. Pure functions over header maps.
//!
//! They know nothing of routes, bodies or validation.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use super::ConnInfo;
use crate::config::Upstream;

static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static FORWARDED: HeaderName = HeaderName::from_static("forwarded");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// The hop-by-hop fields of RFC 9110 §7.6.1 that are always removed.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TE
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name == KEEP_ALIVE
        || name == PROXY_CONNECTION
}

/// Removes the hop-by-hop fields of RFC 9110 §7.6.1: those named by `Connection`,
/// and `Connection`, `Proxy-Connection`, `Keep-Alive`, `TE`, `Transfer-Encoding`, `Upgrade`.
/// Framing is hyper's job on each side (chunked or Content-Length as the body says).
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names first: most heads carry none of these, and every `remove`
    // hashes its name (six of them cost more than the scan).
    if headers.keys().any(is_hop_by_hop) {
        remove_named_hop_by_hop(headers);
    }
}

fn remove_named_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
        headers.remove(header::CONNECTION);
    }
    for name in [
        &PROXY_CONNECTION,
        &KEEP_ALIVE,
        &header::TE,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
    ] {
        headers.remove(name);
    }
}

/// Request fields a client may not forward: `Expect` (hyper's server has already answered
/// `100 Continue` when it started reading the body) and the forwarding hosts.
fn is_dropped_request_field(name: &HeaderName) -> bool {
    name == header::EXPECT || name == X_FORWARDED_HOST || name == FORWARDED
}

/// The peer address as a header value. IPv4 (the common case) is written digit by digit:
/// `Display` goes through the formatting machinery, a measurable part of a manifest request.
fn ip_value(ip: IpAddr) -> Option<HeaderValue> {
    let text = match ip {
        IpAddr::V4(v4) => {
            let mut s = String::with_capacity(15);
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    s.push('.');
                }
                if octet >= 100 {
                    s.push(char::from(b'0' + octet / 100));
                }
                if octet >= 10 {
                    s.push(char::from(b'0' + octet / 10 % 10));
                }
                s.push(char::from(b'0' + octet % 10));
            }
            s
        }
        IpAddr::V6(_) => ip.to_string(),
    };
    HeaderValue::try_from(text).ok()
}

/// Rewrites a client's request head for the upstream, as the nginx front's
/// `proxy_set_header` lines did, minus its weakness: a client may not choose the
/// host the registry writes into `Location` (X-Forwarded-Host, Forwarded).
pub fn rewrite_request_headers(
    headers: &mut HeaderMap,
    authority: Option<&http::uri::Authority>,
    conn: ConnInfo,
    upstream: &Upstream,
) {
    let (mut hop, mut dropped) = (false, false);
    for name in headers.keys() {
        hop |= is_hop_by_hop(name);
        dropped |= is_dropped_request_field(name);
    }
    if hop {
        remove_named_hop_by_hop(headers);
    }
    if dropped {
        headers.remove(header::EXPECT);
        headers.remove(&X_FORWARDED_HOST);
        headers.remove(&FORWARDED);
    }
    Forwarding::of(headers, authority, conn, upstream).insert_into(headers);
}

/// The fields regguard sets on a forwarded request (Host when the client sent none, and
/// X-Forwarded-For, X-Real-IP, X-Forwarded-Proto), decided once from the client's head.
/// They go either into the header map (see [`rewrite_request_headers`]) or, for the lean
/// client, straight into the request head it writes (see [`Forwarding::encode`]): one
/// policy, two ways out.
pub struct Forwarding {
    host: Option<HeaderValue>,
    forwarded_for: Option<HeaderValue>,
    real_ip: Option<HeaderValue>,
    proto: HeaderValue,
}

impl Forwarding {
    /// What to set, given the client's head (after hop-by-hop removal, if any).
    pub fn of(
        headers: &HeaderMap,
        authority: Option<&http::uri::Authority>,
        conn: ConnInfo,
        upstream: &Upstream,
    ) -> Self {
        // Host with its port (nginx's `Host $http_host`). HTTP/2 clients send :authority instead.
        let host = (!headers.contains_key(header::HOST)).then(|| {
            authority
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
                .unwrap_or_else(|| upstream.host_header.clone())
        });
        let ip = ip_value(conn.remote.ip());
        // Only a trusted peer's say is read (and so looked up) at all.
        let forwarded_proto = conn
            .trusted
            .then(|| headers.get(&X_FORWARDED_PROTO))
            .flatten()
            .filter(|v| *v == "https" || *v == "http")
            .cloned();
        let real_ip = conn
            .trusted
            .then(|| headers.get(&X_REAL_IP))
            .flatten()
            .cloned()
            .or_else(|| ip.clone());
        // nginx's $proxy_add_x_forwarded_for: the client's list, then the peer address.
        let mut xff = String::new();
        for v in headers.get_all(&X_FORWARDED_FOR) {
            if let Ok(s) = v.to_str() {
                if !s.trim().is_empty() {
                    xff.push_str(s.trim());
                    xff.push_str(", ");
                }
            }
        }
        let forwarded_for = if xff.is_empty() {
            ip
        } else {
            xff.push_str(&conn.remote.ip().to_string());
            HeaderValue::from_str(&xff).ok()
        };
        let proto = forwarded_proto
            .unwrap_or_else(|| HeaderValue::from_static(if conn.tls { "https" } else { "http" }));
        Forwarding {
            host,
            forwarded_for,
            real_ip,
            proto,
        }
    }

    fn insert_into(self, headers: &mut HeaderMap) {
        if let Some(host) = self.host {
            headers.insert(header::HOST, host);
        }
        if let Some(v) = self.forwarded_for {
            headers.insert(&X_FORWARDED_FOR, v);
        }
        if let Some(v) = self.real_ip {
            headers.insert(&X_REAL_IP, v);
        }
        headers.insert(&X_FORWARDED_PROTO, self.proto);
    }

    /// Writes the upstream request head for the lean client: the request line, the
    /// client's fields but those [`rewrite_request_headers`] removes or replaces, then
    /// these. The same head as rewriting the map and writing it out (a unit test holds the
    /// two to that), without changing the map, once [`remove_hop_by_hop`] has removed the
    /// fields a `Connection` field names.
    pub fn encode(
        &self,
        method: &http::Method,
        path_and_query: &str,
        headers: &HeaderMap,
        out: &mut bytes::BytesMut,
    ) {
        let field = |out: &mut bytes::BytesMut, name: &HeaderName, value: &HeaderValue| {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        };
        out.extend_from_slice(method.as_str().as_bytes());
        out.extend_from_slice(b" ");
        out.extend_from_slice(path_and_query.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        for (name, value) in headers {
            let replaced =
                name == X_FORWARDED_FOR || name == X_REAL_IP || name == X_FORWARDED_PROTO;
            if !replaced && !is_hop_by_hop(name) && !is_dropped_request_field(name) {
                field(out, name, value);
            }
        }
        if let Some(host) = &self.host {
            field(out, &header::HOST, host);
        }
        if let Some(v) = &self.forwarded_for {
            field(out, &X_FORWARDED_FOR, v);
        }
        if let Some(v) = &self.real_ip {
            field(out, &X_REAL_IP, v);
        }
        field(out, &X_FORWARDED_PROTO, &self.proto);
        out.extend_from_slice(b"\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(tls: bool) -> ConnInfo {
        ConnInfo {
            remote: "10.1.2.3:4444".parse().unwrap(),
            tls,
            trusted: false,
        }
    }

    /// The lean client's head and the rewritten map, written out, carry the same fields
    /// (as multisets: the map keeps a replaced field where it was, the encoder appends it).
    #[test]
    fn encoding_a_head_for_the_lean_client_sends_what_rewriting_the_map_sends() {
        let fields: &[(&str, &str)] = &[
            ("host", "registry.example:5050"),
            ("accept", "application/vnd.oci.image.index.v1+json"),
            (
                "accept",
                "application/vnd.docker.distribution.manifest.v2+json",
            ),
            ("authorization", "Bearer t"),
            ("x-forwarded-for", "192.0.2.1"),
            ("x-forwarded-for", "192.0.2.2, 192.0.2.3"),
            ("x-real-ip", "192.0.2.9"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "evil.example"),
            ("forwarded", "host=evil.example"),
            ("expect", "100-continue"),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("user-agent", "containerd/2.0"),
            ("connection", "x-debug, keep-alive"),
            ("x-debug", "1"),
            ("connection", "host"),
        ];
        let upstream = Upstream::parse("http://registry-private:5000").unwrap();
        let authority: http::uri::Authority = "front.example:5050".parse().unwrap();
        // 2,000 pseudo-random subsets of the fields (a fixed LCG, so every run the same),
        // with each peer kind.
        let mut state: u64 = 1;
        for step in 0..2000u64 {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let mask = state >> 40;
            let mut headers = HeaderMap::new();
            for (i, (n, v)) in fields.iter().enumerate() {
                if mask >> i & 1 == 1 {
                    headers.append(HeaderName::from_static(n), HeaderValue::from_static(v));
                }
            }
            let peer = ConnInfo {
                remote: "10.1.2.3:4444".parse().unwrap(),
                tls: step % 2 == 0,
                trusted: step % 3 == 0,
            };
            let authority = (step % 5 == 0).then_some(&authority);

            let mut encoded = bytes::BytesMut::new();
            let mut without_hop = headers.clone();
            remove_hop_by_hop(&mut without_hop);
            Forwarding::of(&without_hop, authority, peer, &upstream).encode(
                &http::Method::GET,
                "/v2/a/manifests/v1",
                &without_hop,
                &mut encoded,
            );
            let mut rewritten = headers.clone();
            rewrite_request_headers(&mut rewritten, authority, peer, &upstream);
            let mut expected = bytes::BytesMut::new();
            crate::h1::encode_head(
                &http::Method::GET,
                "/v2/a/manifests/v1",
                &rewritten,
                &mut expected,
            );
            let lines = |b: &[u8]| {
                let mut l: Vec<String> = String::from_utf8(b.to_vec())
                    .unwrap()
                    .split("\r\n")
                    .map(str::to_owned)
                    .collect();
                l.sort();
                l
            };
            assert_eq!(
                lines(&encoded),
                lines(&expected),
                "step {step}: {headers:?}, trusted {}, tls {}",
                peer.trusted,
                peer.tls
            );
            assert!(encoded.starts_with(b"GET /v2/a/manifests/v1 HTTP/1.1\r\n"));
            assert!(encoded.ends_with(b"\r\n\r\n"));
        }
    }

    #[test]
    fn forwarding_headers_follow_the_nginx_front_without_its_holes() {
        let up = Upstream::parse("http://reg:5000").unwrap();
        let mut h = HeaderMap::new();
        h.insert(
            header::HOST,
            HeaderValue::from_static("public.example:5050"),
        );
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("192.0.2.1"));
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("192.0.2.2"));
        h.insert(&X_FORWARDED_HOST, HeaderValue::from_static("evil.example"));
        h.insert(&FORWARDED, HeaderValue::from_static("host=evil.example"));
        h.insert(&X_FORWARDED_PROTO, HeaderValue::from_static("gopher"));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-hop"),
        );
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert(header::EXPECT, HeaderValue::from_static("100-continue"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic eDp5"),
        );
        rewrite_request_headers(&mut h, None, conn(true), &up);
        assert_eq!(h[header::HOST], "public.example:5050");
        assert_eq!(h[&X_FORWARDED_FOR], "192.0.2.1, 192.0.2.2, 10.1.2.3");
        assert_eq!(h[&X_REAL_IP], "10.1.2.3");
        assert_eq!(h[&X_FORWARDED_PROTO], "https");
        assert!(!h.contains_key(&X_FORWARDED_HOST));
        assert!(!h.contains_key(&FORWARDED));
        assert!(!h.contains_key(header::CONNECTION));
        assert!(!h.contains_key("x-hop"));
        assert!(!h.contains_key(header::EXPECT));
        assert_eq!(h[header::AUTHORIZATION], "Basic eDp5");
    }

    #[test]
    fn only_trusted_proxies_may_set_the_forwarded_scheme_and_client_ip() {
        let up = Upstream::parse("http://reg:5000").unwrap();
        for trusted in [false, true] {
            let mut h = HeaderMap::new();
            h.insert(&X_FORWARDED_PROTO, HeaderValue::from_static("https"));
            h.insert(&X_REAL_IP, HeaderValue::from_static("192.0.2.9"));
            let c = ConnInfo {
                trusted,
                ..conn(false)
            };
            rewrite_request_headers(&mut h, None, c, &up);
            let (proto, ip) = if trusted {
                ("https", "192.0.2.9")
            } else {
                ("http", "10.1.2.3")
            };
            assert_eq!(h[&X_FORWARDED_PROTO], proto);
            assert_eq!(h[&X_REAL_IP], ip);
        }
    }

    #[test]
    fn peer_addresses_are_written_as_display_writes_them() {
        for ip in [
            "0.0.0.0",
            "9.10.99.100",
            "127.0.0.1",
            "255.255.255.255",
            "10.200.3.45",
            "::1",
            "2001:db8::7",
            "::ffff:192.0.2.1",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(ip_value(ip).unwrap(), ip.to_string().as_str());
        }
    }

    #[test]
    fn http2_authority_becomes_host() {
        let up = Upstream::parse("http://reg:5000").unwrap();
        let mut h = HeaderMap::new();
        let authority: http::uri::Authority = "public.example:5050".parse().unwrap();
        rewrite_request_headers(&mut h, Some(&authority), conn(false), &up);
        assert_eq!(h[header::HOST], "public.example:5050");
        assert_eq!(h[&X_FORWARDED_PROTO], "http");
    }

    #[test]
    fn response_hop_by_hop_fields_are_removed_and_registry_fields_kept() {
        let mut h = HeaderMap::new();
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(&KEEP_ALIVE, HeaderValue::from_static("timeout=5"));
        h.insert(
            header::LOCATION,
            HeaderValue::from_static("http://x/v2/a/blobs/uploads/1"),
        );
        h.insert(
            "docker-content-digest",
            HeaderValue::from_static("sha256:00"),
        );
        remove_hop_by_hop(&mut h);
        assert!(!h.contains_key(header::TRANSFER_ENCODING));
        assert!(!h.contains_key(&KEEP_ALIVE));
        assert!(h.contains_key(header::LOCATION));
        assert!(h.contains_key("docker-content-digest"));
    }
}

//! The key table: every configuration key once, with its section, kind, default and meaning.
//!
//! Everything an operator reads about a key comes from [`KEYS`]: the flags of `regguard serve`,
//! the `REGGUARD_<SECTION>_<KEY>` names, the key list in `--help`, the README's configuration
//! table (a test compares them) and the refusal of unknown TOML keys and environment variables.
//! It knows nothing of how values are merged or what the typed settings look like.

/// What a key's value is, for help text and for how its text is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `IP:PORT`.
    Addr,
    /// `http://host:port`.
    Url,
    /// A file.
    Path,
    /// `30s`, `15m`, `1h` or a number of seconds; never zero.
    Duration,
    /// `true` or `false`.
    Bool,
    /// A whole number of at least `min`.
    Count { min: u64 },
    /// Free text.
    Text,
    /// Comma-separated in flags and the environment, an array in the file.
    List,
    /// One of these words.
    Choice(&'static [&'static str]),
}

impl Kind {
    /// The placeholder shown for a value in help.
    pub fn value_name(self) -> &'static str {
        match self {
            Kind::Addr => "ADDR",
            Kind::Url => "URL",
            Kind::Path => "FILE",
            Kind::Duration => "DURATION",
            Kind::Bool => "BOOL",
            Kind::Count { .. } => "N",
            Kind::Text => "TEXT",
            Kind::List => "LIST",
            Kind::Choice(_) => "WORD",
        }
    }
}

/// A key's default: a value written as an operator would write it, or unset (and what that means).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Default {
    Value(&'static str),
    Unset(&'static str),
}

/// One configuration key.
#[derive(Debug, Clone, Copy)]
pub struct Key {
    /// `name` at the top level of the file, `section.name` inside `[section]`.
    pub key: &'static str,
    pub kind: Kind,
    pub default: Default,
    /// The long flag of `regguard serve` (without `--`), for the keys that have one.
    pub flag: Option<&'static str>,
    /// Masked wherever settings are printed.
    pub secret: bool,
    /// What it does, in Markdown (the README's wording).
    pub help: &'static str,
}

impl Key {
    /// `[section]` of the file, or `None` at the top level.
    pub fn section(&self) -> Option<&'static str> {
        self.key.split_once('.').map(|(s, _)| s)
    }

    /// The key's name inside its section.
    pub fn name(&self) -> &'static str {
        self.key.split_once('.').map_or(self.key, |(_, n)| n)
    }

    /// `REGGUARD_<SECTION>_<KEY>`, or `REGGUARD_<KEY>` at the top level.
    pub fn env(&self) -> String {
        format!("REGGUARD_{}", self.key.replace('.', "_").to_uppercase())
    }
}

/// The table. To add a key: a row here, a field in the section's settings struct, and the line
/// in `sections.rs` that reads it (a unit test fails while a row is not read).
pub const KEYS: &[Key] = &[
    // ---- top level: each also a flag of `regguard serve`
    top("listen", Kind::Addr, Default::Value("0.0.0.0:5050"), "public listener"),
    top("upstream", Kind::Url, Default::Value("http://registry-private:5000"),
        "the registry, `http://` or `https://`; the name is resolved again for every new connection; over TLS, SNI and certificate verification use this host name"),
    top("admin_listen", Kind::Addr, Default::Value("127.0.0.1:9090"),
        "`/metrics`, `/healthz`, `/readyz`; must differ from `listen`"),
    top("tls_cert", Kind::Path, Default::Unset("none (plain HTTP)"),
        "PEM certificate chain; with `tls_key` turns on TLS 1.2 and 1.3, ALPN `h2`, `http/1.1`; a missing or unreadable file stops start-up. Reloaded on SIGHUP and when the files change: new handshakes get the new pair, open connections keep theirs; a pair that does not load (unparseable, key not matching) is refused with an ERROR and the old one kept"),
    top("tls_key", Kind::Path, Default::Unset("none"), "PEM private key for `tls_cert`"),
    top("tls_reload_interval", Kind::Duration, Default::Value("5s"),
        "how often the TLS files' contents are hashed to notice a replacement (cert-manager's symlink swap, certbot's rewrite); a change is loaded once it has held for one interval"),
    top("upstream_ca", Kind::Path, Default::Unset("the system's CA store"),
        "PEM CA bundle an `https://` upstream must chain to (these roots only, as nginx's `proxy_ssl_trusted_certificate`); without it an untrusted certificate is a 502 naming the problem"),
    top("log_format", Kind::Choice(&["text", "json"]), Default::Value("text"),
        "`text` or `json` (one JSON object per line)"),
    // nginx's `proxy_read_timeout 900` / `proxy_send_timeout 900`.
    top("idle_timeout", Kind::Duration, Default::Value("900s"),
        "longest silence between two body frames, either way, and longest wait for the upstream's response headers once the request body has been sent (nginx `proxy_read_timeout`/`proxy_send_timeout`); no total deadline, so an upload that keeps moving is never cut"),
    // nginx's `client_header_timeout` default.
    top("header_read_timeout", Kind::Duration, Default::Value("60s"),
        "a client must send its request headers (and finish the TLS handshake) within this"),
    // Far above what a registry front serves (a few connections per pulling node or CI job),
    // and each needs about two descriptors (client and upstream), so 4096 fit a
    // 10,000-descriptor limit with room for the registry's own; it stops a flood of idle
    // sockets long before the process runs out.
    top("max_connections", Kind::Count { min: 1 }, Default::Value("4096"),
        "client connections open at once; over it, plain HTTP gets `503 UNAVAILABLE` with `Retry-After` and TLS is closed after accept. A connection with no request in flight for `header_read_timeout` (first byte, keep-alive wait, TLS after the handshake, HTTP/2 without streams) is closed; one whose writes to the client make no progress for `idle_timeout` is cut"),
    top("connect_timeout", Kind::Duration, Default::Value("10s"), "opening an upstream connection"),
    top("drain_timeout", Kind::Duration, Default::Value("120s"),
        "on SIGTERM/SIGINT: stop accepting, let in-flight exchanges finish for up to this long, then exit 0"),
    top("access_log", Kind::Bool, Default::Value("true"), "one log line per request"),
    top("trusted_proxies", Kind::List, Default::Unset("none"),
        "IP addresses of a TLS-terminating proxy in front of regguard, whose `X-Forwarded-Proto` and `X-Real-IP` are kept (from anyone else they are overwritten); the access log's and the gate's `client` is then its `X-Real-IP`, else the last `X-Forwarded-For` address not itself in this list (nginx's `real_ip_header` with `set_real_ip_from`)"),
    // ---- [validate]
    key("validate.enabled", Kind::Bool, Default::Value("true"), "validate every index served"),
    key("validate.blobs", Kind::Bool, Default::Value("true"),
        "also check image manifests' config and layer blobs"),
    key("validate.ok_ttl", Kind::Duration, Default::Value("5m"),
        "how long a present reference (and an index validated ok) is trusted"),
    key("validate.missing_ttl", Kind::Duration, Default::Value("30s"),
        "how long a 404 is trusted; broken references are re-checked this often"),
    key("validate.queue_capacity", Kind::Count { min: 1 }, Default::Value("1024"),
        "jobs waiting at most; more are dropped and counted"),
    key("validate.workers", Kind::Count { min: 1 }, Default::Value("4"), "validations running at once"),
    key("validate.max_depth", Kind::Count { min: 1 }, Default::Value("4"),
        "index nesting followed (by the push gate too)"),
    key("validate.max_references", Kind::Count { min: 1 }, Default::Value("4096"),
        "distinct manifests and blobs one validation (or scan of one tag) may check; past it the validation stops with result `error` and a `WARN`"),
    key("validate.check_timeout", Kind::Duration, Default::Value("10s"),
        "longest wait for one upstream check"),
    // ---- [gate]
    key("gate.mode", Kind::Choice(&["enforce", "audit", "off"]), Default::Value("enforce"),
        "`enforce` refuses broken pushes; `audit` forwards everything and counts what enforce would have refused; `off` streams manifest PUTs like any request"),
    key("gate.on_check_error", Kind::Choice(&["reject", "allow"]), Default::Value("reject"),
        "when a reference cannot be checked: `reject` answers `503 UNAVAILABLE` with `Retry-After`, `allow` forwards the push"),
    key("gate.depth", Kind::Choice(&["deep", "shallow"]), Default::Value("deep"),
        "`deep` also checks each child image's config and layers; `shallow` only the manifest's own references"),
    key("gate.max_references", Kind::Count { min: 1 }, Default::Value("4096"),
        "distinct manifests and blobs one push may make the gate ask about; more is `400 MANIFEST_INVALID`"),
    // 256 MiB is 64 manifests of the registry's 4 MiB maximum (real ones are a few KiB), and
    // keeps a flood of maximal pushes from taking more than that from a small host.
    key("gate.max_buffered_mib", Kind::Count { min: 4 }, Default::Value("256"),
        "manifest bytes held in memory at once by pushes being checked and served manifests being copied for validation; at least 4 (one manifest of the registry's maximum size)"),
    // ---- [scan]
    key("scan.enabled", Kind::Bool, Default::Value("false"), "scan the whole registry in the background"),
    key("scan.blobs", Kind::Bool, Default::Value("true"), "also check every image's config and layers"),
    key("scan.interval", Kind::Duration, Default::Value("15m"),
        "time between scans (the first starts at start-up)"),
    key("scan.concurrency", Kind::Count { min: 1 }, Default::Value("4"), "tags checked at once"),
    key("scan.rate", Kind::Count { min: 1 }, Default::Value("50"),
        "listing and manifest requests per second at most"),
    key("scan.page_size", Kind::Count { min: 1 }, Default::Value("100"),
        "`n` for catalog and tag-list pages (the `Link` header is followed; registry 2.8 ignores `n` on tag lists)"),
    key("scan.credentials_file", Kind::Path, Default::Unset("none"),
        "a file with `user:password` for the scan (or `REGGUARD_SCAN_USER` + `REGGUARD_SCAN_PASSWORD`)"),
    // ---- [vault]
    key("vault.url", Kind::Text, Default::Unset("$STATE_DIRECTORY/vault"),
        "where the vault keeps what regguard has seen: a directory (by default `$STATE_DIRECTORY/vault` under systemd's `StateDirectory=`, else none), or `s3://bucket/prefix` (credentials, region and endpoint from the usual `AWS_*` variables, e.g. `AWS_ENDPOINT`, `AWS_ALLOW_HTTP=true`); `none` turns the vault off"),
    key("vault.layers", Kind::Bool, Default::Value("false"),
        "also keep every layer (doubles storage), not only manifests and configs"),
    key("vault.max_blob_size", Kind::Count { min: 0 }, Default::Value("4194304"),
        "with `layers` off, blobs (configs) over this many bytes are not kept"),
    key("vault.retention", Kind::Duration, Default::Value("30days"),
        "entries not seen for this long are pruned"),
    key("vault.max_bytes", Kind::Count { min: 0 }, Default::Value("0"),
        "content bytes kept at most, least recently seen evicted first; 0: no cap"),
    // ---- [heal]
    key("heal.serve", Kind::Bool, Default::Unset("with a vault"),
        "answer a client's 404 for a manifest or blob by digest with the vault's bytes, if it was seen in that repository"),
    key("heal.repair", Kind::Bool, Default::Value("false"),
        "repair the registry from the vault: re-upload lost blobs, re-PUT lost manifests, verify by GET"),
    key("heal.credentials_file", Kind::Path, Default::Unset("none"),
        "a file with `user:password` allowed to push, for repairs (or `REGGUARD_HEAL_USER` + `REGGUARD_HEAL_PASSWORD`)"),
    // ---- [metrics]
    key("metrics.instance", Kind::Text, Default::Unset("host name"),
        "`instance` label of `registry_manifest_integrity_failures`"),
    key("metrics.max_broken_series", Kind::Count { min: 0 }, Default::Value("500"),
        "at most this many `regguard_broken_reference_info` series"),
];

/// `REGGUARD_*` variables that are not configuration keys, and who reads them.
pub const OTHER_ENV: &[(&str, &str)] = &[
    ("REGGUARD_CONFIG", "the TOML file (`--config`)"),
    (
        "REGGUARD_LOG",
        "a `tracing` filter for the log (default `info`)",
    ),
    ("REGGUARD_SCAN_USER", "user name of the scan's credentials"),
    (
        "REGGUARD_SCAN_PASSWORD",
        "password of the scan's credentials",
    ),
    ("REGGUARD_HEAL_USER", "user name of the repair credentials"),
    (
        "REGGUARD_HEAL_PASSWORD",
        "password of the repair credentials",
    ),
    ("REGGUARD_USER", "`check` and `scan`: the user name"),
    ("REGGUARD_PASSWORD", "`check` and `scan`: the password"),
    ("REGGUARD_REGISTRY", "`scan`: the registry (`--registry`)"),
    ("REGGUARD_BIN", "`deploy/demo.sh`: the binary to run"),
];

/// A top-level key: also a flag of the same name.
const fn top(key: &'static str, kind: Kind, default: Default, help: &'static str) -> Key {
    Key {
        key,
        kind,
        default,
        flag: Some(flag_of(key)),
        secret: false,
        help,
    }
}

/// A section key: file and environment only.
const fn key(key: &'static str, kind: Kind, default: Default, help: &'static str) -> Key {
    Key {
        key,
        kind,
        default,
        flag: None,
        secret: false,
        help,
    }
}

/// The flag of a top-level key: underscores become dashes. A `const fn` cannot build strings,
/// so the few keys with an underscore are spelled out; a unit test checks every one.
const fn flag_of(key: &'static str) -> &'static str {
    match key.as_bytes() {
        b"admin_listen" => "admin-listen",
        b"tls_cert" => "tls-cert",
        b"tls_key" => "tls-key",
        b"tls_reload_interval" => "tls-reload-interval",
        b"upstream_ca" => "upstream-ca",
        b"log_format" => "log-format",
        b"idle_timeout" => "idle-timeout",
        b"header_read_timeout" => "header-read-timeout",
        b"max_connections" => "max-connections",
        b"connect_timeout" => "connect-timeout",
        b"drain_timeout" => "drain-timeout",
        b"access_log" => "access-log",
        b"trusted_proxies" => "trusted-proxies",
        _ => key,
    }
}

/// The row for `key`, if it is one.
pub fn find(key: &str) -> Option<&'static Key> {
    KEYS.iter().find(|k| k.key == key)
}

/// Whether `name` is a `REGGUARD_*` variable regguard reads.
pub fn env_is_known(name: &str) -> bool {
    OTHER_ENV.iter().any(|(n, _)| *n == name) || KEYS.iter().any(|k| k.env() == name)
}

/// Every environment variable regguard reads.
pub fn known_env() -> Vec<String> {
    KEYS.iter()
        .map(Key::env)
        .chain(OTHER_ENV.iter().map(|(n, _)| n.to_string()))
        .collect()
}

/// The candidate nearest to `word` by edit distance, if it is near enough to be a typo.
pub fn closest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (edit_distance(word, c), c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 5))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    // Levenshtein, one row at a time; `get` rather than indexing (the crate denies panics).
    let mut prev: Vec<usize> = (0..=b.chars().count()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = Vec::with_capacity(prev.len());
        cur.push(i + 1);
        for (j, cb) in b.chars().enumerate() {
            let at = |row: &Vec<usize>, n: usize| row.get(n).copied().unwrap_or(usize::MAX);
            let substitute = at(&prev, j).saturating_add(usize::from(ca != cb));
            let delete = at(&prev, j + 1).saturating_add(1);
            let insert = cur.last().copied().unwrap_or(usize::MAX).saturating_add(1);
            cur.push(substitute.min(delete).min(insert));
        }
        prev = cur;
    }
    prev.last().copied().unwrap_or(0)
}

fn default_text(k: &Key) -> &'static str {
    match k.default {
        Default::Value(v) | Default::Unset(v) => v,
    }
}

fn label(k: &Key) -> String {
    match k.section() {
        Some(s) => format!("[{s}] {}", k.name()),
        None => k.key.to_string(),
    }
}

/// The key list shown by `regguard serve --help` and `regguard config --help`; `long` adds each
/// key's meaning.
pub fn help_text(long: bool) -> String {
    let mut out = String::from(
        "Configuration keys: TOML key (in the --config file), environment variable, default.\n\
         A flag beats the environment, which beats the file, which beats the default.\n\
         `regguard config check FILE` prints the effective settings.\n\n",
    );
    let width = KEYS.iter().map(|k| label(k).len()).max().unwrap_or(0);
    let env_width = KEYS.iter().map(|k| k.env().len()).max().unwrap_or(0);
    for k in KEYS {
        out.push_str(&format!(
            "  {:width$}  {:env_width$}  {}\n",
            label(k),
            k.env(),
            default_text(k),
        ));
        if long {
            out.push_str(&format!("      {}\n", k.help.replace('`', "")));
        }
    }
    out.push_str("\nAlso read:\n");
    for (name, what) in OTHER_ENV {
        out.push_str(&format!("  {name:env_width$}  {}\n", what.replace('`', "")));
    }
    out
}

/// The README's configuration table, in Markdown.
pub fn markdown_table() -> String {
    let mut out =
        String::from("| key (TOML) | flag / env | default | meaning |\n|---|---|---|---|\n");
    for k in KEYS {
        let sources = match k.flag {
            Some(f) => format!("`--{f}` / `{}`", k.env()),
            None => format!("`{}`", k.env()),
        };
        let default = match k.default {
            Default::Value(v) => format!("`{v}`"),
            Default::Unset(v) => v.to_string(),
        };
        out.push_str(&format!(
            "| `{}` | {sources} | {default} | {} |\n",
            label(k),
            k.help
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_are_the_keys_with_dashes() {
        for k in KEYS {
            match k.flag {
                Some(f) => assert_eq!(f, k.key.replace('_', "-"), "{}", k.key),
                None => assert!(k.section().is_some(), "{} has no flag", k.key),
            }
        }
    }

    #[test]
    fn keys_and_env_names_are_unique() {
        let mut env = known_env();
        let n = env.len();
        env.sort();
        env.dedup();
        assert_eq!(env.len(), n);
    }

    #[test]
    fn typos_find_their_key() {
        let names = known_env();
        assert_eq!(
            closest("REGGUARD_VALIDATE_OK_TLL", names.iter().map(String::as_str)),
            Some("REGGUARD_VALIDATE_OK_TTL")
        );
        assert_eq!(
            closest("REGGUARD_NOTHING_LIKE_IT", names.iter().map(String::as_str)),
            None
        );
    }
}

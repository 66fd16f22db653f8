//! What a request path means in the distribution API.
//!
//! Classification is purely syntactic (no allocation for the kind; the
//! repository and reference are borrowed from the path) and bounded: the kind
//! doubles as a metric label.
//!
//! It knows nothing of how a route is served, of upstreams or of validation.

/// The kind of distribution endpoint a path addresses. Bounded: used as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RouteKind {
    /// `/` on the public listener: the liveness answer nginx gave.
    Root,
    /// `/v2/`: the API base check.
    Base,
    /// `/v2/<name>/manifests/<reference>`.
    Manifest,
    /// `/v2/<name>/blobs/<digest>`.
    Blob,
    /// `/v2/<name>/blobs/uploads/[<uuid>]`.
    Upload,
    /// `/v2/<name>/tags/list`.
    Tags,
    /// `/v2/_catalog`.
    Catalog,
    /// Anything else.
    Other,
}

impl RouteKind {
    /// All kinds, in label order (for pre-registering metric handles).
    pub const ALL: [RouteKind; 8] = [
        RouteKind::Root,
        RouteKind::Base,
        RouteKind::Manifest,
        RouteKind::Blob,
        RouteKind::Upload,
        RouteKind::Tags,
        RouteKind::Catalog,
        RouteKind::Other,
    ];

    /// The metric/log label of this kind.
    pub fn as_str(self) -> &'static str {
        match self {
            RouteKind::Root => "root",
            RouteKind::Base => "base",
            RouteKind::Manifest => "manifest",
            RouteKind::Blob => "blob",
            RouteKind::Upload => "upload",
            RouteKind::Tags => "tags",
            RouteKind::Catalog => "catalog",
            RouteKind::Other => "other",
        }
    }

    /// Index into [`RouteKind::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// A classified request path: the kind, and where it applies, the repository
/// name and the reference (tag, digest or upload id), borrowed from the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route<'a> {
    pub kind: RouteKind,
    pub repository: Option<&'a str>,
    pub reference: Option<&'a str>,
}

impl<'a> Route<'a> {
    fn plain(kind: RouteKind) -> Self {
        Route {
            kind,
            repository: None,
            reference: None,
        }
    }
}

/// Why a request path cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the request path has a `%` that is not followed by two hex digits")]
    BadEscape,
    #[error("the request path decodes to bytes that are not UTF-8")]
    NotUtf8,
}

/// The path as the registry's router sees it: percent-decoded, as Go's `net/url`
/// fills `URL.Path` before gorilla/mux matches it. `/v2/<repo>/manifests%2Flatest`
/// and `/v2/<repo>/%6Danifests/latest` reach the registry's manifest handler, so
/// they must be classified as manifests here too. Borrowed when there is nothing
/// to decode (the common case costs one scan for `%`).
pub fn decode_path(path: &str) -> Result<std::borrow::Cow<'_, str>, PathError> {
    if !path.contains('%') {
        return Ok(std::borrow::Cow::Borrowed(path));
    }
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = |j: usize| bytes.get(j).and_then(|c| char::from(*c).to_digit(16));
            match (hex(i + 1), hex(i + 2)) {
                (Some(h), Some(l)) => {
                    out.push(u8::try_from(h * 16 + l).map_err(|_| PathError::BadEscape)?);
                    i += 3;
                }
                _ => return Err(PathError::BadEscape),
            }
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out)
        .map(std::borrow::Cow::Owned)
        .map_err(|_| PathError::NotUtf8)
}

/// A repository name as distribution's grammar has it: `/`-separated components of
/// lowercase letters and digits, joined inside a component by `.`, `_`, `__` or runs
/// of `-`; 255 bytes at most. The registry routes nothing else to a repository (it
/// redirects `//` and `/./`, and answers 404 or `NAME_INVALID` for the rest), so the
/// gate and validation leave other names to it.
pub fn is_repository_name(name: &str) -> bool {
    name.len() <= 255 && !name.is_empty() && name.split('/').all(is_component)
}

fn is_component(c: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = c.as_bytes();
    let (Some(first), Some(last)) = (bytes.first(), bytes.last()) else {
        return false;
    };
    if !alnum(*first) || !alnum(*last) {
        return false;
    }
    // Between alphanumeric runs: one `.`, one or two `_`, or any number of `-`.
    let mut run = String::new();
    for &b in bytes {
        if alnum(b) {
            let ok = run.is_empty()
                || run == "."
                || run == "_"
                || run == "__"
                || run.bytes().all(|x| x == b'-');
            if !ok {
                return false;
            }
            run.clear();
        } else if matches!(b, b'.' | b'_' | b'-') {
            run.push(char::from(b));
        } else {
            return false;
        }
    }
    true
}

/// Classifies a request path (without query string), already decoded by [`decode_path`].
///
/// Repository names may themselves contain `/` and even components named
/// `blobs` or `manifests`, so the endpoint is recognised from the right.
pub fn classify(path: &str) -> Route<'_> {
    if path == "/" {
        return Route::plain(RouteKind::Root);
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return Route::plain(RouteKind::Other);
    };
    if rest.is_empty() {
        return Route::plain(RouteKind::Base);
    }
    if rest == "_catalog" {
        return Route::plain(RouteKind::Catalog);
    }
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return named(RouteKind::Tags, name, None);
    }
    let Some((head, last)) = rest.rsplit_once('/') else {
        return Route::plain(RouteKind::Other);
    };
    if let Some(name) = head.strip_suffix("/blobs/uploads") {
        let id = (!last.is_empty()).then_some(last);
        return named(RouteKind::Upload, name, id);
    }
    if last.is_empty() {
        return Route::plain(RouteKind::Other);
    }
    if let Some(name) = head.strip_suffix("/blobs") {
        return named(RouteKind::Blob, name, Some(last));
    }
    if let Some(name) = head.strip_suffix("/manifests") {
        return named(RouteKind::Manifest, name, Some(last));
    }
    Route::plain(RouteKind::Other)
}

fn named<'a>(kind: RouteKind, name: &'a str, reference: Option<&'a str>) -> Route<'a> {
    if name.is_empty() {
        return Route::plain(RouteKind::Other);
    }
    Route {
        kind,
        repository: Some(name),
        reference,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(p: &str) -> RouteKind {
        classify(p).kind
    }

    #[test]
    fn base_root_catalog_and_unknown() {
        assert_eq!(k("/"), RouteKind::Root);
        assert_eq!(k("/v2/"), RouteKind::Base);
        assert_eq!(k("/v2"), RouteKind::Other);
        assert_eq!(k("/v2/_catalog"), RouteKind::Catalog);
        assert_eq!(k("/metrics"), RouteKind::Other);
        assert_eq!(k("/v2/justname"), RouteKind::Other);
    }

    #[test]
    fn manifests_with_nested_repository_names() {
        let r = classify("/v2/team/app/manifests/latest");
        assert_eq!(r.kind, RouteKind::Manifest);
        assert_eq!(r.repository, Some("team/app"));
        assert_eq!(r.reference, Some("latest"));
        // A repository whose own components are named like endpoints.
        let r = classify("/v2/blobs/manifests/blobs/sha256:ab");
        assert_eq!(r.kind, RouteKind::Blob);
        assert_eq!(r.repository, Some("blobs/manifests"));
        assert_eq!(r.reference, Some("sha256:ab"));
        assert_eq!(k("/v2/x/manifests/"), RouteKind::Other);
        assert_eq!(k("/v2//manifests/latest"), RouteKind::Other);
    }

    #[test]
    fn uploads_with_and_without_session_id() {
        let r = classify("/v2/a/b/blobs/uploads/");
        assert_eq!(r.kind, RouteKind::Upload);
        assert_eq!(r.repository, Some("a/b"));
        assert_eq!(r.reference, None);
        let r = classify("/v2/a/blobs/uploads/5f0c-uuid");
        assert_eq!(r.kind, RouteKind::Upload);
        assert_eq!(r.reference, Some("5f0c-uuid"));
    }

    #[test]
    fn tags_list() {
        let r = classify("/v2/org/img/tags/list");
        assert_eq!(r.kind, RouteKind::Tags);
        assert_eq!(r.repository, Some("org/img"));
    }

    #[test]
    fn encoded_spellings_classify_as_the_registry_routes_them() {
        for spelling in [
            "/v2/team/app/manifests%2Flatest",
            "/v2/team/app/%6Danifests/latest",
            "/v2/team/app/%6d%61nifests/latest",
            "/v2%2Fteam/app/manifests/latest",
            "/v2/team%2Fapp/manifests/lates%74",
        ] {
            let decoded = decode_path(spelling).unwrap();
            let r = classify(&decoded);
            assert_eq!(r.kind, RouteKind::Manifest, "{spelling}");
            assert_eq!(r.repository, Some("team/app"), "{spelling}");
            assert_eq!(r.reference, Some("latest"), "{spelling}");
        }
        assert!(matches!(
            decode_path("/v2/a/manifests/x"),
            Ok(std::borrow::Cow::Borrowed(_))
        ));
        assert_eq!(decode_path("/v2/a%"), Err(PathError::BadEscape));
        assert_eq!(decode_path("/v2/a%4"), Err(PathError::BadEscape));
        assert_eq!(decode_path("/v2/a%zz/b"), Err(PathError::BadEscape));
        assert_eq!(decode_path("/v2/a%ff/b"), Err(PathError::NotUtf8));
        assert_eq!(decode_path("/v2/a%25/b").unwrap(), "/v2/a%/b");
    }

    #[test]
    fn repository_names_follow_the_registry_grammar() {
        for ok in ["a", "team/app", "a.b/c_d/e__f/g-h/i---j", "0/9"] {
            assert!(is_repository_name(ok), "{ok}");
        }
        for bad in [
            "", "A", "a//b", "a/./b", "a/../b", "-a", "a-", "a._b", "a___b", "a b", "a/",
        ] {
            assert!(!is_repository_name(bad), "{bad}");
        }
        assert!(!is_repository_name(&"a".repeat(256)));
    }

    #[test]
    fn kinds_index_matches_all_order() {
        for (i, kind) in RouteKind::ALL.iter().enumerate() {
            assert_eq!(kind.index(), i);
        }
    }
}

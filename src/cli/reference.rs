//! Image references as people paste them: `[http[s]://|docker://]host[:port]/repo[:tag|@digest]`,
//! with the syntax of digests, tags and repository names checked before anything is sent.
//!
//! No I/O; it knows nothing of registries or credentials.

use crate::inspect::at;

/// What a pasted reference should look like, said with every refusal.
const USAGE: &str = "expected [http[s]://]HOST[:PORT]/REPOSITORY[:TAG|@sha256:DIGEST]";

/// Why a pasted image reference was refused before anything was sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RefError {
    #[error("`{input}`: names no repository; {USAGE}")]
    NoRepository { input: String },
    #[error("`{input}`: no registry host; {USAGE}")]
    NoHost { input: String },
    #[error("`{input}`: the first component `{host}` is not a registry host (add the host, e.g. registry.example:5050/{input})")]
    NotAHost { input: String, host: String },
    /// `repo:sha256:<hex>`: a digest written after `:`.
    #[error("`{input}`: a digest follows `@`, not `:` ({host}/{name}@sha256:{hex})")]
    DigestAfterColon {
        input: String,
        host: String,
        name: String,
        hex: String,
    },
    /// The digest, tag or repository name is not one a registry accepts.
    #[error("`{input}`: {syntax}")]
    Syntax { input: String, syntax: SyntaxError },
}

/// A digest, tag or repository name a registry would refuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SyntaxError {
    #[error("`{0}` is not a digest (expected sha256:<64 hex digits>)")]
    NotADigest(String),
    #[error("digest algorithm `{0}` is not one a registry knows (sha256, sha384, sha512)")]
    UnknownAlgorithm(String),
    #[error("`{0}`: a digest's hex part is lowercase 0-9a-f only")]
    DigestNotLowerHex(String),
    #[error("`{digest}`: a {algorithm} digest has {want} hex digits, this one has {got}")]
    DigestLength {
        digest: String,
        algorithm: String,
        want: usize,
        got: usize,
    },
    #[error("`{0}` is not a valid tag (letters, digits, `_`, `.`, `-`; at most 128; not starting with `.` or `-`)")]
    Tag(String),
    #[error("empty repository name")]
    EmptyRepository,
    /// Holds the name lower-cased, as it should be written.
    #[error("repository names are lowercase: `{0}`")]
    UppercaseRepository(String),
    #[error("`{0}` is not a valid repository name (lowercase letters, digits and `._-` between them, components separated by `/`)")]
    Repository(String),
}

/// An image reference as people paste it: `[http[s]://]host[:port]/repo[:tag|@digest]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// `http` or `https` when the reference said so.
    pub scheme: Option<&'static str>,
    pub host: String,
    pub repository: String,
    /// A tag or a digest (`sha256:<64 hex>`).
    pub reference: String,
}

impl ImageRef {
    pub fn parse(s: &str) -> Result<Self, RefError> {
        let syntax = |syntax: SyntaxError| RefError::Syntax {
            input: s.to_owned(),
            syntax,
        };
        let trimmed = s.trim();
        let lower = trimmed.to_ascii_lowercase();
        let (scheme, rest) = if lower.starts_with("https://") {
            (Some("https"), trimmed.get(8..).unwrap_or(""))
        } else if lower.starts_with("http://") {
            (Some("http"), trimmed.get(7..).unwrap_or(""))
        } else if lower.starts_with("docker://") {
            (None, trimmed.get(9..).unwrap_or(""))
        } else {
            (None, trimmed)
        };
        let rest = rest.trim_end_matches('/');
        let (host, path) = rest.split_once('/').ok_or_else(|| RefError::NoRepository {
            input: s.to_owned(),
        })?;
        if host.is_empty() {
            return Err(RefError::NoHost {
                input: s.to_owned(),
            });
        }
        if scheme.is_none() && !(host.contains('.') || host.contains(':') || host == "localhost") {
            return Err(RefError::NotAHost {
                input: s.to_owned(),
                host: host.to_owned(),
            });
        }
        let (name, reference) = match path.split_once('@') {
            Some((name, digest)) => {
                check_digest(digest).map_err(syntax)?;
                // `repo:tag@digest`: the digest decides, as docker does.
                let name = match name.rsplit_once(':') {
                    Some((n, _)) => n,
                    None => name,
                };
                (name, digest.to_string())
            }
            None => match path.rsplit_once(':') {
                Some((name, tag)) if !tag.contains('/') => {
                    // `repo:sha256:<hex>`, the form the issue saw printed: say where `@` goes.
                    if let Some((name, hex)) = name
                        .strip_suffix(":sha256")
                        .map(|n| (n, tag))
                        .or_else(|| (tag == "sha256").then_some((name, "")))
                    {
                        return Err(RefError::DigestAfterColon {
                            input: s.to_owned(),
                            host: host.to_owned(),
                            name: name.to_owned(),
                            hex: hex.to_owned(),
                        });
                    }
                    check_tag(tag).map_err(syntax)?;
                    (name, tag.to_string())
                }
                _ => (path, "latest".to_string()),
            },
        };
        check_repository(name).map_err(syntax)?;
        Ok(ImageRef {
            scheme,
            host: host.to_string(),
            repository: name.to_string(),
            reference,
        })
    }

    pub fn is_digest(&self) -> bool {
        self.reference.contains(':')
    }

    /// `repo:tag` or `repo@sha256:…`.
    pub fn name(&self) -> String {
        at(&self.repository, &self.reference)
    }

    /// `host/repo:tag` or `host/repo@sha256:…`.
    pub fn display(&self) -> String {
        format!("{}/{}", self.host, self.name())
    }
}

/// A digest's syntax, as the registry would judge it, checked before anything is sent.
fn check_digest(d: &str) -> Result<(), SyntaxError> {
    let (algorithm, hex) = d
        .split_once(':')
        .ok_or_else(|| SyntaxError::NotADigest(d.to_owned()))?;
    let want = match algorithm {
        "sha256" => 64,
        "sha384" => 96,
        "sha512" => 128,
        other => return Err(SyntaxError::UnknownAlgorithm(other.to_owned())),
    };
    if !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(SyntaxError::DigestNotLowerHex(d.to_owned()));
    }
    if hex.len() != want {
        return Err(SyntaxError::DigestLength {
            digest: d.to_owned(),
            algorithm: algorithm.to_owned(),
            want,
            got: hex.len(),
        });
    }
    Ok(())
}

fn check_tag(t: &str) -> Result<(), SyntaxError> {
    let ok = t.len() <= 128
        && t.bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(SyntaxError::Tag(t.to_owned()))
    }
}

fn check_repository(name: &str) -> Result<(), SyntaxError> {
    if name.is_empty() {
        return Err(SyntaxError::EmptyRepository);
    }
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(SyntaxError::UppercaseRepository(name.to_ascii_lowercase()));
    }
    for part in name.split('/') {
        let edges_ok = part
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
            && part
                .bytes()
                .last()
                .is_some_and(|b| b.is_ascii_alphanumeric());
        if !edges_ok
            || !part.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
            })
        {
            return Err(SyntaxError::Repository(name.to_owned()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn references_parse_as_people_paste_them() {
        let r = ImageRef::parse("registry.example:5050/infra-ci:latest").unwrap();
        assert_eq!(
            (r.host.as_str(), r.repository.as_str(), r.reference.as_str()),
            ("registry.example:5050", "infra-ci", "latest")
        );
        let r = ImageRef::parse(&format!("127.0.0.1:5000/team/app@{D}")).unwrap();
        assert_eq!(
            (r.repository.as_str(), r.reference.as_str()),
            ("team/app", D)
        );
        assert_eq!(r.display(), format!("127.0.0.1:5000/team/app@{D}"));
        let r = ImageRef::parse("reg.example/team/app").unwrap();
        assert_eq!((r.reference.as_str(), r.scheme), ("latest", None));
        let r = ImageRef::parse("http://127.0.0.1:5000/team/app:v1").unwrap();
        assert_eq!(
            (r.scheme, r.host.as_str(), r.name().as_str()),
            (Some("http"), "127.0.0.1:5000", "team/app:v1")
        );
        let r = ImageRef::parse(&format!("https://registry/app@{D}")).unwrap();
        assert_eq!((r.scheme, r.host.as_str()), (Some("https"), "registry"));
        let r = ImageRef::parse(&format!("reg.example/app:v1@{D}")).unwrap();
        assert_eq!(r.reference, D, "the digest decides");
        assert!(ImageRef::parse("team/app:v1").is_err(), "no registry host");
    }

    #[test]
    fn bad_digests_tags_and_names_are_refused_locally() {
        for (bad, says) in [
            ("reg.example/app@sha256:abc", "64 hex digits, this one has 3"),
            ("reg.example/app@sha256:0123456789ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef", "lowercase"),
            ("reg.example/app@md5:00", "sha256"),
            ("reg.example/app:sha256:abc", "a digest follows `@`, not `:`"),
            ("reg.example/App:v1", "lowercase"),
            ("reg.example/app:-v1", "valid tag"),
            ("http://reg.example:5000", "names no repository"),
        ] {
            let e = ImageRef::parse(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}

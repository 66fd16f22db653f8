//! Where the CLI's credentials come from: `--user`, `REGGUARD_USER` + `REGGUARD_PASSWORD`, or
//! the docker config file (`credHelpers`, `credsStore`, `auths`), and where each came from, so
//! every message can say what was sent.
//!
//! The docker config is read by hand rather than with the `docker_credential` crate: the
//! messages here must say where a credential came from (`--user`, `auths`, which helper), the
//! crate matches `auths` keys exactly (docker itself treats `https://host/` and `host` alike),
//! and it would bring a second major version of `base64` into the tree. What it does is small:
//! one JSON lookup and one `docker-credential-<name> get` call.
//!
//! It knows nothing of registries' answers: [`super::access`] sends what it finds.

use std::path::PathBuf;
use std::process::ExitStatus;

use http::HeaderValue;

/// Why credentials could not be read or used. Each names where they came from.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// `USER:PASSWORD` with nothing before the colon.
    #[error("{origin}: the user name before `:` is empty")]
    EmptyUser { origin: String },
    #[error("{origin}: expected USER:PASSWORD, got `{given}` with no `:` (regguard never prompts for a password)")]
    NoColon { origin: String, given: String },
    #[error("REGGUARD_USER is set but REGGUARD_PASSWORD is not")]
    PasswordUnset,
    #[error("docker config {}: not JSON: {error}", path.display())]
    DockerConfig {
        path: PathBuf,
        #[source]
        error: serde_json::Error,
    },
    /// A docker config `auths` entry whose `auth` does not decode.
    #[error("{origin}: `auth` is not base64 of USER:PASSWORD (run `docker login {host}` again)")]
    AuthNotBase64 { origin: String, host: String },
    /// The credential helper the docker config names is not on PATH (or cannot start).
    #[error("the docker config names {helper}, which cannot be run ({error}); install it on PATH or remove it from the docker config")]
    HelperMissing {
        helper: String,
        #[source]
        error: std::io::Error,
    },
    #[error("{helper}: cannot write to it: {error}")]
    HelperWrite {
        helper: String,
        #[source]
        error: std::io::Error,
    },
    #[error("{helper}: {error}")]
    HelperWait {
        helper: String,
        #[source]
        error: std::io::Error,
    },
    /// The helper ran and failed (other than "credentials not found").
    #[error("{helper} failed for {host} ({status}): {output}")]
    HelperFailed {
        helper: String,
        host: String,
        status: ExitStatus,
        output: String,
    },
    #[error("{helper}: its answer is not the helpers' JSON: {error}")]
    HelperAnswer {
        helper: String,
        #[source]
        error: serde_json::Error,
    },
    /// The credentials do not fit in an `Authorization` header.
    #[error("{0}")]
    Header(String),
}

/// A user name and a secret, and where they came from (said in every message about them).
#[derive(Clone)]
pub struct Login {
    pub user: String,
    pub(crate) secret: String,
    /// `--user`, `REGGUARD_USER`, `docker config auths["host"]`, `credential helper docker-credential-x`.
    pub source: String,
    /// The secret is a docker identity token (an OAuth refresh token), not a password.
    pub(crate) identity_token: bool,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "user `{}` from {}", self.user, self.source)
    }
}

impl Login {
    /// `user `alice` (from --user)`, for messages.
    pub fn describe(&self) -> String {
        format!("user `{}` (from {})", self.user, self.source)
    }

    pub(crate) fn basic(&self) -> Result<HeaderValue, CredentialError> {
        crate::config::basic_auth(&format!("{}:{}", self.user, self.secret))
            .map_err(CredentialError::Header)
    }
}

/// Splits `USER:PASSWORD`; refuses anything else at once.
pub fn parse_user(s: &str, what: &str) -> Result<(String, String), CredentialError> {
    match s.split_once(':') {
        Some((u, p)) if !u.is_empty() => Ok((u.to_owned(), p.to_owned())),
        Some(_) => Err(CredentialError::EmptyUser {
            origin: what.to_owned(),
        }),
        None => Err(CredentialError::NoColon {
            origin: what.to_owned(),
            given: s.to_owned(),
        }),
    }
}

/// Where the CLI's credentials come from: `--user`, else `REGGUARD_USER` + `REGGUARD_PASSWORD`,
/// else the docker config file (`credHelpers`, `credsStore`, `auths`) for the registry's host.
pub struct Credentials {
    explicit: Option<Login>,
    docker_config: Option<(PathBuf, serde_json::Value)>,
}

impl Credentials {
    /// Reads `--user` / the environment, and the docker config file if there is one.
    pub fn from_cli(user: Option<&str>) -> Result<Self, CredentialError> {
        let explicit = match user {
            Some(u) => {
                let (user, secret) = parse_user(u, "--user")?;
                Some(Login {
                    user,
                    secret,
                    source: "--user".into(),
                    identity_token: false,
                })
            }
            None => match (
                std::env::var("REGGUARD_USER").ok(),
                std::env::var("REGGUARD_PASSWORD").ok(),
            ) {
                (Some(user), Some(secret)) if !user.is_empty() => Some(Login {
                    user,
                    secret,
                    source: "REGGUARD_USER and REGGUARD_PASSWORD".into(),
                    identity_token: false,
                }),
                (Some(_), None) => return Err(CredentialError::PasswordUnset),
                _ => None,
            },
        };
        let path = std::env::var("DOCKER_CONFIG")
            .map(|d| PathBuf::from(d).join("config.json"))
            .or_else(|_| {
                std::env::var("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
            })
            .ok();
        let docker_config = match path {
            Some(p) => match std::fs::read_to_string(&p) {
                Ok(text) => {
                    let parsed = serde_json::from_str(&text).map_err(|error| {
                        CredentialError::DockerConfig {
                            path: p.clone(),
                            error,
                        }
                    })?;
                    Some((p, parsed))
                }
                Err(_) => None,
            },
            None => None,
        };
        Ok(Credentials {
            explicit,
            docker_config,
        })
    }

    /// The login to use for `host` (`name[:port]`), if any. A credential helper that fails
    /// (other than "not found") is an error: its credentials are unusable.
    pub fn for_host(&self, host: &str) -> Result<Option<Login>, CredentialError> {
        if let Some(l) = &self.explicit {
            return Ok(Some(l.clone()));
        }
        let Some((path, cfg)) = &self.docker_config else {
            return Ok(None);
        };
        if let Some(helper) = cfg
            .get("credHelpers")
            .and_then(|h| h.as_object())
            .and_then(|h| h.iter().find(|(k, _)| same_host(k, host)))
            .and_then(|(_, v)| v.as_str())
        {
            if let Some(l) = run_helper(helper, host)? {
                return Ok(Some(l));
            }
        } else if let Some(store) = cfg.get("credsStore").and_then(|s| s.as_str()) {
            if let Some(l) = run_helper(store, host)? {
                return Ok(Some(l));
            }
        }
        let Some((key, entry)) = cfg
            .get("auths")
            .and_then(|a| a.as_object())
            .and_then(|a| a.iter().find(|(k, _)| same_host(k, host)))
        else {
            return Ok(None);
        };
        let source = format!("docker config {} auths[\"{key}\"]", path.display());
        let field = |name: &str| {
            entry
                .get(name)
                .and_then(|v| v.as_str())
                .filter(|v| !v.is_empty())
        };
        if let Some(token) = field("identitytoken") {
            return Ok(Some(Login {
                user: field("username").unwrap_or("<token>").to_owned(),
                secret: token.to_owned(),
                source,
                identity_token: true,
            }));
        }
        if let Some(auth) = field("auth") {
            use base64::Engine as _;
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| CredentialError::AuthNotBase64 {
                    origin: source.clone(),
                    host: host.to_owned(),
                })?;
            let (user, secret) = parse_user(&decoded, &source)?;
            return Ok(Some(Login {
                user,
                secret,
                source,
                identity_token: false,
            }));
        }
        match (field("username"), field("password")) {
            (Some(u), Some(p)) => Ok(Some(Login {
                user: u.to_owned(),
                secret: p.to_owned(),
                source,
                identity_token: false,
            })),
            _ => Ok(None),
        }
    }
}

/// Whether a docker config key (`host`, `https://host/`, `http://host/v1/`) names `host`.
fn same_host(key: &str, host: &str) -> bool {
    let k = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let k = k.split('/').next().unwrap_or(k);
    k.eq_ignore_ascii_case(host)
}

/// `docker-credential-<name> get` with the host on stdin, as docker runs it.
fn run_helper(name: &str, host: &str) -> Result<Option<Login>, CredentialError> {
    use std::io::Write as _;
    let program = format!("docker-credential-{name}");
    let source = format!("credential helper {program}");
    let mut child = std::process::Command::new(&program)
        .arg("get")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|error| CredentialError::HelperMissing {
            helper: source.clone(),
            error,
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(host.as_bytes())
            .map_err(|error| CredentialError::HelperWrite {
                helper: source.clone(),
                error,
            })?;
    }
    let out = child
        .wait_with_output()
        .map_err(|error| CredentialError::HelperWait {
            helper: source.clone(),
            error,
        })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // The helpers' protocol: this exact message means "nothing stored for that host".
        if stdout.contains("credentials not found") {
            return Ok(None);
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(CredentialError::HelperFailed {
            helper: source,
            host: host.to_owned(),
            status: out.status,
            output: format!("{} {}", stdout.trim(), stderr.trim())
                .trim()
                .to_owned(),
        });
    }
    let v: serde_json::Value =
        serde_json::from_str(&stdout).map_err(|error| CredentialError::HelperAnswer {
            helper: source.clone(),
            error,
        })?;
    let user = v.get("Username").and_then(|u| u.as_str()).unwrap_or("");
    let secret = v.get("Secret").and_then(|s| s.as_str()).unwrap_or("");
    if secret.is_empty() {
        return Ok(None);
    }
    Ok(Some(Login {
        user: user.to_owned(),
        secret: secret.to_owned(),
        source,
        identity_token: user == "<token>",
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_needs_a_colon_and_a_name() {
        assert_eq!(
            parse_user("alice:s3:cret", "--user").unwrap(),
            ("alice".into(), "s3:cret".into())
        );
        assert!(parse_user("alice", "--user")
            .unwrap_err()
            .to_string()
            .contains("no `:`"));
        assert!(parse_user(":pw", "--user").is_err());
    }

    #[test]
    fn docker_config_keys_match_with_or_without_scheme() {
        assert!(same_host("https://reg.example:5050/", "reg.example:5050"));
        assert!(same_host("reg.example:5050", "reg.example:5050"));
        assert!(same_host("http://reg.example:5050/v1/", "reg.example:5050"));
        assert!(!same_host("reg.example", "reg.example:5050"));
    }
}

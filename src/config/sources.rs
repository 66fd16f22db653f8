//! The four sources of a setting (flags, `REGGUARD_*` environment, the TOML file, the key
//! table's defaults) merged into one map of raw values, and the typed readers over it.
//!
//! This is the only place that knows the precedence; it reads no process state itself (the
//! binary captures the environment and passes it in) and knows nothing of the typed settings.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Arg, ArgMatches, Command};

use super::keys::{self, Key, Kind, KEYS};
use super::ConfigError;

/// The `REGGUARD_*` variables of the process, captured once by the binary.
#[derive(Debug, Clone, Default)]
pub struct Environment {
    vars: BTreeMap<String, String>,
}

impl Environment {
    /// The process's `REGGUARD_*` variables.
    pub fn from_process() -> Self {
        Self::from_pairs(std::env::vars_os().map(|(k, v)| {
            (
                k.to_string_lossy().into_owned(),
                v.to_string_lossy().into_owned(),
            )
        }))
    }

    /// Given variables: `REGGUARD_*`, and the few others regguard reads (`AWS_*` for an S3
    /// vault, systemd's `STATE_DIRECTORY`); the rest are ignored.
    pub fn from_pairs(pairs: impl IntoIterator<Item = (String, String)>) -> Self {
        Environment {
            vars: pairs
                .into_iter()
                .filter(|(k, _)| {
                    k.starts_with("REGGUARD_") || k.starts_with("AWS_") || k == "STATE_DIRECTORY"
                })
                .collect(),
        }
    }

    /// The `AWS_*` variables.
    pub(crate) fn aws(&self) -> Vec<(String, String)> {
        self.vars
            .iter()
            .filter(|(k, _)| k.starts_with("AWS_"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(String::as_str)
    }

    /// Refuses a `REGGUARD_*` variable regguard does not read: a typo would otherwise be a
    /// setting silently left at its default.
    pub fn check_known(&self) -> Result<(), ConfigError> {
        let known = keys::known_env();
        let ours = self.vars.keys().filter(|k| k.starts_with("REGGUARD_"));
        match ours.into_iter().find(|name| !keys::env_is_known(name)) {
            None => Ok(()),
            Some(name) => Err(ConfigError::UnknownEnv {
                name: name.clone(),
                hint: keys::closest(name, known.iter().map(String::as_str))
                    .map(|c| format!(" (did you mean {c}?)"))
                    .unwrap_or_default(),
            }),
        }
    }
}

/// Flags of `regguard serve`: `--config` and one flag per top-level key of the table.
#[derive(Debug, Clone, Default)]
pub struct ServeArgs {
    /// The TOML file.
    pub config: Option<PathBuf>,
    /// Flag values as given, by key.
    pub flags: BTreeMap<&'static str, String>,
}

impl ServeArgs {
    /// These flags with `--<key> value` added (for tests and embedding).
    pub fn with(mut self, key: &'static str, value: impl Into<String>) -> Self {
        self.flags.insert(key, value.into());
        self
    }
}

impl clap::FromArgMatches for ServeArgs {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let mut args = ServeArgs::default();
        args.update_from_arg_matches(matches)?;
        Ok(args)
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        if let Some(path) = matches.get_one::<PathBuf>("config") {
            self.config = Some(path.clone());
        }
        for k in KEYS.iter().filter(|k| k.flag.is_some()) {
            if let Some(v) = matches.get_one::<String>(k.key) {
                self.flags.insert(k.key, v.clone());
            }
        }
        Ok(())
    }
}

impl clap::Args for ServeArgs {
    fn augment_args(cmd: Command) -> Command {
        let cmd = cmd.arg(
            Arg::new("config")
                .long("config")
                .env("REGGUARD_CONFIG")
                .value_name("FILE")
                .value_parser(clap::value_parser!(PathBuf))
                .help("TOML configuration file (the keys listed below)"),
        );
        KEYS.iter().fold(cmd, |cmd, k| match k.flag {
            None => cmd,
            Some(flag) => cmd.arg(
                Arg::new(k.key)
                    .long(flag)
                    .value_name(k.kind.value_name())
                    .help(format!("{} [env: {}]", k.help.replace('`', ""), k.env())),
            ),
        })
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

/// Where a value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Default,
    File,
    Env,
    Flag,
}

/// A value as a source gave it: text from flags and the environment, TOML from the file.
#[derive(Debug, Clone)]
pub(crate) enum Raw {
    Text(String),
    Toml(toml::Value),
}

impl Raw {
    /// A scalar as text; `None` for arrays and tables.
    fn text(&self) -> Option<String> {
        match self {
            Raw::Text(t) => Some(t.clone()),
            Raw::Toml(toml::Value::String(s)) => Some(s.clone()),
            Raw::Toml(toml::Value::Integer(n)) => Some(n.to_string()),
            Raw::Toml(toml::Value::Float(f)) => Some(f.to_string()),
            Raw::Toml(toml::Value::Boolean(b)) => Some(b.to_string()),
            Raw::Toml(_) => None,
        }
    }
}

/// Every key's winning value and its source.
#[derive(Debug)]
pub(crate) struct Merged {
    values: BTreeMap<&'static str, (Raw, Source)>,
    /// Keys the section builders asked for; a key never read is a table row without a setting.
    read: RefCell<BTreeSet<&'static str>>,
    pub(crate) env: Environment,
}

impl Merged {
    /// Defaults, then the file, then the environment, then the flags: the last one given wins.
    pub(crate) fn new(
        args: &ServeArgs,
        env: &Environment,
        file: Option<(&Path, toml::Table)>,
    ) -> Result<Self, ConfigError> {
        let mut values = BTreeMap::new();
        for k in KEYS {
            if let keys::Default::Value(v) = k.default {
                values.insert(k.key, (Raw::Text(v.to_string()), Source::Default));
            }
        }
        if let Some((path, table)) = file {
            for (key, value) in flatten(path, table)? {
                values.insert(key, (Raw::Toml(value), Source::File));
            }
        }
        for k in KEYS {
            if let Some(v) = env.get(&k.env()) {
                values.insert(k.key, (Raw::Text(v.to_string()), Source::Env));
            }
        }
        for (key, v) in &args.flags {
            let k = row(key)?;
            values.insert(k.key, (Raw::Text(v.clone()), Source::Flag));
        }
        Ok(Merged {
            values,
            read: RefCell::default(),
            env: env.clone(),
        })
    }

    /// The winning raw value of `key`, if any source (or the default) gives one.
    pub(crate) fn raw(&self, key: &'static str) -> Result<Option<&(Raw, Source)>, ConfigError> {
        let k = row(key)?;
        self.read.borrow_mut().insert(k.key);
        Ok(self.values.get(k.key))
    }

    /// Keys of the table no builder has read.
    #[cfg(test)]
    pub(crate) fn unread(&self) -> Vec<&'static str> {
        let read = self.read.borrow();
        KEYS.iter()
            .map(|k| k.key)
            .filter(|k| !read.contains(k))
            .collect()
    }

    /// `key`'s value as text, if set.
    pub(crate) fn text(&self, key: &'static str) -> Result<Option<String>, ConfigError> {
        match self.raw(key)? {
            None => Ok(None),
            Some((raw, _)) => raw
                .text()
                .map(Some)
                .ok_or_else(|| super::invalid(key, "expected a single value, not a list or table")),
        }
    }

    /// A key whose table row has a default: its value, never unset.
    fn required(&self, key: &'static str) -> Result<String, ConfigError> {
        self.text(key)?
            .ok_or_else(|| super::invalid(key, "has no value and no default"))
    }

    pub(crate) fn duration(&self, key: &'static str) -> Result<Duration, ConfigError> {
        parse_duration(key, &self.required(key)?)
    }

    pub(crate) fn bool(&self, key: &'static str) -> Result<bool, ConfigError> {
        let text = self.required(key)?;
        text.trim()
            .parse()
            .map_err(|_| super::invalid(key, format!("\"{text}\" is not true or false")))
    }

    /// A whole number, at least the row's `min`, that fits `T`.
    pub(crate) fn count<T: TryFrom<u64>>(&self, key: &'static str) -> Result<T, ConfigError> {
        let text = self.required(key)?;
        let n: u64 = text
            .trim()
            .parse()
            .map_err(|_| super::invalid(key, format!("\"{text}\" is not a whole number")))?;
        if let Kind::Count { min } = row(key)?.kind {
            if n < min {
                return Err(super::invalid(key, format!("must be at least {min}")));
            }
        }
        T::try_from(n).map_err(|_| super::invalid(key, format!("{n} is too large")))
    }

    /// One of the row's words, read into `T` through its serde names.
    pub(crate) fn choice<T: serde::de::DeserializeOwned>(
        &self,
        key: &'static str,
    ) -> Result<T, ConfigError> {
        let text = self.required(key)?;
        let words = match row(key)?.kind {
            Kind::Choice(words) => words.join(", "),
            _ => String::new(),
        };
        T::deserialize(
            serde::de::value::StrDeserializer::<serde::de::value::Error>::new(text.trim()),
        )
        .map_err(|_| super::invalid(key, format!("\"{text}\" is not one of {words}")))
    }

    pub(crate) fn path(&self, key: &'static str) -> Result<Option<PathBuf>, ConfigError> {
        Ok(self.text(key)?.map(PathBuf::from))
    }

    /// An array in the file; comma-separated text from flags and the environment.
    pub(crate) fn list(&self, key: &'static str) -> Result<Vec<String>, ConfigError> {
        let items = match self.raw(key)? {
            None => Vec::new(),
            Some((Raw::Toml(toml::Value::Array(items)), _)) => items
                .iter()
                .map(|v| match v {
                    toml::Value::String(s) => Ok(s.clone()),
                    other => Err(super::invalid(key, format!("{other} is not a string"))),
                })
                .collect::<Result<_, _>>()?,
            Some((raw, _)) => raw
                .text()
                .unwrap_or_default()
                .split(',')
                .map(str::to_string)
                .collect(),
        };
        Ok(items
            .into_iter()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect())
    }

    /// Every key with its value as TOML (secrets masked) and its source, in table order.
    pub(crate) fn effective(&self) -> Vec<(&'static Key, Option<toml::Value>, Source)> {
        KEYS.iter()
            .map(|k| match self.values.get(k.key) {
                None => (k, None, Source::Default),
                Some((raw, source)) => (k, Some(shown(k, raw)), *source),
            })
            .collect()
    }
}

/// The table row of `key`; a key missing from the table is a programming error, reported
/// rather than panicked on.
fn row(key: &str) -> Result<&'static Key, ConfigError> {
    keys::find(key).ok_or_else(|| ConfigError::Parse {
        path: PathBuf::from("<keys>"),
        message: format!("`{key}` is not in the key table"),
    })
}

/// How a value is printed by `config check`: typed as in the file, secrets masked.
fn shown(k: &Key, raw: &Raw) -> toml::Value {
    if k.secret {
        return toml::Value::String("********".into());
    }
    if let Raw::Toml(v) = raw {
        return v.clone();
    }
    let text = raw.text().unwrap_or_default();
    match k.kind {
        Kind::Bool => text.trim().parse().map(toml::Value::Boolean).ok(),
        Kind::Count { .. } => text.trim().parse().map(toml::Value::Integer).ok(),
        Kind::List => Some(toml::Value::Array(
            text.split(',')
                .map(|s| toml::Value::String(s.trim().to_string()))
                .collect(),
        )),
        Kind::Url => Some(toml::Value::String(mask_userinfo(&text))),
        _ => None,
    }
    .unwrap_or(toml::Value::String(text))
}

/// `http://user:secret@host` with the password masked.
fn mask_userinfo(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.split_once('@') {
        Some((userinfo, host)) if !userinfo.contains('/') => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:********@{host}")
        }
        _ => url.to_string(),
    }
}

/// The file's keys, by table key; an unknown key or section is an error naming it.
fn flatten(
    path: &Path,
    table: toml::Table,
) -> Result<Vec<(&'static str, toml::Value)>, ConfigError> {
    let unknown = |shown: String, word: &str, candidates: Vec<&'static str>| ConfigError::Parse {
        path: path.to_path_buf(),
        message: format!(
            "unknown key {shown}{}",
            keys::closest(word, candidates)
                .map(|c| format!(" (did you mean `{c}`?)"))
                .unwrap_or_default()
        ),
    };
    let top_names = || KEYS.iter().filter(|k| k.section().is_none()).map(|k| k.key);
    let mut out = Vec::new();
    for (name, value) in table {
        let is_section = KEYS.iter().any(|k| k.section() == Some(name.as_str()));
        match value {
            toml::Value::Table(inner) if is_section => {
                for (inner_name, v) in inner {
                    let full = format!("{name}.{inner_name}");
                    match keys::find(&full) {
                        Some(k) => out.push((k.key, v)),
                        None => {
                            let names = KEYS
                                .iter()
                                .filter(|k| k.section() == Some(name.as_str()))
                                .map(|k| k.name())
                                .collect();
                            return Err(unknown(
                                format!("`{inner_name}` in `[{name}]`"),
                                &inner_name,
                                names,
                            ));
                        }
                    }
                }
            }
            v => match keys::find(&name) {
                Some(k) if k.section().is_none() => out.push((k.key, v)),
                _ => return Err(unknown(format!("`{name}`"), &name, top_names().collect())),
            },
        }
    }
    Ok(out)
}

/// `30s`, `15m`, `1h`, `1h 30m` or a number of seconds; zero is refused.
pub(crate) fn parse_duration(key: &'static str, text: &str) -> Result<Duration, ConfigError> {
    let t = text.trim();
    let d = match t.parse::<u64>() {
        Ok(seconds) => Ok(Duration::from_secs(seconds)),
        Err(_) => humantime::parse_duration(t),
    }
    .map_err(|_| {
        super::invalid(
            key,
            format!("\"{text}\" is not a duration (use 30s, 15m, 1h)"),
        )
    })?;
    if d.is_zero() {
        return Err(super::invalid(key, "must be greater than zero"));
    }
    Ok(d)
}

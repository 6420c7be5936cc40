//! `threadline serve --config FILE`: a TOML file whose keys are `serve`'s long
//! options, merged under the command line and the environment, and the
//! effective configuration `serve --print-config` shows.
//!
//! Generic over `serve`'s clap definition: every long option of `serve` is a
//! key (kebab case as on the command line, or snake case), with no list kept by
//! hand. A file value is checked by clap's own value parser for that option, then
//! handed to clap as if given on the command line, but only for an option that
//! neither the command line nor the environment set, so the precedence is
//! flag, then env, then file, then default.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, Command, CommandFactory, FromArgMatches};
use toml::Spanned;

use crate::Cli;

/// Options that name the file itself or act on it: never keys in it.
const NOT_IN_FILE: [&str; 4] = ["config", "print-config", "help", "version"];

/// Where an option's effective value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Flag,
    Env,
    File,
    Default,
    Unset,
}

/// One option of `serve` as it is in force.
#[derive(Debug, Clone)]
pub struct Setting {
    /// The long option, which is also its key in the file.
    pub key: String,
    /// Its raw values (empty when unset); `<redacted>` for a secret.
    pub values: Vec<String>,
    pub source: Source,
    /// The environment variable that sets it, if any.
    pub env: Option<String>,
    /// A flag without a value (`--print-config`): shown as a boolean.
    pub switch: bool,
}

/// The effective configuration of `serve`, in the order of `serve --help`.
#[derive(Debug, Clone, Default)]
pub struct Effective {
    pub file: Option<PathBuf>,
    pub settings: Vec<Setting>,
}

/// Parses the command line, merging `serve --config FILE` into it. Exits like
/// clap on a command-line mistake; returns an error for a bad file.
pub fn parse() -> anyhow::Result<(Cli, Option<Effective>)> {
    parse_from(std::env::args_os().collect())
}

fn parse_from(argv: Vec<OsString>) -> anyhow::Result<(Cli, Option<Effective>)> {
    let cmd = Cli::command();
    let matches = cmd.clone().get_matches_from(&argv);
    let Some(("serve", serve)) = matches.subcommand() else {
        return Ok((from_matches(&matches), None));
    };
    let serve_cmd = cmd
        .find_subcommand("serve")
        .context("the serve subcommand")?
        .clone();
    let Some(path) = serve.get_one::<PathBuf>("config").cloned() else {
        return Ok((
            from_matches(&matches),
            Some(effective(&serve_cmd, serve, &BTreeSet::new(), None)),
        ));
    };
    let entries = read(&path, &serve_cmd)?;
    let mut argv = argv;
    let mut from_file = BTreeSet::new();
    for entry in entries {
        if matches!(
            serve.value_source(&entry.id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            continue;
        }
        argv.extend(entry.args);
        from_file.insert(entry.id);
    }
    let merged = match cmd.try_get_matches_from(&argv) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("threadline: with the options from {}:", path.display());
            e.exit()
        }
    };
    let Some(("serve", serve)) = merged.subcommand() else {
        bail!(
            "the serve subcommand vanished while merging {}",
            path.display()
        );
    };
    let effective = effective(&serve_cmd, serve, &from_file, Some(path));
    Ok((from_matches(&merged), Some(effective)))
}

fn from_matches(matches: &ArgMatches) -> Cli {
    Cli::from_arg_matches(matches).unwrap_or_else(|e| e.exit())
}

/// One key of the file, checked, as the arguments clap would see.
#[derive(Debug)]
struct Entry {
    id: String,
    args: Vec<OsString>,
}

/// Reads and checks the file: every key an option of `serve`, every value one its parser takes.
fn read(path: &Path, serve: &Command) -> anyhow::Result<Vec<Entry>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the config file {}", path.display()))?;
    let table: BTreeMap<Spanned<String>, Spanned<toml::Value>> =
        toml::from_str(&text).map_err(|e| {
            anyhow!(
                "config file {}: {}",
                path.display(),
                e.to_string().trim_end()
            )
        })?;
    // Checks one option at a time against serve's own parsers, with no environment
    // (the real merge applies it), so a message names the file's key and line.
    let probe = serve
        .clone()
        .no_binary_name(true)
        .mut_args(|a| a.env(None::<&'static str>));
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    let mut entries = Vec::new();
    for (key, value) in &table {
        let line = line_of(&text, key.span().start);
        let at = |what: String| anyhow!("config file {} line {line}: {what}", path.display());
        let long = key.get_ref().replace('_', "-");
        let arg = serve
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()))
            .filter(|_| !NOT_IN_FILE.contains(&long.as_str()))
            .ok_or_else(|| {
                at(format!(
                    "unknown key `{}` (keys are the long options of `threadline serve`, \
                     such as `max-connections`; see `threadline serve --help`)",
                    key.get_ref()
                ))
            })?;
        if let Some(other) = seen.insert(long.clone(), key.get_ref().clone()) {
            return Err(at(format!(
                "`{}` sets the same option as `{other}`",
                key.get_ref()
            )));
        }
        let switch = matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse);
        let many = matches!(arg.get_action(), ArgAction::Append);
        let values: Vec<String> = match value.get_ref() {
            toml::Value::Array(items) if many => items
                .iter()
                .map(scalar)
                .collect::<Option<_>>()
                .ok_or_else(|| at(format!("`{}` takes a list of plain values", key.get_ref())))?,
            toml::Value::Boolean(b) if switch => {
                let on = *b == matches!(arg.get_action(), ArgAction::SetTrue);
                if on {
                    entries.push(Entry {
                        id: arg.get_id().as_str().to_owned(),
                        args: vec![format!("--{long}").into()],
                    });
                }
                continue;
            }
            _ if switch => {
                return Err(at(format!("`{}` is true or false", key.get_ref())));
            }
            v => vec![scalar(v).ok_or_else(|| {
                at(format!(
                    "`{}` takes a string, a number or a boolean",
                    key.get_ref()
                ))
            })?],
        };
        let args: Vec<OsString> = values
            .iter()
            .map(|v| OsString::from(format!("--{long}={v}")))
            .collect();
        if let Err(e) = probe.clone().try_get_matches_from(&args) {
            let message = e.to_string();
            let first = message.lines().next().unwrap_or_default();
            return Err(at(format!(
                "`{}`: {}",
                key.get_ref(),
                first.strip_prefix("error: ").unwrap_or(first)
            )));
        }
        entries.push(Entry {
            id: arg.get_id().as_str().to_owned(),
            args,
        });
    }
    Ok(entries)
}

/// A TOML value as the text clap would parse, if it is a plain one.
fn scalar(value: &toml::Value) -> Option<String> {
    match value {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        toml::Value::Datetime(d) => Some(d.to_string()),
        toml::Value::Array(_) | toml::Value::Table(_) => None,
    }
}

/// The 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// Whether an option holds a secret: its environment value is hidden from `--help`,
/// or its name says so.
fn is_secret(arg: &clap::Arg) -> bool {
    let long = arg.get_long().unwrap_or_default();
    arg.is_hide_env_values_set()
        || ["secret", "token", "password"]
            .iter()
            .any(|w| long.ends_with(w))
}

fn effective(
    serve_cmd: &Command,
    serve: &ArgMatches,
    from_file: &BTreeSet<String>,
    file: Option<PathBuf>,
) -> Effective {
    let mut settings = Vec::new();
    for arg in serve_cmd.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        // The file itself is named in the output's header, not as a key of it.
        if matches!(long, "help" | "version" | "print-config" | "config") {
            continue;
        }
        let id = arg.get_id().as_str();
        let switch = matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse);
        let source = if from_file.contains(id) {
            Source::File
        } else {
            match serve.value_source(id) {
                Some(ValueSource::CommandLine) => Source::Flag,
                Some(ValueSource::EnvVariable) => Source::Env,
                Some(ValueSource::DefaultValue) => Source::Default,
                _ => Source::Unset,
            }
        };
        let mut values: Vec<String> = serve
            .get_raw(id)
            .map(|raw| raw.map(|v| v.to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        if is_secret(arg) && !values.is_empty() {
            values = vec!["<redacted>".to_owned()];
        }
        settings.push(Setting {
            key: long.to_owned(),
            values,
            source,
            env: arg.get_env().map(|e| e.to_string_lossy().into_owned()),
            switch,
        });
    }
    Effective { file, settings }
}

impl Effective {
    /// The configuration as a TOML file `--config` accepts, each value with where it came from.
    pub fn render(&self) -> String {
        let mut out = String::from(
            "# The effective configuration of `threadline serve` (secrets redacted).\n\
             # Precedence: flag, then environment, then config file, then default.\n",
        );
        if let Some(file) = &self.file {
            let _ = writeln!(out, "# config file: {}", file.display());
        }
        for s in &self.settings {
            let origin = match (s.source, &self.file, &s.env) {
                (Source::Flag, _, _) => "flag".to_owned(),
                (Source::Env, _, Some(env)) => format!("env {env}"),
                (Source::Env, _, None) => "env".to_owned(),
                (Source::File, Some(f), _) => format!("file {}", f.display()),
                (Source::File, None, _) => "file".to_owned(),
                (Source::Default, _, _) => "default".to_owned(),
                (Source::Unset, _, _) => {
                    let _ = writeln!(out, "# {} is unset", s.key);
                    continue;
                }
            };
            let value = if s.switch {
                s.values.first().cloned().unwrap_or_else(|| "false".into())
            } else if s.values.len() == 1 {
                toml_value(&s.values[0])
            } else {
                let items: Vec<String> = s.values.iter().map(|v| toml_value(v)).collect();
                format!("[{}]", items.join(", "))
            };
            let _ = writeln!(out, "{} = {value}  # {origin}", s.key);
        }
        out
    }
}

/// A value written back as TOML: an integer bare, anything else a string.
fn toml_value(v: &str) -> String {
    match v.parse::<i64>() {
        Ok(n) if n.to_string() == v => v.to_owned(),
        _ => serde_json::to_string(v).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_counted_from_one() {
        assert_eq!(line_of("a = 1\nb = 2\n", 0), 1);
        assert_eq!(line_of("a = 1\nb = 2\n", 6), 2);
    }

    #[test]
    fn values_round_trip_as_toml() {
        assert_eq!(toml_value("16384"), "16384");
        assert_eq!(toml_value("007"), "\"007\"");
        assert_eq!(toml_value("30s"), "\"30s\"");
        assert_eq!(toml_value("a\"b"), "\"a\\\"b\"");
    }
}

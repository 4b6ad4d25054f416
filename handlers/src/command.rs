//! The command language shared by ChatOps, `ctl` and `[[schedules]]`:
//! `verb positional... key=value...`.
//!
//! Words are split on whitespace and never reach a shell: every word must consist of letters,
//! digits and `. _ : / @ + , = -`, so a shell metacharacter is refused before anything else
//! looks at it. Each value is then validated by type (RFC 1123 names, semver versions,
//! durations), and every refusal names the argument that was wrong.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::kind::JobKind;

/// Longest accepted command line; chat messages beyond this are not commands.
pub const MAX_COMMAND_LEN: usize = 1024;
/// Most jobs `jobs` lists at once.
pub const MAX_JOBS_LIMIT: usize = 200;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CommandError {
    #[error("empty command; send `help` for the list of commands")]
    Empty,
    #[error("command is {0} characters long; at most {MAX_COMMAND_LEN} are accepted")]
    TooLong(usize),
    #[error(
        "argument {word:?} contains {ch:?}, which is not allowed (letters, digits and . _ : / @ + , = - only)"
    )]
    BadCharacter { word: String, ch: char },
    #[error("unknown command {verb:?}{hint}; send `help` for the list")]
    UnknownVerb { verb: String, hint: String },
    #[error("`{verb}` needs {what}; usage: {usage}")]
    Missing {
        verb: &'static str,
        what: &'static str,
        usage: &'static str,
    },
    #[error("`{verb}` takes no argument {word:?}; usage: {usage}")]
    Unexpected {
        verb: &'static str,
        word: String,
        usage: &'static str,
    },
    #[error("`{verb}` has no option {key:?}; usage: {usage}")]
    UnknownKey {
        verb: &'static str,
        key: String,
        usage: &'static str,
    },
    #[error("option {0:?} is given twice")]
    DuplicateKey(String),
    #[error("invalid {name} {value:?}: {reason}")]
    Invalid {
        name: String,
        value: String,
        reason: String,
    },
}

/// A tokenized command line before its verb is interpreted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandLine {
    pub verb: String,
    pub positional: Vec<String>,
    pub named: BTreeMap<String, String>,
}

/// What a command asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    Help {
        topic: Option<String>,
    },
    Status,
    Jobs {
        kind: Option<JobKind>,
        state: Option<String>,
        limit: usize,
    },
    Job {
        id: String,
    },
    Cancel {
        id: String,
    },
    /// Start a job of `kind` with validated `params`.
    Submit {
        kind: JobKind,
        params: Map<String, Value>,
    },
}

/// Reads a job verb's words into the job's validated parameters.
pub type ParamParser = fn(&mut Args) -> Result<Map<String, Value>, CommandError>;

/// One verb: its name, its usage line, what it does and, for job verbs, the kind it starts
/// and how its words become parameters. Job verbs are declared by their kind's descriptor.
#[derive(Debug, Clone, Copy)]
pub struct Verb {
    pub name: &'static str,
    /// Other names that mean the same.
    pub aliases: &'static [&'static str],
    pub usage: &'static str,
    pub summary: &'static str,
    pub kind: Option<JobKind>,
    pub params: Option<ParamParser>,
}

/// The verbs that are no job: they answer from the agent's state.
const BUILTIN_VERBS: &[Verb] = &[
    Verb {
        name: "help",
        aliases: &[],
        usage: "help [verb]",
        summary: "list the commands, or explain one",
        kind: None,
        params: None,
    },
    Verb {
        name: "status",
        aliases: &[],
        usage: "status",
        summary: "agents alive, queue depth, locks held, deferred jobs, last result per job kind",
        kind: None,
        params: None,
    },
    Verb {
        name: "jobs",
        aliases: &[],
        usage: "jobs [kind=K] [state=S] [limit=N]",
        summary: "recent jobs, newest first",
        kind: None,
        params: None,
    },
    Verb {
        name: "job",
        aliases: &[],
        usage: "job <id>",
        summary: "one job's record",
        kind: None,
        params: None,
    },
    Verb {
        name: "cancel",
        aliases: &[],
        usage: "cancel <id>",
        summary: "cancel a queued, waiting, running or approval-pending job",
        kind: None,
        params: None,
    },
];

/// Every verb: the built-in ones, then each kind's, in the order of the kinds.
pub fn verbs() -> impl Iterator<Item = &'static Verb> {
    BUILTIN_VERBS
        .iter()
        .chain(crate::KINDS.iter().flat_map(|d| d.verbs.iter()))
}

/// The verb called `name` or one of its aliases.
pub fn verb(name: &str) -> Option<&'static Verb> {
    verbs().find(|v| v.name == name || v.aliases.contains(&name))
}

fn is_allowed(ch: char) -> bool {
    ch.is_ascii_alphanumeric() || matches!(ch, '.' | '_' | ':' | '/' | '@' | '+' | ',' | '=' | '-')
}

/// Shortens a user-supplied word for an error message.
pub fn clip(word: &str) -> String {
    if word.chars().count() > 64 {
        let mut s: String = word.chars().take(61).collect();
        s.push_str("...");
        s
    } else {
        word.to_string()
    }
}

/// Splits a command line into verb, positional words and `key=value` options.
pub fn tokenize(text: &str) -> Result<CommandLine, CommandError> {
    if text.len() > MAX_COMMAND_LEN {
        return Err(CommandError::TooLong(text.len()));
    }
    let mut words = text.split_whitespace();
    let verb = words.next().ok_or(CommandError::Empty)?;
    let mut line = CommandLine {
        verb: String::new(),
        positional: Vec::new(),
        named: BTreeMap::new(),
    };
    for word in std::iter::once(verb).chain(words.clone()) {
        if let Some(ch) = word.chars().find(|c| !is_allowed(*c)) {
            return Err(CommandError::BadCharacter {
                word: clip(word),
                ch,
            });
        }
    }
    line.verb = verb.to_ascii_lowercase();
    for word in words {
        match word.split_once('=') {
            Some((key, value)) => {
                if key.is_empty() || value.is_empty() {
                    return Err(CommandError::Invalid {
                        name: "option".into(),
                        value: clip(word),
                        reason: "expected key=value".into(),
                    });
                }
                if line
                    .named
                    .insert(key.to_ascii_lowercase(), value.to_string())
                    .is_some()
                {
                    return Err(CommandError::DuplicateKey(clip(key)));
                }
            }
            None => line.positional.push(word.to_string()),
        }
    }
    Ok(line)
}

/// Parses and validates a whole command.
pub fn parse(text: &str) -> Result<Request, CommandError> {
    let line = tokenize(text)?;
    let Some(verb) = verb(&line.verb) else {
        let hint = suggest(&line.verb)
            .map(|s| format!(" (did you mean `{s}`?)"))
            .unwrap_or_default();
        return Err(CommandError::UnknownVerb {
            verb: clip(&line.verb),
            hint,
        });
    };
    let mut args = Args { verb, line };
    let request = match verb.name {
        "help" => {
            let topic = args.optional_positional()?;
            if let Some(t) = &topic
                && self::verb(t).is_none()
            {
                return Err(CommandError::UnknownVerb {
                    verb: clip(t),
                    hint: String::new(),
                });
            }
            Request::Help { topic }
        }
        "status" => Request::Status,
        "jobs" => {
            let kind = args
                .take("kind")
                .map(|k| {
                    k.parse::<JobKind>()
                        .map_err(|reason| CommandError::Invalid {
                            name: "kind".into(),
                            value: clip(&k),
                            reason,
                        })
                })
                .transpose()?;
            let state = args.take("state").map(validate_state).transpose()?;
            let limit = match args.take("limit") {
                Some(v) => match v.parse::<usize>() {
                    Ok(n) if (1..=MAX_JOBS_LIMIT).contains(&n) => n,
                    _ => {
                        return Err(CommandError::Invalid {
                            name: "limit".into(),
                            value: clip(&v),
                            reason: format!("expected a number from 1 to {MAX_JOBS_LIMIT}"),
                        });
                    }
                },
                None => 20,
            };
            Request::Jobs { kind, state, limit }
        }
        "job" => Request::Job {
            id: validate_job_id(&args.required_positional("a job id")?)?,
        },
        "cancel" => Request::Cancel {
            id: validate_job_id(&args.required_positional("a job id")?)?,
        },
        other => match (verb.kind, verb.params) {
            (Some(kind), Some(params)) => Request::Submit {
                kind,
                params: params(&mut args)?,
            },
            _ => {
                return Err(CommandError::UnknownVerb {
                    verb: other.to_string(),
                    hint: String::new(),
                });
            }
        },
    };
    args.finish()?;
    Ok(request)
}

/// A verb's words as its parser consumes them, so leftovers are reported, not ignored.
pub struct Args {
    verb: &'static Verb,
    line: CommandLine,
}

impl Args {
    /// The value of `key=value`, taken.
    pub fn take(&mut self, key: &str) -> Option<String> {
        self.line.named.remove(key)
    }

    pub fn optional_positional(&mut self) -> Result<Option<String>, CommandError> {
        if self.line.positional.is_empty() {
            Ok(None)
        } else {
            Ok(Some(self.line.positional.remove(0)))
        }
    }

    /// A positional word that is not what the verb takes.
    pub fn unexpected(&self, word: &str) -> CommandError {
        CommandError::Unexpected {
            verb: self.verb.name,
            word: clip(word),
            usage: self.verb.usage,
        }
    }

    pub fn verb_name(&self) -> &'static str {
        self.verb.name
    }

    pub fn required_positional(&mut self, what: &'static str) -> Result<String, CommandError> {
        self.optional_positional()?.ok_or(CommandError::Missing {
            verb: self.verb.name,
            what,
            usage: self.verb.usage,
        })
    }

    fn finish(self) -> Result<(), CommandError> {
        if let Some(word) = self.line.positional.first() {
            return Err(CommandError::Unexpected {
                verb: self.verb.name,
                word: clip(word),
                usage: self.verb.usage,
            });
        }
        if let Some(key) = self.line.named.keys().next() {
            return Err(CommandError::UnknownKey {
                verb: self.verb.name,
                key: clip(key),
                usage: self.verb.usage,
            });
        }
        Ok(())
    }
}

fn suggest(word: &str) -> Option<&'static str> {
    verbs()
        .map(|v| (v.name, edit_distance(word, v.name)))
        .filter(|(_, d)| *d <= 2)
        .min_by_key(|(_, d)| *d)
        .map(|(n, _)| n)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur.push((prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// An RFC 1123 label: lower-case letters, digits and `-`, 1 to 63 characters, starting and
/// ending with a letter or digit. Kubernetes namespaces and most of our names are labels.
pub fn validate_label(name: &str, value: &str) -> Result<String, CommandError> {
    let ok = !value.is_empty()
        && value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !value.starts_with('-')
        && !value.ends_with('-');
    if ok {
        Ok(value.to_string())
    } else {
        Err(CommandError::Invalid {
            name: name.to_string(),
            value: clip(value),
            reason: "expected an RFC 1123 label (lower-case letters, digits and '-', at most 63)"
                .into(),
        })
    }
}

/// A comma-separated list of RFC 1123 labels, duplicates dropped.
pub fn names_list(name: &str, value: &str) -> Result<Value, CommandError> {
    let mut out = Vec::new();
    for part in value.split(',') {
        let v = validate_label(name, part)?;
        if !out.contains(&Value::from(v.clone())) {
            out.push(Value::from(v));
        }
    }
    Ok(Value::Array(out))
}

/// A duration such as `72h`, `90s` or `30d`.
pub fn duration(name: &str, value: &str) -> Result<Duration, CommandError> {
    match humantime::parse_duration(value) {
        Ok(d) if d > Duration::ZERO => Ok(d),
        Ok(_) => Err(CommandError::Invalid {
            name: name.into(),
            value: clip(value),
            reason: "must be longer than zero".into(),
        }),
        Err(e) => Err(CommandError::Invalid {
            name: name.into(),
            value: clip(value),
            reason: format!("expected a duration such as 72h or 30m ({e})"),
        }),
    }
}

/// A semantic version, optionally with a leading `v` as Talos writes it (`v1.13.0`).
pub fn validate_version(value: &str) -> Result<String, CommandError> {
    let bare = value.strip_prefix('v').unwrap_or(value);
    semver::Version::parse(bare)
        .map(|v| format!("v{v}"))
        .map_err(|e| CommandError::Invalid {
            name: "version".into(),
            value: clip(value),
            reason: format!("expected a semantic version such as v1.13.0 ({e})"),
        })
}

/// A node: a DNS name (RFC 1123 labels joined by dots) or an IP address.
pub fn validate_node(value: &str) -> Result<String, CommandError> {
    if value.parse::<std::net::IpAddr>().is_ok() {
        return Ok(value.to_string());
    }
    let valid = !value.is_empty()
        && value.len() <= 253
        && value.split('.').all(|l| validate_label("node", l).is_ok());
    if valid {
        Ok(value.to_string())
    } else {
        Err(CommandError::Invalid {
            name: "node".into(),
            value: clip(value),
            reason: "expected a host name or an IP address".into(),
        })
    }
}

/// A job id as the agent makes them: a lower-case ULID.
pub fn validate_job_id(value: &str) -> Result<String, CommandError> {
    let ok = value.len() == 26
        && value
            .chars()
            .all(|c| c.is_ascii_digit() || c.is_ascii_lowercase());
    if ok {
        Ok(value.to_string())
    } else {
        Err(CommandError::Invalid {
            name: "job id".into(),
            value: clip(value),
            reason: "expected a 26-character job id as printed by `jobs`".into(),
        })
    }
}

/// A git branch, tag or commit, by git's own ref-name rules (the subset the charset leaves).
pub fn validate_git_ref(value: &str) -> Result<String, CommandError> {
    let bad = value.starts_with('-')
        || value.starts_with('/')
        || value.ends_with('/')
        || value.ends_with('.')
        || value.ends_with(".lock")
        || value.contains("..")
        || value.contains("//")
        || value.contains('@')
        || value.contains(':')
        || value.contains(',')
        || value.contains('=')
        || value.len() > 255;
    if bad {
        Err(CommandError::Invalid {
            name: "ref".into(),
            value: clip(value),
            reason: "expected a branch, tag or commit sha".into(),
        })
    } else {
        Ok(value.to_string())
    }
}

fn validate_state(value: String) -> Result<String, CommandError> {
    const STATES: [&str; 7] = [
        "queued",
        "waiting",
        "running",
        "awaiting_approval",
        "succeeded",
        "failed",
        "cancelled",
    ];
    if STATES.contains(&value.as_str()) {
        Ok(value)
    } else {
        Err(CommandError::Invalid {
            name: "state".into(),
            value: clip(&value),
            reason: format!("expected one of {}", STATES.join(", ")),
        })
    }
}

/// The help text: every verb, or one verb in detail.
pub fn help(topic: Option<&str>) -> String {
    match topic.and_then(verb) {
        Some(v) if v.aliases.is_empty() => format!("{}\n  {}", v.usage, v.summary),
        Some(v) => format!(
            "{}\n  {} (also: {})",
            v.usage,
            v.summary,
            v.aliases.join(", ")
        ),
        None => {
            let width = verbs().map(|v| v.usage.len()).max().unwrap_or(0);
            verbs()
                .map(|v| format!("{:width$}  {}", v.usage, v.summary))
                .collect::<Vec<_>>()
                .join("\n")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(r: Request) -> (JobKind, Map<String, Value>) {
        match r {
            Request::Submit { kind, params } => (kind, params),
            other => panic!("expected a job, got {other:?}"),
        }
    }

    #[test]
    fn every_verb_with_its_arguments() {
        let (k, p) = params(parse("backup ns=media,home ttl=72h").expect("backup"));
        assert_eq!(k, JobKind::BACKUP);
        assert_eq!(p["namespaces"], serde_json::json!(["media", "home"]));
        assert_eq!(p["ttl_seconds"], 72 * 3600);
        let (k, p) = params(parse("upgrade talos 1.13.2 nodes=cp-1,10.0.0.12").expect("up"));
        assert_eq!(k, JobKind::UPGRADE);
        assert_eq!(p["version"], "v1.13.2");
        assert_eq!(p["nodes"], serde_json::json!(["cp-1", "10.0.0.12"]));
        assert!(p.get("force").is_none());
        let (_, p) = params(parse("upgrade talos v1.13.2 force=true reason=cve-fix").expect("up"));
        assert_eq!(
            (&p["force"], &p["reason"]),
            (&serde_json::json!(true), &serde_json::json!("cve-fix"))
        );
        let (k, p) = params(parse("drill ns=media etcd").expect("drill"));
        assert_eq!(k, JobKind::RESTORE_DRILL);
        assert_eq!(p["etcd"], true);
        let (k, p) = params(parse("plan feature/x").expect("plan"));
        assert_eq!(k, JobKind::RECONCILE);
        assert_eq!(p["ref"], "feature/x");
        let (k, _) = params(parse("snapshot").expect("snapshot"));
        assert_eq!(k, JobKind::ETCD_SNAPSHOT);
        let (k, p) = params(parse("apply 01jd0000000000000000000000").expect("apply"));
        assert_eq!(k, JobKind::APPLY);
        assert_eq!(p["plan_job"], "01jd0000000000000000000000");
        assert_eq!(parse("STATUS").expect("status"), Request::Status);
        assert_eq!(
            parse("jobs kind=backup limit=5").expect("jobs"),
            Request::Jobs {
                kind: Some(JobKind::BACKUP),
                state: None,
                limit: 5
            }
        );
    }

    #[test]
    fn refusals_name_the_bad_argument() {
        let cases: &[(&str, &str)] = &[
            ("backup ns=Media", "\"Media\""),
            ("backup ttl=soon", "ttl"),
            ("backup ns=media;rm", "';'"),
            ("backup ns=$(reboot)", "'$'"),
            ("backup `id`", "'`'"),
            ("backup ns=a|b", "'|'"),
            ("backup pool=x", "\"pool\""),
            ("backup extra", "\"extra\""),
            ("upgrade talos banana", "\"banana\""),
            ("upgrade kubernetes 1.30.0", "\"kubernetes\""),
            ("upgrade talos", "needs a version"),
            ("upgrade talos v1.13.2 force=true", "needs reason"),
            (
                "upgrade talos v1.13.2 force=yes reason=x",
                "only force=true",
            ),
            ("upgrade talos v1.13.2 reason=x", "goes with force=true"),
            ("upgrade talos v1.13.2 force=true reason=a;b", "';'"),
            ("job", "needs a job id"),
            ("job 123", "\"123\""),
            ("jobs limit=0", "limit"),
            ("jobs state=done", "\"done\""),
            ("plan ../etc", "\"../etc\""),
            ("bakup", "did you mean `backup`"),
            ("frobnicate", "\"frobnicate\""),
            ("backup ns=a ns=b", "twice"),
            ("", "empty"),
        ];
        for (text, needle) in cases {
            let err = parse(text).expect_err(text).to_string();
            assert!(
                err.contains(needle),
                "{text:?} -> {err:?} should name {needle}"
            );
        }
    }

    #[test]
    fn shell_metacharacters_are_refused_in_every_position() {
        for ch in [
            ';', '|', '&', '$', '`', '(', ')', '<', '>', '*', '?', '!', '~', '\'', '"', '\\', '{',
            '}',
        ] {
            let text = format!("backup ns=media{ch}x");
            assert!(
                matches!(parse(&text), Err(CommandError::BadCharacter { ch: c, .. }) if c == ch),
                "{text}"
            );
            let text = format!("sta{ch}tus");
            assert!(parse(&text).is_err(), "{text}");
        }
    }

    #[test]
    fn help_lists_every_verb() {
        let h = help(None);
        for v in verbs() {
            assert!(h.contains(v.usage), "{}", v.name);
        }
        assert!(help(Some("backup")).starts_with("backup [ns=a,b]"));
    }

    #[test]
    fn every_job_kind_has_a_verb() {
        for kind in JobKind::all() {
            assert!(
                verbs().any(|v| v.kind == Some(kind)),
                "no verb starts {kind}"
            );
        }
    }
}

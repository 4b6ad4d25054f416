//! The secret scan, before any plan: the working tree of the planned commit must hold no
//! committed credential. A finding names the file, the line and the rule, never the value:
//! the message goes to the job record, its events and the commit status. A finding means the
//! credential is in Git history and must be rotated; removing the file is not enough.
//!
//! A reviewed finding (a throwaway test key, a documented example) is silenced by an entry in
//! [`ALLOWLIST_PATH`] with a reason. A broken allowlist fails the scan: it must neither allow nor
//! block silently.
//!
//! Every regular file is read once and searched with one [`RegexSet`] pass over its bytes (a key
//! in a file with a few binary bytes is still found); line numbers are worked out only for the
//! files that matched.

use std::collections::BTreeSet;
use std::fmt;
use std::path::Path;
use std::sync::LazyLock;

use regex::bytes::{Regex, RegexSet};
use serde::Deserialize;

use super::Reconciler;
use crate::handler::{HandlerError, JobContext};

/// The allowlist, relative to the repository root.
pub const ALLOWLIST_PATH: &str = ".infraflux/secret-scan-allowlist.toml";

/// How many findings a failure message lists; the rest are counted.
const LISTED_FINDINGS: usize = 10;

/// The rules, by name (part of the public interface: allowlist entries name them) and what each
/// finds. Documented in docs/reconcile.md.
pub const RULES: &[(&str, &str)] = &[
    (
        "private-key",
        "a PEM or OpenSSH private key (`-----BEGIN ... PRIVATE KEY-----` followed by its body)",
    ),
    (
        "age-secret-key",
        "an age identity: `AGE-SECRET-KEY-1` and its 58-character bech32 body",
    ),
    (
        "aws-access-key-id",
        "an AWS access key id: `AKIA` or `ASIA` and 16 uppercase letters or digits",
    ),
    (
        "s3-secret-key",
        "a literal of 16+ characters of `[A-Za-z0-9/+=]` assigned to `*secret_key`, `*secret_access_key` or `*minio_root_password`",
    ),
    (
        "github-token",
        "a GitHub token: `ghp_`, `gho_`, `ghs_`, `ghu_`, `ghr_` and 36+ letters or digits, or `github_pat_` and 80+",
    ),
    (
        "cloudflare-api-token",
        "a 40-character literal assigned to `*cloudflare_api_token` or `*cf_api_token`, or to `api_token` in a `provider \"cloudflare\"` block",
    ),
    (
        "onepassword-token",
        "a 1Password service-account token: `ops_eyJ` and 50+ base64url characters",
    ),
    (
        "proxmox-api-token",
        "a Proxmox API token with its secret (`user@realm!tokenid=<uuid>`), or a UUID assigned to `*api_token_secret`, `*proxmox_api_token` or `*pve_token_secret`",
    ),
    (
        "talos-secrets",
        "a Talos secrets bundle or machine config: a value for `secretboxencryptionsecret`, `aescbcencryptionsecret`, `bootstraptoken` or `trustdinfo.token`, or a `key:` holding a base64 PEM key (outside a talosconfig)",
    ),
    (
        "talosconfig",
        "a talosconfig (a file with `contexts:`) with an embedded `key:` (a base64 PEM key)",
    ),
    (
        "kubeconfig",
        "a kubeconfig with embedded credentials: `client-key-data:` with a value, or a `token:` literal under `users:` in a file with `kind: Config`",
    ),
    (
        "terraform-state",
        "a committed `*.tfstate` or `*.tfstate.backup` file, whatever it holds (line 0)",
    ),
    (
        "terraform-dir",
        "a committed `.terraform/` directory (line 0; not searched further)",
    ),
    (
        "sops-encrypted",
        "a SOPS-encrypted file (`ENC[AES256_GCM,data:` values, or a `sops:` block with a `mac`): secrets live in 1Password, not in Git",
    ),
];

fn is_rule(name: &str) -> bool {
    RULES.iter().any(|(rule, _)| *rule == name)
}

/// A committed credential: where it is and which rule found it, never what it is.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Finding {
    /// Relative to the repository root, `/`-separated.
    pub path: String,
    /// 1-based; 0 for a finding about the whole file or directory.
    pub line: usize,
    pub rule: &'static str,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{} {}", self.path, self.line, self.rule)
    }
}

/// What a scan saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub files: usize,
    pub bytes: u64,
    /// Not allowlisted, sorted by path and line.
    pub findings: Vec<Finding>,
    /// Findings silenced by the allowlist.
    pub allowlisted: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("{path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("{ALLOWLIST_PATH}: {0}")]
    Allowlist(String),
    /// A pattern that does not compile: a bug, caught by the tests.
    #[error("secret scan patterns: {0}")]
    Patterns(String),
}

/// One pattern of a rule. `v`, when the pattern has that group, is the value: its line is the
/// finding's line (a multi-line pattern may start above it).
struct Pattern {
    rule: &'static str,
    regex: String,
    /// Another pattern the file must match somewhere for this one to count.
    requires: Option<&'static str>,
    /// A pattern that, if the file matches it anywhere, makes this one not count.
    unless: Option<&'static str>,
    /// Report the first match in a file only (a SOPS file has an encrypted value on every line).
    once_per_file: bool,
    /// A value that is known not to be a credential.
    ignore: Option<fn(&[u8]) -> bool>,
}

fn pattern(rule: &'static str, regex: impl ToString) -> Pattern {
    Pattern {
        rule,
        regex: regex.to_string(),
        requires: None,
        unless: None,
        once_per_file: false,
        ignore: None,
    }
}

const UUID: &str = "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}";
/// The end of a literal value: a quote, a separator, white space or the end of the line.
const VALUE_END: &str = r#"(?:["'\s,;}]|$)"#;
const TALOSCONFIG: &str = r"(?m)^contexts:";
/// `-----BEGIN`, base64-encoded: how Talos and Kubernetes embed PEM keys in YAML.
const BASE64_PEM: &str = "LS0tLS1CRUdJTi";

/// Every pattern; all are byte patterns in ASCII mode (`(?-u)`), so files that are not UTF-8
/// are searched too and the word boundaries stay cheap.
static PATTERNS: LazyLock<Vec<Pattern>> = LazyLock::new(|| {
    // A YAML `key:` holding a base64 PEM key: a talosconfig's, or a machine config's.
    let embedded_key =
        format!(r#"(?m)^[ \t]*key:[ \t]*["']?(?P<v>{BASE64_PEM}[A-Za-z0-9+/=]{{8,}})"#);
    vec![
        // The header, optional `Proc-Type:`-style headers, then the start of the body; in a
        // file, or in a string with `\n` escapes. The finding's line is the header's.
        pattern(
            "private-key",
            r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----(?:\s|\\n)*(?:[A-Za-z-]+: [^\n]*(?:\n|\\n))*(?:\s|\\n)*[A-Za-z0-9+/=]{16}",
        ),
        pattern(
            "age-secret-key",
            r"\bAGE-SECRET-KEY-1[QPZRY9X8GF2TVDW0S3JN54KHCE6MUA7L]{58}\b",
        ),
        Pattern {
            // AWS's documentation example is not a credential.
            ignore: Some(|v| v.ends_with(b"EXAMPLE")),
            ..pattern("aws-access-key-id", r"\b(?P<v>(?:AKIA|ASIA)[A-Z0-9]{16})\b")
        },
        pattern(
            "s3-secret-key",
            format!(
                r#"(?im)(?:secret_access_key|secret_key|minio_root_password)["']?\s*[:=]\s*["']?(?P<v>[A-Za-z0-9/+=]{{16,}}){VALUE_END}"#
            ),
        ),
        pattern("github-token", r"\bgh[opsur]_[A-Za-z0-9]{36,}\b"),
        pattern("github-token", r"\bgithub_pat_[A-Za-z0-9_]{80,}"),
        pattern(
            "cloudflare-api-token",
            format!(
                r#"(?im)(?:cloudflare_api_token|cf_api_token)["']?\s*[:=]\s*["']?(?P<v>[A-Za-z0-9_-]{{40}}){VALUE_END}"#
            ),
        ),
        pattern(
            "cloudflare-api-token",
            r#"provider\s+"cloudflare"\s*\{[^}]*?\bapi_token\s*=\s*"(?P<v>[A-Za-z0-9_-]{40})""#,
        ),
        pattern("onepassword-token", r"\bops_eyJ[A-Za-z0-9_-]{50,}"),
        pattern(
            "proxmox-api-token",
            format!(r"[A-Za-z0-9._-]+@[A-Za-z0-9._-]+![A-Za-z0-9._-]+=(?P<v>{UUID})"),
        ),
        pattern(
            "proxmox-api-token",
            format!(
                r#"(?i)(?:api_token_secret|proxmox_api_token|pve_token_secret)["']?\s*[:=]\s*["']?(?P<v>{UUID})"#
            ),
        ),
        pattern(
            "talos-secrets",
            r#"(?im)^[ \t]*(?:secretboxencryptionsecret|aescbcencryptionsecret|bootstraptoken):[ \t]*["']?(?P<v>[A-Za-z0-9+/=._-]{6,})"#,
        ),
        pattern(
            "talos-secrets",
            r#"(?m)^trustdinfo:[ \t]*\r?\n[ \t]+token:[ \t]*["']?(?P<v>[A-Za-z0-9._-]{6,})"#,
        ),
        Pattern {
            unless: Some(TALOSCONFIG),
            ..pattern("talos-secrets", &embedded_key)
        },
        Pattern {
            requires: Some(TALOSCONFIG),
            ..pattern("talosconfig", &embedded_key)
        },
        pattern(
            "kubeconfig",
            r#"client-key-data:[ \t]*["']?(?P<v>[A-Za-z0-9+/=]{16,})"#,
        ),
        Pattern {
            requires: Some(r#"(?m)^kind:[ \t]*["']?Config\b"#),
            ..pattern(
                "kubeconfig",
                r#"(?m)^users:[ \t]*\r?\n(?:[ \t-][^\n]*\n)*?[ \t-]+token:[ \t]*["']?(?P<v>[A-Za-z0-9._~+/=-]{8,})"#,
            )
        },
        Pattern {
            once_per_file: true,
            ..pattern("sops-encrypted", r"ENC\[AES256_GCM,data:")
        },
        Pattern {
            once_per_file: true,
            requires: Some(r"(?m)^[ \t]+mac:[ \t]*\S"),
            ..pattern("sops-encrypted", r"(?m)^sops:[ \t]*\r?$")
        },
        Pattern {
            once_per_file: true,
            requires: Some(r#""mac"\s*:"#),
            ..pattern("sops-encrypted", r#""sops"\s*:\s*\{"#)
        },
    ]
});

/// The compiled patterns: the set that finds which match, each one to place them.
struct Compiled {
    set: RegexSet,
    each: Vec<Regex>,
    requires: Vec<Option<Regex>>,
    unless: Vec<Option<Regex>>,
}

fn ascii(pattern: &str) -> String {
    format!("(?-u){pattern}")
}

static COMPILED: LazyLock<Result<Compiled, String>> = LazyLock::new(|| {
    let compile = |p: &str| Regex::new(&ascii(p)).map_err(|e| format!("pattern {p}: {e}"));
    let optional = |p: Option<&str>| p.map(compile).transpose();
    let set = RegexSet::new(PATTERNS.iter().map(|p| ascii(&p.regex)))
        .map_err(|e| format!("pattern set: {e}"))?;
    Ok(Compiled {
        set,
        each: PATTERNS
            .iter()
            .map(|p| compile(&p.regex))
            .collect::<Result<_, _>>()?,
        requires: PATTERNS
            .iter()
            .map(|p| optional(p.requires))
            .collect::<Result<_, _>>()?,
        unless: PATTERNS
            .iter()
            .map(|p| optional(p.unless))
            .collect::<Result<_, _>>()?,
    })
});

/// Scans the working tree at `root` and applies its allowlist.
pub fn scan(root: &Path) -> Result<Report, ScanError> {
    let compiled = COMPILED
        .as_ref()
        .map_err(|e| ScanError::Patterns(e.clone()))?;
    let allowlist = Allowlist::load(root)?;
    let mut report = Report::default();
    let mut findings = Vec::new();
    walk(root, "", compiled, &mut report, &mut findings)?;
    findings.sort();
    findings.dedup();
    for finding in findings {
        if allowlist.allows(&finding) {
            report.allowlisted += 1;
        } else {
            report.findings.push(finding);
        }
    }
    Ok(report)
}

fn io_error(path: &str, error: std::io::Error) -> ScanError {
    ScanError::Io {
        path: if path.is_empty() {
            ".".into()
        } else {
            path.into()
        },
        error,
    }
}

/// Walks `dir` (`relative` to the root), depth first. Symbolic links are neither followed nor
/// read: a link may point outside the repository.
fn walk(
    dir: &Path,
    relative: &str,
    compiled: &Compiled,
    report: &mut Report,
    findings: &mut Vec<Finding>,
) -> Result<(), ScanError> {
    let entries = std::fs::read_dir(dir).map_err(|e| io_error(relative, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| io_error(relative, e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name == ".git" {
            continue;
        }
        let path = if relative.is_empty() {
            name.to_string()
        } else {
            format!("{relative}/{name}")
        };
        let file_type = entry.file_type().map_err(|e| io_error(&path, e))?;
        if file_type.is_dir() {
            if name == ".terraform" {
                findings.push(Finding {
                    path,
                    line: 0,
                    rule: "terraform-dir",
                });
            } else {
                walk(&entry.path(), &path, compiled, report, findings)?;
            }
        } else if file_type.is_file() {
            report.files += 1;
            if name.ends_with(".tfstate") || name.ends_with(".tfstate.backup") {
                // Whatever it holds: state carries every resource's secrets in clear text.
                findings.push(Finding {
                    path,
                    line: 0,
                    rule: "terraform-state",
                });
                continue;
            }
            let content = std::fs::read(entry.path()).map_err(|e| io_error(&path, e))?;
            report.bytes += content.len() as u64;
            scan_content(&path, &content, compiled, findings);
        }
    }
    Ok(())
}

/// The findings in one file's content.
fn scan_content(path: &str, content: &[u8], compiled: &Compiled, findings: &mut Vec<Finding>) {
    let matched = compiled.set.matches(content);
    if !matched.matched_any() {
        return;
    }
    let lines = LineIndex::new(content);
    let mut found = Vec::new();
    for i in matched.iter() {
        let pattern = &PATTERNS[i];
        if compiled.requires[i]
            .as_ref()
            .is_some_and(|r| !r.is_match(content))
            || compiled.unless[i]
                .as_ref()
                .is_some_and(|r| r.is_match(content))
        {
            continue;
        }
        for captures in compiled.each[i].captures_iter(content) {
            let Some(whole) = captures.get(0) else {
                continue;
            };
            let value = captures.name("v").unwrap_or(whole);
            if pattern
                .ignore
                .is_some_and(|ignore| ignore(value.as_bytes()))
            {
                continue;
            }
            found.push(Finding {
                path: path.to_string(),
                line: lines.line_of(value.start()),
                rule: pattern.rule,
            });
            if pattern.once_per_file {
                break;
            }
        }
    }
    // Once per file across a rule's patterns too: the first line.
    let once: BTreeSet<&str> = matched
        .iter()
        .filter(|i| PATTERNS[*i].once_per_file)
        .map(|i| PATTERNS[i].rule)
        .collect();
    for rule in once {
        if let Some(first) = found
            .iter()
            .filter(|f| f.rule == rule)
            .map(|f| f.line)
            .min()
        {
            found.retain(|f| f.rule != rule || f.line == first);
        }
    }
    findings.append(&mut found);
}

/// Byte offsets of line starts, for the line of a match.
struct LineIndex(Vec<usize>);

impl LineIndex {
    fn new(content: &[u8]) -> LineIndex {
        let mut starts = vec![0];
        starts.extend(
            content
                .iter()
                .enumerate()
                .filter(|(_, b)| **b == b'\n')
                .map(|(i, _)| i + 1),
        );
        LineIndex(starts)
    }

    /// 1-based.
    fn line_of(&self, offset: usize) -> usize {
        self.0.partition_point(|start| *start <= offset)
    }
}

/// `.infraflux/secret-scan-allowlist.toml`.
#[derive(Debug, Default)]
struct Allowlist {
    entries: Vec<AllowEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AllowlistFile {
    #[serde(default)]
    allow: Vec<AllowEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AllowEntry {
    /// An exact path, or a directory prefix ending in `/`.
    path: String,
    /// A rule name, or `*`.
    rule: String,
    reason: String,
}

impl Allowlist {
    fn load(root: &Path) -> Result<Allowlist, ScanError> {
        let file = root.join(ALLOWLIST_PATH);
        let text = match std::fs::read_to_string(&file) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Allowlist::default()),
            Err(e) => return Err(ScanError::Allowlist(e.to_string())),
        };
        Allowlist::parse(&text)
    }

    fn parse(text: &str) -> Result<Allowlist, ScanError> {
        let parsed: AllowlistFile = toml::from_str(text).map_err(|e| {
            let problem = e.message().trim().replace('\n', "; ");
            ScanError::Allowlist(match e.span() {
                Some(span) => format!(
                    "line {}: {problem}",
                    text[..span.start.min(text.len())].matches('\n').count() + 1
                ),
                None => problem,
            })
        })?;
        for (i, entry) in parsed.allow.iter().enumerate() {
            let problem = |what: String| ScanError::Allowlist(format!("entry {}: {what}", i + 1));
            if entry.path.trim().is_empty() {
                return Err(problem("`path` is empty".into()));
            }
            if entry.rule != "*" && !is_rule(&entry.rule) {
                return Err(problem(format!(
                    "unknown rule {:?}; the rules are {} or \"*\"",
                    entry.rule,
                    RULES
                        .iter()
                        .map(|(name, _)| *name)
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            if entry.reason.trim().is_empty() {
                return Err(problem(format!(
                    "`reason` is empty: say why {} may hold this",
                    entry.path
                )));
            }
        }
        Ok(Allowlist {
            entries: parsed.allow,
        })
    }

    fn allows(&self, finding: &Finding) -> bool {
        self.entries.iter().any(|entry| {
            let path_matches = match entry.path.strip_suffix('/') {
                // A directory: what is under it, and the directory itself (`terraform-dir`).
                Some(dir) => finding.path == dir || finding.path.starts_with(&entry.path),
                None => finding.path == entry.path,
            };
            path_matches && (entry.rule == "*" || entry.rule == finding.rule)
        })
    }
}

/// The job's failure message: the count and where, never a value, and what to do. Short: it is
/// also the commit status, which GitHub cuts at 140 characters.
pub fn failure_message(findings: &[Finding]) -> String {
    let count = findings.len();
    let listed = findings
        .iter()
        .take(LISTED_FINDINGS)
        .map(Finding::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    let more = if count > LISTED_FINDINGS {
        format!(" and {} more", count - LISTED_FINDINGS)
    } else {
        String::new()
    };
    format!(
        "secret scan: {count} finding{}: {listed}{more}. Remove the credential and rotate it (it stays in Git history), or allowlist a reviewed finding with a reason in {ALLOWLIST_PATH}",
        if count == 1 { "" } else { "s" }
    )
}

impl Reconciler {
    /// Fails the job when the working tree at `dir` holds a committed credential.
    #[tracing::instrument(
        name = "secret_scan",
        skip_all,
        fields(
            files = tracing::field::Empty,
            bytes = tracing::field::Empty,
            findings = tracing::field::Empty,
            allowlisted = tracing::field::Empty
        )
    )]
    pub(super) async fn scan_for_credentials(
        &self,
        ctx: &JobContext,
        dir: &Path,
    ) -> Result<(), HandlerError> {
        ctx.progress
            .report("scanning for committed credentials")
            .await;
        let root = dir.to_path_buf();
        let report = tokio::task::spawn_blocking(move || scan(&root))
            .await
            .map_err(|e| HandlerError::Internal(format!("secret scan: {e}")))?
            .map_err(|e| match e {
                ScanError::Allowlist(_) => HandlerError::Failed(format!("secret scan: {e}")),
                ScanError::Io { .. } | ScanError::Patterns(_) => {
                    HandlerError::Internal(format!("secret scan: {e}"))
                }
            })?;
        let span = tracing::Span::current();
        span.record("files", report.files);
        span.record("bytes", report.bytes);
        span.record("findings", report.findings.len());
        span.record("allowlisted", report.allowlisted);
        if !report.findings.is_empty() {
            return Err(HandlerError::Failed(failure_message(&report.findings)));
        }
        if report.allowlisted > 0 {
            ctx.progress
                .report(&format!(
                    "secret scan: no findings in {} files ({} allowlisted)",
                    report.files, report.allowlisted
                ))
                .await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A repository in a temporary directory.
    struct Repo(tempfile::TempDir);

    impl Repo {
        fn new() -> Repo {
            Repo(tempfile::tempdir().expect("tempdir"))
        }

        fn write(&self, relative: &str, content: impl AsRef<[u8]>) -> &Repo {
            let file = self.0.path().join(relative);
            std::fs::create_dir_all(file.parent().expect("parent")).expect("mkdir");
            std::fs::write(file, content).expect("write");
            self
        }

        fn scan(&self) -> Report {
            scan(self.0.path()).expect("scan")
        }

        fn findings(&self) -> Vec<(String, usize, &'static str)> {
            self.scan()
                .findings
                .into_iter()
                .map(|f| (f.path, f.line, f.rule))
                .collect()
        }
    }

    fn one(path: &str, line: usize, rule: &'static str) -> Vec<(String, usize, &'static str)> {
        vec![(path.to_string(), line, rule)]
    }

    /// Fake values, built here so this file itself does not look like it holds credentials.
    fn pem_header(kind: &str) -> String {
        format!("-----BEGIN {kind}PRIVATE KEY-----")
    }
    const BODY: &str = "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7";
    fn pem_key(kind: &str) -> String {
        format!(
            "{}\n{BODY}\n{BODY}\n-----END {kind}PRIVATE KEY-----\n",
            pem_header(kind)
        )
    }
    fn base64_pem() -> String {
        // base64 of "-----BEGIN ED25519 PRIVATE KEY-----\n..."
        format!("{BASE64_PEM}BFRDI1NTE5IFBSSVZBVEUgS0VZLS0tLS0KTUM0Q0FRQXdCUVlESzJWd0JDSUVJ")
    }
    fn age_key() -> String {
        format!("AGE-SECRET-KEY-1{}", "QPZRY9X8GF".repeat(5) + "2TVDW0S3")
    }
    fn aws_key_id() -> String {
        format!("AKIA{}", "Q7Z2X4W6V8U0T3S5")
    }
    fn s3_secret() -> String {
        format!("wJalrXUtnFEMI/K7MDENG/{}", "bPxRfiCYzzzz1234")
    }
    fn uuid() -> String {
        ["0f3a9c1e", "2b4d", "4e6f", "8a0b", "1c2d3e4f5a6b"].join("-")
    }

    #[test]
    fn each_rule_finds_its_credential_at_its_line() {
        let header = "# committed by mistake\n";
        let cases: Vec<(&str, String, usize, &str)> = vec![
            (
                "keys/id_rsa",
                format!("{header}{}", pem_key("RSA ")),
                2,
                "private-key",
            ),
            ("keys/id_ed25519", pem_key("OPENSSH "), 1, "private-key"),
            (
                "keys/legacy.pem",
                format!(
                    "{}\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,00FF\n\n{BODY}\n",
                    pem_header("RSA ")
                ),
                1,
                "private-key",
            ),
            (
                "tls.tf",
                format!(
                    "locals {{\n  key = \"{}\\n{BODY}\\n\"\n}}\n",
                    pem_header("EC ")
                ),
                2,
                "private-key",
            ),
            (
                "age/keys.txt",
                format!("# created: 2025-01-01\n# public key: age1xyz\n{}\n", age_key()),
                3,
                "age-secret-key",
            ),
            (
                "minio.env",
                format!("AWS_ACCESS_KEY_ID={}\n", aws_key_id()),
                1,
                "aws-access-key-id",
            ),
            (
                "providers.tf",
                format!(
                    "provider \"minio\" {{\n  minio_server = \"s3.lab\"\n  secret_key = \"{}\"\n}}\n",
                    s3_secret()
                ),
                3,
                "s3-secret-key",
            ),
            (
                "apps/minio/values.yaml",
                format!("env:\n  MINIO_ROOT_PASSWORD: '{}'\n", s3_secret()),
                2,
                "s3-secret-key",
            ),
            (
                "scripts/ci.sh",
                format!("#!/bin/sh\n\nexport GH_TOKEN=ghp_{}\n", "a1B2".repeat(9)),
                3,
                "github-token",
            ),
            (
                "scripts/pat.txt",
                format!("github_pat_{}_{}\n", "A1".repeat(11), "b2".repeat(30)),
                1,
                "github-token",
            ),
            (
                "dns/.env",
                format!("CLOUDFLARE_API_TOKEN={}\n", "Zx9_".repeat(10)),
                1,
                "cloudflare-api-token",
            ),
            (
                "dns/provider.tf",
                format!(
                    "provider \"cloudflare\" {{\n  # the lab zone\n  api_token = \"{}\"\n}}\n",
                    "k-7Q".repeat(10)
                ),
                3,
                "cloudflare-api-token",
            ),
            (
                "eso/token",
                format!("\nops_eyJ{}\n", "c2lnbkluQWRkcmVzcyI6Im15LjFwYXNzd29yZC5jb20iLCJ1c2VyQXV0aCI6"),
                2,
                "onepassword-token",
            ),
            (
                "pve/provider.tf",
                format!(
                    "provider \"proxmox\" {{\n  endpoint  = \"https://pve:8006/\"\n  api_token = \"terraform@pve!tf={}\"\n}}\n",
                    uuid()
                ),
                3,
                "proxmox-api-token",
            ),
            (
                "pve/telmate.tf",
                format!(
                    "provider \"proxmox\" {{\n  pm_api_token_id     = \"terraform@pve!tf\"\n  pm_api_token_secret = \"{}\"\n}}\n",
                    uuid()
                ),
                3,
                "proxmox-api-token",
            ),
            (
                "talos/secrets.yaml",
                "cluster:\n    id: abc\nsecrets:\n    bootstraptoken: abcdef.0123456789abcdef\n"
                    .to_string(),
                4,
                "talos-secrets",
            ),
            (
                "talos/trustd.yaml",
                "trustdinfo:\n    token: abcdef.0123456789abcdef\n".to_string(),
                2,
                "talos-secrets",
            ),
            (
                "talos/controlplane.yaml",
                format!(
                    "version: v1alpha1\nmachine:\n  type: controlplane\n  ca:\n    crt: LS0tLS1CRUdJTiBDRVJU\n    key: {}\n",
                    base64_pem()
                ),
                6,
                "talos-secrets",
            ),
            (
                "talos/talosconfig",
                format!(
                    "context: lab\ncontexts:\n  lab:\n    endpoints: [10.0.0.1]\n    ca: LS0tLS1CRUdJTiBDRVJU\n    crt: LS0tLS1CRUdJTiBDRVJU\n    key: {}\n",
                    base64_pem()
                ),
                7,
                "talosconfig",
            ),
            (
                "kube/admin.conf",
                format!(
                    "apiVersion: v1\nkind: Config\nusers:\n- name: admin\n  user:\n    client-certificate-data: LS0tLS1CRUdJTiBDRVJU\n    client-key-data: {}\n",
                    base64_pem()
                ),
                7,
                "kubeconfig",
            ),
            (
                "kube/sa.conf",
                "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\nusers:\n- name: ci\n  user:\n    token: eyJhbGciOiJSUzI1NiJ9.payload.sig\n"
                    .to_string(),
                8,
                "kubeconfig",
            ),
            (
                "secrets/db.enc.yaml",
                "password: ENC[AES256_GCM,data:abcd,iv:x,tag:y,type:str]\nuser: ENC[AES256_GCM,data:efgh,iv:x,tag:y,type:str]\n"
                    .to_string(),
                1,
                "sops-encrypted",
            ),
            (
                "secrets/db.json",
                "{\n  \"data\": \"x\",\n  \"sops\": {\n    \"mac\": \"y\"\n  }\n}\n".to_string(),
                3,
                "sops-encrypted",
            ),
            (
                "envs/prod/terraform.tfstate",
                "{\"version\": 4}".to_string(),
                0,
                "terraform-state",
            ),
            (
                "envs/prod/terraform.tfstate.backup",
                String::new(),
                0,
                "terraform-state",
            ),
        ];
        for (path, content, line, rule) in cases {
            let repo = Repo::new();
            repo.write(path, &content);
            assert_eq!(repo.findings(), one(path, line, rule), "{path}:\n{content}");
        }

        let repo = Repo::new();
        repo.write("envs/prod/.terraform/providers/x/terraform.tfstate", "{}")
            .write("envs/prod/.terraform/terraform.tfstate", "{}");
        assert_eq!(
            repo.findings(),
            one("envs/prod/.terraform", 0, "terraform-dir"),
            "reported once, not descended into"
        );
        let every_rule: BTreeSet<&str> = PATTERNS.iter().map(|p| p.rule).collect();
        let documented: BTreeSet<&str> = RULES
            .iter()
            .map(|(name, _)| *name)
            .filter(|name| !name.starts_with("terraform-"))
            .collect();
        assert_eq!(
            every_rule, documented,
            "every rule has a pattern and a doc line"
        );
    }

    #[test]
    fn a_key_among_binary_bytes_is_found() {
        let repo = Repo::new();
        let mut content = vec![0u8, 0xff, 0xfe, b'\n', 0x80, 0x81];
        content.extend_from_slice(b"\n");
        content.extend_from_slice(pem_key("").as_bytes());
        content.extend_from_slice(&[0xc3, 0x28, 0]);
        repo.write("blob.bin", &content);
        assert_eq!(repo.findings(), one("blob.bin", 3, "private-key"));
    }

    #[test]
    fn a_symbolic_link_is_not_followed() {
        let outside = Repo::new();
        outside.write("id_rsa", pem_key("RSA "));
        let repo = Repo::new();
        repo.write("main.tf", "locals {}\n");
        std::os::unix::fs::symlink(outside.0.path(), repo.0.path().join("linked"))
            .expect("symlink");
        std::os::unix::fs::symlink(
            outside.0.path().join("id_rsa"),
            repo.0.path().join("id_rsa"),
        )
        .expect("symlink");
        assert_eq!(repo.findings(), vec![]);
        assert_eq!(repo.scan().files, 1);
    }

    #[test]
    fn a_realistic_clean_repository_has_no_findings() {
        let repo = Repo::new();
        repo.write(
            "terraform/envs/prod/providers.tf",
            r#"terraform {
  required_providers {
    minio      = { source = "aminueza/minio" }
    cloudflare = { source = "cloudflare/cloudflare" }
    proxmox    = { source = "bpg/proxmox" }
  }
}

provider "minio" {
  minio_server   = "s3.lab.example:9000"
  minio_user     = var.minio_access_key
  minio_password = data.onepassword_item.minio.password
  secret_key     = var.minio_secret_key
}

provider "cloudflare" {
  api_token = data.onepassword_item.cloudflare.credential
}

provider "proxmox" {
  endpoint  = "https://pve.lab.example:8006/"
  api_token = "${var.pve_user}!${var.pve_token_id}=${var.pve_token_secret}"
}

resource "kubernetes_secret" "minio" {
  data = {
    token                 = data.onepassword_item.x.password
    aws_secret_access_key = local.minio_secret
    secret_key            = "${var.minio_secret_key}"
  }
}

resource "proxmox_virtual_environment_vm" "cp" {
  vm_id = 100
  smbios { uuid = "5b0a9ad6-2f7d-4d2c-9f3e-0d2a7b1c9e11" }
}
"#,
        )
        .write(
            "terraform/envs/prod/.terraform.lock.hcl",
            r#"provider "registry.terraform.io/cloudflare/cloudflare" {
  version     = "4.52.0"
  constraints = "~> 4.0"
  hashes = [
    "h1:2yNCE3VwfhXmKsrvLJO0Gfgj7nNSgk2w9ZkSdS1W1s4=",
    "zh:0b0a2d7d4a8f3c5e1f2a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b0c9d8e",
  ]
}
"#,
        )
        .write(
            "README.md",
            "# Lab infrastructure\n\nNever commit `ghp_` tokens, `AKIA` keys, `AGE-SECRET-KEY-1` identities or \
             `ops_` tokens: they live in 1Password. The example key `AKIAIOSFODNN7EXAMPLE` from \
             AWS's documentation is not a credential. A kubeconfig's `client-key-data:` and a \
             talosconfig's `key:` never belong here.\n",
        )
        .write(
            "talos/patches/cluster.yaml",
            "cluster:\n  secretboxEncryptionSecret: ${SECRETBOX_SECRET}\n  network:\n    cni:\n      name: none\n",
        )
        .write(
            "kube/external-secret.yaml",
            "apiVersion: external-secrets.io/v1beta1\nkind: ExternalSecret\nspec:\n  data:\n    - secretKey: rootPasswordMinio\n      remoteRef:\n        key: minio\n",
        )
        .write(
            "kube/kubeconfig.template",
            "apiVersion: v1\nkind: Config\nusers:\n- name: ci\n  user:\n    token: ${KUBE_TOKEN}\n",
        );
        let report = repo.scan();
        assert_eq!(report.findings, vec![], "{report:?}");
        assert_eq!(report.files, 6);
        assert!(report.bytes > 1000);
    }

    fn repo_with_key() -> Repo {
        let repo = Repo::new();
        repo.write("docs/example/id_ed25519", pem_key("OPENSSH "))
            .write("keys/id_rsa", pem_key("RSA "));
        repo
    }

    #[test]
    fn an_allowlisted_finding_passes_and_is_counted() {
        let repo = repo_with_key();
        repo.write(
            ALLOWLIST_PATH,
            "[[allow]]\npath = \"docs/example/\"\nrule = \"private-key\"\nreason = \"a throwaway key for the docs\"\n\n\
             [[allow]]\npath = \"keys/id_rsa\"\nrule = \"*\"\nreason = \"a test fixture, never used\"\n",
        );
        let report = repo.scan();
        assert_eq!(report.findings, vec![]);
        assert_eq!(report.allowlisted, 2);

        // Another rule or another path is not silenced.
        let repo = repo_with_key();
        repo.write(
            ALLOWLIST_PATH,
            "[[allow]]\npath = \"docs/example/id_ed25519\"\nrule = \"github-token\"\nreason = \"x\"\n\n\
             [[allow]]\npath = \"keys/\"\nrule = \"private-key\"\nreason = \"test keys\"\n",
        );
        let report = repo.scan();
        assert_eq!(
            report.findings,
            vec![Finding {
                path: "docs/example/id_ed25519".into(),
                line: 1,
                rule: "private-key"
            }]
        );
        assert_eq!(report.allowlisted, 1);

        // A directory entry covers a committed .terraform directory itself.
        let repo = Repo::new();
        repo.write("envs/prod/.terraform/modules/modules.json", "{}")
            .write(
                ALLOWLIST_PATH,
                "[[allow]]\npath = \"envs/prod/.terraform/\"\nrule = \"terraform-dir\"\nreason = \"vendored modules, reviewed\"\n",
            );
        assert_eq!(repo.scan().allowlisted, 1);
    }

    #[test]
    fn a_broken_allowlist_is_an_error_that_names_the_problem() {
        let cases = [
            ("[[allow]]\npath = \"a\"\n[[allow]\npath = ", "line 3: "),
            (
                "[[allow]]\npath = \"keys/id_rsa\"\nrule = \"private-keys\"\nreason = \"x\"\n",
                "entry 1: unknown rule \"private-keys\"",
            ),
            (
                "[[allow]]\npath = \"keys/id_rsa\"\nrule = \"*\"\n",
                "missing field `reason`",
            ),
            (
                "[[allow]]\npath = \"a\"\nrule = \"*\"\nreason = \"ok\"\n[[allow]]\npath = \"keys/id_rsa\"\nrule = \"*\"\nreason = \"  \"\n",
                "entry 2: `reason` is empty",
            ),
            (
                "[[allow]]\npath = \"\"\nrule = \"*\"\nreason = \"x\"\n",
                "entry 1: `path` is empty",
            ),
            (
                "[[allow]]\npath = \"a\"\nrule = \"*\"\nreason = \"x\"\nexpires = 2026\n",
                "unknown field `expires`",
            ),
            ("[[allows]]\npath = \"a\"\n", "unknown field `allows`"),
        ];
        for (text, problem) in cases {
            let repo = repo_with_key();
            repo.write(ALLOWLIST_PATH, text);
            let error = scan(repo.0.path()).expect_err(text).to_string();
            assert!(
                error.starts_with(&format!("{ALLOWLIST_PATH}: ")),
                "{text}: {error}"
            );
            assert!(error.contains(problem), "{text}: {error}");
        }
    }

    #[test]
    fn no_finding_or_failure_message_holds_a_value() {
        let values = [
            BODY.to_string(),
            age_key(),
            aws_key_id(),
            s3_secret(),
            uuid(),
            base64_pem(),
        ];
        let repo = Repo::new();
        repo.write("keys/id_rsa", pem_key("RSA "))
            .write("age.txt", age_key())
            .write(
                "creds.env",
                format!(
                    "AWS_ACCESS_KEY_ID={}\nAWS_SECRET_ACCESS_KEY={}\n",
                    aws_key_id(),
                    s3_secret()
                ),
            )
            .write("pve.tf", format!("pm_api_token_secret = \"{}\"\n", uuid()))
            .write(
                "kube.conf",
                format!(
                    "kind: Config\nusers:\n- user:\n    client-key-data: {}\n",
                    base64_pem()
                ),
            );
        let report = repo.scan();
        assert_eq!(report.findings.len(), 6, "{report:?}");
        let message = failure_message(&report.findings);
        assert!(
            message.starts_with(
                "secret scan: 6 findings: age.txt:1 age-secret-key; creds.env:1 aws-access-key-id; creds.env:2 s3-secret-key; keys/id_rsa:1 private-key;"
            ),
            "{message}"
        );
        let displayed: Vec<String> = report.findings.iter().map(Finding::to_string).collect();
        for value in &values {
            for text in displayed.iter().chain([&message]) {
                // Not even a part of it.
                assert!(!text.contains(&value[..12]), "{text} holds {value}");
            }
        }
    }

    #[test]
    fn a_long_list_is_cut_and_counted() {
        let findings: Vec<Finding> = (1..=13)
            .map(|line| Finding {
                path: "keys.txt".into(),
                line,
                rule: "private-key",
            })
            .collect();
        let message = failure_message(&findings);
        assert!(message.starts_with("secret scan: 13 findings: keys.txt:1 private-key;"));
        assert!(
            message.contains("keys.txt:10 private-key and 3 more."),
            "{message}"
        );
        assert!(!message.contains("keys.txt:11"), "{message}");
        assert!(message.contains(ALLOWLIST_PATH), "{message}");
        assert!(message.contains("rotate"), "{message}");
    }
}

//! Secret references and resolved secrets.
//!
//! A config value that holds a secret is a reference (`env:NAME`, `file:/path`, `cred:NAME`,
//! `op://vault/item/field`), resolved once at start. The resolved [`Secret`] never prints: its
//! `Debug` is redacted, it has no `Display` and no `Serialize`, so it cannot reach a log line, a
//! reply or a record by accident. [`Redactor`] scrubs every resolved value from text that must
//! leave the process (child output, error messages).

use std::fmt;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Deserializer};

/// Where a secret comes from, as written in the config. Printing a reference is safe: it names
/// the source, never the value, except for a literal, whose `Debug` is redacted.
#[derive(Clone, PartialEq, Eq)]
pub enum SecretRef {
    Env(String),
    File(String),
    Credential(String),
    OnePassword(String),
    /// A literal value in the config file. Accepted, with a warning from `check-config`.
    Literal(String),
}

impl SecretRef {
    pub fn parse(raw: &str) -> SecretRef {
        if let Some(name) = raw.strip_prefix("env:") {
            SecretRef::Env(name.to_string())
        } else if let Some(path) = raw.strip_prefix("file:") {
            SecretRef::File(path.to_string())
        } else if let Some(name) = raw.strip_prefix("cred:") {
            SecretRef::Credential(name.to_string())
        } else if raw.starts_with("op://") {
            SecretRef::OnePassword(raw.to_string())
        } else {
            SecretRef::Literal(raw.to_string())
        }
    }

    pub fn is_literal(&self) -> bool {
        matches!(self, SecretRef::Literal(_))
    }

    /// A description that is safe to print: the reference itself, or "a literal value".
    pub fn describe(&self) -> String {
        match self {
            SecretRef::Env(n) => format!("env:{n}"),
            SecretRef::File(p) => format!("file:{p}"),
            SecretRef::Credential(n) => format!("cred:{n}"),
            SecretRef::OnePassword(r) => r.clone(),
            SecretRef::Literal(_) => "a literal value".to_string(),
        }
    }
}

impl fmt::Debug for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretRef({})", self.describe())
    }
}

impl<'de> Deserialize<'de> for SecretRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        Ok(SecretRef::parse(&raw))
    }
}

/// One secret reference or several (webhook secrets during rotation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretRefs(pub Vec<SecretRef>);

impl<'de> Deserialize<'de> for SecretRefs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum OneOrMany {
            One(String),
            Many(Vec<String>),
        }
        Ok(match OneOrMany::deserialize(d)? {
            OneOrMany::One(s) => SecretRefs(vec![SecretRef::parse(&s)]),
            OneOrMany::Many(v) => SecretRefs(v.iter().map(|s| SecretRef::parse(s)).collect()),
        })
    }
}

/// A resolved secret value.
#[derive(Clone)]
pub struct Secret(Arc<str>);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(Arc::from(value.into()))
    }

    /// The value, for handing to the one place that needs it (an HMAC key, a child's env).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Replaces every known secret value in text with `[REDACTED]`: the value as it is, and the
/// forms it takes when a tool encodes it (see [`encoded_forms`]), so that
/// `base64encode(var.secret)` in a plan's output is scrubbed too.
#[derive(Clone, Default)]
pub struct Redactor {
    /// Every form of every registered value, longest first.
    needles: Arc<RwLock<Vec<String>>>,
}

impl fmt::Debug for Redactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.needles.read().map(|v| v.len()).unwrap_or(0);
        write!(f, "Redactor({n} forms)")
    }
}

/// Values shorter than this are not scrubbed: replacing "a" or "1" everywhere would destroy
/// output without protecting anything real. Encoded forms shorter than this are left out too.
const MIN_REDACTED_LEN: usize = 4;

/// The forms `value` takes in output: as it is; base64, standard and URL-safe, at each of the
/// three byte offsets it may have inside a larger encoded blob (the characters that depend on
/// the value alone: whole 3-byte groups, no padding, so padded and unpadded blobs match); hex,
/// lower and upper case; percent-encoded; JSON-escaped.
pub fn encoded_forms(value: &str) -> Vec<String> {
    use base64::Engine;
    use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
    let bytes = value.as_bytes();
    let mut forms = vec![value.to_string()];
    for skip in 0..3 {
        // The value starts `skip` bytes before a group boundary of the blob.
        let Some(rest) = bytes.get(skip..) else {
            continue;
        };
        let whole = rest.len() / 3 * 3;
        let Some(aligned) = rest.get(..whole) else {
            continue;
        };
        forms.push(STANDARD_NO_PAD.encode(aligned));
        forms.push(URL_SAFE_NO_PAD.encode(aligned));
    }
    forms.push(hex::encode(bytes));
    forms.push(hex::encode_upper(bytes));
    let percent = |upper: bool| -> String {
        bytes
            .iter()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    (*b as char).to_string()
                }
                _ if upper => format!("%{b:02X}"),
                _ => format!("%{b:02x}"),
            })
            .collect()
    };
    forms.push(percent(true));
    forms.push(percent(false));
    // Form encoding (Go's QueryEscape, Terraform's `urlencode`): a space is `+`.
    forms.push(percent(true).replace("%20", "+"));
    if let Ok(json) = serde_json::to_string(value) {
        let json = json.trim_matches('"').to_string();
        // HTML-safe JSON (Go's encoding/json, Terraform's `jsonencode`) escapes <, > and &.
        forms.push(
            json.replace('&', "\\u0026")
                .replace('<', "\\u003c")
                .replace('>', "\\u003e"),
        );
        forms.push(json);
    }
    forms.retain(|f| f.len() >= MIN_REDACTED_LEN);
    forms.sort();
    forms.dedup();
    forms
}

impl Redactor {
    pub fn register(&self, secret: &Secret) {
        if secret.expose().len() < MIN_REDACTED_LEN {
            return;
        }
        if let Ok(mut needles) = self.needles.write() {
            for form in encoded_forms(secret.expose()) {
                if !needles.contains(&form) {
                    needles.push(form);
                }
            }
            // Longest first, so a form that contains another is replaced whole.
            needles.sort_by_key(|v| std::cmp::Reverse(v.len()));
        }
    }

    pub fn redact(&self, text: &str) -> String {
        let Ok(needles) = self.needles.read() else {
            return "[REDACTED: redactor unavailable]".to_string();
        };
        let mut out = text.to_string();
        for needle in needles.iter() {
            if out.contains(needle.as_str()) {
                out = out.replace(needle.as_str(), "[REDACTED]");
            }
        }
        out
    }
}

/// Strings shaped like credentials, for text that leaves the platform (PR comments): cloud
/// keys, GitHub and Slack tokens, private keys, age identities, JWTs, and `password = "..."`
/// style assignments.
static CREDENTIAL_PATTERNS: std::sync::LazyLock<Vec<(regex::Regex, &'static str)>> =
    std::sync::LazyLock::new(|| {
        [
            (
                r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z0-9 ]*PRIVATE KEY-----",
                "[REDACTED PRIVATE KEY]",
            ),
            (r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b", "[REDACTED]"),
            (r"\bgh[pousr]_[A-Za-z0-9]{36,255}\b", "[REDACTED]"),
            (r"\bgithub_pat_[A-Za-z0-9_]{22,255}\b", "[REDACTED]"),
            (r"\bxox[abprs]-[A-Za-z0-9-]{10,}\b", "[REDACTED]"),
            (r"\bAGE-SECRET-KEY-1[0-9A-Z]{58}\b", "[REDACTED]"),
            (r"\bops_[A-Za-z0-9_-]{20,}", "[REDACTED]"),
            (
                r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",
                "[REDACTED]",
            ),
            (
                r#"(?i)\b([a-z0-9_]*(?:password|passwd|secret|token|api_?key|access_?key)[a-z0-9_]*"?\s*[:=]\s*)"[^"\n]{4,}""#,
                "${1}\"[REDACTED]\"",
            ),
        ]
        .into_iter()
        .filter_map(|(pattern, replacement)| {
            regex::Regex::new(pattern).ok().map(|r| (r, replacement))
        })
        .collect()
    });

/// Replaces credential-shaped strings in `text`.
pub fn redact_credentials(text: &str) -> String {
    let mut out = text.to_string();
    for (pattern, replacement) in CREDENTIAL_PATTERNS.iter() {
        out = pattern.replace_all(&out, *replacement).into_owned();
    }
    out
}

/// A secret the agent's own code reads, named by what it is for: a misspelt name is a compile
/// error, not a silent "absent". Its [`SecretKey::path`] is the config key that references it,
/// which is also how `check-config` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretKey {
    GithubToken,
    /// The `n`-th of `[github] webhook_secret` (a list, for rotation).
    WebhookSecret(usize),
    NatsCreds,
    NatsNkey,
    NatsToken,
    NatsPassword,
    Talosconfig,
    S3AccessKeyId,
    S3SecretAccessKey,
    /// A value of `[reconcile.env_vars]`.
    ReconcileEnvVar(String),
    /// A value of `[reconcile.plan_env_vars]`.
    ReconcilePlanEnvVar(String),
    /// A header of `[telemetry] otlp_headers`.
    OtlpHeader(String),
    /// `[restore_drill] age_identity`: decrypts the etcd snapshots a drill restores.
    DrillAgeIdentity,
    /// `[proxmox] token_secret`: the API token the preflight checks.
    ProxmoxTokenSecret,
}

impl SecretKey {
    pub fn path(&self) -> String {
        match self {
            SecretKey::GithubToken => "github.token".into(),
            SecretKey::WebhookSecret(n) => format!("github.webhook_secret.{n}"),
            SecretKey::NatsCreds => "nats.creds".into(),
            SecretKey::NatsNkey => "nats.nkey".into(),
            SecretKey::NatsToken => "nats.token".into(),
            SecretKey::NatsPassword => "nats.password".into(),
            SecretKey::Talosconfig => "talos.talosconfig".into(),
            SecretKey::S3AccessKeyId => "s3.access_key_id".into(),
            SecretKey::S3SecretAccessKey => "s3.secret_access_key".into(),
            SecretKey::ReconcileEnvVar(name) => format!("reconcile.env_vars.{name}"),
            SecretKey::ReconcilePlanEnvVar(name) => format!("reconcile.plan_env_vars.{name}"),
            SecretKey::OtlpHeader(name) => format!("telemetry.otlp_headers.{name}"),
            SecretKey::DrillAgeIdentity => "restore_drill.age_identity".into(),
            SecretKey::ProxmoxTokenSecret => "proxmox.token_secret".into(),
        }
    }
}

/// Every resolved secret, by the config key that referenced it (`github.token`,
/// `reconcile.env_vars.AWS_ACCESS_KEY_ID`). Every value is also registered with the redactor.
#[derive(Clone, Default)]
pub struct Secrets {
    by_key: std::collections::BTreeMap<String, Secret>,
    redactor: Redactor,
}

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.by_key.keys()).finish()
    }
}

impl Secrets {
    pub fn insert(&mut self, key: impl Into<String>, secret: Secret) {
        self.redactor.register(&secret);
        self.by_key.insert(key.into(), secret);
    }

    pub fn get(&self, key: &str) -> Option<&Secret> {
        self.by_key.get(key)
    }

    /// A secret by what it is for.
    pub fn of(&self, key: &SecretKey) -> Option<&Secret> {
        self.by_key.get(&key.path())
    }

    /// Every configured webhook secret, in order (more than one while rotating).
    pub fn webhook_secrets(&self) -> impl Iterator<Item = &Secret> {
        self.with_prefix("github.webhook_secret.").map(|(_, s)| s)
    }

    /// Every secret whose key starts with `prefix` (a list such as `github.webhook_secret.0`,
    /// `github.webhook_secret.1`), in key order.
    pub fn with_prefix<'a>(
        &'a self,
        prefix: &'a str,
    ) -> impl Iterator<Item = (&'a str, &'a Secret)> {
        self.by_key
            .range(prefix.to_string()..)
            .take_while(move |(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.as_str(), v))
    }

    /// How many secrets resolved.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    pub fn redactor(&self) -> &Redactor {
        &self.redactor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_by_prefix() {
        assert_eq!(
            SecretRef::parse("env:TOKEN"),
            SecretRef::Env("TOKEN".into())
        );
        assert_eq!(
            SecretRef::parse("file:/a/b"),
            SecretRef::File("/a/b".into())
        );
        assert_eq!(
            SecretRef::parse("cred:gh"),
            SecretRef::Credential("gh".into())
        );
        assert_eq!(
            SecretRef::parse("op://v/i/f"),
            SecretRef::OnePassword("op://v/i/f".into())
        );
        assert!(SecretRef::parse("hunter22").is_literal());
    }

    #[test]
    fn nothing_prints_a_value() {
        let lit = SecretRef::parse("hunter22");
        assert!(!format!("{lit:?}").contains("hunter22"));
        assert!(!lit.describe().contains("hunter22"));
        let s = Secret::new("hunter22");
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
    }

    #[test]
    fn a_secret_is_scrubbed_in_every_encoding_and_inside_larger_encoded_blobs() {
        use base64::Engine;
        use base64::engine::general_purpose::{
            STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD,
        };
        // Bytes that base64 writes with `+` and `/` (or `-` and `_`), and that need escaping.
        let secret = "s3cr3t/key+\"quoted\"?&\u{00e9}\n~ok";
        let r = Redactor::default();
        r.register(&Secret::new(secret));
        let leaks = |text: &str| -> bool {
            let out = r.redact(text);
            out.contains(secret)
                || (0..3).any(|skip| {
                    // What an attacker could decode back: any whole-group run of the secret.
                    let aligned = &secret.as_bytes()[skip..];
                    let aligned = &aligned[..aligned.len() / 3 * 3];
                    [
                        STANDARD_NO_PAD.encode(aligned),
                        URL_SAFE_NO_PAD.encode(aligned),
                    ]
                    .iter()
                    .any(|f| out.contains(f.as_str()))
                })
        };
        let mut outputs = vec![
            secret.to_string(),
            hex::encode(secret),
            hex::encode_upper(secret),
            serde_json::to_string(secret).expect("json"),
            format!(
                "url=https://x/?token={}",
                encoded_forms(secret)
                    .iter()
                    .find(|f| f.contains('%'))
                    .expect("a percent form")
            ),
        ];
        for prefix in ["", "a", "ab", "abc"] {
            for suffix in ["", "z", "zz"] {
                let blob = format!("{prefix}{secret}{suffix}");
                for engine in [&STANDARD, &URL_SAFE] {
                    outputs.push(format!("value = \"{}\"", engine.encode(&blob)));
                }
                outputs.push(STANDARD_NO_PAD.encode(&blob));
            }
        }
        for text in &outputs {
            assert!(!leaks(text), "leaked: {text} -> {}", r.redact(text));
            assert!(r.redact(text).contains("[REDACTED]"), "{text}");
        }
        // Ordinary output is left alone.
        assert_eq!(
            r.redact("Plan: 1 to add, 0 to change"),
            "Plan: 1 to add, 0 to change"
        );
    }

    #[test]
    fn terraforms_own_encodings_of_a_secret_are_scrubbed() {
        let secret = "p@ss w/rd+Z?9&x<y>";
        let r = Redactor::default();
        r.register(&Secret::new(secret));
        // What terraform prints for urlencode(var.x) and jsonencode(var.x).
        for output in [
            r#"url = "p%40ss+w%2Frd%2BZ%3F9%26x%3Cy%3E""#,
            r#"json = "\"p@ss w/rd+Z?9\u0026x\u003cy\u003e\"""#,
        ] {
            let out = r.redact(output);
            assert!(out.contains("[REDACTED]"), "{output} -> {out}");
            assert!(!out.contains("w%2Frd") && !out.contains("w/rd"), "{out}");
        }
    }

    #[test]
    fn a_short_secret_has_no_encoded_form_too_short_to_scrub_safely() {
        for form in encoded_forms("abcd") {
            assert!(form.len() >= MIN_REDACTED_LEN, "{form}");
        }
        // A 4-byte value still has its base64 of whole groups (at offset 0: 3 bytes, 4 chars).
        assert!(encoded_forms("abcd").contains(&"YWJj".to_string()));
    }

    #[test]
    fn redactor_scrubs_longest_first_and_skips_tiny_values() {
        let r = Redactor::default();
        r.register(&Secret::new("abcd"));
        r.register(&Secret::new("abcdefgh"));
        r.register(&Secret::new("x"));
        assert_eq!(
            r.redact("k=abcdefgh j=abcd x"),
            "k=[REDACTED] j=[REDACTED] x"
        );
    }

    #[test]
    fn credential_shapes_are_scrubbed() {
        let text = concat!(
            "key AKIAIOSFODNN7EXAMPLE and ghp_0123456789abcdefghijABCDEFGHIJ012345 here\n",
            "-----BEGIN OPENSSH PRIVATE KEY-----\nabc\ndef\n-----END OPENSSH PRIVATE KEY-----\n",
            "AGE-SECRET-KEY-1QQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQ\n",
            "  + db_password = \"hunter22\"\n",
            "  + name = \"talos-cp-1\"\n",
        );
        let out = redact_credentials(text);
        for leaked in [
            "AKIAIOSFODNN7EXAMPLE",
            "ghp_0123",
            "abc\ndef",
            "AGE-SECRET-KEY-1Q",
            "hunter22",
        ] {
            assert!(!out.contains(leaked), "{leaked} survived:\n{out}");
        }
        assert!(out.contains("db_password = \"[REDACTED]\""), "{out}");
        assert!(out.contains("talos-cp-1"), "ordinary values stay: {out}");
        assert_eq!(CREDENTIAL_PATTERNS.len(), 9, "every pattern compiles");
    }

    #[test]
    fn one_or_many_refs() {
        let one: SecretRefs = serde_json::from_str("\"env:A\"").expect("one");
        assert_eq!(one.0, vec![SecretRef::Env("A".into())]);
        let many: SecretRefs = serde_json::from_str("[\"env:A\",\"file:/b\"]").expect("many");
        assert_eq!(many.0.len(), 2);
    }
}

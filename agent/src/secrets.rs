//! Resolving secret references at start. Errors name the key and the reference, never a value.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use infraflux_handlers::secret::{Secret, SecretRef, Secrets};
use tokio::process::Command;

use crate::config::{Config, Problems};

/// How long the 1Password CLI may take for one reference.
const OP_TIMEOUT: Duration = Duration::from_secs(30);

/// The process environment as resolution sees it; a map, so tests need not touch the real one.
pub type Environment = HashMap<String, String>;

/// Resolves every reference in the config; all failures are reported together.
pub async fn resolve_all(config: &Config, env: &Environment) -> Result<Secrets, Problems> {
    let (secrets, problems) = resolve_each(config, env).await;
    if problems.is_empty() {
        Ok(secrets)
    } else {
        Err(problems)
    }
}

/// Resolves every reference it can: the secrets that resolved, and a problem for each that did
/// not, so that what depends on the resolved ones can still be checked.
pub async fn resolve_each(config: &Config, env: &Environment) -> (Secrets, Problems) {
    let mut secrets = Secrets::default();
    let mut problems = Problems::default();
    for (key, reference) in config.secret_refs() {
        match resolve(reference, env).await {
            Ok(secret) => secrets.insert(key, secret),
            Err(e) => problems.push(key, e),
        }
    }
    (secrets, problems)
}

/// Resolves one reference. The error says which source failed and why, never what it held.
pub async fn resolve(reference: &SecretRef, env: &Environment) -> Result<Secret, String> {
    let secret = resolve_source(reference, env).await?;
    // An empty secret is none: an empty webhook secret would make any signature valid.
    if secret.expose().trim().is_empty() {
        return Err(match reference {
            SecretRef::Literal(_) => "is empty or only white space".to_string(),
            other => format!("{} holds only white space", other.describe()),
        });
    }
    Ok(secret)
}

async fn resolve_source(reference: &SecretRef, env: &Environment) -> Result<Secret, String> {
    match reference {
        SecretRef::Literal(v) => Ok(Secret::new(v.clone())),
        SecretRef::Env(name) => match env.get(name) {
            Some(v) if !v.is_empty() => Ok(Secret::new(v.clone())),
            Some(_) => Err(format!("environment variable {name} is empty")),
            None => Err(format!("environment variable {name} is not set")),
        },
        SecretRef::File(path) => read_file(Path::new(path)),
        SecretRef::Credential(name) => {
            if name.is_empty() || name.contains('/') || name == ".." {
                return Err(format!("cred:{name} is not a credential name"));
            }
            let Some(dir) = env.get("CREDENTIALS_DIRECTORY") else {
                return Err(format!(
                    "cred:{name} needs $CREDENTIALS_DIRECTORY (set by systemd's LoadCredential=)"
                ));
            };
            // A credential systemd could not load arrives as the unit's empty SetCredential=.
            read_file(&Path::new(dir).join(name)).map_err(|e| {
                format!("credential {name}: {e} (is the file its LoadCredential= names there?)")
            })
        }
        SecretRef::OnePassword(uri) => op_read(uri, env).await,
    }
}

fn read_file(path: &Path) -> Result<Secret, String> {
    match std::fs::read_to_string(path) {
        // A trailing newline is an editor's, not the secret's.
        Ok(v) => {
            let v = v.strip_suffix('\n').unwrap_or(&v);
            let v = v.strip_suffix('\r').unwrap_or(v);
            if v.is_empty() {
                Err(format!("{} is empty", path.display()))
            } else {
                Ok(Secret::new(v))
            }
        }
        Err(e) => Err(format!("cannot read {}: {}", path.display(), e.kind())),
    }
}

async fn op_read(uri: &str, env: &Environment) -> Result<Secret, String> {
    let bin = env.get("ONEPASSWORD_CLI").map_or("op", String::as_str);
    let mut cmd = Command::new(bin);
    // `--no-newline` keeps the value exact; the reference is one argument, never a shell word.
    cmd.args(["read", "--no-newline", uri])
        .env_clear()
        .envs(
            env.iter()
                .filter(|(k, _)| k.starts_with("OP_") || *k == "HOME" || *k == "PATH"),
        )
        .kill_on_drop(true);
    infraflux_handlers::process::die_with_parent(&mut cmd);
    let out = tokio::time::timeout(OP_TIMEOUT, cmd.output())
        .await
        .map_err(|_| {
            format!(
                "1Password CLI timed out after {}s reading {uri}",
                OP_TIMEOUT.as_secs()
            )
        })?
        .map_err(|e| match e.kind() {
            // A PATH entry this user cannot read looks like "permission denied": same cause.
            std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied => {
                format!("the 1Password CLI ({bin}) is not installed or not on this user's PATH")
            }
            kind => format!("cannot run the 1Password CLI ({bin}): {kind}"),
        })?;
    if !out.status.success() {
        // op's stderr describes the failure (not signed in, no such item); it holds no value.
        let reason = String::from_utf8_lossy(&out.stderr);
        let reason = op_reason(reason.lines().last().unwrap_or(""));
        return Err(format!("1Password CLI could not read {uri}: {reason}"));
    }
    let value = String::from_utf8(out.stdout).map_err(|_| format!("{uri} is not UTF-8"))?;
    if value.is_empty() {
        return Err(format!("{uri} is empty"));
    }
    Ok(Secret::new(value))
}

/// op's error line without its `[ERROR] 2026/12/01 12:00:00 ` prefix: the level and the time
/// say nothing about why.
fn op_reason(line: &str) -> &str {
    let line = line.trim();
    let Some(rest) = line.strip_prefix("[ERROR]") else {
        return line;
    };
    let rest = rest.trim_start();
    let mut words = rest.splitn(3, ' ');
    match (words.next(), words.next(), words.next()) {
        (Some(date), Some(time), Some(why))
            if date.len() == 10
                && date.chars().all(|c| c.is_ascii_digit() || c == '/')
                && time.chars().all(|c| c.is_ascii_digit() || c == ':') =>
        {
            why
        }
        _ => rest,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn env_file_and_credential_references_resolve() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("gh"), "from-cred\n").expect("write");
        std::fs::write(dir.path().join("f"), "from-file\n").expect("write");
        let env: Environment = [
            ("TOKEN".to_string(), "from-env".to_string()),
            (
                "CREDENTIALS_DIRECTORY".to_string(),
                dir.path().display().to_string(),
            ),
        ]
        .into();
        let get = |r: &str| {
            let env = env.clone();
            let r = SecretRef::parse(r);
            async move { resolve(&r, &env).await }
        };
        assert_eq!(get("env:TOKEN").await.expect("env").expose(), "from-env");
        assert_eq!(get("cred:gh").await.expect("cred").expose(), "from-cred");
        let file = format!("file:{}", dir.path().join("f").display());
        assert_eq!(get(&file).await.expect("file").expose(), "from-file");
        let e = get("env:MISSING").await.expect_err("missing");
        assert!(e.contains("MISSING"), "{e}");
        let e = get("cred:../x").await.expect_err("traversal");
        assert!(e.contains("not a credential name"), "{e}");
        // What systemd leaves when a LoadCredential= file is missing: the unit's "\n" fallback.
        std::fs::write(dir.path().join("webhook"), "\n").expect("write");
        let e = get("cred:webhook").await.expect_err("empty");
        assert!(
            e.contains("credential webhook") && e.contains("is empty"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn an_empty_or_blank_secret_is_refused_whatever_its_source() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("blank"), " \n").expect("write");
        let env: Environment = [
            ("EMPTY".to_string(), String::new()),
            ("BLANK".to_string(), "  ".to_string()),
        ]
        .into();
        let blank_file = format!("file:{}", dir.path().join("blank").display());
        for (reference, expected) in [
            ("", "is empty"),
            ("env:EMPTY", "environment variable EMPTY is empty"),
            ("env:BLANK", "env:BLANK holds only white space"),
            (blank_file.as_str(), "holds only white space"),
        ] {
            let e = resolve(&SecretRef::parse(reference), &env)
                .await
                .expect_err(reference);
            assert!(e.contains(expected), "{reference}: {e}");
        }
    }

    #[tokio::test]
    async fn one_password_references_go_through_the_op_cli() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fake = dir.path().join("op");
        // A stand-in for the CLI that prints the item for one reference and fails otherwise.
        std::fs::write(
            &fake,
            "#!/bin/sh\n[ \"$1 $2 $3\" = 'read --no-newline op://v/minio/key' ] && printf 'k3y' && exit 0\necho '[ERROR] item not found' >&2; exit 1\n",
        )
        .expect("write");
        std::process::Command::new("chmod")
            .args(["+x", &fake.display().to_string()])
            .status()
            .expect("chmod");
        let env: Environment = [("ONEPASSWORD_CLI".to_string(), fake.display().to_string())].into();
        let ok = resolve(&SecretRef::parse("op://v/minio/key"), &env).await;
        assert_eq!(ok.expect("op").expose(), "k3y");
        let err = resolve(&SecretRef::parse("op://v/minio/other"), &env)
            .await
            .expect_err("missing item");
        assert!(
            err.contains("item not found") && err.contains("op://v/minio/other"),
            "{err}"
        );
        assert!(!err.contains("[ERROR]"), "{err}");
    }

    #[test]
    fn op_errors_lose_their_level_and_time() {
        assert_eq!(
            op_reason(
                "[ERROR] 2026/12/01 12:00:00 \"missing\" isn't an item in the \"infra\" vault."
            ),
            "\"missing\" isn't an item in the \"infra\" vault."
        );
        assert_eq!(op_reason("[ERROR] item not found\n"), "item not found");
        assert_eq!(op_reason("  not signed in "), "not signed in");
    }
}

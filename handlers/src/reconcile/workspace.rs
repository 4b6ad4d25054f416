//! The infra repository at an exact commit: one bare cache per agent, fetched before each job,
//! and a fresh working tree per job that shares the cache's objects.
//!
//! Authentication for HTTPS goes through git's environment (`GIT_CONFIG_*`), never through the
//! command line, where other users of the host could read it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use crate::handler::HandlerError;
use crate::process::{ProcessError, run_cancellable};
use crate::secret::Secret;

use super::MAX_TITLE_CHARS;

/// Longest a single git command may take (a first clone of a big repository included).
const GIT_TIMEOUT: Duration = Duration::from_secs(600);

/// How to reach the repository.
#[derive(Clone)]
pub struct Remote {
    pub url: String,
    /// For `https://` URLs: sent as HTTP basic auth (`x-access-token`), as GitHub expects.
    pub token: Option<Secret>,
    /// Environment handed to git (PATH, HOME, SSH settings).
    pub env: Vec<(String, String)>,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Remote({})", self.url)
    }
}

impl Remote {
    fn command(&self) -> Command {
        let mut cmd = Command::new("git");
        cmd.env_clear()
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_ASKPASS", "true");
        if let (Some(token), true) = (&self.token, self.url.starts_with("https://")) {
            let basic = base64::engine::general_purpose::STANDARD
                .encode(format!("x-access-token:{}", token.expose()));
            cmd.env("GIT_CONFIG_COUNT", "1")
                .env("GIT_CONFIG_KEY_0", "http.extraHeader")
                .env(
                    "GIT_CONFIG_VALUE_0",
                    format!("Authorization: Basic {basic}"),
                );
        }
        cmd
    }

    async fn git(
        &self,
        args: &[&str],
        cancel: &CancellationToken,
        what: &str,
    ) -> Result<String, HandlerError> {
        let mut cmd = self.command();
        cmd.args(args);
        // git itself ignores it, but hooks and credential helpers may continue the trace.
        if let Some(tp) = crate::trace::current_traceparent() {
            cmd.env("TRACEPARENT", tp);
        }
        let run = run_cancellable(cmd, cancel, Duration::from_secs(5));
        let out = match tokio::time::timeout(GIT_TIMEOUT, run).await {
            Err(_) => {
                return Err(HandlerError::Retryable(format!(
                    "git {what} took longer than {}s",
                    GIT_TIMEOUT.as_secs()
                )));
            }
            Ok(Err(ProcessError::Cancelled { .. })) => return Err(HandlerError::Cancelled),
            Ok(Err(e)) => return Err(HandlerError::Failed(format!("git {what}: {e}"))),
            Ok(Ok(out)) => out,
        };
        if out.status.success() {
            Ok(out.stdout)
        } else {
            let detail = out
                .stderr
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            // A network hiccup is worth another try; a missing commit is not, but git does not
            // tell them apart by exit code, so the caller decides.
            Err(HandlerError::Failed(format!(
                "git {what} failed: {}",
                detail.trim()
            )))
        }
    }

    /// The commit a branch or tag points at, straight from the remote.
    pub async fn resolve(
        &self,
        reference: &str,
        cancel: &CancellationToken,
    ) -> Result<String, HandlerError> {
        if is_full_sha(reference) {
            return Ok(reference.to_ascii_lowercase());
        }
        let candidates = [
            format!("refs/heads/{reference}"),
            format!("refs/tags/{reference}^{{}}"),
            format!("refs/tags/{reference}"),
        ];
        let listing = self
            .git(
                &[
                    "ls-remote",
                    &self.url,
                    &format!("refs/heads/{reference}"),
                    &format!("refs/tags/{reference}*"),
                ],
                cancel,
                "ls-remote",
            )
            .await?;
        for wanted in &candidates {
            if let Some(sha) = listing.lines().find_map(|line| {
                let (sha, name) = line.split_once('\t')?;
                (name == wanted).then(|| sha.to_string())
            }) {
                return Ok(sha);
            }
        }
        Err(HandlerError::Failed(format!(
            "{reference:?} is neither a branch nor a tag of {}",
            self.url
        )))
    }

    /// Brings `cache` (a bare repository) up to date and makes sure it holds `commit`.
    async fn fetch(
        &self,
        cache: &Path,
        commit: &str,
        cancel: &CancellationToken,
    ) -> Result<(), HandlerError> {
        let cache_str = cache.to_string_lossy().to_string();
        if !cache.join("HEAD").exists() {
            std::fs::create_dir_all(cache)
                .map_err(|e| HandlerError::Internal(format!("{}: {e}", cache.display())))?;
            self.git(&["init", "--quiet", "--bare", &cache_str], cancel, "init")
                .await?;
        }
        // Heads and pull request heads: a commit of either kind is then local. Servers without
        // pull refs may refuse the second refspec; heads alone are then enough.
        const HEADS: &str = "+refs/heads/*:refs/heads/*";
        const PULLS: &str = "+refs/pull/*/head:refs/pull/*/head";
        let fetch = |refspecs: &'static [&'static str]| {
            let mut args = vec![
                "-C",
                cache_str.as_str(),
                "fetch",
                "--quiet",
                "--prune",
                "--no-tags",
                "--",
                self.url.as_str(),
            ];
            args.extend_from_slice(refspecs);
            args
        };
        match self.git(&fetch(&[HEADS, PULLS]), cancel, "fetch").await {
            Ok(_) => {}
            Err(HandlerError::Failed(msg)) => {
                tracing::debug!(error = %msg, "Fetching with pull refs failed; fetching heads only");
                self.git(&fetch(&[HEADS]), cancel, "fetch")
                    .await
                    .map_err(retryable)?;
            }
            Err(other) => return Err(other),
        }
        let present = self
            .git(
                &[
                    "-C",
                    &cache_str,
                    "cat-file",
                    "-e",
                    &format!("{commit}^{{commit}}"),
                ],
                cancel,
                "cat-file",
            )
            .await
            .is_ok();
        if present {
            return Ok(());
        }
        // Not on any branch (a force-pushed-away commit): ask for it by id.
        self.git(
            &[
                "-C",
                &cache.to_string_lossy(),
                "fetch",
                "--quiet",
                "--",
                &self.url,
                commit,
            ],
            cancel,
            "fetch commit",
        )
        .await
        .map_err(|_| HandlerError::Failed(format!("commit {commit} is not in {}", self.url)))?;
        Ok(())
    }

    /// A working tree of `commit` in `dir` (replaced if it exists).
    #[tracing::instrument(name = "git_checkout", skip_all, fields(commit = %commit))]
    pub async fn checkout(
        &self,
        cache: &Path,
        dir: &Path,
        commit: &str,
        cancel: &CancellationToken,
    ) -> Result<PathBuf, HandlerError> {
        if !is_full_sha(commit) {
            return Err(HandlerError::Failed(format!(
                "{commit:?} is not a full commit sha"
            )));
        }
        self.fetch(cache, commit, cancel).await?;
        if dir.exists() {
            std::fs::remove_dir_all(dir)
                .map_err(|e| HandlerError::Internal(format!("{}: {e}", dir.display())))?;
        }
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| HandlerError::Internal(format!("{}: {e}", parent.display())))?;
        }
        let (cache_s, dir_s) = (
            cache.to_string_lossy().to_string(),
            dir.to_string_lossy().to_string(),
        );
        self.git(
            &[
                "clone",
                "--quiet",
                "--shared",
                "--no-checkout",
                "--",
                &cache_s,
                &dir_s,
            ],
            cancel,
            "clone",
        )
        .await?;
        self.git(
            &["-C", &dir_s, "checkout", "--quiet", "--detach", commit],
            cancel,
            "checkout",
        )
        .await?;
        Ok(dir.to_path_buf())
    }

    /// The first line of the checked-out commit's message and its author's name; `None` when
    /// git cannot tell (only shown, so nothing fails on it).
    pub async fn describe(
        &self,
        dir: &Path,
        cancel: &CancellationToken,
    ) -> Option<(String, String)> {
        let dir = dir.to_string_lossy();
        let out = self
            .git(
                &["-C", &dir, "log", "-1", "--format=%s%x1f%an", "HEAD"],
                cancel,
                "log",
            )
            .await
            .ok()?;
        let (title, author) = out.trim_end().split_once('\u{1f}')?;
        // As a push's title is kept: bounded, however long the commit's first line.
        let bounded = |s: &str| s.chars().take(MAX_TITLE_CHARS).collect();
        Some((bounded(title), bounded(author)))
    }
}

fn retryable(e: HandlerError) -> HandlerError {
    match e {
        HandlerError::Failed(m) => HandlerError::Retryable(m),
        other => other,
    }
}

pub fn is_full_sha(s: &str) -> bool {
    s.len() == 40 && s.chars().all(|c| c.is_ascii_hexdigit())
}

//! `github.token`: the token can do what the agent does with it. Classic tokens list their
//! scopes in `X-OAuth-Scopes` (`repo` covers statuses, comments and issues); fine-grained
//! tokens report none, so the reads the agent needs are probed with harmless requests.

use reqwest::StatusCode;

use super::{Preflight, cause};
use crate::checks::Check;
use crate::secret::SecretKey;

const NAME: &str = "github.token";

/// The scopes a classic token needs: `repo` (commit statuses, issues and pull request
/// comments, reading a private repository).
pub const CLASSIC_SCOPES: &[&str] = &["repo"];

/// What a classic token lacks of [`CLASSIC_SCOPES`], given its `X-OAuth-Scopes` header.
pub fn missing_scopes(header: &str) -> Vec<&'static str> {
    let granted: Vec<&str> = header.split(',').map(str::trim).collect();
    CLASSIC_SCOPES
        .iter()
        .filter(|s| !granted.contains(s))
        .copied()
        .collect()
}

/// What a fine-grained token still needs, which no harmless request can show.
const WRITES: &str = "Commit statuses: write, Issues: write and Pull requests: write";

pub async fn check(preflight: &Preflight) -> Check {
    if let Some(why) = preflight.client_problems.get("github.token") {
        return Check::fail(
            NAME,
            format!("github.token: {why}"),
            "fix the github.token reference",
        );
    }
    if let Some(why) = preflight.client_problems.get("github.api_url") {
        return Check::fail(
            NAME,
            format!("github.api_url: {why}"),
            "fix [github] api_url and repo",
        );
    }
    let Some(github) = &preflight.context.github else {
        return Check::skip(NAME, "no [github] section");
    };
    let Some(token) = preflight.context.secrets.of(&SecretKey::GithubToken) else {
        return Check::skip(NAME, "[github] has no token");
    };
    let repo = github.repo_name();
    let client = match reqwest::Client::builder()
        .timeout(preflight.check_timeout())
        .user_agent(concat!("infraflux-agent/", env!("CARGO_PKG_VERSION")))
        .build()
    {
        Ok(c) => c,
        Err(e) => return Check::fail(NAME, cause(&e), "report this as a bug"),
    };
    let mut auth = match http::HeaderValue::from_str(&format!("Bearer {}", token.expose())) {
        Ok(v) => v,
        Err(_) => {
            return Check::fail(
                NAME,
                "the token holds characters a header cannot carry",
                "store the token as GitHub printed it",
            );
        }
    };
    auth.set_sensitive(true);
    let get = |path: String| {
        client
            .get(format!("{}{path}", github.api_url()))
            .header(http::header::AUTHORIZATION, auth.clone())
            .header(http::header::ACCEPT, "application/vnd.github+json")
            .send()
    };
    let response = match get(format!("/repos/{repo}")).await {
        Ok(r) => r,
        Err(e) => {
            return Check::fail(
                NAME,
                format!("cannot reach {}: {}", github.api_url(), cause(&e)),
                "check [github] api_url and that this host reaches it",
            );
        }
    };
    let status = response.status();
    let scopes = response
        .headers()
        .get("x-oauth-scopes")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let accepted = accepted_permissions(&response);
    match status {
        StatusCode::UNAUTHORIZED => {
            return Check::fail(
                NAME,
                "GitHub refused the token (401 Bad credentials): it is wrong, expired or revoked",
                "make a new token and store it where github.token points",
            );
        }
        s if s == StatusCode::NOT_FOUND || s == StatusCode::FORBIDDEN => {
            // GitHub hides a private repository from a classic token without `repo` (404), but
            // still lists the token's scopes: name the one missing rather than guess.
            if let Some(scopes) = &scopes {
                let missing = missing_scopes(scopes);
                if !missing.is_empty() {
                    return classic_lacks(
                        Some(format!("cannot read {repo} ({s})")),
                        &missing,
                        scopes,
                    );
                }
                return Check::fail(
                    NAME,
                    format!("classic token cannot read {repo} ({s}){accepted}"),
                    format!(
                        "check github.repo ({repo}) and that the token's owner can read it (an organization using SSO must also authorize the token)"
                    ),
                );
            }
            return Check::fail(
                NAME,
                format!("the token cannot read {repo} ({s}){accepted}"),
                format!(
                    "classic token: grant the repo scope; fine-grained token: add {repo} to its repositories with Metadata: read and Contents: read, and {WRITES}"
                ),
            );
        }
        s if !s.is_success() => {
            return Check::fail(
                NAME,
                format!("GET /repos/{repo} answered {s}"),
                "check GitHub's status and [github] api_url",
            );
        }
        _ => {}
    }
    if let Some(scopes) = scopes {
        let missing = missing_scopes(&scopes);
        if missing.is_empty() {
            return Check::pass(
                NAME,
                format!("classic token reads {repo}; scopes: {scopes}"),
            );
        }
        return classic_lacks(None, &missing, &scopes);
    }
    // A fine-grained token (or an app's): no scopes to read, so probe the reads.
    match get(format!("/repos/{repo}/commits?per_page=1")).await {
        Ok(r) if r.status().is_success() => Check::pass(
            NAME,
            format!(
                "fine-grained token reads {repo} and its commits; it also needs {WRITES}, which only a write would show"
            ),
        ),
        Ok(r) => {
            let accepted = accepted_permissions(&r);
            Check::fail(
                NAME,
                format!(
                    "fine-grained token cannot list the commits of {repo} ({}){accepted}",
                    r.status()
                ),
                format!("give the token Contents: read on {repo}, and {WRITES}"),
            )
        }
        Err(e) => Check::fail(
            NAME,
            format!("GET /repos/{repo}/commits: {}", cause(&e)),
            "check that this host reaches GitHub",
        ),
    }
}

/// A classic token without the `missing` scopes, and what it `cannot` do for lack of them.
fn classic_lacks(cannot: Option<String>, missing: &[&str], scopes: &str) -> Check {
    let granted = match scopes.trim() {
        "" => "none",
        listed => listed,
    };
    let lacks = format!(
        "lacks the scope(s) {} (it has: {granted})",
        missing.join(", ")
    );
    Check::fail(
        NAME,
        match cannot {
            Some(cannot) => format!("classic token {cannot}: it {lacks}"),
            None => format!("classic token {lacks}"),
        },
        format!(
            "edit the token on GitHub (Settings, Developer settings) and add: {}",
            missing.join(", ")
        ),
    )
}

/// GitHub names the permission a refused request needed in `X-Accepted-GitHub-Permissions`.
fn accepted_permissions(response: &reqwest::Response) -> String {
    response
        .headers()
        .get("x-accepted-github-permissions")
        .and_then(|v| v.to_str().ok())
        .map(|v| format!("; GitHub accepts: {v}"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_scopes_need_repo() {
        assert!(missing_scopes("repo, workflow").is_empty());
        assert_eq!(missing_scopes("public_repo, read:org"), vec!["repo"]);
        assert_eq!(missing_scopes(""), vec!["repo"]);
    }
}

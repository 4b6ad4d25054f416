//! `[ui] auth_token`: a bearer header, or `?token=` once, which leaves a cookie and redirects
//! to the same address without the token (so it stays out of history, bookmarks and logs).

use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hmac::{Hmac, KeyInit, Mac};
use infraflux_handlers::secret::Secret;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::UiState;

pub const COOKIE: &str = "infraflux_ui";
/// A browser keeps the cookie this long (seconds): a week, then `?token=` again.
const COOKIE_MAX_AGE: u32 = 7 * 24 * 3600;

pub async fn require(State(state): State<UiState>, request: Request, next: Next) -> Response {
    let Some(token) = &state.auth_token else {
        return next.run(request).await;
    };
    if let Some(given) = query_token(request.uri()) {
        if !same(token.expose(), &given) {
            return refused();
        }
        let location = without_token(request.uri().path(), request.uri().query());
        // Lax, not Strict: a `?token=` link opened from a chat or Grafana is a cross-site
        // navigation, and Strict would withhold the cookie from it and from the redirect.
        // Every page is a read-only GET, so Lax gives a foreign site nothing to trigger.
        let behind_tls = request
            .headers()
            .get("x-forwarded-proto")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https"));
        let cookie = session_value(token).map(|session| {
            format!(
                "{COOKIE}={session}; Path=/; HttpOnly; SameSite=Lax; Max-Age={COOKIE_MAX_AGE}{}",
                if behind_tls { "; Secure" } else { "" }
            )
        });
        let mut response = StatusCode::SEE_OTHER.into_response();
        if let (Ok(location), Some(Ok(cookie))) = (
            HeaderValue::from_str(&location),
            cookie.as_deref().map(HeaderValue::from_str),
        ) {
            response.headers_mut().insert(header::LOCATION, location);
            response.headers_mut().insert(header::SET_COOKIE, cookie);
        }
        return response;
    }
    if authorized(request.headers(), token) {
        next.run(request).await
    } else {
        refused()
    }
}

fn refused() -> Response {
    let mut response = super::pages::error_page(
        StatusCode::UNAUTHORIZED,
        "Token required",
        "This status page needs its token: open it once with ?token=… added to the address, or send Authorization: Bearer.",
    );
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"infraflux\""),
    );
    response
}

fn authorized(headers: &HeaderMap, token: &Secret) -> bool {
    let bearer = headers
        .get_all(header::AUTHORIZATION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.strip_prefix("Bearer "))
        .any(|given| same(token.expose(), given.trim()));
    if bearer {
        return true;
    }
    let Some(expected) = session_value(token) else {
        return false;
    };
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .any(|(name, value)| name == COOKIE && same(&expected, value))
}

/// Equal, in time that does not depend on where they differ (digests make the lengths equal).
fn same(expected: &str, given: &str) -> bool {
    let a = Sha256::digest(expected.as_bytes());
    let b = Sha256::digest(given.as_bytes());
    bool::from(a.as_slice().ct_eq(b.as_slice()))
}

/// What the cookie holds: derived from the token, so the token itself is never stored by the
/// browser, and changing the token ends every session.
fn session_value(token: &Secret) -> Option<String> {
    // HMAC takes a key of any length, so this is always `Some`; were it not, no cookie would
    // be set or accepted.
    let mut mac = Hmac::<Sha256>::new_from_slice(token.expose().as_bytes()).ok()?;
    mac.update(b"infraflux-ui-session");
    Some(hex::encode(mac.finalize().into_bytes()))
}

#[derive(serde::Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

/// `?token=`, decoded as the page's own forms are.
fn query_token(uri: &Uri) -> Option<String> {
    Query::<TokenQuery>::try_from_uri(uri).ok()?.0.token
}

/// The same address without `token=`; a path such as `//host` is not followed elsewhere.
fn without_token(path: &str, query: Option<&str>) -> String {
    let path = if path.starts_with('/') && !path.starts_with("//") {
        path
    } else {
        "/"
    };
    let rest: Vec<&str> = query
        .unwrap_or_default()
        .split('&')
        .filter(|pair| !pair.is_empty() && !pair.starts_with("token="))
        .collect();
    if rest.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", rest.join("&"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_leaves_the_address_and_nothing_redirects_off_site() {
        assert_eq!(
            without_token("/jobs", Some("token=abc&kind=backup")),
            "/jobs?kind=backup"
        );
        assert_eq!(without_token("/", Some("token=abc")), "/");
        assert_eq!(without_token("//evil.example/x", Some("token=abc")), "/");
    }

    #[test]
    fn query_token_is_decoded() {
        let token = |uri: &str| query_token(&uri.parse::<Uri>().expect("uri"));
        assert_eq!(token("/?a=1&token=a%2Bb+c").as_deref(), Some("a+b c"));
        assert_eq!(token("/?a=1"), None);
        // A broken escape is kept as written.
        assert_eq!(token("/?token=%zz%4").as_deref(), Some("%zz%4"));
    }

    #[test]
    fn bearer_and_cookie_are_accepted_others_not() {
        let token = Secret::new("s3cret-token");
        let mut headers = HeaderMap::new();
        assert!(!authorized(&headers, &token));
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer wrong"),
        );
        assert!(!authorized(&headers, &token));
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer s3cret-token"),
        );
        assert!(authorized(&headers, &token));
        let mut headers = HeaderMap::new();
        let session = session_value(&token).expect("an HMAC of any key");
        let cookie = format!("other=1; {COOKIE}={session}");
        headers.insert(
            header::COOKIE,
            HeaderValue::from_str(&cookie).expect("header"),
        );
        assert!(authorized(&headers, &token));
        // The cookie holds a derived value, never the token itself.
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("{COOKIE}=s3cret-token")).expect("header"),
        );
        assert!(!authorized(&headers, &token));
    }
}

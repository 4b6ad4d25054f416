//! `[ui] auth_token`: a bearer header, or `?token=` once, which leaves a cookie and redirects
//! to the same address without the token (so it stays out of history, bookmarks and logs).

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
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
    if let Some(given) = query_token(request.uri().query()) {
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
        let cookie = format!(
            "{COOKIE}={}; Path=/; HttpOnly; SameSite=Lax; Max-Age={COOKIE_MAX_AGE}{}",
            session_value(token),
            if behind_tls { "; Secure" } else { "" }
        );
        let mut response = StatusCode::SEE_OTHER.into_response();
        if let (Ok(location), Ok(cookie)) = (
            HeaderValue::from_str(&location),
            HeaderValue::from_str(&cookie),
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
    let expected = session_value(token);
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
fn session_value(token: &Secret) -> String {
    match Hmac::<Sha256>::new_from_slice(token.expose().as_bytes()) {
        Ok(mut mac) => {
            mac.update(b"infraflux-ui-session");
            hex::encode(mac.finalize().into_bytes())
        }
        // HMAC takes a key of any length; unreachable, and then no cookie matches.
        Err(_) => String::new(),
    }
}

fn query_token(query: Option<&str>) -> Option<String> {
    query?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(name, _)| *name == "token")
        .map(|(_, value)| percent_decode(value))
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

pub fn percent_decode(value: &str) -> String {
    let hex_digit = |b: u8| {
        char::from(b)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
    };
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => match (
                bytes.get(i + 1).copied().and_then(hex_digit),
                bytes.get(i + 2).copied().and_then(hex_digit),
            ) {
                (Some(high), Some(low)) => {
                    out.push(high * 16 + low);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
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
        assert_eq!(
            query_token(Some("a=1&token=a%2Bb+c")).as_deref(),
            Some("a+b c")
        );
        assert_eq!(query_token(Some("a=1")), None);
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
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
        let cookie = format!("other=1; {COOKIE}={}", session_value(&token));
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

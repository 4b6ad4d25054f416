//! The checks of a GitHub webhook delivery, from its headers and body to a verdict: signed by
//! a configured secret, and naming an event and a delivery. Apart from the HTTP plumbing so that
//! the fuzz targets run exactly what the handler runs.

use axum::http::StatusCode;
use hmac::{Hmac, KeyInit, Mac};
use infraflux_handlers::secret::Secret;
use serde_json::{Value, json};
use sha2::Sha256;

use crate::github;

/// What the checks decide about one delivery.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict<'a> {
    /// Answered at once: the HTTP status, the metric's result label and the JSON body.
    Refused {
        status: StatusCode,
        result: &'static str,
        body: Value,
    },
    /// Signed by a configured secret, with a valid event name: mapping and storing come next.
    Verified { event: &'a str, delivery: &'a str },
}

/// `true` when `header` is `sha256=<hex>` of an HMAC-SHA256 of `body` under any of `secrets`.
/// Every secret is tried (no early exit), and each comparison is constant-time.
pub fn verify_signature(secrets: &[Secret], header: &str, body: &[u8]) -> bool {
    let Some(signature) = header
        .strip_prefix("sha256=")
        .and_then(|h| hex::decode(h).ok())
    else {
        return false;
    };
    let mut valid = false;
    for secret in secrets {
        if let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes()) {
            mac.update(body);
            valid |= mac.verify_slice(&signature).is_ok();
        }
    }
    valid
}

/// The first value of header `name` (case-insensitive, as HTTP header names are), if it is
/// text: visible ASCII and tabs, the rule of `HeaderValue::to_str`. A value that is not text
/// counts as absent, as it did when the handler read a `HeaderMap`.
pub fn header_text<'a>(headers: &[(&str, &'a [u8])], name: &str) -> Option<&'a str> {
    let (_, value) = headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name))?;
    let text = value.iter().all(|&b| b == b'\t' || (32..127).contains(&b));
    if text {
        std::str::from_utf8(value).ok()
    } else {
        None
    }
}

/// Checks one delivery: its signature first (nothing unsigned is read further), then the event
/// and delivery headers. `headers` are (name, value) pairs in the order received.
pub fn check<'a>(secrets: &[Secret], headers: &[(&str, &'a [u8])], body: &[u8]) -> Verdict<'a> {
    let refused = |status, result, error: String| Verdict::Refused {
        status,
        result,
        body: json!({ "error": error }),
    };
    let Some(signature) = header_text(headers, "x-hub-signature-256") else {
        return refused(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing X-Hub-Signature-256".into(),
        );
    };
    if !verify_signature(secrets, signature, body) {
        tracing::warn!("Webhook with a bad signature refused");
        return refused(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "X-Hub-Signature-256 does not match the body".into(),
        );
    }
    let (Some(event), Some(delivery)) = (
        header_text(headers, "x-github-event"),
        header_text(headers, "x-github-delivery"),
    ) else {
        return refused(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "missing X-GitHub-Event or X-GitHub-Delivery header".into(),
        );
    };
    if !github::valid_event_name(event) {
        return refused(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("X-GitHub-Event {event:?} is not an event name"),
        );
    }
    Verdict::Verified { event, delivery }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn githubs_documented_test_vector() {
        let secret = Secret::new("It's a Secret to Everybody");
        let header = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert!(verify_signature(
            std::slice::from_ref(&secret),
            header,
            b"Hello, World!"
        ));
        assert!(!verify_signature(
            std::slice::from_ref(&secret),
            header,
            b"Hello, World?"
        ));
        assert!(!verify_signature(
            &[Secret::new("other")],
            header,
            b"Hello, World!"
        ));
        // Rotation: any configured secret is enough.
        assert!(verify_signature(
            &[Secret::new("old"), secret.clone()],
            header,
            b"Hello, World!"
        ));
        assert!(!verify_signature(
            std::slice::from_ref(&secret),
            "sha1=757107",
            b"Hello, World!"
        ));
        assert!(!verify_signature(&[secret], "sha256=zz", b"Hello, World!"));
    }

    const VECTOR_SIGNATURE: &[u8] =
        b"sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";

    fn secrets() -> Vec<Secret> {
        vec![Secret::new("It's a Secret to Everybody")]
    }

    #[test]
    fn a_signed_delivery_is_verified_with_its_event_and_delivery() {
        let headers: &[(&str, &[u8])] = &[
            ("X-GitHub-Event", b"push"),
            ("x-github-delivery", b"72d3162e-cc78-11e3-81ab-4c9367dc0958"),
            ("x-hub-signature-256", VECTOR_SIGNATURE),
        ];
        assert_eq!(
            check(&secrets(), headers, b"Hello, World!"),
            Verdict::Verified {
                event: "push",
                delivery: "72d3162e-cc78-11e3-81ab-4c9367dc0958"
            }
        );
    }

    #[test]
    fn refusals_come_in_the_handlers_order() {
        let status = |headers: &[(&str, &[u8])], body: &[u8]| match check(&secrets(), headers, body)
        {
            Verdict::Refused { status, result, .. } => (status.as_u16(), result),
            Verdict::Verified { .. } => (200, "verified"),
        };
        // Unsigned or badly signed: 401 before any other header is looked at.
        assert_eq!(status(&[], b"x"), (401, "unauthorized"));
        assert_eq!(
            status(
                &[("x-hub-signature-256", VECTOR_SIGNATURE)],
                b"Hello, World?"
            ),
            (401, "unauthorized")
        );
        // A signature that is not text counts as absent, as HeaderValue::to_str has it.
        assert_eq!(
            status(&[("x-hub-signature-256", b"sha256=\xff")], b"x"),
            (401, "unauthorized")
        );
        // The first of two signature headers is the one checked.
        assert_eq!(
            status(
                &[
                    ("x-hub-signature-256", b"sha256=00"),
                    ("x-hub-signature-256", VECTOR_SIGNATURE)
                ],
                b"Hello, World!"
            ),
            (401, "unauthorized")
        );
        let signed = ("x-hub-signature-256", VECTOR_SIGNATURE);
        assert_eq!(
            status(&[signed, ("x-github-event", b"push")], b"Hello, World!"),
            (400, "bad_request")
        );
        assert_eq!(
            status(
                &[
                    signed,
                    ("x-github-event", b"Push!"),
                    ("x-github-delivery", b"1")
                ],
                b"Hello, World!"
            ),
            (400, "bad_request")
        );
    }
}

//! The webhook's checks as the HTTP handler runs them (`infraflux_agent::webhook::check`), then
//! the mapping of what they let through, as `github::accept` does.
//!
//! Input: one mode byte, header lines (`name: value`) up to an empty line, then the body.
//! The mode's low two bits put a signature header before the input's own: 0 none, 1 the right
//! one, 2 one of another body, 3 one under a secret that is not configured. Bit 2 configures a
//! second (rotated-out) secret before the right one; bits 3 to 7 are the mapping's settings.

#![no_main]

use hmac::{Hmac, KeyInit, Mac};
use infraflux_agent::webhook::{self, Verdict};
use infraflux_handlers::secret::Secret;
use libfuzzer_sys::fuzz_target;
use sha2::Sha256;

mod common;

const SECRET: &str = "It's a Secret to Everybody";
const OLD_SECRET: &str = "rotated out";
const UNKNOWN_SECRET: &str = "not configured";
const SIGNATURE: &str = "x-hub-signature-256";

fn signature(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// The first value of `name`, if it is text as HTTP header values go (visible ASCII and tabs).
fn first_text<'a>(headers: &[(String, &'a [u8])], name: &str) -> Option<&'a str> {
    let (_, value) = headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name))?;
    let visible = value
        .iter()
        .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b));
    visible.then(|| std::str::from_utf8(value).expect("ASCII is UTF-8"))
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (head, body) = match rest.windows(2).position(|w| w == b"\n\n") {
        Some(blank) => (&rest[..blank], &rest[blank + 2..]),
        None => (rest, &[][..]),
    };
    let injected = match mode & 3 {
        1 => Some(signature(SECRET, body)),
        2 => Some(signature(SECRET, &[body, b"\n"].concat())),
        3 => Some(signature(UNKNOWN_SECRET, body)),
        _ => None,
    };
    let mut headers: Vec<(String, &[u8])> = head
        .split(|&b| b == b'\n')
        .filter(|line| !line.is_empty())
        .map(|line| match line.iter().position(|&b| b == b':') {
            Some(colon) => {
                let value = &line[colon + 1..];
                let start = value.iter().position(|&b| b != b' ').unwrap_or(value.len());
                (
                    String::from_utf8_lossy(&line[..colon]).into_owned(),
                    &value[start..],
                )
            }
            None => (String::from_utf8_lossy(line).into_owned(), &[][..]),
        })
        .collect();

    if let Some(injected) = &injected {
        headers.insert(0, (SIGNATURE.to_string(), injected.as_bytes()));
    }
    let secrets = if mode & 4 == 0 {
        vec![Secret::new(SECRET)]
    } else {
        vec![Secret::new(OLD_SECRET), Secret::new(SECRET)]
    };
    let configured: Vec<&str> = secrets.iter().map(Secret::expose).collect();

    let pairs: Vec<(&str, &[u8])> = headers.iter().map(|(n, v)| (n.as_str(), *v)).collect();
    let verdict = webhook::check(&secrets, &pairs, body);

    // The oracle, apart from the code under test: the first signature header is `sha256=` and
    // the HMAC of this very body under a configured secret (its hex in either case).
    let signed = first_text(&headers, SIGNATURE)
        .and_then(|header| header.strip_prefix("sha256="))
        .is_some_and(|hex_digest| {
            configured.iter().any(|secret| {
                let expected = signature(secret, body);
                hex_digest.eq_ignore_ascii_case(&expected["sha256=".len()..])
            })
        });
    let event = first_text(&headers, "x-github-event");
    let delivery = first_text(&headers, "x-github-delivery");
    match &verdict {
        Verdict::Verified {
            event: verified_event,
            delivery: verified_delivery,
        } => {
            assert!(signed, "accepted without a valid signature: {headers:?}");
            assert!(
                matches!(mode & 3, 0 | 1),
                "a wrong injected signature was accepted"
            );
            assert_eq!(Some(*verified_event), event);
            assert_eq!(Some(*verified_delivery), delivery);
            assert!(infraflux_agent::github::valid_event_name(verified_event));
        }
        Verdict::Refused {
            status,
            result,
            body: answer,
        } => {
            let error = answer.get("error").and_then(serde_json::Value::as_str);
            assert!(
                error.is_some_and(|e| !e.is_empty()),
                "a refusal without an error"
            );
            if signed {
                // Signed: refused only for a missing or bad event or delivery header.
                assert_eq!((status.as_u16(), *result), (400, "bad_request"));
                assert!(
                    event.is_none_or(|e| !infraflux_agent::github::valid_event_name(e))
                        || delivery.is_none(),
                    "a signed delivery with its headers refused: {answer}"
                );
            } else {
                assert_eq!((status.as_u16(), *result), (401, "unauthorized"));
            }
        }
    }

    if let Verdict::Verified { event, .. } = verdict {
        let (github, policy) = common::settings(mode >> 3, body);
        let _ = common::map_and_check(event, body, &github, policy);
    }
});

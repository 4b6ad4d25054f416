//! `map_event` with any event name and any body.
//!
//! Input: one byte of settings (see `common::settings`), the event name up to the first
//! newline, then the body.

#![no_main]

use libfuzzer_sys::fuzz_target;

mod common;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let (event, body) = match rest.iter().position(|&b| b == b'\n') {
        Some(newline) => (&rest[..newline], &rest[newline + 1..]),
        None => (rest, &[][..]),
    };
    let event = String::from_utf8_lossy(event);
    let (github, policy) = common::settings(flags, body);
    let _ = common::map_and_check(&event, body, &github, policy);
});

//! The command language's parser (`infraflux_handlers::command::parse`), as ChatOps, `ctl` and
//! `[[schedules]]` use it. Input: the command text (invalid UTF-8 replaced).

#![no_main]

use infraflux_handlers::command::{self, CommandError, MAX_COMMAND_LEN, Request};
use libfuzzer_sys::fuzz_target;

/// The words of a tokenized line written back: verb, positional words, then options.
fn rejoin(line: &command::CommandLine) -> String {
    let mut words = vec![line.verb.clone()];
    words.extend(line.positional.iter().cloned());
    words.extend(line.named.iter().map(|(k, v)| format!("{k}={v}")));
    words.join(" ")
}

/// The part of a clipped word (`clip` keeps 61 characters and adds `...`) that is the user's.
fn unclipped(word: &str) -> &str {
    if word.chars().count() == 64 && word.ends_with("...") {
        &word[..word.len() - 3]
    } else {
        word
    }
}

fn allowed(ch: char) -> bool {
    ch.is_ascii_alphanumeric() || ".:_/@+,=-".contains(ch)
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let parsed = command::parse(&text);
    let lower = text.to_lowercase();
    // The error names what was wrong, as the user wrote it (verbs and keys are lower-cased).
    let named = |word: &str| {
        let word = unclipped(word);
        text.contains(word) || lower.contains(&word.to_lowercase())
    };
    match &parsed {
        Ok(request) => {
            assert!(text.len() <= MAX_COMMAND_LEN);
            assert!(
                text.chars().all(|c| c.is_whitespace() || allowed(c)),
                "accepted a character outside the allowed set: {text:?}"
            );
            let line = command::tokenize(&text).expect("a parsed command tokenizes");
            let verb = command::verb(&line.verb).expect("a parsed command has a known verb");
            match request {
                Request::Help { .. } => assert_eq!(verb.name, "help"),
                Request::Status => assert_eq!(verb.name, "status"),
                Request::Jobs { limit, .. } => {
                    assert_eq!(verb.name, "jobs");
                    assert!((1..=command::MAX_JOBS_LIMIT).contains(limit));
                }
                Request::Job { id } | Request::Cancel { id } => {
                    assert!(verb.name == "job" || verb.name == "cancel");
                    assert!(command::validate_job_id(id).is_ok());
                }
                Request::Submit { kind, .. } => assert_eq!(verb.kind, Some(*kind)),
            }
        }
        Err(error) => {
            assert!(!error.to_string().is_empty());
            match error {
                CommandError::Empty => assert!(text.trim().is_empty()),
                CommandError::TooLong(n) => {
                    assert_eq!(*n, text.len());
                    assert!(*n > MAX_COMMAND_LEN);
                }
                CommandError::BadCharacter { word, ch } => {
                    assert!(!allowed(*ch) && !ch.is_whitespace(), "{ch:?} refused");
                    assert!(word.contains(*ch) || unclipped(word) != word, "{error}");
                    assert!(named(word), "{error} names no word of {text:?}");
                }
                CommandError::UnknownVerb { verb, .. } => {
                    assert!(command::verb(verb).is_none());
                    assert!(named(verb), "{error} names no word of {text:?}");
                }
                CommandError::Unexpected { word, .. } => {
                    assert!(named(word), "{error} names no word of {text:?}")
                }
                CommandError::UnknownKey { key, .. } | CommandError::DuplicateKey(key) => {
                    assert!(named(key), "{error} names no key of {text:?}")
                }
                CommandError::Invalid { name, value, .. } => {
                    assert!(!name.is_empty());
                    // An empty value: the option named was given where it does not belong.
                    let named_thing = if value.is_empty() { name } else { value };
                    assert!(named(named_thing), "{error} names nothing of {text:?}");
                }
                CommandError::Missing { .. } => {}
            }
        }
    }
    // Round trip: the words written back (whitespace and the order of options normalized)
    // read as the same command, or fail the same way.
    if let Ok(line) = command::tokenize(&text) {
        let again = rejoin(&line);
        assert_eq!(
            command::tokenize(&again).as_ref(),
            Ok(&line),
            "{again:?} tokenizes differently from {text:?}"
        );
        assert_eq!(
            command::parse(&again),
            parsed,
            "{again:?} parses differently from {text:?}"
        );
    }
});

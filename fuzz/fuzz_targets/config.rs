//! The config loader (`Config::load_all_str`, what `Config::load_all` runs on a file's text).
//!
//! Input: TOML text (invalid UTF-8 replaced). Comment lines `#env NAME=VALUE` also set the
//! environment variable `INFRAFLUX_NAME` for the load, so overrides are fuzzed with the file.

#![no_main]

use infraflux_agent::Config;
use libfuzzer_sys::fuzz_target;

const ORIGIN: &str = "fuzz.toml";
/// The agent's own sections; the handlers' come from `config_sections`.
const AGENT_SECTIONS: &[&str] = &["agent", "nats", "http", "github", "telemetry", "schedules"];

/// The first segment of a key: `reconcile` of `reconcile.env_vars.X`, `schedules` of
/// `schedules[0].name`. Lowercased as the loader lowercases an environment variable's name:
/// Unicode, not only ASCII (`INFRAFLUX_ÉTCD__X` is the section `étcd`).
fn root(key: &str) -> String {
    key.split(['.', '['])
        .next()
        .unwrap_or_default()
        .to_lowercase()
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let env: Vec<(String, String)> = text
        .lines()
        .filter_map(|line| line.strip_prefix("#env "))
        .filter_map(|assignment| assignment.split_once('='))
        .map(|(name, value)| (format!("INFRAFLUX_{name}"), value.to_string()))
        .collect();

    let (loaded, problems) = Config::load_all_str(&text, ORIGIN, env.clone());
    let (again, problems_again) = Config::load_all_str(&text, ORIGIN, env.clone());
    assert_eq!(problems, problems_again, "loading is not deterministic");
    assert_eq!(loaded.sections, again.sections);
    assert_eq!(
        Config::load_str(&text, ORIGIN, env.clone()).is_ok(),
        problems.is_empty(),
        "load and load_all disagree"
    );

    // Every problem names a key: the file as a whole, a section the agent knows, or one the
    // text (or an environment variable) has.
    let mut roots: Vec<String> = vec![ORIGIN.to_string()];
    roots.extend(AGENT_SECTIONS.iter().map(|s| s.to_string()));
    roots.extend(
        infraflux_handlers::config_sections()
            .iter()
            .map(|s| s.name.to_string()),
    );
    let document = toml::from_str::<toml::Table>(&text).ok();
    if let Some(table) = &document {
        roots.extend(table.keys().map(|k| root(k)));
    }
    for (name, _) in &env {
        let section = name.trim_start_matches("INFRAFLUX_");
        roots.push(root(section.split("__").next().unwrap_or_default()));
    }
    for problem in problems.0.iter().chain(loaded.warnings.0.iter()) {
        assert!(
            !problem.key.is_empty(),
            "a problem names no key: {problem:?}"
        );
        assert!(
            !problem.message.is_empty(),
            "a problem says nothing: {problem:?}"
        );
        // Where the two TOML parsers disagree on the text, its keys are not known here.
        if document.is_some() || problem.key == ORIGIN {
            assert!(
                problem.key == ORIGIN || roots.contains(&root(&problem.key)),
                "{problem:?} names no key of the config"
            );
        }
    }
    if problems.0.iter().any(|p| p.key == ORIGIN) {
        assert!(
            loaded.sections.is_empty(),
            "an unreadable file has sections"
        );
    }
    for section in &loaded.sections {
        assert!(
            AGENT_SECTIONS.contains(&section.as_str())
                || infraflux_handlers::config_sections()
                    .iter()
                    .any(|s| s.name == section),
            "unknown section {section:?} counted as present"
        );
    }
});

//! Every key the config accepts, read from the config types themselves (their serde field
//! lists), so the configuration reference can be checked against the code and cannot drift.

use std::collections::BTreeSet;

use infraflux_handlers::schema::keys_of;

use crate::config::{
    AgentSection, GithubSection, HttpSection, NatsSection, ScheduleSection, TelemetrySection,
    UiSection,
};

/// `section.key` (and `section.table.key`) for every key of every section: the agent's own,
/// then every client and kind section the handlers declare.
pub fn known_keys() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    out.extend(keys_of::<AgentSection>("agent"));
    out.extend(keys_of::<NatsSection>("nats"));
    out.extend(keys_of::<HttpSection>("http"));
    out.extend(keys_of::<UiSection>("ui"));
    out.extend(keys_of::<GithubSection>("github"));
    out.extend(keys_of::<TelemetrySection>("telemetry"));
    out.extend(keys_of::<ScheduleSection>("schedules"));
    for section in infraflux_handlers::config_sections() {
        out.extend((section.keys)(section.name));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `section.key` for every key row of every section table in docs/configuration.md.
    fn documented_keys() -> BTreeSet<String> {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/configuration.md");
        let text = std::fs::read_to_string(&path).expect("docs/configuration.md");
        let mut section = String::new();
        let mut keys = BTreeSet::new();
        for line in text.lines() {
            if line.starts_with('#') {
                // "## `[agent]`", "### `[reconcile]` (...)", "## `[[schedules]]`"
                section = line
                    .split('`')
                    .nth(1)
                    .map(|s| s.trim_matches(|c| c == '[' || c == ']').to_string())
                    .unwrap_or_default();
                continue;
            }
            if section.is_empty() || !line.starts_with("| `") {
                continue;
            }
            let key = line.split('`').nth(1).unwrap_or_default();
            let key = key.trim_matches(|c| c == '[' || c == ']');
            if key.contains('.') {
                keys.insert(key.to_string()); // a subtable row: `[reconcile.env_vars]`
            } else {
                keys.insert(format!("{section}.{key}"));
            }
        }
        keys
    }

    #[test]
    fn the_configuration_reference_documents_exactly_the_keys_the_code_accepts() {
        let known = known_keys();
        let documented = documented_keys();
        assert!(
            known.contains("agent.concurrency")
                && known.contains("etcd_snapshot.retention.keep_last"),
            "{known:?}"
        );
        let undocumented: Vec<_> = known.difference(&documented).collect();
        let unknown: Vec<_> = documented.difference(&known).collect();
        assert!(
            undocumented.is_empty(),
            "keys missing from docs/configuration.md: {undocumented:?}"
        );
        assert!(
            unknown.is_empty(),
            "docs/configuration.md documents keys the code does not accept: {unknown:?}"
        );
    }

    #[test]
    fn every_key_of_the_example_config_is_documented() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent.toml");
        let example: toml::Table = std::fs::read_to_string(&path)
            .expect("example")
            .parse()
            .expect("toml");
        let documented = documented_keys();
        let mut used = Vec::new();
        fn collect(prefix: &str, value: &toml::Value, out: &mut Vec<String>) {
            match value {
                toml::Value::Table(t) => {
                    for (k, v) in t {
                        let key = if prefix.is_empty() {
                            k.clone()
                        } else {
                            format!("{prefix}.{k}")
                        };
                        // env_vars' own keys are the user's variable names.
                        if key.ends_with(".env_vars") {
                            out.push(key);
                        } else {
                            collect(&key, v, out);
                        }
                    }
                }
                toml::Value::Array(items) if items.iter().all(toml::Value::is_table) => {
                    items.iter().for_each(|i| collect(prefix, i, out));
                }
                _ => out.push(prefix.to_string()),
            }
        }
        collect("", &toml::Value::Table(example), &mut used);
        let missing: BTreeSet<_> = used.iter().filter(|k| !documented.contains(*k)).collect();
        assert!(
            missing.is_empty(),
            "deploy/agent.toml uses undocumented keys: {missing:?}"
        );
        assert!(used.len() > 40, "the example wires the whole platform");
    }
}

//! Every key the config accepts, read from the config types themselves (their serde field
//! lists), so the configuration reference can be checked against the code and cannot drift.

use std::cell::RefCell;
use std::collections::BTreeSet;

use serde::de::value::{Error, StrDeserializer};
use serde::de::{DeserializeSeed, Deserializer, IntoDeserializer, MapAccess, SeqAccess, Visitor};

use crate::config::{
    AgentSection, GithubSection, HttpSection, NatsSection, ScheduleSection, TelemetrySection,
};
use infraflux_handlers::{
    acceptance, backup, clients, etcd_snapshot, reconcile, restore_drill, upgrade,
};

/// `section.key` (and `section.table.key`) for every key of every section.
pub fn known_keys() -> BTreeSet<String> {
    let out = RefCell::new(BTreeSet::new());
    fn walk<'de, T: serde::Deserialize<'de>>(section: &str, out: &RefCell<BTreeSet<String>>) {
        // A walk that fails only means a field type the collector does not imitate; the keys
        // seen up to there are still recorded, and the docs test then names what is missing.
        let _ = T::deserialize(Collector {
            path: section.to_string(),
            out,
        });
    }
    walk::<AgentSection>("agent", &out);
    walk::<NatsSection>("nats", &out);
    walk::<HttpSection>("http", &out);
    walk::<GithubSection>("github", &out);
    walk::<TelemetrySection>("telemetry", &out);
    walk::<ScheduleSection>("schedules", &out);
    walk::<clients::KubernetesConfig>("kubernetes", &out);
    walk::<clients::TalosConfig>("talos", &out);
    walk::<clients::S3Config>("s3", &out);
    walk::<reconcile::Config>("reconcile", &out);
    walk::<backup::Config>("backup", &out);
    walk::<etcd_snapshot::Config>("etcd_snapshot", &out);
    walk::<restore_drill::Config>("restore_drill", &out);
    walk::<upgrade::Config>("upgrade", &out);
    walk::<acceptance::Config>("acceptance", &out);
    out.into_inner()
}

/// A deserializer that answers every request with a plausible value and records the field
/// names of every struct it is asked for.
struct Collector<'a> {
    path: String,
    out: &'a RefCell<BTreeSet<String>>,
}

impl<'de> Deserializer<'de> for Collector<'_> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        // Untagged enums (one secret or a list) take a string.
        visitor.visit_str("1s")
    }
    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_bool(false)
    }
    fn deserialize_i8<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_i64(1)
    }
    fn deserialize_i16<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_i64(1)
    }
    fn deserialize_i32<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_i64(1)
    }
    fn deserialize_i64<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_i64(1)
    }
    fn deserialize_u8<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_u64(1)
    }
    fn deserialize_u16<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_u64(1)
    }
    fn deserialize_u32<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_u64(1)
    }
    fn deserialize_u64<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_u64(1)
    }
    fn deserialize_f32<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_f64(0.5)
    }
    fn deserialize_f64<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_f64(0.5)
    }
    fn deserialize_char<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_char('x')
    }
    fn deserialize_str<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        // A duration string parses too.
        v.visit_str("1s")
    }
    fn deserialize_string<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_str("1s")
    }
    fn deserialize_bytes<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_bytes(b"")
    }
    fn deserialize_byte_buf<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_bytes(b"")
    }
    fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_some(self)
    }
    fn deserialize_unit<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_unit()
    }
    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        v: V,
    ) -> Result<V::Value, Error> {
        v.visit_unit()
    }
    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        v: V,
    ) -> Result<V::Value, Error> {
        v.visit_newtype_struct(self)
    }
    fn deserialize_seq<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        // One element: the fields of a table array ([[schedules]]) are recorded under its name.
        v.visit_seq(One { item: Some(self) })
    }
    fn deserialize_tuple<V: Visitor<'de>>(self, _: usize, v: V) -> Result<V::Value, Error> {
        v.visit_seq(One { item: Some(self) })
    }
    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: usize,
        v: V,
    ) -> Result<V::Value, Error> {
        v.visit_seq(One { item: Some(self) })
    }
    fn deserialize_map<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        // A free-form table (env_vars) is one key itself.
        v.visit_map(Fields {
            fields: &[],
            next: 0,
            path: self.path,
            out: self.out,
        })
    }
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, Error> {
        v.visit_map(Fields {
            fields,
            next: 0,
            path: self.path,
            out: self.out,
        })
    }
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        variants: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, Error> {
        let first: StrDeserializer<'_, Error> =
            variants.first().copied().unwrap_or("").into_deserializer();
        v.visit_enum(first)
    }
    fn deserialize_identifier<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_str("")
    }
    fn deserialize_ignored_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_unit()
    }
}

struct Fields<'a> {
    fields: &'static [&'static str],
    next: usize,
    path: String,
    out: &'a RefCell<BTreeSet<String>>,
}

impl<'de> MapAccess<'de> for Fields<'_> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        let Some(field) = self.fields.get(self.next) else {
            return Ok(None);
        };
        let key: StrDeserializer<'_, Error> = (*field).into_deserializer();
        seed.deserialize(key).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        let field = self.fields.get(self.next).copied().unwrap_or_default();
        self.next += 1;
        let path = format!("{}.{field}", self.path);
        self.out.borrow_mut().insert(path.clone());
        seed.deserialize(Collector {
            path,
            out: self.out,
        })
    }
}

struct One<'a> {
    item: Option<Collector<'a>>,
}

impl<'de> SeqAccess<'de> for One<'_> {
    type Error = Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Error> {
        match self.item.take() {
            Some(c) => seed.deserialize(c).map(Some),
            None => Ok(None),
        }
    }
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

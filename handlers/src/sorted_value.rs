//! A `config::Value` deserialized with the keys of every table in sorted order.
//!
//! The `config` crate keeps tables in hash maps, so serde would meet a section's keys in an order
//! that changes from one load to the next, and since it stops at the first bad value, which
//! problems a section reports would change with it (found by the config fuzz target). All but
//! the order is `config::Value`'s own deserializer: the same coercions (the string `"3"` read as
//! a number, which environment overrides need) and the same errors.

use config::{ConfigError, Map, Value, ValueKind};
use serde::de::{self, DeserializeSeed, IntoDeserializer, Visitor};

pub(crate) struct SortedValue(pub(crate) Value);

/// A value split into what this module walks itself (tables and arrays, whose contents must be
/// read sorted too) and what `config::Value` reads (everything else).
enum Shape {
    Table(Map<String, Value>),
    Array(Vec<Value>),
    Leaf(Value),
}

fn shape(mut value: Value) -> Shape {
    match &mut value.kind {
        ValueKind::Table(table) => Shape::Table(std::mem::take(table)),
        ValueKind::Array(values) => Shape::Array(std::mem::take(values)),
        _ => Shape::Leaf(value),
    }
}

/// Names the key a nested error happened under, as `config::Value` does: the crate appends
/// " for key ..." to such a message, which `read_section` cuts off (the key is reported apart),
/// and without it a type error would end in the file's path instead. A missing field is left as
/// it is: `read_section` reads the field's name out of it.
fn at_key(error: ConfigError, key: &str) -> ConfigError {
    match error {
        ConfigError::NotFound(_) => error,
        other => other.extend_with_key(key),
    }
}

fn enum_shape_error(name: &str) -> ConfigError {
    ConfigError::Message(format!(
        "value of enum {name} should be represented by either string or table with exactly one key"
    ))
}

impl<'de> de::Deserializer<'de> for SortedValue {
    type Error = ConfigError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ConfigError> {
        match shape(self.0) {
            Shape::Table(table) => visitor.visit_map(SortedTable::new(table)),
            Shape::Array(values) => visitor.visit_seq(Elements {
                values: values.into_iter().enumerate(),
            }),
            Shape::Leaf(value) => value.deserialize_any(visitor),
        }
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ConfigError> {
        self.0.deserialize_bool(visitor)
    }

    fn deserialize_i8<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ConfigError> {
        self.0.deserialize_i8(visitor)
    }

    fn deserialize_i16<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ConfigError> {
        self.0.deserialize_i16(visitor)
    }

    fn deserialize_i32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ConfigError> {
        self.0.deserialize_i32(visitor)
    }

    fn deserialize_i64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ConfigError> {
        self.0.deserialize_i64(visitor)
    }

    fn deserialize_u8<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ConfigError> {
        self.0.deserialize_u8(visitor)
    }

    fn deserialize_u16<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ConfigError> {
        self.0.deserialize_u16(visitor)
    }

    fn deserialize_u32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ConfigError> {
        self.0.deserialize_u32(visitor)
    }

    fn deserialize_u64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ConfigError> {
        self.0.deserialize_u64(visitor)
    }

    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ConfigError> {
        self.0.deserialize_f32(visitor)
    }

    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ConfigError> {
        self.0.deserialize_f64(visitor)
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ConfigError> {
        self.0.deserialize_str(visitor)
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ConfigError> {
        self.0.deserialize_string(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ConfigError> {
        match self.0.kind {
            ValueKind::Nil => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, ConfigError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, ConfigError> {
        match shape(self.0) {
            // `{ variant = content }`: the content may hold tables.
            Shape::Table(table) => {
                let mut entries = table.into_iter();
                match (entries.next(), entries.next()) {
                    (Some((variant, content)), None) => visitor.visit_enum(TableEnum {
                        name,
                        variants,
                        variant,
                        content,
                    }),
                    _ => Err(enum_shape_error(name)),
                }
            }
            Shape::Array(_) => Err(enum_shape_error(name)),
            // A unit variant by name.
            Shape::Leaf(value) => value.deserialize_enum(name, variants, visitor),
        }
    }

    serde::forward_to_deserialize_any! {
        char seq bytes byte_buf map struct unit
        identifier ignored_any unit_struct tuple_struct tuple
    }
}

struct SortedTable {
    entries: std::vec::IntoIter<(String, Value)>,
    /// The entry whose key was read last, whose value is read next.
    current: Option<(String, Value)>,
}

impl SortedTable {
    fn new(table: Map<String, Value>) -> Self {
        let mut entries: Vec<(String, Value)> = table.into_iter().collect();
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        Self {
            entries: entries.into_iter(),
            current: None,
        }
    }
}

impl<'de> de::MapAccess<'de> for SortedTable {
    type Error = ConfigError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, ConfigError> {
        let Some((key, value)) = self.entries.next() else {
            return Ok(None);
        };
        // A key read as `config::Value` reads one: "3" is a number key too.
        let read = seed.deserialize(Value::new(None, key.as_str()))?;
        self.current = Some((key, value));
        Ok(Some(read))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, ConfigError> {
        let (key, value) = self
            .current
            .take()
            .ok_or_else(|| ConfigError::Message("a table value read before its key".into()))?;
        seed.deserialize(SortedValue(value))
            .map_err(|e| at_key(e, &key))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.entries.len())
    }
}

struct Elements {
    values: std::iter::Enumerate<std::vec::IntoIter<Value>>,
}

impl<'de> de::SeqAccess<'de> for Elements {
    type Error = ConfigError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, ConfigError> {
        let Some((index, value)) = self.values.next() else {
            return Ok(None);
        };
        seed.deserialize(SortedValue(value))
            .map(Some)
            .map_err(|e| at_key(e, &format!("[{index}]")))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.values.len())
    }
}

/// An enum written as a table of one key, the variant.
struct TableEnum {
    name: &'static str,
    variants: &'static [&'static str],
    variant: String,
    content: Value,
}

impl<'de> de::EnumAccess<'de> for TableEnum {
    type Error = ConfigError;
    type Variant = SortedValue;

    fn variant_seed<V: DeserializeSeed<'de>>(
        self,
        seed: V,
    ) -> Result<(V::Value, SortedValue), ConfigError> {
        // `config::Value`'s message for a variant the enum does not have.
        if !self.variants.contains(&self.variant.as_str()) {
            return Err(ConfigError::Message(format!(
                "enum {} does not have variant constructor {}",
                self.name, self.variant
            )));
        }
        let variant = seed.deserialize(self.variant.into_deserializer())?;
        Ok((variant, SortedValue(self.content)))
    }
}

impl<'de> de::VariantAccess<'de> for SortedValue {
    type Error = ConfigError;

    fn unit_variant(self) -> Result<(), ConfigError> {
        Ok(())
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(
        self,
        seed: T,
    ) -> Result<T::Value, ConfigError> {
        seed.deserialize(self)
    }

    fn tuple_variant<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, ConfigError> {
        de::Deserializer::deserialize_seq(self, visitor)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, ConfigError> {
        de::Deserializer::deserialize_map(self, visitor)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::Deserialize;

    use super::*;

    fn table(entries: &[(&str, Value)]) -> Value {
        let map: Map<String, Value> = entries
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        Value::new(None, map)
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        port: u16,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    enum Mode {
        Off,
        Every { minutes: u32 },
    }

    #[derive(Debug, Deserialize, PartialEq)]
    struct Outer {
        name: String,
        count: u32,
        enabled: Option<bool>,
        inner: Vec<Inner>,
        labels: BTreeMap<String, String>,
        mode: Mode,
        other: Mode,
    }

    #[test]
    fn reads_what_config_value_reads_with_its_coercions() {
        let value = table(&[
            ("name", Value::new(None, "a")),
            // Environment overrides are strings.
            ("count", Value::new(None, "3")),
            ("enabled", Value::new(None, "true")),
            (
                "inner",
                Value::new(None, vec![table(&[("port", Value::new(None, 80i64))])]),
            ),
            ("labels", table(&[("z", Value::new(None, "1"))])),
            (
                "mode",
                table(&[("Every", table(&[("minutes", Value::new(None, 5i64))]))]),
            ),
            ("other", Value::new(None, "Off")),
        ]);
        let read = Outer::deserialize(SortedValue(value.clone())).expect("reads");
        assert_eq!(
            read,
            value.try_deserialize::<Outer>().expect("config reads")
        );
        assert_eq!(read.count, 3);
        assert_eq!(read.mode, Mode::Every { minutes: 5 });
    }

    #[test]
    fn meets_the_first_bad_key_in_sorted_order_every_time() {
        // Twenty keys, each of the wrong type: a hash map's order would vary between loads.
        let entries: Vec<(String, Value)> = (0..20)
            .map(|i| (format!("key{i:02}"), Value::new(None, "not a number")))
            .collect();
        let refs: Vec<(&str, Value)> = entries
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        for _ in 0..50 {
            let result: Result<BTreeMap<String, u32>, _> =
                serde_path_to_error::deserialize(SortedValue(table(&refs)));
            let error = result.expect_err("no key is a number");
            assert_eq!(error.path().to_string(), "key00");
        }
    }

    #[test]
    fn an_unknown_variant_and_a_wide_enum_table_are_errors() {
        let unknown = table(&[("Sometimes", Value::new(None, 1i64))]);
        let error = Mode::deserialize(SortedValue(unknown)).expect_err("no such variant");
        assert!(
            error
                .to_string()
                .contains("does not have variant constructor Sometimes")
        );
        let two = table(&[
            ("Off", Value::new(None, 1i64)),
            ("Every", Value::new(None, 1i64)),
        ]);
        let error = Mode::deserialize(SortedValue(two)).expect_err("two variants");
        assert!(error.to_string().contains("exactly one key"), "{error}");
    }
}

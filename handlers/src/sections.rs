//! Config sections: reading one with every problem reported at once, and the sections the
//! handlers read, stored by name so that the registry, config loading and the configuration
//! reference all iterate one list ([`crate::config_sections`]).

use std::any::Any;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use serde::de::DeserializeOwned;

/// One problem, with the key it concerns.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Every problem found, for `check-config` and for a refused start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Problems(pub Vec<Problem>);

impl Problems {
    pub fn push(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}

/// A section read from the config, of any handler or client type.
type Loaded = Arc<dyn Any + Send + Sync>;

/// A config section the handlers read: its name, how to read it, and what keys it takes.
#[derive(Clone, Copy)]
pub struct SectionDescriptor {
    pub name: &'static str,
    /// Reads the section, reporting every problem with its key; `None` if it is unusable.
    pub load: fn(&str, config::Value, &mut Problems) -> Option<Loaded>,
    /// Every key it accepts (`name.key`, `name.table.key`), for the configuration reference.
    pub keys: fn(&str) -> BTreeSet<String>,
}

/// A typed handle on one section: `SECTION.get(configs)` is its config when present.
pub struct Section<T> {
    pub name: &'static str,
    _type: PhantomData<fn() -> T>,
}

impl<T: DeserializeOwned + Send + Sync + 'static> Section<T> {
    pub const fn new(name: &'static str) -> Self {
        Self {
            name,
            _type: PhantomData,
        }
    }

    pub const fn descriptor(&self) -> SectionDescriptor {
        SectionDescriptor {
            name: self.name,
            load: load_erased::<T>,
            keys: crate::schema::keys_of::<T>,
        }
    }

    pub fn get<'a>(&self, configs: &'a HandlerConfigs) -> Option<&'a T> {
        configs.sections.get(self.name)?.downcast_ref::<T>()
    }

    /// Puts `value` in as this section (tests and embedders build configs this way).
    pub fn set(&self, configs: &mut HandlerConfigs, value: T) {
        configs
            .sections
            .insert(self.name.to_string(), Arc::new(value));
    }
}

fn load_erased<T: DeserializeOwned + Send + Sync + 'static>(
    name: &str,
    value: config::Value,
    problems: &mut Problems,
) -> Option<Loaded> {
    read_section::<T>(name, value, problems).map(|v| Arc::new(v) as Loaded)
}

/// Every handler and client section of the config that is present and could be read, by name.
/// A section that is absent disables its kind.
#[derive(Clone, Default)]
pub struct HandlerConfigs {
    sections: BTreeMap<String, Loaded>,
}

impl fmt::Debug for HandlerConfigs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.sections.keys()).finish()
    }
}

impl HandlerConfigs {
    /// Stores a section read by its descriptor.
    pub fn insert_loaded(&mut self, name: &str, loaded: Loaded) {
        self.sections.insert(name.to_string(), loaded);
    }

    /// Whether the section called `name` is present (and was read).
    pub fn has_section(&self, name: &str) -> bool {
        self.sections.contains_key(name)
    }

    /// Whether the section that enables `kind` is present.
    pub fn enables(&self, kind: crate::JobKind) -> bool {
        self.has_section(kind.config_section())
    }
}

/// Deserializes one section, reporting every unknown key in it and its first type error.
pub fn read_section<T: DeserializeOwned>(
    name: &str,
    mut value: config::Value,
    problems: &mut Problems,
) -> Option<T> {
    // serde stops at the first bad value; to report every one at once, each bad value is taken
    // out and the section read again, a bounded number of times.
    let mut unknown: BTreeSet<String> = BTreeSet::new();
    let mut removed: Vec<String> = Vec::new();
    let mut failed = false;
    for _ in 0..MAX_PROBLEMS_PER_SECTION {
        let mut on_unknown = |path: serde_ignored::Path<'_>| {
            unknown.insert(path.to_string());
        };
        let de = serde_ignored::Deserializer::new(value.clone(), &mut on_unknown);
        let result: Result<T, _> = serde_path_to_error::deserialize(de);
        match result {
            Ok(v) => {
                report_unknown(name, &unknown, problems);
                return (!failed).then_some(v);
            }
            Err(e) => {
                let inner = clean_error(&e.inner().to_string());
                // A value taken out for being bad now reads as missing: already reported.
                let missing = missing_name(&inner);
                let echo = !missing.is_empty()
                    && inner.starts_with("missing field")
                    && removed.iter().any(|r| r.ends_with(&missing));
                if !echo {
                    problems.push(join_key(name, &e.path().to_string()), inner.clone());
                }
                failed = true;
                let segments: Vec<String> = e.path().iter().map(ToString::to_string).collect();
                if echo || inner.starts_with("missing field") || !remove_at(&mut value, &segments) {
                    break;
                }
                removed.push(e.path().to_string());
            }
        }
    }
    report_unknown(name, &unknown, problems);
    None
}

/// Enough for any real config; bounds the re-reads of a section full of mistakes.
const MAX_PROBLEMS_PER_SECTION: usize = 32;

fn report_unknown(section: &str, unknown: &BTreeSet<String>, problems: &mut Problems) {
    for path in unknown {
        problems.push(join_key(section, path), "unknown key");
    }
}

/// `x` in serde's "missing field `x`".
fn missing_name(message: &str) -> String {
    message.split('`').nth(1).unwrap_or_default().to_string()
}

/// Takes the value at `segments` (table keys and `[i]` indices, as serde_path_to_error prints
/// them) out of its table in `value`; false when there is no such table key.
fn remove_at(value: &mut config::Value, segments: &[String]) -> bool {
    let Some((last, parents)) = segments.split_last() else {
        return false;
    };
    let mut at = value;
    for segment in parents {
        at = match (&mut at.kind, index_of(segment)) {
            (config::ValueKind::Table(t), None) => match t.get_mut(segment.as_str()) {
                Some(v) => v,
                None => return false,
            },
            (config::ValueKind::Array(a), Some(i)) => match a.get_mut(i) {
                Some(v) => v,
                None => return false,
            },
            _ => return false,
        };
    }
    // Only table keys: taking an element out of an array would shift the indices of the rest.
    match (&mut at.kind, index_of(last)) {
        (config::ValueKind::Table(t), None) => t.remove(last.as_str()).is_some(),
        _ => false,
    }
}

/// `3` from serde_path_to_error's `[3]` segment.
fn index_of(segment: &str) -> Option<usize> {
    segment
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .and_then(|s| s.parse().ok())
}

fn join_key(section: &str, path: &str) -> String {
    let path = path.trim_start_matches('?');
    if path.is_empty() || path == "." {
        section.to_string()
    } else if path.starts_with('[') {
        format!("{section}{path}")
    } else {
        format!("{section}.{path}")
    }
}

/// The config crate appends the file's path to some messages; the key is reported already.
fn clean_error(msg: &str) -> String {
    msg.split(" for key ")
        .next()
        .unwrap_or(msg)
        .trim()
        .to_string()
}

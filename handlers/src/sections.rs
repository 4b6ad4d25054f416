//! Config sections: reading one with every problem reported at once, and the sections the
//! handlers read, stored by name so that the registry, config loading and the configuration
//! reference all iterate one list ([`crate::config_sections`]).

use std::any::Any;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use serde::de::DeserializeOwned;

use crate::sorted_value::SortedValue;

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

/// Deserializes one section, reporting every unknown key in it and every bad value (up to
/// [`MAX_PROBLEMS_PER_SECTION`]). The same section always reports the same problems: its tables
/// are read in sorted key order ([`SortedValue`]), not the `config` crate's hash order.
pub fn read_section<T: DeserializeOwned>(
    name: &str,
    mut value: config::Value,
    problems: &mut Problems,
) -> Option<T> {
    // serde stops at the first bad value; to report every one at once, each bad value is taken
    // out and the section read again, a bounded number of times.
    let mut unknown: BTreeSet<String> = BTreeSet::new();
    // The paths taken out, so that the field one leaves missing is not reported again.
    let mut removed: Vec<Vec<String>> = Vec::new();
    let mut failed = false;
    for _ in 0..MAX_PROBLEMS_PER_SECTION {
        let mut on_unknown = |path: serde_ignored::Path<'_>| {
            unknown.insert(path.to_string());
        };
        let de = serde_ignored::Deserializer::new(SortedValue(value.clone()), &mut on_unknown);
        let error = match serde_path_to_error::deserialize::<_, T>(de) {
            Ok(v) => {
                report_unknown(name, &unknown, problems);
                return (!failed).then_some(v);
            }
            Err(error) => error,
        };
        failed = true;
        let Some(segments) = path_segments(error.path()) else {
            // A path serde could not follow (an untagged enum, say): nothing to take out.
            problems.push(
                join_key(name, &error.path().to_string()),
                clean_error(&error.inner().to_string()),
            );
            break;
        };
        let echo = match error.inner() {
            config::ConfigError::NotFound(field) => {
                let mut path = segments.clone();
                path.push(field.clone());
                removed.contains(&path)
            }
            _ => false,
        };
        if !echo {
            problems.push(
                join_key(name, &error.path().to_string()),
                clean_error(&error.inner().to_string()),
            );
        }
        // The bad value, or for a missing field the table missing it; where that is an element
        // of an array (whose later elements would shift) or the section itself, the nearest
        // enclosing table key, so the next read goes past it.
        match remove_nearest(&mut value, &segments) {
            Some(path) => removed.push(path),
            None => break,
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

/// serde_path_to_error's path as table keys and `[i]` indices; `None` when a segment is unknown.
fn path_segments(path: &serde_path_to_error::Path) -> Option<Vec<String>> {
    path.iter()
        .map(|segment| match segment {
            serde_path_to_error::Segment::Unknown => None,
            other => Some(other.to_string()),
        })
        .collect()
}

/// Takes out of `value` the table entry at `segments`, or failing that (an array element) the
/// nearest enclosing one; returns the path taken out, `None` when there is none to take.
fn remove_nearest(value: &mut config::Value, segments: &[String]) -> Option<Vec<String>> {
    let mut path = segments.to_vec();
    while !path.is_empty() {
        if remove_at(value, &path) {
            return Some(path);
        }
        path.pop();
    }
    None
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

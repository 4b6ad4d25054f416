//! One descriptor per job kind: its name, its verbs, its config section and the sections it
//! cannot work without, and how its handler is built. The registry, config checks, the command
//! parser, `help` and metrics all iterate [`crate::KINDS`]; adding a kind is one module that
//! declares a [`KindDescriptor`], plus one line in that list.

use std::sync::Arc;

use crate::command::Verb;
use crate::context::Context;
use crate::handler::Handler;
use crate::kind::JobKind;
use crate::sections::{HandlerConfigs, SectionDescriptor};

pub struct KindDescriptor {
    pub kind: JobKind,
    /// The verbs that start a job of this kind, each with its parameter parser.
    pub verbs: &'static [Verb],
    /// The config section that enables the kind, and how it is read.
    pub config: SectionDescriptor,
    /// Sections the kind cannot work without: their absence is a config error naming them.
    pub requires: &'static [Requirement],
    /// Sections that some of the kind's options need (`reconcile.argocd_app` needs
    /// `[kubernetes]`), given its config: `(option key, requirement)`.
    pub option_requires: fn(&HandlerConfigs) -> Vec<(&'static str, Requirement)>,
    /// The handler, from the config's sections and the shared clients; called only when the
    /// kind's section and every required one are present. `None`: not implemented yet
    /// ([`crate::unavailable::not_yet`]), its jobs fail saying so.
    pub build: fn(&HandlerConfigs, &Context) -> Option<Arc<dyn Handler>>,
}

/// A section something cannot work without, and why (for the error that names it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Requirement {
    pub section: &'static str,
    pub why: &'static str,
}

/// For descriptors whose options need nothing more.
pub fn no_option_requires(_: &HandlerConfigs) -> Vec<(&'static str, Requirement)> {
    Vec::new()
}

impl KindDescriptor {
    /// The name of the section that enables the kind.
    pub fn section(&self) -> &'static str {
        self.config.name
    }

    /// The required sections that `configs` lacks.
    pub fn missing_sections(&self, configs: &HandlerConfigs) -> Vec<&'static str> {
        self.requires
            .iter()
            .map(|r| r.section)
            .filter(|s| !configs.has_section(s))
            .collect()
    }

    /// Everything this kind needs, given its config: `(key, requirement)`, the kind's own
    /// section first.
    pub fn requirements(&self, configs: &HandlerConfigs) -> Vec<(&'static str, Requirement)> {
        self.requires
            .iter()
            .map(|r| (self.config.name, *r))
            .chain((self.option_requires)(configs))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_sections_and_verbs_are_unique_and_well_formed() {
        let mut names: Vec<&str> = crate::KINDS.iter().map(|d| d.kind.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), crate::KINDS.len(), "a kind is declared twice");
        let mut verbs: Vec<&str> = crate::command::verbs()
            .flat_map(|v| std::iter::once(v.name).chain(v.aliases.iter().copied()))
            .collect();
        let count = verbs.len();
        verbs.sort_unstable();
        verbs.dedup();
        assert_eq!(verbs.len(), count, "a verb or alias is declared twice");
        for d in crate::KINDS {
            // One name per concept: the section is the kind's name with `_`, except apply,
            // which runs reconcile's plans.
            if d.kind != JobKind::APPLY {
                assert_eq!(d.section(), d.kind.as_str().replace('-', "_"));
            }
            assert!(!d.verbs.is_empty(), "{} has no verb", d.kind);
            for v in d.verbs {
                assert_eq!(v.kind, Some(d.kind), "{} in {}", v.name, d.kind);
                assert!(v.params.is_some(), "{} has no parameter parser", v.name);
                assert!(v.usage.starts_with(v.name), "{}", v.usage);
            }
            assert!(d.requires.iter().all(|r| r.section != d.section()));
        }
    }
}

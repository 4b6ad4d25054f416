//! The registry: one handler per job kind, or the reason there is none.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::KINDS;
use crate::context::Context;
use crate::handler::{Handler, HandlerError};
use crate::kind::JobKind;
use crate::sections::HandlerConfigs;
use crate::unavailable::Unavailable;

#[derive(Clone)]
enum Slot {
    Enabled(Arc<dyn Handler>),
    /// Enabled, but sections it needs are missing (`check-config` reports it too).
    Incomplete(Vec<&'static str>),
    Disabled,
}

#[derive(Clone)]
pub struct Registry {
    slots: BTreeMap<JobKind, Slot>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let enabled: Vec<_> = self.enabled_kinds().iter().map(|k| k.as_str()).collect();
        write!(f, "Registry(enabled: {enabled:?})")
    }
}

impl Registry {
    /// Every kind disabled.
    pub fn empty() -> Self {
        Self {
            slots: JobKind::all().map(|k| (k, Slot::Disabled)).collect(),
        }
    }

    /// The product's handlers for the sections that are present, one per kind descriptor.
    pub fn from_sections(configs: &HandlerConfigs, context: &Context) -> Self {
        let mut registry = Self::empty();
        for descriptor in KINDS {
            if !configs.has_section(descriptor.section()) {
                continue;
            }
            let missing = descriptor.missing_sections(configs);
            let slot = if !missing.is_empty() {
                Slot::Incomplete(missing)
            } else {
                // Present but without a handler: the kind's implementation has not landed,
                // and its jobs fail saying so rather than pretend anything.
                Slot::Enabled((descriptor.build)(configs, context).unwrap_or_else(|| {
                    Arc::new(Unavailable {
                        kind: descriptor.kind,
                    })
                }))
            };
            registry.slots.insert(descriptor.kind, slot);
        }
        registry
    }

    /// Adds or replaces the handler of its kind (tests and embedders use this).
    pub fn register(&mut self, handler: Arc<dyn Handler>) {
        self.slots.insert(handler.kind(), Slot::Enabled(handler));
    }

    pub fn get(&self, kind: JobKind) -> Result<Arc<dyn Handler>, HandlerError> {
        match self.slots.get(&kind) {
            Some(Slot::Enabled(h)) => Ok(h.clone()),
            Some(Slot::Incomplete(missing)) => Err(HandlerError::Failed(format!(
                "{kind} needs the [{}] section(s) of the agent config",
                missing.join("], [")
            ))),
            _ => Err(HandlerError::NotConfigured {
                kind,
                section: kind.config_section(),
            }),
        }
    }

    pub fn is_enabled(&self, kind: JobKind) -> bool {
        matches!(self.slots.get(&kind), Some(Slot::Enabled(_)))
    }

    pub fn enabled_kinds(&self) -> Vec<JobKind> {
        self.slots
            .iter()
            .filter(|(_, s)| matches!(s, Slot::Enabled(_)))
            .map(|(k, _)| *k)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{self, Request};

    fn all_sections() -> HandlerConfigs {
        all_sections_but(&[])
    }

    /// Every section, with each of `except` left out.
    fn all_sections_but(except: &[&str]) -> HandlerConfigs {
        let mut configs = HandlerConfigs::default();
        crate::restore_drill::SECTION.set(
            &mut configs,
            serde_json::from_str(r#"{"timeout":"1s"}"#).expect("restore_drill defaults"),
        );
        crate::upgrade::SECTION.set(
            &mut configs,
            serde_json::from_str(r#"{"schematic":"s","timeout":"1s"}"#).expect("upgrade"),
        );
        crate::acceptance::SECTION.set(
            &mut configs,
            serde_json::from_str(r#"{"timeout":"1s"}"#).expect("acceptance defaults"),
        );
        crate::preflight::SECTION.set(&mut configs, crate::preflight::Config::default());
        crate::backup::SECTION.set(
            &mut configs,
            serde_json::from_str("{}").expect("backup defaults"),
        );
        crate::etcd_snapshot::SECTION.set(
            &mut configs,
            serde_json::from_str(r#"{"bucket":"b"}"#).expect("etcd_snapshot defaults"),
        );
        crate::reconcile::SECTION.set(
            &mut configs,
            serde_json::from_str(r#"{"repo_url":"file:///r","workdir":"tf","env":"prod"}"#)
                .expect("reconcile"),
        );
        let clients = [
            (crate::clients::KUBERNETES.name, "{}"),
            (
                crate::clients::TALOS.name,
                r#"{"talosconfig":"/etc/t","cluster":"lab"}"#,
            ),
            (
                crate::clients::S3.name,
                r#"{"endpoint":"http://s3","access_key_id":"env:A","secret_access_key":"env:B"}"#,
            ),
        ];
        for (name, json) in clients.into_iter().filter(|(n, _)| !except.contains(n)) {
            match name {
                "kubernetes" => crate::clients::KUBERNETES
                    .set(&mut configs, serde_json::from_str(json).expect(name)),
                "talos" => {
                    crate::clients::TALOS.set(&mut configs, serde_json::from_str(json).expect(name))
                }
                _ => crate::clients::S3.set(&mut configs, serde_json::from_str(json).expect(name)),
            }
        }
        configs
    }

    #[test]
    fn a_kind_without_the_sections_it_needs_is_named_with_them() {
        let configs = all_sections_but(&["talos", "s3", "kubernetes"]);
        let mut missing: Vec<_> = crate::KINDS
            .iter()
            .filter(|d| configs.has_section(d.section()))
            .map(|d| (d.kind, d.missing_sections(&configs)))
            .filter(|(_, missing)| !missing.is_empty())
            .collect();
        missing.sort();
        assert_eq!(
            missing,
            vec![
                (JobKind::ACCEPTANCE, vec!["kubernetes"]),
                (JobKind::BACKUP, vec!["kubernetes"]),
                (JobKind::ETCD_SNAPSHOT, vec!["talos", "s3"]),
                (JobKind::UPGRADE, vec!["kubernetes", "talos"]),
            ]
        );
        let registry = Registry::from_sections(&configs, &Context::default());
        let err = registry
            .get(JobKind::ETCD_SNAPSHOT)
            .err()
            .expect("incomplete")
            .to_string();
        assert!(err.contains("[talos], [s3]"), "{err}");
        assert!(registry.get(JobKind::RECONCILE).is_ok());
    }

    #[test]
    fn aliases_start_the_same_kind() {
        for (text, kind) in [
            ("snapshot", JobKind::ETCD_SNAPSHOT),
            ("etcd-snapshot", JobKind::ETCD_SNAPSHOT),
            ("plan", JobKind::RECONCILE),
            ("reconcile", JobKind::RECONCILE),
        ] {
            match command::parse(text).expect(text) {
                Request::Submit { kind: k, .. } => assert_eq!(k, kind, "{text}"),
                other => panic!("{text} -> {other:?}"),
            }
        }
        assert!(command::help(Some("etcd-snapshot")).contains("also: etcd-snapshot"));
    }

    #[test]
    fn every_kind_resolves_from_its_verb_and_its_section() {
        let registry = Registry::from_sections(&all_sections(), &Context::default());
        for kind in JobKind::all() {
            let handler = registry.get(kind).expect("enabled");
            assert_eq!(handler.kind(), kind);
        }
        // Every job verb parses to a kind that the registry knows.
        for verb in command::verbs().filter(|v| v.kind.is_some()) {
            let example = match verb.name {
                "apply" => "apply 01jd0000000000000000000000".to_string(),
                "upgrade" => "upgrade talos v1.13.0".to_string(),
                other => other.to_string(),
            };
            match command::parse(&example).expect(&example) {
                Request::Submit { kind, .. } => {
                    assert_eq!(Some(kind), verb.kind);
                    assert!(registry.is_enabled(kind));
                }
                other => panic!("{example} -> {other:?}"),
            }
        }
    }

    #[test]
    fn backups_and_snapshots_share_the_cluster_through_read_locks() {
        let configs = all_sections();
        let context = Context {
            cluster: "lab".into(),
            ..Default::default()
        };
        let registry = Registry::from_sections(&configs, &context);
        let job = crate::job::JobEnvelope {
            job_id: "01jd0000000000000000000000".into(),
            kind: JobKind::BACKUP,
            params: Default::default(),
            source: crate::job::Source::Chatops,
            requested_by: "t".into(),
            idempotency_key: "k".into(),
            traceparent: None,
            commit: None,
            created_at: chrono::Utc::now(),
        };
        for kind in [JobKind::BACKUP, JobKind::ETCD_SNAPSHOT] {
            let locks = registry.get(kind).expect("enabled").locks(&job);
            assert_eq!(
                locks,
                vec![crate::LockRequest::read("cluster:lab")],
                "{kind}"
            );
        }
        // An apply writes the state and reads the cluster, so an upgrade excludes it.
        let locks = registry.get(JobKind::APPLY).expect("enabled").locks(&job);
        assert_eq!(
            locks,
            vec![
                crate::LockRequest::write("terraform:prod"),
                crate::LockRequest::read("cluster:lab")
            ]
        );
    }

    #[test]
    fn an_absent_section_disables_its_kind_with_a_message() {
        let registry = Registry::from_sections(&HandlerConfigs::default(), &Context::default());
        for kind in JobKind::all() {
            let err = registry.get(kind).err().expect("disabled");
            let msg = err.to_string();
            assert!(msg.contains(kind.config_section()), "{msg}");
            assert!(msg.contains("not configured"), "{msg}");
        }
    }
}

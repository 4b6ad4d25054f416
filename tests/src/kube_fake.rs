//! A fake Kubernetes API that speaks the real HTTP/JSON shapes: Argo CD Applications, Velero
//! objects and the core and apps resources a restore drill touches, with small controllers
//! standing in for Argo CD, Velero and the kubelet.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use chrono::Utc;
use serde_json::{Value, json};

use crate::fakes::{Recorded, serve};

// ---------------------------------------------------------------------------------------------
// Kubernetes: Argo CD Applications and Velero objects

#[derive(Default)]
struct KubeState {
    /// `plural/namespace/name` → object.
    objects: BTreeMap<String, Value>,
    requests: Vec<Recorded>,
    /// How the fake Argo CD controller ends a sync, and the message it records.
    controller_phase: String,
    controller_message: String,
    /// The `status` the fake Velero controller gives a backup when it ends.
    backup_outcome: Value,
    next_uid: u64,
}

#[derive(Clone)]
pub struct FakeKube {
    pub url: String,
    state: Arc<Mutex<KubeState>>,
}

fn object_key(plural: &str, namespace: &str, name: &str) -> String {
    format!("{plural}/{namespace}/{name}")
}

impl FakeKube {
    /// A Kubernetes API holding namespaced custom objects, with two small controllers:
    /// Argo CD's (a requested sync completes after a moment: `operation` cleared,
    /// `operationState` recorded, sync and health set) and Velero's (a new Backup goes
    /// `InProgress`, then ends with the outcome the test set).
    pub async fn start(namespace: &str) -> FakeKube {
        let state = Arc::new(Mutex::new(KubeState {
            controller_phase: "Succeeded".into(),
            controller_message: "successfully synced (all tasks run)".into(),
            backup_outcome: json!({"phase": "Completed", "progress": {"itemsBackedUp": 42, "totalItems": 42}, "warnings": 0, "errors": 0}),
            ..Default::default()
        }));
        let router = Router::new()
            .route(
                "/apis/{group}/{version}/namespaces/{ns}/{plural}",
                any(kube_collection),
            )
            .route(
                "/apis/{group}/{version}/namespaces/{ns}/{plural}/{name}",
                any(kube_object),
            )
            .fallback(kube_not_found)
            .with_state(state.clone());
        let addr = serve(router).await;
        let controller = state.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let mut st = controller.lock().unwrap_or_else(|p| p.into_inner());
                let phase = st.controller_phase.clone();
                let message = st.controller_message.clone();
                let outcome = st.backup_outcome.clone();
                for (key, obj) in st.objects.iter_mut() {
                    if key.starts_with("applications/")
                        && obj.get("operation").is_some_and(|o| !o.is_null())
                    {
                        let op = obj["operation"].clone();
                        obj["operation"] = Value::Null;
                        obj["status"]["operationState"] = json!({
                            "phase": phase, "message": message,
                            "operation": op, "startedAt": Utc::now().to_rfc3339(), "finishedAt": Utc::now().to_rfc3339(),
                        });
                        if phase == "Succeeded" {
                            obj["status"]["sync"]["status"] = json!("Synced");
                            obj["status"]["health"]["status"] = json!("Healthy");
                        }
                    }
                    if key.starts_with("backups/") {
                        match obj["status"]["phase"].as_str() {
                            None | Some("New") => {
                                obj["status"] = json!({"phase": "InProgress", "startTimestamp": Utc::now().to_rfc3339()});
                            }
                            Some("InProgress") => {
                                let mut status = outcome.clone();
                                status["startTimestamp"] = obj["status"]["startTimestamp"].clone();
                                status["completionTimestamp"] = json!(Utc::now().to_rfc3339());
                                obj["status"] = status;
                            }
                            _ => {}
                        }
                    }
                }
            }
        });
        let _ = namespace;
        FakeKube {
            url: format!("http://{addr}"),
            state,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, KubeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn add_object(&self, plural: &str, namespace: &str, name: &str, object: Value) {
        self.lock()
            .objects
            .insert(object_key(plural, namespace, name), object);
    }

    pub fn object(&self, plural: &str, namespace: &str, name: &str) -> Option<Value> {
        self.lock()
            .objects
            .get(&object_key(plural, namespace, name))
            .cloned()
    }

    /// Every object of a kind, for assertions.
    pub fn objects(&self, plural: &str) -> Vec<Value> {
        let prefix = format!("{plural}/");
        self.lock()
            .objects
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// How the next Argo CD syncs end: their `operationState` phase and message.
    pub fn set_sync_outcome(&self, phase: &str, message: &str) {
        let mut st = self.lock();
        st.controller_phase = phase.to_string();
        st.controller_message = message.to_string();
    }

    /// The `status` the next backups end with.
    pub fn set_backup_outcome(&self, status: Value) {
        self.lock().backup_outcome = status;
    }

    /// Adds an Application `name` in `namespace` with the given sync and health, and the child
    /// Applications it manages.
    pub fn add_app(
        &self,
        namespace: &str,
        name: &str,
        sync: &str,
        health: &str,
        children: &[&str],
    ) {
        let resources: Vec<Value> = children
            .iter()
            .map(|c| json!({"group": "argoproj.io", "version": "v1alpha1", "kind": "Application", "namespace": namespace, "name": c, "status": "Synced"}))
            .collect();
        let app = json!({
            "apiVersion": "argoproj.io/v1alpha1",
            "kind": "Application",
            "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-{name}"), "resourceVersion": "1", "generation": 1},
            "spec": {"project": "default", "source": {"repoURL": "https://github.com/lab/infra.git", "path": format!("apps/{name}"), "targetRevision": "main"}, "destination": {"server": "https://kubernetes.default.svc", "namespace": namespace}},
            "status": {"sync": {"status": sync}, "health": {"status": health}, "resources": resources},
        });
        self.add_object("applications", namespace, name, app);
    }

    pub fn app(&self, namespace: &str, name: &str) -> Option<Value> {
        self.object("applications", namespace, name)
    }

    /// A Velero BackupStorageLocation in `phase`, validated `validated_ago` ago.
    pub fn add_storage_location(
        &self,
        namespace: &str,
        name: &str,
        phase: &str,
        validated_ago: chrono::Duration,
    ) {
        let bsl = json!({
            "apiVersion": "velero.io/v1",
            "kind": "BackupStorageLocation",
            "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-bsl-{name}"), "resourceVersion": "1"},
            "spec": {"provider": "aws", "objectStorage": {"bucket": "infraflux-velero"}, "default": true},
            "status": {
                "phase": phase,
                "lastValidationTime": (Utc::now() - validated_ago).to_rfc3339(),
                "message": if phase == "Available" { "" } else { "BackupStorageLocation \"default\" is unavailable: rpc error: code = Unknown desc = InvalidAccessKeyId" },
            },
        });
        self.add_object("backupstoragelocations", namespace, name, bsl);
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.lock().requests.clone()
    }

    /// A kubeconfig pointing at this API server.
    pub fn kubeconfig(&self, dir: &std::path::Path) -> std::path::PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\ncurrent-context: fake\nusers:\n- name: fake\n  user:\n    token: fake-token\n",
            self.url
        );
        std::fs::write(&path, text).expect("kubeconfig");
        path
    }
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            for (k, v) in p {
                if v.is_null() {
                    if let Some(t) = target.as_object_mut() {
                        t.remove(k);
                    }
                } else if let Some(t) = target.as_object_mut() {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

type KubeShared = State<Arc<Mutex<KubeState>>>;

fn kube_record(
    st: &mut KubeState,
    method: &Method,
    path: String,
    headers: &HeaderMap,
    body: &Bytes,
) {
    st.requests.push(Recorded {
        method: method.to_string(),
        path,
        body: serde_json::from_slice(body).unwrap_or(Value::Null),
        authorization: headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
    });
}

async fn kube_collection(
    State(s): KubeShared,
    Path((group, version, ns, plural)): Path<(String, String, String, String)>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut st = s.lock().unwrap_or_else(|p| p.into_inner());
    kube_record(
        &mut st,
        &method,
        format!("/apis/{group}/{version}/namespaces/{ns}/{plural}"),
        &headers,
        &body,
    );
    match method {
        Method::POST => {
            let mut object: Value = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => return kube_status(400, "BadRequest", &e.to_string()),
            };
            let Some(name) = object["metadata"]["name"].as_str().map(str::to_string) else {
                return kube_status(422, "Invalid", "metadata.name: Required value");
            };
            if let Some(problem) = schema_problem(&group, &plural, &object) {
                return kube_status(422, "Invalid", &problem);
            }
            let key = object_key(&plural, &ns, &name);
            if st.objects.contains_key(&key) {
                return kube_status(
                    409,
                    "AlreadyExists",
                    &format!("{plural}.{group} \"{name}\" already exists"),
                );
            }
            st.next_uid += 1;
            object["metadata"]["uid"] = json!(format!("uid-{}", st.next_uid));
            object["metadata"]["resourceVersion"] = json!("1");
            object["metadata"]["creationTimestamp"] = json!(Utc::now().to_rfc3339());
            st.objects.insert(key, object.clone());
            (StatusCode::CREATED, axum::Json(object)).into_response()
        }
        Method::GET => {
            let prefix = format!("{plural}/{ns}/");
            let items: Vec<Value> = st
                .objects
                .iter()
                .filter(|(k, _)| k.starts_with(&prefix))
                .map(|(_, v)| v.clone())
                .collect();
            axum::Json(json!({"apiVersion": format!("{group}/{version}"), "kind": "List", "metadata": {"resourceVersion": "1"}, "items": items})).into_response()
        }
        _ => kube_status(405, "MethodNotAllowed", "method not allowed"),
    }
}

async fn kube_object(
    State(s): KubeShared,
    Path((group, version, ns, plural, name)): Path<(String, String, String, String, String)>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut st = s.lock().unwrap_or_else(|p| p.into_inner());
    kube_record(
        &mut st,
        &method,
        format!("/apis/{group}/{version}/namespaces/{ns}/{plural}/{name}"),
        &headers,
        &body,
    );
    let key = object_key(&plural, &ns, &name);
    let Some(object) = st.objects.get_mut(&key) else {
        return kube_status(
            404,
            "NotFound",
            &format!("{plural}.{group} \"{name}\" not found"),
        );
    };
    match method {
        Method::GET => axum::Json(object.clone()).into_response(),
        Method::PATCH => {
            let content_type = headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            if content_type != "application/merge-patch+json" {
                return kube_status(
                    415,
                    "UnsupportedMediaType",
                    &format!("the fake accepts merge patches, got {content_type}"),
                );
            }
            let patch: Value = serde_json::from_slice(&body).unwrap_or_default();
            let mut patched = object.clone();
            merge(&mut patched, &patch);
            if let Some(problem) = schema_problem(&group, &plural, &patched) {
                return kube_status(422, "Invalid", &problem);
            }
            *object = patched;
            let rv = object["metadata"]["resourceVersion"]
                .as_str()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(1)
                + 1;
            object["metadata"]["resourceVersion"] = json!(rv.to_string());
            axum::Json(object.clone()).into_response()
        }
        Method::DELETE => {
            let removed = st.objects.remove(&key);
            axum::Json(removed.unwrap_or(Value::Null)).into_response()
        }
        _ => kube_status(405, "MethodNotAllowed", "method not allowed"),
    }
}

/// The custom resource's schema from the real CRD in `tests/fixtures`, for the kinds the
/// agent writes (Velero, Argo CD).
fn crd_schema(group: &str, plural: &str) -> Option<Value> {
    let file = match (group, plural) {
        ("velero.io", _) => format!("velero-crds/{group}_{plural}.yaml"),
        ("argoproj.io", "applications") => "argocd/application-crd.yaml".to_string(),
        _ => return None,
    };
    let text = String::from_utf8(crate::fixture(&file)).ok()?;
    let crd: Value = serde_saphyr::from_str(&text).ok()?;
    crd["spec"]["versions"]
        .as_array()?
        .iter()
        .find(|v| v["served"] == true)
        .map(|v| v["schema"]["openAPIV3Schema"].clone())
}

/// What a strict API server (`fieldValidation=Strict`) would refuse in `object`: a field the CRD
/// does not declare, or a value of the wrong type. A real server with the default validation
/// drops unknown fields with a warning, so a misspelt field would vanish silently; the fake
/// refuses it so that a test fails.
fn schema_problem(group: &str, plural: &str, object: &Value) -> Option<String> {
    let schema = crd_schema(group, plural)?;
    let mut body = object.clone();
    if let Some(map) = body.as_object_mut() {
        // Server-owned or generic parts: metadata is ObjectMeta, status is the controller's.
        for generic in ["apiVersion", "kind", "metadata", "status"] {
            map.remove(generic);
        }
    }
    check_schema(&schema, &body, "")
}

fn check_schema(schema: &Value, value: &Value, at: &str) -> Option<String> {
    if schema["x-kubernetes-preserve-unknown-fields"] == true || value.is_null() {
        return None;
    }
    let expected = schema["type"].as_str().unwrap_or_default();
    let fits = match expected {
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        "array" => value.is_array(),
        "object" => value.is_object(),
        _ => true,
    };
    // int-or-string fields (durations in some CRDs) accept both.
    if !fits && schema["x-kubernetes-int-or-string"] != true {
        return Some(format!("{at}: expected {expected}, got {value}"));
    }
    match value {
        Value::Object(map) => {
            let properties = schema["properties"].as_object();
            for (key, item) in map {
                let path = if at.is_empty() {
                    key.clone()
                } else {
                    format!("{at}.{key}")
                };
                let item_schema = match properties.and_then(|p| p.get(key)) {
                    Some(s) => s,
                    None if schema["additionalProperties"].is_object() => {
                        &schema["additionalProperties"]
                    }
                    None if properties.is_none() => continue,
                    None => return Some(format!("unknown field \"{path}\"")),
                };
                if let Some(problem) = check_schema(item_schema, item, &path) {
                    return Some(problem);
                }
            }
            None
        }
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, item)| check_schema(&schema["items"], item, &format!("{at}[{i}]"))),
        _ => None,
    }
}

fn kube_status(code: u16, reason: &str, message: &str) -> Response {
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        axum::Json(json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code})),
    )
        .into_response()
}

async fn kube_not_found(uri: Uri) -> Response {
    kube_status(
        404,
        "NotFound",
        &format!("the server could not find the requested resource ({uri})"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fake_api_refuses_what_the_crd_does_not_declare() {
        let backup = |spec: Value| json!({"apiVersion": "velero.io/v1", "kind": "Backup", "metadata": {"name": "b"}, "spec": spec});
        let good = backup(
            json!({"includedNamespaces": ["*"], "ttl": "72h0m0s", "storageLocation": "default"}),
        );
        assert_eq!(schema_problem("velero.io", "backups", &good), None);
        let typo = backup(json!({"includeNamespaces": ["*"]}));
        assert_eq!(
            schema_problem("velero.io", "backups", &typo).as_deref(),
            Some("unknown field \"spec.includeNamespaces\"")
        );
        let wrong_type = backup(json!({"includedNamespaces": "media"}));
        assert!(
            schema_problem("velero.io", "backups", &wrong_type)
                .is_some_and(|p| p.starts_with("spec.includedNamespaces: expected array")),
        );
        let sync = json!({"metadata": {"name": "root"}, "operation": {"sync": {"revision": "HEAD"}, "initiatedBy": {"username": "infraflux"}}});
        assert_eq!(schema_problem("argoproj.io", "applications", &sync), None);
    }
}

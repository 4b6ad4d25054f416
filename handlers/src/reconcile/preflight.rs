//! The backend preflight, before `terraform init`: state must go to S3 (MinIO), with the
//! settings MinIO needs, with locking on, and the bucket must answer. A wrong backend fails
//! here with a message that says what to change, instead of state landing in the working tree
//! (and from there in Git) or a run failing half way.

use std::collections::BTreeMap;
use std::path::Path;

use hcl::{Body, Expression, ObjectKey};

/// A backend setting as written in HCL.
#[derive(Debug, Clone, PartialEq)]
pub enum Setting {
    Str(String),
    Bool(bool),
    Map(BTreeMap<String, String>),
    Other,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Backend {
    pub kind: String,
    pub file: String,
    pub settings: BTreeMap<String, Setting>,
}

/// Where the state lives, once the preflight passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Target {
    pub bucket: String,
    pub key: String,
    pub region: String,
    pub endpoint: Option<String>,
}

fn setting(expr: &Expression) -> Setting {
    match expr {
        Expression::String(s) => Setting::Str(s.clone()),
        Expression::Bool(b) => Setting::Bool(*b),
        Expression::Object(o) => Setting::Map(
            o.iter()
                .filter_map(|(k, v)| {
                    let key = match k {
                        ObjectKey::Identifier(i) => i.as_str().to_string(),
                        ObjectKey::Expression(Expression::String(s)) => s.clone(),
                        _ => return None,
                    };
                    match v {
                        Expression::String(s) => Some((key, s.clone())),
                        _ => None,
                    }
                })
                .collect(),
        ),
        _ => Setting::Other,
    }
}

/// Finds the `terraform { backend "<kind>" { ... } }` block among the `.tf` files of `dir`.
pub fn find_backend(dir: &Path) -> Result<Option<Backend>, String> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| format!("cannot read {}: {e}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "tf"))
        .collect();
    entries.sort();
    for path in entries {
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let body: Body = hcl::parse(&text).map_err(|e| {
            format!(
                "{}: not valid HCL: {}",
                path.file_name().unwrap_or_default().to_string_lossy(),
                e.to_string().lines().next().unwrap_or_default()
            )
        })?;
        for block in body.blocks().filter(|b| b.identifier() == "terraform") {
            if let Some(backend) = block.body().blocks().find(|b| b.identifier() == "backend") {
                let kind = backend
                    .labels()
                    .first()
                    .map(|l| l.as_str().to_string())
                    .unwrap_or_default();
                let settings = backend
                    .body()
                    .attributes()
                    .map(|a| (a.key().to_string(), setting(a.expr())))
                    .collect();
                return Ok(Some(Backend {
                    kind,
                    file: path
                        .file_name()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .into_owned(),
                    settings,
                }));
            }
        }
    }
    Ok(None)
}

impl Backend {
    fn str(&self, key: &str) -> Option<&str> {
        match self.settings.get(key) {
            Some(Setting::Str(s)) => Some(s),
            _ => None,
        }
    }

    fn is_true(&self, key: &str) -> bool {
        matches!(self.settings.get(key), Some(Setting::Bool(true)))
    }

    /// The S3 endpoint: `endpoints = { s3 = "..." }`, or the older `endpoint`.
    fn endpoint(&self) -> Option<&str> {
        match self.settings.get("endpoints") {
            Some(Setting::Map(m)) => m.get("s3").map(String::as_str),
            _ => self.str("endpoint"),
        }
    }
}

/// Every problem with the backend, each saying what to change.
pub fn check(backend: Option<&Backend>) -> Result<S3Target, Vec<String>> {
    let Some(b) = backend else {
        return Err(vec![
            "no backend configured: terraform would keep its state in the working tree (and from there it could reach Git); add a backend \"s3\" block".to_string(),
        ]);
    };
    if b.kind != "s3" {
        return Err(vec![format!(
            "{}: backend \"{}\" is not \"s3\": this platform keeps state in S3 (MinIO){}",
            b.file,
            b.kind,
            if b.kind == "local" {
                "; a local backend writes state into the working tree"
            } else {
                ""
            }
        )]);
    }
    let mut problems = Vec::new();
    let bucket = b.str("bucket").unwrap_or_default().to_string();
    let key = b.str("key").unwrap_or_default().to_string();
    if bucket.is_empty() {
        problems.push(format!("{}: backend \"s3\" has no bucket", b.file));
    }
    if key.is_empty() {
        problems.push(format!("{}: backend \"s3\" has no key", b.file));
    }
    let endpoint = b.endpoint().map(str::to_string);
    if let Some(ep) = &endpoint {
        if !(ep.starts_with("http://") || ep.starts_with("https://")) {
            problems.push(format!(
                "{}: the S3 endpoint {ep:?} must start with http:// or https:// (terraform reads other schemes as a host name)",
                b.file
            ));
        }
        let path_style = b.is_true("use_path_style") || b.is_true("force_path_style");
        if !path_style {
            problems.push(format!(
                "{}: use_path_style = true is missing: MinIO serves buckets by path, not by host name",
                b.file
            ));
        }
        for flag in [
            "skip_credentials_validation",
            "skip_region_validation",
            "skip_requesting_account_id",
            "skip_metadata_api_check",
        ] {
            if !b.is_true(flag) {
                problems.push(format!(
                    "{}: {flag} = true is missing: MinIO has no AWS STS/IAM/metadata service to validate against",
                    b.file
                ));
            }
        }
    }
    if !b.is_true("use_lockfile") {
        problems.push(format!(
            "{}: use_lockfile = true is missing: without a lock two runs can write the state at once",
            b.file
        ));
    }
    if problems.is_empty() {
        Ok(S3Target {
            bucket,
            key,
            region: b.str("region").unwrap_or("us-east-1").to_string(),
            endpoint,
        })
    } else {
        Err(problems)
    }
}

/// Checks that the bucket answers with these credentials.
pub async fn reach_bucket(
    target: &S3Target,
    access_key_id: Option<&str>,
    secret_access_key: Option<&str>,
) -> Result<(), String> {
    use object_store::ObjectStore;
    let mut builder = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name(&target.bucket)
        .with_region(&target.region)
        .with_virtual_hosted_style_request(false);
    if let Some(ep) = &target.endpoint {
        builder = builder
            .with_endpoint(ep)
            .with_allow_http(ep.starts_with("http://"));
    }
    if let (Some(id), Some(secret)) = (access_key_id, secret_access_key) {
        builder = builder
            .with_access_key_id(id)
            .with_secret_access_key(secret);
    }
    let store = builder
        .build()
        .map_err(|e| format!("S3 client for bucket {}: {e}", target.bucket))?;
    let prefix = target
        .key
        .rsplit_once('/')
        .map(|(dir, _)| object_store::path::Path::from(dir));
    let listing = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        store.list_with_delimiter(prefix.as_ref()),
    )
    .await
    .map_err(|_| format!("bucket {} did not answer within 20s", target.bucket))?;
    listing.map(|_| ()).map_err(|e| {
        let reason = e.to_string();
        let reason = reason.lines().next().unwrap_or_default();
        format!(
            "bucket {} is not reachable{}: {reason}",
            target.bucket,
            target
                .endpoint
                .as_ref()
                .map(|e| format!(" at {e}"))
                .unwrap_or_default()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend_of(hcl: &str) -> Option<Backend> {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("backend.tf"), hcl).expect("write");
        find_backend(dir.path()).expect("parse")
    }

    const GOOD: &str = r#"
terraform {
  backend "s3" {
    bucket                      = "tfstate"
    key                         = "prod/terraform.tfstate"
    region                      = "us-east-1"
    endpoints                   = { s3 = "http://10.0.0.49:9000" }
    use_path_style              = true
    skip_credentials_validation = true
    skip_region_validation      = true
    skip_requesting_account_id  = true
    skip_metadata_api_check     = true
    use_lockfile                = true
  }
}
"#;

    #[test]
    fn a_minio_backend_passes() {
        let target = check(backend_of(GOOD).as_ref()).expect("valid");
        assert_eq!(target.bucket, "tfstate");
        assert_eq!(target.endpoint.as_deref(), Some("http://10.0.0.49:9000"));
    }

    #[test]
    fn local_and_missing_backends_are_refused() {
        let e = check(None).expect_err("no backend");
        assert!(e[0].contains("working tree"), "{e:?}");
        let local =
            backend_of("terraform {\n  backend \"local\" {\n    path = \"x.tfstate\"\n  }\n}\n");
        let e = check(local.as_ref()).expect_err("local");
        assert!(e[0].contains("backend \"local\" is not \"s3\""), "{e:?}");
    }

    #[test]
    fn each_missing_minio_setting_is_named() {
        let bad = GOOD
            .replace("http://10.0.0.49:9000", "s3://10.0.0.49:9000")
            .replace("use_path_style              = true\n", "")
            .replace("skip_region_validation      = true\n", "")
            .replace("use_lockfile                = true", "use_lockfile = false");
        let e = check(backend_of(&bad).as_ref()).expect_err("invalid");
        let all = e.join("\n");
        for needle in [
            "\"s3://10.0.0.49:9000\" must start with http://",
            "use_path_style",
            "skip_region_validation",
            "use_lockfile",
        ] {
            assert!(all.contains(needle), "{needle} not in {all}");
        }
        assert_eq!(e.len(), 4, "{all}");
    }
}

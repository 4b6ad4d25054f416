//! `s3.endpoint`, `s3.bucket.<name>` and `s3.lockfile`: the S3 (MinIO) endpoint answers with
//! the configured scheme and accepts the credentials; each bucket exists and takes a probe
//! object (written, then deleted); the state bucket refuses a second conditional write
//! (`If-None-Match: *`), which Terraform's `use_lockfile` relies on to lock.

use std::future::Future;

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use super::{Bucket, Preflight};
use crate::checks::Check;
use crate::clients::S3Config;

const ENDPOINT: &str = "s3.endpoint";
const LOCKFILE: &str = "s3.lockfile";

/// Where probe objects go; each run's has its own random name.
const PROBE_PREFIX: &str = "infraflux-preflight";

fn probe_key(suffix: &str) -> ObjectPath {
    ObjectPath::from(format!("{PROBE_PREFIX}/{}{suffix}", ulid::Ulid::new()))
}

fn scheme_of(endpoint: &str) -> &'static str {
    if endpoint.starts_with("https://") {
        "https"
    } else {
        "plain http"
    }
}

/// Every S3 check, in order.
pub async fn checks(preflight: &Preflight) -> Vec<Check> {
    let Some(s3) = &preflight.context.s3 else {
        return vec![
            Check::skip(ENDPOINT, "no [s3] section"),
            Check::skip(LOCKFILE, "no [s3] section"),
        ];
    };
    let first = match preflight.buckets.first() {
        Some(b) => b,
        None => {
            return vec![
                Check::skip(
                    ENDPOINT,
                    "no bucket configured to probe (set preflight.state_bucket or preflight.buckets)",
                ),
                Check::skip(LOCKFILE, "no bucket configured to probe"),
            ];
        }
    };
    let mut out = vec![
        preflight
            .bounded(ENDPOINT, endpoint(preflight, s3, first))
            .await,
    ];
    if out[0].failed() {
        for bucket in &preflight.buckets {
            out.push(Check::skip(bucket_check_name(bucket), "s3.endpoint failed"));
        }
        out.push(Check::skip(LOCKFILE, "s3.endpoint failed"));
        return out;
    }
    for bucket in &preflight.buckets {
        let name = bucket_check_name(bucket);
        out.push(
            preflight
                .bounded(&name, probe_bucket(preflight, s3, bucket))
                .await,
        );
    }
    match &preflight.lock_bucket {
        Some(bucket) => {
            let probed_ok = out
                .iter()
                .any(|c| c.name == bucket_check_name(bucket) && c.ok);
            if probed_ok {
                out.push(
                    preflight
                        .bounded(LOCKFILE, lockfile(preflight, s3, bucket))
                        .await,
                );
            } else {
                out.push(Check::skip(
                    LOCKFILE,
                    format!("bucket {} failed its probe", bucket.name),
                ));
            }
        }
        None => out.push(Check::skip(LOCKFILE, "no bucket configured to probe")),
    }
    out
}

fn bucket_check_name(bucket: &Bucket) -> String {
    format!("s3.bucket.{}", bucket.name)
}

fn store(
    preflight: &Preflight,
    bucket: &str,
) -> Result<std::sync::Arc<object_store::aws::AmazonS3>, String> {
    preflight
        .context
        .s3_bucket(bucket)
        .map_err(|e| e.to_string())
}

/// What went wrong, in words an operator acts on.
enum Trouble {
    NoBucket,
    Refused,
    Unreachable,
    Other,
}

fn classify(e: &object_store::Error) -> Trouble {
    let text = super::cause(e);
    if text.contains("NoSuchBucket") {
        return Trouble::NoBucket;
    }
    if matches!(
        e,
        object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. }
    ) || [
        "SignatureDoesNotMatch",
        "InvalidAccessKeyId",
        "AccessDenied",
        "403",
        "401",
    ]
    .iter()
    .any(|c| text.contains(c))
    {
        return Trouble::Refused;
    }
    if matches!(e, object_store::Error::NotFound { .. }) {
        return Trouble::NoBucket;
    }
    if [
        "error sending request",
        "connect",
        "Connection refused",
        "dns error",
        "tls",
        "TLS",
        "certificate",
    ]
    .iter()
    .any(|c| text.contains(c))
    {
        return Trouble::Unreachable;
    }
    Trouble::Other
}

/// A read of an absent key: answers "not found" when the endpoint, scheme and credentials
/// are right.
async fn endpoint(preflight: &Preflight, s3: &S3Config, bucket: &Bucket) -> Check {
    let scheme = scheme_of(&s3.endpoint);
    let store = match store(preflight, &bucket.name) {
        Ok(s) => s,
        Err(e) => {
            return Check::fail(
                ENDPOINT,
                e,
                "check s3.endpoint and that s3.access_key_id and s3.secret_access_key resolve",
            );
        }
    };
    let absent = ObjectPath::from(format!("{PROBE_PREFIX}/absent"));
    let result = store.head(&absent).await;
    let e = match result {
        // Absent or present, the endpoint answered a signed request.
        Ok(_) => None,
        Err(object_store::Error::NotFound { .. }) => None,
        Err(e) => Some(e),
    };
    let Some(e) = e else {
        return Check::pass(
            ENDPOINT,
            format!(
                "{} answers over {scheme} and accepts the credentials",
                s3.endpoint
            ),
        );
    };
    let why = super::cause(&e);
    match classify(&e) {
        Trouble::Refused => Check::fail(
            ENDPOINT,
            format!("{} refused the credentials: {why}", s3.endpoint),
            "check that s3.access_key_id and s3.secret_access_key are a key pair of this server (mc admin user svcacct info), and s3.region",
        ),
        Trouble::Unreachable | Trouble::Other => {
            let other = if scheme == "https" {
                "http://"
            } else {
                "https://"
            };
            Check::fail(
                ENDPOINT,
                format!("cannot reach {} over {scheme}: {why}", s3.endpoint),
                format!(
                    "check s3.endpoint's host and port, and its scheme: if the server speaks {}, write {other}",
                    if scheme == "https" {
                        "plain HTTP"
                    } else {
                        "TLS"
                    }
                ),
            )
        }
        Trouble::NoBucket => Check::pass(
            ENDPOINT,
            format!(
                "{} answers over {scheme} and accepts the credentials",
                s3.endpoint
            ),
        ),
    }
}

/// Put a probe object, then delete it.
async fn probe_bucket(preflight: &Preflight, s3: &S3Config, bucket: &Bucket) -> Check {
    let name = bucket_check_name(bucket);
    let store = match store(preflight, &bucket.name) {
        Ok(s) => s,
        Err(e) => return Check::fail(name, e, "check the [s3] section"),
    };
    let key = probe_key("");
    if let Err(e) = store
        .put(&key, PutPayload::from_static(b"infraflux preflight probe"))
        .await
    {
        return bucket_failure(&name, s3, bucket, "write a probe object to", &e);
    }
    match store.delete(&key).await {
        Ok(()) => Check::pass(
            name,
            format!(
                "bucket {} ({}) exists and is writable: probe object written and deleted",
                bucket.name, bucket.key
            ),
        ),
        Err(e) => Check::fail(
            name,
            format!(
                "bucket {}: wrote probe object {key} but cannot delete it: {}",
                bucket.name,
                super::cause(&e)
            ),
            format!(
                "allow s3:DeleteObject on {}/* for the agent's key, and delete {key} by hand",
                bucket.name
            ),
        ),
    }
}

fn bucket_failure(
    name: &str,
    s3: &S3Config,
    bucket: &Bucket,
    doing: &str,
    e: &object_store::Error,
) -> Check {
    let why = super::cause(e);
    match classify(e) {
        Trouble::NoBucket => Check::fail(
            name,
            format!(
                "bucket {} ({}) does not exist at {}",
                bucket.name, bucket.key, s3.endpoint
            ),
            format!(
                "create it (mc mb <alias>/{}), or correct {}",
                bucket.name, bucket.key
            ),
        ),
        Trouble::Refused => Check::fail(
            name,
            format!(
                "the credentials may not {doing} bucket {}: {why}",
                bucket.name
            ),
            format!(
                "allow s3:PutObject, s3:GetObject and s3:DeleteObject on {}/* for the agent's key (a MinIO policy)",
                bucket.name
            ),
        ),
        Trouble::Unreachable | Trouble::Other => Check::fail(
            name,
            format!("cannot {doing} bucket {}: {why}", bucket.name),
            "check s3.endpoint and the server's logs",
        ),
    }
}

/// Two conditional creates of one key: the first must succeed, the second be refused.
async fn lockfile(preflight: &Preflight, s3: &S3Config, bucket: &Bucket) -> Check {
    let store = match store(preflight, &bucket.name) {
        Ok(s) => s,
        Err(e) => return Check::fail(LOCKFILE, e, "check the [s3] section"),
    };
    let key = probe_key(".tflock");
    let create = || {
        store.put_opts(
            &key,
            PutPayload::from_static(b"{}"),
            PutOptions::from(PutMode::Create),
        )
    };
    let first = create().await;
    let outcome = match first {
        Err(e) => Err(format!(
            "a conditional write (If-None-Match: *) to bucket {} failed: {}",
            bucket.name,
            super::cause(&e)
        )),
        Ok(_) => match create().await {
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Ok(()),
            Err(e) => Err(format!(
                "the second conditional write to bucket {} failed otherwise than refused: {}",
                bucket.name,
                super::cause(&e)
            )),
            Ok(_) => Err(format!(
                "{} ignored If-None-Match: * on bucket {}: a second conditional write replaced the object, so Terraform's use_lockfile would not lock",
                s3.endpoint, bucket.name
            )),
        },
    };
    cleanup(store.delete(&key)).await;
    match outcome {
        Ok(()) => Check::pass(
            LOCKFILE,
            format!(
                "bucket {} refuses a second conditional write: Terraform's use_lockfile locks",
                bucket.name
            ),
        ),
        Err(message) => Check::fail(
            LOCKFILE,
            message,
            "use an S3 server with conditional writes (MinIO since RELEASE.2024-11, AWS S3), or keep DynamoDB-style locking; until then two plans can write the state at once",
        ),
    }
}

/// The probe is removed whatever happened; a failure to remove it is not the check's verdict.
async fn cleanup<F: Future<Output = object_store::Result<()>>>(delete: F) {
    if let Err(e) = delete.await {
        tracing::warn!(error = %e, "Could not delete the preflight's lock probe object");
    }
}

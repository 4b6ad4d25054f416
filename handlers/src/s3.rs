//! S3 (MinIO) clients from the `[s3]` section: path-style addressing and plain-http endpoints
//! work, as MinIO on a LAN needs.

use std::sync::Arc;

use object_store::aws::{AmazonS3, AmazonS3Builder};

use crate::clients::S3Config;
use crate::secret::SecretKey;
use crate::secret::Secrets;

/// A client for one bucket.
pub fn bucket(config: &S3Config, secrets: &Secrets, bucket: &str) -> Result<Arc<AmazonS3>, String> {
    let id = secrets
        .of(&SecretKey::S3AccessKeyId)
        .ok_or("s3.access_key_id is not resolved")?;
    let key = secrets
        .of(&SecretKey::S3SecretAccessKey)
        .ok_or("s3.secret_access_key is not resolved")?;
    let mut retry = object_store::RetryConfig::default();
    if let Some(timeout) = &config.retry_timeout {
        retry.retry_timeout = timeout.get();
    }
    AmazonS3Builder::new()
        .with_retry(retry)
        .with_endpoint(&config.endpoint)
        .with_allow_http(config.endpoint.starts_with("http://"))
        .with_region(&config.region)
        .with_bucket_name(bucket)
        .with_access_key_id(id.expose())
        .with_secret_access_key(key.expose())
        .with_virtual_hosted_style_request(!config.path_style)
        .build()
        .map(Arc::new)
        .map_err(|e| format!("S3 client for bucket {bucket}: {e}"))
}

/// An S3 error as a handler error: refused credentials fail at once with what to fix (asking
/// again will not help); anything else may be a passing outage and is worth another try.
pub fn error(doing: &str, e: &object_store::Error) -> crate::handler::HandlerError {
    let text = e.to_string();
    let refused = matches!(
        e,
        object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. }
    ) || [
        "SignatureDoesNotMatch",
        "InvalidAccessKeyId",
        "AccessDenied",
        "403 Forbidden",
        "401 Unauthorized",
    ]
    .iter()
    .any(|code| text.contains(code));
    if refused {
        crate::handler::HandlerError::Failed(format!(
            "S3 refused the agent's credentials while {doing}: check s3.access_key_id and s3.secret_access_key ({text})"
        ))
    } else {
        crate::handler::HandlerError::Retryable(format!("{doing}: {text}"))
    }
}

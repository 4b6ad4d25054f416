//! S3 (MinIO) clients from the `[s3]` section: path-style addressing and plain-http endpoints
//! work, as MinIO on a LAN needs.

use std::sync::Arc;

use object_store::aws::{AmazonS3, AmazonS3Builder};

use crate::clients::S3Config;
use crate::secret::Secrets;

/// A client for one bucket.
pub fn bucket(config: &S3Config, secrets: &Secrets, bucket: &str) -> Result<Arc<AmazonS3>, String> {
    let id = secrets
        .get("s3.access_key_id")
        .ok_or("s3.access_key_id is not resolved")?;
    let key = secrets
        .get("s3.secret_access_key")
        .ok_or("s3.secret_access_key is not resolved")?;
    AmazonS3Builder::new()
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

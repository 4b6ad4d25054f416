//! `etcd-snapshot`: a Talos etcd snapshot streamed to S3, verified, optionally encrypted,
//! pruned by retention.

use serde::Deserialize;

use crate::settings::HumanDuration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    Zstd,
    None,
}

/// `[etcd_snapshot.retention]`: an object is kept when any present rule keeps it.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Retention {
    #[serde(default)]
    pub keep_last: Option<u32>,
    #[serde(default)]
    pub max_age: Option<HumanDuration>,
    #[serde(default)]
    pub daily: Option<u32>,
    #[serde(default)]
    pub weekly: Option<u32>,
    #[serde(default)]
    pub monthly: Option<u32>,
}

/// `[etcd_snapshot]`
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub bucket: String,
    #[serde(default)]
    pub prefix: String,
    /// Absent: not encrypted.
    #[serde(default)]
    pub age_recipients: Vec<String>,
    #[serde(default = "default_compression")]
    pub compression: Compression,
    /// A snapshot smaller than this fraction of the previous one fails the job.
    #[serde(default = "default_min_size_ratio")]
    pub min_size_ratio: f64,
    #[serde(default)]
    pub retention: Retention,
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
}

fn default_compression() -> Compression {
    Compression::Zstd
}
fn default_min_size_ratio() -> f64 {
    0.5
}
fn default_timeout() -> HumanDuration {
    HumanDuration::from_secs(1800)
}

//! Real peers for the reconcile tests: an S3 server (moto) and a git repository as the infra
//! repository, with Terraform configs that use only built-in resources.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// An S3-compatible server (PyPI `moto[server]`) on a free port.
pub struct S3Server {
    pub endpoint: String,
    child: Child,
    /// s3s-fs keeps objects here as files.
    root: Option<tempfile::TempDir>,
}

impl S3Server {
    pub async fn start(bucket: &str) -> S3Server {
        let port = crate::free_port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start moto_server ({e}); install it: pip install 'moto[server]'")
            });
        let server = S3Server {
            endpoint: format!("http://127.0.0.1:{port}"),
            child,
            root: None,
        };
        for _ in 0..200 {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let created = reqwest::Client::new()
            .put(format!("{}/{bucket}", server.endpoint))
            .send()
            .await
            .expect("create bucket");
        assert!(
            created.status().is_success(),
            "create bucket: {}",
            created.status()
        );
        server
    }

    /// `s3s-fs` (crates.io, `cargo install s3s-fs --features binary`): a Rust S3 server on the
    /// file system that checks SigV4 with the given keys, fast enough not to be the bottleneck
    /// of a streaming benchmark (moto holds every part in memory).
    pub async fn start_s3s_fs(bucket: &str, access_key: &str, secret_key: &str) -> S3Server {
        let port = crate::free_port();
        let root = tempfile::tempdir().expect("s3s-fs root");
        std::fs::create_dir(root.path().join(bucket)).expect("bucket directory");
        let child = Command::new("s3s-fs")
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", access_key, "--secret-key", secret_key])
            .arg(root.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start s3s-fs ({e}); install it: cargo install s3s-fs --version 0.14.1 --locked --features binary"
                )
            });
        for _ in 0..200 {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        S3Server {
            endpoint: format!("http://127.0.0.1:{port}"),
            child,
            root: Some(root),
        }
    }

    /// Frees the disk an s3s-fs server used: every object and part in `bucket`.
    pub fn empty_files(&self, bucket: &str) {
        if let Some(root) = &self.root {
            let dir = root.path().join(bucket);
            let _ = std::fs::remove_dir_all(&dir);
            let _ = std::fs::create_dir(&dir);
        }
    }

    /// Every file an s3s-fs server keeps for `bucket` (objects and parts), read from its disk:
    /// no request, so no signature needed.
    pub fn files(&self, bucket: &str) -> Vec<String> {
        let root = self.root.as_ref().expect("files() needs an s3s-fs server");
        let mut found = Vec::new();
        let mut dirs = vec![root.path().join(bucket)];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    dirs.push(path);
                } else {
                    found.push(path.display().to_string());
                }
            }
        }
        found
    }

    /// Every object key in `bucket`.
    pub async fn keys(&self, bucket: &str) -> Vec<String> {
        let body = reqwest::get(format!("{}/{bucket}?list-type=2", self.endpoint))
            .await
            .expect("list")
            .text()
            .await
            .expect("list body");
        body.split("<Key>")
            .skip(1)
            .filter_map(|s| s.split("</Key>").next())
            .map(str::to_string)
            .collect()
    }
}

impl S3Server {
    /// Multipart uploads started and neither completed nor aborted.
    pub async fn pending_uploads(&self, bucket: &str) -> usize {
        let body = reqwest::get(format!("{}/{bucket}?uploads", self.endpoint))
            .await
            .expect("list uploads")
            .text()
            .await
            .expect("body");
        body.matches("<UploadId>").count()
    }

    fn client(&self, bucket: &str) -> object_store::aws::AmazonS3 {
        object_store::aws::AmazonS3Builder::new()
            .with_endpoint(&self.endpoint)
            .with_allow_http(true)
            .with_bucket_name(bucket)
            .with_region("us-east-1")
            .with_access_key_id("testing")
            .with_secret_access_key("testing")
            .with_virtual_hosted_style_request(false)
            .build()
            .expect("s3 client")
    }

    /// Reads an object with a signed request.
    pub async fn get(&self, bucket: &str, key: &str) -> Vec<u8> {
        use object_store::ObjectStoreExt;
        self.client(bucket)
            .get(&object_store::path::Path::from(key))
            .await
            .expect("get object")
            .bytes()
            .await
            .expect("object body")
            .to_vec()
    }

    /// Writes an object with a signed request.
    pub async fn put(&self, bucket: &str, key: &str, body: Vec<u8>) {
        use object_store::ObjectStoreExt;
        self.client(bucket)
            .put(&object_store::path::Path::from(key), body.into())
            .await
            .expect("put object");
    }

    /// Deletes an object with a signed request, as a person with the bucket's keys would.
    pub async fn delete(&self, bucket: &str, key: &str) {
        use object_store::ObjectStoreExt;
        self.client(bucket)
            .delete(&object_store::path::Path::from(key))
            .await
            .expect("delete object");
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A git repository standing in for the user's infra repository.
pub struct InfraRepo {
    _dir: tempfile::TempDir,
    pub path: PathBuf,
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .current_dir(dir)
        .args([
            "-c",
            "user.name=Codertocat",
            "-c",
            "user.email=octocat@github.com",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .output()
        .expect("run git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

impl InfraRepo {
    pub fn new() -> InfraRepo {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("infra");
        std::fs::create_dir_all(&path).expect("mkdir");
        git(&path, &["init", "--quiet", "-b", "main"]);
        InfraRepo { _dir: dir, path }
    }

    pub fn url(&self) -> String {
        format!("file://{}", self.path.display())
    }

    pub fn write(&self, relative: &str, content: &str) {
        let file = self.path.join(relative);
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::write(file, content).expect("write");
    }

    /// Commits everything on the current branch; returns the full sha.
    pub fn commit(&self, message: &str) -> String {
        git(&self.path, &["add", "-A"]);
        git(
            &self.path,
            &["commit", "--quiet", "--allow-empty", "-m", message],
        );
        git(&self.path, &["rev-parse", "HEAD"])
    }

    pub fn checkout_new_branch(&self, name: &str) {
        git(&self.path, &["checkout", "--quiet", "-b", name]);
    }

    pub fn checkout(&self, name: &str) {
        git(&self.path, &["checkout", "--quiet", name]);
    }
}

impl Default for InfraRepo {
    fn default() -> Self {
        Self::new()
    }
}

/// The S3 backend block for MinIO-like servers, with locking on.
pub fn backend(endpoint: &str) -> String {
    format!(
        r#"terraform {{
  backend "s3" {{
    bucket                      = "tfstate"
    key                         = "prod/terraform.tfstate"
    region                      = "us-east-1"
    endpoints                   = {{ s3 = "{endpoint}" }}
    use_path_style              = true
    skip_credentials_validation = true
    skip_region_validation      = true
    skip_requesting_account_id  = true
    skip_metadata_api_check     = true
    use_lockfile                = true
  }}
}}
"#
    )
}

/// Resources of a small lab: one VM stand-in per name, a sensitive password, and a token that
/// terraform does not know is secret (it comes from the agent's env_vars).
pub fn resources(names: &[&str], slow_seconds: u32) -> String {
    let mut tf = String::from(
        r#"variable "db_password" {
  type      = string
  sensitive = true
  default   = "s3cr3t-db-pass-0042"
}

variable "api_token" {
  type    = string
  default = "none"
}
"#,
    );
    for name in names {
        tf.push_str(&format!(
            r#"
resource "terraform_data" "{name}" {{
  input = {{
    name     = "{name}"
    password = var.db_password
    token    = var.api_token
  }}
"#
        ));
        if slow_seconds > 0 {
            tf.push_str(&format!(
                "\n  provisioner \"local-exec\" {{\n    command = \"sleep {slow_seconds}\"\n  }}\n"
            ));
        }
        tf.push_str("}\n");
    }
    tf
}

/// An empty terraform CLI config: no provider may be downloaded here, and none is needed.
pub fn empty_cli_config() -> PathBuf {
    let path = std::env::temp_dir().join("infraflux-tests-empty.tfrc");
    if !path.exists() {
        std::fs::write(&path, "").expect("write empty tfrc");
    }
    path
}

/// A real etcd (Debian's `etcd-server`) on free loopback ports, driven with `etcdctl`.
pub struct Etcd {
    pub client_url: String,
    child: Child,
}

fn etcdctl(endpoint: Option<&str>, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new("etcdctl");
    cmd.env("ETCDCTL_API", "3");
    if let Some(e) = endpoint {
        cmd.args(["--endpoints", e]);
    }
    cmd.args(args).output().unwrap_or_else(|e| {
        panic!("cannot run etcdctl ({e}); install it (Debian: apt-get install etcd-client)")
    })
}

impl Etcd {
    /// Starts etcd on `data_dir` (which may hold a restored snapshot) with member name `name`
    /// and peer URL on `peer_port`.
    pub async fn start(data_dir: &Path, name: &str, peer_port: u16) -> Etcd {
        let client_port = crate::free_port();
        let client_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let child = Command::new("etcd")
            .args(["--name", name, "--data-dir"])
            .arg(data_dir)
            .args([
                "--listen-client-urls",
                &client_url,
                "--advertise-client-urls",
                &client_url,
            ])
            .args([
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
            ])
            .args(["--initial-cluster", &format!("{name}={peer_url}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start etcd ({e}); install it (Debian: apt-get install etcd-server)")
            });
        let etcd = Etcd { client_url, child };
        for _ in 0..200 {
            if etcdctl(Some(&etcd.client_url), &["endpoint", "health"])
                .status
                .success()
            {
                return etcd;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("etcd did not become healthy on {}", etcd.client_url);
    }

    pub fn put(&self, key: &str, value: &str) {
        let out = etcdctl(Some(&self.client_url), &["put", key, value]);
        assert!(
            out.status.success(),
            "etcdctl put: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn get(&self, key: &str) -> Option<String> {
        let out = etcdctl(Some(&self.client_url), &["get", "--print-value-only", key]);
        assert!(
            out.status.success(),
            "etcdctl get: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (!v.is_empty()).then_some(v)
    }

    /// Puts a value of any size and content (etcdctl reads it from stdin, as an argument
    /// could not hold a large one).
    pub fn put_bytes(&self, key: &str, value: &[u8]) {
        use std::io::Write;
        let mut child = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.client_url, "put", key])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run etcdctl");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(value)
            .expect("value to etcdctl");
        let out = child.wait_with_output().expect("etcdctl put");
        assert!(
            out.status.success(),
            "etcdctl put {key}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// How many keys start with `prefix`.
    pub fn count(&self, prefix: &str) -> u64 {
        let out = etcdctl(
            Some(&self.client_url),
            &[
                "get",
                prefix,
                "--prefix",
                "--keys-only",
                "--limit=1",
                "-w",
                "json",
            ],
        );
        assert!(
            out.status.success(),
            "etcdctl get: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let reply: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        reply["count"].as_u64().unwrap_or(0)
    }

    /// `etcdctl snapshot save`: the real snapshot format, SHA-256 trailer included.
    pub fn snapshot(&self, file: &Path) {
        let out = etcdctl(
            Some(&self.client_url),
            &["snapshot", "save", &file.display().to_string()],
        );
        assert!(
            out.status.success(),
            "etcdctl snapshot save: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `etcdctl snapshot restore` into `data_dir`, which checks the SHA-256 trailer.
pub fn restore_snapshot(
    file: &Path,
    data_dir: &Path,
    name: &str,
    peer_port: u16,
) -> Result<(), String> {
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    let out = etcdctl(
        None,
        &[
            "snapshot",
            "restore",
            &file.display().to_string(),
            "--data-dir",
            &data_dir.display().to_string(),
            "--name",
            name,
            "--initial-cluster",
            &format!("{name}={peer_url}"),
            "--initial-advertise-peer-urls",
            &peer_url,
        ],
    );
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

//! kill -9 of an agent mid-job: the job is redelivered, completes elsewhere, and its record and
//! its handler know it was interrupted.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use infraflux_tests::*;

/// The agent binary as a child process, so it can be killed like a crash kills it.
pub struct AgentProcess {
    child: Child,
}

impl AgentProcess {
    pub fn spawn(config: &std::path::Path, env: &[(&str, String)], log: &std::path::Path) -> Self {
        let child = Command::new(crate::test_agent_bin())
            .args(["run", "--config"])
            .arg(config)
            .envs(test_env())
            .env("RUST_LOG", "info")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).expect("log file"))
            .spawn()
            .expect("spawn test agent");
        Self { child }
    }

    fn with_markers(
        config: &std::path::Path,
        markers: &std::path::Path,
        log: &std::path::Path,
    ) -> Self {
        let env = [
            ("IFX_TEST_MARKERS", markers.display().to_string()),
            ("IFX_TEST_SLEEP_MS", "4000".to_string()),
        ];
        Self::spawn(config, &env, log)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the process to exit; its exit code.
    pub fn wait(&mut self) -> Option<i32> {
        self.child.wait().ok().and_then(|s| s.code())
    }

    /// Its exit code once it exits; `None` if it is still running after `limit`.
    pub fn exit_within(&mut self, limit: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            match self.child.try_wait() {
                Ok(Some(status)) => return status.code(),
                Ok(None) => std::thread::sleep(Duration::from_millis(100)),
                Err(_) => return None,
            }
        }
        None
    }

    pub fn kill9(&mut self) {
        // Child::kill is SIGKILL: no shutdown code runs, exactly like a crash.
        self.child.kill().expect("kill -9");
        let _ = self.child.wait();
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_survives_kill_9_of_its_agent_and_records_the_interruption() {
    init();
    let nats = Nats::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let markers = dir.path().join("markers");
    std::fs::create_dir_all(&markers).expect("markers dir");
    let write_config = |id: &str| {
        let state = dir.path().join(id);
        let path = dir.path().join(format!("{id}.toml"));
        std::fs::write(
            &path,
            format!(
                "{}\n{}",
                base_toml(&nats.url, id, &state),
                acceptance_stand_in()
            ),
        )
        .expect("config");
        path
    };
    let first = write_config("crash-a");
    let second = write_config("crash-b");
    let mut a = AgentProcess::with_markers(&first, &markers, &dir.path().join("a.log"));
    let client = nats.client().await;
    let reply = wait_for(Duration::from_secs(20), "agent a to answer", || async {
        let r = tokio::time::timeout(
            Duration::from_secs(2),
            client.request("infraflux.cmd.acceptance", "acceptance".into()),
        )
        .await;
        match r {
            Ok(Ok(m)) => serde_json::from_slice::<serde_json::Value>(&m.payload).ok(),
            _ => None,
        }
    })
    .await;
    let job_id = reply["job_id"].as_str().expect("job id").to_string();
    let start_a = markers.join(format!("{job_id}.1.crash-a.start"));
    wait_for(
        Duration::from_secs(15),
        "the job to start on agent a",
        || async { start_a.exists().then_some(()) },
    )
    .await;
    a.kill9();

    let _b = AgentProcess::with_markers(&second, &markers, &dir.path().join("b.log"));
    let done = wait_settled(&client, &job_id, Duration::from_secs(60)).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["agent"], "crash-b");
    assert_eq!(done["attempts"], 2, "{done}");
    let interruptions = done["interruptions"].as_array().expect("interruptions");
    assert_eq!(interruptions.len(), 1, "{done}");
    assert_eq!(interruptions[0]["agent"], "crash-a");
    assert_eq!(interruptions[0]["attempt"], 1);
    assert_eq!(interruptions[0]["state"], "running");
    // The handler was told, and the first attempt never finished.
    let told = std::fs::read_to_string(markers.join(format!("{job_id}.2.crash-b.start")))
        .expect("second attempt marker");
    assert_eq!(told, "interrupted=true previous_agent=crash-a\n");
    assert!(!markers.join(format!("{job_id}.1.crash-a.done")).exists());
    assert!(markers.join(format!("{job_id}.2.crash-b.done")).exists());
    let attempts = std::fs::read_dir(&markers)
        .expect("markers")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".start"))
        .count();
    assert_eq!(attempts, 2, "one interrupted attempt, one complete");
}

//! The agent binary as a child process, so a test can kill it like a crash kills it.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::test_env;

pub struct AgentProcess {
    child: Child,
}

impl AgentProcess {
    /// Runs `bin run --config <config>` with the test environment plus `env`, stderr to `log`.
    pub fn spawn(bin: &Path, config: &Path, env: &[(&str, String)], log: &Path) -> Self {
        let child = Command::new(bin)
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

//! Child processes that can be cancelled the way operators expect: SIGINT first, so tools like
//! terraform release their state locks, then SIGKILL after a grace period.
//!
//! Arguments are passed as a vector, never through a shell.

use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

/// Most bytes of stdout or stderr kept per stream; the tail is what matters in a failure.
pub const MAX_CAPTURE_BYTES: usize = 1 << 20;

#[derive(Debug)]
pub struct ChildOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("could not start {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("waiting for {program} failed: {source}")]
    Wait {
        program: String,
        source: std::io::Error,
    },
    /// Cancelled; `forced` when SIGINT was not enough and SIGKILL ended it.
    #[error("{program} was cancelled{}", if *forced { " (killed after the grace period)" } else { "" })]
    Cancelled { program: String, forced: bool },
}

/// Runs `cmd` to completion, or until `cancel` fires. The child runs in its own process group,
/// so the signals also reach whatever it started (terraform's provider plugins).
pub async fn run_cancellable(
    mut cmd: Command,
    cancel: &CancellationToken,
    grace: Duration,
) -> Result<ChildOutput, ProcessError> {
    let program = cmd.as_std().get_program().to_string_lossy().into_owned();
    cmd.process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|source| ProcessError::Spawn {
        program: program.clone(),
        source,
    })?;
    let pgid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .map(Pid::from_raw);
    let stdout = child.stdout.take().map(|s| tokio::spawn(capture(s)));
    let stderr = child.stderr.take().map(|s| tokio::spawn(capture(s)));

    let waited = tokio::select! {
        status = child.wait() => Ok(status),
        () = cancel.cancelled() => Err(()),
    };
    let status = match waited {
        Ok(status) => status.map_err(|source| ProcessError::Wait {
            program: program.clone(),
            source,
        })?,
        Err(()) => {
            if let Some(pgid) = pgid {
                // The group may already be gone; nothing to do then.
                let _ = killpg(pgid, Signal::SIGINT);
            }
            let forced = tokio::time::timeout(grace, child.wait()).await.is_err();
            if forced {
                if let Some(pgid) = pgid {
                    let _ = killpg(pgid, Signal::SIGKILL);
                }
                let _ = child.wait().await;
            }
            return Err(ProcessError::Cancelled { program, forced });
        }
    };
    Ok(ChildOutput {
        status,
        stdout: join_capture(stdout).await,
        stderr: join_capture(stderr).await,
    })
}

async fn capture<R: AsyncRead + Unpin>(mut reader: R) -> Vec<u8> {
    let mut kept = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                kept.extend_from_slice(&buf[..n]);
                if kept.len() > MAX_CAPTURE_BYTES {
                    let cut = kept.len() - MAX_CAPTURE_BYTES;
                    kept.drain(..cut);
                }
            }
        }
    }
    kept
}

async fn join_capture(handle: Option<tokio::task::JoinHandle<Vec<u8>>>) -> String {
    match handle {
        Some(h) => String::from_utf8_lossy(&h.await.unwrap_or_default()).into_owned(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn output_and_status_are_returned() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo out; echo err >&2; exit 3"]);
        let out = run_cancellable(cmd, &CancellationToken::new(), Duration::from_secs(1))
            .await
            .expect("ran");
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(out.stdout, "out\n");
        assert_eq!(out.stderr, "err\n");
    }

    #[tokio::test]
    async fn cancel_sends_sigint_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let marker = dir.path().join("got-int");
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(format!(
            "trap 'echo int > {}; exit 130' INT; sleep 30 & wait",
            marker.display()
        ));
        let cancel = CancellationToken::new();
        let trigger = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            trigger.cancel();
        });
        let err = run_cancellable(cmd, &cancel, Duration::from_secs(5))
            .await
            .expect_err("cancelled");
        assert!(
            matches!(err, ProcessError::Cancelled { forced: false, .. }),
            "{err}"
        );
        assert_eq!(std::fs::read_to_string(&marker).expect("marker"), "int\n");
    }

    #[tokio::test]
    async fn a_child_ignoring_sigint_is_killed_after_grace() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ready = dir.path().join("ready");
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!("trap '' INT; touch {}; sleep 30", ready.display()));
        let cancel = CancellationToken::new();
        let trigger = cancel.clone();
        // Cancel only once the trap is in place, or SIGINT could arrive before it.
        tokio::spawn(async move {
            while !ready.exists() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            trigger.cancel();
        });
        let err = run_cancellable(cmd, &cancel, Duration::from_millis(300))
            .await
            .expect_err("cancelled");
        assert!(
            matches!(err, ProcessError::Cancelled { forced: true, .. }),
            "{err}"
        );
    }
}

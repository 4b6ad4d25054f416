//! Child processes that can be cancelled the way operators expect: SIGINT first, so tools like
//! terraform release their state locks, then SIGKILL after a grace period. A child also ends when
//! the agent dies, however it dies (see [`die_with_parent`]).
//!
//! Arguments are passed as a vector, never through a shell.

use std::io::SeekFrom;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::prctl::set_pdeathsig;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::{Pid, getpid, getppid};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

/// Most bytes of stdout or stderr kept per stream.
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

/// Makes the kernel send the child SIGTERM when the agent dies, kill -9 included: an orphaned
/// terraform would otherwise go on running and holding its state lock. terraform treats SIGTERM
/// like SIGINT (it stops, saves its state and releases the lock); git and most tools just exit.
///
/// Only the child itself is signalled, not its process group: terraform ends its provider
/// plugins and the provisioner commands it started itself, but not what those started in turn.
///
/// Linux sends the signal when the *thread* that spawned the child exits, so spawn only from
/// async tasks (tokio's worker threads and the main thread live as long as the process), never
/// from `spawn_blocking`, whose idle threads exit.
#[allow(unsafe_code)]
pub fn die_with_parent(cmd: &mut Command) {
    let parent = getpid();
    // SAFETY: the closure runs in the forked child before exec. It calls only prctl and getppid,
    // both async-signal-safe, and allocates nothing (its errors are plain OS error codes).
    unsafe {
        cmd.pre_exec(move || {
            set_pdeathsig(Signal::SIGTERM)?;
            // The agent died before the signal was armed: nobody would ever send it.
            if getppid() != parent {
                return Err(nix::errno::Errno::ESRCH.into());
            }
            Ok(())
        });
    }
}

/// Runs `cmd` to completion, or until `cancel` fires. The child runs in its own process group,
/// so the signals also reach whatever it started (terraform's provider plugins), and it gets
/// SIGTERM if the agent dies first ([`die_with_parent`]).
///
/// Its output goes to unnamed temporary files, not pipes: a child writing to a pipe whose
/// reader (the agent) died is killed by SIGPIPE, and terraform writes as soon as SIGTERM comes,
/// so it would die before releasing its state lock.
pub async fn run_cancellable(
    cmd: Command,
    cancel: &CancellationToken,
    grace: Duration,
) -> Result<ChildOutput, ProcessError> {
    let Spawned {
        mut child,
        pgid,
        program,
        stdout,
        stderr,
    } = spawn_logged(cmd)?;
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
            let forced = interrupt(&mut child, pgid, grace).await;
            return Err(ProcessError::Cancelled { program, forced });
        }
    };
    Ok(ChildOutput {
        status,
        stdout: tail(stdout).await,
        stderr: tail(stderr).await,
    })
}

/// A child started the way [`run_cancellable`] starts one, its output in unnamed files.
struct Spawned {
    child: tokio::process::Child,
    pgid: Option<Pid>,
    program: String,
    stdout: std::fs::File,
    stderr: std::fs::File,
}

fn spawn_logged(mut cmd: Command) -> Result<Spawned, ProcessError> {
    let program = cmd.as_std().get_program().to_string_lossy().into_owned();
    let spawn_error = |source| ProcessError::Spawn {
        program: program.clone(),
        source,
    };
    let (stdout, stderr) = (
        tempfile::tempfile().map_err(spawn_error)?,
        tempfile::tempfile().map_err(spawn_error)?,
    );
    die_with_parent(&mut cmd);
    cmd.process_group(0)
        .stdin(Stdio::null())
        .stdout(stdout.try_clone().map_err(spawn_error)?)
        .stderr(stderr.try_clone().map_err(spawn_error)?)
        .kill_on_drop(true);
    let child = cmd.spawn().map_err(spawn_error)?;
    let pgid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .map(Pid::from_raw);
    Ok(Spawned {
        child,
        pgid,
        program,
        stdout,
        stderr,
    })
}

/// SIGINT to the child's group, SIGKILL if it has not exited after `grace`; waits for it.
/// True when SIGKILL was needed.
async fn interrupt(child: &mut tokio::process::Child, pgid: Option<Pid>, grace: Duration) -> bool {
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
    forced
}

/// A child that runs until it is stopped (a throwaway server), started like
/// [`run_cancellable`]'s: its own process group, output in unnamed files, SIGTERM if the agent
/// dies, SIGKILL if this is dropped unstopped.
pub struct Background {
    spawned: Spawned,
}

/// How a [`Background`] child ended.
#[derive(Debug)]
pub struct Stopped {
    /// SIGINT was not enough within the grace period.
    pub forced: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Background {
    pub fn spawn(cmd: Command) -> Result<Background, ProcessError> {
        Ok(Background {
            spawned: spawn_logged(cmd)?,
        })
    }

    pub fn id(&self) -> Option<u32> {
        self.spawned.child.id()
    }

    /// Its exit status if it has already exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.spawned.child.try_wait().ok().flatten()
    }

    /// SIGINT, then SIGKILL after `grace`; returns once it is gone, with its output.
    pub async fn stop(mut self, grace: Duration) -> Stopped {
        let forced = interrupt(&mut self.spawned.child, self.spawned.pgid, grace).await;
        Stopped {
            forced,
            stdout: tail(self.spawned.stdout).await,
            stderr: tail(self.spawned.stderr).await,
        }
    }
}

/// The last [`MAX_CAPTURE_BYTES`] written to `file`; the tail is what matters in a failure.
async fn tail(file: std::fs::File) -> String {
    let mut file = tokio::fs::File::from_std(file);
    let written = file.metadata().await.map_or(0, |m| m.len());
    let limit = MAX_CAPTURE_BYTES as u64;
    let mut kept = Vec::new();
    if file
        .seek(SeekFrom::Start(written.saturating_sub(limit)))
        .await
        .is_ok()
    {
        // Something the child started may still be writing: read no more than the limit.
        let _ = file.take(limit).read_to_end(&mut kept).await;
    }
    String::from_utf8_lossy(&kept).into_owned()
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
    async fn only_the_tail_of_a_long_output_is_kept() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "head -c 1100000 /dev/zero | tr '\\0' a; echo END"]);
        let out = run_cancellable(cmd, &CancellationToken::new(), Duration::from_secs(1))
            .await
            .expect("ran");
        assert_eq!(out.stdout.len(), MAX_CAPTURE_BYTES);
        assert!(out.stdout.ends_with("aaaEND\n"));
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

    /// The kernel signals when the spawning *thread* exits (the agent dying ends them all).
    #[test]
    fn a_child_gets_sigterm_when_the_thread_that_started_it_exits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ready = dir.path().join("ready");
        let marker = dir.path().join("got-term");
        let script = format!(
            "trap 'echo term > {}; kill $!; exit 143' TERM; touch {}; sleep 30 & wait",
            marker.display(),
            ready.display()
        );
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async {
                let mut cmd = Command::new("sh");
                cmd.arg("-c").arg(script);
                die_with_parent(&mut cmd);
                let _child = cmd.spawn().expect("spawn");
                // The trap must be in place before this thread ends and the signal comes.
                while !ready.exists() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            });
        })
        .join()
        .expect("spawning thread");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        // The shell creates the file before it writes to it: wait for the whole line.
        let written = || std::fs::read_to_string(&marker).is_ok_and(|t| t.ends_with('\n'));
        while !written() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(
            std::fs::read_to_string(&marker).expect("the child got SIGTERM"),
            "term\n"
        );
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

    #[tokio::test]
    async fn a_background_child_is_stopped_with_sigint_or_killed_after_grace() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ready = dir.path().join("ready");
        let mut polite = Command::new("sh");
        polite.arg("-c").arg(format!(
            "trap 'echo bye >&2; exit 0' INT; touch {}; sleep 30 & wait",
            ready.display()
        ));
        let mut child = Background::spawn(polite).expect("spawn");
        while !ready.exists() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(child.exited().is_none(), "still running");
        let stopped = child.stop(Duration::from_secs(5)).await;
        assert!(!stopped.forced);
        assert_eq!(stopped.stderr, "bye\n");

        std::fs::remove_file(&ready).expect("reset");
        let mut stubborn = Command::new("sh");
        stubborn
            .arg("-c")
            .arg(format!("trap '' INT; touch {}; sleep 30", ready.display()));
        let child = Background::spawn(stubborn).expect("spawn");
        let pid = child.id().expect("pid");
        while !ready.exists() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(child.stop(Duration::from_millis(200)).await.forced);
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "reaped"
        );

        let mut quick = Background::spawn(Command::new("true")).expect("spawn");
        let exited = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if let Some(status) = quick.exited() {
                    return status;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("true exits");
        assert!(exited.success());
    }
}

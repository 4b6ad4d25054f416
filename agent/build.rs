//! Records the git commit for `--version`.
use std::path::Path;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    Command::new("git")
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

fn main() {
    // Packed relative relocations (DT_RELR, glibc >= 2.36, Debian 12): the loader reads a few KiB
    // at start instead of the 1.5 MB of RELA entries a position-independent binary this size
    // carries, which then stayed resident for the daemon's life.
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux")
        && std::env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("gnu")
    {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
    let sha = std::env::var("INFRAFLUX_GIT_SHA")
        .ok()
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]));
    println!(
        "cargo:rustc-env=INFRAFLUX_GIT_SHA={}",
        sha.unwrap_or_else(|| "unknown".to_string())
    );
    println!("cargo:rerun-if-env-changed=INFRAFLUX_GIT_SHA");
    // Where git keeps them: in a worktree `.git` is a file, and a watched path that does not
    // exist makes cargo rerun this script, and rebuild the crate, on every build.
    for name in ["HEAD", "refs/heads"] {
        if let Some(path) = git(&["rev-parse", "--git-path", name])
            && Path::new(&path).exists()
        {
            println!("cargo:rerun-if-changed={path}");
        }
    }
}

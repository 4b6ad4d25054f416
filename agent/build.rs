//! Records the git commit for `--version`.
fn main() {
    let sha = std::env::var("INFRAFLUX_GIT_SHA").ok().or_else(|| {
        std::process::Command::new("git")
            .args(["rev-parse", "--short=12", "HEAD"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    });
    println!(
        "cargo:rustc-env=INFRAFLUX_GIT_SHA={}",
        sha.unwrap_or_else(|| "unknown".to_string())
    );
    println!("cargo:rerun-if-env-changed=INFRAFLUX_GIT_SHA");
    println!("cargo:rerun-if-changed=../.git/HEAD");
    println!("cargo:rerun-if-changed=../.git/refs/heads");
}

//! glibc's allocator, set for a daemon that shares its host with a CI runner.

/// The agent shares its host with a CI runner, so memory it no longer uses goes back: glibc
/// otherwise gives each thread its own arena and, after one large buffer is freed, raises its
/// mmap threshold, so later snapshot parts (8 MiB) come from the heap and stay resident.
/// Explicit `MALLOC_*` variables in the environment still win (glibc reads them first).
#[allow(unsafe_code)]
pub(crate) fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    for (option, value, variable) in [
        (libc::M_ARENA_MAX, 2, "MALLOC_ARENA_MAX"),
        (
            libc::M_MMAP_THRESHOLD,
            1024 * 1024,
            "MALLOC_MMAP_THRESHOLD_",
        ),
    ] {
        if std::env::var_os(variable).is_none() {
            // SAFETY: mallopt only changes allocator settings and is called before the
            // runtime starts any thread.
            unsafe {
                libc::mallopt(option, value);
            }
        }
    }
}

/// Hands pages of freed memory back to the kernel. glibc returns only the top of its heap on
/// its own; a thousand schedules' config, parsed at start, leaves about 1.5 MiB freed but
/// resident below live data for the daemon's life. Cheap at this heap's size (a few MiB).
#[allow(unsafe_code)]
pub(crate) fn give_back_freed() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes each arena's lock; it frees nothing still in use.
    unsafe {
        libc::malloc_trim(0);
    }
}

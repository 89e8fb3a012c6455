//! The proxy's calls into the C library, each behind a safe function: the open-files
//! limit ([`crate::tcp`] keeps a reserve of descriptors under it), and the process's CPU
//! time and glibc's heap statistics and trim ([`crate::memory`] decides when to give
//! freed heap back).
//!
//! Unsafe because std has none of these and libc binds them as `unsafe fn`s. Each call
//! passes nothing but a struct it owns for the call's duration, or nothing at all; the
//! SAFETY notes say so call by call. Gathered here so that every other module of the
//! crate is free of `unsafe` (`#![deny(unsafe_code)]` in lib.rs); the other module that
//! needs it is [`crate::allocator`].

#[cfg(all(target_os = "linux", target_env = "gnu"))]
use std::time::Duration;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit where it is lower; returns the soft
/// limit in force afterwards, or `None` when it cannot be read.
pub(crate) fn raise_open_files_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit through the valid pointer it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return None;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit only reads the rlimit behind the valid pointer it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit.rlim_cur = limit.rlim_max;
        }
    }
    // `rlim_t` is u64 on Linux.
    #[allow(clippy::useless_conversion)]
    Some(u64::from(limit.rlim_cur))
}

/// CPU time this process has used so far (user + system).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub(crate) fn process_cpu_time() -> Option<Duration> {
    let mut time = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through the valid pointer it is given.
    let status = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut time) };
    let seconds = u64::try_from(time.tv_sec).ok()?;
    let nanos = u32::try_from(time.tv_nsec).ok()?;
    (status == 0).then(|| Duration::new(seconds, nanos))
}

/// Bytes glibc holds free in its arenas.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub(crate) fn free_heap_bytes() -> usize {
    // SAFETY: mallinfo2 only reads the allocator's statistics and returns them by value.
    unsafe { libc::mallinfo2() }.fordblks
}

/// Returns the free pages of every malloc arena to the kernel.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub(crate) fn trim_heap() {
    // SAFETY: malloc_trim only reorganizes glibc's own free lists and may be called from
    // any thread at any time; it takes no pointers from us.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    fn anonymous_rss_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        status
            .lines()
            .find_map(|line| line.strip_prefix("RssAnon:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    #[test]
    fn freed_heap_goes_back_to_the_kernel() {
        // 64 MiB in small blocks (never mmapped on their own), then a block allocated
        // last that keeps glibc from trimming the heap's top by itself.
        let mut blocks: Vec<Vec<u8>> = (0..16 * 1024).map(|_| vec![1u8; 4096]).collect();
        let pin = vec![1u8; 100_000];
        // Optimized builds would otherwise elide the unused allocations altogether.
        std::hint::black_box((&mut blocks, &pin));
        blocks.clear();
        blocks.shrink_to_fit();
        let retained = anonymous_rss_kib();
        trim_heap();
        let released = anonymous_rss_kib();
        drop(pin);
        assert!(
            retained.saturating_sub(released) > 32 * 1024,
            "anonymous RSS {retained} KiB before the trim, {released} KiB after"
        );
    }

    #[test]
    fn the_open_files_limit_is_the_hard_one_after_raising() {
        let soft = raise_open_files_limit().expect("getrlimit works on Linux");
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: as in `raise_open_files_limit`.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
            0
        );
        assert_eq!(soft, limit.rlim_cur);
        assert_eq!(
            soft, limit.rlim_max,
            "raising the soft limit to the hard one is allowed"
        );
    }

    #[test]
    fn cpu_time_grows_with_work() {
        let before = process_cpu_time().expect("CLOCK_PROCESS_CPUTIME_ID on Linux");
        let mut spin = 0u64;
        for _ in 0..1_000_000 {
            spin = std::hint::black_box(spin.wrapping_add(1));
        }
        assert!(process_cpu_time().unwrap() > before);
    }
}

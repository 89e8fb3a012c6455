//! Size budgets of the futures the proxy boxes or spawns per request, asserted where they
//! are made (as ztunnel's `assertions::size_between_ref`).
//!
//! A boxed future is one heap block. Blocks up to 1,032 bytes (on 64-bit targets) come
//! from glibc's per-thread cache (tcache); a larger one goes to the arena, at several times the cost,
//! on every request. A future's size is its largest state: one more local held across
//! an `.await`, one more argument kept by an `async fn`, can push it over without any
//! visible change to the code. So each site states its range and debug builds (unit and
//! end-to-end tests) panic when the future leaves it: too large is a regression, too
//! small means the range can be tightened. Release builds check nothing.
//!
//! The ranges are of debug builds, whose futures are larger than optimized ones (the
//! figures of both are in PERFORMANCE.md): a debug future that grows past its range is
//! the optimized one growing too.

/// Panics in debug builds unless `value` takes `min..=max` bytes.
#[inline(always)]
pub(crate) fn size_between_ref<T>(min: usize, max: usize, value: &T) {
    if cfg!(debug_assertions) {
        let size = size_of_val(value);
        // `RUST_LOG=tessera_proxy::assertions=trace` lists every size, to set a range.
        tracing::trace!(size, future = std::any::type_name::<T>(), min, max);
        assert!(
            (min..=max).contains(&size),
            "{} takes {size} bytes, outside its budget of {min}..={max}: keep fewer locals \
             across awaits, box an inner step, or move a new range's figures to PERFORMANCE.md",
            std::any::type_name::<T>(),
        );
    }
}

/// `value`, after [`size_between_ref`]: for wrapping a future where it is boxed.
#[inline(always)]
pub(crate) fn size_between<T>(min: usize, max: usize, value: T) -> T {
    size_between_ref(min, max, &value);
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_future_within_its_range_passes_through() {
        let held = [0u8; 100];
        let future = async move { std::hint::black_box(held).len() };
        let future = size_between(100, 200, future);
        assert_eq!(futures_ready(future), 100);
    }

    #[test]
    #[cfg_attr(not(debug_assertions), ignore = "checked in debug builds only")]
    #[should_panic(expected = "outside its budget of 0..=64")]
    fn a_future_over_its_range_panics() {
        let held = [0u8; 100];
        size_between_ref(0, 64, &async move { std::hint::black_box(held).len() });
    }

    #[test]
    #[cfg_attr(not(debug_assertions), ignore = "checked in debug builds only")]
    #[should_panic(expected = "outside its budget of 500..=600")]
    fn a_range_far_above_the_future_panics_too() {
        size_between_ref(500, 600, &async { 1 });
    }

    /// Polls a future that is ready at once.
    fn futures_ready<F: Future>(future: F) -> F::Output {
        let mut future = std::pin::pin!(future);
        let mut context = std::task::Context::from_waker(std::task::Waker::noop());
        match future.as_mut().poll(&mut context) {
            std::task::Poll::Ready(output) => output,
            std::task::Poll::Pending => panic!("the future was not ready"),
        }
    }
}

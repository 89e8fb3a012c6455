//! Retries: what an attempt's outcome says about the endpoint and whether it is worth
//! another attempt ([`Verdict`]), how many attempts one request may make and until when
//! ([`Attempts`]), and the budget that bounds retries across all requests
//! ([`RetryBudget`]). Every decision is pure over the clock readings the attempts loop in
//! [`super::forward`] makes, so each rule is tested here without sockets or a clock.
//!
//! The budget: retries may add at most `ratio` of live traffic plus `minPerSecond`,
//! measured over a sliding 10-second window, so retries can never multiply an outage.
//! Lock-free: one atomic pair per one-second bucket.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::{Method, Response};
use tessera_mesh::resources::{RetryBudgetSpec, RoutePolicySpec};
use tokio::time::Instant;

use crate::http::ProxyError;

/// How many times a request the peer refused unprocessed is sent again, on top of the
/// route's retries (RFC 9113 §8.7: safe for any method).
const UNPROCESSED_RESENDS: u32 = 1;

/// Timeouts and retries in force for one upstream: its route policy, converted once when
/// discovery delivers it.
#[derive(Default)]
pub(crate) struct RoutePolicy {
    /// The whole request, retries included.
    timeout: Option<Duration>,
    per_try_timeout: Option<Duration>,
    retries: Option<Retries>,
}

/// A route's retries; they never go without a budget.
struct Retries {
    /// Attempts after the first.
    attempts: u32,
    /// Whether non-idempotent methods are retried too.
    any_method: bool,
    budget: RetryBudget,
}

impl RoutePolicy {
    /// Converts a route policy as discovery delivers it.
    pub(crate) fn new(spec: &RoutePolicySpec) -> Self {
        Self {
            timeout: spec.timeout,
            per_try_timeout: spec.per_try_timeout,
            retries: spec.retries.as_ref().map(|retries| Retries {
                attempts: retries.attempts,
                any_method: retries.retryable,
                budget: RetryBudget::new(retries.budget.clone()),
            }),
        }
    }

    /// Whether a request with `method` may be retried on this route: only then is its
    /// body worth keeping for another attempt.
    pub(crate) fn may_retry(&self, method: &Method) -> bool {
        self.retries
            .as_ref()
            .is_some_and(|retries| retries.any_method || idempotent(method))
    }

    /// The attempts of one request that arrived at `now`, counted in the budget as
    /// live traffic. `replayable`: its body is kept, so it can be sent more than once.
    pub(crate) fn attempts(&self, method: &Method, replayable: bool, now: Instant) -> Attempts<'_> {
        if let Some(retries) = &self.retries {
            retries.budget.deposit(now);
        }
        let allowed = match &self.retries {
            Some(retries) if replayable && self.may_retry(method) => 1 + retries.attempts,
            _ => 1,
        };
        Attempts {
            policy: self,
            deadline: self.timeout.map(|timeout| now + timeout),
            current: 1,
            allowed,
            resends_left: if replayable { UNPROCESSED_RESENDS } else { 0 },
        }
    }
}

/// Idempotent methods (RFC 9110 §9.2.2) may be retried on any route with retries; others
/// only on routes marked retryable.
fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// One request's attempts: which one is under way, how many the route allows, and the
/// request's deadline.
pub(crate) struct Attempts<'p> {
    policy: &'p RoutePolicy,
    deadline: Option<Instant>,
    /// The attempt under way, from 1.
    current: u32,
    /// The most attempts the route allows this request; a resend raises it by one.
    allowed: u32,
    resends_left: u32,
}

/// What the attempts loop does once an attempt has ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// Another attempt: one of the route's retries, paid from the budget.
    Retry,
    /// Another attempt of a request the peer never processed: outside the route's
    /// attempts and budget.
    Resend,
    /// The attempt's outcome is the caller's answer.
    Answer(Why),
}

/// Why an outcome is the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Why {
    /// Nothing another attempt could change: a success, a server error not worth
    /// another attempt, the caller's own fault.
    Final,
    /// The route's attempts are spent (one, for a request that may not be retried).
    AttemptsSpent,
    /// The request's deadline has passed.
    DeadlinePassed,
    /// The retry budget has no room.
    BudgetSpent,
}

impl Attempts<'_> {
    /// The attempt under way, from 1.
    pub(crate) fn current(&self) -> u32 {
        self.current
    }

    /// When the current attempt, begun at `began`, is cut off: at its own timeout or the
    /// request's deadline, whichever comes first.
    pub(crate) fn cut_off(&self, began: Instant) -> Option<Instant> {
        let per_try = self.policy.per_try_timeout.map(|timeout| began + timeout);
        match (self.deadline, per_try) {
            (Some(deadline), Some(per_try)) => Some(deadline.min(per_try)),
            (deadline, per_try) => deadline.or(per_try),
        }
    }

    /// Whether no attempt can follow the current one, whatever its outcome: its request
    /// head may be moved instead of copied.
    pub(crate) fn is_last(&self) -> bool {
        self.current >= self.allowed && self.resends_left == 0
    }

    /// Decides what follows the current attempt, which ended at `ended` as `verdict`;
    /// a retry takes its room in the budget.
    pub(crate) fn after(&mut self, verdict: Verdict, ended: Instant) -> Next {
        if !verdict.worth_another() {
            return Next::Answer(Why::Final);
        }
        if self.deadline.is_some_and(|deadline| ended >= deadline) {
            return Next::Answer(Why::DeadlinePassed);
        }
        if verdict == Verdict::Unprocessed && self.resends_left > 0 {
            self.resends_left -= 1;
            self.allowed += 1;
            self.current += 1;
            return Next::Resend;
        }
        if self.current >= self.allowed {
            return Next::Answer(Why::AttemptsSpent);
        }
        let budget = self.policy.retries.as_ref().map(|retries| &retries.budget);
        if !budget.is_some_and(|budget| budget.withdraw(ended)) {
            return Next::Answer(Why::BudgetSpent);
        }
        self.current += 1;
        Next::Retry
    }
}

/// What an attempt's outcome says about the endpoint, and whether to try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Answered, and not with a server error.
    Success,
    /// A server error that is not worth another attempt.
    Failure,
    /// Failed in a way another attempt may not (502/503/504, gRPC UNAVAILABLE, a
    /// connection or stream failure, a timeout).
    Retry,
    /// The caller's own request failed (its body was malformed, cut off or too slow):
    /// nothing counts against the endpoint, and nothing is retried.
    CallersFault,
    /// The peer refused the request before processing it (a GOAWAY below its stream,
    /// REFUSED_STREAM): sent again, once, without a retry policy, and not counted
    /// against the endpoint (a connection going away is not the endpoint failing).
    Unprocessed,
}

impl Verdict {
    /// Classifies one attempt's outcome: an answer, or why there was none.
    pub(crate) fn of<B>(outcome: &Result<Response<B>, ProxyError>) -> Self {
        match outcome {
            Err(ProxyError::BadRequestBody | ProxyError::RequestBodyTimeout) => {
                Verdict::CallersFault
            }
            Err(ProxyError::Unprocessed) => Verdict::Unprocessed,
            Err(_) => Verdict::Retry,
            Ok(response) if worth_another_attempt(response) => Verdict::Retry,
            Ok(response) if response.status().is_server_error() => Verdict::Failure,
            Ok(_) => Verdict::Success,
        }
    }

    /// Whether another attempt may fare better.
    pub(crate) fn worth_another(self) -> bool {
        matches!(self, Verdict::Retry | Verdict::Unprocessed)
    }
}

/// 502/503/504, or a gRPC UNAVAILABLE carried in the headers (trailers-only answer).
fn worth_another_attempt<B>(response: &Response<B>) -> bool {
    matches!(response.status().as_u16(), 502..=504)
        || response
            .headers()
            .get(&crate::http::GRPC_STATUS)
            .is_some_and(|status| status == "14")
}

const BUCKETS: usize = 10;

#[derive(Default)]
struct Bucket {
    /// The second this bucket counts; stale buckets are reset on first touch.
    second: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
}

/// Tracks requests and retries of one upstream.
pub(crate) struct RetryBudget {
    spec: RetryBudgetSpec,
    epoch: Instant,
    buckets: [Bucket; BUCKETS],
}

impl RetryBudget {
    pub(crate) fn new(spec: RetryBudgetSpec) -> Self {
        Self {
            spec,
            epoch: Instant::now(),
            buckets: Default::default(),
        }
    }

    /// The second `now` falls in, from 1 (0 marks a bucket never used).
    fn second(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_secs() + 1
    }

    /// The bucket of `second`, emptied first if it still counts an older one.
    fn bucket(&self, second: u64) -> &Bucket {
        let bucket = &self.buckets[(second as usize) % BUCKETS];
        let seen = bucket.second.load(Ordering::Relaxed);
        if seen != second
            && bucket
                .second
                .compare_exchange(seen, second, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            bucket.requests.store(0, Ordering::Relaxed);
            bucket.retries.store(0, Ordering::Relaxed);
        }
        bucket
    }

    /// Requests and retries in the window that ends with `second`.
    fn window(&self, second: u64) -> (u64, u64) {
        self.buckets
            .iter()
            .filter(|b| second.saturating_sub(b.second.load(Ordering::Relaxed)) < BUCKETS as u64)
            .fold((0, 0), |(requests, retries), b| {
                (
                    requests + b.requests.load(Ordering::Relaxed),
                    retries + b.retries.load(Ordering::Relaxed),
                )
            })
    }

    /// Counts an original request (not a retry), arrived at `now`: the request's own
    /// clock reading, not another one.
    pub(crate) fn deposit(&self, now: Instant) {
        let second = self.second(now);
        self.bucket(second).requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one retry from the budget at `now`, if there is room. Claims first and
    /// gives back when over, so concurrent callers can never overdraw the budget
    /// together.
    pub(crate) fn withdraw(&self, now: Instant) -> bool {
        let second = self.second(now);
        let bucket = self.bucket(second);
        bucket.retries.fetch_add(1, Ordering::Relaxed);
        let (requests, retries) = self.window(second);
        let allowed = (requests as f64 * self.spec.ratio) as u64
            + u64::from(self.spec.min_per_second) * BUCKETS as u64;
        if retries > allowed {
            bucket.retries.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_mesh::resources::RetrySpec;

    fn retries(attempts: u32, any_method: bool, ratio: f64, min_per_second: u32) -> RetrySpec {
        RetrySpec {
            attempts,
            retryable: any_method,
            budget: RetryBudgetSpec {
                ratio,
                min_per_second,
            },
        }
    }

    /// A route with `retries` and the timeouts given in milliseconds.
    fn route(
        retries: Option<RetrySpec>,
        timeout_ms: Option<u64>,
        per_try_ms: Option<u64>,
    ) -> RoutePolicy {
        RoutePolicy::new(&RoutePolicySpec {
            retries,
            timeout: timeout_ms.map(Duration::from_millis),
            per_try_timeout: per_try_ms.map(Duration::from_millis),
            ..RoutePolicySpec::default()
        })
    }

    /// A generous budget: these tests are about attempts, not the budget.
    fn generous(attempts: u32) -> Option<RetrySpec> {
        Some(retries(attempts, false, 1.0, 1_000))
    }

    fn answered(status: u16, grpc_status: Option<&str>) -> Result<Response<()>, ProxyError> {
        let mut response = Response::builder().status(status);
        if let Some(code) = grpc_status {
            response = response.header("grpc-status", code);
        }
        Ok(response.body(()).unwrap())
    }

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    #[test]
    fn only_the_endpoints_own_failures_count_against_it() {
        assert_eq!(Verdict::of(&answered(200, None)), Verdict::Success);
        assert_eq!(Verdict::of(&answered(404, None)), Verdict::Success);
        assert_eq!(Verdict::of(&answered(500, None)), Verdict::Failure);
        assert_eq!(Verdict::of(&answered(501, None)), Verdict::Failure);
        for status in [502, 503, 504] {
            assert_eq!(Verdict::of(&answered(status, None)), Verdict::Retry);
        }
        assert_eq!(Verdict::of(&answered(200, Some("14"))), Verdict::Retry);
        assert_eq!(
            Verdict::of(&answered(200, Some("13"))),
            Verdict::Success,
            "only UNAVAILABLE is worth another attempt"
        );
        for error in [
            ProxyError::Reset,
            ProxyError::Timeout,
            ProxyError::Unreachable,
            ProxyError::NoEndpoints,
        ] {
            assert_eq!(Verdict::of::<()>(&Err(error)), Verdict::Retry, "{error:?}");
        }
        assert_eq!(
            Verdict::of::<()>(&Err(ProxyError::BadRequestBody)),
            Verdict::CallersFault,
            "a caller's broken body is never the endpoint's failure"
        );
        assert_eq!(
            Verdict::of::<()>(&Err(ProxyError::RequestBodyTimeout)),
            Verdict::CallersFault,
            "nor is a caller's slow body"
        );
        assert_eq!(
            Verdict::of::<()>(&Err(ProxyError::Unprocessed)),
            Verdict::Unprocessed,
            "a request the peer refused unprocessed is sent again and ejects nothing"
        );
        let worth: Vec<_> = [
            Verdict::Success,
            Verdict::Failure,
            Verdict::Retry,
            Verdict::CallersFault,
            Verdict::Unprocessed,
        ]
        .into_iter()
        .filter(|verdict| verdict.worth_another())
        .collect();
        assert_eq!(worth, [Verdict::Retry, Verdict::Unprocessed]);
    }

    #[test]
    fn idempotent_methods_retry_on_any_route_with_retries_others_only_when_marked() {
        let idempotent = [
            Method::GET,
            Method::HEAD,
            Method::OPTIONS,
            Method::PUT,
            Method::DELETE,
            Method::TRACE,
        ];
        let others = [Method::POST, Method::PATCH, Method::CONNECT];
        let none = route(None, None, None);
        let plain = route(generous(2), None, None);
        let marked = route(Some(retries(2, true, 1.0, 1_000)), None, None);
        for method in idempotent.iter().chain(&others) {
            assert!(!none.may_retry(method), "{method} without retries");
            assert!(marked.may_retry(method), "{method} on a retryable route");
        }
        for method in &idempotent {
            assert!(plain.may_retry(method), "{method}");
        }
        for method in &others {
            assert!(!plain.may_retry(method), "{method}");
        }
    }

    /// Attempts made (each ending as `verdict`) until the answer, and why it was given.
    fn run(attempts: &mut Attempts<'_>, verdict: Verdict, at: Instant) -> (u32, Why) {
        loop {
            match attempts.after(verdict, at) {
                Next::Answer(why) => return (attempts.current(), why),
                Next::Retry | Next::Resend => {}
            }
        }
    }

    #[test]
    fn a_request_makes_the_routes_attempts_only_when_its_method_and_body_allow() {
        let now = Instant::now();
        let policy = route(generous(2), None, None);
        let cases = [
            (Method::GET, true, 3),
            (Method::POST, true, 1),
            // A body streamed once cannot go again.
            (Method::GET, false, 1),
            (Method::POST, false, 1),
        ];
        for (method, replayable, made) in cases {
            let mut attempts = policy.attempts(&method, replayable, now);
            assert_eq!(
                run(&mut attempts, Verdict::Retry, now),
                (made, Why::AttemptsSpent),
                "{method}, replayable: {replayable}"
            );
        }
        let none = route(None, None, None);
        let mut without = none.attempts(&Method::GET, true, now);
        assert_eq!(
            run(&mut without, Verdict::Retry, now),
            (1, Why::AttemptsSpent)
        );
    }

    #[test]
    fn an_outcome_another_attempt_cannot_change_is_the_answer_at_once() {
        let now = Instant::now();
        let policy = route(generous(5), None, None);
        for verdict in [Verdict::Success, Verdict::Failure, Verdict::CallersFault] {
            let mut attempts = policy.attempts(&Method::GET, true, now);
            assert!(!attempts.is_last());
            assert_eq!(attempts.after(verdict, now), Next::Answer(Why::Final));
            assert_eq!(attempts.current(), 1);
        }
    }

    #[test]
    fn the_last_attempt_is_known_before_it_starts() {
        let now = Instant::now();
        let policy = route(generous(1), None, None);
        let mut attempts = policy.attempts(&Method::GET, true, now);
        assert!(!attempts.is_last());
        assert_eq!(attempts.after(Verdict::Retry, now), Next::Retry);
        // The route's attempts are spent, but a refusal could still be resent.
        assert!(!attempts.is_last());
        assert_eq!(attempts.after(Verdict::Unprocessed, now), Next::Resend);
        assert!(attempts.is_last());
        assert_eq!(
            attempts.after(Verdict::Retry, now),
            Next::Answer(Why::AttemptsSpent)
        );
        let streamed = policy.attempts(&Method::GET, false, now);
        assert!(streamed.is_last(), "a streamed body goes once");
    }

    #[test]
    fn a_request_refused_unprocessed_is_resent_once_outside_the_routes_attempts() {
        let now = Instant::now();
        // Without any retry policy, and for a method never retried.
        let none = route(None, None, None);
        let mut attempts = none.attempts(&Method::POST, true, now);
        assert_eq!(attempts.after(Verdict::Unprocessed, now), Next::Resend);
        assert_eq!(attempts.current(), 2);
        assert_eq!(
            attempts.after(Verdict::Unprocessed, now),
            Next::Answer(Why::AttemptsSpent)
        );
        // Not a body it could not send again.
        let mut streamed = none.attempts(&Method::POST, false, now);
        assert_eq!(
            streamed.after(Verdict::Unprocessed, now),
            Next::Answer(Why::AttemptsSpent)
        );
        // With retries, a resend leaves the route's attempts whole.
        let policy = route(generous(2), None, None);
        let mut attempts = policy.attempts(&Method::GET, true, now);
        assert_eq!(attempts.after(Verdict::Unprocessed, now), Next::Resend);
        assert_eq!(
            run(&mut attempts, Verdict::Retry, now),
            (4, Why::AttemptsSpent)
        );
    }

    #[test]
    fn a_resendable_request_still_stops_at_the_routes_attempts() {
        // Regression: a kept body left a resend in reserve, which once counted as
        // "not the last attempt" and let retries run on until the budget ran dry.
        let now = Instant::now();
        let policy = route(generous(2), None, None);
        let mut attempts = policy.attempts(&Method::GET, true, now);
        assert_eq!(
            run(&mut attempts, Verdict::Retry, now),
            (3, Why::AttemptsSpent)
        );
    }

    #[test]
    fn a_bodiless_request_of_a_method_not_retried_is_only_resent() {
        // Regression: an empty body is kept (so a refusal can be resent), and that once
        // made a bodiless POST retry on 503 on a route that retries only idempotent
        // methods.
        let now = Instant::now();
        let policy = route(generous(2), None, None);
        let mut attempts = policy.attempts(&Method::POST, true, now);
        assert_eq!(
            attempts.after(Verdict::Retry, now),
            Next::Answer(Why::AttemptsSpent)
        );
    }

    #[test]
    fn each_attempt_is_cut_off_by_its_own_timeout_or_the_deadline_whichever_is_first() {
        let start = Instant::now();
        let none = route(generous(5), None, None);
        assert_eq!(
            none.attempts(&Method::GET, true, start).cut_off(start),
            None
        );
        let per_try = route(generous(5), None, Some(150));
        let attempts = per_try.attempts(&Method::GET, true, start);
        assert_eq!(attempts.cut_off(start), Some(start + ms(150)));
        assert_eq!(
            attempts.cut_off(start + ms(1_000)),
            Some(start + ms(1_150)),
            "a later attempt gets its whole own timeout"
        );
        let deadline = route(generous(5), Some(400), None);
        let attempts = deadline.attempts(&Method::GET, true, start);
        assert_eq!(attempts.cut_off(start + ms(300)), Some(start + ms(400)));
        let both = route(generous(5), Some(400), Some(150));
        let attempts = both.attempts(&Method::GET, true, start);
        assert_eq!(attempts.cut_off(start), Some(start + ms(150)));
        assert_eq!(attempts.cut_off(start + ms(150)), Some(start + ms(300)));
        assert_eq!(
            attempts.cut_off(start + ms(300)),
            Some(start + ms(400)),
            "the third attempt ends with the request"
        );
    }

    #[test]
    fn the_deadline_ends_retries_and_resends() {
        let start = Instant::now();
        let policy = route(generous(5), Some(400), Some(150));
        let mut attempts = policy.attempts(&Method::GET, true, start);
        assert_eq!(attempts.after(Verdict::Retry, start + ms(150)), Next::Retry);
        assert_eq!(attempts.after(Verdict::Retry, start + ms(300)), Next::Retry);
        assert_eq!(
            attempts.after(Verdict::Retry, start + ms(400)),
            Next::Answer(Why::DeadlinePassed)
        );
        assert_eq!(attempts.current(), 3);
        let mut refused = policy.attempts(&Method::POST, true, start);
        assert_eq!(
            refused.after(Verdict::Unprocessed, start + ms(400)),
            Next::Answer(Why::DeadlinePassed)
        );
    }

    #[test]
    fn retries_take_room_in_the_budget_and_stop_when_it_has_none() {
        let now = Instant::now();
        // 20 % of traffic and no floor: every fifth request earns one retry.
        let policy = route(Some(retries(3, false, 0.2, 0)), None, None);
        let mut answers = Vec::new();
        for _ in 0..10 {
            let mut attempts = policy.attempts(&Method::GET, true, now);
            answers.push(run(&mut attempts, Verdict::Retry, now));
        }
        let made: Vec<u32> = answers.iter().map(|(made, _)| *made).collect();
        assert_eq!(made, [1, 1, 1, 1, 2, 1, 1, 1, 1, 2]);
        assert!(answers.iter().all(|(_, why)| *why == Why::BudgetSpent));
        // A resend needs no room.
        let mut refused = policy.attempts(&Method::GET, true, now);
        assert_eq!(refused.after(Verdict::Unprocessed, now), Next::Resend);
    }

    #[test]
    fn allows_ratio_of_traffic_plus_floor() {
        let budget = RetryBudget::new(RetryBudgetSpec {
            ratio: 0.2,
            min_per_second: 1,
        });
        let now = Instant::now();
        for _ in 0..100 {
            budget.deposit(now);
        }
        // 20 % of 100 plus 1/s over the 10 s window.
        let granted = (0..1000).filter(|_| budget.withdraw(now)).count();
        assert_eq!(granted, 30);
    }

    #[test]
    fn zero_budget_grants_nothing() {
        let budget = RetryBudget::new(RetryBudgetSpec {
            ratio: 0.0,
            min_per_second: 0,
        });
        let now = Instant::now();
        budget.deposit(now);
        assert!(!budget.withdraw(now));
    }

    #[test]
    fn the_budget_window_slides_over_ten_seconds() {
        let budget = RetryBudget::new(RetryBudgetSpec {
            ratio: 0.5,
            min_per_second: 0,
        });
        let start = Instant::now();
        for _ in 0..10 {
            budget.deposit(start);
        }
        assert_eq!((0..10).filter(|_| budget.withdraw(start)).count(), 5);
        // Nine seconds on, the same window: still spent.
        assert!(!budget.withdraw(start + Duration::from_secs(9)));
        // Ten seconds on, the traffic that earned the room has left the window.
        assert!(!budget.withdraw(start + Duration::from_secs(10)));
        budget.deposit(start + Duration::from_secs(10));
        budget.deposit(start + Duration::from_secs(10));
        assert!(
            budget.withdraw(start + Duration::from_secs(10)),
            "the old retries left the window too"
        );
        assert!(!budget.withdraw(start + Duration::from_secs(10)));
    }
}

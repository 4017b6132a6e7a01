//! Leader election on a `coordination.k8s.io/v1` Lease, with the semantics of client-go's `leaderelection`.
//!
//! Every replica tries to take the Lease `--lease-name` in `--namespace` every retry period. It is free when it does
//! not exist, has no holder (a leader released it), or has expired: this replica has seen it unchanged for longer
//! than its `leaseDurationSeconds`. Writes are a create, or a replace carrying the `resourceVersion` that was read, so two replicas that
//! both see a free Lease cannot both take it: the API server refuses the second with 409 Conflict.
//!
//! The holder renews every retry period. When it has not renewed for the renew deadline (shorter than the lease
//! duration, so it gives up before anyone else may take over), or it sees another holder, it has lost the lease:
//! the reconciler is stopped at once and [`lead_when_elected`] returns [`Error::Lost`], on which the process exits
//! non-zero and Kubernetes restarts it as a follower. On shutdown the leader stops the reconciler, then releases
//! the Lease (no holder, `leaseDurationSeconds: 1`) so a follower takes over at its next attempt instead of waiting
//! for the lease to expire.
//!
//! Expiry is judged as client-go judges it: by when this replica last saw the Lease change, on its own monotonic
//! clock, never by comparing the `renewTime` another node wrote with this node's wall clock. A follower whose clock
//! is ahead of the leader's therefore cannot take a Lease that is still being renewed, and a clock stepped by NTP
//! changes nothing. The cost is that a follower that starts while the leader is already dead waits one full lease
//! duration before it takes over.
//!
//! The leader election crates were weighed for this: kube-lease-manager (the one built for this kube version)
//! compares the remote `renewTime` with the local wall clock and keeps reporting leadership while the API server is
//! unreachable; kube-leader-election and kubert's lease manager also compare wall clocks, and need older kube and
//! k8s-openapi versions, a second copy of each in the build.
//!
//! The decisions are pure functions of the Lease and the elapsed time ([`decide`], [`acquired`], [`renewed`],
//! [`released`]) and are unit-tested without a cluster.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio::sync::oneshot;
use tokio::time::{Instant, sleep, timeout};

use crate::metrics::Metrics;

/// Where the Lease is, who this replica is, and the timing, as on the command line.
#[derive(Clone, Debug)]
pub struct Election {
    pub lease_name: String,
    pub namespace: String,
    pub identity: String,
    /// How long followers wait after the last renewal before taking the Lease over.
    pub lease_duration: Duration,
    /// How long the leader keeps trying to renew before it gives leadership up.
    pub renew_deadline: Duration,
    /// How often followers try to take the Lease and the leader renews it.
    pub retry_period: Duration,
}

impl Election {
    /// Checks the timing the way client-go does: a leader must give up (renew deadline) before its lease expires
    /// for others (lease duration), and must be able to try to renew at least once within the deadline.
    pub fn validate(&self) -> Result<(), String> {
        if self.identity.is_empty() {
            return Err("--identity must not be empty".into());
        }
        if self.lease_duration < Duration::from_secs(1) {
            return Err(format!(
                "--lease-duration {} is shorter than 1s, the Lease's resolution",
                humantime::format_duration(self.lease_duration)
            ));
        }
        if self.renew_deadline >= self.lease_duration {
            return Err(format!(
                "--renew-deadline {} must be shorter than --lease-duration {}: a leader must give up before \
                 others may take over",
                humantime::format_duration(self.renew_deadline),
                humantime::format_duration(self.lease_duration)
            ));
        }
        if self.retry_period.is_zero() || self.retry_period >= self.renew_deadline {
            return Err(format!(
                "--retry-period {} must be positive and shorter than --renew-deadline {}",
                humantime::format_duration(self.retry_period),
                humantime::format_duration(self.renew_deadline)
            ));
        }
        Ok(())
    }

    /// `leaseDurationSeconds`: whole seconds, rounded up.
    fn lease_duration_seconds(&self) -> i32 {
        let seconds =
            self.lease_duration.as_secs() + u64::from(self.lease_duration.subsec_nanos() > 0);
        i32::try_from(seconds).unwrap_or(i32::MAX)
    }
}

/// What a replica should do with the Lease as it is now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// It is ours: renew it.
    Renew,
    /// It is free (no holder, released, or expired): take it.
    Acquire,
    /// Another replica holds it and it has not expired.
    Follow { holder: String },
}

/// Decides from the Lease's spec, this replica's identity and how long this replica has seen that spec unchanged.
pub fn decide(spec: &LeaseSpec, identity: &str, unchanged_for: Duration) -> Decision {
    match spec.holder_identity.as_deref() {
        Some(holder) if holder == identity => Decision::Renew,
        None | Some("") => Decision::Acquire,
        Some(_) if expired(spec, unchanged_for) => Decision::Acquire,
        Some(holder) => Decision::Follow {
            holder: holder.to_string(),
        },
    }
}

/// Whether a Lease seen unchanged for `unchanged_for` (by this replica's clock) has expired: for longer than its
/// `leaseDurationSeconds`. A Lease without a renew time or a duration has expired.
pub fn expired(spec: &LeaseSpec, unchanged_for: Duration) -> bool {
    let (Some(_), Some(seconds)) = (&spec.renew_time, spec.lease_duration_seconds) else {
        return true;
    };
    unchanged_for > Duration::from_secs(u64::try_from(seconds).unwrap_or(0))
}

/// The spec of a Lease `identity` takes over from `previous` (`None`: it does not exist yet). Taking it from
/// anyone else, including from nobody after a release, counts as a transition.
pub fn acquired(
    previous: Option<&LeaseSpec>,
    identity: &str,
    lease_duration_seconds: i32,
    now: Timestamp,
) -> LeaseSpec {
    let transitions = match previous {
        None => 0,
        Some(previous) => {
            let count = previous.lease_transitions.unwrap_or(0);
            if previous.holder_identity.as_deref() == Some(identity) {
                count
            } else {
                count.saturating_add(1)
            }
        }
    };
    LeaseSpec {
        holder_identity: Some(identity.to_string()),
        lease_duration_seconds: Some(lease_duration_seconds),
        acquire_time: Some(MicroTime(now)),
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(transitions),
        ..LeaseSpec::default()
    }
}

/// The spec of a Lease its holder renews: only the renew time (and its own lease duration) change.
pub fn renewed(current: &LeaseSpec, lease_duration_seconds: i32, now: Timestamp) -> LeaseSpec {
    LeaseSpec {
        renew_time: Some(MicroTime(now)),
        lease_duration_seconds: Some(lease_duration_seconds),
        ..current.clone()
    }
}

/// The spec of a Lease its holder gives back: no holder and a one-second duration, as client-go's
/// `ReleaseOnCancel` writes it, so the next replica to look takes it at once. The transitions count is kept.
pub fn released(current: &LeaseSpec, now: Timestamp) -> LeaseSpec {
    LeaseSpec {
        holder_identity: None,
        lease_duration_seconds: Some(1),
        acquire_time: Some(MicroTime(now)),
        renew_time: Some(MicroTime(now)),
        ..current.clone()
    }
}

/// Why leading ended other than by shutdown.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "lost the leader-election lease {namespace}/{lease}: {reason}; stopped reconciling (a restart rejoins as a follower)"
    )]
    Lost {
        namespace: String,
        lease: String,
        reason: String,
    },
    #[error("the reconciler stopped while this replica was the leader{}", .panic.as_deref().map(|p| format!(": {p}")).unwrap_or_default())]
    ReconcilerStopped { panic: Option<String> },
}

/// One try to take or renew the Lease.
#[derive(Debug)]
enum Attempt {
    /// The Lease is ours now (taken or renewed).
    Leading,
    /// Another replica holds it.
    Following { holder: String },
    /// Another replica wrote the Lease between our read and our write; look again next time.
    Conflict,
}

/// Waits to be elected, then runs `lead` until `shutdown` resolves or the Lease is lost.
///
/// `lead` gets a receiver that resolves when the reconciler should stop gracefully (on shutdown); on a lost Lease
/// its task is aborted instead, because another replica may already be reconciling. Returns `Ok` after a shutdown
/// (having released the Lease if it held it), [`Error::Lost`] when the Lease was lost, and
/// [`Error::ReconcilerStopped`] when `lead` ended by itself.
pub async fn lead_when_elected<F, Fut>(
    client: Client,
    election: Election,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
    lead: F,
) -> Result<(), Error>
where
    F: FnOnce(oneshot::Receiver<()>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let api = Api::<Lease>::namespaced(client, &election.namespace);
    let elector = Elector {
        api,
        lease_duration_seconds: election.lease_duration_seconds(),
        election,
        observed: parking_lot::Mutex::new(None),
    };
    tokio::pin!(shutdown);
    metrics.leader.set(0);
    tracing::info!(
        lease = %elector.lease(),
        identity = %elector.election.identity,
        "waiting to be elected leader"
    );

    // Follow until the Lease is ours.
    let mut following: Option<String> = None;
    loop {
        match timeout(
            elector.election.retry_period,
            elector.try_acquire_or_renew(),
        )
        .await
        {
            Ok(Ok(Attempt::Leading)) => break,
            Ok(Ok(Attempt::Following { holder })) => {
                if following.as_deref() != Some(holder.as_str()) {
                    tracing::info!(lease = %elector.lease(), leader = %holder, "following the leader");
                    following = Some(holder);
                }
            }
            Ok(Ok(Attempt::Conflict)) => {}
            Ok(Err(error)) => {
                tracing::warn!(lease = %elector.lease(), %error, "cannot read or take the lease; retrying")
            }
            Err(_) => tracing::warn!(
                lease = %elector.lease(),
                "taking the lease did not finish within the retry period; retrying"
            ),
        }
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            () = sleep(elector.election.retry_period) => {}
        }
    }

    let mut last_renewed = Instant::now();
    metrics.leader.set(1);
    tracing::info!(lease = %elector.lease(), identity = %elector.election.identity, "became the leader; reconciling");
    let (stop, stopped) = oneshot::channel();
    let mut reconciler = tokio::spawn(lead(stopped));

    let ended = loop {
        tokio::select! {
            // Shutdown first: it also ends the watches the reconciler is fed by, so the reconciler
            // then ends too, and a random pick between the two took a clean SIGTERM for a failed
            // reconciler (exit 1, in a run of the leader tests).
            biased;
            () = &mut shutdown => break Ended::Shutdown,
            result = &mut reconciler => break Ended::Reconciler(result),
            () = sleep(elector.election.retry_period) => {}
        }
        let deadline = last_renewed + elector.election.renew_deadline;
        let started = Instant::now();
        match timeout(
            deadline.saturating_duration_since(started),
            elector.try_acquire_or_renew(),
        )
        .await
        {
            Ok(Ok(Attempt::Leading)) => last_renewed = started,
            Ok(Ok(Attempt::Following { holder })) => {
                break Ended::Lost(format!("{holder} holds it now"));
            }
            Ok(Ok(Attempt::Conflict)) => {
                tracing::warn!(lease = %elector.lease(), "the lease changed while renewing it; retrying")
            }
            Ok(Err(error)) => {
                tracing::warn!(lease = %elector.lease(), %error, "renewing the lease failed; retrying")
            }
            Err(_) => {}
        }
        if Instant::now() >= last_renewed + elector.election.renew_deadline {
            break Ended::Lost(format!(
                "could not renew it within the renew deadline of {}",
                humantime::format_duration(elector.election.renew_deadline)
            ));
        }
    };

    match ended {
        Ended::Lost(reason) => {
            // Another replica may be reconciling already: stop at once rather than finish in-flight work.
            reconciler.abort();
            metrics.leader.set(0);
            let error = Error::Lost {
                namespace: elector.election.namespace.clone(),
                lease: elector.election.lease_name.clone(),
                reason,
            };
            tracing::error!(%error, "leadership lost");
            Err(error)
        }
        Ended::Reconciler(result) => {
            metrics.leader.set(0);
            elector.release().await;
            let panic = result.err().map(|e| e.to_string());
            Err(Error::ReconcilerStopped { panic })
        }
        Ended::Shutdown => {
            tracing::info!("stopping the reconciler before releasing the lease");
            let _ = stop.send(());
            // In-flight reconciles may finish only while the lease is still surely ours.
            let grace = (last_renewed + elector.election.renew_deadline)
                .saturating_duration_since(Instant::now());
            if timeout(grace, &mut reconciler).await.is_err() {
                tracing::warn!(
                    "the reconciler did not stop before the lease could expire; aborting it"
                );
                reconciler.abort();
            }
            metrics.leader.set(0);
            elector.release().await;
            Ok(())
        }
    }
}

enum Ended {
    Shutdown,
    Reconciler(Result<(), tokio::task::JoinError>),
    Lost(String),
}

struct Elector {
    api: Api<Lease>,
    election: Election,
    lease_duration_seconds: i32,
    /// The Lease's spec as this replica last saw it change, and when: client-go's observed record and time.
    observed: parking_lot::Mutex<Option<(LeaseSpec, Instant)>>,
}

impl Elector {
    fn lease(&self) -> String {
        format!("{}/{}", self.election.namespace, self.election.lease_name)
    }

    /// Records the spec just read, and returns how long it has been the same, by this replica's clock.
    fn observe(&self, spec: &LeaseSpec) -> Duration {
        let now = Instant::now();
        let mut observed = self.observed.lock();
        match &*observed {
            Some((record, since)) if record == spec => now.saturating_duration_since(*since),
            _ => {
                *observed = Some((spec.clone(), now));
                Duration::ZERO
            }
        }
    }

    /// Reads the Lease and takes or renews it if [`decide`] says so.
    async fn try_acquire_or_renew(&self) -> Result<Attempt, kube::Error> {
        let identity = self.election.identity.as_str();
        let now = Timestamp::now();
        let Some(current) = self.api.get_opt(&self.election.lease_name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.election.lease_name.clone()),
                    namespace: Some(self.election.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(acquired(None, identity, self.lease_duration_seconds, now)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Attempt::Leading),
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(Attempt::Conflict),
                Err(error) => Err(error),
            };
        };
        let spec = current.spec.clone().unwrap_or_default();
        let desired = match decide(&spec, identity, self.observe(&spec)) {
            Decision::Follow { holder } => return Ok(Attempt::Following { holder }),
            Decision::Renew => renewed(&spec, self.lease_duration_seconds, now),
            Decision::Acquire => acquired(Some(&spec), identity, self.lease_duration_seconds, now),
        };
        self.replace(current, desired).await
    }

    /// Replaces the Lease's spec, conditional on the resource version that was read.
    async fn replace(&self, current: Lease, spec: LeaseSpec) -> Result<Attempt, kube::Error> {
        let lease = Lease {
            spec: Some(spec),
            ..current
        };
        match self
            .api
            .replace(&self.election.lease_name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(Attempt::Leading),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(Attempt::Conflict),
            Err(error) => Err(error),
        }
    }

    /// Gives the Lease back if it is still ours. Failing only delays the next leader until the lease expires, so
    /// it is logged, not returned.
    async fn release(&self) {
        let attempt = async {
            let Some(current) = self.api.get_opt(&self.election.lease_name).await? else {
                return Ok(false);
            };
            let spec = current.spec.clone().unwrap_or_default();
            if spec.holder_identity.as_deref() != Some(self.election.identity.as_str()) {
                return Ok(false);
            }
            let released = released(&spec, Timestamp::now());
            Ok::<_, kube::Error>(matches!(
                self.replace(current, released).await?,
                Attempt::Leading
            ))
        };
        match timeout(self.election.renew_deadline, attempt).await {
            Ok(Ok(true)) => tracing::info!(lease = %self.lease(), "released the lease"),
            Ok(Ok(false)) => {
                tracing::info!(lease = %self.lease(), "the lease was no longer ours to release")
            }
            Ok(Err(error)) => tracing::warn!(
                lease = %self.lease(), %error,
                "releasing the lease failed; the next leader waits until it expires"
            ),
            Err(_) => tracing::warn!(
                lease = %self.lease(),
                "releasing the lease timed out; the next leader waits until it expires"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + second).expect("valid timestamp")
    }

    fn held_by(holder: &str, renewed_at: i64, duration: i32, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(duration),
            acquire_time: Some(MicroTime(at(0))),
            renew_time: Some(MicroTime(at(renewed_at))),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    fn election(lease: u64, renew: u64, retry_ms: u64) -> Election {
        Election {
            lease_name: "tally-operator".into(),
            namespace: "tally-system".into(),
            identity: "a".into(),
            lease_duration: Duration::from_secs(lease),
            renew_deadline: Duration::from_secs(renew),
            retry_period: Duration::from_millis(retry_ms),
        }
    }

    fn secs(seconds: u64) -> Duration {
        Duration::from_secs(seconds)
    }

    #[test]
    fn a_lease_held_by_another_is_followed_until_it_expires() {
        let spec = held_by("b", 10, 15, 3);
        let follow = Decision::Follow { holder: "b".into() };
        assert_eq!(decide(&spec, "a", secs(0)), follow);
        // Seen unchanged for exactly leaseDurationSeconds, it is still valid.
        assert_eq!(decide(&spec, "a", secs(15)), follow);
        assert_eq!(
            decide(&spec, "a", secs(15) + Duration::from_millis(1)),
            Decision::Acquire
        );
    }

    #[test]
    fn expiry_ignores_the_renew_time_written_by_another_clock() {
        // Renewed "an hour ago" by a leader whose clock is behind, but just seen to change: still valid.
        let spec = held_by("b", -3600, 15, 3);
        assert_eq!(
            decide(&spec, "a", secs(1)),
            Decision::Follow { holder: "b".into() }
        );
        // Renewed "in the future" by a leader whose clock is ahead, and then unchanged for longer than the
        // lease duration: expired.
        let spec = held_by("b", 3600, 15, 3);
        assert_eq!(decide(&spec, "a", secs(16)), Decision::Acquire);
    }

    #[test]
    fn our_own_lease_is_renewed_even_when_expired() {
        assert_eq!(
            decide(&held_by("a", 10, 15, 0), "a", secs(1)),
            Decision::Renew
        );
        assert_eq!(
            decide(&held_by("a", 10, 15, 0), "a", secs(89)),
            Decision::Renew
        );
    }

    #[test]
    fn a_released_or_incomplete_lease_is_free() {
        let released = released(&held_by("b", 10, 15, 2), at(11));
        assert_eq!(decide(&released, "a", secs(0)), Decision::Acquire);
        let empty_holder = LeaseSpec {
            holder_identity: Some(String::new()),
            ..held_by("b", 10, 15, 0)
        };
        assert_eq!(decide(&empty_holder, "a", secs(1)), Decision::Acquire);
        let no_renew_time = LeaseSpec {
            renew_time: None,
            ..held_by("b", 10, 15, 0)
        };
        assert_eq!(decide(&no_renew_time, "a", secs(1)), Decision::Acquire);
    }

    #[test]
    fn taking_over_counts_a_transition_and_creating_does_not() {
        let created = acquired(None, "a", 15, at(5));
        assert_eq!(created.holder_identity.as_deref(), Some("a"));
        assert_eq!(created.lease_transitions, Some(0));
        assert_eq!(created.lease_duration_seconds, Some(15));
        assert_eq!(created.renew_time, Some(MicroTime(at(5))));
        assert_eq!(created.acquire_time, Some(MicroTime(at(5))));

        let taken = acquired(Some(&held_by("b", 10, 15, 3)), "a", 15, at(30));
        assert_eq!(taken.holder_identity.as_deref(), Some("a"));
        assert_eq!(taken.lease_transitions, Some(4));
        assert_eq!(taken.acquire_time, Some(MicroTime(at(30))));

        // A release by the previous leader is followed by a takeover: still a transition.
        let after_release = acquired(
            Some(&released(&held_by("b", 10, 15, 3), at(12))),
            "a",
            15,
            at(13),
        );
        assert_eq!(after_release.lease_transitions, Some(4));

        // Re-taking our own expired lease (a restart with the same identity) is not a transition.
        let again = acquired(Some(&held_by("a", 10, 15, 3)), "a", 15, at(40));
        assert_eq!(again.lease_transitions, Some(3));
    }

    #[test]
    fn renewing_changes_only_the_renew_time() {
        let spec = held_by("a", 10, 15, 2);
        let renewed = renewed(&spec, 15, at(12));
        assert_eq!(
            renewed,
            LeaseSpec {
                renew_time: Some(MicroTime(at(12))),
                ..spec
            }
        );
    }

    #[test]
    fn releasing_clears_the_holder_and_keeps_the_transitions() {
        let released = released(&held_by("a", 10, 15, 2), at(12));
        assert_eq!(released.holder_identity, None);
        assert_eq!(released.lease_duration_seconds, Some(1));
        assert_eq!(released.lease_transitions, Some(2));
        assert_eq!(released.renew_time, Some(MicroTime(at(12))));
    }

    #[test]
    fn timings_must_let_the_leader_give_up_before_the_lease_expires() {
        assert_eq!(election(15, 10, 2000).validate(), Ok(()));
        assert_eq!(election(3, 2, 500).validate(), Ok(()));
        let error = election(10, 10, 2000)
            .validate()
            .expect_err("deadline = duration");
        assert!(
            error.contains("--renew-deadline 10s must be shorter than --lease-duration 10s"),
            "{error}"
        );
        let error = election(15, 10, 10_000)
            .validate()
            .expect_err("retry = deadline");
        assert!(error.contains("--retry-period 10s"), "{error}");
        assert!(election(15, 10, 0).validate().is_err());
        let error = Election {
            lease_duration: Duration::from_millis(900),
            renew_deadline: Duration::from_millis(500),
            ..election(1, 1, 100)
        }
        .validate()
        .expect_err("sub-second lease");
        assert!(error.contains("shorter than 1s"), "{error}");
    }

    #[test]
    fn lease_duration_seconds_round_up() {
        let mut election = election(15, 10, 2000);
        assert_eq!(election.lease_duration_seconds(), 15);
        election.lease_duration = Duration::from_millis(2500);
        assert_eq!(election.lease_duration_seconds(), 3);
    }
}

//! Harness of tally-sidecar's integration tests.
//!
//! Everything a test touches is real except the upstream: the `tally-sidecar` binary runs as a
//! separate process with its RocksDB buffer on disk ([`Sidecar`]), it is killed with real signals,
//! clients speak HTTP over loopback (and the real OpenMeter and CloudEvents Python SDKs, see
//! [`python`]). The upstream it forwards to is [`TestUpstream`], a fake of OpenMeter's ingest API:
//! this machine has no internet access, and a fake is what lets a test make the upstream fail on
//! command. The other outputs' endpoints are real too: a private PostgreSQL server from Debian's
//! packages ([`TestPostgres`]) and a webhook receiver written independently in Python that
//! verifies every HMAC signature itself ([`WebhookReceiver`]). The other simulation is the power
//! cut, since a machine cannot lose power on command: the real sidecar keeps its buffer on a FUSE
//! filesystem that drops everything not fsynced when told to ([`PowerCutFs`]).
//!
//! Every wait polls with a deadline ([`poll_until`]); no test synchronises with a fixed sleep.

pub mod binary;
pub mod checkout;
pub mod disk;
pub mod events;
pub mod metrics;
pub mod pod;
pub mod poll;
pub mod ports;
pub mod postgres;
pub mod powercut;
pub mod problem;
pub mod python;
pub mod report;
pub mod senders;
pub mod sidecar;
pub mod upstream;
pub mod webhook;

pub use checkout::workspace_root;
pub use events::{EventIds, event, event_from};
pub use poll::{poll, poll_for, poll_until, poll_until_every, poll_until_ok};
pub use postgres::TestPostgres;
pub use powercut::{PowerCutFs, TempMount};
pub use problem::assert_problem;
pub use sidecar::{CliOutput, Sidecar, SidecarBuilder};
pub use upstream::{Behaviour, ReceivedRequest, RetryAfter, TestUpstream};
pub use webhook::{WebhookReceiver, WebhookRequest};

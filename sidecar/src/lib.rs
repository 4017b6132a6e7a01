//! tally-sidecar: accepts usage events on an OpenMeter-compatible HTTP API, stores them durably
//! in an embedded RocksDB buffer before answering, and forwards them to its outputs with
//! batching, retries, backoff, dedup and a dead-letter store.

pub mod buffer;
pub mod cli;
pub mod collector;
pub mod config;
pub mod event;
pub mod forward;
pub mod listener;
pub mod metrics;
pub mod output;
pub mod server;

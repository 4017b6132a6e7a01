//! tally-operator: reconciles `MeteringCollector` resources into collector StatefulSets.
//!
//! The reconcile is a pipeline of small modules: [`validate`], [`build`] and [`drain`]'s plan are pure, [`reconcile`] applies what
//! they produce and writes the [`status`].

pub mod apply;
pub mod build;
pub mod caches;
pub mod crd;
pub mod drain;
pub mod inject;
pub mod leader;
pub mod metrics;
pub mod node_agent;
pub mod reconcile;
pub mod status;
pub mod storage;
pub mod validate;

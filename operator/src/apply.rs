//! The apply stage: writes a collector's children and removes the ones its spec no longer asks for.
//!
//! Every write is a server-side apply with the one field manager [`FIELD_MANAGER`], forced, so applying what is
//! already there writes nothing. Children are found for removal by label (every child carries
//! [`build::labels`]) and must also name the collector as their owner; drain Jobs and buffer claims are not
//! children in this sense: the drain stage decides about them.

use std::collections::BTreeSet;
use std::fmt::Debug;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::{DaemonSet, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::build::{self, CollectorObjects};
use crate::crd::{FIELD_MANAGER, MeteringCollector};
use crate::reconcile::Error;

/// What the API server returned for the children whose state the status reports.
pub struct Applied {
    pub stateful_set: StatefulSet,
    /// The node agent's DaemonSet, when `spec.nodeAgent` asks for one.
    pub node_agent: Option<DaemonSet>,
}

/// Applies every child, the StatefulSet last (its pods need the ConfigMap), then deletes the children of this
/// collector that `objects` no longer holds.
pub async fn apply_children(
    client: &Client,
    collector: &MeteringCollector,
    namespace: &str,
    objects: &CollectorObjects,
) -> Result<Applied, Error> {
    apply(client, namespace, &objects.config_map).await?;
    apply(client, namespace, &objects.service).await?;
    apply(client, namespace, &objects.headless_service).await?;
    apply(client, namespace, &objects.pod_disruption_budget).await?;
    let node_agent = match &objects.node_agent {
        Some(agent) => {
            apply(client, namespace, &agent.service).await?;
            Some(apply(client, namespace, &agent.daemon_set).await?)
        }
        None => None,
    };
    let stateful_set = apply(client, namespace, &objects.stateful_set).await?;

    let mut services = BTreeSet::from([name(&objects.service), name(&objects.headless_service)]);
    let mut daemon_sets = BTreeSet::new();
    if let Some(agent) = &objects.node_agent {
        services.insert(name(&agent.service));
        daemon_sets.insert(name(&agent.daemon_set));
    }
    // The labels every child carries.
    let selector = build::label_selector(&build::labels(collector));
    // Workloads first, so a removed agent's pods stop before its Service goes.
    delete_orphans::<DaemonSet>(client, collector, namespace, &selector, &daemon_sets).await?;
    delete_orphans::<StatefulSet>(
        client,
        collector,
        namespace,
        &selector,
        &BTreeSet::from([name(&objects.stateful_set)]),
    )
    .await?;
    delete_orphans::<Service>(client, collector, namespace, &selector, &services).await?;
    delete_orphans::<ConfigMap>(
        client,
        collector,
        namespace,
        &selector,
        &BTreeSet::from([name(&objects.config_map)]),
    )
    .await?;
    delete_orphans::<PodDisruptionBudget>(
        client,
        collector,
        namespace,
        &selector,
        &BTreeSet::from([name(&objects.pod_disruption_budget)]),
    )
    .await?;
    Ok(Applied {
        stateful_set,
        node_agent,
    })
}

/// Server-side apply of one object, forced, with the operator's field manager.
pub async fn apply<K>(client: &Client, namespace: &str, object: &K) -> Result<K, Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + k8s_openapi::Resource
        + Clone
        + Serialize
        + DeserializeOwned
        + Debug,
{
    let name = name(object);
    Api::<K>::namespaced(client.clone(), namespace)
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(object),
        )
        .await
        .map_err(|source| Error::Apply {
            kind: <K as k8s_openapi::Resource>::KIND,
            name,
            source,
        })
}

/// The result of a delete, where an object that is already gone counts as deleted.
pub fn deleted<T>(result: Result<T, kube::Error>) -> Result<(), kube::Error> {
    match result {
        Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
        other => other.map(|_| ()),
    }
}

fn name<K: Resource>(object: &K) -> String {
    object.meta().name.clone().unwrap_or_default()
}

/// Deletes the objects of kind `K` that carry the collector's labels and name it as owner, but are not in `keep`.
async fn delete_orphans<K>(
    client: &Client,
    collector: &MeteringCollector,
    namespace: &str,
    selector: &str,
    keep: &BTreeSet<String>,
) -> Result<(), Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + k8s_openapi::Resource
        + Clone
        + DeserializeOwned
        + Debug,
{
    let api = Api::<K>::namespaced(client.clone(), namespace);
    let failed = |name: String| {
        move |source| Error::Apply {
            kind: <K as k8s_openapi::Resource>::KIND,
            name,
            source,
        }
    };
    let listed = api
        .list_metadata(&ListParams::default().labels(selector))
        .await
        .map_err(failed(format!("({selector})")))?;
    for object in listed.items {
        let name = object.name_any();
        let ours = object
            .owner_references()
            .iter()
            .any(|owner| Some(&owner.uid) == collector.metadata.uid.as_ref());
        if !ours || keep.contains(&name) || object.metadata.deletion_timestamp.is_some() {
            continue;
        }
        deleted(api.delete(&name, &DeleteParams::background()).await)
            .map_err(failed(name.clone()))?;
        tracing::info!(
            collector = %format!("{namespace}/{}", collector.name_any()),
            kind = <K as k8s_openapi::Resource>::KIND,
            %name,
            "deleted a child the spec no longer asks for"
        );
    }
    Ok(())
}

//! The apply stage: writes a collector's children and removes the ones its spec no longer asks for.
//!
//! Every write is a server-side apply with the one field manager [`FIELD_MANAGER`], forced, so applying what is
//! already there writes nothing. Children are found for removal in the watch caches ([`ChildStores`]), by label
//! (every child carries [`build::labels`]) and owner: they must also name the collector as their owner. A cache
//! that lags behind only delays a removal: the child's own watch event wakes its owner again. Drain Jobs and buffer
//! claims are not children in this sense: the drain stage decides about them.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::{DaemonSet, StatefulSet};
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::reflector::Store;
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::build::{self, CollectorObjects};
use crate::caches::{Child, ChildStores};
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
    children: &ChildStores,
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
    let ours = Ours {
        labels: build::labels(collector),
        owner: collector.metadata.uid.as_deref().unwrap_or_default(),
        namespace,
        collector: collector.name_any(),
    };
    // Workloads first, so a removed agent's pods stop before its Service goes.
    delete_orphans(client, &children.daemon_sets, &ours, &daemon_sets).await?;
    let stateful_set_name = BTreeSet::from([name(&objects.stateful_set)]);
    delete_orphans(client, &children.stateful_sets, &ours, &stateful_set_name).await?;
    delete_orphans(client, &children.services, &ours, &services).await?;
    let config_map = BTreeSet::from([name(&objects.config_map)]);
    delete_orphans(client, &children.config_maps, &ours, &config_map).await?;
    let budget = BTreeSet::from([name(&objects.pod_disruption_budget)]);
    delete_orphans(client, &children.pod_disruption_budgets, &ours, &budget).await?;
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

/// Whose children an orphan sweep looks for.
struct Ours<'a> {
    /// The labels every child of the collector carries.
    labels: BTreeMap<String, String>,
    /// The collector's uid, which its children name as owner.
    owner: &'a str,
    namespace: &'a str,
    collector: String,
}

impl Ours<'_> {
    fn owns<K: Resource>(&self, child: &Child<K>) -> bool {
        child.metadata.namespace.as_deref() == Some(self.namespace)
            && !self.owner.is_empty()
            && child
                .owner_references()
                .iter()
                .any(|owner| owner.uid == self.owner)
            && self
                .labels
                .iter()
                .all(|(key, value)| child.labels().get(key) == Some(value))
    }
}

/// Deletes the cached objects of kind `K` that carry the collector's labels and name it as owner, but are not in
/// `keep` (nor already being deleted).
async fn delete_orphans<K>(
    client: &Client,
    store: &Store<Child<K>>,
    ours: &Ours<'_>,
    keep: &BTreeSet<String>,
) -> Result<(), Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + k8s_openapi::Resource
        + Clone
        + DeserializeOwned
        + Debug,
{
    let orphans = store.state_filter(|child| {
        ours.owns(child)
            && child.metadata.deletion_timestamp.is_none()
            && !keep.contains(child.metadata.name.as_deref().unwrap_or_default())
    });
    let api = Api::<K>::namespaced(client.clone(), ours.namespace);
    for orphan in orphans {
        let name = orphan.name_any();
        deleted(api.delete(&name, &DeleteParams::background()).await).map_err(|source| {
            Error::Apply {
                kind: <K as k8s_openapi::Resource>::KIND,
                name: name.clone(),
                source,
            }
        })?;
        tracing::info!(
            collector = %format!("{}/{}", ours.namespace, ours.collector),
            kind = <K as k8s_openapi::Resource>::KIND,
            %name,
            "deleted a child the spec no longer asks for"
        );
    }
    Ok(())
}

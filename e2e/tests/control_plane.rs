//! The control plane is real: objects created through the API server are acted on by the real controllers.

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::api::{
    apps::v1::{Deployment, ReplicaSet, StatefulSet},
    core::v1::{Namespace, PersistentVolumeClaim, Pod},
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, ListParams, PostParams},
};
use serde_json::json;
use tally_e2e::{ControlPlane, NAMESPACE_LABEL};
use tally_tests::poll::{API_INTERVAL, poll_until_every};

/// Generous for two busy cores; a working controller acts within a second or two.
const CONTROLLERS_ACT_WITHIN: Duration = Duration::from_secs(60);

#[tokio::test]
async fn deployment_gets_replicaset_and_pods_and_deleting_it_collects_them() {
    let control_plane = ControlPlane::start().await.expect("control plane starts");
    let client = control_plane.client();
    let ns = control_plane
        .new_namespace("deployment")
        .await
        .expect("namespace");

    let namespace = Api::<Namespace>::all(client.clone())
        .get(&ns)
        .await
        .expect("namespace exists");
    assert_eq!(
        namespace.labels().get(NAMESPACE_LABEL).map(String::as_str),
        Some("true")
    );

    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": { "name": "web" },
        "spec": {
            "replicas": 2,
            "selector": { "matchLabels": { "app": "web" } },
            "template": {
                "metadata": { "labels": { "app": "web" } },
                "spec": { "containers": [{ "name": "web", "image": "registry.invalid/web:1" }] }
            }
        }
    }))
    .expect("valid Deployment");
    let deployment = deployments
        .create(&PostParams::default(), &deployment)
        .await
        .expect("Deployment created");
    let deployment_uid = deployment.uid().expect("uid");

    let (replica_set, pods) = poll_until_every(
        CONTROLLERS_ACT_WITHIN,
        API_INTERVAL,
        "the ReplicaSet controller creates a ReplicaSet and 2 Pods",
        || async {
            let replica_sets = list::<ReplicaSet>(&client, &ns).await;
            let [replica_set] = replica_sets.as_slice() else {
                return None;
            };
            if !owned_by(replica_set, &deployment_uid) {
                return None;
            }
            let rs_uid = replica_set.uid()?;
            let pods: Vec<Pod> = list::<Pod>(&client, &ns)
                .await
                .into_iter()
                .filter(|p| owned_by(p, &rs_uid))
                .collect();
            (pods.len() == 2).then(|| (replica_set.clone(), pods))
        },
    )
    .await;
    assert_eq!(replica_set.spec.replicas, Some(2));
    for pod in &pods {
        assert_eq!(pod.labels().get("app").map(String::as_str), Some("web"));
        let containers = &pod.spec.as_ref().expect("pod spec").containers;
        assert_eq!(
            containers[0].image.as_deref(),
            Some("registry.invalid/web:1")
        );
    }

    deployments
        .delete("web", &DeleteParams::background())
        .await
        .expect("Deployment deleted");
    poll_until_every(
        CONTROLLERS_ACT_WITHIN,
        API_INTERVAL,
        "the garbage collector deletes the ReplicaSet and its Pods",
        || async {
            let replica_sets = list::<ReplicaSet>(&client, &ns).await;
            let pods = list::<Pod>(&client, &ns).await;
            (replica_sets.is_empty() && pods.is_empty()).then_some(())
        },
    )
    .await;

    control_plane.stop();
}

#[tokio::test]
async fn statefulset_gets_pods_and_persistent_volume_claims() {
    let control_plane = ControlPlane::start().await.expect("control plane starts");
    let client = control_plane.client();
    let ns = control_plane
        .new_namespace("statefulset")
        .await
        .expect("namespace");

    let stateful_set: StatefulSet = serde_json::from_value(json!({
        "metadata": { "name": "store" },
        "spec": {
            "replicas": 2,
            "serviceName": "store",
            // Parallel: OrderedReady would wait for store-0 to become Ready, which needs a kubelet.
            "podManagementPolicy": "Parallel",
            "selector": { "matchLabels": { "app": "store" } },
            "template": {
                "metadata": { "labels": { "app": "store" } },
                "spec": { "containers": [{
                    "name": "store",
                    "image": "registry.invalid/store:1",
                    "volumeMounts": [{ "name": "data", "mountPath": "/data" }]
                }] }
            },
            "volumeClaimTemplates": [{
                "metadata": { "name": "data" },
                "spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "resources": { "requests": { "storage": "1Gi" } }
                }
            }]
        }
    }))
    .expect("valid StatefulSet");
    let stateful_set = Api::<StatefulSet>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &stateful_set)
        .await
        .expect("StatefulSet created");
    let uid = stateful_set.uid().expect("uid");

    let pods = poll_until_every(
        CONTROLLERS_ACT_WITHIN,
        API_INTERVAL,
        "the StatefulSet controller creates store-0 and store-1",
        || async {
            let pods: Vec<Pod> = list::<Pod>(&client, &ns)
                .await
                .into_iter()
                .filter(|p| owned_by(p, &uid))
                .collect();
            (pods.len() == 2).then_some(pods)
        },
    )
    .await;
    let claims_by_pod: BTreeMap<String, Vec<String>> = pods
        .iter()
        .map(|pod| {
            let volumes = pod
                .spec
                .as_ref()
                .and_then(|s| s.volumes.as_ref())
                .expect("pod volumes");
            let claims = volumes
                .iter()
                .filter_map(|v| v.persistent_volume_claim.as_ref())
                .map(|c| c.claim_name.clone())
                .collect();
            (pod.name_any(), claims)
        })
        .collect();
    assert_eq!(
        claims_by_pod,
        BTreeMap::from([
            ("store-0".to_string(), vec!["data-store-0".to_string()]),
            ("store-1".to_string(), vec!["data-store-1".to_string()]),
        ])
    );

    let claims = poll_until_every(
        CONTROLLERS_ACT_WITHIN,
        API_INTERVAL,
        "the StatefulSet controller creates data-store-0 and data-store-1",
        || async {
            let mut names: Vec<String> = list::<PersistentVolumeClaim>(&client, &ns)
                .await
                .iter()
                .map(|c| c.name_any())
                .collect();
            names.sort();
            (names.len() == 2).then_some(names)
        },
    )
    .await;
    assert_eq!(claims, ["data-store-0", "data-store-1"]);

    control_plane.stop();
}

async fn list<K>(client: &Client, namespace: &str) -> Vec<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    Api::<K>::namespaced(client.clone(), namespace)
        .list(&ListParams::default())
        .await
        .expect("list")
        .items
}

fn owned_by<K: Resource>(object: &K, owner_uid: &str) -> bool {
    object
        .meta()
        .owner_references
        .iter()
        .flatten()
        .any(|r| r.uid == owner_uid && r.controller == Some(true))
}

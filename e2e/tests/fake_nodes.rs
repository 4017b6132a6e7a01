//! Fake nodes: with `with_fake_nodes`, the real kube-scheduler binds pods to Nodes that kwok manages, and kwok
//! marks them Running and Ready, so a Deployment reports its replicas available without any container running.

use std::time::Duration;

use k8s_openapi::api::{apps::v1::Deployment, core::v1::Node, core::v1::Pod};
use kube::{
    Api, ResourceExt,
    api::{ListParams, PostParams},
};
use serde_json::json;
use tally_e2e::{ControlPlane, FAKE_NODE_ANNOTATION};
use tally_tests::poll::{API_INTERVAL, poll};

/// Generous for two busy cores; scheduling and kwok act within a second or two.
const WITHIN: Duration = Duration::from_secs(60);

#[tokio::test]
async fn pods_are_scheduled_onto_fake_nodes_and_become_ready() {
    let control_plane = ControlPlane::builder()
        .with_fake_nodes(2)
        .start()
        .await
        .expect("control plane with fake nodes starts");
    let client = control_plane.client();

    // The nodes exist, are kwok's, and are Ready as soon as start() returns.
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .expect("nodes")
        .items;
    let mut names: Vec<String> = nodes.iter().map(|n| n.name_any()).collect();
    names.sort();
    assert_eq!(names, ["kwok-node-0", "kwok-node-1"]);
    for node in &nodes {
        assert_eq!(
            node.annotations()
                .get(FAKE_NODE_ANNOTATION)
                .map(String::as_str),
            Some("fake")
        );
    }

    let ns = control_plane
        .new_namespace("fake-nodes")
        .await
        .expect("namespace");
    let deployment: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": { "name": "web" },
        "spec": {
            "replicas": 3,
            "selector": { "matchLabels": { "app": "web" } },
            "template": {
                "metadata": { "labels": { "app": "web" } },
                "spec": { "containers": [{ "name": "web", "image": "registry.invalid/web:1" }] }
            }
        }
    }))
    .expect("deployment");
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);
    deployments
        .create(&PostParams::default(), &deployment)
        .await
        .expect("deployment created");

    let available = poll(WITHIN, API_INTERVAL, async || {
        let available = deployments
            .get_status("web")
            .await
            .ok()
            .and_then(|d| d.status?.available_replicas)
            .unwrap_or(0);
        if available == 3 {
            Ok(())
        } else {
            Err(available)
        }
    })
    .await;
    if let Err(available) = available {
        panic!("timed out after {WITHIN:?}: {available} of 3 replicas of web available");
    }
    let pods = Api::<Pod>::namespaced(client.clone(), &ns)
        .list(&ListParams::default())
        .await
        .expect("pods")
        .items;
    assert_eq!(pods.len(), 3);
    for pod in &pods {
        let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
        assert!(
            node.is_some_and(|n| n.starts_with("kwok-node-")),
            "{} is on {node:?}",
            pod.name_any()
        );
        let status = pod.status.as_ref().expect("status");
        assert_eq!(
            status.phase.as_deref(),
            Some("Running"),
            "{}",
            pod.name_any()
        );
        assert!(
            status.pod_ip.is_some(),
            "kwok gives {} an IP",
            pod.name_any()
        );
    }
    control_plane.stop();
}

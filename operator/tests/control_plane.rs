//! The operator against a real control plane (tally-e2e): the CRD installs, the API server enforces its CEL rules,
//! the operator creates every child, the real StatefulSet controller makes pods and claims from them, a pipeline
//! change rolls the pod template, an unchanged collector causes no writes, and the real garbage collector removes
//! the children with the collector.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use support::{
    RunningController, assert_invalid, collector, context, control_plane_with_crd, create,
    eventually,
};
use tally_operator::build::{CONFIG_HASH_ANNOTATION, config_hash};
use tally_operator::crd::MeteringCollector;
use tally_operator::reconcile;

const COLLECTOR: &str = r#"
apiVersion: metering.tally.dev/v1alpha1
kind: MeteringCollector
metadata:
  name: meter
spec:
  replicas: 2
  image: registry.invalid/tally-sidecar:1
  storage: { size: 2Gi }
  pipeline:
    dedup: { window: 24h }
    outputs:
      targets:
        - name: openmeter
          type: openmeter
          url: https://openmeter.invalid
          tokenFrom: { file: /var/run/secrets/tally/openmeter/token }
"#;

#[tokio::test]
async fn the_api_server_rejects_invalid_collectors_with_the_cel_message() {
    let (control_plane, client, ns) = control_plane_with_crd("invalid").await;
    let api = Api::<MeteringCollector>::namespaced(client.clone(), &ns);
    // The first valid create also proves the type is served before the rejections are checked.
    create(&api, &collector(COLLECTOR)).await;

    let cases = [
        (
            COLLECTOR.replace("replicas: 2", "replicas: 0").replace("name: meter", "name: zero"),
            "replicas must be at least 1",
        ),
        (
            COLLECTOR.replace("name: meter", "name: twice").replace(
                "          tokenFrom: { file: /var/run/secrets/tally/openmeter/token }\n",
                "          tokenFrom: { file: /var/run/secrets/tally/openmeter/token }\n        - { name: openmeter, type: stdout }\n",
            ),
            "output names in pipeline.outputs.targets must be unique",
        ),
        (
            COLLECTOR
                .replace("name: meter", "name: both")
                .replace("tokenFrom: { file:", "tokenFrom: { env: TOKEN, file:"),
            "set exactly one of `env` or `file`",
        ),
        (
            COLLECTOR.replace("name: meter", "name: window").replace("window: 24h", "window: soon"),
            "spec.pipeline.dedup.window",
        ),
    ];
    for (yaml, message) in cases {
        // Untyped: the Rust type would refuse most of these before the API server sees them.
        let object: serde_json::Value = serde_yaml::from_str(&yaml).expect("YAML");
        let name = object["metadata"]["name"]
            .as_str()
            .expect("name")
            .to_string();
        let error = api
            .patch(
                &name,
                &PatchParams::apply("tally-e2e"),
                &Patch::Apply(&object),
            )
            .await
            .expect_err(message);
        assert_invalid(error, message);
    }
    control_plane.stop();
}

#[tokio::test]
async fn a_collector_becomes_a_statefulset_with_pods_claims_and_rolls_on_pipeline_changes() {
    let (control_plane, client, ns) = control_plane_with_crd("collector").await;
    let collectors = Api::<MeteringCollector>::namespaced(client.clone(), &ns);
    let created = create(&collectors, &collector(COLLECTOR)).await;
    let uid = created.uid().expect("uid");

    let controller = RunningController::start(&client);

    // Every child, owned by the collector.
    let config_maps = Api::<ConfigMap>::namespaced(client.clone(), &ns);
    let services = Api::<Service>::namespaced(client.clone(), &ns);
    let budgets = Api::<PodDisruptionBudget>::namespaced(client.clone(), &ns);
    let stateful_sets = Api::<StatefulSet>::namespaced(client.clone(), &ns);
    let stateful_set = eventually("the operator creates the StatefulSet", || async {
        stateful_sets.get("meter").await.ok()
    })
    .await;
    let config_map = config_maps.get("meter-config").await.expect("ConfigMap");
    let service = services.get("meter").await.expect("Service");
    let headless = services
        .get("meter-headless")
        .await
        .expect("headless Service");
    let budget = budgets.get("meter").await.expect("PodDisruptionBudget");
    for meta in [
        config_map.meta(),
        service.meta(),
        headless.meta(),
        budget.meta(),
        stateful_set.meta(),
    ] {
        assert!(
            controlled_by(meta, &uid),
            "{:?} is not owned by the collector",
            meta.name
        );
        assert_eq!(
            meta.labels
                .as_ref()
                .and_then(|l| l.get("app.kubernetes.io/managed-by"))
                .map(String::as_str),
            Some("tally-operator")
        );
        let managers: Vec<_> = meta
            .managed_fields
            .iter()
            .flatten()
            .filter(|f| f.operation.as_deref() == Some("Apply"))
            .filter_map(|f| f.manager.clone())
            .collect();
        assert_eq!(managers, ["tally-operator"], "{:?}", meta.name);
    }
    assert_eq!(
        headless.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()),
        Some("None")
    );
    let rendered = config_map.data.as_ref().expect("data")["config.yaml"].clone();
    assert_eq!(template_hash(&stateful_set), Some(config_hash(&rendered)));

    // The real StatefulSet controller makes pods and claims from the template.
    let pods = eventually(
        "the StatefulSet controller creates meter-0 and meter-1",
        || async {
            let pods = list::<Pod>(&client, &ns).await;
            (pods.len() == 2).then_some(pods)
        },
    )
    .await;
    let mut claims_by_pod = BTreeMap::new();
    for pod in &pods {
        let spec = pod.spec.as_ref().expect("pod spec");
        let containers: Vec<_> = spec.containers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(containers, ["collector"]);
        assert_eq!(
            spec.containers[0].image.as_deref(),
            Some("registry.invalid/tally-sidecar:1")
        );
        let volumes = spec.volumes.as_ref().expect("volumes");
        let claim = volumes
            .iter()
            .find(|v| v.name == "buffer")
            .and_then(|v| v.persistent_volume_claim.as_ref())
            .map(|c| c.claim_name.clone());
        claims_by_pod.insert(pod.name_any(), claim);
        let config = volumes
            .iter()
            .find(|v| v.name == "config")
            .and_then(|v| v.config_map.as_ref());
        assert_eq!(config.map(|c| c.name.as_str()), Some("meter-config"));
        let secret = volumes
            .iter()
            .find(|v| v.name == "secret-openmeter")
            .and_then(|v| v.secret.as_ref())
            .and_then(|s| s.secret_name.as_deref());
        assert_eq!(secret, Some("openmeter"));
    }
    assert_eq!(
        claims_by_pod,
        BTreeMap::from([
            ("meter-0".to_string(), Some("buffer-meter-0".to_string())),
            ("meter-1".to_string(), Some("buffer-meter-1".to_string())),
        ])
    );
    eventually(
        "the claims buffer-meter-0 and buffer-meter-1 exist",
        || async {
            let mut names: Vec<String> = list::<PersistentVolumeClaim>(&client, &ns)
                .await
                .iter()
                .map(|c| c.name_any())
                .collect();
            names.sort();
            (names == ["buffer-meter-0", "buffer-meter-1"]).then_some(())
        },
    )
    .await;

    // Status: no kubelet, so the pods never become Ready; the operator says so.
    let status = eventually("the status reports 0 of 2 replicas ready", || async {
        let status = collectors.get_status("meter").await.ok()?.status?;
        let ready = status.conditions.iter().find(|c| c.type_ == "Ready")?;
        (ready.status == "False" && ready.reason == "ReplicasNotReady").then_some(status)
    })
    .await;
    assert_eq!(status.observed_generation, created.metadata.generation);
    assert_eq!(
        status.endpoint.as_deref(),
        Some(format!("http://meter.{ns}.svc:4196").as_str())
    );
    let degraded = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .expect("Degraded");
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("False", "AsExpected")
    );
    assert!(status.conditions.iter().any(|c| c.type_ == "Progressing"));

    // A pipeline change updates the ConfigMap and rolls the pod template.
    let old_hash = config_hash(&rendered);
    collectors
        .patch(
            "meter",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "pipeline": { "dedup": { "window": "1h" } } } })),
        )
        .await
        .expect("pipeline changed");
    let (rendered, stateful_set) = eventually(
        "the ConfigMap and pod template follow the pipeline",
        || async {
            let config_map = config_maps.get("meter-config").await.ok()?;
            let rendered = config_map.data?.get("config.yaml")?.clone();
            let stateful_set = stateful_sets.get("meter").await.ok()?;
            (rendered.contains("window: 1h")
                && template_hash(&stateful_set) == Some(config_hash(&rendered)))
            .then_some((rendered, stateful_set))
        },
    )
    .await;
    assert!(!rendered.contains("window: 1day"), "{rendered}");
    assert_ne!(template_hash(&stateful_set), Some(old_hash));

    // Deleting the collector removes every child through the garbage collector; the buffers are retained.
    collectors
        .delete("meter", &DeleteParams::background())
        .await
        .expect("collector deleted");
    eventually("the garbage collector removes every child", || async {
        let left = list::<ConfigMap>(&client, &ns)
            .await
            .iter()
            .map(|c| c.name_any())
            .filter(|n| n.starts_with("meter"))
            .count()
            + list::<Service>(&client, &ns).await.len()
            + list::<PodDisruptionBudget>(&client, &ns).await.len()
            + list::<StatefulSet>(&client, &ns).await.len()
            + list::<Pod>(&client, &ns).await.len();
        (left == 0).then_some(())
    })
    .await;
    assert_eq!(
        list::<PersistentVolumeClaim>(&client, &ns).await.len(),
        2,
        "buffers are retained"
    );

    controller.stop().await;
    control_plane.stop();
}

#[tokio::test]
async fn reconciling_an_unchanged_collector_writes_nothing() {
    let (control_plane, client, ns) = control_plane_with_crd("idempotent").await;
    let collectors = Api::<MeteringCollector>::namespaced(client.clone(), &ns);
    create(&collectors, &collector(COLLECTOR)).await;
    let ctx = context(&client);

    // Reconcile until the StatefulSet controller has caught up and the status describes it.
    let stateful_sets = Api::<StatefulSet>::namespaced(client.clone(), &ns);
    eventually(
        "the StatefulSet controller has seen the StatefulSet",
        || async {
            let current = collectors.get("meter").await.ok()?;
            reconcile::reconcile(Arc::new(current), ctx.clone())
                .await
                .ok()?;
            let status = stateful_sets.get("meter").await.ok()?.status?;
            (status.replicas == 2 && status.observed_generation.is_some()).then_some(())
        },
    )
    .await;
    let current = collectors.get("meter").await.expect("collector");
    reconcile::reconcile(Arc::new(current), ctx.clone())
        .await
        .expect("reconcile");

    let before = resource_versions(&client, &ns).await;
    // Timestamps have a resolution of one second: a status that re-stamped its conditions would now differ.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let current = collectors.get("meter").await.expect("collector");
    let action = reconcile::reconcile(Arc::new(current), ctx.clone())
        .await
        .expect("reconcile");
    let after = resource_versions(&client, &ns).await;
    assert_eq!(
        before, after,
        "a reconcile with nothing to do wrote something"
    );
    assert!(format!("{action:?}").contains("requeue"), "{action:?}");
    assert!(ctx.metrics.reconciliations.get() >= 3);
    control_plane.stop();
}

/// Children the spec no longer asks for are deleted by the apply stage, found by label and owner; an object that
/// only carries the labels, or only the owner reference, is not the operator's to delete.
#[tokio::test]
async fn children_the_spec_no_longer_asks_for_are_deleted() {
    let (control_plane, client, ns) = control_plane_with_crd("orphans").await;
    let collectors = Api::<MeteringCollector>::namespaced(client.clone(), &ns);
    let meter = create(&collectors, &collector(COLLECTOR)).await;
    let ctx = context(&client);
    reconcile::reconcile(Arc::new(meter.clone()), ctx.clone())
        .await
        .expect("reconcile");

    let owner = meter.controller_owner_ref(&()).expect("owner reference");
    let labels = tally_operator::build::labels(&meter);
    let config_map = |name: &str, labelled: bool, owned: bool| ConfigMap {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            labels: labelled.then(|| labels.clone()),
            owner_references: owned.then(|| vec![owner.clone()]),
            ..Default::default()
        },
        ..Default::default()
    };
    let config_maps = Api::<ConfigMap>::namespaced(client.clone(), &ns);
    for (name, labelled, owned) in [
        ("meter-stale", true, true),
        ("meter-labelled-only", true, false),
        ("meter-owned-only", false, true),
    ] {
        config_maps
            .create(&Default::default(), &config_map(name, labelled, owned))
            .await
            .unwrap_or_else(|e| panic!("creating ConfigMap {name}: {e}"));
    }
    // The apply stage finds orphans in the watch caches, which see the new ConfigMaps shortly.
    let left = eventually(
        "the labelled, owned ConfigMap the spec does not ask for is deleted",
        || async {
            let current = collectors.get("meter").await.ok()?;
            reconcile::reconcile(Arc::new(current), ctx.clone())
                .await
                .ok()?;
            let left: Vec<String> = list::<ConfigMap>(&client, &ns)
                .await
                .iter()
                .map(|c| c.name_any())
                .filter(|name| name.starts_with("meter-"))
                .collect();
            (!left.iter().any(|name| name == "meter-stale")).then_some(left)
        },
    )
    .await;
    for kept in ["meter-config", "meter-labelled-only", "meter-owned-only"] {
        assert!(
            left.iter().any(|name| name == kept),
            "{kept} is kept: {left:?}"
        );
    }
    control_plane.stop();
}

/// Resource versions of the collector and everything it owns.
async fn resource_versions(client: &Client, ns: &str) -> BTreeMap<String, String> {
    let mut versions = BTreeMap::new();
    let mut add = |kind: &str, metas: Vec<kube::api::ObjectMeta>| {
        for meta in metas {
            versions.insert(
                format!("{kind}/{}", meta.name.unwrap_or_default()),
                meta.resource_version.unwrap_or_default(),
            );
        }
    };
    add(
        "MeteringCollector",
        metas(list::<MeteringCollector>(client, ns).await),
    );
    add("ConfigMap", metas(list::<ConfigMap>(client, ns).await));
    add("Service", metas(list::<Service>(client, ns).await));
    add(
        "PodDisruptionBudget",
        metas(list::<PodDisruptionBudget>(client, ns).await),
    );
    add("StatefulSet", metas(list::<StatefulSet>(client, ns).await));
    assert_eq!(versions.len(), 6, "{versions:?}");
    versions
}

fn metas<K: Resource>(objects: Vec<K>) -> Vec<kube::api::ObjectMeta> {
    objects.iter().map(|o| o.meta().clone()).collect()
}

fn template_hash(stateful_set: &StatefulSet) -> Option<String> {
    stateful_set
        .spec
        .template
        .metadata
        .as_ref()?
        .annotations
        .as_ref()?
        .get(CONFIG_HASH_ANNOTATION)
        .cloned()
}

fn controlled_by(meta: &kube::api::ObjectMeta, uid: &str) -> bool {
    meta.owner_references
        .iter()
        .flatten()
        .any(|r| r.uid == uid && r.controller == Some(true) && r.kind == "MeteringCollector")
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

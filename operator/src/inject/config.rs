//! The MutatingWebhookConfiguration that sends pod creations to the webhook, built as a pure function and kept
//! current with server-side apply.
//!
//! Two webhooks in one configuration, so the API server, which knows the namespace's labels, makes the opt-in
//! decision: `namespace.inject.metering.tally.dev` for pods in namespaces labelled
//! `metering.tally.dev/inject=enabled` (unless the pod says `disabled`), and `pod.inject.metering.tally.dev` for
//! pods labelled `metering.tally.dev/inject=enabled` in any namespace. Neither matches an unlabelled pod in an
//! unlabelled namespace. Both exclude the excluded namespaces and Tally's own pods. A pod both paths match is sent
//! twice; the second call finds it injected and changes nothing.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations, ServiceReference,
    WebhookClientConfig,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta,
};
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};

use super::server::MUTATE_PATH;
use super::{INJECT_LABEL, MANAGED_BY, MANAGED_BY_LABEL};
use crate::crd::FIELD_MANAGER;

/// The label the API server sets on every namespace to its name.
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";
/// Name of the webhook matching pods by their namespace's label.
pub const NAMESPACE_WEBHOOK: &str = "namespace.inject.metering.tally.dev";
/// Name of the webhook matching pods by their own label.
pub const POD_WEBHOOK: &str = "pod.inject.metering.tally.dev";
/// How long the API server waits for an answer.
const TIMEOUT_SECONDS: i32 = 5;

/// How the API server reaches the webhook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WebhookEndpoint {
    /// An explicit URL (`--webhook-url`), for an operator running out of cluster.
    Url(String),
    /// A Service in the operator's namespace, port 443, path `/mutate`.
    Service { namespace: String, name: String },
}

/// Who issues the webhook's certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum CertificateSource {
    /// The operator: a CA and a serving certificate it creates, renews and trusts in the configuration itself.
    #[default]
    Operator,
    /// cert-manager: a `Certificate` writes the serving Secret, and cert-manager's CA injector fills the
    /// configuration's caBundle (the `cert-manager.io/inject-ca-from` annotation). The operator only serves it.
    CertManager,
}

/// The annotation that has cert-manager's CA injector fill the caBundle of every webhook of a configuration.
pub const INJECT_CA_FROM: &str = "cert-manager.io/inject-ca-from";

/// `configuration` for cert-manager's CA injector: the annotation naming the `Certificate` (`namespace/name`)
/// and no caBundle of its own, so the operator's server-side apply never claims the field the injector writes.
pub fn with_injected_ca(
    mut configuration: MutatingWebhookConfiguration,
    certificate: &str,
) -> MutatingWebhookConfiguration {
    configuration
        .metadata
        .annotations
        .get_or_insert_default()
        .insert(INJECT_CA_FROM.into(), certificate.into());
    for webhook in configuration.webhooks.iter_mut().flatten() {
        webhook.client_config.ca_bundle = None;
    }
    configuration
}

/// What the API server should do when the webhook cannot be called.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum FailurePolicy {
    /// Admit the pod without a sidecar: metering never blocks a workload.
    #[default]
    #[value(name = "Ignore")]
    Ignore,
    /// Refuse the pod.
    #[value(name = "Fail")]
    Fail,
}

impl FailurePolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            FailurePolicy::Ignore => "Ignore",
            FailurePolicy::Fail => "Fail",
        }
    }
}

/// The desired MutatingWebhookConfiguration.
pub fn webhook_configuration(
    name: &str,
    endpoint: &WebhookEndpoint,
    ca_bundle: &str,
    excluded: &BTreeSet<String>,
    failure_policy: FailurePolicy,
) -> MutatingWebhookConfiguration {
    let client_config = match endpoint {
        WebhookEndpoint::Url(url) => WebhookClientConfig {
            url: Some(url.clone()),
            service: None,
            ca_bundle: Some(ByteString(ca_bundle.as_bytes().to_vec())),
        },
        WebhookEndpoint::Service { namespace, name } => WebhookClientConfig {
            url: None,
            service: Some(ServiceReference {
                namespace: namespace.clone(),
                name: name.clone(),
                path: Some(MUTATE_PATH.into()),
                port: Some(443),
            }),
            ca_bundle: Some(ByteString(ca_bundle.as_bytes().to_vec())),
        },
    };
    let requirement = |key: &str, operator: &str, values: Vec<String>| LabelSelectorRequirement {
        key: key.into(),
        operator: operator.into(),
        values: Some(values),
    };
    let not_excluded = requirement(
        NAMESPACE_NAME_LABEL,
        "NotIn",
        excluded.iter().cloned().collect(),
    );
    let not_ours = requirement(MANAGED_BY_LABEL, "NotIn", vec![MANAGED_BY.into()]);
    let webhook = |name: &str, namespace_selector, object_selector| MutatingWebhook {
        name: name.into(),
        admission_review_versions: vec!["v1".into()],
        client_config: client_config.clone(),
        failure_policy: Some(failure_policy.as_str().into()),
        match_policy: Some("Equivalent".into()),
        namespace_selector: Some(namespace_selector),
        object_selector: Some(object_selector),
        reinvocation_policy: Some("IfNeeded".into()),
        rules: Some(vec![RuleWithOperations {
            api_groups: Some(vec![String::new()]),
            api_versions: Some(vec!["v1".into()]),
            operations: Some(vec!["CREATE".into()]),
            resources: Some(vec!["pods".into()]),
            scope: Some("Namespaced".into()),
        }]),
        side_effects: "None".into(),
        timeout_seconds: Some(TIMEOUT_SECONDS),
        match_conditions: None,
    };
    let by_namespace = webhook(
        NAMESPACE_WEBHOOK,
        LabelSelector {
            match_labels: Some(BTreeMap::from([(INJECT_LABEL.into(), "enabled".into())])),
            match_expressions: Some(vec![not_excluded.clone()]),
        },
        LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![
                not_ours.clone(),
                requirement(INJECT_LABEL, "NotIn", vec!["disabled".into()]),
            ]),
        },
    );
    let by_pod = webhook(
        POD_WEBHOOK,
        LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![not_excluded]),
        },
        LabelSelector {
            match_labels: Some(BTreeMap::from([(INJECT_LABEL.into(), "enabled".into())])),
            match_expressions: Some(vec![not_ours]),
        },
    );
    MutatingWebhookConfiguration {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(BTreeMap::from([(
                MANAGED_BY_LABEL.into(),
                MANAGED_BY.into(),
            )])),
            ..ObjectMeta::default()
        },
        webhooks: Some(vec![by_namespace, by_pod]),
    }
}

/// Server-side apply of the configuration with the operator's field manager, forced.
pub async fn apply(
    client: &Client,
    configuration: &MutatingWebhookConfiguration,
) -> Result<MutatingWebhookConfiguration, kube::Error> {
    let name = configuration.metadata.name.clone().unwrap_or_default();
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(configuration),
        )
        .await
}

/// The configuration as it is in the API server, if it exists.
pub async fn get(
    client: &Client,
    name: &str,
) -> Result<Option<MutatingWebhookConfiguration>, kube::Error> {
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .get_opt(name)
        .await
}

/// Whether every webhook of `configuration` trusts the CAs of `ca_bundle` (it carries that bundle).
pub fn trusts(configuration: &MutatingWebhookConfiguration, ca_bundle: &str) -> bool {
    let webhooks = configuration.webhooks.as_deref().unwrap_or_default();
    !webhooks.is_empty()
        && webhooks.iter().all(|webhook| {
            webhook
                .client_config
                .ca_bundle
                .as_ref()
                .is_some_and(|bundle| bundle.0 == ca_bundle.as_bytes())
        })
}

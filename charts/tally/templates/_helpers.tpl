{{/*
Names and labels shared by the templates.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "tally.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every object's name: fullnameOverride, else "<release>" when the release name contains the chart name,
else "<release>-<chart>". Truncated so that the longest suffix ("-webhook-tls") still fits a 63-character name.
*/}}
{{- define "tally.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* "<chart>-<version>", the helm.sh/chart label. */}}
{{- define "tally.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object but the component. */}}
{{- define "tally.baseLabels" -}}
helm.sh/chart: {{ include "tally.chart" . }}
app.kubernetes.io/name: {{ include "tally.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tally
{{- end }}

{{/* Labels of the operator's objects. */}}
{{- define "tally.labels" -}}
{{ include "tally.baseLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{/* Labels of the metrics Service, which the ServiceMonitor selects. */}}
{{- define "tally.metricsLabels" -}}
{{ include "tally.baseLabels" . }}
app.kubernetes.io/component: metrics
{{- end }}

{{/* Labels that select the operator pods (never change them: a Deployment's selector is immutable). */}}
{{- define "tally.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tally.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* Name of the operator's Deployment, ClusterRole, Role and bindings. */}}
{{- define "tally.operatorName" -}}
{{- printf "%s-operator" (include "tally.fullname" .) }}
{{- end }}

{{/* The ServiceAccount the operator runs as. */}}
{{- define "tally.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tally.operatorName" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false: name an existing ServiceAccount" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The leader-election Lease in the release namespace. */}}
{{- define "tally.leaseName" -}}
{{- default (include "tally.operatorName" .) .Values.leaderElection.leaseName }}
{{- end }}

{{/* The webhook Service (443 -> webhook.port) the MutatingWebhookConfiguration points at. */}}
{{- define "tally.webhookServiceName" -}}
{{- printf "%s-webhook" (include "tally.fullname" .) }}
{{- end }}

{{/* The Secret holding the webhook certificate, created and rotated by the operator. */}}
{{- define "tally.webhookSecretName" -}}
{{- default (printf "%s-webhook-tls" (include "tally.fullname" .)) .Values.webhook.secretName }}
{{- end }}

{{/* The Secret holding the webhook CA's certificate and key, apart from the serving key. */}}
{{- define "tally.webhookCaSecretName" -}}
{{- default (printf "%s-webhook-ca" (include "tally.fullname" .)) .Values.webhook.caSecretName }}
{{- end }}

{{/* The cert-manager Certificate of the webhook (webhook.certManager.enabled). */}}
{{- define "tally.webhookCertificateName" -}}
{{- printf "%s-webhook" (include "tally.fullname" .) }}
{{- end }}

{{/* The MutatingWebhookConfiguration the operator creates and maintains. */}}
{{- define "tally.webhookConfigurationName" -}}
{{- default (include "tally.fullname" .) .Values.webhook.configurationName }}
{{- end }}

{{/* The metrics Service. */}}
{{- define "tally.metricsServiceName" -}}
{{- printf "%s-metrics" (include "tally.fullname" .) }}
{{- end }}

{{/* The operator image: repository@digest when a digest is set, else repository:tag (tag defaults to appVersion). */}}
{{- define "tally.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

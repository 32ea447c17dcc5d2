{{/*
Names and labels shared by the chart's templates.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "tidepool.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Prefix of object names: fullnameOverride, else `<release>` if it contains the chart
name, else `<release>-<chart>`. Truncated so that suffixes such as `-operator` fit. */}}
{{- define "tidepool.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 45 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 45 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 45 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "tidepool.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "tidepool.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tidepool
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component (`operator` or `node`): pass (list $ "operator"). */}}
{{- define "tidepool.selectorLabels" -}}
{{- $ := index . 0 -}}
app.kubernetes.io/name: {{ include "tidepool.name" $ }}
app.kubernetes.io/instance: {{ $.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* Service account names. */}}
{{- define "tidepool.operatorServiceAccount" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (printf "%s-operator" (include "tidepool.fullname" .)) .Values.operator.serviceAccount.name }}
{{- else }}
{{- required "operator.serviceAccount.name is required when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "tidepool.nodeServiceAccount" -}}
{{- if .Values.node.serviceAccount.create }}
{{- default (printf "%s-node" (include "tidepool.fullname" .)) .Values.node.serviceAccount.name }}
{{- else }}
{{- required "node.serviceAccount.name is required when node.serviceAccount.create is false" .Values.node.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The leader-election Lease's name. */}}
{{- define "tidepool.leaseName" -}}
{{- default (printf "%s-operator" (include "tidepool.fullname" .)) .Values.operator.leaderElection.leaseName }}
{{- end }}

{{/* An image reference: pass an image block and the chart; the tag defaults to the
chart's appVersion. */}}
{{- define "tidepool.image" -}}
{{- $image := index . 0 -}}
{{- $ := index . 1 -}}
{{- printf "%s:%s" $image.repository (default $.Chart.AppVersion $image.tag) }}
{{- end }}

{{/* The tracing filter of the node binaries (--log / TIDEPOOL_LOG syntax). */}}
{{- define "tidepool.nodeLogFilter" -}}
{{- printf "warn,tidepool_csi=%s" .Values.logLevel }}
{{- end }}

{{/* The operator's RUST_LOG. */}}
{{- define "tidepool.operatorLogFilter" -}}
{{- printf "warn,tidepool_operator=%s,tidepool_api=%s" .Values.logLevel .Values.logLevel }}
{{- end }}

{{/* The CSI driver's name: fixed, it is in every PV the operator writes. */}}
{{- define "tidepool.csiDriverName" -}}
csi.tidepool.dev
{{- end }}

{{/* The Secret holding the node agents' peer secret (key `secret`): the user's
node.peers.existingSecret, else the one the chart creates (peer-secret.yaml). */}}
{{- define "tidepool.peerSecretName" -}}
{{- default (printf "%s-peer" (include "tidepool.fullname" .)) .Values.node.peers.existingSecret }}
{{- end }}

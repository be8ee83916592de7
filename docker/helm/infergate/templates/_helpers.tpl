{{/*
Names, labels and the pieces every pod of the chart shares.
*/}}

{{- define "infergate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-scoped name; 63 characters at most (DNS label). */}}
{{- define "infergate.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "infergate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "infergate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "infergate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "infergate.labels" -}}
helm.sh/chart: {{ include "infergate.chart" . }}
{{ include "infergate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: infergate
{{- end }}

{{/* image reference: (dict "image" .Values.images.worker "root" $) */}}
{{- define "infergate.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) }}
{{- end }}

{{- define "infergate.secretName" -}}
{{- default (include "infergate.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{- define "infergate.claimName" -}}
{{- default (printf "%s-data" (include "infergate.fullname" .)) .Values.persistence.existingClaim }}
{{- end }}

{{/*
Settings the chart owns (ports, bind addresses, the data folder): `config` may not set them, because the
Service, the probes and the volume mount are built from the same values.
*/}}
{{- define "infergate.reservedSettings" -}}
INFERGATE_DATA_DIR INFERGATE_METRICS_DIR INFERGATE_SCP_HOST INFERGATE_SCP_PORT INFERGATE_API_HOST INFERGATE_API_PORT INFERGATE_WORKER_METRICS_PORT INFERGATE_DATABASE_URL INFERGATE_BROKER_URL INFERGATE_API_KEYS INFERGATE_NODE_URL INFERGATE_NODE_API_KEY
{{- end }}

{{/*
Refuse, at render time, values with which the node could not start. Included by the ConfigMap, which every
install renders.
*/}}
{{- define "infergate.validate" -}}
{{- $reserved := splitList " " (include "infergate.reservedSettings" .) }}
{{- range $key, $value := .Values.config }}
{{- if has $key $reserved }}
{{- fail (printf "config.%s is set by the chart (ports, secrets or persistence values); remove it from config" $key) }}
{{- end }}
{{- end }}
{{- if not .Values.secrets.existingSecret }}
{{- $db := required "secrets.databaseUrl is required: a PostgreSQL URL such as postgresql+psycopg://infergate:PASSWORD@postgres:5432/infergate (or set secrets.existingSecret)" .Values.secrets.databaseUrl }}
{{- if not (hasPrefix "postgresql" $db) }}
{{- fail "secrets.databaseUrl must be a PostgreSQL URL (postgresql+psycopg://...): every pod shares the database" }}
{{- end }}
{{- $broker := required "secrets.brokerUrl is required: a Redis URL such as redis://redis:6379/0 (or set secrets.existingSecret)" .Values.secrets.brokerUrl }}
{{- if hasPrefix "filesystem" $broker }}
{{- fail "secrets.brokerUrl must name a broker server (Redis): the filesystem broker does not span pods" }}
{{- end }}
{{- if not (or .Values.secrets.apiKeys .Values.config.INFERGATE_JWT_ISSUER) }}
{{- fail "the API listens beyond loopback and needs authentication: set secrets.apiKeys or the INFERGATE_JWT_* settings in config (README, Authentication)" }}
{{- end }}
{{- if and (eq .Values.workerDataAccess "http") (not .Values.secrets.workerApiKey) }}
{{- fail "workerDataAccess: http needs secrets.workerApiKey, the key workers send to the node's API" }}
{{- end }}
{{- end }}
{{- end }}

{{/* INFERGATE_API_KEYS of the chart's Secret: secrets.apiKeys, and the workers' key with the worker scope. */}}
{{- define "infergate.apiKeys" -}}
{{- $keys := list }}
{{- with .Values.secrets.apiKeys }}{{ $keys = append $keys . }}{{ end }}
{{- if and (eq .Values.workerDataAccess "http") .Values.secrets.workerApiKey }}
{{- $keys = append $keys (printf "workers:%s:worker" (sha256sum .Values.secrets.workerApiKey)) }}
{{- end }}
{{- join "," $keys }}
{{- end }}

{{/* Environment every infergate container reads: the ConfigMap, then the Secret. */}}
{{- define "infergate.envFrom" -}}
- configMapRef:
    name: {{ include "infergate.fullname" . }}
- secretRef:
    name: {{ include "infergate.secretName" . }}
{{- end }}

{{/* Pod annotations: config and secret checksums, so that a changed setting rolls the pods. */}}
{{- define "infergate.checksums" -}}
checksum/config: {{ include (print $.Template.BasePath "/configmap.yaml") . | sha256sum }}
{{- if not .Values.secrets.existingSecret }}
checksum/secret: {{ include (print $.Template.BasePath "/secret.yaml") . | sha256sum }}
{{- end }}
{{- end }}

{{/*
The data volume, and the pod's own metrics folder (memory-mapped files: local disk). Called with
(dict "root" $ "cache" "") for the shared volume, or with a size for a worker's private cache
(workerDataAccess: http).
*/}}
{{- define "infergate.volumes" -}}
- name: data
  {{- if .cache }}
  emptyDir:
    sizeLimit: {{ .cache }}
  {{- else }}
  persistentVolumeClaim:
    claimName: {{ include "infergate.claimName" .root }}
  {{- end }}
- name: metrics
  emptyDir: {}
{{- end }}

{{- define "infergate.volumeMounts" -}}
- name: data
  mountPath: /data
- name: metrics
  mountPath: /var/lib/infergate/metrics
{{- end }}

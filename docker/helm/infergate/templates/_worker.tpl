{{/*
A worker Deployment: `infergate worker` (Celery on the gpu and dispatch queues) with its metrics port.
Called as (dict "root" $ "component" "worker" "values" .Values.worker "image" .Values.images.worker "gpu" false).
*/}}
{{- define "infergate.workerDeployment" -}}
{{- $root := .root }}
{{- $values := .values }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "infergate.fullname" $root }}-{{ .component }}
  labels:
    {{- include "infergate.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
spec:
  replicas: {{ $values.replicas }}
  selector:
    matchLabels:
      {{- include "infergate.selectorLabels" $root | nindent 6 }}
      app.kubernetes.io/component: {{ .component }}
  template:
    metadata:
      labels:
        {{- include "infergate.selectorLabels" $root | nindent 8 }}
        app.kubernetes.io/component: {{ .component }}
      annotations:
        {{- include "infergate.checksums" $root | nindent 8 }}
        {{- if $root.Values.metrics.podAnnotations }}
        prometheus.io/scrape: "true"
        prometheus.io/port: {{ $root.Values.ports.workerMetrics | quote }}
        prometheus.io/path: /metrics
        {{- end }}
        {{- with $values.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      automountServiceAccountToken: false
      # A running job finishes before the pod stops (Celery warm shutdown on SIGTERM).
      terminationGracePeriodSeconds: {{ $values.terminationGracePeriodSeconds }}
      {{- if and .gpu $values.runtimeClassName }}
      runtimeClassName: {{ $values.runtimeClassName }}
      {{- end }}
      {{- with $root.Values.images.pullSecrets }}
      imagePullSecrets:
        {{- range . }}
        - name: {{ . }}
        {{- end }}
      {{- end }}
      securityContext:
        {{- toYaml $root.Values.podSecurityContext | nindent 8 }}
      containers:
        - name: worker
          image: {{ include "infergate.image" (dict "image" .image "root" $root) }}
          imagePullPolicy: {{ $root.Values.images.pullPolicy }}
          command: ["infergate", "worker"]
          envFrom:
            {{- include "infergate.envFrom" $root | nindent 12 }}
          env:
            - name: INFERGATE_WORKER_CONCURRENCY
              value: {{ $values.concurrency | quote }}
            {{- if .gpu }}
            - name: INFERGATE_ONNX_PROVIDERS
              value: {{ $values.onnxProviders | quote }}
            {{- end }}
            {{- if eq $root.Values.workerDataAccess "http" }}
            # series over WADO-RS, results uploaded: the node's API through its Service
            - name: INFERGATE_NODE_URL
              value: {{ printf "http://%s:%v" (include "infergate.fullname" $root) $root.Values.ports.http | quote }}
            - name: INFERGATE_NODE_API_KEY
              valueFrom:
                secretKeyRef:
                  name: {{ $root.Values.secrets.existingSecret | default (printf "%s-worker" (include "infergate.fullname" $root)) }}
                  key: INFERGATE_NODE_API_KEY
            {{- end }}
          ports:
            - name: metrics
              containerPort: {{ $root.Values.ports.workerMetrics }}
              protocol: TCP
          volumeMounts:
            {{- include "infergate.volumeMounts" $root | nindent 12 }}
            {{- if .gpu }}
            # ORT_TENSORRT_CACHE_PATH of the GPU image: engines built on first use, kept while the pod lives
            - name: tensorrt-cache
              mountPath: /var/cache/infergate/tensorrt
            {{- end }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          resources:
            {{- $resources := deepCopy ($values.resources | default dict) }}
            {{- if .gpu }}
            {{- $limits := merge (dict "nvidia.com/gpu" $values.gpus) ($resources.limits | default dict) }}
            {{- $_ := set $resources "limits" $limits }}
            {{- end }}
            {{- toYaml $resources | nindent 12 }}
      volumes:
        {{- include "infergate.volumes" (dict "root" $root "cache" (ternary $values.cacheSize "" (eq $root.Values.workerDataAccess "http"))) | nindent 8 }}
        {{- if .gpu }}
        - name: tensorrt-cache
          emptyDir:
            sizeLimit: {{ $values.engineCacheSize }}
        {{- end }}
      {{- with $values.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $values.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $values.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end }}

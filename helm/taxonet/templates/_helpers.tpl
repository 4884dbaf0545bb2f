{{/*
Chart name, truncated so that "<fullname>-train" / "<fullname>-serve" stay within KubeRay's 47-character limit.
*/}}
{{- define "taxonet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" }}
{{- end }}

{{/*
Resource name prefix. RayJob/RayService names must be DNS-1035 labels (lowercase, starting with a letter) of at
most 47 characters; 40 + "-train" fits, and anything else fails the render with a clear message.
*/}}
{{- define "taxonet.fullname" -}}
{{- $name := "" }}
{{- if .Values.fullnameOverride }}
{{- $name = .Values.fullnameOverride }}
{{- else }}
{{- $base := default .Chart.Name .Values.nameOverride }}
{{- if contains $base .Release.Name }}
{{- $name = .Release.Name }}
{{- else }}
{{- $name = printf "%s-%s" .Release.Name $base }}
{{- end }}
{{- end }}
{{- $name = $name | trunc 40 | trimSuffix "-" }}
{{- if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $name) }}
{{- fail (printf "name %q is not a DNS-1035 label (lowercase letters, digits and '-', starting with a letter) %s"
    $name "as KubeRay requires; set fullnameOverride") }}
{{- end }}
{{- $name }}
{{- end }}

{{- define "taxonet.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select this release's pods (PodMonitors, PDB). */}}
{{- define "taxonet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "taxonet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "taxonet.labels" -}}
helm.sh/chart: {{ include "taxonet.chart" . }}
{{ include "taxonet.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: taxonet
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "taxonet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "taxonet.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "taxonet.image" -}}
{{- $tag := .Values.image.tag | default (printf "%s-%s" .Chart.AppVersion .Values.image.flavor) }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{/* The Secret with the AWS_* variables: an existing one, or the one this chart makes (templates/secret.yaml). */}}
{{- define "taxonet.s3SecretName" -}}
{{- .Values.s3.existingSecret | default (printf "%s-s3" (include "taxonet.fullname" .)) }}
{{- end }}

{{/* The Secret holding TAXONET_API_TOKEN, or "" when serving runs without a token. */}}
{{- define "taxonet.apiTokenSecretName" -}}
{{- if .Values.serve.apiToken.existingSecret }}
{{- .Values.serve.apiToken.existingSecret }}
{{- else if .Values.serve.apiToken.value }}
{{- printf "%s-api-token" (include "taxonet.fullname" .) }}
{{- end }}
{{- end }}

{{/*
Autoscaler settings shared by the training and serving clusters.
*/}}
{{- define "taxonet.autoscalerOptions" -}}
{{- $autoscaler := .Values.ray.autoscaler -}}
version: {{ $autoscaler.version }}
upscalingMode: {{ $autoscaler.upscalingMode }}
idleTimeoutSeconds: {{ int $autoscaler.idleTimeoutSeconds }}
resources:
  {{- toYaml $autoscaler.resources | nindent 2 }}
# The sidecar's own context: it joins the head pod, whose pod-level context also applies.
securityContext:
  {{- $restricted := dict "runAsNonRoot" true "seccompProfile" (dict "type" "RuntimeDefault") }}
  {{- toYaml (merge $restricted .Values.securityContext) | nindent 2 }}
{{- end }}

{{/*
Pod template of a Ray head or worker. Arguments (dict): root (the chart context), component (train|serve),
group (head or worker group values), head (bool), serve (bool: serve port and API token).
The Ray container comes first, as KubeRay requires.
*/}}
{{- define "taxonet.rayPodTemplate" -}}
{{- $root := .root }}
{{- $group := .group }}
{{- $tokenSecret := include "taxonet.apiTokenSecretName" $root -}}
metadata:
  labels:
    {{- include "taxonet.selectorLabels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
spec:
  serviceAccountName: {{ include "taxonet.serviceAccountName" $root }}
  {{- if not .head }}
  # Only the head (autoscaler sidecar) talks to the Kubernetes API.
  automountServiceAccountToken: false
  {{- end }}
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $root.Values.podSecurityContext | nindent 4 }}
  {{- with $group.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $group.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $group.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $root.Values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  containers:
    - name: {{ ternary "ray-head" "ray-worker" .head }}
      image: {{ include "taxonet.image" $root }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      envFrom:
        - secretRef:
            name: {{ include "taxonet.s3SecretName" $root }}
      {{- if and .serve $tokenSecret }}
      env:
        - name: TAXONET_API_TOKEN
          valueFrom:
            secretKeyRef:
              name: {{ $tokenSecret }}
              key: {{ $root.Values.serve.apiToken.key }}
      {{- end }}
      ports:
        {{- if .head }}
        - {name: gcs-server, containerPort: 6379}
        - {name: dashboard, containerPort: 8265}
        - {name: client, containerPort: 10001}
        {{- end }}
        {{- if .serve }}
        - {name: serve, containerPort: 8000}
        {{- end }}
        - {name: metrics, containerPort: 8080}
        {{- if .head }}
        - {name: as-metrics, containerPort: 44217}
        - {name: dash-metrics, containerPort: 44227}
        {{- end }}
      resources:
        {{- toYaml $group.resources | nindent 8 }}
      securityContext:
        {{- toYaml $root.Values.securityContext | nindent 8 }}
      {{- if not .head }}
      lifecycle:
        preStop:
          exec:
            command: ["/bin/sh", "-c", "ray stop"]
      {{- end }}
      volumeMounts:
        - {name: ray-logs, mountPath: /tmp/ray}
        {{- if $group.shmSize }}
        - {name: dshm, mountPath: /dev/shm}
        {{- end }}
  volumes:
    - name: ray-logs
      emptyDir: {}
    {{- if $group.shmSize }}
    # Ray's object store and DataLoader workers need more than the default 64 MiB /dev/shm.
    - name: dshm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $group.shmSize }}
    {{- end }}
{{- end }}

{{/*
Head group of a Ray cluster. Arguments: root, component, head (the head values), serve (bool).
num-cpus/num-gpus 0: no tasks, Train workers or Serve replicas are scheduled on the head.
*/}}
{{- define "taxonet.headGroupSpec" -}}
rayStartParams:
  num-cpus: "0"
  num-gpus: "0"
  dashboard-host: "0.0.0.0"
template:
  {{- $pod := dict "root" .root "component" .component "group" .head "head" true "serve" .serve }}
  {{- include "taxonet.rayPodTemplate" $pod | nindent 2 }}
{{- end }}

{{/*
Enabled worker groups, sorted by name. Arguments: root, component, groups (map name -> values), serve (bool).
KubeRay derives each group's Ray GPU count from its nvidia.com/gpu limit, so rayStartParams stay empty.
*/}}
{{- define "taxonet.workerGroupSpecs" -}}
{{- $args := . }}
{{- range $name, $group := .groups }}
{{- if $group.enabled }}
{{- if gt (int $group.minReplicas) (int $group.maxReplicas) }}
{{- fail (printf "worker group %q: minReplicas (%d) is greater than maxReplicas (%d)"
    $name (int $group.minReplicas) (int $group.maxReplicas)) }}
{{- end }}
- groupName: {{ $name }}
  replicas: {{ int $group.replicas }}
  minReplicas: {{ int $group.minReplicas }}
  maxReplicas: {{ int $group.maxReplicas }}
  {{- if $group.idleTimeoutSeconds }}
  idleTimeoutSeconds: {{ int $group.idleTimeoutSeconds }}
  {{- end }}
  rayStartParams: {}
  template:
    {{- $pod := dict "root" $args.root "component" $args.component "group" $group "head" false "serve" $args.serve }}
    {{- include "taxonet.rayPodTemplate" $pod | nindent 4 }}
{{- end }}
{{- end }}
{{- end }}

{{/* One Serve deployment entry. Arguments: name, values (serve.ingress or serve.classifier). */}}
{{- define "taxonet.serveDeployment" -}}
{{- $scaling := .values.autoscaling -}}
name: {{ .name }}
max_ongoing_requests: {{ int .values.maxOngoingRequests }}
autoscaling_config:
  min_replicas: {{ int $scaling.minReplicas }}
  max_replicas: {{ int $scaling.maxReplicas }}
  target_ongoing_requests: {{ int $scaling.targetOngoingRequests }}
ray_actor_options:
  num_cpus: {{ .values.numCpus }}
  {{- if .values.numGpus }}
  num_gpus: {{ int .values.numGpus }}
  {{- end }}
{{- end }}

{{/*
The Ray Serve config (serveConfigV2), same structure as the package's configs/serve.yaml: one application,
deployments TaxonetIngress and TaxonetClassifier with Serve autoscaling.
*/}}
{{- define "taxonet.serveConfig" -}}
{{- $serve := .Values.serve }}
{{- $ingress := include "taxonet.serveDeployment" (dict "name" "TaxonetIngress" "values" $serve.ingress) | fromYaml }}
{{- $classifier := include "taxonet.serveDeployment" (dict "name" "TaxonetClassifier" "values" $serve.classifier)
    | fromYaml }}
{{- $app := dict "name" $serve.appName "route_prefix" $serve.routePrefix "import_path" $serve.importPath }}
{{- $_ := set $app "args" $serve.args }}
{{- $_ = set $app "deployments" (list $ingress $classifier) }}
{{- $http := dict "host" "0.0.0.0" "port" 8000 }}
{{- toYaml (dict "proxy_location" "EveryNode" "http_options" $http "applications" (list $app)) }}
{{- end }}

{{/* The `taxonet train` command line of the RayJob. */}}
{{- define "taxonet.trainEntrypoint" -}}
{{- $train := .Values.train }}
{{- $parts := list "taxonet" "train" "--config" $train.config }}
{{- $parts = concat $parts (list "--set" (printf "data.dataset=%s" $train.dataset)) }}
{{- $parts = concat $parts (list "--set" (printf "train.storage=%s" $train.storage)) }}
{{- $parts = concat $parts (list "--set" (printf "train.num_workers=%d" (int $train.numWorkers))) }}
{{- $parts = concat $parts (list "--set" (printf "train.use_gpu=%t" $train.useGpu)) }}
{{- range $key, $value := $train.overrides }}
{{- $parts = concat $parts (list "--set" (printf "%s=%v" $key $value | squote)) }}
{{- end }}
{{- join " " $parts }}
{{- end }}

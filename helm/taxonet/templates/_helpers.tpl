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

{{/* Labels that select this release's pods (PodMonitors, PDB, NetworkPolicy). */}}
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

{{/*
A word quoted for a POSIX shell, as Python's shlex.quote does: the RayJob entrypoint is run by a shell (KubeRay's
submitter, then Ray's job supervisor). Words of safe characters stay as they are; any other is single-quoted, with
embedded single quotes written as '\''.
*/}}
{{- define "taxonet.shellQuote" -}}
{{- $word := toString . }}
{{- if regexMatch "^[A-Za-z0-9_@%+=:,./-]+$" $word }}
{{- $word }}
{{- else -}}
'{{ replace "'" "'\\''" $word }}'
{{- end }}
{{- end }}

{{/*
Bytes of a quantity written as <n>Mi or <n>Gi (values.schema.json allows only these), for Ray's
object-store-memory, which takes a plain number of bytes.
*/}}
{{- define "taxonet.bytes" -}}
{{- $q := toString . }}
{{- if hasSuffix "Gi" $q }}
{{- mul (trimSuffix "Gi" $q | int64) 1073741824 }}
{{- else if hasSuffix "Mi" $q }}
{{- mul (trimSuffix "Mi" $q | int64) 1048576 }}
{{- else }}
{{- fail (printf "quantity %q must be written as <n>Mi or <n>Gi" $q) }}
{{- end }}
{{- end }}

{{/* The in-cluster S3 server's Service (devS3). */}}
{{- define "taxonet.devS3Name" -}}
{{- printf "%s-s3" (include "taxonet.fullname" .) }}
{{- end }}

{{/* The Secret with the AWS_* variables: an existing one, or the one this chart makes (templates/secret.yaml). */}}
{{- define "taxonet.s3SecretName" -}}
{{- .Values.s3.existingSecret | default (printf "%s-s3" (include "taxonet.fullname" .)) }}
{{- end }}

{{/* S3 endpoint of the chart-made Secret: the configured one, else the in-cluster server's when devS3 is on. */}}
{{- define "taxonet.s3Endpoint" -}}
{{- if .Values.s3.endpointUrl }}
{{- .Values.s3.endpointUrl }}
{{- else if .Values.devS3.enabled }}
{{- printf "http://%s:%d" (include "taxonet.devS3Name" .) (int .Values.devS3.port) }}
{{- end }}
{{- end }}

{{/*
The Secret holding the API token(s). Packaged deployments never run the API open: without an existing Secret, a
value or `generate: true`, the render fails, unless serve.auth is set to none explicitly (then "").
*/}}
{{- define "taxonet.apiTokenSecretName" -}}
{{- $token := .Values.serve.apiToken }}
{{- if eq .Values.serve.auth "none" }}
{{- else if $token.existingSecret }}
{{- $token.existingSecret }}
{{- else if or $token.value $token.generate }}
{{- printf "%s-api-token" (include "taxonet.fullname" .) }}
{{- else }}
{{- fail (printf "%s %s"
    "serve.apiToken: the API needs a token. Set existingSecret (a Secret you created), value, or generate: true;"
    "or set serve.auth=none to run /v1/* without authentication (not for shared clusters).") }}
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
  {{- toYaml (merge $restricted (omit .Values.securityContext "readOnlyRootFilesystem")) | nindent 2 }}
{{- end }}

{{/* Volume mounts for the writable paths of a taxonet container on a read-only root filesystem. */}}
{{- define "taxonet.scratchMounts" -}}
- {name: tmp, mountPath: /tmp}
- {name: cache, mountPath: /home/ray/.cache}
{{- end }}

{{- define "taxonet.scratchVolumes" -}}
- {name: tmp, emptyDir: {}}
- {name: cache, emptyDir: {}}
{{- end }}

{{/*
rayStartParams of a group: object-store-memory from objectStoreMemory, and the group's /dev/shm (shmSize) must hold
it, or Ray falls back to a disk-backed object store. Arguments: name (for messages), group, head (bool).
*/}}
{{- define "taxonet.rayStartParams" -}}
{{- $store := include "taxonet.bytes" .group.objectStoreMemory | int64 }}
{{- $shm := include "taxonet.bytes" .group.shmSize | int64 }}
{{- if lt $shm $store }}
{{- fail (printf "%s: shmSize (%s) must be at least objectStoreMemory (%s), or Ray's object store falls back to disk"
    .name .group.shmSize .group.objectStoreMemory) }}
{{- end }}
{{- if .head }}
num-cpus: "0"
num-gpus: "0"
dashboard-host: "0.0.0.0"
{{- end }}
object-store-memory: {{ $store | toString | quote }}
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
        {{- include "taxonet.scratchMounts" . | nindent 8 }}
        - {name: dshm, mountPath: /dev/shm}
  volumes:
    - {name: ray-logs, emptyDir: {}}
    {{- include "taxonet.scratchVolumes" . | nindent 4 }}
    # Ray's object store lives in /dev/shm: sized to hold object-store-memory (counts against the memory limit).
    - name: dshm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $group.shmSize }}
{{- end }}

{{/*
Head group of a Ray cluster. Arguments: root, component, head (the head values), serve (bool).
num-cpus/num-gpus 0: no tasks, Train workers or Serve replicas are scheduled on the head.
*/}}
{{- define "taxonet.headGroupSpec" -}}
rayStartParams:
  {{- include "taxonet.rayStartParams" (dict "name" (printf "%s.head" .component) "group" .head "head" true)
      | nindent 2 }}
template:
  {{- $pod := dict "root" .root "component" .component "group" .head "head" true "serve" .serve }}
  {{- include "taxonet.rayPodTemplate" $pod | nindent 2 }}
{{- end }}

{{/*
Enabled worker groups, sorted by name. Arguments: root, component, groups (map name -> values), serve (bool).
KubeRay derives each group's Ray CPU and GPU count from its container limits; rayResources adds custom Ray
resources (group `resources` field), e.g. taxonet_ingress on serving's CPU group.
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
  {{- with $group.rayResources }}
  resources:
    {{- range $resource, $amount := . }}
    {{ $resource }}: {{ $amount | toString | quote }}
    {{- end }}
  {{- end }}
  rayStartParams:
    {{- $where := printf "%s.workerGroups.%s" $args.component $name }}
    {{- include "taxonet.rayStartParams" (dict "name" $where "group" $group "head" false) | nindent 4 }}
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
  {{- with .values.rayResources }}
  resources:
    {{- range $resource, $amount := . }}
    {{ $resource }}: {{ $amount }}
    {{- end }}
  {{- end }}
{{- end }}

{{/*
The Ray Serve config (serveConfigV2), same structure as the package's configs/serve.yaml: one application,
deployments TaxonetIngress and TaxonetClassifier with Serve autoscaling; the ingress queues unsure crops for review
(serve.args.review_queue) unless review.enabled is false. A custom Ray resource a deployment needs must be offered by
an enabled worker group, or its replicas would wait forever.
*/}}
{{- define "taxonet.serveConfig" -}}
{{- $serve := .Values.serve }}
{{- range $deployment := list "ingress" "classifier" }}
{{- range $resource, $_ := (index $serve $deployment).rayResources }}
{{- $offered := false }}
{{- range $name, $group := $serve.workerGroups }}
{{- if and $group.enabled (hasKey ($group.rayResources | default dict) $resource) }}
{{- $offered = true }}
{{- end }}
{{- end }}
{{- if not $offered }}
{{- fail (printf "serve.%s.rayResources needs %q, which no enabled serve.workerGroups.* offers in rayResources"
    $deployment $resource) }}
{{- end }}
{{- end }}
{{- end }}
{{- $ingress := include "taxonet.serveDeployment" (dict "name" "TaxonetIngress" "values" $serve.ingress) | fromYaml }}
{{- $classifier := include "taxonet.serveDeployment" (dict "name" "TaxonetClassifier" "values" $serve.classifier)
    | fromYaml }}
{{- $app := dict "name" $serve.appName "route_prefix" $serve.routePrefix "import_path" $serve.importPath }}
{{- /* review.enabled=false turns the queue off: review_queue is left out of the args */}}
{{- $_ := set $app "args" (ternary $serve.args (omit $serve.args "review_queue") .Values.review.enabled) }}
{{- $_ = set $app "deployments" (list $ingress $classifier) }}
{{- $http := merge (deepCopy ($serve.httpOptions | default dict)) (dict "host" "0.0.0.0" "port" 8000) }}
{{- toYaml (dict "proxy_location" "EveryNode" "http_options" $http "applications" (list $app)) }}
{{- end }}

{{/*
The `taxonet train` command line of the RayJob, one shell-quoted word per argument. Fixed keys are written as
validated text; train.overrides values with toJson, so numbers reach `taxonet train --set` as JSON numbers
(1e-05 as 0.00001, 1000000 as 1000000, never Go's 1e+06 from %v) and strings keep their exact text.
*/}}
{{- define "taxonet.trainEntrypoint" -}}
{{- $train := .Values.train }}
{{- $sets := list (printf "data.dataset=%s" $train.dataset) (printf "train.storage=%s" $train.storage)
    (printf "train.num_workers=%d" (int $train.numWorkers)) (printf "train.use_gpu=%t" $train.useGpu) }}
{{- with $train.registry }}
{{- if .uri }}
{{- $sets = append $sets (printf "registry.uri=%s" .uri) }}
{{- with .name }}{{ $sets = append $sets (printf "registry.name=%s" .) }}{{ end }}
{{- with .promote }}{{ $sets = append $sets (printf "registry.promote=%s" .) }}{{ end }}
{{- end }}
{{- end }}
{{- with .Values.weights.uri }}
{{- $sets = append $sets (printf "model.weights=%s" .) }}
{{- end }}
{{- range $key, $value := $train.overrides }}
{{- $sets = append $sets (printf "%s=%s" $key (toJson $value)) }}
{{- end }}
{{- $words := list "taxonet" "train" "--config" $train.config }}
{{- range $set := $sets }}
{{- $words = concat $words (list "--set" $set) }}
{{- end }}
{{- $quoted := list }}
{{- range $word := $words }}
{{- $quoted = append $quoted (include "taxonet.shellQuote" $word) }}
{{- end }}
{{- join " " $quoted }}
{{- end }}

{{/* Python for the wait-for-inputs init container: waits until every URI given as an argument exists. */}}
{{- define "taxonet.waitForInputsScript" -}}
import os, sys, time
from taxonet.storage import exists
pending, deadline = list(sys.argv[1:]), time.monotonic() + float(os.environ.get("WAIT_S", "3600"))
while pending:
    try:
        pending = [uri for uri in pending if not exists(uri)]
    except Exception as exc:  # S3 not reachable yet: keep waiting, say why
        print(f"cannot check inputs yet: {exc}", flush=True)
    if not pending:
        break
    if time.monotonic() > deadline:
        sys.exit(f"gave up waiting for {', '.join(pending)}")
    print(f"waiting for {', '.join(pending)}", flush=True)
    time.sleep(15)
print("inputs present", flush=True)
{{- end }}

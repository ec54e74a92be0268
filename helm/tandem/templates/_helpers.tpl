{{/* Names ---------------------------------------------------------------------------------------------- */}}

{{- define "tandem.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tandem.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* <fullname>-<component>; short enough for StatefulSet pod names and their controller-revision-hash label. */}}
{{- define "tandem.componentName" -}}
{{- printf "%s-%s" (include "tandem.fullname" .root) .component | trunc 52 | trimSuffix "-" }}
{{- end }}

{{- define "tandem.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "tandem.controllerServiceAccount" -}}
{{- default (printf "%s-controller" (include "tandem.fullname" .)) .Values.serviceAccount.controllerName }}
{{- end }}

{{- define "tandem.workloadServiceAccount" -}}
{{- default (include "tandem.fullname" .) .Values.serviceAccount.workloadName }}
{{- end }}

{{/* Labels (dict root, component) ----------------------------------------------------------------------- */}}

{{- define "tandem.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tandem.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "tandem.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "tandem.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: tandem
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- end }}

{{/* Every pod of the release (Redis included): what the NetworkPolicies and the controller's discovery select. */}}
{{- define "tandem.releaseSelector" -}}
app.kubernetes.io/name: {{ include "tandem.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Addresses --------------------------------------------------------------------------------------------- */}}

{{- define "tandem.controllerHost" -}}
{{- printf "%s.%s.svc.%s" (include "tandem.componentName" (dict "root" . "component" "controller")) .Release.Namespace .Values.clusterDomain }}
{{- end }}

{{- define "tandem.controllerAddress" -}}
{{- printf "%s:%d" (include "tandem.controllerHost" .) (int .Values.controller.port) }}
{{- end }}

{{- define "tandem.modelDir" -}}
{{- printf "/models/%s" .Values.model.name }}
{{- end }}

{{/* Redis ------------------------------------------------------------------------------------------------ */}}

{{- define "tandem.redisSecret" -}}
{{- default (printf "%s-redis" (include "tandem.fullname" .)) .Values.redis.auth.existingSecret }}
{{- end }}

{{/* redis:// URL with `$(REDIS_PASSWORD)`, which the kubelet expands from the variable defined before it. */}}
{{- define "tandem.redisUrl" -}}
{{- $r := .Values.redis }}
{{- $auth := ternary ":$(REDIS_PASSWORD)@" "" $r.auth.enabled }}
{{- if $r.enabled }}
{{- printf "redis://%s%s.%s.svc.%s:%d/%d" $auth (include "tandem.componentName" (dict "root" . "component" "redis")) .Release.Namespace .Values.clusterDomain (int $r.port) (int $r.db) }}
{{- else }}
{{- if not $r.external.host }}{{ fail "redis.enabled is false: set redis.external.host" }}{{ end }}
{{- printf "%s://%s%s:%d/%d" (ternary "rediss" "redis" $r.external.tls) $auth $r.external.host (int $r.external.port) (int $r.db) }}
{{- end }}
{{- end }}

{{/* The password and URL variables of a Redis client (dict root, service), in this order. */}}
{{- define "tandem.redisEnv" -}}
{{- $r := .root.Values.redis }}
{{- if has .service $r.clients }}
{{- if $r.auth.enabled }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "tandem.redisSecret" .root }}
      key: {{ $r.auth.secretKey }}
{{- end }}
- name: {{ printf "TANDEM_%s_REDIS_URL" (upper .service) }}
  value: {{ include "tandem.redisUrl" .root | quote }}
{{- end }}
{{- end }}

{{/* Pods ------------------------------------------------------------------------------------------------- */}}

{{/* gRPC health probes of a container (dict port, probes). */}}
{{- define "tandem.probes" -}}
startupProbe:
  grpc: {port: {{ .port }}}
  {{- toYaml .probes.startup | nindent 2 }}
readinessProbe:
  grpc: {port: {{ .port }}}
  {{- toYaml .probes.readiness | nindent 2 }}
livenessProbe:
  grpc: {port: {{ .port }}}
  {{- toYaml .probes.liveness | nindent 2 }}
{{- end }}

{{/* Environment of every Tandem container (dict root, component, values). */}}
{{- define "tandem.env" -}}
- name: POD_NAME
  valueFrom: {fieldRef: {fieldPath: metadata.name}}
- name: POD_NAMESPACE
  valueFrom: {fieldRef: {fieldPath: metadata.namespace}}
- name: HOME
  value: /tmp
{{- with .root.Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- with .values.env }}
{{ toYaml . }}
{{- end }}
{{- include "tandem.redisEnv" (dict "root" .root "service" .component) }}
{{- end }}

{{/* NCCL/gloo settings of the data-plane pods. */}}
{{- define "tandem.ncclEnv" -}}
{{- $n := .Values.nccl }}
- name: NCCL_DEBUG
  value: {{ $n.debug | quote }}
- name: NCCL_IB_DISABLE
  value: {{ ternary "1" "0" $n.ibDisable | quote }}
{{- with $n.socketIfname }}
- name: NCCL_SOCKET_IFNAME
  value: {{ . | quote }}
- name: GLOO_SOCKET_IFNAME
  value: {{ . | quote }}
{{- end }}
{{- with $n.ibHca }}
- name: NCCL_IB_HCA
  value: {{ . | quote }}
{{- end }}
{{- range $k, $v := $n.extraEnv }}
- name: {{ $k }}
  value: {{ $v | quote }}
{{- end }}
{{- end }}

{{/* Container resources (dict values): resources plus GPUs and other extended resources in both requests and limits. */}}
{{- define "tandem.resources" -}}
{{- $res := deepCopy (default dict .values.resources) }}
{{- $extra := deepCopy (default dict .values.extraResources) }}
{{- if gt (int (default 0 .values.gpus)) 0 }}
{{- $_ := set $extra .gpuResource (int .values.gpus) }}
{{- end }}
{{- if $extra }}
{{- $_ := set $res "requests" (merge (default dict $res.requests) $extra) }}
{{- $_ := set $res "limits" (merge (default dict $res.limits) (deepCopy $extra)) }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{/* Volume mounts of every Tandem container: its config, the model (read-only), /tmp. */}}
{{- define "tandem.volumeMounts" -}}
- name: config
  mountPath: /etc/tandem
  readOnly: true
- name: model
  mountPath: {{ include "tandem.modelDir" . }}
  readOnly: true
  {{- if and (eq .Values.model.source "pvc") .Values.model.pvc.subPath }}
  subPath: {{ .Values.model.pvc.subPath }}
  {{- end }}
- name: tmp
  mountPath: /tmp
{{- end }}

{{- define "tandem.volumes" -}}
- name: config
  configMap:
    name: {{ include "tandem.fullname" . }}
- name: tmp
  emptyDir: {}
{{- $m := .Values.model }}
{{- if eq $m.source "image" }}
- name: model
  emptyDir:
    sizeLimit: {{ $m.image.sizeLimit }}
{{- else if eq $m.source "pvc" }}
{{- if not $m.pvc.claimName }}{{ fail "model.source is pvc: set model.pvc.claimName" }}{{ end }}
- name: model
  persistentVolumeClaim:
    claimName: {{ $m.pvc.claimName }}
    readOnly: true
{{- else if eq $m.source "hostPath" }}
{{- if not $m.hostPath.path }}{{ fail "model.source is hostPath: set model.hostPath.path" }}{{ end }}
- name: model
  hostPath:
    path: {{ $m.hostPath.path }}
    type: Directory
{{- else }}
{{- fail (printf "model.source %q is not one of image, pvc, hostPath" $m.source) }}
{{- end }}
{{- end }}

{{/* The init container that copies the checkpoint out of an image (model.source image). */}}
{{- define "tandem.modelInit" -}}
{{- $m := .Values.model }}
{{- if eq $m.source "image" }}
- name: copy-model
  image: {{ printf "%s:%s" (default .Values.image.repository $m.image.repository) (default (default .Chart.AppVersion .Values.image.tag) $m.image.tag) }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: [sh, -c, 'cp -R "$0"/. "$1"/', {{ $m.image.path | quote }}, {{ include "tandem.modelDir" . | quote }}]
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  resources:
    {{- toYaml $m.image.resources | nindent 4 }}
  volumeMounts:
    - name: model
      mountPath: {{ include "tandem.modelDir" . }}
{{- end }}
{{- end }}

{{/* Scheduling of a pod (dict root, component, values); topology spreads get this component's labels. */}}
{{- define "tandem.scheduling" -}}
{{- with .values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if .values.topologySpreadConstraints }}
topologySpreadConstraints:
{{- range .values.topologySpreadConstraints }}
  {{- $c := deepCopy . }}
  {{- if not $c.labelSelector }}
  {{- $_ := set $c "labelSelector" (dict "matchLabels" (include "tandem.selectorLabels" (dict "root" $.root "component" $.component) | fromYaml)) }}
  {{- end }}
  - {{- toYaml $c | nindent 4 }}
{{- end }}
{{- end }}
{{- end }}

{{/* The spec of a Tandem pod (dict root, component, values, serviceAccount, args, ports, extraEnv, extraVolumes,
     extraMounts): one container running `tandem serve <component> --config /etc/tandem/<component>.yaml`. */}}
{{- define "tandem.podSpec" -}}
{{- $root := .root -}}
serviceAccountName: {{ .serviceAccount }}
automountServiceAccountToken: {{ eq .component "controller" }}
enableServiceLinks: false
terminationGracePeriodSeconds: {{ .values.terminationGracePeriodSeconds }}
securityContext:
  {{- toYaml $root.Values.podSecurityContext | nindent 2 }}
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- include "tandem.scheduling" . }}
{{- with (include "tandem.modelInit" $root) }}
initContainers:
  {{- trim . | nindent 2 }}
{{- end }}
containers:
  - name: {{ .component }}
    image: {{ include "tandem.image" $root }}
    imagePullPolicy: {{ $root.Values.image.pullPolicy }}
    args: [serve, {{ .component }}, --config, /etc/tandem/{{ .component }}.yaml]
    ports:
      {{- toYaml .ports | nindent 6 }}
    env:
      {{- include "tandem.env" . | nindent 6 }}
      {{- with .extraEnv }}
      {{- trim . | nindent 6 }}
      {{- end }}
    {{- include "tandem.probes" (dict "port" .values.port "probes" .values.probes) | nindent 4 }}
    resources:
      {{- include "tandem.resources" (dict "values" .values "gpuResource" "nvidia.com/gpu") | nindent 6 }}
    securityContext:
      {{- toYaml (merge (deepCopy .values.securityContext) $root.Values.securityContext) | nindent 6 }}
    volumeMounts:
      {{- include "tandem.volumeMounts" $root | nindent 6 }}
      {{- with .extraMounts }}
      {{- trim . | nindent 6 }}
      {{- end }}
volumes:
  {{- include "tandem.volumes" $root | nindent 2 }}
  {{- with .extraVolumes }}
  {{- trim . | nindent 2 }}
  {{- end }}
{{- end }}

{{/* Pod template annotations: a config checksum, so a changed ConfigMap rolls the pods. */}}
{{- define "tandem.podAnnotations" -}}
checksum/config: {{ include (print .root.Template.BasePath "/configmap.yaml") .root | sha256sum }}
{{- with .values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end }}

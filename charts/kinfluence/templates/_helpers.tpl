{{/* Chart name, at most 63 characters. */}}
{{- define "kinfluence.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Prefix of every object name: the release name, plus the chart name unless it contains it. */}}
{{- define "kinfluence.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Labels of every object. */}}
{{- define "kinfluence.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "kinfluence.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kinfluence
{{- end -}}

{{/* Labels that select the operator pod. */}}
{{- define "kinfluence.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kinfluence.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The operator image: repository, then @digest or :tag (default appVersion). */}}
{{- define "kinfluence.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* The default image of runner and worker pods: jobs.image, else the operator image. */}}
{{- define "kinfluence.jobImage" -}}
{{- if .Values.jobs.image.repository -}}
{{- printf "%s:%s" .Values.jobs.image.repository (default .Chart.AppVersion .Values.jobs.image.tag) -}}
{{- else -}}
{{- include "kinfluence.image" . -}}
{{- end -}}
{{- end -}}

{{/* ServiceAccount of the operator. */}}
{{- define "kinfluence.operatorServiceAccountName" -}}
{{- default (printf "%s-operator" (include "kinfluence.fullname" .)) .Values.serviceAccount.name -}}
{{- end -}}

{{/* ServiceAccount of the runner pods (one of that name in each job namespace). */}}
{{- define "kinfluence.runnerServiceAccountName" -}}
{{- default (printf "%s-runner" (include "kinfluence.fullname" .)) .Values.jobs.runnerServiceAccount.name -}}
{{- end -}}

{{/* Namespaces where InfluenceJobs run, as a JSON list (default: the release namespace). */}}
{{- define "kinfluence.jobNamespaces" -}}
{{- if .Values.operator.jobNamespaces -}}
{{- .Values.operator.jobNamespaces | uniq | toJson -}}
{{- else -}}
{{- list .Release.Namespace | toJson -}}
{{- end -}}
{{- end -}}

{{/* The RBAC rules of files/rbac-rules.yaml, as a dict. */}}
{{- define "kinfluence.rbacRules" -}}
{{- .Files.Get "files/rbac-rules.yaml" | fromYaml | toJson -}}
{{- end -}}

{{/* Fail rendering on an unknown operator.scope (values.schema.json also rejects it). */}}
{{- define "kinfluence.clusterScoped" -}}
{{- if eq .Values.operator.scope "cluster" -}}
true
{{- else if eq .Values.operator.scope "namespaced" -}}
{{- else -}}
{{- fail (printf "operator.scope must be namespaced or cluster, got %q" .Values.operator.scope) -}}
{{- end -}}
{{- end -}}

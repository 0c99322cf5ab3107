{{- define "matchgate.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "matchgate.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "matchgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "matchgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "matchgate.labels" -}}
{{ include "matchgate.selectorLabels" . }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "matchgate.secretName" -}}
{{- default (include "matchgate.fullname" .) .Values.existingSecret -}}
{{- end -}}

{{/* The secret keys and the variables they fill. */}}
{{- define "matchgate.secretKeys" -}}
jwt-secret: MATCHGATE_JWT_SECRET
admin-token: MATCHGATE_ADMIN_TOKEN
redis-url: MATCHGATE_REDIS_URL
turn-secret: MATCHGATE_TURN_SECRET
database-url: MATCHGATE_DATABASE_URL
{{- end -}}

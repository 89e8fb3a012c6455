{{/*
The control plane's name is fixed: injected proxies, the webhook's serving certificate
and the root ConfigMap name it (control-plane/src/inject, webhook.rs).
*/}}
{{- define "tessera.checkNamespace" -}}
{{- if ne .Release.Namespace "tessera-system" -}}
{{- fail "install Tessera into the namespace tessera-system (helm install --namespace tessera-system --create-namespace): injected proxies and the webhook's certificate name tessera-control-plane.tessera-system.svc" -}}
{{- end -}}
{{- end -}}

{{- define "tessera.tag" -}}
{{- .Values.images.tag | default .Chart.AppVersion -}}
{{- end -}}

{{- define "tessera.image" -}}
{{- printf "%s/tessera:%s" .Values.images.registry (include "tessera.tag" .) -}}
{{- end -}}

{{- define "tessera.proxyImage" -}}
{{- printf "%s/tessera-proxy:%s" .Values.images.registry (include "tessera.tag" .) -}}
{{- end -}}

{{- define "tessera.labels" -}}
app.kubernetes.io/name: tessera
app.kubernetes.io/part-of: tessera
app.kubernetes.io/version: {{ include "tessera.tag" . | quote }}
{{- end -}}

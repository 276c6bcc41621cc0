{{/*
Paths baked into the image by the Dockerfile. They are a contract with the image, not values.
*/}}
{{- define "celeriac.binDir" -}}{{ trimSuffix "/" (default "/usr/local/bin" .Values.workers.binDir) }}{{- end -}}
{{- define "celeriac.binary" -}}{{ include "celeriac.binDir" . }}/celeriac{{- end -}}
{{- define "celeriac.readinessBinary" -}}{{ include "celeriac.binDir" . }}/worker-readiness{{- end -}}
{{- define "celeriac.livenessBinary" -}}{{ include "celeriac.binDir" . }}/worker-liveness{{- end -}}
{{- define "celeriac.stateDir" -}}/var/run/celeriac{{- end -}}

{{- define "celeriac.namespace" -}}
{{- default .Release.Namespace .Values.workers.namespace -}}
{{- end -}}

{{- define "celeriac.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: {{ .Values.workers.name }}
{{- end -}}

{{/*
Labels for every object. Built as a map so that commonLabels can never duplicate (or override)
a chart-managed key.
*/}}
{{- define "celeriac.labels" -}}
{{- $labels := include "celeriac.selectorLabels" . | fromYaml -}}
{{- $_ := set $labels "app.kubernetes.io/version" (.Values.workers.image.tag | default .Chart.AppVersion | trunc 63 | trimSuffix "-") -}}
{{- $_ := set $labels "app.kubernetes.io/managed-by" .Release.Service -}}
{{- $_ := set $labels "helm.sh/chart" (printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_") -}}
{{- toYaml (merge $labels (deepCopy (default (dict) .Values.workers.commonLabels))) -}}
{{- end -}}

{{/*
Pod template labels: object labels, the Workload Identity opt-in, then podLabels (which cannot
override the keys above).
*/}}
{{- define "celeriac.podLabels" -}}
{{- $labels := include "celeriac.labels" . | fromYaml -}}
{{- if .Values.workers.workloadIdentity.enabled -}}
{{- $_ := set $labels "azure.workload.identity/use" "true" -}}
{{- end -}}
{{- toYaml (merge $labels (deepCopy (default (dict) .Values.workers.podLabels))) -}}
{{- end -}}

{{- define "celeriac.image" -}}
{{- $img := .Values.workers.image -}}
{{- if $img.digest -}}
{{- printf "%s@%s" $img.repository $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $img.repository (default .Chart.AppVersion $img.tag) -}}
{{- end -}}
{{- end -}}

{{/*
Drain deadline (--shutdown-timeout) in seconds.
*/}}
{{- define "celeriac.shutdownTimeout" -}}
{{- $w := .Values.workers -}}
{{- $grace := int $w.terminationGracePeriodSeconds -}}
{{- $t := 0 -}}
{{- if not (kindIs "invalid" $w.shutdownTimeoutSeconds) -}}
{{- $t = int $w.shutdownTimeoutSeconds -}}
{{- else if $w.spot.enabled -}}
{{- $t = min (int $w.spot.shutdownTimeoutSeconds) (sub $grace (int $w.shutdownMarginSeconds)) | int -}}
{{- else -}}
{{- $t = sub $grace (int $w.shutdownMarginSeconds) | int -}}
{{- end -}}
{{- if lt $t 1 -}}
{{- fail (printf "workers: the computed --shutdown-timeout is %d s; raise terminationGracePeriodSeconds (%d) or lower shutdownMarginSeconds" $t $grace) -}}
{{- end -}}
{{- if ge $t $grace -}}
{{- fail (printf "workers.shutdownTimeoutSeconds (%d) must be below terminationGracePeriodSeconds (%d): the worker needs time to exit after the drain deadline" $t $grace) -}}
{{- end -}}
{{- if and $w.spot.enabled (not (include "celeriac.acksLate" .)) (ge $t (int (include "celeriac.spotNoticeSeconds" .))) -}}
{{- fail (printf "workers.shutdownTimeoutSeconds (%d) is past the spot eviction notice (%s s) and workers.spot.acksLate is false: tasks acknowledged early and still running would be handed back after the VM is gone, and lost. Set workers.spot.acksLate=true or a deadline below the notice" $t (include "celeriac.spotNoticeSeconds" .)) -}}
{{- end -}}
{{- $t -}}
{{- end -}}

{{/*
Seconds between Azure's spot eviction notice and the VM's end. Not a value: Azure fixes it.
*/}}
{{- define "celeriac.spotNoticeSeconds" -}}30{{- end -}}

{{/*
"true" when the worker acknowledges messages after their task ran: --acks-late rendered under
spot (workers.spot.acksLate) or given in workers.extraArgs. Empty otherwise.
*/}}
{{- define "celeriac.acksLate" -}}
{{- $w := .Values.workers -}}
{{- if or (and $w.spot.enabled $w.spot.acksLate) (has "--acks-late" (default (list) $w.extraArgs)) -}}
true
{{- end -}}
{{- end -}}

{{/*
Path of the private CA bundle for amqps:// (SSL_CERT_FILE), or empty when none is configured.
*/}}
{{- define "celeriac.brokerCAFile" -}}
{{- $ca := .Values.workers.brokerCA -}}
{{- if or $ca.secretName $ca.configMapName -}}
{{- printf "%s/%s" (trimSuffix "/" $ca.mountPath) $ca.key -}}
{{- end -}}
{{- end -}}

{{/*
The pool named by workers.nodeSelector (its kubernetes.azure.com/agentpool value), or empty.
*/}}
{{- define "celeriac.nodeSelectorPool" -}}
{{- get (default (dict) .Values.workers.nodeSelector) "kubernetes.azure.com/agentpool" -}}
{{- end -}}

{{/*
The spot node pool under spot: workers.spot.agentPool, or when empty the pool named by
workers.nodeSelector (the seed's layout: its spot pool is that pool). Empty when neither is set
(celeriac.validate refuses that).
*/}}
{{- define "celeriac.spotPool" -}}
{{- default (include "celeriac.nodeSelectorPool" .) .Values.workers.spot.agentPool -}}
{{- end -}}

{{/*
nodeSelector. A nodeSelector is ANDed with node affinity, so under spot the agentpool key is
dropped when it names another pool than the spot pool (normally the regular pool, which is then
the fallback of the preferred mode); the pool choice lives in the generated node affinity. When
the spot pool is the nodeSelector's own pool the key is kept, as in the seed.
*/}}
{{- define "celeriac.nodeSelector" -}}
{{- $sel := deepCopy (default (dict) .Values.workers.nodeSelector) -}}
{{- if and .Values.workers.spot.enabled (ne (include "celeriac.spotPool" .) (include "celeriac.nodeSelectorPool" .)) -}}
{{- $_ := unset $sel "kubernetes.azure.com/agentpool" -}}
{{- end -}}
{{- if $sel -}}
{{- toYaml $sel -}}
{{- end -}}
{{- end -}}

{{/*
Affinity: workers.affinity plus, under spot, the generated node affinity. Spot nodes are only
ever those of the spot pool (celeriac.spotPool): the pods tolerate the spot taint, so without
the pool term they could land on any spot pool of the cluster.
  required:  the spot pool only.
  preferred: the spot pool, preferred; else the regular pool named by nodeSelector's agentpool
             key, or (without one) any node that is not a spot node. The spot pool must then be
             another pool than the regular one (celeriac.validate).
*/}}
{{- define "celeriac.affinity" -}}
{{- $w := .Values.workers -}}
{{- $aff := deepCopy (default (dict) $w.affinity) -}}
{{- if $w.spot.enabled -}}
{{- if hasKey $aff "nodeAffinity" -}}
{{- fail "workers.affinity.nodeAffinity cannot be combined with workers.spot.enabled: the chart generates the node affinity for spot" -}}
{{- end -}}
{{- $spotExprs := list
      (dict "key" "kubernetes.azure.com/scalesetpriority" "operator" "In" "values" (list "spot"))
      (dict "key" "kubernetes.azure.com/agentpool" "operator" "In" "values" (list (include "celeriac.spotPool" .))) -}}
{{- $spotTerm := dict "matchExpressions" $spotExprs -}}
{{- $nodeAff := dict -}}
{{- if eq $w.spot.mode "required" -}}
{{- $_ := set $nodeAff "requiredDuringSchedulingIgnoredDuringExecution" (dict "nodeSelectorTerms" (list $spotTerm)) -}}
{{- else -}}
{{- $regularPool := include "celeriac.nodeSelectorPool" . -}}
{{- $fallback := dict "matchExpressions" (list (dict "key" "kubernetes.azure.com/scalesetpriority" "operator" "NotIn" "values" (list "spot"))) -}}
{{- if $regularPool -}}
{{- $fallback = dict "matchExpressions" (list (dict "key" "kubernetes.azure.com/agentpool" "operator" "In" "values" (list $regularPool))) -}}
{{- end -}}
{{- $_ := set $nodeAff "requiredDuringSchedulingIgnoredDuringExecution" (dict "nodeSelectorTerms" (list $spotTerm $fallback)) -}}
{{- $_ := set $nodeAff "preferredDuringSchedulingIgnoredDuringExecution" (list (dict "weight" 100 "preference" $spotTerm)) -}}
{{- end -}}
{{- $_ := set $aff "nodeAffinity" $nodeAff -}}
{{- end -}}
{{- if $aff -}}
{{- toYaml $aff -}}
{{- end -}}
{{- end -}}

{{- define "celeriac.tolerations" -}}
{{- $tol := default (list) .Values.workers.tolerations -}}
{{- if .Values.workers.spot.enabled -}}
{{- $tol = append $tol (dict "key" "kubernetes.azure.com/scalesetpriority" "operator" "Equal" "value" "spot" "effect" "NoSchedule") -}}
{{- end -}}
{{- if $tol -}}
{{- toYaml $tol -}}
{{- end -}}
{{- end -}}

{{/*
Whether the Secret reference in envFrom is optional. With App Configuration but no Key Vault
references the provider never creates the Secret, so a hard reference would block the pods.
*/}}
{{- define "celeriac.secretOptional" -}}
{{- if and .Values.appConfiguration.enabled (not .Values.appConfiguration.keyVault.enabled) -}}
true
{{- else -}}
{{- .Values.workers.envFrom.secret.optional -}}
{{- end -}}
{{- end -}}

{{/*
Cross-field checks the JSON schema cannot express (or expresses with poor messages).
*/}}
{{- define "celeriac.validate" -}}
{{- $w := .Values.workers -}}
{{- $ac := .Values.appConfiguration -}}
{{- if $w.spot.enabled -}}
{{- $spotPool := include "celeriac.spotPool" . -}}
{{- if not $spotPool -}}
{{- fail "workers.spot.enabled needs the name of the AKS spot node pool the pods may run on (its kubernetes.azure.com/agentpool label): set workers.spot.agentPool, or name that pool in workers.nodeSelector's kubernetes.azure.com/agentpool key" -}}
{{- end -}}
{{- if and (eq $w.spot.mode "preferred") (eq $spotPool (include "celeriac.nodeSelectorPool" .)) -}}
{{- fail (printf "workers.spot.mode=preferred falls back to the regular pool named in workers.nodeSelector (%s), so the spot pool must be another one: set workers.spot.agentPool to the spot pool's name, or use workers.spot.mode=required to run on %s alone" $spotPool $spotPool) -}}
{{- end -}}
{{- end -}}
{{- include "celeriac.validateExtensions" . -}}
{{- include "celeriac.validateBrokerAuth" . -}}
{{- if $ac.enabled -}}
{{- if or $w.envFrom.configMap.create $w.envFrom.secret.create -}}
{{- fail "appConfiguration.enabled: the App Configuration provider owns the ConfigMap/Secret; set workers.envFrom.configMap.create and workers.envFrom.secret.create to false" -}}
{{- end -}}
{{- if not $ac.endpoint -}}
{{- fail "appConfiguration.endpoint is required when appConfiguration.enabled (https://<store>.azconfig.io)" -}}
{{- end -}}
{{- if and $w.serviceAccount.create (not $w.serviceAccount.clientId) -}}
{{- fail "appConfiguration.enabled: the provider authenticates with the ServiceAccount's azure.workload.identity/client-id annotation; set workers.serviceAccount.clientId" -}}
{{- end -}}
{{- end -}}
{{- if $w.keda.enabled -}}
{{- if not $w.keda.queueName -}}
{{- fail "workers.keda.queueName is required when workers.keda.enabled (KEDA cannot expand $(BROKER_REQUESTS_QUEUE))" -}}
{{- end -}}
{{- if gt (int $w.keda.minReplicaCount) (int $w.keda.maxReplicaCount) -}}
{{- fail "workers.keda.minReplicaCount must not exceed workers.keda.maxReplicaCount" -}}
{{- end -}}
{{- $pdb := $w.podDisruptionBudget -}}
{{- if and $pdb.enabled (not (kindIs "invalid" $pdb.minAvailable)) (not (kindIs "string" $pdb.minAvailable)) -}}
{{- if ge (int $pdb.minAvailable) (int $w.keda.minReplicaCount) -}}
{{- fail "workers.podDisruptionBudget.minAvailable must be below workers.keda.minReplicaCount, or no pod could ever be evicted" -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Checks on the extension points (extraVolumes, extraVolumeMounts, initContainers,
extraContainers) and the broker CA: names and paths the chart already uses, and duplicates,
which the API server would refuse only at install time.
*/}}
{{- define "celeriac.validateExtensions" -}}
{{- $w := .Values.workers -}}
{{- $ca := $w.brokerCA -}}
{{- $stateDir := include "celeriac.stateDir" . -}}
{{- if and $ca.secretName $ca.configMapName -}}
{{- fail "workers.brokerCA: set secretName or configMapName, not both" -}}
{{- end -}}
{{- $volumes := list "state" "tmp" -}}
{{- $mounts := list $stateDir "/tmp" -}}
{{- if include "celeriac.brokerCAFile" . -}}
{{- if has (trimSuffix "/" $ca.mountPath) $mounts -}}
{{- fail (printf "workers.brokerCA.mountPath %q is already used in the worker container" $ca.mountPath) -}}
{{- end -}}
{{- $volumes = append $volumes "broker-ca" -}}
{{- $mounts = append $mounts (trimSuffix "/" $ca.mountPath) -}}
{{- range $w.extraEnv -}}
{{- if eq .name "SSL_CERT_FILE" -}}
{{- fail "workers.extraEnv sets SSL_CERT_FILE, which workers.brokerCA sets too: keep one of them" -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- range $w.extraVolumes -}}
{{- if has .name $volumes -}}
{{- fail (printf "workers.extraVolumes: the volume name %q is already used in the pod (chart volumes: state, tmp, broker-ca)" .name) -}}
{{- end -}}
{{- $volumes = append $volumes .name -}}
{{- end -}}
{{- range $w.extraVolumeMounts -}}
{{- $path := trimSuffix "/" .mountPath -}}
{{- if has $path $mounts -}}
{{- fail (printf "workers.extraVolumeMounts: the mount path %q is already used in the worker container" .mountPath) -}}
{{- end -}}
{{- $mounts = append $mounts $path -}}
{{- end -}}
{{- $containers := list "worker" -}}
{{- range concat (default (list) $w.initContainers) (default (list) $w.extraContainers) -}}
{{- if has .name $containers -}}
{{- fail (printf "workers.initContainers/extraContainers: the container name %q is used twice in the pod (the chart's container is \"worker\")" .name) -}}
{{- end -}}
{{- $containers = append $containers .name -}}
{{- end -}}
{{- end -}}

{{/*
Broker authentication with OAuth 2 tokens: what the worker needs to get one, and no password
beside it in a Secret this chart renders.
*/}}
{{- define "celeriac.validateBrokerAuth" -}}
{{- $w := .Values.workers -}}
{{- $a := $w.brokerAuth -}}
{{- if eq $a.mode "azure-workload-identity" -}}
{{- if not $a.oauthScope -}}
{{- fail "workers.brokerAuth.oauthScope is required with mode azure-workload-identity: api://<rabbitmq app client id>/.default" -}}
{{- end -}}
{{- if not $w.workloadIdentity.enabled -}}
{{- fail "workers.brokerAuth.mode azure-workload-identity needs workers.workloadIdentity.enabled: the webhook injects the identity's token only into labelled pods" -}}
{{- end -}}
{{- if and $w.serviceAccount.create (not $w.serviceAccount.clientId) -}}
{{- fail "workers.brokerAuth.mode azure-workload-identity needs workers.serviceAccount.clientId: the identity whose tokens RabbitMQ accepts" -}}
{{- end -}}
{{- else if eq $a.mode "oauth2-token-file" -}}
{{- if not $a.tokenFile -}}
{{- fail "workers.brokerAuth.tokenFile is required with mode oauth2-token-file (an absolute path the token file is mounted at)" -}}
{{- end -}}
{{- end -}}
{{- if and (ne $a.mode "password") $w.envFrom.secret.create -}}
{{- range $k := list "CELERY_BROKER_URL" "BROKER_URL" -}}
{{- $url := index $w.envFrom.secret.stringData $k | default "" | toString -}}
{{- if regexMatch "^[a-zA-Z]+://[^/@]*:[^/@]*@" $url -}}
{{- fail (printf "workers.envFrom.secret.stringData.%s carries a password, but with workers.brokerAuth.mode %s the password is the access token: give the URL without one" $k $a.mode) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

#!/usr/bin/env bash
# Creates a CA and a serving certificate for the injector, stores them in the
# ferry-injector-tls Secret, and puts the CA into the webhook's caBundle.
# Run again to rotate: the injector reloads the new files without a restart.
set -euo pipefail
ns=ferry-system
svc=ferry-injector
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT

openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=ferry-injector-ca" \
  -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=$svc.$ns.svc" \
  -keyout "$dir/tls.key" -out "$dir/tls.csr" 2>/dev/null
printf 'subjectAltName=DNS:%s,DNS:%s.%s,DNS:%s.%s.svc,DNS:%s.%s.svc.cluster.local\n' \
  "$svc" "$svc" "$ns" "$svc" "$ns" "$svc" "$ns" > "$dir/ext.cnf"
openssl x509 -req -in "$dir/tls.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
  -days 365 -extfile "$dir/ext.cnf" -out "$dir/tls.crt" 2>/dev/null

kubectl get namespace "$ns" >/dev/null 2>&1 || kubectl create namespace "$ns"
kubectl -n "$ns" create secret tls ferry-injector-tls --cert="$dir/tls.crt" --key="$dir/tls.key" \
  --dry-run=client -o yaml | kubectl apply -f -
ca=$(base64 -w0 < "$dir/ca.crt")
if kubectl get mutatingwebhookconfiguration ferry-injector >/dev/null 2>&1; then
  kubectl patch mutatingwebhookconfiguration ferry-injector --type=json -p "[
    {\"op\":\"replace\",\"path\":\"/webhooks/0/clientConfig/caBundle\",\"value\":\"$ca\"},
    {\"op\":\"replace\",\"path\":\"/webhooks/1/clientConfig/caBundle\",\"value\":\"$ca\"}]"
else
  echo "apply deploy/ first, then run this again to set the caBundle" >&2
fi

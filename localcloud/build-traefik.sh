#!/usr/bin/env bash
# Builds Traefik VERSION (e.g. 3.6.12) from Go modules into OUT_DIR/traefik, and copies the
# module's own traefik.io/v1alpha1 CRDs and RBAC next to it (the kubernetescrd provider waits
# for every one of its ten informers to sync: a missing CRD means no routes at all).
#
# Traefik's go.mod replaces and excludes modules, which only the main module may do, so a
# wrapper module repeats its directives. Idempotent: does nothing when the binary is there.
set -euo pipefail
version=${1:?usage: build-traefik.sh VERSION OUT_DIR}
out=${2:?usage: build-traefik.sh VERSION OUT_DIR}
[[ -x $out/traefik && -f $out/crds.yaml ]] && exit 0
work=$out.build
rm -rf "$work"
mkdir -p "$work" "$out"
cd "$work"
export GOFLAGS=-mod=mod CGO_ENABLED=0
module=github.com/traefik/traefik/v3
go mod init qdb.local/traefik-build >/dev/null 2>&1
info=$(go mod download -json "$module@v$version")
gomod=$(sed -n 's/.*"GoMod": "\(.*\)",/\1/p' <<<"$info")
dir=$(sed -n 's/.*"Dir": "\(.*\)",/\1/p' <<<"$info")
# `replace ( a => b v )` blocks and one-line replaces alike: every line with "=>".
awk '/=>/ { sub(/^replace[ \t]+/, ""); print $1 "=" $3 "@" $4 }' "$gomod" |
  while read -r r; do go mod edit "-replace=$r"; done
awk '$1 == "exclude" && NF == 3 { print $2 "@" $3 }' "$gomod" |
  while read -r e; do go mod edit "-exclude=$e"; done
go get -tool "$module/cmd/traefik@v$version"
go build -trimpath -ldflags "-s -w -X $module/pkg/version.Version=v$version" -o "$out/traefik.tmp" "$module/cmd/traefik"
ref=$dir/docs/content/reference/dynamic-configuration
cp "$ref/kubernetes-crd-definition-v1.yml" "$out/crds.yaml"
cp "$ref/kubernetes-crd-rbac.yml" "$out/rbac.yaml"
mv "$out/traefik.tmp" "$out/traefik"
cd /
rm -rf "$work"

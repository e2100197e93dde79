#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager, kube-scheduler and kubectl VERSION (e.g. 1.37.2)
# from Go modules into OUT_DIR (no prebuilt Kubernetes binaries can be fetched on these machines;
# kubectl too, so the tests' client matches the server instead of whatever the machine has).
#
# k8s.io/kubernetes cannot be `go install`ed: its go.mod replaces every staging module with a
# path inside its own tree. A wrapper module requires it and replaces each staging module with
# its matching published v0.<minor>.<patch> instead; the list is read from its own go.mod.
# Idempotent: builds only the binaries that are missing.
set -euo pipefail
version=${1:?usage: build-k8s.sh VERSION OUT_DIR}
out=${2:?usage: build-k8s.sh VERSION OUT_DIR}
bins=(kube-apiserver kube-controller-manager kube-scheduler kubectl)
have_all() { for b in "${bins[@]}"; do [[ -x "$out/$b" ]] || return 1; done; }
have_all && exit 0

work=$out.build
rm -rf "$work"
mkdir -p "$work" "$out"
cd "$work"
export GOFLAGS=-mod=mod CGO_ENABLED=0
staging_version=v0.${version#*.}
go mod init qdb.local/k8s-build >/dev/null 2>&1
gomod=$(go mod download -json "k8s.io/kubernetes@v$version" | sed -n 's/.*"GoMod": "\(.*\)",/\1/p')
[[ -f $gomod ]] || { echo "no go.mod for k8s.io/kubernetes@v$version" >&2; exit 1; }
mapfile -t staging < <(awk '$2 == "=>" && $3 ~ /^\.\/staging\// { print $1 }' "$gomod")
((${#staging[@]} > 20)) || { echo "found only ${#staging[@]} staging modules in $gomod" >&2; exit 1; }
for m in "${staging[@]}"; do go mod edit "-replace=$m=$m@$staging_version"; done
go get -tool "k8s.io/kubernetes/cmd/kube-apiserver@v$version" \
  "k8s.io/kubernetes/cmd/kube-controller-manager@v$version" "k8s.io/kubernetes/cmd/kube-scheduler@v$version" \
  "k8s.io/kubernetes/cmd/kubectl@v$version"

major=${version%%.*} rest=${version#*.}
minor=${rest%%.*}
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=v$version -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
  ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done
for b in "${bins[@]}"; do
  [[ -x $out/$b ]] && continue
  echo "building $b v$version"
  go build -trimpath -tags=selinux,notest,grpcnotrace -ldflags "$ldflags" -o "$out/$b.tmp" "k8s.io/kubernetes/cmd/$b"
  mv "$out/$b.tmp" "$out/$b"
done
cd /
rm -rf "$work"
have_all

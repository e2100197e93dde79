#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager and kube-scheduler 1.20.2 from Debian's source
# package into "$1" (no prebuilt Kubernetes binaries can be fetched on these machines).
# Idempotent: does nothing when the three binaries are already there.
set -euo pipefail
out=${1:?usage: build-k8s.sh OUT_DIR}
bins=(kube-apiserver kube-controller-manager kube-scheduler)
have_all() { for b in "${bins[@]}"; do [[ -x "$out/$b" ]] || return 1; done; }
have_all && exit 0

work=$(dirname "$out")/k8s-build
mkdir -p "$work" "$out"
cd "$work"
if ! ls kubernetes_*.orig.tar.gz >/dev/null 2>&1; then
  apt-get source --download-only kubernetes
fi
src=$work/kubernetes-1.20.2
if [[ ! -d $src ]]; then
  tar xzf kubernetes_*.orig.tar.gz
fi
# The vendored reflect2 v1.0.1 segfaults under Go >= 1.18 on the first custom resource write;
# Debian's 1.0.2 source is a drop-in replacement.
r2=$src/vendor/github.com/modern-go/reflect2
if [[ ! -f $r2/.qdb-replaced ]]; then
  rm -rf "$r2"
  cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "$r2"
  rm -f "$r2/go.mod" "$r2/go.sum"
  touch "$r2/.qdb-replaced"
fi
mkdir -p "$src/.go/src/k8s.io"
ln -sfn ../../.. "$src/.go/src/k8s.io/kubernetes"
cd "$src"
GOPATH=$src/.go CGO_ENABLED=0 GOFLAGS= make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler"
for b in "${bins[@]}"; do
  cp "_output/local/bin/linux/amd64/$b" "$out/$b.tmp" && mv "$out/$b.tmp" "$out/$b"
done
have_all

#!/usr/bin/env bash
# Builds etcd VERSION (e.g. 3.6.16) from Go modules into OUT_DIR/etcd: Debian's etcd is 3.4, older
# than current Kubernetes supports. Idempotent: does nothing when the binary is already there.
set -euo pipefail
version=${1:?usage: build-etcd.sh VERSION OUT_DIR}
out=${2:?usage: build-etcd.sh VERSION OUT_DIR}
[[ -x $out/etcd ]] && exit 0
work=$out.build
rm -rf "$work"
mkdir -p "$work" "$out"
cd "$work"
export GOFLAGS=-mod=mod CGO_ENABLED=0
go mod init qdb.local/etcd-build >/dev/null 2>&1
go get -tool "go.etcd.io/etcd/server/v3@v$version"
go build -trimpath -ldflags "-s -w" -o "$out/etcd.tmp" go.etcd.io/etcd/server/v3
mv "$out/etcd.tmp" "$out/etcd"
cd /
rm -rf "$work"

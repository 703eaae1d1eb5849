#!/usr/bin/env bash
# Build Toxiproxy (github.com/Shopify/toxiproxy, a Go module) for the reliability suite's network-fault tests.
#
#   bash tests/reliability/tools/build-toxiproxy.sh      -> prints the path of toxiproxy-server
#
# Installs toxiproxy-server and toxiproxy-cli, at the pinned version below, with `go install` from the Go module
# proxy into tests/reliability/.tools/toxiproxy-<version>/ (gitignored). Idempotent: does nothing when both
# binaries are already there. No Toxiproxy code is kept in the repository.
#
# Environment (optional):
#   GO                       the go command (default: go on PATH, else /usr/local/go/bin/go)
#   PEERSYNC_TOXIPROXY_DIR   where to install (default tests/reliability/.tools/toxiproxy-<version>)
set -euo pipefail

VERSION=v2.12.0
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DEST="$(realpath -m "${PEERSYNC_TOXIPROXY_DIR:-$HERE/../.tools/toxiproxy-$VERSION}")"
SERVER="$DEST/toxiproxy-server"
CLI="$DEST/toxiproxy-cli"

log() { printf 'build-toxiproxy: %s\n' "$*" >&2; }

if [[ -x "$SERVER" && -x "$CLI" ]]; then
	echo "$SERVER"
	exit 0
fi

GO="${GO:-}"
if [[ -z "$GO" ]]; then
	if command -v go >/dev/null 2>&1; then
		GO=go
	elif [[ -x /usr/local/go/bin/go ]]; then
		GO=/usr/local/go/bin/go
	else
		log "ERROR: Go not found (set GO=/path/to/go); Toxiproxy $VERSION is built from source with go install"
		exit 3
	fi
fi

mkdir -p "$DEST"
if [[ -z "${HOME:-}" ]]; then # go needs somewhere for its module and build caches
	export GOPATH="$DEST/../gopath" GOCACHE="$DEST/../gocache"
fi
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
started=$SECONDS
log "go install github.com/Shopify/toxiproxy/v2/cmd/{server,cli}@$VERSION (first build downloads the module) ..."
# GOFLAGS=-mod=mod: go install pkg@version ignores any go.mod around us, but a GOFLAGS from the environment might not.
(
	cd "$WORK"
	GOBIN="$WORK/bin" GOFLAGS=-mod=mod "$GO" install "github.com/Shopify/toxiproxy/v2/cmd/server@$VERSION"
	GOBIN="$WORK/bin" GOFLAGS=-mod=mod "$GO" install "github.com/Shopify/toxiproxy/v2/cmd/cli@$VERSION"
) >&2
mv "$WORK/bin/server" "$SERVER.tmp" && mv "$SERVER.tmp" "$SERVER"
mv "$WORK/bin/cli" "$CLI.tmp" && mv "$CLI.tmp" "$CLI"
log "built $VERSION in $((SECONDS - started)) s: $DEST"
echo "$SERVER"

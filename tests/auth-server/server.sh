#!/usr/bin/env bash
# peersync test authorization server: install, start, stop oidc-provider (npm) at http://127.0.0.1:PORT.
#
# Usage: server.sh install|start CONFIG.json|stop|restart CONFIG.json|status|url|log [N]
#
# The configuration (clients, scopes, token lifetimes, signing key) is a JSON file the test harness writes
# (tests/authserver.py); see server.mjs. Environment (optional):
#   PEERSYNC_AUTHZ_PORT            port on 127.0.0.1 (default 8190); must equal "port" in the config
#   PEERSYNC_AUTHZ_START_TIMEOUT   seconds to wait for the discovery document (default 60)
#   PEERSYNC_AUTHZ_RUN_DIR         pid and log files (default <this dir>/target/run)
# See README.md beside this file.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PORT="${PEERSYNC_AUTHZ_PORT:-8190}"
HOST=127.0.0.1
ISSUER="http://${HOST}:${PORT}"
START_TIMEOUT="${PEERSYNC_AUTHZ_START_TIMEOUT:-60}"
RUN_DIR="${PEERSYNC_AUTHZ_RUN_DIR:-$HERE/target/run}"
PID_FILE="$RUN_DIR/auth-server-$PORT.pid"
LOG_FILE="$RUN_DIR/auth-server-$PORT.log"
STAMP_FILE="$HERE/node_modules/.peersync-install.stamp"

log() { printf 'auth-server: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

is_ready() {
	python3 - "$ISSUER/.well-known/openid-configuration" <<'PY' >/dev/null 2>&1
import json, sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=5) as r:
    assert "token_endpoint" in json.load(r)
PY
}

our_pid() {
	[[ -f "$PID_FILE" ]] || return 1
	local pid
	pid="$(cat "$PID_FILE" 2>/dev/null || true)"
	[[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
	tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "server.mjs" || return 1
	echo "$pid"
}

cmd_install() {
	command -v node >/dev/null 2>&1 || die "node not found (Node.js 20.19+ needed for oidc-provider 9)"
	local want
	want="$(sha256sum "$HERE/package.json" "$HERE/package-lock.json" | sha256sum | cut -d' ' -f1)"
	if [[ -f "$STAMP_FILE" && "$(cat "$STAMP_FILE")" == "$want" ]]; then
		return 0
	fi
	log "installing oidc-provider from the npm registry (npm ci) ..."
	(cd "$HERE" && npm ci --no-audit --no-fund --loglevel=error >&2) || die "npm ci failed"
	echo "$want" >"$STAMP_FILE"
}

cmd_start() {
	local config="${1:-}"
	[[ -n "$config" && -f "$config" ]] || die "usage: server.sh start CONFIG.json (the harness writes it)"
	if our_pid >/dev/null; then
		die "already running on port $PORT (pid $(our_pid)); stop it first, or use restart"
	fi
	if (exec 3<>"/dev/tcp/$HOST/$PORT") 2>/dev/null; then
		die "port $PORT on $HOST is in use by another process; choose another with PEERSYNC_AUTHZ_PORT"
	fi
	cmd_install
	mkdir -p "$RUN_DIR"
	(
		cd "$HERE"
		exec node server.mjs "$config" </dev/null >>"$LOG_FILE" 2>&1
	) &
	local pid=$! t0=$SECONDS
	echo "$pid" >"$PID_FILE"
	while ! is_ready; do
		if ! kill -0 "$pid" 2>/dev/null; then
			rm -f "$PID_FILE"
			tail -n 40 "$LOG_FILE" >&2 || true
			die "the server process died (log: $LOG_FILE)"
		fi
		if ((SECONDS - t0 >= START_TIMEOUT)); then
			kill -TERM "$pid" 2>/dev/null || true
			rm -f "$PID_FILE"
			die "not ready after ${START_TIMEOUT}s (log: $LOG_FILE)"
		fi
		sleep 0.2
	done
	log "ready (pid $pid): $ISSUER"
	echo "$ISSUER"
}

cmd_stop() {
	local pid waited=0
	if pid="$(our_pid)"; then
		kill -TERM "$pid" 2>/dev/null || true
		while kill -0 "$pid" 2>/dev/null && ((waited < 50)); do
			sleep 0.1
			waited=$((waited + 1))
		done
		kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
		log "stopped pid $pid"
	else
		log "not running"
	fi
	rm -f "$PID_FILE"
}

cmd_status() {
	local pid
	if pid="$(our_pid)"; then
		echo "running $ISSUER (pid $pid)"
		return 0
	fi
	echo "stopped $ISSUER"
	return 3
}

case "${1:-}" in
	install) cmd_install ;;
	start) cmd_start "${2:-}" ;;
	stop) cmd_stop ;;
	restart) cmd_stop && cmd_start "${2:-}" ;;
	status) cmd_status ;;
	url) echo "$ISSUER" ;;
	log) tail -n "${2:-100}" "$LOG_FILE" ;;
	*)
		echo "usage: $0 install|start CONFIG.json|stop|restart CONFIG.json|status|url|log [N]" >&2
		exit 2
		;;
esac

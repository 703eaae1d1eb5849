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

BASE_URL="$ISSUER"
STOP_GRACE=5
PORT_VARIABLE=PEERSYNC_AUTHZ_PORT
PROCESS_MATCH="server.mjs"
RUN_FILES=()
NAME=auth-server
# shellcheck source=../launcher.sh
source "$HERE/../launcher.sh"

is_ready() {
	python3 - "$ISSUER/.well-known/openid-configuration" <<'PY' >/dev/null 2>&1
import json, sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=5) as r:
    assert "token_endpoint" in json.load(r)
PY
}

cmd_install() { npm_install "$STAMP_FILE" package.json package-lock.json; }

cmd_start() {
	local config="${1:-}"
	[[ -n "$config" && -f "$config" ]] || die "usage: server.sh start CONFIG.json (the harness writes it)"
	with_lock
	if our_pid >/dev/null; then
		die "already running on port $PORT (pid $(our_pid)); stop it first, or use restart"
	fi
	require_free_port
	cmd_install
	launch node server.mjs "$config"
	wait_until_ready "$LAUNCHED_PID" 0.2 40
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

#!/usr/bin/env bash
# peersync's second test FHIR server: install, start, stop Medplum's FHIR engine (in memory) at
# http://127.0.0.1:${PEERSYNC_MEDPLUM_PORT:-8103}/fhir/R4.
#
# Usage: server.sh install|start|stop|restart|status|url|log [N]
#
# Environment (all optional):
#   PEERSYNC_MEDPLUM_PORT           port on 127.0.0.1 (default 8103)
#   PEERSYNC_MEDPLUM_START_TIMEOUT  seconds to wait for readiness (default 120)
#   PEERSYNC_MEDPLUM_STOP_GRACE     seconds between TERM and KILL on stop (default 10)
#   PEERSYNC_MEDPLUM_RUN_DIR        where pid and log files go (default <this dir>/run)
#   NODE, NPM                       Node.js 20.19+ and npm commands (default node, npm)
# See README.md beside this file.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PORT="${PEERSYNC_MEDPLUM_PORT:-8103}"
HOST=127.0.0.1
BASE_URL="http://${HOST}:${PORT}/fhir/R4"
START_TIMEOUT="${PEERSYNC_MEDPLUM_START_TIMEOUT:-120}"
STOP_GRACE="${PEERSYNC_MEDPLUM_STOP_GRACE:-10}"
RUN_DIR="${PEERSYNC_MEDPLUM_RUN_DIR:-$HERE/run}"
NODE="${NODE:-node}"
NPM="${NPM:-npm}"
PID_FILE="$RUN_DIR/medplum-server-$PORT.pid"
LOG_FILE="$RUN_DIR/medplum-server-$PORT.log"
INSTALL_STAMP="$HERE/node_modules/.peersync-lock.sha256"
PORT_VARIABLE=PEERSYNC_MEDPLUM_PORT
PROCESS_MATCH="$HERE/server.mjs"
RUN_FILES=()
NAME=medplum-server
# shellcheck source=../launcher.sh
source "$HERE/../launcher.sh"

is_ready() {
	local body
	body="$(curl -fsS --max-time 5 -H 'Accept: application/fhir+json' "$BASE_URL/metadata" 2>/dev/null)" || return 1
	grep -q '"resourceType" *: *"CapabilityStatement"' <<<"$body"
}

cmd_install() { npm_install "$INSTALL_STAMP" package-lock.json; }

cmd_start() {
	with_lock
	local pid
	if pid="$(our_pid)"; then
		if is_ready; then
			log "already running (pid $pid) at $BASE_URL"
			echo "$BASE_URL"
			return 0
		fi
		log "pid $pid is alive but not answering; waiting for it"
	else
		require_free_port
		cmd_install
		echo "# $(date -u +%Y-%m-%dT%H:%M:%SZ) server.sh start: port=$PORT" >"$LOG_FILE"
		PEERSYNC_MEDPLUM_PORT="$PORT" launch "$NODE" "$HERE/server.mjs"
		pid=$LAUNCHED_PID
	fi
	wait_until_ready "$pid" 0.5 40
}

case "${1:-}" in
	install) cmd_install ;;
	start) cmd_start ;;
	stop) cmd_stop ;;
	restart) cmd_stop && cmd_start ;;
	status) cmd_status ;;
	url) echo "$BASE_URL" ;;
	log) tail -n "${2:-100}" "$LOG_FILE" ;;
	*)
		echo "usage: $0 install|start|stop|restart|status|url|log [N]" >&2
		exit 2
		;;
esac

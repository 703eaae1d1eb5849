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

log() { printf 'medplum-server: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

is_ready() {
	local body
	body="$(curl -fsS --max-time 5 -H 'Accept: application/fhir+json' "$BASE_URL/metadata" 2>/dev/null)" || return 1
	grep -q '"resourceType" *: *"CapabilityStatement"' <<<"$body"
}

port_in_use() {
	(exec 3<>"/dev/tcp/$HOST/$PORT") 2>/dev/null
}

# pid from our pid file, only if that process is alive and is our server
our_pid() {
	[[ -f "$PID_FILE" ]] || return 1
	local pid
	pid="$(cat "$PID_FILE" 2>/dev/null || true)"
	[[ "$pid" =~ ^[0-9]+$ ]] || return 1
	kill -0 "$pid" 2>/dev/null || return 1
	if [[ -r "/proc/$pid/cmdline" ]]; then
		tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "$HERE/server.mjs" || return 1
	fi
	echo "$pid"
}

with_lock() {
	mkdir -p "$RUN_DIR"
	if command -v flock >/dev/null 2>&1; then
		exec 9>"$RUN_DIR/.lock-$PORT"
		flock -w "$((START_TIMEOUT + 600))" 9 || die "could not get the lock $RUN_DIR/.lock-$PORT"
	fi
}

lock_hash() { sha256sum "$HERE/package-lock.json" | cut -d' ' -f1; }

# npm ci from the committed lock file, unless node_modules already holds exactly that lock file's packages.
cmd_install() {
	command -v "$NODE" >/dev/null 2>&1 || die "Node.js ('$NODE') not found; install Node.js 20.19 or newer"
	command -v "$NPM" >/dev/null 2>&1 || die "npm ('$NPM') not found; install npm with Node.js"
	if [[ -f "$INSTALL_STAMP" && "$(cat "$INSTALL_STAMP")" == "$(lock_hash)" ]]; then
		return 0
	fi
	mkdir -p "$RUN_DIR"
	log "npm ci (from package-lock.json) ..."
	if ! (cd "$HERE" && "$NPM" ci --no-audit --no-fund --loglevel=error) >"$RUN_DIR/install.log" 2>&1; then
		tail -n 40 "$RUN_DIR/install.log" >&2
		die "npm ci failed (full log: $RUN_DIR/install.log); the npm registry must be reachable"
	fi
	lock_hash >"$INSTALL_STAMP"
}

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
		rm -f "$PID_FILE"
		if port_in_use; then
			die "port $PORT on $HOST is in use by another process (not started by this script);" \
				"stop it or choose another port with PEERSYNC_MEDPLUM_PORT"
		fi
		cmd_install
		echo "# $(date -u +%Y-%m-%dT%H:%M:%SZ) server.sh start: port=$PORT" >"$LOG_FILE"
		local launcher=()
		command -v setsid >/dev/null 2>&1 && launcher=(setsid)
		(
			cd "$HERE"
			exec 9>&- # do not hand the start/stop lock to the server process
			PEERSYNC_MEDPLUM_PORT="$PORT" exec "${launcher[@]}" "$NODE" "$HERE/server.mjs" \
				</dev/null >>"$LOG_FILE" 2>&1
		) &
		pid=$!
		echo "$pid" >"$PID_FILE"
		log "started pid $pid (log: $LOG_FILE); waiting up to ${START_TIMEOUT}s for $BASE_URL/metadata"
	fi
	local deadline=$((SECONDS + START_TIMEOUT)) t0=$SECONDS
	while true; do
		if ! kill -0 "$pid" 2>/dev/null; then
			rm -f "$PID_FILE"
			log "the server process died; last lines of $LOG_FILE:"
			tail -n 40 "$LOG_FILE" >&2 || true
			exit 1
		fi
		if is_ready; then
			log "ready after $((SECONDS - t0)) s: $BASE_URL"
			echo "$BASE_URL"
			return 0
		fi
		if ((SECONDS >= deadline)); then
			log "not ready after ${START_TIMEOUT}s; last lines of $LOG_FILE:"
			tail -n 40 "$LOG_FILE" >&2 || true
			stop_pid "$pid"
			exit 1
		fi
		sleep 0.5
	done
}

stop_pid() {
	local pid="$1" waited=0
	kill -TERM "$pid" 2>/dev/null || true
	while kill -0 "$pid" 2>/dev/null && ((waited < STOP_GRACE * 2)); do
		sleep 0.5
		waited=$((waited + 1))
	done
	if kill -0 "$pid" 2>/dev/null; then
		log "pid $pid still alive after ${STOP_GRACE}s; sending KILL"
		kill -KILL "$pid" 2>/dev/null || true
	fi
	rm -f "$PID_FILE"
}

cmd_stop() {
	with_lock
	local pid
	if pid="$(our_pid)"; then
		log "stopping pid $pid"
		stop_pid "$pid"
		log "stopped"
	else
		rm -f "$PID_FILE"
		log "not running (no live server from $PID_FILE)"
	fi
}

cmd_status() {
	local pid
	if pid="$(our_pid)"; then
		if is_ready; then
			echo "running $BASE_URL (pid $pid)"
		else
			echo "running $BASE_URL (pid $pid, not answering yet)"
		fi
		return 0
	fi
	echo "stopped $BASE_URL"
	return 3
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

# shellcheck shell=bash
# What the local test servers' launchers (tests/*/server.sh) share: pid and lock files, starting in the
# background, waiting for readiness, stopping. Sourced, never run.
#
# The sourcing script sets NAME, HOST, PORT, BASE_URL, RUN_DIR, PID_FILE, LOG_FILE, START_TIMEOUT, STOP_GRACE,
# PORT_VARIABLE (the environment variable that chooses the port) and PROCESS_MATCH (text of the server's
# command line), and defines is_ready (true once the server answers).

log() { printf '%s: %s\n' "$NAME" "$*" >&2; }
die() {
	log "ERROR: $*"
	exit 1
}

port_in_use() {
	(exec 3<>"/dev/tcp/$HOST/$PORT") 2>/dev/null
}

# The pid from our pid file, only if that process is alive and is our server.
our_pid() {
	[[ -f "$PID_FILE" ]] || return 1
	local pid
	pid="$(cat "$PID_FILE" 2>/dev/null || true)"
	[[ "$pid" =~ ^[0-9]+$ ]] || return 1
	kill -0 "$pid" 2>/dev/null || return 1
	if [[ -r "/proc/$pid/cmdline" ]]; then
		tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$PROCESS_MATCH" || return 1
	fi
	echo "$pid"
}

# One start or stop at a time per port (pytest workers and make may race).
with_lock() {
	mkdir -p "$RUN_DIR"
	if command -v flock >/dev/null 2>&1; then
		exec 9>"$RUN_DIR/.lock-$PORT"
		flock -w "$((START_TIMEOUT + 600))" 9 || die "could not get the lock $RUN_DIR/.lock-$PORT"
	fi
}

# Die unless the port is free for a server of ours (call when our_pid found none).
require_free_port() {
	rm -f "$PID_FILE"
	if port_in_use; then
		die "port $PORT on $HOST is in use by another process (not started by this script);" \
			"stop it or choose another port with $PORT_VARIABLE"
	fi
}

# launch COMMAND...: start the server in the background (in its own session, from this folder, its output
# appended to LOG_FILE) and record its pid in PID_FILE and LAUNCHED_PID.
launch() {
	mkdir -p "$RUN_DIR"
	local launcher=()
	command -v setsid >/dev/null 2>&1 && launcher=(setsid)
	(
		cd "$HERE"
		exec 9>&- # do not hand the start/stop lock to the server process
		exec "${launcher[@]}" "$@" </dev/null >>"$LOG_FILE" 2>&1
	) &
	LAUNCHED_PID=$!
	echo "$LAUNCHED_PID" >"$PID_FILE"
	log "started pid $LAUNCHED_PID (log: $LOG_FILE); waiting up to ${START_TIMEOUT}s for $BASE_URL"
}

# wait_until_ready PID POLL_SECONDS LOG_LINES: print BASE_URL once the server answers; exit 1 (with the log's
# last lines) when the process dies or START_TIMEOUT passes.
wait_until_ready() {
	local pid="$1" poll="$2" lines="$3" deadline=$((SECONDS + START_TIMEOUT)) t0=$SECONDS
	while true; do
		if ! kill -0 "$pid" 2>/dev/null; then
			rm -f "$PID_FILE"
			log "the server process died; last lines of $LOG_FILE:"
			tail -n "$lines" "$LOG_FILE" >&2 || true
			exit 1
		fi
		if is_ready; then
			log "ready after $((SECONDS - t0)) s: $BASE_URL"
			echo "$BASE_URL"
			return 0
		fi
		if ((SECONDS >= deadline)); then
			log "not ready after ${START_TIMEOUT}s; last lines of $LOG_FILE:"
			tail -n "$lines" "$LOG_FILE" >&2 || true
			stop_pid "$pid"
			exit 1
		fi
		sleep "$poll"
	done
}

# TERM, then KILL after STOP_GRACE seconds; removes the pid file and any RUN_FILES the script names.
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
		sleep 0.5
	fi
	rm -f "$PID_FILE" "${RUN_FILES[@]}"
}

cmd_stop() {
	with_lock
	local pid
	if pid="$(our_pid)"; then
		log "stopping pid $pid"
		stop_pid "$pid"
		log "stopped"
	else
		rm -f "$PID_FILE" "${RUN_FILES[@]}"
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

# npm_install STAMP_FILE FILE...: `npm ci` from the committed lock file, unless the stamp says node_modules
# already holds what these files describe.
npm_install() {
	local stamp="$1" want
	shift
	command -v "${NODE:-node}" >/dev/null 2>&1 || die "Node.js ('${NODE:-node}') not found; install Node.js 20.19+"
	command -v "${NPM:-npm}" >/dev/null 2>&1 || die "npm ('${NPM:-npm}') not found; install npm with Node.js"
	want="$(cd "$HERE" && sha256sum "$@" | sha256sum | cut -d' ' -f1)"
	if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
		return 0
	fi
	mkdir -p "$RUN_DIR"
	log "npm ci (from package-lock.json) ..."
	if ! (cd "$HERE" && "${NPM:-npm}" ci --no-audit --no-fund --loglevel=error) >"$RUN_DIR/install.log" 2>&1; then
		tail -n 40 "$RUN_DIR/install.log" >&2
		die "npm ci failed (full log: $RUN_DIR/install.log); the npm registry must be reachable"
	fi
	echo "$want" >"$stamp"
}

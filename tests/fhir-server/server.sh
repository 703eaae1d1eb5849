#!/usr/bin/env bash
# peersync test FHIR server: build, start, stop and reset a local HAPI FHIR JPA server
# (R4, H2 in memory) at http://127.0.0.1:${PEERSYNC_FHIR_PORT:-8089}/fhir.
#
# Usage: server.sh build|start|stop|restart|status|reset|url|log
#
# Environment (all optional):
#   PEERSYNC_FHIR_PORT              port on 127.0.0.1 (default 8089)
#   PEERSYNC_FHIR_START_TIMEOUT     seconds to wait for readiness (default 300)
#   PEERSYNC_FHIR_STOP_GRACE        seconds between TERM and KILL on stop (default 30)
#   PEERSYNC_FHIR_RUN_DIR           where pid and log files go (default <this dir>/target/run)
#   PEERSYNC_FHIR_VALIDATE_REQUESTS true = validate every request, reject on ERROR (default false)
#   PEERSYNC_FHIR_JAVA_OPTS         extra JVM options, appended after the defaults (e.g. -Xmx1g)
#   PEERSYNC_FHIR_ARGS              extra Spring Boot arguments (e.g. --peersync.fhir.client-id-strategy=ANY)
#   PEERSYNC_FHIR_AUTH_JWKS_URL     SMART enforcement on: validate bearer JWTs with this JWK Set (default: off)
#   PEERSYNC_FHIR_AUTH_ISSUER       required issuer of the tokens (with _JWKS_URL)
#   PEERSYNC_FHIR_AUTH_AUDIENCE     required audience (optional)
#   PEERSYNC_FHIR_AUTH_TOKEN_URL    token endpoint published at /fhir/.well-known/smart-configuration (optional)
#   MVN                             Maven command (default mvn)
# See README.md beside this file.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PORT="${PEERSYNC_FHIR_PORT:-8089}"
HOST=127.0.0.1
BASE_URL="http://${HOST}:${PORT}/fhir"
START_TIMEOUT="${PEERSYNC_FHIR_START_TIMEOUT:-300}"
STOP_GRACE="${PEERSYNC_FHIR_STOP_GRACE:-30}"
RUN_DIR="${PEERSYNC_FHIR_RUN_DIR:-$HERE/target/run}"
VALIDATE_REQUESTS="${PEERSYNC_FHIR_VALIDATE_REQUESTS:-false}"
AUTH_JWKS_URL="${PEERSYNC_FHIR_AUTH_JWKS_URL:-}"
MVN="${MVN:-mvn}"

TARGET="$HERE/target"
CLASSPATH_FILE="$TARGET/classpath.txt"
STAMP_FILE="$TARGET/build.stamp"
PID_FILE="$RUN_DIR/fhir-server-$PORT.pid"
LOG_FILE="$RUN_DIR/fhir-server-$PORT.log"
SETTINGS_FILE="$RUN_DIR/fhir-server-$PORT.settings"
MAIN_CLASS=org.peersync.testserver.FhirTestServer

# JVM defaults: the H2 database lives in the heap; serial GC and C1-only JIT start fastest on 2 cores.
DEFAULT_JAVA_OPTS=(
	-Xms256m -Xmx2g
	-XX:+UseSerialGC
	-XX:TieredStopAtLevel=1
	-XX:+ExitOnOutOfMemoryError
	-Xss1m
	-Duser.timezone=UTC
	-Dfile.encoding=UTF-8
	-Djava.awt.headless=true
)

PORT_VARIABLE=PEERSYNC_FHIR_PORT
PROCESS_MATCH="$MAIN_CLASS"
RUN_FILES=("$SETTINGS_FILE")
NAME=fhir-server
# shellcheck source=../launcher.sh
source "$HERE/../launcher.sh"

# ------------------------------------------------------------------ helpers

# http_get URL -> body on stdout; non-zero on connection failure or HTTP error
http_get() {
	if command -v curl >/dev/null 2>&1; then
		curl -fsS --max-time 10 -H 'Accept: application/fhir+json' "$1"
	else
		python3 - "$1" <<'PY'
import sys, urllib.request
req = urllib.request.Request(sys.argv[1], headers={"Accept": "application/fhir+json"})
with urllib.request.urlopen(req, timeout=10) as r:
    sys.stdout.write(r.read().decode("utf-8"))
PY
	fi
}

# http_post_json URL BODY -> body on stdout; non-zero on error
http_post_json() {
	if command -v curl >/dev/null 2>&1; then
		curl -fsS --max-time 300 -X POST -H 'Content-Type: application/fhir+json' \
			-H 'Accept: application/fhir+json' --data-binary "$2" "$1"
	else
		python3 - "$1" "$2" <<'PY'
import sys, urllib.request
req = urllib.request.Request(sys.argv[1], data=sys.argv[2].encode("utf-8"), method="POST",
    headers={"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"})
with urllib.request.urlopen(req, timeout=300) as r:
    sys.stdout.write(r.read().decode("utf-8"))
PY
	fi
}

is_ready() {
	# capture first: `curl | grep -q` fails under pipefail when grep exits early (SIGPIPE)
	local body
	body="$(http_get "$BASE_URL/metadata" 2>/dev/null)" || return 1
	grep -q '"resourceType" *: *"CapabilityStatement"' <<<"$body"
}

source_hash() {
	(
		cd "$HERE"
		find pom.xml src -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
	) | sha256sum | cut -d' ' -f1
}

build_is_current() {
	[[ -f "$CLASSPATH_FILE" && -f "$STAMP_FILE" && -d "$TARGET/classes/org/peersync/testserver" ]] || return 1
	[[ "$(cat "$STAMP_FILE")" == "$(source_hash)" ]] || return 1
	local jar
	while IFS= read -r jar; do
		[[ -z "$jar" || -f "$jar" ]] || return 1
	done < <(tr ':' '\n' <"$CLASSPATH_FILE")
	return 0
}

# ------------------------------------------------------------------ commands

cmd_build() {
	if build_is_current; then
		log "build is up to date (skipping Maven)"
		return 0
	fi
	command -v "$MVN" >/dev/null 2>&1 || die "Maven ('$MVN') not found; install maven (Java 17 + Maven 3.8+)"
	mkdir -p "$RUN_DIR"
	rm -f "$STAMP_FILE"
	local hash started build_log="$RUN_DIR/build.log"
	hash="$(source_hash)"
	started=$SECONDS
	log "building with Maven (offline first) ..."
	if ! "$MVN" -B -ntp -q -o -f "$HERE/pom.xml" compile >"$build_log" 2>&1; then
		log "offline build failed (missing artifacts?); building online (first run downloads ~350 MB into ~/.m2) ..."
		if ! "$MVN" -B -ntp -q -f "$HERE/pom.xml" compile >"$build_log" 2>&1; then
			tail -n 60 "$build_log" >&2
			die "Maven build failed (full log: $build_log)"
		fi
	fi
	[[ -s "$CLASSPATH_FILE" ]] || die "Maven did not write $CLASSPATH_FILE"
	echo "$hash" >"$STAMP_FILE"
	log "build done in $((SECONDS - started)) s"
}

cmd_start() {
	with_lock
	local pid
	if pid="$(our_pid)"; then
		if is_ready; then
			local running_validate
			running_validate="$(sed -n 's/^validate_requests=//p' "$SETTINGS_FILE" 2>/dev/null || true)"
			if [[ -n "$running_validate" && "$running_validate" != "$VALIDATE_REQUESTS" ]]; then
				log "WARNING: server already running with validate_requests=$running_validate" \
					"(requested $VALIDATE_REQUESTS); restart it to change that"
			fi
			local running_auth
			running_auth="$(sed -n 's/^auth_jwks_url=//p' "$SETTINGS_FILE" 2>/dev/null || true)"
			if [[ "$running_auth" != "$AUTH_JWKS_URL" ]]; then
				log "WARNING: server already running with auth_jwks_url='${running_auth}'" \
					"(requested '${AUTH_JWKS_URL}'); restart it to change that"
			fi
			log "already running (pid $pid) at $BASE_URL"
			echo "$BASE_URL"
			return 0
		fi
		log "pid $pid is alive but not answering; waiting for it"
	else
		require_free_port
		cmd_build
		command -v java >/dev/null 2>&1 || die "java not found (Java 17+ required)"
		local extra_opts=() extra_args=()
		# shellcheck disable=SC2206
		[[ -n "${PEERSYNC_FHIR_JAVA_OPTS:-}" ]] && extra_opts=(${PEERSYNC_FHIR_JAVA_OPTS})
		# shellcheck disable=SC2206
		[[ -n "${PEERSYNC_FHIR_ARGS:-}" ]] && extra_args=(${PEERSYNC_FHIR_ARGS})
		if [[ -n "$AUTH_JWKS_URL" ]]; then
			[[ -n "${PEERSYNC_FHIR_AUTH_ISSUER:-}" ]] || die "PEERSYNC_FHIR_AUTH_JWKS_URL needs PEERSYNC_FHIR_AUTH_ISSUER"
			extra_args+=(--peersync.fhir.auth.jwks-url="$AUTH_JWKS_URL"
				--peersync.fhir.auth.issuer="$PEERSYNC_FHIR_AUTH_ISSUER"
				--peersync.fhir.auth.audience="${PEERSYNC_FHIR_AUTH_AUDIENCE:-}"
				--peersync.fhir.auth.token-url="${PEERSYNC_FHIR_AUTH_TOKEN_URL:-}")
		fi
		{
			echo "# $(date -u +%Y-%m-%dT%H:%M:%SZ) server.sh start: port=$PORT validate_requests=$VALIDATE_REQUESTS auth_jwks_url=${AUTH_JWKS_URL:-off}"
		} >"$LOG_FILE"
		launch java "${DEFAULT_JAVA_OPTS[@]}" "${extra_opts[@]}" \
			-cp "$TARGET/classes:$(cat "$CLASSPATH_FILE")" "$MAIN_CLASS" \
			--server.address="$HOST" --server.port="$PORT" \
			--peersync.fhir.validate.requests="$VALIDATE_REQUESTS" \
			"${extra_args[@]}"
		pid=$LAUNCHED_PID
		printf 'validate_requests=%s\nport=%s\nauth_jwks_url=%s\n' "$VALIDATE_REQUESTS" "$PORT" "$AUTH_JWKS_URL" >"$SETTINGS_FILE"
	fi
	wait_until_ready "$pid" 1 80
}

cmd_reset() {
	is_ready || die "no server answering at $BASE_URL (start it first)"
	local body out
	body='{"resourceType":"Parameters","parameter":[{"name":"expungeEverything","valueBoolean":true}]}'
	out="$(http_post_json "$BASE_URL/\$expunge" "$body")" || die "\$expunge failed"
	grep -q '"resourceType" *: *"Parameters"' <<<"$out" || die "unexpected \$expunge response: $out"
	log "all data expunged"
}

case "${1:-}" in
	build) cmd_build ;;
	start) cmd_start ;;
	stop) cmd_stop ;;
	restart) cmd_stop && cmd_start ;;
	status) cmd_status ;;
	reset) cmd_reset ;;
	url) echo "$BASE_URL" ;;
	log) tail -n "${2:-100}" "$LOG_FILE" ;;
	*)
		echo "usage: $0 build|start|stop|restart|status|reset|url|log [N]" >&2
		exit 2
		;;
esac

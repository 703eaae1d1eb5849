#!/usr/bin/env bash
# The wheel works on its own: build it from the tracked files, install it into a fresh virtualenv outside the
# repository, and run the offline commands on the demo from a folder outside the repository. A wheel that
# lacks the shipped profiles, terminology or US Core resources fails here. Run by `make wheel-check` (.ci/run).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
python=${PYTHON:-python3}
work=$(mktemp -d "${TMPDIR:-/tmp}/peersync-wheel-check.XXXXXX")
trap 'rm -rf "$work"' EXIT
unset PEERSYNC_MAPPINGS_DIR PEERSYNC_CONFIG
export PIP_DISABLE_PIP_VERSION_CHECK=1

step() { printf 'wheel-check: %s\n' "$*"; }

# Build from a copy of the files git knows (tracked and new, not ignored): what a clean clone would build.
step "copying the source tree"
mkdir "$work/src"
git -C "$repo" ls-files -z --cached --others --exclude-standard |
  (cd "$repo" && xargs -0 -I{} sh -c 'test -e "{}" && cp --parents "{}" "$0"' "$work/src")

step "building the wheel"
"$python" -m venv "$work/venv"
venv="$work/venv/bin"
"$venv/pip" wheel -q --no-deps --wheel-dir "$work/dist" "$work/src" 2>"$work/build.log" || { cat "$work/build.log"; exit 1; }
if grep -qi "deprecat" "$work/build.log"; then
  cat "$work/build.log"; echo "wheel-check: the build printed a deprecation warning" >&2; exit 1
fi
wheel=$(ls "$work"/dist/peersync-*.whl)
step "installing $(basename "$wheel") into a fresh virtualenv"
"$venv/pip" install -q "$wheel"

# Run from a folder outside the repository, with the demo inputs copied next to it. The demo has rejected rows
# on purpose, so check and map exit 65 (records rejected).
mkdir "$work/run"
cp -r "$repo/fixtures/demo/template" "$work/run/template"
cd "$work/run"
expect() {  # expect CODE COMMAND...: run it, fail unless it exits with CODE
  local want=$1 got=0; shift
  "$@" >"$work/out.txt" 2>&1 || got=$?
  if [ "$got" -ne "$want" ]; then
    cat "$work/out.txt"; echo "wheel-check: '$*' exited $got, expected $want" >&2; exit 1
  fi
  step "ok ($got): ${*#"$venv/"}"
}
expect 0 "$venv/peersync" profile check peersync-template
expect 0 "$venv/peersync" profile check redcap-example
expect 65 "$venv/peersync" check --profile peersync-template --rejects-dir rejects template
expect 65 "$venv/peersync" map --profile peersync-template --out out template
test -s out/summary.json && ls out/bundles/*.json >/dev/null
cat > peersync.toml <<'TOML'
[source]
profile = "peersync-template"
inputs = ["template"]
[server]
base_url = "http://127.0.0.1:9/fhir"
[auth]
mode = "none"
[sync]
ledger = "state/ledger.sqlite"
[output]
rejects_dir = "state/rejects"
TOML
expect 0 "$venv/peersync" config check peersync.toml
expect 0 "$venv/peersync" validate --offline --config peersync.toml
expect 0 "$venv/python" -c "from connector.assets import us_core_dir; assert len(list(us_core_dir().glob('*.json'))) == 38"
step "the wheel works"

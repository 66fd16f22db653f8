#!/usr/bin/env bash
# regguard demo: a real registry (docker-registry 2.8) on 127.0.0.1:5000, regguard
# in front of it on 127.0.0.1:5050 (admin/metrics on 127.0.0.1:9090), and a sample
# multi-arch image (linux/amd64 + linux/arm64 + buildx-style attestations).
#
#   deploy/demo.sh            start (installs docker-registry and skopeo if missing)
#   deploy/demo.sh incident   break the sample's linux/amd64 child the way registry 2.8's
#                             garbage-collect does; a pull straight from the registry fails,
#                             a pull through regguard succeeds from its vault; show what it saw
#   deploy/demo.sh heal       repair the registry from the vault (regguard heal) and watch
#                             the gauge clear
#   deploy/demo.sh stop       stop what start started (by PID) and remove its temp dir
#
# Ports: DEMO_REGISTRY_PORT (5000), DEMO_PORT (5050), DEMO_ADMIN_PORT (9090).
# REGGUARD_BIN: a regguard binary to run instead of building one with cargo.
# The state of a running demo is kept in this checkout (target/regguard-demo.state, or
# DEMO_STATE), so two checkouts can each run a demo on their own ports.
set -euo pipefail
here=$PWD
cd "$(dirname "$0")/.."
state="${DEMO_STATE:-$PWD/target/regguard-demo.state}"
repo=demo/app

# True while PID runs (a zombie or a gone PID is not running).
running() {
  local s
  s=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
  [ -n "$s" ] && [ "$s" != Z ]
}

stop() {
  [ -f "$state" ] || { echo "nothing to stop"; return 0; }
  # shellcheck disable=SC1090
  . "$state"
  for pid in ${pids:-}; do
    # Only what this demo started: the PID must still be a regguard or a docker-registry.
    case "$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" in
      *regguard*serve* | *docker-registry*serve*) ;;
      *) continue ;;
    esac
    kill "$pid" 2>/dev/null || continue
    for _ in $(seq 1 100); do running "$pid" || break; sleep 0.1; done
    if running "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
    echo "stopped pid $pid"
  done
  case "${work:-}" in
    /tmp/regguard-demo.*) rm -rf "$work" && echo "removed $work" ;;
  esac
  rm -f "$state"
}

load() {
  if [ ! -f "$state" ]; then
    echo "no demo is running in this checkout; start one with ./deploy/demo.sh" >&2
    exit 1
  fi
  # shellcheck disable=SC1090
  . "$state"
}

metrics() { curl -s "http://127.0.0.1:$admin_port/metrics"; }
gauge() { metrics | awk '/^registry_manifest_integrity_failures[{ ]/ {print $NF}'; }
# The handful of lines that tell the integrity story (not the hundreds of zero counters).
integrity_lines() {
  metrics | grep -E '^(registry_manifest_integrity_failures|regguard_broken_reference_info|regguard_client_not_found_total\{[^}]*referenced="true")' | grep -v '_total{[^}]*} 0$' || true
}

incident() {
  load
  local hex=${child#sha256:}
  local link="$work/storage/docker/registry/v2/repositories/$repo/_manifests/revisions/sha256/$hex/link"
  local before
  before=$(gauge)
  echo "== 1. Break the image the way registry 2.8's garbage-collect --delete-untagged does"
  echo "   the linux/amd64 child $child loses its revision link (its bytes stay on disk):"
  echo "   rm $link"
  if [ -f "$link" ]; then rm -f "$link"; else echo "   (already gone: the image is broken already)"; fi
  local by_tag by_digest
  by_tag=$(curl -s -o /dev/null -w '%{http_code}' -I -H 'Accept: application/vnd.oci.image.index.v1+json' \
    "http://127.0.0.1:$reg_port/v2/$repo/manifests/v1")
  by_digest=$(curl -s -o /dev/null -w '%{http_code}' -I -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
    "http://127.0.0.1:$reg_port/v2/$repo/manifests/$child")
  echo "   registry now: the index by tag answers $by_tag, the child by digest answers $by_digest"
  echo
  echo "== 2. Pull straight from the registry, as CI did before regguard"
  local pull
  pull=$(mktemp -d "$work/pull.XXXXXX")
  echo "   skopeo copy --all --src-tls-verify=false docker://127.0.0.1:$reg_port/$repo:v1 dir:$pull"
  if out=$(skopeo copy --quiet --all --src-tls-verify=false "docker://127.0.0.1:$reg_port/$repo:v1" "dir:$pull" 2>&1); then
    echo "   the pull succeeded (unexpected: was the link already restored?)"
  else
    echo "   the pull fails:"
    printf '%s\n' "$out" | sed 's/^/   | /'
  fi
  rm -rf "$pull"
  echo
  echo "== 2b. Pull through regguard"
  pull=$(mktemp -d "$work/pull.XXXXXX")
  echo "   skopeo copy --all --src-tls-verify=false docker://$image dir:$pull"
  if out=$(skopeo copy --quiet --all --src-tls-verify=false "docker://$image" "dir:$pull" 2>&1); then
    echo "   the pull succeeds: regguard answered the registry's 404 for the child with the exact"
    echo "   bytes from its vault (header x-regguard-served-from: vault):"
    curl -s -o /dev/null -D - -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
      "http://127.0.0.1:$port/v2/$repo/manifests/$child" | grep -iE '^(HTTP|x-regguard|docker-content-digest)' | sed 's/^/   | /'
  else
    echo "   the pull fails too (the vault does not hold it):"
    printf '%s\n' "$out" | sed 's/^/   | /'
  fi
  rm -rf "$pull"
  echo
  echo "== 3. What regguard saw"
  local after=""
  for _ in $(seq 1 100); do
    after=$(gauge)
    [ "${after:-0}" -ge 1 ] 2>/dev/null && break
    sleep 0.1
  done
  echo "   registry_manifest_integrity_failures: ${before:-?} -> ${after:-?}  (the cron probe's gauge)"
  echo "   the series alert RegistryIndexChildMissing fires on, and the 404 a client got (RegistryClientsHitMissingContent):"
  echo "   curl -s http://127.0.0.1:$admin_port/metrics | grep -E '^(registry_manifest_integrity_failures|regguard_broken_reference_info|regguard_client_not_found_total.*referenced=\"true\")'"
  integrity_lines | sed 's/^/   | /'
  echo "   curl -s http://127.0.0.1:$admin_port/integrity"
  curl -s "http://127.0.0.1:$admin_port/integrity" | python3 -m json.tool 2>/dev/null | sed 's/^/   | /' \
    || curl -s "http://127.0.0.1:$admin_port/integrity" | sed 's/^/   | /'
  echo "   the WARN line in $work/regguard.log:"
  grep -a 'WARN' "$work/regguard.log" | grep -a "$hex" | head -n 2 | sed 's/^/   | /' || true
  echo
  echo "The registry is still damaged (/integrity says served_from_vault). Repair it from the vault:"
  echo "  ./deploy/demo.sh heal"
}

heal() {
  load
  echo "$bin heal --registry http://127.0.0.1:$reg_port --vault $work/vault --insecure"
  "$bin" heal --registry "http://127.0.0.1:$reg_port" --vault "$work/vault" --insecure | sed 's/^/  | /' || true
  echo "regguard re-checks broken references every missing_ttl (5s here):"
  local g=""
  for _ in $(seq 1 300); do
    g=$(gauge)
    [ "${g:-1}" = 0 ] && break
    sleep 0.1
  done
  metrics | grep '^registry_manifest_integrity_failures' | sed 's/^/  | /'
  echo "  the last line about it in $work/regguard.log:"
  grep -a "${child#sha256:}" "$work/regguard.log" | tail -n 1 | sed 's/^/  | /' || true
}

case "${1:-start}" in
  stop) stop; exit 0 ;;
  incident) incident; exit 0 ;;
  heal) heal; exit 0 ;;
  start) ;;
  *) echo "usage: $0 [start|incident|heal|stop]" >&2; exit 2 ;;
esac

reg_port=${DEMO_REGISTRY_PORT:-5000}
port=${DEMO_PORT:-5050}
admin_port=${DEMO_ADMIN_PORT:-9090}
[ -f "$state" ] && stop

missing=()
for p in docker-registry skopeo; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
for p in "$reg_port" "$port" "$admin_port"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
    echo "port $p is in use; set DEMO_REGISTRY_PORT / DEMO_PORT / DEMO_ADMIN_PORT" >&2; exit 1
  fi
done

if [ -n "${REGGUARD_BIN:-}" ]; then
  case "$REGGUARD_BIN" in /*) bin=$REGGUARD_BIN ;; *) bin="$here/$REGGUARD_BIN" ;; esac
else
  cargo build --release --locked --quiet
  bin="${CARGO_TARGET_DIR:-$PWD/target}/release/regguard"
fi
mkdir -p "$(dirname "$state")"
work=$(mktemp -d /tmp/regguard-demo.XXXXXX)
mkdir -p "$work/storage"
# The state is written as soon as there is something to clean up, so `stop` always can.
save() {
  printf 'pids="%s"\nwork=%s\nreg_port=%s\nport=%s\nadmin_port=%s\nimage=%s\nindex=%s\nchild=%s\nbin=%s\n' \
    "${pids:-}" "$work" "$reg_port" "$port" "$admin_port" "${image:-}" "${index:-}" "${child:-}" "${bin:-}" >"$state"
}
save
trap 'echo "start failed; cleaning up" >&2; stop >&2' ERR
cat >"$work/registry.yml" <<YAML
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $work/storage
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$reg_port
YAML

/usr/bin/docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
reg_pid=$!
pids="$reg_pid"; save
for _ in $(seq 1 100); do
  curl -s -o /dev/null "http://127.0.0.1:$reg_port/v2/" && break
  sleep 0.1
done
curl -s -o /dev/null "http://127.0.0.1:$reg_port/v2/" || {
  echo "the registry did not start; its log:" >&2; cat "$work/registry.log" >&2; stop; exit 1
}

# A sample multi-arch image as an OCI layout, built with tar, gzip and sha256sum.
layout="$work/image"
mkdir -p "$layout/blobs/sha256"
put() { # put FILE -> prints "sha256:<hex> <size>" and stores the blob
  local hex size
  hex=$(sha256sum "$1" | cut -d' ' -f1); size=$(stat -c %s "$1")
  mv "$1" "$layout/blobs/sha256/$hex"; echo "sha256:$hex $size"
}
entries=""
for arch in amd64 arm64; do
  d="$work/rootfs-$arch"; mkdir -p "$d"; echo "hello from linux/$arch" >"$d/hello.txt"
  tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$d" -cf "$work/layer.tar" hello.txt
  diff_id="sha256:$(sha256sum "$work/layer.tar" | cut -d' ' -f1)"
  gzip -n -c "$work/layer.tar" >"$work/layer.tgz"; read -r layer lsize < <(put "$work/layer.tgz")
  printf '{"architecture":"%s","os":"linux","config":{"Cmd":["/hello"]},"rootfs":{"type":"layers","diff_ids":["%s"]}}' "$arch" "$diff_id" >"$work/config.json"
  read -r config csize < <(put "$work/config.json")
  printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"%s","size":%s}]}' \
    "$config" "$csize" "$layer" "$lsize" >"$work/manifest.json"
  read -r manifest msize < <(put "$work/manifest.json")
  [ "$arch" = amd64 ] && child=$manifest
  # The provenance attestation buildx attaches to every platform image.
  printf '{"_type":"https://in-toto.io/Statement/v0.1","predicateType":"https://slsa.dev/provenance/v0.2","subject":[{"name":"demo","digest":{"sha256":"%s"}}],"predicate":{}}' "${manifest#sha256:}" >"$work/att.json"
  read -r att asize < <(put "$work/att.json")
  printf '{"architecture":"unknown","os":"unknown","config":{},"rootfs":{"type":"layers","diff_ids":["%s"]}}' "$att" >"$work/attcfg.json"
  read -r attcfg acsize < <(put "$work/attcfg.json")
  printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":%s},"layers":[{"mediaType":"application/vnd.in-toto+json","digest":"%s","size":%s,"annotations":{"in-toto.io/predicate-type":"https://slsa.dev/provenance/v0.2"}}]}' \
    "$attcfg" "$acsize" "$att" "$asize" >"$work/attm.json"
  read -r attm amsize < <(put "$work/attm.json")
  entries="$entries{\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"digest\":\"$manifest\",\"size\":$msize,\"platform\":{\"architecture\":\"$arch\",\"os\":\"linux\"}},"
  entries="$entries{\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"digest\":\"$attm\",\"size\":$amsize,\"platform\":{\"architecture\":\"unknown\",\"os\":\"unknown\"},\"annotations\":{\"vnd.docker.reference.digest\":\"$manifest\",\"vnd.docker.reference.type\":\"attestation-manifest\"}},"
done
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[%s]}' "${entries%,}" >"$work/index.json.tmp"
read -r index isize < <(put "$work/index.json.tmp")
printf '{"imageLayoutVersion":"1.0.0"}' >"$layout/oci-layout"
printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.index.v1+json","digest":"%s","size":%s,"annotations":{"org.opencontainers.image.ref.name":"v1"}}]}' \
  "$index" "$isize" >"$layout/index.json"

# The sample goes into the registry first, as CI's pushes did before regguard was put in
# front, so regguard's first scan (at start-up) already finds it.
skopeo copy --quiet --all --preserve-digests --dest-tls-verify=false "oci:$layout:v1" \
  "docker://127.0.0.1:$reg_port/$repo:v1"

# missing_ttl 5s: broken references are re-checked every 5 s, so `heal` shows the gauge
# clear quickly (the default is 30s).
# The vault lives in the demo's temp dir and keeps layers too (the sample is tiny).
REGGUARD_SCAN_ENABLED=true REGGUARD_SCAN_INTERVAL=30s REGGUARD_METRICS_INSTANCE=demo \
  REGGUARD_VALIDATE_MISSING_TTL=5s REGGUARD_VAULT_URL="$work/vault" REGGUARD_VAULT_LAYERS=true \
  "$bin" serve --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin_port" \
  --upstream "http://127.0.0.1:$reg_port" >"$work/regguard.log" 2>&1 &
rg_pid=$!
pids="$rg_pid $reg_pid"
image="127.0.0.1:$port/$repo:v1"
save
for _ in $(seq 1 300); do
  curl -sf "http://127.0.0.1:$admin_port/readyz" >/dev/null && break
  sleep 0.1
done
curl -sf "http://127.0.0.1:$admin_port/readyz" >/dev/null || {
  echo "regguard did not become ready; its log:" >&2; cat "$work/regguard.log" >&2; stop; exit 1
}
# Wait for the first scan to finish, so the gauges below describe the sample image.
for _ in $(seq 1 300); do
  metrics | grep -Eq '^registry_manifest_integrity_last_run_timestamp(\{[^}]*\})? [1-9]' && break
  sleep 0.1
done

skopeo copy --quiet --all --preserve-digests --src-tls-verify=false "docker://$image" "oci:$work/pulled:v1"
# The vault keeps what the scan and the pull saw, in the background: wait until it is still.
vault_writes() { metrics | awk '/^regguard_vault_writes_total/ {n += $NF} END {print n + 0}'; }
last=-1
for _ in $(seq 1 100); do
  now=$(vault_writes)
  [ "$now" -gt 0 ] && [ "$now" = "$last" ] && break
  last=$now
  sleep 0.3
done

trap - ERR

cat <<MSG

regguard demo is up.
  registry      http://127.0.0.1:$reg_port          (pid $reg_pid, storage $work/storage)
  regguard      http://127.0.0.1:$port          (pid $rg_pid, log $work/regguard.log)
  metrics       http://127.0.0.1:$admin_port/metrics
  health        http://127.0.0.1:$admin_port/healthz   readiness http://127.0.0.1:$admin_port/readyz
  sample image  $image  (index $index: linux/amd64, linux/arm64, 2 attestations)
                pushed into the registry, scanned by regguard, pulled back through regguard
  vault         $work/vault   (what regguard has seen: $(vault_writes) objects kept)

Try:
  skopeo inspect --tls-verify=false --raw docker://$image
  curl -s http://127.0.0.1:$admin_port/metrics | grep '^regguard_requests_total' | grep -v ' 0\$'
  curl -s http://127.0.0.1:$admin_port/metrics | grep '^registry_manifest_integrity'   # scan, every 30s
  curl -s http://127.0.0.1:$admin_port/integrity          # broken references right now
  $bin check --insecure $image         # the image as a tree
  ./deploy/demo.sh incident                # break a child the way registry 2.8's GC does, and pull
  ./deploy/demo.sh heal                    # repair the registry from regguard's vault
Stop:
  ./deploy/demo.sh stop

MSG
metrics | grep '^registry_manifest_integrity' || true

#!/usr/bin/env bash
# regguard demo: a real registry (docker-registry 2.8) on 127.0.0.1:5000, regguard
# in front of it on 127.0.0.1:5050 (admin/metrics on 127.0.0.1:9090), and a sample
# multi-arch image (linux/amd64 + linux/arm64 + buildx-style attestations) pushed
# and pulled through regguard with skopeo.
#
#   deploy/demo.sh          start (installs docker-registry and skopeo if missing)
#   deploy/demo.sh stop     stop what the last start started (by PID)
#
# Ports: DEMO_REGISTRY_PORT (5000), DEMO_PORT (5050), DEMO_ADMIN_PORT (9090).
set -euo pipefail
cd "$(dirname "$0")/.."
state=/tmp/regguard-demo.state
reg_port=${DEMO_REGISTRY_PORT:-5000}
port=${DEMO_PORT:-5050}
admin_port=${DEMO_ADMIN_PORT:-9090}

stop() {
  [ -f "$state" ] || { echo "nothing to stop"; return 0; }
  # shellcheck disable=SC1090
  . "$state"
  for pid in ${pids:-}; do kill "$pid" 2>/dev/null && echo "stopped pid $pid" || true; done
  rm -f "$state"
}

if [ "${1:-}" = stop ]; then stop; exit 0; fi
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

cargo build --release --locked --quiet
work=$(mktemp -d /tmp/regguard-demo.XXXXXX)
mkdir -p "$work/storage"
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
for i in $(seq 1 100); do
  curl -s -o /dev/null "http://127.0.0.1:$reg_port/v2/" && break
  sleep 0.1
done
REGGUARD_SCAN_ENABLED=true REGGUARD_SCAN_INTERVAL=30s REGGUARD_METRICS_INSTANCE=demo \
  target/release/regguard serve --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin_port" \
  --upstream "http://127.0.0.1:$reg_port" >"$work/regguard.log" 2>&1 &
rg_pid=$!
printf 'pids="%s %s"\nwork=%s\n' "$rg_pid" "$reg_pid" "$work" >"$state"
for i in $(seq 1 100); do
  curl -sf "http://127.0.0.1:$admin_port/readyz" >/dev/null && break
  sleep 0.1
done

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

image="127.0.0.1:$port/demo/app:v1"
skopeo copy --quiet --all --preserve-digests --dest-tls-verify=false "oci:$layout:v1" "docker://$image"
skopeo copy --quiet --all --preserve-digests --src-tls-verify=false "docker://$image" "oci:$work/pulled:v1"

cat <<MSG

regguard demo is up.
  registry      http://127.0.0.1:$reg_port          (pid $reg_pid, storage $work/storage)
  regguard      http://127.0.0.1:$port          (pid $rg_pid, log $work/regguard.log)
  metrics       http://127.0.0.1:$admin_port/metrics
  health        http://127.0.0.1:$admin_port/healthz   readiness http://127.0.0.1:$admin_port/readyz
  sample image  $image  (index $index: linux/amd64, linux/arm64, 2 attestations)
                pushed and pulled back through regguard with skopeo

Try:
  skopeo inspect --tls-verify=false --raw docker://$image
  curl -s http://127.0.0.1:$admin_port/metrics | grep '^regguard_requests_total'
  curl -s http://127.0.0.1:$admin_port/metrics | grep '^registry_manifest_integrity'   # scan, every 30s
  curl -s http://127.0.0.1:$admin_port/integrity          # broken references right now
  target/release/regguard check --insecure $image         # the image as a tree
Stop:
  ./deploy/demo.sh stop

MSG
curl -s "http://127.0.0.1:$admin_port/metrics" | grep '^regguard_requests_total' | grep -v ' 0$' || true

#!/usr/bin/env bash
# Installs regguard as a systemd service:
#   /usr/local/bin/regguard                    the binary (BIN, default: a release build)
#   /etc/regguard/regguard.toml                the config (kept if it exists)
#   /usr/share/doc/regguard/README.md          the operator's guide (the unit's Documentation=)
#   /etc/systemd/system/regguard.service       the unit
# DESTDIR installs into a staging root instead (for packaging, or to look first).
# Then: put the TLS files at /etc/regguard/tls/{fullchain,privkey}.pem, scan credentials in
# /etc/regguard/env, and run `systemctl daemon-reload && systemctl enable --now regguard`.
set -euo pipefail
here=$PWD
cd "$(dirname "$0")/../.."
dest=${DESTDIR:-}
if [ -n "${BIN:-}" ]; then
  case "$BIN" in /*) bin=$BIN ;; *) bin="$here/$BIN" ;; esac
else
  cargo build --release --locked --quiet
  bin="${CARGO_TARGET_DIR:-$PWD/target}/release/regguard"
fi
install -D -m 0755 "$bin" "$dest/usr/local/bin/regguard"
if [ ! -e "$dest/etc/regguard/regguard.toml" ]; then
  install -D -m 0644 deploy/regguard.toml "$dest/etc/regguard/regguard.toml"
fi
install -D -m 0644 README.md "$dest/usr/share/doc/regguard/README.md"
install -D -m 0644 deploy/systemd/regguard.service "$dest/etc/systemd/system/regguard.service"
echo "installed regguard under ${dest:-/}"

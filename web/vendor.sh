#!/usr/bin/env bash
# Copies the browser terminal's third-party files from npm packages
# (pinned in package.json and package-lock.json) into web/vendor/, where
# the daemon's build includes them (crates/api/src/share.rs). With
# --check, copies nothing and fails if web/vendor/ differs from what npm
# installed: scripts/test.sh runs `npm ci` then this.
set -euo pipefail
cd "$(dirname "$0")"
files=(
  "node_modules/@xterm/xterm/lib/xterm.js:xterm.js"
  "node_modules/@xterm/xterm/css/xterm.css:xterm.css"
  "node_modules/@xterm/xterm/LICENSE:LICENSE.xterm"
  "node_modules/@xterm/addon-fit/lib/addon-fit.js:addon-fit.js"
  "node_modules/@xterm/addon-fit/LICENSE:LICENSE.addon-fit"
)
[ -d node_modules/@xterm ] || npm ci --no-audit --no-fund
status=0
for f in "${files[@]}"; do
  src=${f%%:*} dst=vendor/${f##*:}
  if [ "${1:-}" = --check ]; then
    if ! cmp -s "$src" "$dst"; then
      echo "web/$dst differs from web/$src (run web/vendor.sh)" >&2
      status=1
    fi
  else
    install -m 0644 "$src" "$dst"
  fi
done
exit $status

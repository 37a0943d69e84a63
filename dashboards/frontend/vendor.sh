#!/bin/sh
# Refresh the vendored chart library from the npm registry, pinned by package-lock.json.
# The copied files are committed, so running the platform never needs Node.js or a network.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out="$here/../static/vendor"
cd "$here"
npm ci --ignore-scripts --no-audit --no-fund
mkdir -p "$out"
cp node_modules/chart.js/dist/chart.umd.min.js "$out/chart.umd.min.js"
cp node_modules/chart.js/LICENSE.md "$out/chart.js.LICENSE.md"
version=$(node -p "require('./node_modules/chart.js/package.json').version")
printf 'chart.js %s from the npm registry (package-lock.json); MIT licence in chart.js.LICENSE.md\n' \
  "$version" > "$out/VERSIONS.txt"
rm -rf node_modules
echo "vendored chart.js $version into $out"

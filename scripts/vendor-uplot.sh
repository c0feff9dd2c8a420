#!/usr/bin/env bash
# Vendor uPlot (https://github.com/leeoniya/uPlot, MIT), the operators' panel's charting library, into
# serving/web/ from the npm registry: the package's tarball is checked against the registry's published
# integrity, then its minified IIFE build and style sheet are copied as uplot.js and uplot.css (unchanged), with
# its licence beside them. The page loads them from this origin (no CDN; its Content-Security-Policy allows
# 'self' only). Run at development time to move to another release:
#
#   scripts/vendor-uplot.sh [VERSION]        (default: the version vendored now)
#
# then update UPLOT_FILES in tests/protocol/test_web_pages.py with the sha256 sums this prints.
set -euo pipefail

VERSION=${1:-1.6.32}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

cd "$WORK"
expected=$(npm view "uplot@$VERSION" dist.integrity)
tarball=$(npm pack --silent "uplot@$VERSION")
actual="sha512-$(openssl dgst -sha512 -binary "$tarball" | base64 -w0)"
if [ "$actual" != "$expected" ]; then
  echo "uplot@$VERSION: the tarball's integrity $actual is not the registry's $expected" >&2
  exit 1
fi
tar xzf "$tarball"
cp package/dist/uPlot.iife.min.js "$ROOT/serving/web/uplot.js"
cp package/dist/uPlot.min.css "$ROOT/serving/web/uplot.css"
cp package/LICENSE "$ROOT/serving/web/uplot-LICENSE.txt"
echo "vendored uplot@$VERSION ($expected):"
(cd "$ROOT/serving/web" && sha256sum uplot.js uplot.css)

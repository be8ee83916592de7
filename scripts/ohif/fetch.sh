#!/usr/bin/env bash
# Fetch OHIF's prebuilt viewer (the npm package @ohif/app, whose dist/ is the built app) into
#   .cache/ohif/<version>/dist
# and print that folder. Idempotent: does nothing when the folder is already there. Needs npm and
# the npm registry, nothing else (no build).
#   bash scripts/ohif/fetch.sh            # the pinned version
#   OHIF_VERSION=3.13.2 bash scripts/ohif/fetch.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

version="${OHIF_VERSION:-3.13.2}"
cache=".cache/ohif/${version}"
dist="${cache}/dist"

if [ ! -f "${dist}/index.html" ] || [ ! -f "${dist}/app-config.js" ]; then
  command -v npm >/dev/null || { echo "npm is needed to fetch @ohif/app@${version}" >&2; exit 1; }
  mkdir -p "${cache}"
  work="$(mktemp -d "${cache}/.fetch.XXXXXX")"
  trap 'rm -rf "${work}"' EXIT
  echo "fetching @ohif/app@${version} with npm pack" >&2
  tarball="$(cd "${work}" && npm pack --silent "@ohif/app@${version}" | tail -n1)"
  tar -xzf "${work}/${tarball}" -C "${work}"
  [ -f "${work}/package/dist/index.html" ] || { echo "@ohif/app@${version} has no dist/index.html" >&2; exit 1; }
  rm -rf "${dist}"
  mv "${work}/package/dist" "${dist}"  # same filesystem: the folder appears whole or not at all
fi
echo "$(pwd)/${dist}"

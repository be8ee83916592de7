#!/bin/sh
# Run by the nginx image's entrypoint before nginx starts (/docker-entrypoint.d/): write the header line
# that nginx.conf.template includes into the /dicomweb/ proxy. The key comes from OHIF_API_KEY, or from the
# file named by OHIF_API_KEY_FILE (a Docker or Kubernetes secret). Without a key the container stops here with
# the reason, rather than serving a viewer whose every request the node refuses with 401.
set -eu

key="${OHIF_API_KEY:-}"
if [ -z "$key" ] && [ -n "${OHIF_API_KEY_FILE:-}" ]; then
    key="$(cat "$OHIF_API_KEY_FILE")"
fi
if [ -z "$key" ]; then
    echo "ohif: no API key for the node. Create a key with the read scope, list its SHA-256 in" \
         "docker/api-keys.yaml, and start with OHIF_API_KEY=<key> (README, Authentication)." >&2
    exit 1
fi
# Keys as the README makes them (secrets.token_urlsafe) are URL-safe Base64; anything else could break out of
# the quoted nginx string.
case "$key" in
    *[!A-Za-z0-9._~+/=-]*)
        echo "ohif: OHIF_API_KEY holds characters other than A-Z a-z 0-9 . _ ~ + / = -" >&2
        exit 1
        ;;
esac
# OHIF_NGINX_INCLUDE_DIR only moves the file for tests/test_deploy.py; nginx.conf.template reads the default.
dir="${OHIF_NGINX_INCLUDE_DIR:-/etc/nginx/infergate}"
mkdir -p "$dir"
umask 077
printf 'proxy_set_header X-API-Key "%s";\n' "$key" > "$dir/api-key.conf"

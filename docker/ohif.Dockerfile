# syntax=docker/dockerfile:1
# OHIF viewer of the compose stack (`ohif` service): OHIF's prebuilt app served by nginx, with the node's
# DICOMweb forwarded on the same origin (docker/ohif/nginx.conf.template) and one data source, the node
# (docker/ohif/app-config.js).
#   docker build -f docker/ohif.Dockerfile -t infergate-ohif .
#
# The app is the npm package @ohif/app, whose dist/ is the built viewer: the same release that
# scripts/ohif/fetch.sh pins and tests/integration/test_ohif.py drives, fetched at build time only. OHIF's own
# Docker image would do too, but its entrypoint pre-compresses app-config.js into a .gz that nginx serves
# instead of a mounted file, which has changed from release to release.
FROM node:22-bookworm-slim AS ohif

ARG OHIF_VERSION=3.13.2
# The sha512 the registry listed for this release when it was pinned. npm checks a download against the
# registry's current metadata; this check also fails the build if that ever changed under the same version.
ARG OHIF_INTEGRITY=sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA==
WORKDIR /fetch
# Source maps are for debugging OHIF itself (40 MB of the package): left out.
RUN npm pack --silent "@ohif/app@${OHIF_VERSION}" > name.txt \
    && tarball="$(tail -n1 name.txt)" \
    && actual="$(node -e 'const c = require("crypto"), f = require("fs"); process.stdout.write("sha512-" + c.createHash("sha512").update(f.readFileSync(process.argv[1])).digest("base64"))' "${tarball}")" \
    && if [ "${actual}" != "${OHIF_INTEGRITY}" ]; then echo "@ohif/app@${OHIF_VERSION}: ${actual}, expected ${OHIF_INTEGRITY}" >&2; exit 1; fi \
    && tar -xzf "${tarball}" \
    && test -f package/dist/index.html \
    && find package/dist -name '*.map' -delete

FROM nginx:1.27-alpine

# ${NODE_API_URL} in the template: where the node's REST API answers (the compose `api` service).
ENV NODE_API_URL=http://api:8000

RUN rm /etc/nginx/conf.d/default.conf
COPY --from=ohif /fetch/package/dist /usr/share/nginx/html
COPY docker/ohif/app-config.js /usr/share/nginx/html/app-config.js
COPY docker/ohif/nginx.conf.template /etc/nginx/templates/default.conf.template
COPY --chmod=0755 docker/ohif/api-key.sh /docker-entrypoint.d/40-infergate-api-key.sh

EXPOSE 80

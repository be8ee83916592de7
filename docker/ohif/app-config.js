/** @type {AppTypes.Config} */
// OHIF 3.13 configuration of the compose stack (docker/ohif.Dockerfile): one DICOMweb data source, the
// infergate node. The viewer is served by nginx, which also forwards /dicomweb/ to the node's API and adds a
// read-only API key there (docker/ohif/nginx.conf.template), so the browser calls the node on its own origin:
// no CORS and no credential in the page. Same shape as tests/helpers/ohif_server.py's app_config(), which
// tests/integration/test_ohif.py proves against OHIF 3.13.2; tests/test_deploy.py checks that they agree.
//
// The root follows the address the viewer was opened at (localhost, a host name, a reverse proxy), because
// OHIF needs an absolute URL and the node's BulkDataURIs are built from the same Host header.
const dicomweb = `${window.location.origin}/dicomweb`;

window.config = {
  routerBasename: null,
  extensions: [],
  modes: [],
  customizationService: {},
  showStudyList: true,
  maxNumberOfWebWorkers: 3,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: true,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  groupEnabledModesFirst: true,
  maxNumRequests: { interaction: 100, thumbnail: 5, prefetch: 25 },
  showErrorDetails: 'always',
  defaultDataSourceName: 'infergate',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'infergate',
      configuration: {
        friendlyName: 'infergate node',
        name: 'infergate',
        qidoRoot: dicomweb,
        wadoRoot: dicomweb,
        wadoUriRoot: dicomweb,
        // the node's QIDO-RS honours includefield; WADO-RS serves frames and bulk data, so thumbnails and
        // images are both rendered from frames
        qidoSupportsIncludeField: true,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        staticWado: false,
        bulkDataURI: { enabled: true },
        omitQuotationForMultipartRequest: true,
      },
    },
  ],
};

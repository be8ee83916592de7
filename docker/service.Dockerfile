# syntax=docker/dockerfile:1
# The node's front door: the DICOM SCP (`infergate scp`, port 11112) and the REST/DICOMweb API
# (`infergate api`, port 8000); docker-compose.yml sets which one a container runs.
# `infergate-base` is docker/base.Dockerfile's image: compose passes it as an additional build context
# (`service:migrate`); by hand, build and tag that image first.
FROM infergate-base

EXPOSE 11112 8000
CMD ["infergate", "api"]

"""DICOMweb (PS3.18): multipart bodies, media-type negotiation, metadata, frames, STOW-RS and WADO-RS helpers.

Pure functions and SQL lookups the API routers call; nothing here knows about HTTP frameworks.
"""

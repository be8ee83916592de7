"""The operators' dashboard: a static page that reads the REST API from the browser (see ``pages.py``)."""

"""The ``bamflow`` command line (installed as ``bamflow.cli``): a thin layer over the Python API."""

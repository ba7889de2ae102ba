"""Developer tools run through ``python -m fastmlm.tools.<name>`` (see the Makefile)."""

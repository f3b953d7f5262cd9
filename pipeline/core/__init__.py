"""Core: config, manifests, atomic files, downloads and the error type; imports nothing else of pipeline."""

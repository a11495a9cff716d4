"""The embed stage."""

"""The predict stage."""

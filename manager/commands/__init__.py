"""One module per CLI command (or group): what ``optjob NAME`` does, behind ``cli.py``."""

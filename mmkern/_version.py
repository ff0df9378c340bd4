"""The release version, without the local tag that a build adds (setup.py reads this file)."""

BASE_VERSION = "0.1.0"

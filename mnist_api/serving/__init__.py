"""Process-level serving under gunicorn: the keep-alive worker class, gunicorn's logger and the
release-phase check.
"""

"""Asynchronous work: Celery task bodies (task names unchanged), the job store, the job service,
bulk uploads and the Celery result backend wiring.
"""

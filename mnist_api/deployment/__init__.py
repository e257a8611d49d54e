"""Which model version answers: the Deployment value, its store, the manager and router
(canary/shadow), the guard and its evidence, release-phase proposals, change notification and
the `deploy` CLI.
"""

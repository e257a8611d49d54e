"""HTTP routes: `api` (keyed predictions), `ops` (health, readiness), `web` (the page, docs)."""

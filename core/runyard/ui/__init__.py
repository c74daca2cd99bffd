"""``runyard ui``: a run viewer in the browser over the instance's storage (docs/ui.md).

Needs the ``ui`` extra (starlette, uvicorn, jinja2). Nothing here is imported by the CLI
until ``runyard ui`` runs: `app` imports starlette at module level.
"""

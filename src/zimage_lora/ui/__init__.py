"""The web UI (``zimage-lora ui``): an HTTP API and static pages that drive the same CLI and run folders.

The contract between server, pages and tests is docs/ui-api.md. The UI never trains or generates itself: it writes
a job file and runs ``zimage-lora train`` / ``generate`` as separate processes, then reads their run folders.

- ``server``   the FastAPI app: routes, request bodies, errors as one JSON sentence, ``serve`` for the CLI
- ``schema``   the config as the UI sees it: form panels derived from the pydantic schema, the UI's config <-> job
- ``runner``   the queue: each process holds a set of devices, items on other devices run alongside it;
               re-attaching to live processes after a restart
- ``runs``     reading run folders (metrics, samples, checkpoints, logs) without importing torch
- ``db``       SQLite records of jobs and generations in DATA/ui.db, and the lock that keeps to one UI per folder
- ``security`` Host/Origin/token checks, safe paths inside the data folder, names, upload limits
- ``static/``  the pages (HTML/CSS/JS, no build step)
"""

"""The LesionLocator server (``lesionlocator serve``) and its client, ``RemoteBackend``.

- ``wire``: the one binary container (volumes, mask prompts, masks) and the content hash;
- ``config`` / ``auth`` / ``schemas`` / ``errors``: options, tokens + body-size guard, request bodies, HTTP errors;
- ``sessions``: the per-client image store; ``service``: the shared model and its worker thread;
- ``app``: the FastAPI application and ``serve(cfg)``; ``client``: ``RemoteBackend`` / ``RemoteSession`` /
  ``RemoteTracker``, the exact twins of the local backend's objects.
"""

"""The reward service: a reward model behind HTTP (`python main.py serve`). See server.py.

Importing this package needs nothing beyond the standard library; `server` needs fastapi and
uvicorn, imported when the app is built.
"""

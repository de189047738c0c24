"""`metalm serve`: an HTTP service over one pretrained model (FastAPI + uvicorn); see `app`."""

from metalm.serve.app import API_KEY_ENV, ServeLimits, create_app, serve

__all__ = ["API_KEY_ENV", "ServeLimits", "create_app", "serve"]

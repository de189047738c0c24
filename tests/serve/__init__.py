"""A package, so its conftest.py loads as `serve.conftest`; `conftest` stays tests/'s."""

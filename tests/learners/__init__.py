"""A package, so its conftest.py loads as `learners.conftest`; `conftest` stays tests/'s."""

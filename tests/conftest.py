"""Shared test configuration; the gradcore plugin itself comes in through its entry point."""

pytest_plugins = ["pytester"]

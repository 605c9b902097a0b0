"""Conformance runner: CPython's own asyncio test-suite run against ferroloop."""

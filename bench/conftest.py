"""Configuration for the pytest-benchmark suites in bench/ (outside pyproject's testpaths, so
`pytest tests` and a bare `pytest` never collect them)."""


def pytest_configure(config):
    config.addinivalue_line("markers", "bench: a pytest-benchmark suite; run it with pytest bench/")

"""Fixtures shared by the host's tests and every plugin's tests."""
pytest_plugins = ["tests.servers.fixtures", "tests.servers.idp_fixtures", "tests.helpers"]

"""Helpers shared by the tests: fakes for unit tests, real loopback servers for integration."""

"""Fixtures shared by the server tests."""

import asyncio

import pytest


@pytest.fixture
def loop():
    """A fresh event loop for request futures, closed after the test."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()

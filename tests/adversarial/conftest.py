"""Adversarial and interop tests: the relay as a black box, driven by real software.

The shared fixtures of tests/conftest.py (fake_upstream, start_relay, start_relay_process, ...)
apply here too; this file only puts tests/ on sys.path so that the helper modules
(``fakeupstream``, ``relayrunner``, ``util``) import the same way as in tests/.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

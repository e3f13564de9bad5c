"""The README's examples are real: its config and rule blocks load without error."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from relay.rules import compile_rules

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
YAML_BLOCKS = re.findall(r"```yaml\n(.*?)```", README, flags=re.DOTALL)


@pytest.mark.parametrize("block", [b for b in YAML_BLOCKS if b.startswith("rules:")])
def test_readme_rule_examples_compile(block):
    rules = compile_rules(yaml.safe_load(block)["rules"])
    assert rules


def test_readme_has_rule_examples():
    assert sum(1 for b in YAML_BLOCKS if b.startswith("rules:")) >= 3

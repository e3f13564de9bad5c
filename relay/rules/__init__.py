"""Header rules: compile the ``rules:`` config list, evaluate it per message, edit headers.

- ``model``: what a compiled rule is made of (``Rule``, conditions, ``Pattern``, ``Template``,
  ``HeaderValue``) and what applying rules returns (``RulesOutcome``);
- ``compile``: ``compile_rules``, which validates the YAML list and refuses a bad rule at
  start-up;
- ``engine``: ``apply_rules``, which runs the ``client_headers`` policy and the rules on one
  message's header block (the evaluation order is in its docstring);
- ``report``: ``render_rules_report``, the text of ``infobip-relay rules test``.

The X-IB-* header schema that rules and the ``client_headers`` policy check values against
lives in ``relay.infobip.headers``.
"""

from __future__ import annotations

from relay.rules.compile import compile_rules, rule_path
from relay.rules.engine import CLIENT_HEADER_POLICIES, apply_rules
from relay.rules.model import (
    TEMPLATE_FIELDS,
    ClientCondition,
    Condition,
    HeaderValue,
    Pattern,
    PatternCondition,
    Rule,
    RulesOutcome,
    SizeCondition,
    Template,
)
from relay.rules.report import render_rules_report

__all__ = [
    "CLIENT_HEADER_POLICIES",
    "TEMPLATE_FIELDS",
    "ClientCondition",
    "Condition",
    "HeaderValue",
    "Pattern",
    "PatternCondition",
    "Rule",
    "RulesOutcome",
    "SizeCondition",
    "Template",
    "apply_rules",
    "compile_rules",
    "render_rules_report",
    "rule_path",
]

"""The ``infobip-relay rules test`` report: each rule and condition, then the headers."""

from __future__ import annotations

from relay.envelope import MessageContext
from relay.headers import HeaderBlock
from relay.rules.engine import Trace, evaluate
from relay.rules.model import Rule


def render_rules_report(
    rules: tuple[Rule, ...],
    ctx: MessageContext,
    data: bytes,
    client_headers: str = "fix",
) -> str:
    """Text for ``infobip-relay rules test``: each rule and condition, then the headers."""
    outcome, traces = evaluate(rules, ctx, data, client_headers, explain=True)
    lines = [
        "Message:",
        f"  mail from:  {ctx.mail_from or '<>'}",
        f"  rcpt to:    {', '.join(ctx.rcpt_tos) or '-'}",
        f"  client:     {ctx.client_ip}",
        f"  auth user:  {ctx.auth_user or '-'}",
        f"  listener:   {ctx.listener}",
        f"  size:       {ctx.size}",
        "",
        f"Client headers ({client_headers}): {outcome.fixed} fixed, {outcome.dropped} dropped",
        "",
        "Rules:" if rules else "Rules: none configured",
    ]
    for trace in traces:
        lines.extend(_trace_lines(trace))
    if outcome.warnings:
        lines.extend(["", "Warnings:", *(f"  - {warning}" for warning in outcome.warnings)])
    lines.extend(["", f"Route: {_route_line(rules, traces, outcome.route)}"])
    if outcome.mail_from is not None:
        lines.append(f"Envelope sender: {outcome.mail_from} (rewritten from "
                     f"{ctx.mail_from or '<>'})")
    head = HeaderBlock.parse(outcome.data)[0].to_bytes()
    lines.extend(["", "Resulting headers:", _printable_headers(head)])
    return "\n".join(lines) + "\n"


def _route_line(rules: tuple[Rule, ...], traces: list[Trace], route: str) -> str:
    chosen_by = [trace.rule.name for trace in traces
                 if trace.status == "matched" and trace.rule.route is not None]
    if chosen_by:
        return f"upstream {route!r} (rule {chosen_by[-1]!r})"
    routing = any(rule.route is not None for rule in rules)
    return f"upstream {route!r} ({'no matching rule routes it' if routing else 'no rule routes'})"


def _trace_lines(trace: Trace) -> list[str]:
    rule = trace.rule
    verdict = {"matched": "MATCHED", "not matched": "not matched", "skipped": "not evaluated"}
    # Numbered like the default names (the first rule is "1." and "rule 1").
    lines = [f"  {rule.index + 1}. {rule.name}: {verdict[trace.status]}"]
    if trace.status == "skipped":
        lines.append(f"       rule {trace.stopped_by!r} matched with stop: true")
        return lines
    if not trace.checks:
        lines.append("       [x] no conditions: matches every message")
    lines.extend(f"       [{'x' if ok else ' '}] {text}" for ok, text in trace.checks)
    if trace.status == "matched":
        lines.append(f"       actions: {_describe_actions(rule)}")
    return lines


def _describe_actions(rule: Rule) -> str:
    parts = [f"remove {glob}" for glob in rule.remove]
    parts += [f"set {entry.name}: {entry.value}" for entry in rule.set]
    parts += [f"default {entry.name}: {entry.value}" for entry in rule.default]
    if rule.route is not None:
        parts.append(f"route {rule.route}")
    if rule.rewrite is not None:
        parts.append(rule.rewrite.describe())
    if rule.stop:
        parts.append("stop")
    return "; ".join(parts)


def _printable_headers(head: bytes) -> str:
    text = head.decode("utf-8", "replace").replace("\r\n", "\n").rstrip("\n")
    return "\n".join(f"  {line}" for line in text.split("\n"))

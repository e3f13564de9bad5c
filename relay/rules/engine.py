"""Apply compiled rules and the ``client_headers`` policy to one message's header block.

Evaluation order for one message (``apply_rules``):

1. the header block is parsed once (``relay.headers``);
2. the listener's ``client_headers`` policy runs on the headers the application sent;
3. rules run in order; conditions see the headers as edited by earlier rules, every
   matching rule applies and a matching rule with ``stop: true`` ends evaluation;
4. within one rule: ``remove`` first, then ``set``, then ``default``, and
   ``List-Unsubscribe-Post`` last, and only when the message then carries an https
   ``List-Unsubscribe`` (RFC 8058);
5. ``route``: the last matching rule that has one chooses the upstream (none: ``default``);
   ``rewrite`` (last in a rule): Reply-To and From are edited like headers, so later rules
   see them; the envelope sender of the last matching ``rewrite.mail_from`` is only reported
   in the outcome, so ``mail_from`` conditions always see the client's address;
6. the header block is serialised once; the body is never copied into anything but the
   result, and when nothing changed the original ``data`` object is returned.

Applying the same rules to their own output changes nothing (``set`` replaces in place,
``default`` only fills a gap, remove-then-set restores the original position), as long as
no condition tests a header that the rules themselves write.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

from relay.envelope import DEFAULT_UPSTREAM, MessageContext
from relay.headers import HeaderBlock
from relay.infobip.headers import (
    LIST_UNSUBSCRIBE,
    LIST_UNSUBSCRIBE_POST,
    canonical_header_name,
    has_https_uri,
    is_schema_header,
    validate_header_value,
)
from relay.rules.model import Facts, HeaderValue, Rule, RulesOutcome, lookup_template_value
from relay.rules.sender import SenderRewrite, reply_to_field

CLIENT_HEADER_POLICIES = ("keep", "fix", "strip")


@dataclass(slots=True)
class _Edits:
    """Counters and warnings gathered while editing one message."""

    fixed: int = 0
    dropped: int = 0
    warnings: list[str] = field(default_factory=list)
    route: str = DEFAULT_UPSTREAM
    mail_from: str | None = None
    # The From header before any rule rewrote it: what ``reply_to: original`` points back to.
    original_from: str | None = None


@dataclass(frozen=True, slots=True)
class Trace:
    """How one rule fared, for explanations and the ``rules test`` report."""

    rule: Rule
    status: str  # "matched", "not matched" or "skipped"
    checks: tuple[tuple[bool, str], ...] = ()
    stopped_by: str = ""

    def sentence(self) -> str:
        if self.status == "skipped":
            return f"{self.rule.name}: not evaluated, rule {self.stopped_by!r} stopped evaluation"
        if not self.checks:
            return f"{self.rule.name}: matched, it has no conditions"
        wanted = self.status == "matched"
        reasons = " and ".join(text for ok, text in self.checks if ok == wanted)
        return f"{self.rule.name}: {self.status} because {reasons}"


def apply_rules(
    rules: tuple[Rule, ...],
    ctx: MessageContext,
    data: bytes,
    client_headers: str = "fix",
    explain: bool = False,
) -> RulesOutcome:
    """Apply the client-header policy and the rules to one message (see module docstring)."""
    outcome, _ = evaluate(rules, ctx, data, client_headers, explain)
    return outcome


def evaluate(
    rules: tuple[Rule, ...],
    ctx: MessageContext,
    data: bytes,
    client_headers: str,
    explain: bool,
) -> tuple[RulesOutcome, list[Trace]]:
    """``apply_rules``, also returning how each rule fared (for the ``rules test`` report)."""
    if client_headers not in CLIENT_HEADER_POLICIES:
        raise ValueError(f"client_headers must be one of {', '.join(CLIENT_HEADER_POLICIES)}")
    if not rules and client_headers == "keep":  # nothing to do: not even a route
        return RulesOutcome(data, (), (), 0, 0, ()), []
    block, offset = HeaderBlock.parse(data)
    edits = _Edits()
    _apply_client_policy(block, client_headers, edits)
    if any(rule.rewrite is not None for rule in rules):
        edits.original_from = block.get("From")
    traces = _run_rules(rules, Facts(ctx, block), edits, explain)
    head = block.to_bytes()
    result = data if head == block.original else head + data[offset:]
    outcome = RulesOutcome(
        data=result,
        matched=tuple(trace.rule.name for trace in traces if trace.status == "matched"),
        explanations=tuple(trace.sentence() for trace in traces) if explain else (),
        fixed=edits.fixed,
        dropped=edits.dropped,
        warnings=tuple(edits.warnings),
        route=edits.route,
        mail_from=edits.mail_from,
    )
    return outcome, traces


def _run_rules(rules: tuple[Rule, ...], facts: Facts, edits: _Edits, explain: bool) -> list[Trace]:
    traces: list[Trace] = []
    stopped_by = ""
    for rule in rules:
        if stopped_by:
            if explain:
                traces.append(Trace(rule, "skipped", stopped_by=stopped_by))
            continue
        checks: tuple[tuple[bool, str], ...] = ()
        if explain:
            checks = tuple(condition.explain(facts) for condition in rule.conditions)
            matched = all(ok for ok, _ in checks)
        else:
            matched = all(condition.matches(facts) for condition in rule.conditions)
        if matched:
            _apply_actions(rule, facts, edits)
            stopped_by = rule.name if rule.stop else ""
        if matched or explain:
            traces.append(Trace(rule, "matched" if matched else "not matched", checks))
    return traces


def _apply_actions(rule: Rule, facts: Facts, edits: _Edits) -> None:
    if rule.route is not None:
        edits.route = rule.route  # the last matching rule with a route wins
    block = facts.headers
    for glob in rule.remove:
        block.remove(glob)
    one_click: list[tuple[HeaderValue, bool]] = []
    for entries, replace in ((rule.set, True), (rule.default, False)):
        for entry in entries:
            if entry.name == LIST_UNSUBSCRIBE_POST:
                one_click.append((entry, replace))
            else:
                _write_header(rule, entry, replace, facts, edits)
    for entry, replace in one_click:
        if _message_has_https_unsubscribe(block):
            _write_header(rule, entry, replace, facts, edits)
        else:
            edits.warnings.append(
                f"rule {rule.name!r}: {LIST_UNSUBSCRIBE_POST} not added, the message has no"
                f" https {LIST_UNSUBSCRIBE} (RFC 8058)"
            )
    if rule.rewrite is not None:
        _rewrite_sender(rule, rule.rewrite, facts, edits)


def _rewrite_sender(rule: Rule, rewrite: SenderRewrite, facts: Facts, edits: _Edits) -> None:
    """Envelope sender (applied after all rules), Reply-To, then From (see relay.rules.sender).

    The envelope sender changes in the outcome only: the ``mail_from`` conditions of later
    rules, like ``allowed_senders`` before them, see the address the client gave.
    """
    if rewrite.mail_from is not None:
        edits.mail_from = rewrite.mail_from
    block = facts.headers
    if rewrite.reply_to_original and edits.original_from and not block.has("Reply-To"):
        block.set_field("Reply-To", reply_to_field(edits.original_from))
    if rewrite.header_from is None:
        return
    try:
        block.set_field("From", rewrite.header_from.render(
            partial(lookup_template_value, facts)))
    except ValueError as error:
        edits.warnings.append(f"rule {rule.name!r}: From not rewritten: {error}")


def _write_header(
    rule: Rule, entry: HeaderValue, replace: bool, facts: Facts, edits: _Edits
) -> None:
    if not replace and facts.headers.has(entry.name):
        return
    try:
        value = entry.render(facts)
    except ValueError as error:
        edits.warnings.append(f"rule {rule.name!r}: {entry.name} not set: {error}")
        return
    facts.headers.set(entry.name, value)


def _message_has_https_unsubscribe(block: HeaderBlock) -> bool:
    return any(has_https_uri(value) for value in block.get_all(LIST_UNSUBSCRIBE))


# --- client header policy ------------------------------------------------------------------


def _apply_client_policy(block: HeaderBlock, policy: str, edits: _Edits) -> None:
    if policy == "strip":
        edits.dropped += block.remove("x-ib-*")
    elif policy == "fix":
        _fix_client_headers(block, edits)


def _fix_client_headers(block: HeaderBlock, edits: _Edits) -> None:
    seen: set[str] = set()
    for header in block.fields(is_schema_header):
        try:
            name = canonical_header_name(header.name)
        except ValueError as error:
            # A misspelt X-IB-* name would reach Infobip and be ignored there: drop it loudly,
            # as `fix` does with every other value it cannot repair.
            block.delete(header.index)
            edits.dropped += 1
            edits.warnings.append(f"client header {header.name} dropped: {error}")
            continue
        if name in seen:
            block.delete(header.index)
            edits.dropped += 1
            edits.warnings.append(f"client header {name} dropped: duplicate, the first is kept")
            continue
        seen.add(name)
        try:
            value = validate_header_value(name, header.value)
        except ValueError as error:
            block.delete(header.index)
            edits.dropped += 1
            edits.warnings.append(f"client header {name} dropped: {error}")
            continue
        # List-Unsubscribe normalisation only respaces the list: not worth rewriting a
        # header that the application may have signed.
        if value != header.value and name != LIST_UNSUBSCRIBE:
            block.replace(header.index, name, value)
            edits.fixed += 1
    _drop_orphan_one_click(block, edits)


def _drop_orphan_one_click(block: HeaderBlock, edits: _Edits) -> None:
    if not block.has(LIST_UNSUBSCRIBE_POST) or _message_has_https_unsubscribe(block):
        return
    edits.dropped += block.remove(LIST_UNSUBSCRIBE_POST)
    edits.warnings.append(
        f"client header {LIST_UNSUBSCRIBE_POST} dropped: no https {LIST_UNSUBSCRIBE} (RFC 8058)"
    )

"""HTTP's side of the prediction cache: ``Cache-Control`` → Policy, Outcome → ``Cache-Status``. Pure."""

from __future__ import annotations

from .cache import Outcome, Policy


def request_policy(cache_control: str | None) -> Policy:
    """What a request's ``Cache-Control`` asks of the cache (RFC 9111 request directives)."""
    if not cache_control:
        return Policy.NORMAL
    directives = {d.strip().lower().replace(" ", "") for d in cache_control.split(",")}
    if "no-store" in directives:
        return Policy.BYPASS
    if "no-cache" in directives or "max-age=0" in directives:
        return Policy.REFRESH
    return Policy.NORMAL


def cache_status(outcome: Outcome) -> str:
    """The outcome as an RFC 9211 ``Cache-Status`` header value."""
    parts = ["tfwsgi", "hit" if outcome.hit else f"fwd={outcome.fwd}"]
    if outcome.stored:
        parts.append("stored")
    if outcome.collapsed:
        parts.append("collapsed")
    if outcome.detail:
        parts.append(f"detail={outcome.detail}")
    return "; ".join(parts)

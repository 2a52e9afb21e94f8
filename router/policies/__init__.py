"""Prefill routing policies, picked by name (`--routing-policy`); one file each."""

from __future__ import annotations

from router.policies.base import PrefillPolicy
from router.policies.least_load import LeastLoadPolicy
from router.policies.prefix import PrefixPolicy
from router.policies.round_robin import RoundRobinPolicy

POLICIES: dict[str, type[PrefillPolicy]] = {
    "prefix": PrefixPolicy,
    "least_load": LeastLoadPolicy,
    "round_robin": RoundRobinPolicy,
}


def make_policy(name: str, **kwargs) -> PrefillPolicy:
    try:
        return POLICIES[name](**kwargs)
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; one of {sorted(POLICIES)}") from None


__all__ = ["POLICIES", "PrefillPolicy", "make_policy"]
